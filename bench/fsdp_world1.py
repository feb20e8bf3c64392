"""FSDP2 at world size 1 against the unsharded model: what sharding costs when there is nothing to shard.

    PYTHONPATH=src python3 bench/fsdp_world1.py --device cuda --json bench/results/fsdp_world1_cuda.json
    PYTHONPATH=src python3 bench/fsdp_world1.py --device cpu --json bench/results/fsdp_world1_cpu.json

One process joins a process group of one (NCCL on a GPU, gloo on the CPU) and builds two copies of the
same LLaMA: one plain, one with ``fully_shard`` on every decoder layer and the root (so its parameters
are DTensors and the optimizers take their sharded path). Each copy gets its own optimizer of the same
method; their training steps (forward, backward, ``step()``) alternate, so machine noise falls on both
alike. Reported per method: the median whole training step and the median ``step()`` of each copy, and
the ratios sharded / plain (issue #10's goal: at most 1.10 for the training step on the GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from fsdp_scaling import llama, shard_every_layer  # noqa: E402

METHODS = {
    "galore_mini": dict(lr=1e-3, update_proj_gap=200),
    "galore": dict(lr=1e-3, update_proj_gap=200, proj_method="power"),
    "adam_mini": dict(lr=1e-3),
    "full": dict(lr=1e-3),  # AdamW on every weight
}
GOAL = 1.10
READING = {
    "cuda": "The check for one GPU: FSDP2 at world size 1 (NCCL) should cost at most 10% over the "
            "unsharded training step.",
    "cpu": "On the CPU the training step of the sharded copy is within the noise of the plain one (FSDP2's "
           "collectives over a group of one are copies). The optimizer's own step() is slower on DTensor "
           "parameters (they take the single-tensor path, with no foreach across tensors: the step() ratio), "
           "which is a small part of the training step at these shapes. Not a GPU measurement: no "
           "GPU was available; on a GPU run the command with `--device cuda`.",
}


def _measure(cfg: dict, device: str) -> dict:
    import galore_mini as gm

    gen = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen).to(device)
          for _ in range(cfg["steps"])]
    results = {}
    for method, options in METHODS.items():
        copies = {}
        for kind in ("plain", "sharded"):
            model = llama(cfg).to(device)
            model = shard_every_layer(model) if kind == "sharded" else model
            rank = {"rank": cfg["rank"]} if method.startswith("galore") else {}
            copies[kind] = (model, gm.create_optimizer(model, method, **options, **rank))
        times = {f"{kind} {part}": [] for kind in copies for part in ("training step", "step")}
        for i, x in enumerate(xs):
            for kind, (model, opt) in copies.items():
                def train_step():
                    model(input_ids=x, labels=x).loss.backward()
                    times_step.append(C.timed(opt.step, device))
                    opt.zero_grad(set_to_none=True)

                times_step: list[float] = []
                whole = C.timed(train_step, device)
                if i >= cfg["warmup"]:
                    times[f"{kind} training step"].append(whole)
                    times[f"{kind} step"].append(times_step[0])
        row = {key: C.median(values) for key, values in times.items()}
        row["training step ratio"] = row["sharded training step"] / row["plain training step"]
        row["step ratio"] = row["sharded step"] / row["plain step"]
        results[method] = row
        print(method, {k: round(v * 1e3, 2) if "ratio" not in k else round(v, 3) for k, v in row.items()}, flush=True)
        del copies
    return results


def run(args) -> dict:
    cfg = dict(vocab=32000, hidden=2048, intermediate=5632, layers=8, heads=16, seq=512, batch=8, steps=14,
               warmup=4, rank=128)
    if args.device == "cpu":
        cfg.update(vocab=4096, hidden=256, intermediate=688, layers=4, heads=8, seq=128, batch=8, steps=10, warmup=3,
                   rank=32)
    if args.smoke:
        cfg.update(vocab=128, hidden=32, intermediate=64, layers=1, heads=4, seq=16, batch=2, steps=3, warmup=1,
                   rank=8)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            results = _measure(cfg, args.device)
        finally:
            dist.destroy_process_group()
    return {"config": {**cfg, "smoke": args.smoke, "device": args.device, "backend": backend,
                       "threads": args.threads},
            "machine": C.machine(), "versions": C.versions(), "results": results}


def render(report: dict) -> str:
    cfg, machine = report["config"], report["machine"]
    rows = []
    for method, row in report["results"].items():
        rows.append([method, f"{row['plain training step'] * 1e3:.1f}", f"{row['sharded training step'] * 1e3:.1f}",
                     f"{row['training step ratio']:.3f}", f"{row['plain step'] * 1e3:.2f}",
                     f"{row['sharded step'] * 1e3:.2f}", f"{row['step ratio']:.3f}"])
    device = cfg["device"] if cfg["device"] == "cpu" else machine.get("gpu", cfg["device"])
    head = (f"LLaMA {cfg['layers']}×{cfg['hidden']} (intermediate {cfg['intermediate']}, vocab {cfg['vocab']}), "
            f"batch {cfg['batch']}×{cfg['seq']}, GaLore rank {cfg['rank']}, fp32, on {device} ({cfg['backend']}, a process group of one); "
            f"{machine['date']}, load average {machine.get('load average', '?')}, git {machine.get('git', '?')}. "
            f"Medians over {cfg['steps'] - cfg['warmup']} alternating steps after {cfg['warmup']} warm-up steps; "
            f"goal for the training step on a GPU: ratio at most {GOAL:.2f}.")
    return head + "\n\n" + C.markdown_table(
        ["method", "plain training step ms", "FSDP2 training step ms", "ratio", "plain step() ms",
         "FSDP2 step() ms", "ratio"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (pipeline check)")
    C.run_and_report(parser.parse_args(argv), run, render)


if __name__ == "__main__":
    main()
