"""GPU benchmarks at LLaMA-1B shapes: optimizer step time and peak memory of a full training step.

1. **Step time**: `bench/step_time.py`'s side-by-side loop on a LLaMA-1B (D=2048, F=5461, 24 layers,
   32 heads, vocab 32000; 1.34B parameters, fp32) with rank 512 and gap 200 (the GaLore paper's 1B
   setting): torch fused/foreach AdamW, the peers that are installed, and our GaLore-mini variants.
2. **Peak memory** of a full training step (forward, backward, update) of the same model, measured
   with ``torch.cuda.max_memory_allocated`` on the second step (state already allocated), for:
   AdamW (fused), GaLore-mini in the ordinary loop, GaLore-mini with layer-wise updates inside
   backward (``galore_mini.optim.layerwise``), and AdamW with layer-wise updates — with bf16
   parameters (pure bf16, as the GaLore paper's memory figures) and with fp32 parameters.
3. A torch.profiler summary of one GaLore-mini step (where the time goes).

    python bench/gpu.py --json bench/results/gpu_llama1b.json     # ~4-6 minutes on one H100
    python bench/gpu.py --smoke                           # tiny shapes; runs on a CPU too
    python bench/run_all.py --render-only                 # puts the GPU section into BENCHMARKS.md

Peers missing on the machine are skipped. If ``bitsandbytes`` is missing, a stub module is put in its
place so that galore-torch and apollo-torch import (their 8-bit classes, which need it, are not used).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import galore_mini as gm  # noqa: E402
from galore_mini.optim.layerwise import layerwise  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32,
                vocab_size=32000)


def bitsandbytes_shim() -> bool:
    """Stub `bitsandbytes` when it is missing, so galore-torch / apollo-torch import. Returns whether stubbed."""
    try:
        import bitsandbytes  # noqa: F401
        return False
    except Exception:  # noqa: BLE001
        pass
    root = types.ModuleType("bitsandbytes")
    optim = types.ModuleType("bitsandbytes.optim")
    optimizer = types.ModuleType("bitsandbytes.optim.optimizer")
    functional = types.ModuleType("bitsandbytes.functional")

    class Optimizer2State(torch.optim.Optimizer):  # only subclassed at import time, never instantiated here
        def __init__(self, *args, **kwargs):
            raise RuntimeError("bitsandbytes is not installed (stub)")

    optimizer.Optimizer2State = Optimizer2State
    root.optim, optim.optimizer, root.functional = optim, optimizer, functional
    sys.modules.update({"bitsandbytes": root, "bitsandbytes.optim": optim,
                        "bitsandbytes.optim.optimizer": optimizer, "bitsandbytes.functional": functional})
    return True


def build_model(shape: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _peak_reset(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _allocated(device) -> float:
    return torch.cuda.memory_allocated() if device == "cuda" else float("nan")


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")


def memory(args) -> list[dict]:
    """Peak memory of a full training step, per optimizer and loop, for bf16 and fp32 parameters."""
    rows = []
    for dtype_name in args.memory_dtypes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        model = build_model(args.shape, dtype, args.device)
        model.config.use_cache = False
        vocab = args.shape["vocab_size"]
        gen = torch.Generator(device=args.device).manual_seed(0)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen, device=args.device)
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        autocast = dtype == torch.float32 and args.device == "cuda"
        modes = [("AdamW (fused)", "full", False), ("GaLore-mini", "galore_mini", False),
                 ("GaLore-mini, layer-wise", "galore_mini", True), ("AdamW (fused), layer-wise", "full", True),
                 ("GaLore (AdamW), layer-wise", "galore", True)]
        for label, method, per_layer in modes:
            model.zero_grad(set_to_none=True)
            _peak_reset(args.device)
            options = dict(fused=True) if method == "full" and args.device == "cuda" else {}
            if method != "full":
                options.update(proj_method="power", proj_dtype=args.proj_dtype)
            opt = gm.create_optimizer(model, method, lr=1e-6, rank=args.rank, update_proj_gap=200, **options)
            handle = layerwise(model, opt) if per_layer else None

            def train_step():
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if handle is None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            try:
                train_step()  # allocates the optimizer state
                _peak_reset(args.device)
                before = _allocated(args.device)
                C.timed(train_step, args.device)
                peak = _peak(args.device)
                # time steps after the peak step: that one follows empty_cache(), so every allocation in it
                # goes to the driver, and a step making more temporaries pays more for it (issue #11)
                seconds = C.median([C.timed(train_step, args.device) for _ in range(args.step_reps)])
                rows.append(dict(params=dtype_name, label=label, method=method, layerwise=per_layer,
                                 peak_bytes=peak, resident_bytes=before, params_bytes=params_bytes,
                                 state_bytes=C.state_bytes(opt), step_s=seconds, step_reps=args.step_reps,
                                 autocast=autocast,
                                 tokens=args.batch * args.seq, error=None))
            except torch.cuda.OutOfMemoryError as exc:
                rows.append(dict(params=dtype_name, label=label, method=method, layerwise=per_layer,
                                 peak_bytes=float("nan"), resident_bytes=float("nan"), params_bytes=params_bytes,
                                 state_bytes=float("nan"), step_s=float("nan"), autocast=autocast,
                                 tokens=args.batch * args.seq, error=f"OOM: {str(exc)[:120]}"))
            finally:
                if handle is not None:
                    handle.remove()
                del opt, handle
                model.zero_grad(set_to_none=True)
            print(f"  memory {dtype_name} {label}: peak {C.fmt_bytes(rows[-1]['peak_bytes'])}", file=sys.stderr,
                  flush=True)
        del model
        _peak_reset(args.device)
    for row in rows:
        base = next((r for r in rows if r["params"] == row["params"] and r["label"] == "AdamW (fused)"), None)
        row["peak_vs_adamw"] = row["peak_bytes"] / base["peak_bytes"] if base else float("nan")
    return rows


def profile_step(model, args, key: str) -> str:
    """torch.profiler table of two steady steps of one of our optimizers."""
    import step_time

    from torch.profiler import ProfilerActivity, profile

    entry = next(e for e in step_time.entries(model, args) if e.key == key)
    opt = entry.build()
    params = [p for p in model.parameters()]
    grads = [torch.randn_like(p).mul_(1e-3) for p in params]

    def step():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    for _ in range(2):
        step()
    C.sync(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        C.sync(args.device)
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48)
    for p in params:
        p.grad = None
    del opt, grads
    return f"{entry.label}, 2 steady steps:\n{table}"


def run(args, save=lambda report: None) -> dict:
    """Memory first (the cheap part), then step times, then the profile; `save(report)` after each."""
    import step_time

    stubbed = bitsandbytes_shim()
    report: dict = dict(kind="gpu", machine=C.machine(), versions=C.versions(), bitsandbytes_stubbed=stubbed,
                        config=dict(shape=args.shape, rank=args.rank, gap=args.gap, batch=args.batch, seq=args.seq,
                                    proj_dtype=args.proj_dtype, device=args.device, smoke=args.smoke))
    if not args.skip_memory:
        report["memory"] = memory(args)
        report["goals"] = goals(report)
        save(report)
    if not args.skip_step:
        model = build_model(args.shape, torch.float32, args.device)
        step_args = step_time.parse(["--layers", str(args.shape["num_hidden_layers"]),
                                     "--dim", str(args.shape["hidden_size"]), "--ffn",
                                     str(args.shape["intermediate_size"]), "--heads",
                                     str(args.shape["num_attention_heads"]), "--rank", str(args.rank), "--gap",
                                     str(args.gap), "--reps", str(args.reps), "--device", args.device,
                                     "--refresh-reps", "2", "--warmup", "2", "--threads", str(args.threads),
                                     "--only", args.only])
        report["step"] = step_time.run(step_args, model=model)
        report["goals"] = goals(report)
        save(report)
        print(step_time.render(report["step"]), file=sys.stderr, flush=True)
        if args.profile:
            try:
                report["profile"] = profile_step(model, step_args, args.profile)
            except Exception as exc:  # noqa: BLE001
                report["profile"] = f"profile failed: {type(exc).__name__}: {exc}"
            print(report["profile"], file=sys.stderr, flush=True)
        del model
        _peak_reset(args.device)
    report["goals"] = goals(report)
    save(report)
    return report


def goals(report: dict) -> list[dict]:
    out = []
    step = report.get("step")
    if step:
        by_key = {r["key"]: r for r in step["results"] if not r["error"]}
        minis = [r for k, r in by_key.items() if k.startswith("galore_mini")]
        if minis and "adamw_fused" in by_key:
            best = min(minis, key=lambda r: r["steady_s"])
            out.append(dict(goal=f"GPU, LLaMA-1B shapes: GaLore-mini step ≤ 0.8× fused AdamW ({best['label']})",
                            value=f"{best['vs_adamw_fused']:.2f}× ({C.fmt_time(best['steady_s'])} vs "
                                  f"{C.fmt_time(by_key['adamw_fused']['steady_s'])})",
                            status="met" if best["vs_adamw_fused"] <= 0.8 else "missed"))
    for row in report.get("memory", []):
        if row["label"] == "GaLore-mini, layer-wise" and row["peak_bytes"] == row["peak_bytes"]:
            out.append(dict(goal=f"GPU, LLaMA-1B full training step peak memory, layer-wise GaLore-mini vs AdamW "
                                 f"({row['params']} params)",
                            value=f"{C.fmt_bytes(row['peak_bytes'])} = {row['peak_vs_adamw']:.2f}× AdamW's",
                            status="measured"))
    return out


def render(report: dict) -> str:
    import step_time

    m = report["machine"]
    cfg = report["config"]
    out = [f"Machine: {m.get('gpu', 'no GPU')} (CUDA {m.get('cuda', '–')}), torch {report['versions'].get('torch')}, "
           f"{m.get('date')}." + (" bitsandbytes stubbed (not installed there)." if report.get("bitsandbytes_stubbed")
                                  else ""), ""]
    if cfg.get("smoke"):
        out += ["**SMOKE RUN — tiny shapes, numbers meaningless.**", ""]
    if report.get("step"):
        out += ["### Optimizer step", "", step_time.render(report["step"])]
    if report.get("memory"):
        header = ["params", "optimizer / loop", "peak (training step)", "× AdamW", "resident before step",
                  "optimizer state", "step time"]
        rows = [[r["params"] + (" (bf16 autocast)" if r["autocast"] else ""), r["label"],
                 r["error"] or C.fmt_bytes(r["peak_bytes"]), C.fmt_ratio(r["peak_vs_adamw"]),
                 C.fmt_bytes(r["resident_bytes"]), C.fmt_bytes(r["state_bytes"]), C.fmt_time(r["step_s"])]
                for r in report["memory"]]
        first = report["memory"][0]
        out += ["### Peak memory of a full training step", "",
                f"LLaMA shape {cfg['shape']}, micro-batch {cfg['batch']}×{cfg['seq']} tokens, rank {cfg['rank']}, "
                f"GaLore projection in {cfg['proj_dtype']} (power refresh), `torch.cuda.max_memory_allocated` over "
                f"the second step (forward + backward + update); step time "
                + (f"the median of the {first['step_reps']} steps after it. " if first.get("step_reps") else
                   "that step itself, timed once right after `torch.cuda.empty_cache()` (so including every "
                   "allocation's trip to the driver). ")
                + "Parameters alone: "
                f"{C.fmt_bytes(first['params_bytes'])} ({first['params']}).", "",
                C.markdown_table(header, rows), ""]
    if report.get("profile"):
        out += ["### Where a GaLore-mini step's time goes", "", "```", report["profile"].rstrip(), "```", ""]
    return "\n".join(out)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--proj-dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--memory-dtypes", nargs="*", default=["bf16", "fp32"])
    parser.add_argument("--step-reps", type=int, default=3,
                        help="training steps timed (median) after the peak-memory step")
    parser.add_argument("--only",
                        default=r"^(adamw|galore_torch|adam_mini|apollo|galore_power|galore_mini_(power|randomized))",
                        help="regex over step_time's optimizer keys; by default ours with exact SVD and "
                             "pytorch-optimizer's GaLore are left out (exact SVDs of 168 matrices to start), "
                             "galore-torch stays as the exact-SVD reference")
    parser.add_argument("--profile", default="galore_mini_power_bf16", help="'' to skip")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.shape = dict(LLAMA_1B)
    if args.smoke:
        args.shape = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=128)
        args.rank, args.reps, args.batch, args.seq, args.threads = 8, 2, 2, 16, 1
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    def save(report):
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    report = run(args, save)
    print(render(report))
    for goal in report["goals"]:
        print(f"{goal['status'].upper():8} {goal['goal']}: {goal['value']}")
    return report


if __name__ == "__main__":
    main()
