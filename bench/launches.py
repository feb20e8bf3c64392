"""Host cost of one optimizer step at LLaMA-1B's *topology*: operations issued and host time per step.

On a GPU a step whose tensors are large is bound by the device; one with many parameters can instead
be bound by the host issuing kernels (each launch costs several microseconds of CPU time whatever the
tensor's size). Our H100 measurement at LLaMA-1B shapes (BENCHMARKS.md, GPU section) was of that kind.
This benchmark isolates the host side on any machine: the model has LLaMA-1B's parameter list (24
blocks, 9 tensors each, plus embedding and final norm: 218 tensors) but tiny widths, so the arithmetic
is negligible and what is measured is Python and dispatch. Reported per optimizer, side by side in one
process (alternating repetitions):

* **device ops / step**: top-level ``aten::`` operations of one steady step that run a kernel (view
  and metadata operations such as ``view``, ``t`` or ``reshape`` of a contiguous tensor excluded) —
  on a GPU, roughly the number of kernel launches;
* **host time / step**: median wall time of a steady step at tiny widths (pure host cost).

    .venv/bin/python bench/launches.py            # ~1 minute
    .venv/bin/python bench/launches.py --smoke    # 2 blocks, checks it runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import step_time  # noqa: E402

# aten operations that only make views or read metadata: no kernel on a GPU
VIEW_OPS = {"aten::view", "aten::reshape", "aten::t", "aten::transpose", "aten::select", "aten::slice",
            "aten::as_strided", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::detach",
            "aten::alias", "aten::resolve_conj", "aten::resolve_neg", "aten::_reshape_alias", "aten::numpy_T",
            "aten::permute", "aten::unbind", "aten::split", "aten::chunk", "aten::narrow", "aten::lift_fresh",
            "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::to", "aten::_to_copy_noop",
            "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::result_type"}
KEYS = ("adamw_fused", "adamw_foreach", "galore_torch", "adam_mini_pkg", "apollo", "pto_galore", "galore",
        "galore_single", "adam_mini", "adam_mini_single", "galore_mini_power_bf16", "galore_mini_power_bf16_single")


def count_ops(step) -> tuple[int, int]:
    """(device ops, all top-level aten ops) of one call of `step`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    device = [e for e in top if e.name not in VIEW_OPS]
    # `aten::to` is a copy (a kernel) only when it converts; its child `_to_copy` shows that
    device += [e for e in top if e.name == "aten::to" and any(c.name == "aten::_to_copy" for c in e.cpu_children)]
    return len(device), len(top)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model = C.llama_blocks(args.layers, args.dim, args.ffn, args.heads)
    params = list(model.parameters())
    grads = [torch.randn_like(p).mul_(1e-3) for p in params]
    table = [e for e in step_time.entries(model, args) if e.key in KEYS]

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g

    for e in table:
        try:
            e.optimizer = e.build()
            for _ in range(3):
                set_grads()
                e.optimizer.step()
        except Exception as exc:  # noqa: BLE001 — report, keep going with the others
            e.error, e.optimizer = f"{type(exc).__name__}: {exc}"[:200], None
    live = [e for e in table if e.optimizer is not None]
    for rep in range(args.reps):
        for e in live[rep % len(live):] + live[:rep % len(live)]:
            set_grads()
            e.steady.append(C.timed(e.optimizer.step))
    results = []
    base = next((e for e in live if e.key == "adamw_fused"), None)
    for e in table:
        row = dict(key=e.key, label=e.label, error=e.error)
        if e.optimizer is not None:
            set_grads()
            device_ops, all_ops = count_ops(e.optimizer.step)
            host = C.median(e.steady)
            row.update(device_ops=device_ops, all_ops=all_ops, host_s=host,
                       vs_adamw_fused=host / C.median(base.steady) if base else float("nan"))
        results.append(row)
    return dict(kind="launches", machine=C.machine(), versions=C.versions(),
                config=dict(layers=args.layers, dim=args.dim, ffn=args.ffn, heads=args.heads, rank=args.rank,
                            tensors=len(params), threads=args.threads, reps=args.reps, smoke=args.smoke),
                results=results)


def render(report: dict) -> str:
    cfg = report["config"]
    header = ["optimizer", "device ops / step", "per tensor", "all aten ops / step", "host time / step",
              "× fused AdamW"]
    rows = []
    for r in report["results"]:
        if r["error"]:
            rows.append([r["label"], f"failed: {r['error']}", "", "", "", ""])
            continue
        rows.append([r["label"], str(r["device_ops"]), f"{r['device_ops'] / cfg['tensors']:.1f}", str(r["all_ops"]),
                     C.fmt_time(r["host_s"]), C.fmt_ratio(r["vs_adamw_fused"])])
    title = (f"LLaMA topology with tiny widths: {cfg['layers']} blocks, {cfg['tensors']} parameter tensors, D={cfg['dim']}, "
             f"F={cfg['ffn']}, rank {cfg['rank']}, {cfg['threads']} threads, median of {cfg['reps']} alternating steps")
    return f"{title}\n\n{C.markdown_table(header, rows)}\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 blocks, few steps: checks that it runs")
    C.add_shape_arguments(parser, layers=24, dim=64, ffn=172, heads=4, rank=8, threads=1)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.gap, args.only = 200, None  # read by step_time.entries
    if args.smoke:
        args.layers, args.reps = 2, 3
    return C.run_and_report(args, run, render)


if __name__ == "__main__":
    main()
