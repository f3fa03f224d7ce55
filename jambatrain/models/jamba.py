"""The Jamba language model: embed -> N generic pre-norm blocks -> RMSNorm -> LM head.

Each block is (mixer, FFN); which mixer (attention / Mamba) and which FFN (dense / MoE) a layer gets is
data, read from the config's periods and offsets (``ModelConfig.layer_pattern``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import compiled_blocks as cb
from .attention import Attention, document_block_mask, document_dense_mask, flex_available
from .config import ModelConfig
from .fused_ops import cross_entropy_sum
from .layers import RMSNorm, SwiGLU, linear
from .mamba import MambaMixer, init_dt_proj
from .moe import MoE
from .short_conv import ShortConvMixer


class JambaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_attention = cfg.is_attention_layer(layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.fused_rms_norm)
        self.mixer = Attention(cfg) if self.is_attention else \
            ShortConvMixer(cfg) if cfg.is_short_conv_layer(layer_idx) else MambaMixer(cfg)
        has_ffn = self.is_moe or cfg.intermediate_size > 0  # 0: no FFN sub-layer (Zoology's Identity state mixer)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.fused_rms_norm) if has_ffn else None
        self.ffn = (MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size,
                                                          cfg.compile_elementwise)) if has_ffn else None
        self.compiled_regions = False  # model.compile_blocks: set by compiled_blocks.apply

    def region_modules(self) -> list[nn.Module]:
        """The modules whose ops run inside compiled regions when ``compiled_regions`` (``compiled_blocks``)."""
        mods = [self.input_layernorm, self.mixer] if isinstance(self.mixer, (Attention, MambaMixer)) else []
        return mods + ([self.pre_ff_layernorm, self.ffn] if isinstance(self.ffn, SwiGLU) else [])

    def _mix(self, x, attn_mask, reset):
        h = self.input_layernorm(x)
        return self.mixer(h, attn_mask) if self.is_attention else self.mixer(h, reset)

    def _mix_res(self, x, attn_mask, reset):
        """x + mixer(norm(x)); with ``compiled_regions`` the projections' sides compiled (``compiled_blocks``)."""
        m = self.mixer
        if not self.compiled_regions or not isinstance(m, (Attention, MambaMixer)):
            return x + self._mix(x, attn_mask, reset)
        if self.is_attention:
            q, k, v = cb.region(cb.attention_in)(self.input_layernorm, m, x)
            return cb.region(cb.attention_out)(m, x, m.attend(q, k, v, attn_mask))
        plan = m.start(x, reset)
        kl = plan.layout == "kernel"
        u, z = cb.region(cb.mamba_in)(self.input_layernorm, m, x, kl)
        return cb.region(cb.mamba_out)(m, x, m.mix(u, z, reset, plan), kl)

    def _ff(self, x):
        h = self.pre_ff_layernorm(x)
        if self.is_moe:
            f, routing = self.ffn(h)
            return f, routing.aux_loss, routing.z_loss
        zero = x.new_zeros((), dtype=torch.float32)
        return self.ffn(h), zero, zero

    def _ff_res(self, x):
        """x + ffn(norm(x)) and the MoE losses; with ``compiled_regions`` a dense FFN is one compiled region."""
        if self.compiled_regions and not self.is_moe:
            zero = x.new_zeros((), dtype=torch.float32)
            return cb.region(cb.dense_ffn)(self.pre_ff_layernorm, self.ffn, x), zero, zero
        f, aux, z = self._ff(x)
        return x + f, aux, z

    def forward(self, x, attn_mask=None, reset=None, recompute: str = "none"):
        """recompute: "mixer" / "ffn" recomputes that sub-layer in backward instead of storing its activations."""
        x = checkpoint(self._mix_res, x, attn_mask, reset, use_reentrant=False) if recompute == "mixer" \
            else self._mix_res(x, attn_mask, reset)
        if self.ffn is None:
            zero = x.new_zeros((), dtype=torch.float32)
            return x, zero, zero
        return checkpoint(self._ff_res, x, use_reentrant=False) if recompute == "ffn" else self._ff_res(x)


def _numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (then ``ds_numel`` holds the count)."""
    return getattr(p, "ds_numel", p.numel())


def _per_expert(m: MoE) -> int:
    """Parameters of one expert (gate, up, down), from the shape ZeRO-3 keeps when it partitions the tensor away."""
    _, f, h = getattr(m.w_gate, "ds_shape", m.w_gate.shape)
    return 3 * f * h


def _ce_sum(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor, compiled: bool) -> torch.Tensor:
    return cross_entropy_sum(lm_head(h), labels, compiled)


def chunked_cross_entropy_sum(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor, chunk: int,
                              compiled: bool = False) -> torch.Tensor:
    """Summed cross-entropy of lm_head(h) computed ``chunk`` tokens at a time; each chunk's logits are recomputed
    in backward, so the (tokens x vocab) fp32 logits, their softmax and gradient never exist whole (at 65k vocab
    and 16k tokens per micro batch those are ~4 GiB each). Costs one more LM-head matmul forward."""
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_sum, lm_head, h[i:i + chunk], labels[i:i + chunk], compiled,
                                   use_reentrant=False)
    return total


def chunked_cross_entropy(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor, chunk: int,
                          compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of ``chunked_cross_entropy_sum``."""
    return chunked_cross_entropy_sum(lm_head, h, labels, chunk, compiled) / (labels != -100).sum().clamp(min=1)


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None  # ce + aux_coef * aux + z_coef * z: what the optimizer minimises
    ce_loss: torch.Tensor | None
    aux_loss: torch.Tensor  # mean over MoE layers
    z_loss: torch.Tensor


class JambaLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(JambaBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.fused_rms_norm)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.num_moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        # meta tensors are initialised after materialising; ZeRO-3 partitioned ones by the trainer, gathered
        if not any(p.is_meta or hasattr(p, "ds_id") for p in self.parameters()):
            self.init_weights()
        # context parallelism (parallel/context_parallel.py ``apply``): this model then takes one rank's slice of each
        # sequence, and its loss is the whole sequences' (None: cp = 1, the single-GPU code path)
        self.cp_group = None

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, the LM head's weight is the embedding's (one parameter). ``to_empty`` and
        ``load_state_dict(assign=True)`` give each module a new parameter object, which unties them: both re-tie."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def to_empty(self, *, device, recurse: bool = True):
        out = super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.tie_weights()
        return out

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, initializer_range) for projections and embeddings; output projections scaled by
        1/sqrt(2 * layers) (GPT-2); Mamba's own init for A, D and dt."""
        for name, m in self.named_modules():
            self.init_module(name, m)

    @torch.no_grad()
    def init_module(self, name: str, m: nn.Module) -> None:
        """Initialise the parameters owned directly by ``m`` (so ZeRO-3 can gather one module at a time)."""
        std = self.cfg.initializer_range
        out_std = std / (2 * self.cfg.num_hidden_layers) ** 0.5
        if isinstance(m, nn.Linear) and name.endswith("dt_proj"):
            init_dt_proj(m)
        elif isinstance(m, nn.Linear):
            is_out = name.endswith(("o_proj", "out_proj", "down_proj"))
            nn.init.normal_(m.weight, 0.0, out_std if is_out else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.Conv1d):
            m.reset_parameters()
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, MoE):
            m.init_experts(std, out_std)
        elif isinstance(m, MambaMixer):
            m.reset_ssm_parameters()

    def hidden_states(self, input_ids: torch.Tensor, doc_starts: torch.Tensor | None = None):
        """The final-normed hidden states (batch, seq, hidden) and the mean MoE aux / z losses: the forward without
        the LM head (evaluation applies the head only where it scores a token)."""
        x = self.embed_tokens(input_ids)
        attn_mask = reset = None
        if doc_starts is not None:
            reset = doc_starts.bool()
            if self.cp_group is not None:  # the mixers mask and reset over the whole sequence
                from ..parallel.context_parallel import gather_seq

                reset = gather_seq(reset.to(torch.uint8), self.cp_group).bool()
            if any(layer.is_attention for layer in self.layers):  # CUDA: block-sparse, no (seq x seq) mask
                attn_mask = document_block_mask(reset) if x.is_cuda and flex_available() \
                    else document_dense_mask(reset)
        aux = x.new_zeros((), dtype=torch.float32)
        z = x.new_zeros((), dtype=torch.float32)
        policy = self.cfg.activation_checkpointing if self.training and torch.is_grad_enabled() else "none"
        for layer in self.layers:
            if policy == "full":
                x, a, zl = checkpoint(layer, x, attn_mask, reset, use_reentrant=False)
            else:
                x, a, zl = layer(x, attn_mask, reset, recompute=policy)
            aux, z = aux + a, z + zl
        if self.num_moe_layers:
            aux, z = aux / self.num_moe_layers, z / self.num_moe_layers
        return self.final_layernorm(x), aux, z

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_starts: torch.Tensor | None = None, return_logits: bool = True,
                num_labeled: int | None = None) -> LMOutput:
        """input_ids, labels: (batch, seq) int64; labels == -100 are ignored.
        doc_starts: optional bool (batch, seq), True where a packed document begins: attention is masked to
        the document (FlexAttention on CUDA) and the Mamba conv/scan state is reset there.
        Under context parallelism every argument is this rank's slice of the sequences, the logits are the slice's,
        and the losses are the whole sequences' (the mean over all their labelled tokens, on every rank of the cp
        group): ``parallel/context_parallel.py`` says why the gradients are then right.
        num_labeled: the number of labels != -100 in ``labels``, when the caller knows it on the host (the trainer
        counts them on the CPU batch): with ``model.loss_labeled_only`` the scored positions are then gathered
        without a host sync (``torch.nonzero_static``); without it, ``nonzero`` syncs once to learn the count."""
        h, aux, z = self.hidden_states(input_ids, doc_starts)
        chunk = self.cfg.loss_chunk_tokens
        logits = ce = loss = None
        if labels is not None and self.cfg.loss_labeled_only and not return_logits:
            flat = labels.view(-1)
            mask = flat != -100
            keep = (mask.nonzero() if num_labeled is None  # a host sync: the number of scored positions
                    else torch.nonzero_static(mask, size=num_labeled)).squeeze(1)
            ce = cross_entropy_sum(self.lm_head(h.view(-1, h.shape[-1])[keep]), flat[keep], self.cfg.compile_elementwise)
        elif labels is not None and chunk and not return_logits:
            ce = chunked_cross_entropy_sum(self.lm_head, h.view(-1, h.shape[-1]), labels.view(-1), chunk,
                                           self.cfg.compile_elementwise)
        else:
            logits = self.lm_head(h)
            if labels is not None:
                ce = cross_entropy_sum(logits.view(-1, logits.shape[-1]), labels.view(-1), self.cfg.compile_elementwise)
        if ce is not None:
            count = (labels != -100).sum()
            if self.cp_group is not None:
                from ..parallel.context_parallel import cp_sum

                ce, count = cp_sum(ce, self.cp_group), cp_sum(count, self.cp_group)
            ce = ce / count.clamp(min=1)
        if ce is not None:
            loss = ce + self.cfg.router_aux_loss_coef * aux + self.cfg.router_z_loss_coef * z
        return LMOutput(logits if return_logits else None, loss, ce, aux, z)

    def num_params(self) -> int:
        """All parameters of the model, also the experts other expert-parallel ranks hold."""
        total = sum(_numel(p) for p in self.parameters())  # parameters() dedups a tied head
        for m in self.modules():
            if isinstance(m, MoE):
                lo, hi = m.expert_range
                total += (m.num_experts - (hi - lo)) * _per_expert(m)
        return total

    def num_active_params(self) -> int:
        """Parameters one token touches: only top-k of the E experts in each MoE layer count."""
        total = self.num_params()
        for m in self.modules():
            if isinstance(m, MoE):
                total -= (m.num_experts - m.top_k) * _per_expert(m)
        return total

    def expert_counts(self) -> list[torch.Tensor]:
        return [m.last_counts for m in self.modules() if isinstance(m, MoE) and m.last_counts is not None]

    def expert_received(self) -> list[int]:
        """Rows each MoE layer's local experts received in the last forward (expert parallelism; else empty)."""
        return [m.ep_stats.received for m in self.modules() if isinstance(m, MoE) and hasattr(m, "ep_stats")]
