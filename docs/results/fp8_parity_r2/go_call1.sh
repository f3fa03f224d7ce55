#!/bin/bash
# Loss parity with replicates: bf16 x2 and FP8 x2 from the same seed (run from the repo root on the device)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .dev/fp8whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAMBATRAIN_CACHE=/tmp/jtcache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); el() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
git log --oneline -1 2>/dev/null | tee -a $OUT/gpu.txt
python3 -c "from jambatrain.data.corpus import prepare_default_corpus as p; p('/tmp/jtcache/stdlib_py_v4096_s4096', 4096, 4096)" 2>&1 | tail -1
el corpus ready
STEPS=300; if [ "$MEM" -gt 120000 ]; then GA=2; TO=360; else GA=1; TO=200; fi; echo "grad accum $GA" | tee -a $OUT/gpu.txt
P="experiment=h200_1b logger=none parallel.zero_stage=2 parallel.micro_batch_size=1 parallel.grad_accum_steps=$GA optim.warmup_steps=30 trainer.max_steps=$STEPS trainer.save_every=0 trainer.log_every=5 trainer.progress_bar=false"
run() {  # name, extra args
  timeout $TO python3 -m jambatrain.train $P hydra.run.dir=/tmp/par_$1 "${@:2}" > $OUT/par_$1.log 2>&1
  cp /tmp/par_$1/metrics.jsonl $OUT/par_$1.jsonl 2>/dev/null
}
if [ "$MEM" -gt 120000 ]; then
  el 4 runs at once
  run bf16_a & run fp8_a model.fp8=tensorwise & run bf16_b & run fp8_b model.fp8=tensorwise & wait
else
  el pair a
  run bf16_a & run fp8_a model.fp8=tensorwise & wait
  el pair b
  run bf16_b & run fp8_b model.fp8=tensorwise & wait
fi
el done
for r in bf16_a fp8_a bf16_b fp8_b; do echo "-- $r: $(grep -c '"loss"' $OUT/par_$r.jsonl 2>/dev/null) loss rows"; grep -i "fp8 \|error\|Traceback" $OUT/par_$r.log | head -4 | cut -c1-300; tail -2 $OUT/par_$r.log | cut -c1-300; done
python3 bench/loss_parity.py $OUT/par_bf16_a.jsonl $OUT/par_fp8_a.jsonl --window 10 | tail -2
python3 bench/loss_parity.py $OUT/par_bf16_a.jsonl $OUT/par_bf16_b.jsonl --window 10 --labels bf16,bf16b | tail -2
python3 bench/loss_parity.py $OUT/par_bf16_b.jsonl $OUT/par_fp8_b.jsonl --window 10 | tail -2
python3 bench/loss_parity.py $OUT/par_fp8_a.jsonl $OUT/par_fp8_b.jsonl --window 10 --labels fp8,fp8b | tail -2
