#!/usr/bin/env bash
# The Jamba paper's ablations (arXiv 2403.19887, sec. 6) at small scale on one GPU, in one command:
#   1. sweep: one Hydra multirun over the presets h200_1b (attention:Mamba 1:7), ablate_mamba_only,
#      ablate_attention_only, ablate_attn_1to3, ablate_rope (1:7 + RoPE), shrunk to ~30M parameters and trained on
#      the synthetic recall task (data=mqar), the trainer's eval (val loss, MQAR, passkey) every quarter of the run;
#      the steps per variant are what the budget allows after a 30-step probe; a variant the multirun did not
#      finish (one failing job ends a Hydra multirun) is retried on its own;
#   then, side by side (none of them measures throughput):
#   2. memory: the 1.3b KV-cache / Mamba-state formula against a forward's tensors (bench/memory_check.py) and
#      python -m jambatrain.memory for the paper's Table 1;
#   3. longctx: the 1.3b preset training 3 steps at 262,144 tokens (activation checkpointing, chunked loss);
#   4. eval: python -m jambatrain.eval on each variant's final checkpoint -> $OUT/eval/<variant>.json;
#   5. report: bench/ablation_report.py -> ablation_summary.json, ablation_table.md, PNG plots (if matplotlib).
# Everything is logged to $OUT/sweep.log; each stage has its own time limit and a failing one does not stop the
# rest. On the device (carry [".whl"], after `bash launch/device_setup.sh prepare` here):
#   bash bench/ablation_sweep.sh
# CPU check of the logic at toy size (a few minutes on 2 cores):
#   ABL_CPU=1 OUT=/tmp/abl PY=.venv/bin/python bash bench/ablation_sweep.sh
#
# env: OUT (default ./ablation_out), STEPS (default auto on GPU: what the budget allows after a 30-step probe, 200-1500;
#      4 on CPU), PY (python3), BUDGET_S (total wall budget, default 530;
#      later stages are skipped when it is spent), STAGES (default "sweep memory longctx eval report"),
#      ABL_DATA, ABL_EVAL (replace the task / eval overrides, below),
#      RUNS (run dirs with their checkpoints, default /tmp/jambatrain_ablation; only the small files -- configs,
#      metrics, eval JSON, logs -- are copied to $OUT), ABL_CPU=1 (toy sizes on CPU), RESERVE_S (seconds kept for stages 2-4, run side by side after the sweep, default 150), EXTRA (more Hydra overrides for every variant)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/ablation_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/sweep.log") 2>&1
START=$SECONDS
BUDGET_S=${BUDGET_S:-530}
STAGES=${STAGES:-"sweep memory longctx eval report"}
PY=${PY:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
RESERVE_S=${RESERVE_S:-150}  # after the sweep: memory check, long context and the CLI evals, side by side
left() { echo $((BUDGET_S - (SECONDS - START))); }
stage() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "[ablation $(date +%H:%M:%S) +$((SECONDS - START))s] $*"; }

if [[ -z "${ABL_CPU:-}" ]]; then
  source launch/device_setup.sh
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# the most telling contrasts first: if the time runs out, the last ones are missing
VARIANTS=(h200_1b ablate_mamba_only ablate_attention_only ablate_attn_1to3 ablate_rope)
if [[ -n "${ABL_CPU:-}" ]]; then
  STEPS=${STEPS:-4}
  SIZE=(model.hidden_size=64 model.intermediate_size=128 model.num_hidden_layers=8 model.num_attention_heads=4
        model.num_key_value_heads=2 model.vocab_size=256 parallel.device=cpu parallel.precision=fp32)
  DATA=(data=mqar data.seq_len=64 data.mqar.num_keys=64 data.mqar.num_filler=16 data.mqar.max_pairs=16
        data.mqar.val_samples=16 parallel.micro_batch_size=4)
  EVAL=(eval.mqar_context_lengths=[32,64] eval.mqar_num_pairs=[4,16] eval.mqar_samples=4 eval.passkey_samples=1
        eval.passkey_depths=[0.0,0.5,1.0])
  MEM=(model=tiny --contexts 64,256)
else
  STEPS=${STEPS:-auto}
  # ~30M parameters (hybrid 1:7): one Jamba block of 8 layers at width 512, dense FFN, 2k vocabulary; small enough
  # that 5 variants x several hundred steps fit the device call, wide enough for attention to solve the task
  SIZE=(model.hidden_size=512 model.intermediate_size=1408 model.num_hidden_layers=8 model.num_attention_heads=8
        model.num_key_value_heads=4 model.vocab_size=2048 model.compile_elementwise=false)
  # recall at 512 tokens, 4-128 pairs per training sequence, 64 x 512 tokens per step; eval also at 1024 (2 x the
  # trained length: no positional limit in any variant, RoPE's extrapolation shows there)
  DATA=(data=mqar data.seq_len=512 data.mqar.max_pairs=128 parallel.micro_batch_size=64)
  EVAL=(eval.mqar_context_lengths=[128,256,512,1024] eval.mqar_num_pairs=[8,32,64,128] eval.mqar_samples=64
        eval.batch_size=32 eval.passkey_samples=4)
  MEM=(model=1.3b --contexts 4096,32768,262144)
fi
# ABL_DATA / ABL_EVAL (space-separated overrides) replace the task and eval settings above, e.g. the easier task of
# docs/results.md's second run: ABL_DATA="data=mqar data.seq_len=256 data.mqar.num_keys=64 data.mqar.num_filler=32
# data.mqar.max_pairs=32 parallel.micro_batch_size=64" ABL_EVAL="eval.mqar_context_lengths=[128,256,512]
# eval.mqar_num_pairs=[8,16,32] eval.mqar_samples=64 eval.batch_size=32 eval.passkey_samples=4"
# shellcheck disable=SC2206
[[ -n "${ABL_DATA:-}" ]] && DATA=(${ABL_DATA})
# shellcheck disable=SC2206
[[ -n "${ABL_EVAL:-}" ]] && EVAL=(${ABL_EVAL})
RUNS=${RUNS:-/tmp/jambatrain_ablation}
mkdir -p "$RUNS"
if [[ $STEPS == auto ]] && stage sweep; then  # as many steps as the budget allows, from a 30-step probe of the 1:7 hybrid
  log "probe: 30 steps of the 1:7 hybrid to size the sweep"
  rm -rf "$RUNS/probe"
  timeout --kill-after=10 150 $PY -m jambatrain.train experiment=h200_1b "${SIZE[@]}" "${DATA[@]}" \
      trainer.max_steps=30 trainer.log_every=10 trainer.save_every=0 trainer.progress_bar=false logger=none \
      "hydra.run.dir=$RUNS/probe" || log "probe failed ($?)"
  # per variant: (sweep time / variants) - ~25 s of start-up, 4 evals and the checkpoint; 200..1500 steps
  STEPS=$($PY - "$RUNS/probe/metrics.jsonl" $(( $(left) - RESERVE_S )) ${#VARIANTS[@]} <<'PYEOF'
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_s")]
step_s = (rows[-1]["tokens"] / rows[-1]["step"]) / statistics.median(r["tokens_per_s"] for r in rows[1:])
per_variant = int(sys.argv[2]) / int(sys.argv[3]) - 25
print(max(200, min(1500, int(per_variant / step_s) // 40 * 40)))
print(f"probe: {step_s * 1000:.0f} ms/step -> {per_variant:.0f} s of training per variant", file=sys.stderr)
PYEOF
  ) || STEPS=600
  log "steps per variant: $STEPS"
fi
[[ $STEPS == auto ]] && STEPS=800  # no sweep in this call: only names the checkpoints the eval stage looks for
TRAIN=(trainer.max_steps=$STEPS trainer.log_every=10 trainer.eval_every=$((STEPS >= 4 ? STEPS / 4 : 1)) trainer.eval_batches=4
       trainer.save_every=$STEPS trainer.keep_checkpoints=1 trainer.progress_bar=false optim.lr=1e-3
       optim.warmup_steps=$((STEPS / 8)) logger=none)
[[ -n "${ABL_CPU:-}" ]] && TRAIN+=(trainer.log_every=1)
# shellcheck disable=SC2206
COMMON=("${SIZE[@]}" "${DATA[@]}" "${TRAIN[@]}" "${EVAL[@]}" ${EXTRA:-})
SWEEP=$RUNS/sweep
log "variants: ${VARIANTS[*]}; steps $STEPS; common overrides: ${COMMON[*]}"

done_marker() { [[ "$(cat "$1/checkpoints/latest" 2>/dev/null)" == "step_$(printf %08d "$STEPS")" ]]; }

if stage sweep; then
  rm -rf "$SWEEP"  # a fresh sweep: old run dirs would be resumed, not retrained
  lim=$(( $(left) - RESERVE_S ))  # the stages after the sweep need the rest
  log "stage sweep: one multirun over ${#VARIANTS[@]} variants (limit ${lim}s)"
  timeout --signal=TERM --kill-after=20 "$lim" $PY -m jambatrain.train -m \
      "experiment=$(IFS=,; echo "${VARIANTS[*]}")" "${COMMON[@]}" "hydra.sweep.dir=$SWEEP" \
      || log "multirun exited with $? (variants it did not finish are retried one by one)"
  for i in "${!VARIANTS[@]}"; do
    run=$SWEEP/$i
    done_marker "$run" && continue
    lim=$(( $(left) - RESERVE_S ))
    if (( lim < 60 )); then log "no time left to retry ${VARIANTS[$i]}"; continue; fi
    log "retrying ${VARIANTS[$i]} alone in $run (limit ${lim}s)"
    rm -rf "$run"
    timeout --signal=TERM --kill-after=20 "$lim" $PY -m jambatrain.train "experiment=${VARIANTS[$i]}" \
        "${COMMON[@]}" "hydra.run.dir=$run" || log "${VARIANTS[$i]} failed ($?)"
  done
fi

# stages 2-4 together: none of them measures throughput, and the small evals, the memory check and the 1.3b
# long-context run fit on one H200 at once; each writes its own log, appended to sweep.log when all are done
lim=$(( $(left) - 15 ))
BG=() PIDS=()
if stage memory && (( lim > 20 )); then
  log "stage memory: ${MEM[*]} (limit ${lim}s, log memory.log)"
  ( timeout --kill-after=10 "$lim" $PY bench/memory_check.py "${MEM[@]}" --out "$OUT/memory_check.json" \
      || echo "memory check failed ($?)"
    $PY -m jambatrain.memory experiment=jamba_v0_1 --context 262144 > "$OUT/memory_table1.txt" 2>&1 \
      || echo "jambatrain.memory failed" ) > "$OUT/memory.log" 2>&1 &
  PIDS+=($!) BG+=("$OUT/memory.log")
fi
if stage longctx && [[ -z "${ABL_CPU:-}" ]] && (( lim > 60 )); then
  log "stage longctx: h200_1b at 262,144 tokens (limit ${lim}s, log longctx.log)"
  timeout --signal=TERM --kill-after=15 "$lim" $PY -m jambatrain.train experiment=h200_1b data=mqar \
      data.seq_len=262144 parallel.micro_batch_size=1 model.activation_checkpointing=full \
      model.loss_chunk_tokens=16384 model.compile_elementwise=false trainer.max_steps=3 trainer.log_every=1 \
      trainer.save_every=0 trainer.progress_bar=false optim.warmup_steps=1 logger=none "hydra.run.dir=$RUNS/longctx" \
      > "$OUT/longctx.log" 2>&1 || echo "long-context run failed or ran out of time ($?)" >> "$OUT/longctx.log" &
  PIDS+=($!) BG+=("$OUT/longctx.log")
fi
if stage eval; then
  mkdir -p "$OUT/eval"
  for i in "${!VARIANTS[@]}"; do
    run=$SWEEP/$i v=${VARIANTS[$i]}
    [[ -d $run/checkpoints ]] || { log "no checkpoint for $v: no jambatrain.eval"; continue; }
    (( lim > 20 )) || { log "no time left for the eval of $v"; continue; }
    log "stage eval: python -m jambatrain.eval $run (limit ${lim}s, log eval/$v.log)"
    timeout --kill-after=10 "$lim" $PY -m jambatrain.eval "$run" "${EVAL[@]}" trainer.progress_bar=false \
        "eval.out=$OUT/eval/$v.json" > "$OUT/eval/$v.log" 2>&1 || echo "eval of $v failed ($?)" >> "$OUT/eval/$v.log" &
    PIDS+=($!) BG+=("$OUT/eval/$v.log")
  done
fi
# the PIDs, not a bare `wait`: that would also wait for the `tee` of this script's own log, which never ends
(( ${#PIDS[@]} )) && wait "${PIDS[@]}"
for f in "${BG[@]}"; do echo "===== $f"; cat "$f"; done
[[ -f "$OUT/memory_table1.txt" ]] && cat "$OUT/memory_table1.txt"

if stage report; then
  log "stage report: copying configs, metrics, eval results and logs (no checkpoints) from $RUNS to $OUT"
  [[ "$RUNS" -ef "$OUT" ]] || tar -C "$RUNS" --exclude=checkpoints --exclude=wandb -cf - . | tar -C "$OUT" -xf -
  $PY bench/ablation_report.py "$OUT" || log "report failed ($?): rerun python bench/ablation_report.py OUT here"
fi
log "done in $((SECONDS - START))s; files under $OUT"
