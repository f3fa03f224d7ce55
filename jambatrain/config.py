"""Typed schema of the Hydra config (lingua-style nested dataclasses).

Hydra composes ``conf/train.yaml`` on top of this schema, so a misspelt key, a wrong type or a value outside a
choice (the ``Choice`` enums) fails at start-up. The defaults live here only: the yaml files hold what differs
from them (tests/test_config.py checks). ``problems()`` then checks cross-field consistency and names the fix for
each problem; ``data_problems()`` does the same against the shards' manifest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .data.mqar import MqarConfig
from .models.config import ModelConfig, choice, coerce_choices
from .paths import cache_root

Prepare = choice("Prepare", "none", "stdlib", module=__name__)
OnError = choice("OnError", "raise", "skip", module=__name__)
Precision = choice("Precision", "auto", "bf16", "fp32", module=__name__)
Backend = choice("Backend", "auto", "nccl", "gloo", module=__name__)
Device = choice("Device", "auto", "cpu", "cuda", module=__name__)
Kind = choice("Kind", "shards", "mqar", module=__name__)
WandbMode = choice("WandbMode", "offline", "online", "disabled", module=__name__)


@dataclass
class DataConfig:
    kind: Kind = Kind.shards  # shards | mqar (synthetic associative recall, jambatrain/data/mqar.py; no dir)
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


def register_schema() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve interpolations and turn the composed DictConfig into the typed dataclass tree. A required value left
    unset (``???``, e.g. ``data.dir`` with ``data=shards``) is refused here, naming every such key."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SystemExit("jambatrain: these config values must be set: " + ", ".join(missing)
                         + (" (data.dir: the directory `python -m data_prep.write_shards --out DIR` wrote)"
                            if "data.dir" in missing else ""))
    obj = OmegaConf.to_object(cfg)
    if isinstance(obj, dict):  # composed without the schema (e.g. in a bare OmegaConf test)
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        obj = OmegaConf.to_object(merged)
    return obj


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


def _data_config_problems(cfg: TrainConfig) -> list[str]:
    p, data = [], cfg.data
    for t in cfg.eval.tasks:
        if t not in ("val", "mqar", "passkey"):
            p.append(f"eval.tasks has {t!r}: choose from val, mqar, passkey")
    if data.kind == "mqar":  # synthetic: no files
        return p + data.mqar.problems(cfg.model.vocab_size)
    data_dir = os.path.expanduser(data.dir)
    if data.prepare == "stdlib":
        if data.vocab_size is None or data.seq_len is None:
            p.append("data.prepare=stdlib builds a corpus and needs data.vocab_size and data.seq_len "
                     "(conf/data/stdlib_py.yaml sets them)")
        elif data.vocab_size > cfg.model.vocab_size:
            p.append(f"data.vocab_size={data.vocab_size} exceeds model.vocab_size={cfg.model.vocab_size}: token ids "
                     "would fall outside the embedding; lower data.vocab_size or raise model.vocab_size")
        root = cache_root()
        inside = os.path.commonpath([os.path.abspath(data_dir), os.path.abspath(root)]) == os.path.abspath(root)
        if not inside and not os.path.isfile(os.path.join(data_dir, "manifest.json")):
            p.append(f"data.dir={data.dir} holds no corpus, and data.prepare=stdlib builds the embedded corpus only "
                     f"under the cache {root} (so that a mistyped path does not get a new corpus silently): check "
                     "the path, or set JAMBATRAIN_CACHE to the directory to build it under, or train on your own "
                     "shards with data=shards data.dir=...")
    elif not os.path.isdir(data_dir):
        p.append(f"data.dir={data.dir} does not exist: write shards there with `python -m data_prep.write_shards` "
                 "or use data=stdlib_py to build the embedded default corpus")
    return p


def data_problems(cfg: TrainConfig, manifest: dict, data_dir: str) -> list[str]:
    """Fill ``data.seq_len``, ``data.vocab_size`` and ``data.eos_id`` left unset (None) from the shards' manifest,
    and return every way the shards disagree with the config (all at once, each with its fix)."""
    data, p = cfg.data, []
    for key, theirs in (("seq_len", manifest["seq_len"]), ("vocab_size", manifest["vocab_size"]),
                        ("eos_id", manifest.get("eos_id"))):
        ours = getattr(data, key)
        if ours is None:
            setattr(data, key, theirs)
        elif ours != theirs and (key != "eos_id" or data.doc_mask):
            p.append(f"data.{key}={ours} but the shards in {data_dir} have {key} {theirs}: set data.{key}={theirs} "
                     "(or leave it unset to take the manifest's), or rewrite the shards")
    if manifest["vocab_size"] > cfg.model.vocab_size:
        p.append(f"the tokenizer of {data_dir} has {manifest['vocab_size']} tokens but model.vocab_size="
                 f"{cfg.model.vocab_size}: raise model.vocab_size or retokenize with a smaller vocabulary")
    if data.doc_mask and (data.eos_id is None or data.eos_id < 0):
        p.append(f"data.doc_mask=true but the shards in {data_dir} record no EOS token: set data.doc_mask=false or "
                 "rewrite the shards with a tokenizer that has one")
    return p
