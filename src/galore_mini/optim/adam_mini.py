"""Adam-mini: Adam with one second-moment scalar per block of parameters.

Per parameter W with gradient G and block layout B (param group key
``block``, see :mod:`galore_mini.optim.blocks`), step t:
``m ← β1 m + (1-β1) G``; for each block b, ``v_b ← β2 v_b + (1-β2)·mean_{i∈b} G_i²``;
``W ← W(1-ηλ) - η/(1-β1ᵗ) · m / (√v_b/√(1-β2ᵗ) + ε)``.

The block layout is data, not a guess made inside ``step()``: build groups
with :func:`galore_mini.param_groups` (``method="adam_mini"``), which reads
heads, kv-heads and head_dim from the model, or set ``block`` per group
yourself. A group without ``block`` uses one block per row for matrices and
one per tensor otherwise. With the layouts of ``param_groups`` this
reproduces the adam-mini 1.1.1 package on Llama models.

Memory: ``m`` is full-size; ``v`` is one fp32 scalar per block (per head,
neuron or token), so Adam's second moment nearly vanishes.

Example::

    >>> import torch, galore_mini as gm
    >>> w = torch.nn.Parameter(torch.randn(8, 4))
    >>> opt = gm.AdamMini([{"params": [w], "block": "heads:2"}], lr=1e-3)
    >>> w.sum().backward(); opt.step()
    >>> tuple(opt.state[w]["exp_avg_sq"].shape)
    (4,)
"""

from __future__ import annotations

from galore_mini.optim import multi_tensor
from galore_mini.optim.capturable import CapturableMixin
from galore_mini.optim.core import PROJECTION_DEFAULTS, ComposedOptimizer, ParamStep


class AdamMini(CapturableMixin, ComposedOptimizer):
    """Adam-mini (see module docstring). Args: ``lr``, ``betas``, ``eps``, ``weight_decay``
    (decoupled, before the update), ``nonfinite``, ``state_dtype``, ``foreach`` (``False`` forces the
    single-tensor reference path instead of :mod:`galore_mini.optim.multi_tensor`), ``capturable`` (the
    sync-free step of :mod:`galore_mini.optim.capturable`); group key ``block``."""

    uses_blocks = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, nonfinite: str = "skip", state_dtype=None,
                 foreach: bool | None = None, capturable: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        nonfinite=nonfinite, state_dtype=state_dtype, foreach=foreach, capturable=capturable)
        super().__init__(params, defaults)

    def _allowed_keys(self):
        # Adam-mini has no projector: a `rank` here is a mistake worth naming
        return super()._allowed_keys() - {"rank"} - set(PROJECTION_DEFAULTS)

    def _multi_tensor_layout(self, p, group):
        return multi_tensor.block_layout_if_eligible(self, p, group)

    def _multi_tensor_step(self, items, steps):
        multi_tensor.block_adam_step(self, items, steps)

    def _state_layout(self, shape, work_shape, group):
        layout = self._moment("exp_avg", shape, group)
        blocks = self._block_layout(shape, group)
        layout.update(self._moment("exp_avg_sq", (blocks.n_blocks,) if blocks.kind != "elementwise" else shape, group))
        return layout

    def _update(self, ps: ParamStep):
        beta1, beta2 = ps.group["betas"]
        m = ps.ema("exp_avg", ps.grad, beta1)
        v = ps.block_ema_sq("exp_avg_sq", ps.grad, beta2, ps.layout)
        bc1, bc2 = ps.bias_corrections(beta1, beta2)
        inverse_denom = ps.layout.expand((v.sqrt() / bc2 ** 0.5).add_(ps.group["eps"]).reciprocal_())
        return m, ps.group["lr"] / bc1, inverse_denom

