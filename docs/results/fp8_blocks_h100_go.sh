#!/bin/bash
# fp8c's device call: compiled block regions (model.compile_blocks) GPU tests + bench, bf16 and FP8
set -o pipefail
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); el() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"
F="grep -v ^W1\|UserWarning\|warnings.warn\|Failed.to.load\|register_constant"
el gpu tests
timeout 75 python3 -m pytest -m gpu -x -q -s -p no:cacheprovider tests/test_compiled_blocks_gpu.py 2>&1 | $F > $OUT/tests.log
tail -8 $OUT/tests.log
el v0.1 block
timeout 150 python3 bench/throughput.py --model v0.1-block --set num_hidden_layers=4 --which jambatrain \
  --jt-variants opt,opt+blocks,opt+fp8dense,opt+fp8dense+blocks --batch 1 --grad-accum 8 --steps 2 --warmup 1 \
  --json $OUT/v01_block.json 2>&1 | $F > $OUT/v01_block.log
grep "^\[\|speedup\|summary\|^jambatrain\|^opt\|GPU" $OUT/v01_block.log | tail -20
el 1.3b
R=$(( 318 - ($(date +%s) - T0) ))
echo "1.3b gets $R s"
timeout $R python3 bench/throughput.py --model conf/model/1.3b.yaml --which jambatrain \
  --jt-variants opt,opt+fp8,opt+fp8+blocks,opt+blocks --batch 4 --steps 3 --warmup 2 \
  --json $OUT/b13_dense.json 2>&1 | $F > $OUT/b13_dense.log
grep "^\[\|speedup\|GPU" $OUT/b13_dense.log | tail -20
el end
