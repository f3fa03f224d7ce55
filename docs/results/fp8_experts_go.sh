#!/bin/bash
# The FP8-experts device call (docs/benchmarks.md, "Experts: weight gradients in the stored layout ..."): GPU tests,
# the expert computation alone (--moe-bench), the v0.1 block bf16 vs FP8 variants. Run from the repo root on the
# device with .whl, .dev/fp8whl and .dev/fp8x carried.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .dev/fp8whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/.dev/fp8x PYTHONUNBUFFERED=1 JAMBATRAIN_CACHE=/tmp/jtcache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd .dev/fp8x
T0=$(date +%s); el() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, torchao, triton; print('torch', torch.__version__, 'torchao', torchao.__version__, 'triton', triton.__version__)"
F="^W1\|UserWarning\|warnings.warn"
el gpu tests
timeout 110 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_fp8_gpu.py 2>&1 | tee $OUT/gpu_tests.log | grep -v "$F" | grep "expert\|passed\|failed\|FAILED\|Error" | tail -40
el moe bench
timeout 50 python3 bench/throughput.py --model v0.1-block --set num_hidden_layers=4 --which '' --moe-bench --batch 1 --json $OUT/moe_bench.json 2>&1 | tee $OUT/moe_bench.log | grep -v "$F" | tail -16
el v0.1 block
timeout $(( 300 - $(date +%s) + T0 )) python3 bench/throughput.py --model v0.1-block --set num_hidden_layers=4 --which jambatrain --jt-variants opt,opt+fp8dense,opt+fp8+fp8wgfp8,opt+fp8+fp8wgbf16 --batch 1 --grad-accum 8 --steps 2 --warmup 1 --json $OUT/v01_block.json 2>&1 | tee $OUT/v01_block.log | grep -v "$F" | grep "^\[\|summary\|speedup\|^model \|^jambatrain\|Error\|error\|fp8" | cut -c1-400 | tail -24
el end
