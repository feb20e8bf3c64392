"""FSDP2 on CPU (gloo): optimizer step time and per-rank state bytes at 1, 2 and 4 ranks.

    PYTHONPATH=src python3 bench/fsdp_scaling.py --json bench/results/fsdp_scaling.json

One run measures every world size in turn on the same model and batch: world 1 is one process with no
FSDP (the baseline), worlds 2 and 4 shard every decoder layer and the root with ``fully_shard`` and
spawn that many processes with one thread each. Reported per method: the median optimizer ``step()``
time without a refresh (``update_proj_gap`` large), the median with a refresh on every step
(``update_proj_gap=1``: the warm-started power iteration with its all-reduces, every weight's refresh run
side by side so that each round of collectives serves all weights), the same with the weights refreshed
one at a time (the earlier code's schedule: one collective per weight per round; measured by swapping
``run_in_lockstep`` for a sequential loop in this process only), the median of a whole
training step (forward, backward with FSDP2's collectives, ``step()``), and the largest per-rank
optimizer state. Ratios are against world 1 of the same run. On a machine with fewer cores than
ranks the ranks share cores, so step times there measure scheduling as much as the work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = {
    "galore_mini": dict(lr=1e-2, rank=32),
    "galore": dict(lr=1e-2, rank=32, proj_method="power"),
    "adam_mini": dict(lr=1e-3),
}


def llama(cfg: dict):
    """The benchmark's LLaMA for a config dict (vocab, hidden, intermediate, layers, heads, seq), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
                                        intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
                                        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
                                        max_position_embeddings=cfg["seq"], tie_word_embeddings=False))


def shard_every_layer(model):
    """``fully_shard`` on each decoder layer, then the root (as the harness's ``--fsdp`` does)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _measure(cfg: dict, world: int, rank: int) -> dict:
    import galore_mini as gm

    gen = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen) for _ in range(cfg["steps"])]
    per = cfg["batch"] // world
    out = {}
    for method, options in METHODS.items():
        options = {**options, "rank": cfg["rank"]} if "rank" in options else options
        row = {}
        for label, gap in (("step", 10_000), ("refresh step", 1), ("refresh one at a time", 1)):
            if label == "refresh one at a time" and world == 1:
                row[label] = None  # one process has no collectives to batch
                continue
            _sequential_refresh(label == "refresh one at a time")
            model = llama(cfg)
            if world > 1:
                shard_every_layer(model)
            extra = {} if method == "adam_mini" else {"update_proj_gap": gap}
            opt = gm.create_optimizer(model, method, **options, **extra)
            steps, whole = [], []
            for i, x in enumerate(xs):
                start = time.perf_counter()
                model(input_ids=x[rank * per:(rank + 1) * per], labels=x[rank * per:(rank + 1) * per]).loss.backward()
                if world > 1:
                    dist.barrier()
                mid = time.perf_counter()
                opt.step()
                if world > 1:
                    dist.barrier()
                end = time.perf_counter()
                opt.zero_grad()
                if i >= cfg["warmup"]:
                    steps.append(end - mid)
                    whole.append(end - start)
            row[label] = statistics.median(steps)
            if label == "step":
                row["training step"] = statistics.median(whole)
                row["state bytes"] = opt.state_bytes()
            if method == "adam_mini":
                row["refresh step"] = row["refresh one at a time"] = None
                break
        _sequential_refresh(False)
        out[method] = row
    return out


_LOCKSTEP = None


def _sequential_refresh(on: bool) -> None:
    """Refresh the weights one after another (each weight's collectives in turn) instead of side by side."""
    from galore_mini.optim import distributed

    global _LOCKSTEP
    _LOCKSTEP = _LOCKSTEP or distributed.run_in_lockstep
    distributed.run_in_lockstep = (lambda refreshes: [_LOCKSTEP([r])[0] for r in refreshes]) if on else _LOCKSTEP


def _worker(rank: int, world: int, init: str, cfg: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = _measure(cfg, world, rank)
        # the slowest rank sets the pace; the largest state is what each rank must hold
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            merged = {m: {k: (max(r[m][k] for r in gathered) if gathered[0][m][k] is not None else None)
                          for k in gathered[0][m]} for m in gathered[0]}
            Path(out).write_text(json.dumps(merged))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(C.ROOT / "bench" / "results" / "fsdp_scaling.json"))
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (pipeline check)")
    args = parser.parse_args(argv)
    cfg = dict(vocab=4096, hidden=256, intermediate=688, layers=4, heads=8, seq=128, batch=8, steps=8, warmup=3,
               rank=32)
    if args.smoke:
        cfg.update(vocab=128, hidden=32, intermediate=64, layers=1, heads=4, seq=16, batch=4, steps=3, warmup=1,
                   rank=8)
    worlds = [int(w) for w in args.worlds.split(",")]
    results = {}
    torch.set_num_threads(1)
    for world in worlds:
        if world == 1:
            results["1"] = _measure(cfg, 1, 0)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    os.environ.pop(key, None)
                mp.spawn(_worker, args=(world, f"{tmp}/pg", cfg, f"{tmp}/out.json"), nprocs=world)
                results[str(world)] = json.loads(Path(tmp, "out.json").read_text())
        print(f"world {world}: {results[str(world)]}", flush=True)
    report = {"config": {**cfg, "smoke": args.smoke, "threads per rank": 1}, "machine": C.machine(),
              "versions": C.versions(), "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(render(report))


def render(report: dict) -> str:
    res, cfg = report["results"], report["config"]
    base = res.get("1")
    rows = []
    for method in METHODS:
        for world, by_method in res.items():
            row = by_method[method]
            ratio = (lambda key: f" ({row[key] / base[method][key]:.2f}×)" if base and row[key] and base[method][key]
                     else "")
            refresh = f"{row['refresh step'] * 1e3:.1f}{ratio('refresh step')}" if row["refresh step"] else "—"
            one_at_a_time = row.get("refresh one at a time")
            sequential = (f"{one_at_a_time * 1e3:.1f} ({one_at_a_time / row['refresh step']:.2f}× side by side)"
                          if one_at_a_time else "—")
            rows.append([method, world, f"{row['step'] * 1e3:.1f}{ratio('step')}", refresh, sequential,
                         f"{row['training step'] * 1e3:.0f}{ratio('training step')}",
                         f"{row['state bytes'] / 2 ** 20:.2f}{ratio('state bytes')}"])
    machine = report["machine"]
    head = (f"LLaMA {cfg['layers']}×{cfg['hidden']} (intermediate {cfg['intermediate']}, vocab {cfg['vocab']}), "
            f"global batch {cfg['batch']}×{cfg['seq']}, GaLore rank {cfg.get('rank', 32)}, one thread per rank, gloo; "
            f"{machine['date']}, {machine['cpu']}, {machine['cpus visible']} cores, load average "
            f"{machine.get('load average', '?')}, git {machine.get('git', '?')}. Medians over "
            f"{cfg['steps'] - cfg['warmup']} steps after {cfg['warmup']} warm-up steps; the slowest rank and the "
            "largest per-rank state; ratios against one process (world 1, no FSDP) of the same run.")
    return head + "\n\n" + C.markdown_table(
        ["method", "ranks", "optimizer step ms", "step with refresh ms", "refresh one weight at a time ms",
         "training step ms", "state MiB per rank"],
        rows)


if __name__ == "__main__":
    main()
