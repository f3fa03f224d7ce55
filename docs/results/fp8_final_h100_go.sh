#!/bin/bash
# Final call: merged main's FP8 GPU tests beside two parity runs (FP8 + compiled blocks, tensorwise and rowwise),
# then the benches (v0.1 block, 1.3b dense) with and without the compiled block regions
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .dev/fp8whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAMBATRAIN_CACHE=/tmp/jtcache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); el() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
F="grep -v ^W1\|UserWarning\|warnings.warn\|Failed.to.load\|register_constant"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
git log --oneline -1 2>/dev/null | tee -a $OUT/gpu.txt
python3 -c "from jambatrain.data.corpus import prepare_default_corpus as p; p('/tmp/jtcache/stdlib_py_v4096_s4096', 4096, 4096)" 2>&1 | tail -1
P="experiment=h200_1b logger=none parallel.zero_stage=2 parallel.micro_batch_size=1 optim.warmup_steps=30 trainer.max_steps=300 trainer.save_every=0 trainer.log_every=5 trainer.progress_bar=false model.compile_blocks=true"
run() { timeout 235 python3 -m jambatrain.train $P hydra.run.dir=/tmp/par_$1 "${@:2}" > $OUT/par_$1.log 2>&1; cp /tmp/par_$1/metrics.jsonl $OUT/par_$1.jsonl 2>/dev/null; }
el parity pair + GPU tests
run fp8blocks_a model.fp8=tensorwise & run fp8rowblocks_a model.fp8=rowwise &
sleep 20
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_gpu.py -k "not zero2" 2>&1 | $F > $OUT/tests_fp8.log; tail -4 $OUT/tests_fp8.log
el compiled blocks GPU tests
timeout 110 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_compiled_blocks_gpu.py 2>&1 | $F > $OUT/tests_blocks.log; tail -4 $OUT/tests_blocks.log
wait
el parity done
for r in fp8blocks_a fp8rowblocks_a; do echo "-- $r: $(grep -c '"loss"' $OUT/par_$r.jsonl 2>/dev/null) rows"; grep "fast paths\|Error\|Traceback" $OUT/par_$r.log | head -3 | cut -c1-400; tail -1 $OUT/par_$r.log | cut -c1-200; done
el v0.1 block
timeout 170 python3 bench/throughput.py --model v0.1-block --set num_hidden_layers=4 --which jambatrain \
  --jt-variants opt,opt+blocks,opt+fp8dense,opt+fp8dense+blocks,opt+fp8+blocks --batch 1 --grad-accum 8 --steps 3 --warmup 1 \
  --json $OUT/v01_block.json 2>&1 | $F > $OUT/v01_block.log
grep "^\[\|speedup\|ratio" $OUT/v01_block.log | tail -20
R=$(( 540 - ($(date +%s) - T0) )); el "1.3b dense ($R s)"
timeout $R python3 bench/throughput.py --model conf/model/1.3b.yaml --which jambatrain \
  --jt-variants opt,opt+fp8+blocks,opt+blocks,opt+fp8 --batch 4 --steps 3 --warmup 2 \
  --json $OUT/b13_dense.json 2>&1 | $F > $OUT/b13_dense.log
grep "^\[\|speedup\|ratio" $OUT/b13_dense.log | tail -20
el end
