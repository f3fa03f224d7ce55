#!/bin/bash
# Parity follow-up: FP8 tensorwise with the weight cache off (no compiled blocks), and a second FP8 + blocks replicate
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .dev/fp8whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAMBATRAIN_CACHE=/tmp/jtcache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); el() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "from jambatrain.data.corpus import prepare_default_corpus as p; p('/tmp/jtcache/stdlib_py_v4096_s4096', 4096, 4096)" 2>&1 | tail -1
P="experiment=h200_1b logger=none parallel.zero_stage=2 parallel.micro_batch_size=1 optim.warmup_steps=30 trainer.max_steps=300 trainer.save_every=0 trainer.log_every=5 trainer.progress_bar=false model.fp8=tensorwise"
run() { timeout 195 python3 -m jambatrain.train $P hydra.run.dir=/tmp/par_$1 "${@:2}" > $OUT/par_$1.log 2>&1; cp /tmp/par_$1/metrics.jsonl $OUT/par_$1.jsonl 2>/dev/null; }
el pair
run fp8nocache_a model.fp8_cache_weights=false & run fp8blocks_b model.compile_blocks=true & wait
el done
for r in fp8nocache_a fp8blocks_b; do echo "-- $r: $(grep -c '"loss"' $OUT/par_$r.jsonl 2>/dev/null) rows"; grep "fast paths\|Error\|Traceback" $OUT/par_$r.log | head -2 | cut -c1-300; tail -1 $OUT/par_$r.log | cut -c1-150; done
