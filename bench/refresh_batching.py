"""Per-matrix against batched projector refresh on the CPU (the choice behind core.BATCH_REFRESH_ON_CPU).

Run: PYTHONPATH=src python3 bench/refresh_batching.py — prints the median of 5 alternating runs, 1 thread.
"""
import statistics
import time

import torch

from galore_mini.optim.projection import compute_projector

torch.set_num_threads(1)
torch.manual_seed(0)
for method in ("svd", "power"):
    for (m, n, r, b) in ((256, 688, 32, 16), (512, 1376, 64, 8)):
        g = torch.randn(b, m, n)
        old = compute_projector(g, r, "left", "svd", {}, [torch.Generator().manual_seed(i) for i in range(b)], torch.float32)
        olds = [{k: v[i] for k, v in old.items()} for i in range(b)]
        def per():
            for i in range(b):
                compute_projector(g[i], r, "left", method, olds[i], torch.Generator().manual_seed(i), torch.float32)
        def bat():
            compute_projector(g, r, "left", method, old, [torch.Generator().manual_seed(i) for i in range(b)], torch.float32)
        tp, tb = [], []
        for _ in range(5):
            s = time.perf_counter(); per(); tp.append(time.perf_counter() - s)
            s = time.perf_counter(); bat(); tb.append(time.perf_counter() - s)
        print(f"{method} {b}x{m}x{n} r{r}: per-matrix {statistics.median(tp)*1e3:.1f} ms, batched {statistics.median(tb)*1e3:.1f} ms")
