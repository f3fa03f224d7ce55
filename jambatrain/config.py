"""Typed schema of the Hydra config (lingua-style nested dataclasses).

Hydra composes ``conf/train.yaml`` on top of this schema, so a misspelt key, a wrong type or a value outside a
choice (the ``Choice`` enums) fails at start-up. The defaults live here only: the yaml files hold what differs
from them (tests/test_config.py checks). ``problems()`` then checks cross-field consistency and names the fix for
each problem (each data kind's own checks: data/sources.py KINDS).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .data.mqar import MqarConfig, MqarZoologyConfig
from .data.sources import KINDS, data_kind, shards_manifest_problems
from .paths import cache_root
from .models.config import ModelConfig, choice, coerce_choices

class ConfigError(SystemExit):
    """A configuration the run refuses at start-up: the same on every rank, so under torchrun only rank 0 prints it
    (``jambatrain.train.cli``); the others exit 1 silently."""


Prepare = choice("Prepare", "none", "stdlib", module=__name__)
OnError = choice("OnError", "raise", "skip", module=__name__)
Precision = choice("Precision", "auto", "bf16", "fp32", module=__name__)
Backend = choice("Backend", "auto", "nccl", "gloo", module=__name__)
Device = choice("Device", "auto", "cpu", "cuda", module=__name__)
Kind = choice("Kind", *KINDS, module=__name__)  # data/sources.py KINDS: one entry per data kind
WandbMode = choice("WandbMode", "offline", "online", "disabled", module=__name__)


@dataclass
class DataConfig:
    # a KINDS entry of data/sources.py: shards | mqar (synthetic associative recall; no dir) | mqar_zoology (Zoology's
    # MQAR, jambatrain/data/mqar.py)
    kind: Kind = Kind.shards
    dir: str = MISSING  # directory holding manifest.json + webdataset shards (data=stdlib_py: in the cache)
    # stdlib: build the embedded default corpus into `dir` if it is missing (only under the cache, $JAMBATRAIN_CACHE
    # or ~/.cache/jambatrain, or where such a corpus already is: a mistyped path gets no new corpus)
    prepare: Prepare = Prepare.none
    vocab_size: int | None = None  # tokenizer vocabulary (`prepare` builds with it); None: the manifest's
    seq_len: int | None = None  # tokens per sample; None: the manifest's
    num_workers: int = 0
    shuffle: bool = True
    on_error: OnError = OnError["raise"]  # what a corrupt sample does: raise | skip
    doc_mask: bool = True  # mask attention / reset Mamba state at document boundaries (after each EOS)
    eos_id: int | None = None  # the token that ends a document; None: the manifest's

    mqar: MqarConfig = field(default_factory=MqarConfig)
    mqar_zoology: MqarZoologyConfig = field(default_factory=MqarZoologyConfig)

    def __post_init__(self):
        coerce_choices(self, "data.")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: decay over trainer.max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ParallelConfig:
    zero_stage: int = 2
    micro_batch_size: int = 8  # sequences per GPU per micro step
    grad_accum_steps: int = 1
    expert_parallel_size: int = 1
    # ranks sharing one sequence (each holds seq_len / cp tokens; parallel/parallel_dims.py, README "Long context")
    context_parallel_size: int = 1
    precision: Precision = Precision.auto  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    backend: Backend = Backend.auto  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    device: Device = Device.auto  # auto | cpu | cuda
    timeout_minutes: float = 30  # every process group's collective timeout (a stalled rank ends the job)

    def __post_init__(self):
        coerce_choices(self, "parallel.")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    log_every: int = 1
    save_every: int = 500  # 0: no checkpoints at all (benchmarks, smoke runs)
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0: no validation
    eval_batches: int = 8
    # stop (checkpointed) once this flat metric of the in-training eval exceeds stop_above (Zoology's early stop:
    # mqar_zoology_acc > 0.99); "" = never
    stop_metric: str = ""
    stop_above: float = 0.99
    # the per-step loss check of jambatrain/step_guard.py (one host sync per step); false for tiny models whose
    # steps the sync would dominate (a non-finite loss then stops the run at the next log step)
    step_guard: bool = True
    resume: bool = False  # True: a checkpoint must exist in the run dir (else error); False: resume if one exists
    auto_resume: bool = True
    seed: int = 1234
    progress_bar: bool = True
    peak_flops: float | None = None  # per-GPU peak for MFU; None: looked up from the GPU name
    # >0: torch-profile steps profile_at .. profile_at + profile_steps - 1: a Chrome trace per rank in
    # RUN/profile/, a time-by-op-class table on rank 0; those steps are left out of tokens/s and MFU
    profile_at: int = 0
    profile_steps: int = 2
    # bad steps (jambatrain/step_guard.py): a step whose loss on any rank is non-finite, or above
    # skip_spike_factor x the running mean of the good steps' losses (after skip_spike_warmup good steps; 0: no spike
    # check), is skipped on every rank; max_skipped_steps skips in a row stop the run (0: never)
    skip_spike_factor: float = 5.0
    skip_spike_warmup: int = 20
    max_skipped_steps: int = 10
    # checkpoints (jambatrain/checkpoint.py): a save whose weight norm exceeds this x the last checkpoint's is not
    # published (a divergent update with a finite loss; 0: no bound); resume_from: roll back to a tag
    # (step_00000030, 30 or its path), the newer ones moved aside (kept); the run-dir lock (run_lock.py) of a job on
    # another host is taken over once its heartbeat is this old
    save_max_weight_growth: float = 10.0
    resume_from: str = ""
    lock_stale_minutes: float = 10.0


@dataclass
class EvalConfig:
    """``python -m jambatrain.eval`` and the trainer's ``trainer.eval_every`` (jambatrain/eval.py)."""
    tasks: list[str] = field(default_factory=lambda: ["val", "mqar", "passkey"])
    val_batches: int = 0  # standalone eval: val batches per rank (0 = the whole split); the trainer uses trainer.eval_batches
    batch_size: int = 0  # sequences per forward; 0 = parallel.micro_batch_size
    seed: int = 0  # MQAR / passkey sequences
    mqar_context_lengths: list[int] = field(default_factory=list)  # empty: 4 powers of two up to data.seq_len
    mqar_num_pairs: list[int] = field(default_factory=lambda: [4, 16, 64])  # skipped where 4 * pairs > length
    mqar_samples: int = 32  # sequences per (length, pairs)
    passkey_lengths: list[int] = field(default_factory=list)  # empty: data.seq_len / 8, / 4, / 2, / 1
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_samples: int = 4  # sequences per (length, depth)
    passkey_tokens: int = 5
    out: str = ""  # JSON file; empty: RUN_DIR/eval/eval_step<N>.json


@dataclass
class LoggerConfig:
    wandb: bool = True
    wandb_mode: WandbMode = WandbMode.offline  # offline | online | disabled
    project: str = "jambatrain"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        coerce_choices(self, "logger.")


@dataclass
class TrainConfig:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ${jambatrain_cache:} in conf/data/stdlib_py.yaml: the cache root the data.dir check uses, also when a saved run
# config is resolved later (export_hf)
OmegaConf.register_new_resolver("jambatrain_cache", cache_root, replace=True)


def sweep_stamp() -> str:
    """The time a sweep started, for ``hydra.sweep.dir`` (conf/train.yaml): a new ``-m`` sweep gets a directory of
    its own instead of resuming the previous sweep's checkpoints. Under torchrun every local rank composes its own
    config, so they take the start time of their common parent (the torchrun agent), not their own clocks."""
    import time

    t = time.time()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            import psutil

            t = psutil.Process(os.getppid()).create_time()
        except Exception:  # noqa: BLE001 - no psutil / no parent: the local clock
            pass
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


OmegaConf.register_new_resolver("jambatrain_sweep_stamp", sweep_stamp, use_cache=True, replace=True)


def register_schema() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve interpolations and turn the composed DictConfig into the typed dataclass tree. A required value left
    unset (``???``, e.g. ``data.dir`` with ``data=shards``) is refused here, naming every such key."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError("jambatrain: unknown config keys (a typo? they would be ignored):\n  - "
                         + "\n  - ".join(unknown_key_message(k) for k in unknown))
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("jambatrain: these config values must be set: " + ", ".join(missing)
                         + (" (data.dir: the directory `python -m data_prep.write_shards --out DIR` wrote)"
                            if "data.dir" in missing else ""))
    obj = OmegaConf.to_object(cfg)
    if isinstance(obj, dict):  # composed without the schema (e.g. in a bare OmegaConf test)
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        obj = OmegaConf.to_object(merged)
    return obj


def schema_keys(schema=TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the typed schema (``trainer.max_steps``, ``data.mqar.num_pairs``, ...)."""
    keys = []
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        sub = _field_dataclass(schema, f.name)
        if sub is not None:
            keys += schema_keys(sub, f"{prefix}{f.name}.")
    return keys


def _field_dataclass(schema, name: str):
    hints = typing.get_type_hints(schema)
    t = hints.get(name)
    return t if dataclasses.is_dataclass(t) else None


def unknown_keys(cfg: DictConfig, schema=TrainConfig, prefix: str = "") -> list[str]:
    """Dotted keys of the composed config that the schema does not have, however they came in (``+key=value`` on
    the command line, an experiment yaml, an interpolated env value): Hydra's struct mode refuses a plain
    ``key=value`` but lets ``+key`` add one, which the run would then silently ignore."""
    if OmegaConf.get_type(cfg) not in (schema, dict, None) and dataclasses.is_dataclass(OmegaConf.get_type(cfg)):
        schema = OmegaConf.get_type(cfg)
    names = {f.name for f in dataclasses.fields(schema)}
    out = []
    for key in cfg.keys():
        if key == "hydra" and not prefix:
            continue
        if key not in names:
            out.append(f"{prefix}{key}")
            continue
        sub = _field_dataclass(schema, key)
        node = cfg._get_node(key)
        if sub is not None and isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            out += unknown_keys(node, sub, f"{prefix}{key}.")
    return out


def unknown_key_message(key: str, groups: tuple[str, ...] = ()) -> str:
    """``key`` is not a config key: the closest schema key (or config group) as the fix."""
    import difflib

    known = schema_keys() + list(groups)
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != key][:1]  # the right key in another place
    near = near or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not near:
        leaves = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in known], n=1, cutoff=0.75)
        near = [k for k in known if k.rsplit(".", 1)[-1] in leaves][:1]
    hint = f": did you mean {near[0]}?" if near else " (see jambatrain/config.py for the keys)"
    return f"{key} is not a config key{hint}"


def override_key_problems(args: list[str], conf_dir: str) -> list[str]:
    """Command-line overrides (``key=value``, ``+key=value``, ``++key=value``) whose key is neither a schema key
    nor a config group of ``conf_dir``: one message each with the nearest key. Checked before Hydra composes, so
    a plain ``trainer.max_step=5`` gets "did you mean trainer.max_steps?" rather than Hydra's advice to add it
    with ``+``."""
    groups = tuple(d for d in os.listdir(conf_dir) if os.path.isdir(os.path.join(conf_dir, d)))
    known = set(schema_keys()) | set(groups)
    parents = {k.rsplit(".", 1)[0] for k in known if "." in k}
    out = []
    for arg in args:
        if arg.startswith(("-", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if key == "experiment" and os.path.isfile(yaml := os.path.join(conf_dir, "experiment", f"{value}.yaml")):
            out += [f"{unknown_key_message(k, groups)} (in {yaml})" for k in _yaml_keys(OmegaConf.load(yaml))
                    if k.split(".")[0] not in ("defaults", "hydra") and _unknown(k, known, parents)]
        if key.startswith("hydra") or "/" in key or "@" in key or not _unknown(key, known, parents):
            continue
        out.append(unknown_key_message(key, groups))
    return out


def _unknown(key: str, known: set[str], parents: set[str]) -> bool:
    if key in known:
        return False
    prefixes = [".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 1)]
    return not any(p in known and p not in parents for p in prefixes)  # not inside a list/dict value (eval.tasks.0)


def _yaml_keys(node, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a yaml config (an experiment file: ``# @package _global_``)."""
    if not isinstance(node, DictConfig):
        return [prefix[:-1]] if prefix else []
    return [k for key in node.keys() for k in _yaml_keys(node._get_node(key), f"{prefix}{key}.")] or [prefix[:-1]]


def problems(cfg: TrainConfig, world_size: int = 1) -> list[str]:
    """Cross-field checks, each message naming the key and the fix. Run before any expensive work."""
    p = list(cfg.model.problems())
    par, tr, opt = cfg.parallel, cfg.trainer, cfg.optim
    if par.zero_stage not in (0, 1, 2, 3):
        p.append(f"parallel.zero_stage={par.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if par.micro_batch_size < 1 or par.grad_accum_steps < 1:
        p.append("parallel.micro_batch_size and parallel.grad_accum_steps must be >= 1")
    E, ep = cfg.model.num_experts, par.expert_parallel_size
    fits = [d for d in range(1, world_size + 1) if world_size % d == 0 and (E <= 1 or E % d == 0)]
    if ep < 1 or world_size % ep or (E > 1 and E % ep):
        p.append(f"parallel.expert_parallel_size={ep} must divide both the world size ({world_size} ranks) and "
                 f"model.num_experts ({E}): choose one of {fits}")
    if par.expert_parallel_size > 1 and par.zero_stage == 3:
        p.append(f"parallel.expert_parallel_size={par.expert_parallel_size} with parallel.zero_stage=3: DeepSpeed does "
                 "not run expert-parallel (native MoE) layers under ZeRO-3; use parallel.zero_stage=1 or 2 with "
                 "expert parallelism, or expert_parallel_size=1 with ZeRO-3")
    if par.expert_parallel_size > 1 and cfg.model.num_experts <= 1:
        p.append(f"parallel.expert_parallel_size={par.expert_parallel_size} but the model has no MoE layers "
                 "(model.num_experts=1): set parallel.expert_parallel_size=1")
    p += _context_parallel_problems(cfg, world_size)
    if par.zero_stage == 3 and cfg.model.init_from:
        p.append("model.init_from with parallel.zero_stage=3 is not supported: initialise with ZeRO-2 and convert, "
                 "or start from scratch")
    if tr.max_steps < 1:
        p.append(f"trainer.max_steps={tr.max_steps} must be >= 1")
    if tr.save_every < 0 or tr.log_every < 1:
        p.append("trainer.save_every must be >= 0 (0 = never) and trainer.log_every >= 1")
    if opt.lr <= 0 or not 0 <= opt.min_lr_ratio <= 1:
        p.append(f"optim.lr={opt.lr} must be > 0 and optim.min_lr_ratio={opt.min_lr_ratio} in [0, 1]")
    if opt.warmup_steps < 0:
        p.append(f"optim.warmup_steps={opt.warmup_steps} must be >= 0")
    return p + _data_config_problems(cfg)


def _context_parallel_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    from .parallel.parallel_dims import ParallelDims

    m, cp = cfg.model, cfg.parallel.context_parallel_size
    has_attention = any(m.is_attention_layer(i) for i in range(m.num_hidden_layers))
    p = ParallelDims.problems(world_size, cp, cfg.parallel.expert_parallel_size, cfg.data.seq_len,
                              m.num_attention_heads, m.num_key_value_heads, has_attention)
    if p:  # one message per layout mistake; the finer rules below follow from a valid cp
        return p
    if cp > 1 and cfg.data.seq_len and cfg.data.seq_len // cp < m.mamba_d_conv - 1:
        p.append(f"parallel.context_parallel_size={cp} leaves {cfg.data.seq_len // cp} tokens per rank, fewer than the "
                 f"Mamba conv halo (model.mamba_d_conv - 1 = {m.mamba_d_conv - 1}): use a smaller cp")
    if cp > 1 and m.mamba_d_inner % cp:
        p.append(f"parallel.context_parallel_size={cp} must divide the Mamba channels (d_inner = {m.mamba_d_inner})")
    if cp > 1 and cfg.trainer.eval_every:
        p.append(f"trainer.eval_every={cfg.trainer.eval_every} with parallel.context_parallel_size={cp}: in-training "
                 "evaluation does not split sequences yet; set trainer.eval_every=0 and evaluate the checkpoints "
                 "with python -m jambatrain.eval")
    return p


def _data_config_problems(cfg: TrainConfig) -> list[str]:
    p, data = [], cfg.data
    for t in cfg.eval.tasks:
        if t not in ("val", "mqar", "passkey", "mqar_zoology"):
            p.append(f"eval.tasks has {t!r}: choose from val, mqar, passkey, mqar_zoology")
    kind = data_kind(cfg)
    if cfg.model.short_conv_layer_period and data.doc_mask and kind.documents:
        p.append("model.short_conv_layer_period: the short-conv mixer has no document mask; set data.doc_mask=false")
    p += kind.config_problems(cfg)  # each data.kind's own checks (data/sources.py KINDS)
    if "mqar_zoology" in cfg.eval.tasks:  # the eval task draws its test set from data.mqar_zoology
        p += [q for q in data.mqar_zoology.problems(cfg.model.vocab_size) if q not in p]
    return p


# the shards' manifest against the config (data.kind=shards; data/sources.py)
data_problems = shards_manifest_problems
