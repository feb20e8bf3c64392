"""What the pretraining and fine-tuning loops share about a step: schedules, counting, the non-finite policy.

* **Schedules** (multipliers of the peak LR for 0-based update ``step``): :func:`cosine_factor`
  (pretraining: linear warm-up, cosine to a floor, the GaLore paper's) and :func:`linear_factor`
  (fine-tuning: linear warm-up, linear decay to 0, the GLUE recipe's).
* **Counting**: :func:`count_parameters` (shared parameters once).
* **Non-finite gradients** (:func:`optimizer_step`, :class:`Skips`). Our optimizers skip a parameter
  whose gradient is not finite and count it (``optimizer.nonfinite_skips``); for torch's AdamW the
  whole update is skipped when the global gradient norm is not finite, so a NaN never reaches the
  weights. A step in which no parameter was updated is a *skipped step*; :class:`Skips` counts both,
  and ``limit`` consecutive skipped steps stop the run with :class:`TrainingDiverged` (exit code 2
  on the command line): a run that no longer learns is not a success.

Example::

    >>> from galore_mini.train.steps import Skips, cosine_factor, linear_factor
    >>> round(cosine_factor(0, total=100, warmup=10, min_ratio=0.1), 3), cosine_factor(99, 100, 10, 0.1) > 0.1
    (0.1, True)
    >>> linear_factor(0, total=100, warmup=6), linear_factor(100, total=100, warmup=6)
    (0.16666666666666666, 0.0)
    >>> skips = Skips()
    >>> skips.record(skipped=3, updatable=3), skips.skipped_steps, skips.consecutive_skips
    (True, 1, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from galore_mini.errors import UsageError

#: consecutive skipped steps that stop a run (``--max-skipped-steps`` in pretraining)
MAX_SKIPPED_STEPS = 20


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite, or the updates stopped; the message says which knob to turn."""


def cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier for update `step` (0-based): linear warm-up to 1, then cosine to `min_ratio` at the end."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def linear_factor(step: int, total: int, warmup: int) -> float:
    """LR multiplier for update `step` (0-based): linear warm-up to 1, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), shared ones once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def optimizer_step(optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                   norm: torch.Tensor | None, updatable: int) -> int:
    """Step `optimizer`; how many parameter updates were skipped for non-finite gradients.

    Our optimizers skip and count per parameter (``nonfinite_skips``). torch's do not look: there the
    whole update is skipped when the global gradient norm (`norm`, from clipping, or computed here) is
    not finite, so a NaN never reaches the weights of any method.
    """
    before = getattr(optimizer, "nonfinite_skips", None)
    if before is None:
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of DTensor gradients is a DTensor
            norm = norm.full_tensor()
        if not math.isfinite(float(norm)):
            return updatable
        optimizer.step()
        return 0
    optimizer.step()
    return optimizer.nonfinite_skips - before


@dataclass
class Skips:
    """Skipped updates and steps so far (saved with the run's progress)."""

    skipped_steps: int = 0  # steps in which no parameter was updated (non-finite gradients)
    skipped_updates: int = 0  # parameter updates skipped, over all steps
    consecutive_skips: int = 0  # skipped steps in a row, up to the last step

    def record(self, skipped: int, updatable: int) -> bool:
        """Count one step that skipped `skipped` of `updatable` parameter updates; whether it was a skipped step."""
        self.skipped_updates += skipped
        stalled = updatable > 0 and skipped >= updatable
        self.skipped_steps += stalled
        self.consecutive_skips = self.consecutive_skips + 1 if stalled else 0
        return stalled

    def stalled(self, limit: int) -> bool:
        """Whether `limit` (0: never) consecutive steps were skipped."""
        return bool(limit) and self.consecutive_skips >= limit

    def diverged(self, done: int, advice: str, limit_flag: str) -> TrainingDiverged:
        """The error that stops a run whose last steps were all skipped (`done`: the last step)."""
        return TrainingDiverged(
            f"diverged: every update of the last {self.consecutive_skips} steps (to step {done}) was skipped "
            f"for non-finite gradients, so the model stopped learning; {advice}{limit_flag}")
