"""Communication of the sharded optimizers, per step and per refresh, for LLaMA-7B (or any shape set).

    PYTHONPATH=src python3 bench/fsdp_comm.py --world 8 --rank 1024

Counts come from ``galore_mini.optim.distributed.communication_bytes`` (ring collectives, fp32), per
rank, summed over the projected weights of all layers with the ``std`` side rule (and with
``proj_type="right"``, the shard-local choice); FSDP2's own traffic (bf16 all-gather in forward and
backward, fp32 reduce-scatter) is printed beside them for scale.
"""

from __future__ import annotations

import argparse

from galore_mini.optim.distributed import communication_bytes
from galore_mini.optim.projection import resolve_side


def llama_weights(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000):
    per_layer = [("q_proj", (hidden, hidden), heads), ("k_proj", (hidden, hidden), heads),
                 ("v_proj", (hidden, hidden), 0), ("o_proj", (hidden, hidden), 0),
                 ("gate_proj", (intermediate, hidden), 0), ("up_proj", (intermediate, hidden), 0),
                 ("down_proj", (hidden, intermediate), 0)]
    params = layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + 2 * vocab * hidden + hidden
    return per_layer, layers, params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--rank", type=int, default=1024)
    args = parser.parse_args(argv)
    per_layer, layers, params = llama_weights()
    world, r = args.world, args.rank
    gb = 1e9
    print(f"LLaMA-7B ({params / 1e9:.2f}B parameters), rank {r}, {world} ranks; GB sent per rank (ring, fp32)")
    for proj_type in ("std", "right"):
        totals = {"step": 0.0, "first refresh": 0.0, "power refresh": 0.0, "svd refresh": 0.0}
        for name, shape, heads in per_layer:
            side = resolve_side(proj_type, shape)
            power = communication_bytes(shape, r, side, world, n_blocks_reduced=mini_blocks(name, heads))
            totals["step"] += layers * power["step"]
            totals["power refresh"] += layers * power["refresh"]
            totals["first refresh"] += layers * communication_bytes(shape, r, side, world, first=True)["refresh"]
            totals["svd refresh"] += layers * communication_bytes(shape, r, side, world, method="svd")["refresh"]
        print(f"  proj_type={proj_type!r}: " + ", ".join(f"{k} {v / gb:.3f}" for k, v in totals.items()))
    steps = step_by_optimizer(per_layer, layers, r, world)
    print(f"  a step without refresh, proj_type='std': galore {steps.pop('galore') / gb:.3f} GB; beyond it: " + ", ".join(
        f"{name} +{sent / 1e3:.1f} KB" for name, sent in steps.items()))
    fsdp = (world - 1) / world * params * (2 * 2 + 4)
    print(f"  FSDP2 itself per step (bf16 all-gather ×2, fp32 reduce-scatter): {fsdp / gb:.1f}")


def mini_blocks(name: str, heads: int) -> int:
    """GaLore-mini's block sums that cross ranks for one weight: the per-head v of q and k (and the
    layer's 2 norm weights, counted with q)."""
    return heads + (2 if name == "q_proj" else 0)


def step_by_optimizer(per_layer, layers, r, world, hidden=4096, vocab=32000) -> dict[str, float]:
    """Bytes one rank sends per step (no refresh): GaLore's, and what each other method sends beyond it
    (block sums, 8-bit block maxima, Adafactor's row sums), counting the embedding, the output layer
    (vocab×hidden) and the 2·layers + 1 norm weights too."""
    unprojected = [((vocab, hidden), 2), ((hidden,), 2 * layers + 1)]  # (shape, how many)
    totals = {}
    for method in ("galore", "galore_mini", "galore_8bit", "galore_adafactor"):
        total = 0.0
        for name, shape, heads in per_layer:
            side = resolve_side("std", shape)
            blocks = mini_blocks(name, heads) if method == "galore_mini" else 0
            total += layers * communication_bytes(
                shape, r, side, world, n_blocks_reduced=blocks, adafactor=method == "galore_adafactor",
                scale_parameter=method == "galore_adafactor",
                moments_8bit=2 if method == "galore_8bit" and side == "right" else 0)["step"]
        for shape, count in unprojected:
            total += count * communication_bytes(
                shape, 0, None, world, adafactor=method == "galore_adafactor",
                scale_parameter=method == "galore_adafactor",
                moments_8bit=2 if method == "galore_8bit" else 0)["step"]
        totals[method] = total
    return {name: sent - (0.0 if name == "galore" else totals["galore"]) for name, sent in totals.items()}


if __name__ == "__main__":
    main()
