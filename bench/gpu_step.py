"""GPU benchmark: optimizer step time at LLaMA-1B shapes, and peak memory of a full training step.

Runs with torch alone (no transformers: the model is a minimal LLaMA written here), so it works on a
bare GPU machine::

    PYTHONPATH=src python bench/gpu_step.py --out bench/results/gpu.json

Part 1 times ``optimizer.step()`` alone on identical random gradients (median over alternating
repetitions, CUDA-synchronised). Part 2 runs forward + backward + update of the whole model in bf16
and reports ``torch.cuda.max_memory_allocated`` per method, including GaLore-mini with layer-wise
updates inside backward (each gradient freed as soon as its parameter is updated).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import galore_mini as gm

LLAMA_1B = dict(hidden=2048, intermediate=5461, layers=24, heads=32, vocab=32000)


def llama_shapes(hidden, intermediate, layers, vocab, **_):
    shapes = [("embed", (vocab, hidden))]
    for i in range(layers):
        shapes += [(f"l{i}.q", (hidden, hidden)), (f"l{i}.k", (hidden, hidden)), (f"l{i}.v", (hidden, hidden)),
                   (f"l{i}.o", (hidden, hidden)), (f"l{i}.gate", (intermediate, hidden)),
                   (f"l{i}.up", (intermediate, hidden)), (f"l{i}.down", (hidden, intermediate)),
                   (f"l{i}.norm1", (hidden,)), (f"l{i}.norm2", (hidden,))]
    shapes += [("norm", (hidden,)), ("lm_head", (vocab, hidden))]
    return shapes


def _groups(params, names, method, rank, head_dim, fast):
    if method in ("adamw_fused", "adamw_foreach"):
        return params
    groups: dict[tuple, dict] = {}  # parameters with identical options share a group, as gm.param_groups does
    for name, p in zip(names, params):
        kind = name.split(".")[-1]
        options = {}
        projected = kind in ("q", "k", "v", "o", "gate", "up", "down")
        if method != "adam_mini" and projected:
            options.update(rank=rank, update_proj_gap=200, scale=0.25)
            if fast:
                options.update(proj_method="power", proj_dtype="bf16")
        if method in ("adam_mini", "galore_mini"):
            options["block"] = f"heads:{head_dim}" if kind in ("q", "k") else ("tensor" if p.dim() == 1 else "rows")
        groups.setdefault(tuple(sorted(options.items())), {"params": [], **options})["params"].append(p)
    return list(groups.values())


def make_optimizer(method, params, names, rank, head_dim):
    if method == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if method == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    fast = method.endswith("_fast")
    base = method.removesuffix("_fast")
    groups = _groups(params, names, base, rank, head_dim, fast)
    cls = {"galore": gm.GaLoreAdamW, "galore_mini": gm.GaLoreMini, "adam_mini": gm.AdamMini}[base]
    return cls(groups, lr=1e-3)


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _timed_step(opt):
    torch.cuda.synchronize()
    start = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def time_steps(methods, dims, rank, reps, dtype):
    """Each method alternates with fused AdamW in its own pair (a 1B model's states don't all fit at once)."""
    shapes = llama_shapes(**dims)
    names = [n for n, _ in shapes]
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(s, device="cuda", dtype=dtype, generator=gen) * 1e-3 for _, s in shapes]
    head_dim = dims["hidden"] // dims["heads"]
    results = {}
    for method in methods:
        pair = {}
        for name in ("adamw_fused", method):
            params = [nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for _, s in shapes]
            for p, g in zip(params, grads):
                p.grad = g
            pair[name] = make_optimizer(name, params, names, rank, head_dim)
        first = _timed_step(pair[method])
        _timed_step(pair["adamw_fused"])
        times = {name: [] for name in pair}
        for _ in range(reps):
            for name, opt in pair.items():
                times[name].append(_timed_step(opt))
        own, base = statistics.median(times[method]), statistics.median(times["adamw_fused"])
        results[method] = {"first_s": first, "median_step_ms": 1e3 * own, "fused_adamw_ms": 1e3 * base,
                           "ratio_vs_fused_adamw": own / base, "state_bytes": state_bytes(pair[method])}
        del pair
        torch.cuda.empty_cache()
    return results


# -- a minimal LLaMA for the memory measurement ----------------------------------------------------


class Block(nn.Module):
    def __init__(self, hidden, intermediate, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        b, t, h = x.shape
        y = self.norm1(x)
        q, k, v = (proj(y).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        x = x + self.o(attn)
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class MiniLlama(nn.Module):
    def __init__(self, hidden, intermediate, layers, heads, vocab):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, intermediate, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids.view(-1))


def model_groups(model, method, rank, head_dim):
    names, params = zip(*model.named_parameters())
    short = [n.replace("layers.", "l").replace(".weight", "") for n in names]
    return _groups(list(params), short, method.removesuffix("_fast"), rank, head_dim, method.endswith("_fast"))


def peak_memory(method, dims, rank, batch, seq, layerwise):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = MiniLlama(dims["hidden"], dims["intermediate"], dims["layers"], dims["heads"], dims["vocab"])
    model = model.to("cuda", torch.bfloat16)
    head_dim = dims["hidden"] // dims["heads"]
    if method == "adamw_fused":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    else:
        cls = {"galore_mini": gm.GaLoreMini, "galore": gm.GaLoreAdamW, "adam_mini": gm.AdamMini}[
            method.removesuffix("_fast")]
        opt = cls(model_groups(model, method, rank, head_dim), lr=1e-3)
    hooks = []
    if layerwise:
        def update_now(p):
            opt.step_param(p)
            p.grad = None
        hooks = [p.register_post_accumulate_grad_hook(update_now) for p in model.parameters()]
    ids = torch.randint(0, dims["vocab"], (batch, seq), device="cuda")
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(ids)
        loss.backward()
        if not layerwise:
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    result = {"method": method, "layerwise": layerwise, "peak_gib": peak / 2 ** 30,
              "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30,
              "state_gib": state_bytes(opt) / 2 ** 30, "train_step_ms": 1e3 * min(times[1:])}
    for h in hooks:
        h.remove()
    del model, opt
    torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=LLAMA_1B["layers"])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    dims = dict(LLAMA_1B, layers=args.layers)
    print(f"device: {torch.cuda.get_device_name(0)}  torch {torch.__version__}  LLaMA-1B shapes, rank {args.rank}")
    methods = ["adamw_foreach", "adam_mini", "galore", "galore_fast", "galore_mini", "galore_mini_fast"]
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rank": args.rank}
    for dtype in (torch.float32, torch.bfloat16):
        steps = time_steps(methods, dims, args.rank, args.reps, dtype)
        print(f"\nparams {dtype}: optimizer step alone (median of {args.reps}, each beside fused AdamW)")
        print(f"{'method':20s} {'first step':>11s} {'step':>9s} {'fused AdamW':>12s} {'ratio':>7s} {'state GiB':>10s}")
        for method, r in steps.items():
            print(f"{method:20s} {r['first_s']*1e3:9.0f}ms {r['median_step_ms']:7.1f}ms {r['fused_adamw_ms']:10.1f}ms "
                  f"{r['ratio_vs_fused_adamw']:6.2f}x {r['state_bytes']/2**30:10.2f}")
        report[f"step_{str(dtype).replace('torch.', '')}"] = steps
    if not args.skip_memory:
        print("\nfull training step (forward, backward, update), bf16 weights: peak memory")
        rows = []
        for batch in (args.batch, 1):
            for method, layerwise in (("adamw_fused", False), ("galore_mini_fast", False), ("galore_mini_fast", True)):
                r = peak_memory(method, dims, args.rank, batch, args.seq, layerwise)
                r["batch"] = batch
                rows.append(r)
                print(f"batch {batch}x{args.seq} {method:18s} layerwise={str(layerwise):5s} peak {r['peak_gib']:6.2f} GiB"
                      f"  weights {r['weights_gib']:5.2f}  state {r['state_gib']:5.2f}  step {r['train_step_ms']:.0f} ms")
        report["memory"] = rows
    if args.out:
        import os
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
