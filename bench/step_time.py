"""Optimizer step time and state memory, side by side with the peer packages, in one process.

Every optimizer updates the same model with the same gradients (fixed random tensors, copied into
``.grad`` before each step, outside the timed region). Optimizers are timed in alternation — each
repetition steps every optimizer once, in a rotated order — so machine noise (other jobs on the
cores) falls on all of them alike. Reported per optimizer:

* **steady**: median time of a step that does not refresh the projector;
* **first**: the first step (state allocation and, for GaLore-type methods, the first SVD), median
  over ``--first-reps`` fresh optimizers (one for exact-SVD ones);
* **refresh**: a step that refreshes the projector. Ours: forced on a warm optimizer (so the
  ``power`` method warm-starts from its previous projector, as at every refresh after the first);
  peers: estimated as the first step (no warm start exists there);
* **amortised refresh**: ``(refresh - steady) / T / steady`` — the refresh's share of a step at gap T;
* **state**: bytes of all tensors in the optimizer state (galore-torch's projector objects included).

Ratios are to torch's fused AdamW and to galore-torch's GaLoreAdamW measured in the same run.

Reference shapes (the issue's): 4 LLaMA blocks, D=1024, F=2752, 16 heads (50.6M parameters),
rank 256, gap 200, 2 CPU threads::

    .venv/bin/python bench/step_time.py                 # ~2-3 minutes on 2 cores
    .venv/bin/python bench/step_time.py --smoke         # tiny shapes, 2 steps: checks it all runs
    .venv/bin/python bench/step_time.py --only 'galore_mini|adamw'
    .venv/bin/python bench/step_time.py --profile galore_mini_power_bf16   # where the time goes
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import galore_mini as gm  # noqa: E402


@dataclass
class Entry:
    key: str
    label: str
    build: Callable[[], torch.optim.Optimizer]
    ours: bool = False
    projected: bool = False
    slow_refresh: bool = False  # exact SVD: time its refresh once only
    optimizer: torch.optim.Optimizer | None = None
    steady: list[float] = field(default_factory=list)
    first: float = float("nan")
    refresh: list[float] = field(default_factory=list)
    state_bytes: int = 0
    error: str | None = None


def _split_params(model, rank):
    """(projected weights, the rest) as our param_groups chooses them, for the peers' group dicts."""
    groups = gm.param_groups(model, "galore", rank=rank)
    projected = [p for g in groups if "rank" in g for p in g["params"]]
    ids = {id(p) for p in projected}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return projected, rest


def entries(model, args) -> list[Entry]:
    """Everything we time. Peers whose package is missing are skipped (listed in the output)."""
    rank, gap, lr = args.rank, args.gap, 1e-6  # a tiny lr: the shared weights barely move
    projected, rest = _split_params(model, rank)
    galore_keys = dict(rank=rank, update_proj_gap=gap, scale=0.25)
    found: list[Entry] = []

    found.append(Entry("adamw_fused", "torch AdamW (fused)",
                       lambda: torch.optim.AdamW(model.parameters(), lr=lr, fused=True)))
    found.append(Entry("adamw_foreach", "torch AdamW (foreach)",
                       lambda: torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)))
    peers = []
    galore_torch = C.optional_import("galore_torch")
    if galore_torch is not None:
        peers.append(Entry("galore_torch", "galore-torch GaLoreAdamW", lambda: galore_torch.GaLoreAdamW(
            [{"params": projected, **galore_keys, "proj_type": "std"}, {"params": rest}], lr=lr),
            projected=True, slow_refresh=True))
    adam_mini = C.optional_import("adam_mini")
    if adam_mini is not None:
        heads = model.config.num_attention_heads
        peers.append(Entry("adam_mini_pkg", "adam-mini Adam_mini", lambda: adam_mini.Adam_mini(
            named_parameters=model.named_parameters(), lr=lr, dim=model.config.hidden_size, n_heads=heads,
            n_kv_heads=model.config.num_key_value_heads, verbose=False)))
    apollo = C.optional_import("apollo_torch")
    if apollo is not None:
        peers.append(Entry("apollo", "apollo-torch APOLLOAdamW", lambda: apollo.APOLLOAdamW(
            [{"params": projected, **galore_keys, "scale": 1.0, "proj": "random", "scale_type": "channel",
              "proj_type": "std"}, {"params": rest}], lr=lr), projected=True))
    pto = C.optional_import("pytorch_optimizer")
    if pto is not None and hasattr(pto, "GaLore"):
        peers.append(Entry("pto_galore", "pytorch-optimizer GaLore", lambda: pto.GaLore(
            [{"params": projected, **galore_keys, "projection_type": "std"}, {"params": rest}], lr=lr),
            projected=True, slow_refresh=True))
    found += peers

    def ours(key, label, method, **options):
        found.append(Entry(key, label, lambda: gm.create_optimizer(
            model, method, lr=lr, rank=rank, update_proj_gap=gap, **options), ours=True,
            projected=method != "adam_mini", slow_refresh=options.get("proj_method", "svd") == "svd"))

    ours("galore", "ours GaLoreAdamW (svd)", "galore")
    ours("galore_single", "ours GaLoreAdamW (svd, single-tensor path)", "galore", foreach=False)
    ours("galore_power", "ours GaLoreAdamW (power)", "galore", proj_method="power")
    ours("galore_power_bf16", "ours GaLoreAdamW (power, bf16 proj)", "galore", proj_method="power",
         proj_dtype="bf16")
    ours("adam_mini", "ours AdamMini", "adam_mini")
    ours("adam_mini_single", "ours AdamMini (single-tensor path)", "adam_mini", foreach=False)
    ours("galore_mini", "ours GaLoreMini (svd)", "galore_mini", proj_method="svd")
    ours("galore_mini_power", "ours GaLoreMini (power)", "galore_mini", proj_method="power")
    ours("galore_mini_randomized", "ours GaLoreMini (randomized)", "galore_mini", proj_method="randomized")
    ours("galore_mini_power_bf16", "ours GaLoreMini (power, bf16 proj)", "galore_mini", proj_method="power",
         proj_dtype="bf16")
    ours("galore_mini_power_bf16_single", "ours GaLoreMini (power, bf16 proj, single-tensor path)", "galore_mini",
         proj_method="power", proj_dtype="bf16", foreach=False)
    ours("galore_mini_randomized_bf16", "ours GaLoreMini (randomized, bf16 proj)", "galore_mini",
         proj_method="randomized", proj_dtype="bf16")
    if args.only:
        pattern = re.compile(args.only)
        keep = {"adamw_fused", "galore_torch"}  # the ratios' denominators
        found = [e for e in found if pattern.search(e.key) or e.key in keep]
    return found


def force_refresh(optimizer) -> None:
    """Make the next step of one of our optimizers refresh every projector (the schedule is a tensor)."""
    for state in optimizer.state.values():
        if "refresh" in state:
            state["refresh"][0] = int(state["step"]) + 1


def run(args, model=None) -> dict:
    """Time every entry on `model` (default: the reference LLaMA blocks from `args`)."""
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if model is None:
        model = C.llama_blocks(args.layers, args.dim, args.ffn, args.heads, dtype=dtype, device=args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator(device=args.device).manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen, device=args.device, dtype=dtype).mul_(1e-3) for p in params]
    missing = [name for name, module in (("galore-torch", "galore_torch"), ("adam-mini", "adam_mini"),
                                         ("apollo-torch", "apollo_torch"), ("pytorch-optimizer", "pytorch_optimizer"))
               if C.optional_import(module) is None]

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g.clone()

    table = entries(model, args)
    firsts: dict[str, list[float]] = {e.key: [] for e in table}
    for rep in range(args.first_reps):  # first step: fresh state, the first SVD; alternating, slow ones last
        for e in sorted(table, key=lambda e: e.slow_refresh):
            if e.error or (e.slow_refresh and rep > 0):
                continue
            try:
                e.optimizer = None
                e.optimizer = e.build()
                set_grads()
                firsts[e.key].append(C.timed(e.optimizer.step, args.device))
                e.state_bytes = C.state_bytes(e.optimizer)
            except Exception as exc:  # noqa: BLE001 — report, keep going with the others
                e.error = f"{type(exc).__name__}: {exc}"[:200]
                e.optimizer = None
            finally:
                for p in params:
                    p.grad = None
    for e in table:
        e.first = C.median(firsts[e.key])
    live = [e for e in table if e.optimizer is not None]
    for _ in range(args.warmup):
        for e in live:
            set_grads()
            e.optimizer.step()
    for rep in range(args.reps):  # steady steps, alternating, rotated order
        order = live[rep % len(live):] + live[:rep % len(live)]
        for e in order:
            set_grads()
            e.steady.append(C.timed(e.optimizer.step, args.device))
    for rep in range(args.refresh_reps):  # forced refreshes of ours (warm: power iteration starts from P_old)
        for e in live:
            if not (e.ours and e.projected) or (e.slow_refresh and rep > 0):
                continue
            force_refresh(e.optimizer)
            set_grads()
            e.refresh.append(C.timed(e.optimizer.step, args.device))
    for p in params:
        p.grad = None

    def find(key):
        return next((e for e in live if e.key == key), None)

    base, galore_torch = find("adamw_fused"), find("galore_torch")
    results = []
    for e in table:
        steady = C.median(e.steady)
        refresh = C.median(e.refresh) if e.refresh else (e.first if e.projected else float("nan"))
        row = dict(key=e.key, label=e.label, ours=e.ours, error=e.error, steady_s=steady, first_s=e.first,
                   refresh_s=refresh, refresh_measured="forced, warm" if e.refresh else "first step",
                   amortised_refresh_pct=((refresh - steady) / args.gap / steady * 100) if e.projected else None,
                   state_bytes=e.state_bytes, reps=len(e.steady),
                   steady_all_s=e.steady)
        row["vs_adamw_fused"] = steady / C.median(base.steady) if base else float("nan")
        row["vs_galore_torch"] = steady / C.median(galore_torch.steady) if galore_torch else float("nan")
        row["first_vs_galore_torch"] = e.first / galore_torch.first if galore_torch else float("nan")
        results.append(row)
    return dict(kind="step_time", machine=C.machine(), versions=C.versions(), missing_peers=missing,
                config=dict(model=type(model).__name__, layers=args.layers, dim=args.dim, ffn=args.ffn,
                            heads=args.heads, rank=args.rank,
                            gap=args.gap, threads=args.threads, reps=args.reps, warmup=args.warmup,
                            device=args.device, dtype=args.dtype, params=n_params, smoke=args.smoke),
                results=results)


def render(report: dict) -> str:
    cfg = report["config"]
    header = ["optimizer", "steady step", "× fused AdamW", "× galore-torch", "first step", "refresh step",
              f"amortised refresh (T={cfg['gap']})", "state"]
    rows = []
    for r in report["results"]:
        if r["error"]:
            rows.append([r["label"], f"failed: {r['error']}"] + [""] * (len(header) - 2))
            continue
        pct = r["amortised_refresh_pct"]
        rows.append([r["label"], C.fmt_time(r["steady_s"]), C.fmt_ratio(r["vs_adamw_fused"]),
                     C.fmt_ratio(r["vs_galore_torch"]), C.fmt_time(r["first_s"]),
                     (C.fmt_time(r["refresh_s"]) + ("" if r["refresh_measured"] == "forced, warm" else " ¹"))
                     if pct is not None else "–",
                     f"{pct:.1f}%" if pct is not None else "–", C.fmt_bytes(r["state_bytes"])])
    title = (f"{cfg['layers']} LLaMA blocks D={cfg['dim']} F={cfg['ffn']} heads={cfg['heads']} "
             f"({cfg['params'] / 1e6:.1f}M params, {cfg['dtype']}, {cfg['device']}), rank {cfg['rank']}, "
             f"gap {cfg['gap']}, {cfg['threads']} threads, median of {cfg['reps']} alternating steps")
    notes = "¹ peers: the first step (no warm start); ours: a forced refresh on a warm optimizer."
    if report["missing_peers"]:
        notes += f"  Not installed, skipped: {', '.join(report['missing_peers'])}."
    return f"{title}\n\n{C.markdown_table(header, rows)}\n\n{notes}\n"


CANDIDATE = "galore_mini_power_bf16"  # the configuration the goals are checked on (see README/BENCHMARKS)


def goals(report: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's CPU goals, checked on GaLore-mini with warm-started power refresh and bf16 projection."""
    by_key = {r["key"]: r for r in report["results"] if not r["error"]}
    best = by_key.get(CANDIDATE) or next((r for k, r in by_key.items() if k.startswith("galore_mini")), None)
    if best is None:
        return []
    out = []
    if "galore_torch" in by_key:
        out.append((f"steady step ≤ 0.5× galore-torch ({best['label']})", f"{best['vs_galore_torch']:.2f}×",
                    best["vs_galore_torch"] <= 0.5))
    out.append((f"steady step ≤ 8× fused AdamW ({best['label']})", f"{best['vs_adamw_fused']:.2f}×",
                best["vs_adamw_fused"] <= 8))
    out.append((f"first step ≤ 1 s ({best['label']})", C.fmt_time(best["first_s"]), best["first_s"] <= 1.0))
    pct = best["amortised_refresh_pct"]
    out.append((f"amortised refresh ≤ 10% of a step at T={report['config']['gap']} ({best['label']})",
                f"{pct:.1f}%", pct <= 10))
    return out


def profile(args) -> None:
    """cProfile + torch.profiler of steady steps of one of our optimizers (`--profile KEY`)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile as tprofile

    torch.set_num_threads(args.threads)
    model = C.llama_blocks(args.layers, args.dim, args.ffn, args.heads, device=args.device)
    params = list(model.parameters())
    grads = [torch.randn_like(p).mul_(1e-3) for p in params]
    entry = next(e for e in entries(model, args) if e.key == args.profile)
    opt = entry.build()

    def step():
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()

    for _ in range(2):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        step()
    prof.disable()
    print(f"== cProfile, 3 steady steps of {entry.label} (includes 3 gradient copies) ==")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    with tprofile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])) as tp:
        for _ in range(3):
            step()
    print(f"== torch.profiler, 3 steady steps of {entry.label} ==")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: checks that everything runs")
    C.add_shape_arguments(parser, layers=4, dim=1024, ffn=2752, heads=16, rank=256, threads=2)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7, help="steady steps per optimizer (alternating)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--refresh-reps", type=int, default=3)
    parser.add_argument("--first-reps", type=int, default=3,
                        help="fresh optimizers per entry for the first-step median (exact-SVD ones: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter dtype")
    parser.add_argument("--only", help="regex over optimizer keys (fused AdamW and galore-torch always run)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", metavar="KEY", help="profile steady steps of one optimizer instead")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.dim, args.ffn, args.heads, args.rank = 1, 64, 176, 4, 8
        args.reps, args.warmup, args.refresh_reps, args.first_reps = 2, 0, 1, 1
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.profile:
        profile(args)
        return None
    report = run(args)
    print(render(report))
    for goal, value, ok in goals(report):
        print(f"{'MET   ' if ok else 'MISSED'} {goal}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
