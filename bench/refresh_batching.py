"""Per-matrix against batched projector refresh on the CPU (the choice behind ``refresh.BATCH_REFRESH_ON_CPU``).

For a stack of same-shaped gradients, one ``compute_projector`` call per matrix against one batched
call (left side, warm-started from an exact basis where the method uses one), alternated, median of
``--repeats`` runs, 1 thread. ``bench/run_all.py --render-only`` puts the table in BENCHMARKS.md.

    PYTHONPATH=src python3 bench/refresh_batching.py --json bench/results/refresh_batching.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from galore_mini.optim.projection import compute_projector  # noqa: E402

STACKS = ((256, 688, 32, 16), (512, 1376, 64, 8))  # rows, cols, rank, matrices in the stack
SMOKE_STACKS = ((16, 24, 4, 3),)


def _seeds(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


def run(args) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = []
    for method in ("svd", "power"):
        for rows, cols, rank, count in (SMOKE_STACKS if args.smoke else STACKS):
            grads = torch.randn(count, rows, cols)
            old = compute_projector(grads, rank, "left", "svd", {}, _seeds(count), torch.float32)
            olds = [{k: v[i] for k, v in old.items()} for i in range(count)]

            def per_matrix():
                for i in range(count):
                    compute_projector(grads[i], rank, "left", method, olds[i], torch.Generator().manual_seed(i),
                                      torch.float32)

            def batched():
                compute_projector(grads, rank, "left", method, old, _seeds(count), torch.float32)

            per, bat = [], []
            for _ in range(args.repeats):
                per.append(C.timed(per_matrix))
                bat.append(C.timed(batched))
            results.append(dict(method=method, shape=[count, rows, cols], rank=rank,
                                per_matrix_s=C.median(per), batched_s=C.median(bat)))
    return dict(kind="refresh_batching", machine=C.machine(), config=dict(smoke=args.smoke, repeats=args.repeats),
                results=results)


def render(report: dict) -> str:
    rows = [[r["method"], f"{r['shape'][0]} × {r['shape'][1]}×{r['shape'][2]}, r={r['rank']}",
             C.fmt_time(r["per_matrix_s"]), C.fmt_time(r["batched_s"]), f"{r['per_matrix_s'] / r['batched_s']:.2f}×"]
            for r in report["results"]]
    return C.markdown_table(["method", "stack", "per matrix", "batched", "batched speed-up"], rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (pipeline check)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the raw report here")
    return C.run_and_report(parser.parse_args(argv), run, render)


if __name__ == "__main__":
    main()
