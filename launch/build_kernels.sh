#!/usr/bin/env bash
# Offline build of the CUDA kernel wheels jambatrain's GPU fast paths use, against the local torch/CUDA:
#   mamba-ssm (selective scan), causal-conv1d, and optionally megablocks + stanford-stk (dMoE ops);
#   and jambatrain's own csrc/selective_scan_reset (mamba-ssm's scan with document resets, for data.doc_mask).
#
# usage: launch/build_kernels.sh [SDIST_DIR=.whl/sdists] [OUT_DIR=.whl/built]
#
# SDIST_DIR holds the PyPI sdists: mamba_ssm-*.tar.gz, causal_conv1d-*.tar.gz, megablocks-*.tar.gz,
# stanford_stk-*.tar.gz (the ones not there are skipped). No network is used.
#
# env:
#   ARCH       compute capability to build for, e.g. 90 (default: the local GPU's; 90 if none is visible)
#   MAX_JOBS   parallel nvcc jobs in total (default: nproc); shared out between the builds, which run at once
#   WHICH      subset of "mamba conv megablocks stk reset" (default: all five; reset is built from this repo)
#   SPLIT_TU   1 (default): split causal-conv1d's fwd/bwd .cu files into several translation units so the
#              build parallelises (one file held ~6 min of the old build); 0: build the sources as shipped
#   COMPRESS   1 (default): compressed fatbins (nvcc --compress-mode=size, else -Xfatbin=-compress-all, whichever
#              this nvcc accepts, through NVCC_APPEND_FLAGS) and host debug info stripped at link, for wheels
#              small enough to carry between machines; 0: as upstream builds them
#   DRY_RUN    1: unpack and patch only, build nothing (checks the patches apply)
#   PYTHON     python to build with (default: python3); it must hold torch, setuptools, wheel, ninja
#
# What it changes in the sources (build copies only, under $WORK):
#   mamba-ssm, causal-conv1d: the -gencode list becomes ARCH only (setup.py otherwise compiles ~9 archs);
#   megablocks: csrc/cumsum.h stops passing CUB's `debug_synchronous` argument, removed in CUDA 13's CUB.
# Wheels are built with `pip wheel --no-deps --no-build-isolation`, *_FORCE_BUILD=TRUE (never download).
set -euo pipefail

SDIST_DIR=$(realpath "${1:-.whl/sdists}")
OUT_DIR=$(realpath -m "${2:-.whl/built}")
PY=${PYTHON:-python3}
WHICH=${WHICH:-"mamba conv megablocks stk reset"}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SPLIT_TU=${SPLIT_TU:-1}
NPROC=$(nproc)
MAX_JOBS=${MAX_JOBS:-$NPROC}
WORK=${WORK:-$(mktemp -d /tmp/build_kernels.XXXXXX)}
mkdir -p "$OUT_DIR" "$WORK"

if [[ -z "${ARCH:-}" ]]; then
  ARCH=$($PY -c 'import torch
print("%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "90")')
fi
ARCH_DOTTED="${ARCH:0:${#ARCH}-1}.${ARCH: -1}"
export TORCH_CUDA_ARCH_LIST="$ARCH_DOTTED"
echo "[build_kernels] torch $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')," \
     "nvcc $(nvcc --version | grep -o 'release [0-9.]*' || echo '?'), arch sm_$ARCH, MAX_JOBS=$MAX_JOBS, $NPROC cores"
echo "[build_kernels] sdists: $SDIST_DIR -> wheels: $OUT_DIR (work dir $WORK)"

if [[ "${COMPRESS:-1}" == 1 && "${DRY_RUN:-0}" != 1 ]]; then
  echo '__global__ void k(float *p) { p[threadIdx.x] = 1.f; }' > "$WORK/probe.cu"
  for flag in "--compress-mode=size" "-Xfatbin=-compress-all"; do
    if nvcc -c -gencode "arch=compute_$ARCH,code=sm_$ARCH" $flag "$WORK/probe.cu" -o "$WORK/probe.o" 2>/dev/null; then
      export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }$flag"; break
    fi
  done
  export LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,--strip-debug"
  echo "[build_kernels] compression: NVCC_APPEND_FLAGS='${NVCC_APPEND_FLAGS:-}' LDFLAGS='$LDFLAGS'"
fi

want() { [[ " $WHICH " == *" $1 "* ]]; }
find_sdist() { ls "$SDIST_DIR"/$1-*.tar.gz 2>/dev/null | head -1; }

unpack() {  # unpack <glob-name> -> prints the source dir
  local tgz; tgz=$(find_sdist "$1")
  [[ -n "$tgz" ]] || { echo "[build_kernels] no $1 sdist in $SDIST_DIR" >&2; return 1; }
  tar -xzf "$tgz" -C "$WORK"
  echo "$WORK/$(basename "$tgz" .tar.gz)"
}

restrict_gencode() {  # setup.py of mamba-ssm / causal-conv1d: compile for $ARCH only
  $PY - "$1" "$ARCH" <<'EOF'
import sys
path, arch = sys.argv[1], sys.argv[2]
s = open(path).read()
marker = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
assert marker in s, f"{path}: gencode marker not found (new setup.py layout?)"
flag = f'["-gencode", "arch=compute_{arch},code=sm_{arch}"]'
line = f"    if not HIP_BUILD: cc_flag = {flag}\n" if "HIP_BUILD" in s else f"    cc_flag = {flag}\n"
open(path, "w").write(s.replace(marker, line + marker, 1))
print(f"[build_kernels] {path}: gencode -> sm_{arch}")
EOF
}

split_translation_units() {  # causal-conv1d: one .cu per few explicit instantiations
  $PY - "$1" <<'EOF'
import re, sys
from pathlib import Path
src = Path(sys.argv[1])
setup = (src / "setup.py").read_text()
for name, per in (("causal_conv1d_fwd", 3), ("causal_conv1d_bwd", 2)):
    cu = src / "csrc" / f"{name}.cu"
    lines = cu.read_text().splitlines(keepends=True)
    inst = [l for l in lines if l.startswith("template void ")]
    body = [l for l in lines if not l.startswith("template void ")]
    (src / "csrc" / f"{name}_impl.cuh").write_text("#pragma once\n" + "".join(body))
    parts = []
    for i in range(0, len(inst), per):
        p = f"csrc/{name}_part{i // per}.cu"
        (src / p).write_text(f'#include "{name}_impl.cuh"\n' + "".join(inst[i:i + per]))
        parts.append(p)
    old = f'"csrc/{name}.cu",'
    assert old in setup, old
    setup = setup.replace(old, " ".join(f'"{p}",' for p in parts))
    print(f"[build_kernels] {name}.cu: {len(inst)} instantiations -> {len(parts)} translation units")
(src / "setup.py").write_text(setup)
EOF
}

patch_megablocks() {  # CUDA 13's CUB dropped DeviceScan's debug_synchronous argument
  $PY - "$1/csrc/cumsum.h" <<'EOF'
import re, sys
p = sys.argv[1]
s = open(p).read()
s2, n = re.subn(r",\s*debug_synchronous\s*\)\)", "))", s)
assert n >= 1, "debug_synchronous call sites not found"
open(p, "w").write(s2)
print(f"[build_kernels] {p}: dropped debug_synchronous from {n} CUB calls")
EOF
}

build() {  # build <label> <srcdir> <jobs> [env...]
  local label=$1 src=$2 jobs=$3; shift 3
  local t0=$SECONDS
  echo "[build_kernels] $label: start (MAX_JOBS=$jobs)"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "[build_kernels] $label: DRY_RUN, sources patched in $src"; return 0; fi
  if env MAX_JOBS="$jobs" "$@" $PY -m pip wheel --no-deps --no-build-isolation --no-index -w "$OUT_DIR" "$src" \
       >"$WORK/$label.log" 2>&1; then
    echo "[build_kernels] $label: OK in $((SECONDS - t0)) s"
  else
    echo "[build_kernels] $label: FAILED after $((SECONDS - t0)) s; last lines of $WORK/$label.log:"
    grep -E "error|Error" "$WORK/$label.log" | head -20 || true
    tail -30 "$WORK/$label.log"
    return 1
  fi
}

# Share the cores: the mamba build has the most (and the longest) translation units.
J_MAMBA=$(( MAX_JOBS * 10 / 16 )); J_MAMBA=$(( J_MAMBA < 1 ? 1 : J_MAMBA ))
J_CONV=$(( MAX_JOBS * 8 / 16 )); J_CONV=$(( J_CONV < 1 ? 1 : J_CONV ))
T0=$SECONDS
pids=(); labels=()
if want mamba && [[ -n "$(find_sdist mamba_ssm)" ]]; then
  d=$(unpack mamba_ssm); restrict_gencode "$d/setup.py"
  build mamba-ssm "$d" "$J_MAMBA" MAMBA_FORCE_BUILD=TRUE & pids+=($!); labels+=(mamba-ssm)
fi
if want conv && [[ -n "$(find_sdist causal_conv1d)" ]]; then
  d=$(unpack causal_conv1d); restrict_gencode "$d/setup.py"
  [[ "$SPLIT_TU" == 1 ]] && split_translation_units "$d"
  build causal-conv1d "$d" "$J_CONV" CAUSAL_CONV1D_FORCE_BUILD=TRUE & pids+=($!); labels+=(causal-conv1d)
fi
if want megablocks && [[ -n "$(find_sdist megablocks)" ]]; then
  d=$(unpack megablocks); patch_megablocks "$d"
  build megablocks "$d" 2 & pids+=($!); labels+=(megablocks)
fi
if want reset; then  # in-repo sources: a copy, so the build leaves no artefacts in the checkout
  cp -r "$REPO/csrc/selective_scan_reset" "$WORK/selective_scan_reset"
  build scan-reset "$WORK/selective_scan_reset" 4 & pids+=($!); labels+=(scan-reset)
fi
if want stk && [[ -n "$(find_sdist stanford_stk)" ]]; then
  d=$(unpack stanford_stk)
  build stanford-stk "$d" 1 & pids+=($!); labels+=(stanford-stk)
fi

failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { failed=1; echo "[build_kernels] ${labels[$i]} failed"; }
done
echo "[build_kernels] all builds done in $((SECONDS - T0)) s; wheels:"
ls -la "$OUT_DIR"
exit $failed
