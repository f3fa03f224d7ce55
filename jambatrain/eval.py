"""Evaluate a checkpoint: ``python -m jambatrain.eval RUN_DIR_OR_CHECKPOINT [hydra overrides]``.

RUN_DIR_OR_CHECKPOINT is a run dir, its ``checkpoints/`` dir or one ``checkpoints/step_XXXXXXXX`` dir (as for
``jambatrain.export_hf``). The config is composed by Hydra from ``conf/train.yaml`` with the run's own overrides
(``RUN_DIR/.hydra/overrides.yaml``) and then the ones given here (e.g. ``eval.tasks=[mqar]``,
``eval.mqar_samples=64``, ``parallel.device=cpu``); the architecture is the one stored with the checkpoint. Runs
on CPU (reference ops) or GPU, as one process or under ``torchrun`` (every rank takes its share of every task; the
counts are summed over ranks, so the results do not depend on the world size). Results go to ``eval.out``
(default ``RUN_DIR/eval/eval_step<N>.json``) and the last line printed is that file's path.

Tasks (``eval.tasks``):
  val      validation loss and perplexity on the run's val split: the exact token-weighted mean of the
           cross-entropy over every token of every rank's val batches (``eval.val_batches`` per rank, 0 = all);
  mqar     multi-query associative recall (jambatrain/data/mqar.py): key-value pairs, then the keys asked again;
           accuracy of the argmax prediction at each query key = its value, per context length and number of
           pairs (``eval.mqar_context_lengths`` x ``eval.mqar_num_pairs``, ``eval.mqar_samples`` each);
  mqar_zoology  Zoology's MQAR test set (``data.mqar_zoology.test``, data/mqar.py): mean per-example accuracy at
           the query positions, overall and per segment (the Based figure-2 metric);
  passkey  a passkey (``eval.passkey_tokens`` tokens after a marker) hidden at depth d of a repeated-filler
           haystack and asked for at the end; teacher-forced accuracy on the passkey tokens (and on its first
           token, the one that needs retrieval), per length (up to the trained ``data.seq_len``) and depth.
MQAR and passkey sequences are generated from ``eval.seed`` and the model's vocabulary (``data.mqar`` ids).

The trainer calls ``evaluate_in_training`` every ``trainer.eval_every`` steps (val limited to
``trainer.eval_batches`` per rank); its flat metrics (``val_loss``, ``val_ppl``, ``mqar_acc``,
``mqar_acc/L256_N16``, ``passkey_acc``, ...) go to metrics.jsonl and W&B, the full result to
``RUN_DIR/eval/eval_step<N>.json``.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as tdist

from .config import TrainConfig
from .data.remote import is_url
from .data.sources import BatchSource, data_kind, doc_starts
from .fileio import atomic_write


# ------------------------------------------------------------------------------------------------ the metrics

def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        t = t.clone()
        tdist.all_reduce(t)
    return t


def _scored_logits(model, input_ids: torch.Tensor, labels: torch.Tensor, doc_starts=None):
    """(logits fp32 (M, vocab), targets (M,)) at the M positions whose label is not -100; the LM head is applied
    only there, so long sequences never hold (seq x vocab) logits."""
    h, _, _ = model.hidden_states(input_ids, doc_starts)
    keep = labels != -100
    return model.lm_head(h[keep]).float(), labels[keep]


@torch.no_grad()
def val_metrics(model, cfg: TrainConfig, loader: BatchSource, device: torch.device, max_batches: int = 0,
                bar=None) -> dict:
    """Token-weighted mean cross-entropy over every rank's batches (the sums and counts are all-reduced)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        logits, target = _scored_logits(model, ids, labels, doc_starts({"input_ids": ids}, cfg.data, ids.device))
        total[0] += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double()
        total[1] += target.numel()
        if bar is not None:
            bar.update(1)
    total = _all_sum(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total[1].item())}


def default_lengths(seq_len: int, count: int = 4, smallest: int = 16) -> list[int]:
    """``count`` lengths up to ``seq_len``: seq_len / 2^(count-1) ... seq_len (none below ``smallest`` unless
    seq_len is)."""
    lengths = sorted({max(min(smallest, seq_len), seq_len >> k) for k in range(count)})
    return lengths


def _rank_share(n: int, rank: int, world: int) -> range:
    """Sample indices of this rank when ``n`` is rounded up to a multiple of the world size (every rank the same
    count, so collective forwards stay in step)."""
    n = -(-n // world) * world
    return range(rank, n, world)


@torch.no_grad()
def _accuracy_grid(model, cells: list, make, samples: int, batch_size: int, device, rank: int, world: int,
                   extra_first: bool, bar=None) -> torch.Tensor:
    """For each cell, [correct, scored, first_correct, first_scored] summed over all ranks. ``make(cell, i)`` ->
    (tokens, labels) numpy arrays of sample i."""
    out = torch.zeros(len(cells), 4, dtype=torch.float64, device=device)
    for c, cell in enumerate(cells):
        idx = list(_rank_share(samples, rank, world))
        for b in range(0, len(idx), batch_size):
            rows = [make(cell, i) for i in idx[b:b + batch_size]]
            tokens = torch.from_numpy(np.stack([t for t, _ in rows])).to(device)
            labels = torch.from_numpy(np.stack([lab for _, lab in rows])).to(device)
            logits, target = _scored_logits(model, tokens[:, :-1], labels)
            hit = logits.argmax(-1) == target
            out[c, 0] += hit.sum()
            out[c, 1] += hit.numel()
            if extra_first:  # the first scored position of every row
                first = (labels != -100).int().argmax(1)
                keep = labels != -100
                pos_in_kept = torch.cumsum(keep.flatten().int(), 0).view_as(keep) - 1
                sel = pos_in_kept[torch.arange(len(rows), device=device), first]
                out[c, 2] += hit[sel].sum()
                out[c, 3] += len(rows)
            if bar is not None:
                bar.update(1)
    return _all_sum(out)


def mqar_metrics(model, cfg: TrainConfig, device, rank: int = 0, world: int = 1, bar=None) -> dict:
    from .data.mqar import mqar_sequence

    ev = cfg.eval
    cells = mqar_cells(cfg)

    def make(cell, i):
        length, pairs = cell
        rng = np.random.default_rng([ev.seed, 2, length, pairs, i])
        return mqar_sequence(rng, cfg.data.mqar, length + 1, pairs)

    grid = _accuracy_grid(model, cells, make, ev.mqar_samples, _batch(cfg), device, rank, world, False, bar)
    result = {f"L{length}_N{pairs}": (grid[c, 0] / grid[c, 1]).item() for c, (length, pairs) in enumerate(cells)}
    by_length = {}
    for c, (length, _) in enumerate(cells):
        by_length.setdefault(length, []).append(result[f"L{length}_N{cells[c][1]}"])
    return {"mqar_acc": (grid[:, 0].sum() / grid[:, 1].sum().clamp(min=1)).item(), "mqar": result,
            "mqar_by_length": {str(k): sum(v) / len(v) for k, v in by_length.items()}}


@torch.no_grad()
def mqar_zoology_metrics(model, cfg: TrainConfig, device, rank: int = 0, world: int = 1, bar=None) -> dict:
    """Zoology's test accuracy on ``data.mqar_zoology.test``: per example, the share of its queries whose argmax is
    the value; ``mqar_zoology_acc`` is the mean over all examples (Zoology's ``valid/accuracy``), and
    ``mqar_zoology`` holds it per segment (``L{seq_len}_N{pairs}``). Each rank takes every world-th example."""
    from .data.mqar import zoology_segments

    segs = zoology_segments(cfg.data.mqar_zoology, "test")
    b = _batch(cfg)
    out = torch.zeros(len(segs), 2, dtype=torch.float64, device=device)  # [sum of per-example accuracy, examples]
    for s, (inputs, labels) in enumerate(segs):
        idx = np.arange(rank, len(inputs), world)
        for lo in range(0, len(idx), b):
            rows = idx[lo:lo + b]
            ids = torch.from_numpy(np.asarray(inputs[rows], dtype=np.int64)).to(device)
            lab = torch.from_numpy(np.asarray(labels[rows], dtype=np.int64)).to(device)
            logits, target = _scored_logits(model, ids, lab)
            keep = lab != -100
            hit = torch.zeros(lab.shape, dtype=torch.float64, device=device)
            hit[keep] = (logits.argmax(-1) == target).double()
            out[s, 0] += (hit.sum(1) / keep.sum(1).clamp(min=1)).sum()
            out[s, 1] += len(rows)
            if bar is not None:
                bar.update(1)
    out = _all_sum(out)
    specs = cfg.data.mqar_zoology.test
    return {"mqar_zoology_acc": (out[:, 0].sum() / out[:, 1].sum()).item(),
            "mqar_zoology": {f"L{L}_N{N}": (out[i, 0] / out[i, 1]).item() for i, (L, N, _) in enumerate(specs)}}


def mqar_cells(cfg: TrainConfig) -> list[tuple[int, int]]:
    lengths = list(cfg.eval.mqar_context_lengths) or default_lengths(cfg.data.seq_len)
    cells = [(length, pairs) for length in lengths for pairs in cfg.eval.mqar_num_pairs
             if 4 * pairs <= length and pairs <= cfg.data.mqar.num_keys]
    if not cells:
        raise SystemExit(f"eval: no MQAR cell fits: eval.mqar_num_pairs={list(cfg.eval.mqar_num_pairs)} need "
                         f"4 x pairs <= the context lengths {lengths}")
    return cells


def passkey_metrics(model, cfg: TrainConfig, device, rank: int = 0, world: int = 1, bar=None) -> dict:
    from .data.mqar import passkey_sequence

    ev = cfg.eval
    cells = passkey_cells(cfg)

    def make(cell, i):
        length, depth = cell
        rng = np.random.default_rng([ev.seed, 3, length, int(round(depth * 1000)), i])
        return passkey_sequence(rng, cfg.data.mqar, length + 1, depth, ev.passkey_tokens)

    grid = _accuracy_grid(model, cells, make, ev.passkey_samples, _batch(cfg), device, rank, world, True, bar)
    result = {f"L{length}_d{depth:.2f}": {"acc": (grid[c, 0] / grid[c, 1]).item(),
                                          "first_token_acc": (grid[c, 2] / grid[c, 3]).item()}
              for c, (length, depth) in enumerate(cells)}
    return {"passkey_acc": (grid[:, 0].sum() / grid[:, 1].sum().clamp(min=1)).item(),
            "passkey_first_token_acc": (grid[:, 2].sum() / grid[:, 3].sum().clamp(min=1)).item(),
            "passkey": result}


def passkey_cells(cfg: TrainConfig) -> list[tuple[int, float]]:
    lengths = list(cfg.eval.passkey_lengths) or default_lengths(cfg.data.seq_len)
    too_long = [n for n in lengths if n > cfg.data.seq_len]
    if too_long:
        print(f"eval: passkey lengths {too_long} exceed the trained data.seq_len={cfg.data.seq_len} "
              "(extrapolation)", file=sys.stderr)
    return [(length, float(d)) for length in lengths for d in cfg.eval.passkey_depths]


def _batch(cfg: TrainConfig) -> int:
    return cfg.eval.batch_size or cfg.parallel.micro_batch_size


def run_tasks(model, cfg: TrainConfig, device, rank: int, world: int, data_dir: str, val_batches: int,
              progress: bool) -> dict:
    """Every task of ``eval.tasks`` on ``model`` (eval mode, no grad); the nested result dict."""
    from .data import make_loader

    tasks = list(cfg.eval.tasks)
    loader = make_loader(cfg, "val", rank, world, data_dir) if "val" in tasks else None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        b = _batch(cfg)
        steps = 0
        if loader is not None:
            steps += min(loader.batches_per_epoch, val_batches or loader.batches_per_epoch)
        per_cell = {"mqar": -(-len(_rank_share(cfg.eval.mqar_samples, 0, world)) // b),
                    "passkey": -(-len(_rank_share(cfg.eval.passkey_samples, 0, world)) // b)}
        if "mqar" in tasks:
            steps += len(mqar_cells(cfg)) * per_cell["mqar"]
        if "passkey" in tasks:
            steps += len(passkey_cells(cfg)) * per_cell["passkey"]
        if "mqar_zoology" in tasks:
            steps += sum(-(-len(range(0, n, world)) // b) for _, _, n in cfg.data.mqar_zoology.test)
        bar = tqdm(total=steps, desc="eval", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    was_training = model.training
    model.eval()
    out = {}
    try:
        if loader is not None:
            out.update(val_metrics(model, cfg, loader, device, val_batches, bar))
        if "mqar" in tasks:
            out.update(mqar_metrics(model, cfg, device, rank, world, bar))
        if "passkey" in tasks:
            out.update(passkey_metrics(model, cfg, device, rank, world, bar))
        if "mqar_zoology" in tasks:
            out.update(mqar_zoology_metrics(model, cfg, device, rank, world, bar))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out


def flat_metrics(result: dict) -> dict:
    """The scalars of a result for metrics.jsonl / W&B: nested dicts become ``name/key`` entries."""
    flat = {}
    for k, v in result.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    for kkk, vvv in vv.items():
                        flat[f"{k}_{kkk}/{kk}"] = vvv
                else:
                    flat[f"{k}/{kk}"] = vv
        else:
            flat[k] = v
    return flat


def _write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(result, indent=1))


def evaluate_in_training(model, cfg: TrainConfig, dist, data_dir: str, step: int, run_dir: str) -> dict:
    """The trainer's ``trainer.eval_every`` hook: all ranks run ``eval.tasks`` (val limited to
    ``trainer.eval_batches``); rank 0 writes RUN_DIR/eval/eval_step<N>.json. Returns the flat metrics to log."""
    result = run_tasks(model, cfg, dist.device, dist.rank, dist.world_size, data_dir, cfg.trainer.eval_batches,
                       progress=False)
    if dist.is_main:
        _write({"step": step, **result}, os.path.join(run_dir, "eval", f"eval_step{step:08d}.json"))
    return flat_metrics(result)


# ------------------------------------------------------------------------------------------------ the CLI

# the standalone eval's sizes on a CPU (the reference Mamba scan): the whole val split, 32 MQAR and 4 passkey sequences
# per cell at the training micro batch take minutes for even the tiny model; a GPU keeps the schema's defaults
CPU_DEFAULTS = {"val_batches": 16, "mqar_samples": 8, "passkey_samples": 2, "batch_size": 16}


def scale_defaults(cfg: TrainConfig, device: torch.device, overrides: list[str]) -> list[str]:
    """On CPU, lower the ``eval.*`` sizes not given on the command line to ``CPU_DEFAULTS`` (never raise one);
    returns ``key=value`` for each one changed."""
    if device.type != "cpu":
        return []
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    changed = []
    for key, small in CPU_DEFAULTS.items():
        now = getattr(cfg.eval, key)
        if f"eval.{key}" in given:
            continue
        if key == "batch_size":
            if now == 0 and cfg.parallel.micro_batch_size < small:  # 0: the micro batch; fewer, larger forwards
                setattr(cfg.eval, key, small)
                changed.append(f"eval.{key}={small}")
        elif (key == "val_batches" and now == 0) or now > small:  # val_batches 0: the whole split
            setattr(cfg.eval, key, small)
            changed.append(f"eval.{key}={small}")
    return changed


def _split_argv(argv: list[str]) -> tuple[str, list[str]]:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    paths = [a for a in argv if "=" not in a and not a.startswith("-")]
    if len(paths) != 1 or any(a.startswith("-") for a in argv):
        raise SystemExit("usage: python -m jambatrain.eval RUN_DIR_OR_CHECKPOINT [key=value ...] (Hydra overrides "
                         f"of conf/train.yaml, e.g. eval.tasks=[val,mqar] parallel.device=cpu); got {argv}")
    return paths[0], [a for a in argv if a != paths[0]]


def compose_config(src: str, overrides: list[str]):
    """(TrainConfig, checkpoint root, tag, run dir): Hydra-composed from the run's overrides + ``overrides``; the
    model's architecture from the checkpoint's train_state.json (run-time knobs may be overridden)."""
    from .runs import compose_for_checkpoint

    return compose_for_checkpoint(src, overrides, tool="eval")


def load_model(cfg: TrainConfig, root: str, tag: str, device: torch.device, dtype: torch.dtype):
    from .export_hf import check_state_dict, consolidated_state_dict
    from .models import JambaLM

    sd = consolidated_state_dict(root, tag)
    check_state_dict(sd, cfg.model)
    with torch.device("meta"):
        model = JambaLM(cfg.model)
    if cfg.model.tie_word_embeddings and "lm_head.weight" in sd \
            and not torch.equal(sd["lm_head.weight"], sd["embed_tokens.weight"]):
        raise SystemExit(f"eval: {os.path.join(root, tag)} has model.tie_word_embeddings=true but its lm_head and "
                         "embed_tokens weights differ: the checkpoint was not trained tied (set "
                         "model.tie_word_embeddings=false to evaluate it as it is)")
    model.load_state_dict(sd, assign=True)  # JambaLM re-ties a tied LM head after assigning
    return model.to(device=device, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> dict:
    from .parallel import init_distributed
    from .parallel.deepspeed_setup import resolve_precision

    src, overrides = _split_argv(sys.argv[1:] if argv is None else argv)
    cfg, root, tag, run_dir = compose_config(src, overrides)
    from .config import problems

    errors = [p for p in problems(cfg) if not p.startswith("data.dir=")]  # val needs the dir only if asked
    if errors:
        raise SystemExit("eval: invalid configuration:\n  - " + "\n  - ".join(errors))
    dist = init_distributed(cfg.parallel)
    scaled = scale_defaults(cfg, dist.device, overrides)
    if scaled and dist.is_main:
        print(f"eval: on CPU, smaller defaults (set them to override): {', '.join(scaled)}", file=sys.stderr,
              flush=True)
    data_dir = data_kind(cfg).data_dir(cfg)  # "" for synthetic data
    if "val" in cfg.eval.tasks and data_dir and not is_url(data_dir) \
            and not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        raise SystemExit(f"eval: the val task needs the run's shards at data.dir={data_dir} (no manifest.json "
                         "there): point data.dir at them or drop val from eval.tasks")
    dtype = torch.bfloat16 if resolve_precision(cfg, dist.device) == "bf16" else torch.float32
    model = load_model(cfg, root, tag, dist.device, dtype)
    step = json.load(open(os.path.join(root, tag, "train_state.json"))).get("step", 0) \
        if os.path.isfile(os.path.join(root, tag, "train_state.json")) else 0
    if dist.is_main:
        print(f"eval: {os.path.join(root, tag)} (step {step}), {model.num_params() / 1e6:,.1f}M parameters, "
              f"{dist.world_size} x {dist.device.type} {str(dtype).replace('torch.', '')}, tasks "
              f"{list(cfg.eval.tasks)}", file=sys.stderr, flush=True)
    result = run_tasks(model, cfg, dist.device, dist.rank, dist.world_size, data_dir, cfg.eval.val_batches,
                       progress=cfg.trainer.progress_bar)
    result = {"checkpoint": os.path.join(root, tag), "step": step, "world_size": dist.world_size,
              "device": dist.device.type, "dtype": str(dtype).replace("torch.", ""),
              "num_params": model.num_params(), "model": asdict(cfg.model), "eval": asdict(cfg.eval), **result}
    out = cfg.eval.out or os.path.join(run_dir, "eval", f"eval_step{step:08d}.json")
    if dist.is_main:
        _write(result, out)
        summary = {k: round(v, 4) for k, v in result.items() if k.endswith(("_loss", "_ppl", "_acc"))}
        print(f"eval: {summary}", file=sys.stderr)
        print(out, flush=True)
    if tdist.is_initialized():
        tdist.barrier()
    return result


if __name__ == "__main__":
    main()
