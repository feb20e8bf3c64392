"""Subspace refresh: exact SVD vs randomized SVD vs warm-started subspace iteration, and its amortised cost.

For each weight shape (m×n, rank r) a synthetic gradient with a decaying spectrum (what gradients of
trained layers look like; a Gaussian matrix has a flat one and no meaningful subspace) is built, and
each way of finding its rank-r subspace is timed through the library's own `compute_projector`:

* ``svd``: exact ``torch.linalg.svd`` in fp32 (the reference, galore-torch's choice);
* ``randomized``: Gaussian sketch + 2 power steps + Rayleigh–Ritz (the cold-start method);
* ``power``: one subspace-iteration step warm-started from the previous refresh's projector (found
  on a drifted gradient), as every refresh after the first one runs;
* the same two with ``proj_dtype=bf16`` (big products in bf16);
* ``random``: a random orthonormal basis (no SVD at all).

Quality: the share of the gradient's top-r energy the basis captures,
``‖PᵀG‖²_F / Σ_{i≤r} σ_i²`` (1.0 = as good as the exact SVD).
Amortised cost: ``refresh / T`` as a % of one steady GaLore-mini step on a weight of that shape.

    .venv/bin/python bench/refresh.py            # includes the 4096×11008 exact SVD (~35 s on 2 cores)
    .venv/bin/python bench/refresh.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import galore_mini as gm  # noqa: E402
from galore_mini.optim.projection import compute_projector, project, resolve_side  # noqa: E402

METHODS = [("svd", "fp32"), ("randomized", "fp32"), ("power", "fp32"), ("randomized", "bf16"), ("power", "bf16"),
           ("random", "fp32")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synthetic_gradient(m: int, n: int, rank: int, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(G, G_prev): a gradient with spectrum ~ i^-0.8 over 4r directions plus noise, and a drifted earlier one."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k = min(4 * rank, m, n)
    spectrum = torch.arange(1, k + 1, device=device, dtype=torch.float32).pow(-0.8)

    def low_rank():
        a = torch.randn(m, k, generator=gen, device=device) / m ** 0.5
        b = torch.randn(k, n, generator=gen, device=device) / n ** 0.5
        return (a * spectrum) @ b

    base = low_rank()
    noise = 0.02 * torch.randn(m, n, generator=gen, device=device) / max(m, n) ** 0.5
    grad = base + noise
    previous = base + 0.5 * low_rank()  # the subspace has moved since the last refresh
    return grad, previous


def captured(grad: torch.Tensor, projector: dict, side: str, top_energy: float) -> float:
    low = project(grad, {k: v.float() for k, v in projector.items()}, side)
    return float(low.pow(2).sum()) / top_energy


def step_time(m: int, n: int, rank: int, proj_dtype: str, reps: int, device="cpu") -> float:
    """Median steady GaLore-mini step on one m×n weight (no refresh)."""
    weight = torch.nn.Parameter(torch.randn(m, n, device=device) * 0.02)
    opt = gm.GaLoreMini([{"params": [weight], "rank": rank, "update_proj_gap": 10 ** 9, "block": "rows",
                          "proj_method": "randomized", "proj_dtype": proj_dtype}], lr=1e-6)
    grad = torch.randn(m, n, device=device) * 1e-3
    times = []
    for i in range(reps + 2):
        weight.grad = grad.clone()
        t = C.timed(opt.step, device)
        if i > 1:  # the first one refreshes, the second warms up
            times.append(t)
    return C.median(times)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    warm = torch.randn(64, 48, device=args.device)  # load LAPACK/BLAS kernels before anything is timed
    torch.linalg.svd(warm, full_matrices=False), torch.linalg.qr(warm), torch.linalg.eigh(warm.t() @ warm)
    (warm.bfloat16() @ warm.t().bfloat16())
    rows = []
    for m, n, rank in args.shapes:
        grad, previous = synthetic_gradient(m, n, rank, seed=m + n + rank, device=args.device)
        side = resolve_side("std", (m, n))
        exact_s = None
        gen = torch.Generator().manual_seed(0)
        results = {}
        for method, dtype_name in METHODS:
            dtype = DTYPES[dtype_name]
            state = {}
            if method == "power":  # warm start: the projector of the previous refresh
                state = compute_projector(previous, rank, side, "randomized", {}, gen, dtype)
            reps = 1 if method == "svd" else args.reps
            times, proj = [], None
            for _ in range(reps):
                def refresh():
                    nonlocal proj
                    proj = compute_projector(grad, rank, side, method, state, torch.Generator().manual_seed(1), dtype)
                times.append(C.timed(refresh, args.device))
            if method == "svd":
                s = torch.linalg.svdvals(grad) if exact_s is None else exact_s
                exact_s = s
            results[(method, dtype_name)] = (C.median(times), proj)
        top_energy = float(exact_s[:rank].pow(2).sum())
        steps = {d: step_time(m, n, rank, d, args.step_reps, args.device) for d in ("fp32", "bf16")}
        for (method, dtype_name), (seconds, proj) in results.items():
            step = steps[dtype_name if method != "svd" else "fp32"]
            rows.append(dict(shape=f"{m}×{n}", rank=rank, method=method, dtype=dtype_name, refresh_s=seconds,
                             captured=captured(grad, proj, side, top_energy),
                             vs_svd=seconds / results[("svd", "fp32")][0], step_s=step,
                             amortised_pct=seconds / args.gap / step * 100))
        print(f"  {m}×{n} r={rank} done", file=sys.stderr, flush=True)
    return dict(kind="refresh", machine=C.machine(), versions=C.versions(),
                config=dict(shapes=[list(s) for s in args.shapes], gap=args.gap, threads=args.threads, reps=args.reps,
                            device=args.device, smoke=args.smoke), results=rows)


def render(report: dict) -> str:
    cfg = report["config"]
    header = ["shape", "r", "method", "products", "refresh time", "× exact SVD", "top-r energy captured",
              "GaLore-mini step", f"amortised at T={cfg['gap']}"]
    rows = [[r["shape"], str(r["rank"]), r["method"] + (" (warm)" if r["method"] == "power" else ""), r["dtype"],
             C.fmt_time(r["refresh_s"]), f"{r['vs_svd']:.4f}×" if r["vs_svd"] < 0.01 else f"{r['vs_svd']:.3f}×",
             f"{r['captured']:.4f}", C.fmt_time(r["step_s"]) + f" ({'fp32' if r['method'] == 'svd' else r['dtype']})",
             f"{r['amortised_pct']:.2f}%"] for r in report["results"]]
    return (f"Refresh of one weight's projector, {cfg['threads']} threads, {cfg['device']} "
            f"(median of {cfg['reps']}; exact SVD once)\n\n{C.markdown_table(header, rows)}\n")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--shapes", default="1024x2752x256,2048x5461x512,4096x11008x128",
                        help="comma-separated MxNxR")
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--step-reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.reps, args.step_reps = "64x176x8", 1, 1
    args.shapes = C.parse_shapes(args.shapes)
    return args


def main(argv=None) -> dict:
    return C.run_and_report(parse(argv), run, render)


if __name__ == "__main__":
    main()
