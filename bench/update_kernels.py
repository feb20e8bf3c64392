"""Candidate formulations of GaLore-mini's final update, timed per weight shape (input for the core).

GaLore-mini's approach-3 update is ``W ← (1-ηλ)W - s · back(M̂) ⊙ d`` with ``d`` one scalar per row
block (``d = 1/(√v̂_b+ε)``). Today the core forms ``U = back(M̂)`` (a full-size temporary) and then
``addcmul_``. Since ``d`` is constant along rows, it can be folded into the small factor and the
back-projection fused into the update as one GEMM with an epilogue (``addmm``), so no m×n temporary
is ever written or read:

* right projection (``U = M̂ Q``): ``W ← β W + α (d ⊙ M̂) Q``;
* left projection (``U = P M̂``):  ``W ← β W + α (d ⊙ P) M̂``.

Variants timed (median, device-synchronised):

* ``current``: ``U = M̂ @ Q`` in the projector dtype, then ``W.mul_(1-ηλ).addcmul_(U, d, value=-s)``;
* ``addmm_fp32``: ``W.addmm_(d⊙M̂, Q, beta=1-ηλ, alpha=-s)`` with fp32 factors (fp32 GEMM);
* ``addmm_bf16_out_fp32`` (CUDA): ``torch.addmm(W, bf16, bf16, out_dtype=fp32, out=W)``;
* ``nonfinite_sum``: the separate ``g.sum()`` pass the core makes to detect non-finite gradients
  (could be read off the block norms it computes anyway);
* ``block_norms``: the per-row norms of G that feed ``v``.

    python bench/update_kernels.py            # LLaMA-1B shapes, rank 512
    python bench/update_kernels.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def bench(fn, device, reps: int) -> float:
    for _ in range(2):
        fn()
    return C.median([C.timed(fn, device) for _ in range(reps)])


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = args.device
    rows = []
    for m, n, r in args.shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(m, n, generator=gen, device=device) * 0.02
        g = torch.randn(m, n, generator=gen, device=device) * 1e-3
        right = m >= n
        # low-rank moment and projector in the layout the core stores (right: M m×r, Q r×n; left: P m×r, M r×n)
        small = torch.randn(m, r, generator=gen, device=device) if right else torch.randn(r, n, generator=gen,
                                                                                         device=device)
        basis = torch.linalg.qr(torch.randn(n if right else m, r, generator=gen, device=device))[0]
        basis = basis.t().contiguous() if right else basis.contiguous()  # right: r×n; left: m×r
        d = torch.rand(m, 1, generator=gen, device=device) + 0.5
        step, decay = 1e-3, 1e-4
        result = dict(shape=f"{m}×{n}", rank=r, side="right" if right else "left")
        for proj_dtype in ("fp32", "bf16"):
            dt = torch.float32 if proj_dtype == "fp32" else torch.bfloat16
            basis_c, small_c = basis.to(dt), small.to(dt)

            def current():
                u = small_c @ basis_c if right else basis_c @ small_c
                w.mul_(1 - step * decay).addcmul_(u, d, value=-step)

            result[f"current_{proj_dtype}"] = bench(current, device, args.reps)
        basis32 = basis.float()

        def addmm_fp32():
            if right:
                w.addmm_(small * d, basis32, beta=1 - step * decay, alpha=-step)
            else:
                w.addmm_(basis32 * d, small, beta=1 - step * decay, alpha=-step)

        result["addmm_fp32"] = bench(addmm_fp32, device, args.reps)
        if device == "cuda":
            basis16 = basis.bfloat16()

            def addmm_mixed():
                a, b = ((small * d).bfloat16(), basis16) if right else ((basis * d).bfloat16(), small.bfloat16())
                torch.addmm(w, a, b, out_dtype=torch.float32, beta=1 - step * decay, alpha=-step, out=w)

            try:
                # correctness against the current path (one step from the same W)
                w0 = w.clone()
                addmm_mixed()
                got = w.clone()
                w.copy_(w0)
                u = (small.bfloat16() @ basis16).float() if right else (basis16 @ small.bfloat16()).float()
                want = w0 * (1 - step * decay) - step * u * d
                result["addmm_bf16_out_fp32_max_err"] = float((got - want).abs().max())
                result["addmm_bf16_out_fp32"] = bench(addmm_mixed, device, args.reps)
            except Exception as exc:  # noqa: BLE001
                result["addmm_bf16_out_fp32_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        result["nonfinite_sum"] = bench(lambda: torch.isfinite(g.sum()), device, args.reps)
        result["block_norms"] = bench(lambda: torch.linalg.vector_norm(g, dim=1), device, args.reps)
        result["cast_g_bf16"] = bench(lambda: g.to(torch.bfloat16), device, args.reps)
        rows.append(result)
        print(f"  {m}×{n} r={r} done", file=sys.stderr, flush=True)
    return dict(kind="update_kernels", machine=C.machine(), versions=C.versions(),
                config=dict(shapes=[list(s) for s in args.shapes], device=device, threads=args.threads,
                            reps=args.reps, smoke=args.smoke), results=rows)


def render(report: dict) -> str:
    keys = ["current_fp32", "current_bf16", "addmm_fp32", "addmm_bf16_out_fp32", "nonfinite_sum", "block_norms",
            "cast_g_bf16"]
    header = ["shape", "r", "side"] + keys
    rows = []
    for r in report["results"]:
        rows.append([r["shape"], str(r["rank"]), r["side"]] +
                    [C.fmt_time(r[k]) if k in r else ("error" if k + "_error" in r else "–") for k in keys])
    errors = [f"{r['shape']}: {r[k]}" for r in report["results"] for k in r if k.endswith("_error")]
    errs = [f"{r['shape']}: max |Δ| vs current bf16 = {r['addmm_bf16_out_fp32_max_err']:.2e}"
            for r in report["results"] if "addmm_bf16_out_fp32_max_err" in r]
    where = report["machine"].get("gpu", report["machine"]["cpu"])
    return (f"Update formulations, {report['config']['device']} ({where})"
            f"\n\n{C.markdown_table(header, rows)}\n" + ("\n" + "\n".join(errs) + "\n" if errs else "") +
            ("\n" + "\n".join(errors) + "\n" if errors else ""))


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--shapes", default="2048x2048x512,5461x2048x512,2048x5461x512")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.reps = "64x32x8,32x64x8", 2
    args.shapes = C.parse_shapes(args.shapes)
    return args


def main(argv=None) -> dict:
    return C.run_and_report(parse(argv), run, render)


if __name__ == "__main__":
    main()
