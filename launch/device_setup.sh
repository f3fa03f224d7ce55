#!/usr/bin/env bash
# The GPU device's Python environment from the wheels carried in .whl/ (the device has torch but none of
# jambatrain's other dependencies, and no network). Two uses:
#
#   bash launch/device_setup.sh prepare     # here, before a device call: fill .whl/ (git-ignored) from
#                                           # ../shared/device-wheelhouse (pure wheels + prebuilt sm_90 kernels)
#   source launch/device_setup.sh           # on the device, first thing in the command (carry: [".whl"]):
#                                           # pip-installs .whl/*.whl into /tmp/site, exports PYTHONPATH
#
# ../shared/device-wheelhouse/README.md says which wheels those are and for which torch/CUDA/Python they hold.
# Sourced, it never exits the calling shell: a missing .whl/ is reported and the caller's script decides.
_jt_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${1:-}" == prepare ]]; then
  set -euo pipefail
  src=${WHEELHOUSE:-$_jt_repo/../shared/device-wheelhouse}
  mkdir -p "$_jt_repo/.whl"
  cp "$src"/*.whl "$src"/kernels-torch2.11-cu130-sm90/*.whl "$_jt_repo/.whl/"
  echo "device_setup: $(ls "$_jt_repo/.whl" | wc -l) wheels, $(du -sh "$_jt_repo/.whl" | cut -f1) in .whl/ (carry it)"
  exit 0
fi
if compgen -G "$_jt_repo/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$_jt_repo"/.whl/*.whl \
    && export PYTHONPATH=/tmp/site:$_jt_repo${PYTHONPATH:+:$PYTHONPATH} \
    && echo "device_setup: installed $(ls "$_jt_repo"/.whl/*.whl | wc -l) wheels into /tmp/site"
else
  echo "device_setup: no wheels in $_jt_repo/.whl (run 'bash launch/device_setup.sh prepare' before the call" \
       "and carry .whl); using the Python environment as it is"
  export PYTHONPATH=$_jt_repo${PYTHONPATH:+:$PYTHONPATH}
fi
