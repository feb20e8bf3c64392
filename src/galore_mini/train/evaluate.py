"""Validation loss and perplexity over the fixed held-out rows.

Perplexity is ``exp(mean loss)``, the mean taken over every predicted token of the
validation set (each row of ``seq_len`` tokens predicts its last ``seq_len - 1``),
as the GaLore paper reports it. Under DDP each process scores every
``world``-th row and the sums are all-reduced, so the figure is the same as a
single process would get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EvalResult:
    """Mean validation loss (nats per token), its perplexity and how many tokens were scored."""

    loss: float
    ppl: float
    tokens: int


def perplexity(loss: float) -> float:
    """``exp(loss)``, or ``inf`` where that overflows (a diverged run)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: torch.Tensor, batch_size: int, device: torch.device | str = "cpu",
             autocast_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
             collective: bool = False) -> EvalResult:
    """Token-mean next-token cross-entropy of `model` on `rows` ([n, seq_len] token ids).

    The model is put in eval mode for the pass (no dropout) and restored afterwards; the
    loss is summed in fp32 whatever the autocast dtype. `collective`: the forward is itself a
    collective (FSDP2 all-gathers each layer's weights), so every process runs as many forward
    passes as the one with the most rows, the extra ones on a stand-in batch whose loss is dropped.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, token count
    mine = rows[rank::world_size]
    passes = -(-len(mine) // batch_size)
    if collective:
        passes = -(-(-(-len(rows) // world_size)) // batch_size)  # the first process holds the most rows
    try:
        for start in range(0, passes * batch_size, batch_size):
            batch = mine[start:start + batch_size].to(device)
            stand_in = len(batch) == 0
            if stand_in:
                batch = rows[:1].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                logits = model(input_ids=batch).logits
            if stand_in:
                continue
            targets = batch[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   reduction="sum")
            total[0] += loss.double()
            total[1] += targets.numel()
    finally:
        model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    mean = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    return EvalResult(mean, perplexity(mean), int(total[1]))
