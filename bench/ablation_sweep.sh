#!/usr/bin/env bash
# The Jamba paper's ablations (arXiv 2403.19887, sec. 6) at small scale on one GPU, in one command:
#   1. sweep: one Hydra multirun over the presets h200_1b (attention:Mamba 1:7), ablate_mamba_only,
#      ablate_attention_only, ablate_attn_1to3, ablate_rope (1:7 + RoPE), shrunk to ~30M parameters and trained on
#      the synthetic recall task (data=mqar), the trainer's eval (val loss, MQAR, passkey) every quarter of the run;
#      a variant the multirun did not finish (one failing job ends a Hydra multirun) is retried on its own;
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
# env: OUT (default ./ablation_out), STEPS (default 800), PY (python3), BUDGET_S (total wall budget, default 530;
#      later stages are skipped when it is spent), STAGES (default "sweep memory longctx eval report"),
#      RUNS (run dirs with their checkpoints, default /tmp/jambatrain_ablation; only the small files -- configs,
#      metrics, eval JSON, logs -- are copied to $OUT), ABL_CPU=1 (toy sizes on CPU), LONGCTX_S (limit of stage 4, default 150), EXTRA (more Hydra overrides for every variant)
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
  STEPS=${STEPS:-800}
  # ~30M parameters (hybrid 1:7): one Jamba block of 8 layers at width 512, dense FFN, 2k vocabulary; small enough
  # that 5 variants x 800 steps fit the device call, wide enough for attention to solve the task
  SIZE=(model.hidden_size=512 model.intermediate_size=1408 model.num_hidden_layers=8 model.num_attention_heads=8
        model.num_key_value_heads=4 model.vocab_size=2048 model.compile_elementwise=false)
  # recall at 512 tokens, 4-128 pairs per training sequence, 64 x 512 tokens per step; eval also at 1024 (2 x the
  # trained length: no positional limit in any variant, RoPE's extrapolation shows there)
  DATA=(data=mqar data.seq_len=512 data.mqar.max_pairs=128 parallel.micro_batch_size=64)
  EVAL=(eval.mqar_context_lengths=[128,256,512,1024] eval.mqar_num_pairs=[8,32,64,128] eval.mqar_samples=64
        eval.batch_size=32 eval.passkey_samples=4)
  MEM=(model=1.3b --contexts 4096,32768,262144)
fi
TRAIN=(trainer.max_steps=$STEPS trainer.log_every=10 trainer.eval_every=$((STEPS >= 4 ? STEPS / 4 : 1)) trainer.eval_batches=4
       trainer.save_every=$STEPS trainer.keep_checkpoints=1 trainer.progress_bar=false optim.lr=1e-3
       optim.warmup_steps=$((STEPS / 8)) logger=none)
[[ -n "${ABL_CPU:-}" ]] && TRAIN+=(trainer.log_every=1)
# shellcheck disable=SC2206
COMMON=("${SIZE[@]}" "${DATA[@]}" "${TRAIN[@]}" "${EVAL[@]}" ${EXTRA:-})
RUNS=${RUNS:-/tmp/jambatrain_ablation}
mkdir -p "$RUNS"
SWEEP=$RUNS/sweep
log "variants: ${VARIANTS[*]}; steps $STEPS; common overrides: ${COMMON[*]}"

done_marker() { [[ "$(cat "$1/checkpoints/latest" 2>/dev/null)" == "step_$(printf %08d "$STEPS")" ]]; }

if stage sweep; then
  rm -rf "$SWEEP"  # a fresh sweep: old run dirs would be resumed, not retrained
  lim=$(( $(left) - 100 ))  # memory and evals need the rest
  log "stage sweep: one multirun over ${#VARIANTS[@]} variants (limit ${lim}s)"
  timeout --signal=TERM --kill-after=20 "$lim" $PY -m jambatrain.train -m \
      "experiment=$(IFS=,; echo "${VARIANTS[*]}")" "${COMMON[@]}" "hydra.sweep.dir=$SWEEP" \
      || log "multirun exited with $? (variants it did not finish are retried one by one)"
  for i in "${!VARIANTS[@]}"; do
    run=$SWEEP/$i
    done_marker "$run" && continue
    lim=$(( $(left) - 100 ))
    if (( lim < 60 )); then log "no time left to retry ${VARIANTS[$i]}"; continue; fi
    log "retrying ${VARIANTS[$i]} alone in $run (limit ${lim}s)"
    rm -rf "$run"
    timeout --signal=TERM --kill-after=20 "$lim" $PY -m jambatrain.train "experiment=${VARIANTS[$i]}" \
        "${COMMON[@]}" "hydra.run.dir=$run" || log "${VARIANTS[$i]} failed ($?)"
  done
fi

if stage memory && (( $(left) > 30 )); then
  log "stage memory: ${MEM[*]}"
  timeout --kill-after=10 $(( $(left) < 120 ? $(left) : 120 )) $PY bench/memory_check.py "${MEM[@]}" \
      --out "$OUT/memory_check.json" || log "memory check failed ($?)"
  $PY -m jambatrain.memory experiment=jamba_v0_1 --context 262144 > "$OUT/memory_table1.txt" 2>&1 \
      || log "jambatrain.memory failed"
  cat "$OUT/memory_table1.txt"
fi

if stage longctx && [[ -z "${ABL_CPU:-}" ]] && (( $(left) > 120 )); then
  lim=$(( $(left) - 60 < ${LONGCTX_S:-150} ? $(left) - 60 : ${LONGCTX_S:-150} ))  # leave the evals a minute
  log "stage longctx: h200_1b at 262,144 tokens (limit ${lim}s)"
  timeout --signal=TERM --kill-after=20 "$lim" $PY -m jambatrain.train experiment=h200_1b data=mqar \
      data.seq_len=262144 parallel.micro_batch_size=1 model.activation_checkpointing=full \
      model.loss_chunk_tokens=16384 model.compile_elementwise=false trainer.max_steps=3 trainer.log_every=1 \
      trainer.save_every=0 trainer.progress_bar=false optim.warmup_steps=1 logger=none "hydra.run.dir=$RUNS/longctx" \
      || log "long-context run failed or ran out of time ($?)"
fi

if stage eval; then
  mkdir -p "$OUT/eval"
  for i in "${!VARIANTS[@]}"; do
    run=$SWEEP/$i
    [[ -d $run/checkpoints ]] || { log "no checkpoint for ${VARIANTS[$i]}: skipping its eval"; continue; }
    if (( $(left) < 45 )); then log "no time left for the eval of ${VARIANTS[$i]}"; continue; fi
    log "stage eval: python -m jambatrain.eval $run"
    timeout --kill-after=10 $(( $(left) < 120 ? $(left) : 120 )) $PY -m jambatrain.eval "$run" "${EVAL[@]}" \
        trainer.progress_bar=false "eval.out=$OUT/eval/${VARIANTS[$i]}.json" || log "eval of ${VARIANTS[$i]} failed ($?)"
  done
fi

if stage report; then
  log "stage report: copying configs, metrics, eval results and logs (no checkpoints) from $RUNS to $OUT"
  [[ "$RUNS" -ef "$OUT" ]] || tar -C "$RUNS" --exclude=checkpoints --exclude=wandb -cf - . | tar -C "$OUT" -xf -
  $PY bench/ablation_report.py "$OUT" || log "report failed ($?): rerun python bench/ablation_report.py OUT here"
fi
log "done in $((SECONDS - START))s; files under $OUT"
