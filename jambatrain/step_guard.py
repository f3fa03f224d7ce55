"""Bad steps are skipped, not applied: a non-finite loss (or gradient) on any rank, or a loss spike, leaves the
weights, the optimizer state and the LR schedule as they were, on every rank.

Each optimizer step the trainer hands ``StepGuard.check`` the summed loss of the step's micro batches (a device
tensor; one host sync per optimizer step, none per micro step); the ranks agree over the gloo control group, and
a step found bad is skipped inside the DeepSpeed optimizer through the same path DeepSpeed takes for an fp16
overflow (gradients dropped, no update, no scheduler step, ``engine.skipped_steps`` counted). DeepSpeed's ZeRO-1/2
optimizer also skips by itself when a gradient is non-finite; those skips are counted the same way. After
``trainer.max_skipped_steps`` skips in a row the run stops, its last checkpoint (from before the streak) intact.

The skip reaches DeepSpeed's optimizer through ``parallel.ds_compat.install_skip_hook(engine.optimizer,
guard.skip_requested)``, which the trainer's ``setup`` calls once after building the guard (the one place that
patches DeepSpeed's optimizer; it documents the path per ZeRO stage). A forced skip the engine did not count
means the hook is missing: ``after_step`` raises rather than let a bad step through.
"""
from __future__ import annotations

import math

import torch

from .parallel.distributed import any_rank


class StepGuard:
    def __init__(self, engine, spike_factor: float, spike_warmup: int, max_skipped: int):
        self.engine = engine
        self.spike_factor, self.spike_warmup, self.max_skipped = spike_factor, spike_warmup, max_skipped
        self.mean: float | None = None  # running mean of the good steps' losses
        self.good_steps = 0
        self.in_a_row = 0
        self.last_loss: float | None = None  # this rank's mean loss of the last checked step
        self._skip_next = False

    # ------------------------------------------------------------ deciding
    def check(self, step_loss: torch.Tensor, micro_steps: int) -> str | None:
        """Before the step's ``engine.step()``: why this step must be skipped on all ranks (None: apply it).
        ``step_loss``: the sum of this step's micro-batch losses on this rank."""
        loss = self.last_loss = float(step_loss) / micro_steps
        reason = None
        if not math.isfinite(loss):
            reason = f"loss {loss}"
        elif (self.spike_factor and self.mean is not None and self.good_steps >= self.spike_warmup
              and loss > self.spike_factor * self.mean):
            reason = f"loss spike {loss:.4g} > {self.spike_factor:g} x running mean {self.mean:.4g}"
        bad = any_rank(reason is not None)
        self._skip_next = bad
        if bad:
            return reason or "a bad loss on another rank"
        return None

    def skip_requested(self) -> bool:
        """Whether the coming ``engine.step()`` must be skipped (read by the hook ``ds_compat.install_skip_hook``)."""
        return self._skip_next

    def after_step(self, skipped_before: int) -> bool:
        """After the step's ``engine.step()``: whether the step was skipped (forced or by DeepSpeed); updates the
        streak and the running mean. Raises SystemExit past ``max_skipped`` skips in a row."""
        forced, self._skip_next = self._skip_next, False
        skipped = self.engine.skipped_steps > skipped_before
        if forced and not skipped:
            raise RuntimeError("jambatrain: a step the guard skipped was applied: the skip hook is not installed on "
                               "this engine's optimizer (call parallel.ds_compat.install_skip_hook after building "
                               "the StepGuard)")
        if skipped:
            self.in_a_row += 1
            if self.max_skipped and self.in_a_row >= self.max_skipped:
                raise SystemExit(f"jambatrain: {self.in_a_row} optimizer steps in a row were skipped (non-finite or "
                                 "spiking loss or gradients); stopping with the last checkpoint intact. Lower "
                                 "optim.lr, raise optim.warmup_steps, or check the data (data_prep.verify)")
        else:
            self.in_a_row = 0
            loss = self.last_loss
            if loss is not None and math.isfinite(loss):
                self.good_steps += 1
                self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss
        return skipped

    def state_dict(self) -> dict:
        return {"mean": self.mean, "good_steps": self.good_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.mean, self.good_steps = sd.get("mean"), sd.get("good_steps", 0)
