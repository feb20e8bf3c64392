"""Several methods pretrained one after another on the same data, tokenizer, initial weights and token
budget (``galore-mini compare``), and the comparison's files: ``results.json``, ``results.md`` (the
paper's Table 2 layout), ``loss.png`` and ``memory.png``.

Every method's settings, model and optimizer are checked before the first method trains (the
optimizers are built over meta-device models), and the data is prepared once and shared.

Example::

    from galore_mini.train.compare import compare
    from galore_mini.train.config import make_config

    configs = {m: make_config(method=m, model="tiny", steps=50, out=f"runs/cmp/{m}") for m in ("full", "galore_mini")}
    results, seconds = compare(configs, "runs/cmp")
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from galore_mini import methods as registry
from galore_mini.errors import UsageError
from galore_mini.train.config import TrainConfig
from galore_mini.train.data import prepare_data
from galore_mini.train.loop import TrainingDiverged, check_buildable, read_metrics, train
from galore_mini.train.plots import label, plot_losses, plot_memory
from galore_mini.train.runs import RunFolder


def parse_lr(text: str | None, methods: list[str]) -> dict[str, float]:
    """``"3e-3"`` → that LR for every method; ``"full=1e-3,galore=1e-2"`` → per method."""
    if text is None:
        return {}
    try:
        if "=" not in text:
            return dict.fromkeys(methods, float(text))
        out = {}
        for item in text.split(","):
            method, _, value = item.partition("=")
            if method.strip() not in methods:
                raise UsageError(f"--lr: {method.strip()!r} is not among --methods ({', '.join(methods)})")
            out[method.strip()] = float(value)
        return out
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--lr={text!r}: give a number or METHOD=LR pairs separated by commas") from None


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods: name at least one method")
    unknown = [m for m in methods if m not in registry.REGISTRY]
    if unknown:
        raise UsageError(f"--methods: unknown method {unknown[0]!r}; use some of {', '.join(registry.METHODS)}")
    if len(set(methods)) != len(methods):
        raise UsageError("--methods: a method is named twice")
    return methods


def method_settings(settings: dict[str, Any], method: str) -> dict[str, Any]:
    """Shared settings for one method; optimizer options reach only the methods that have an optimizer of ours."""
    out = dict(settings, method=method)
    if registry.get(method).kind == "adapter":
        out.pop("optimizer_options", None)
    return out


def compare(configs: dict[str, TrainConfig], out: str, argv: list[str] | None = None
            ) -> tuple[list[dict[str, Any]], float]:
    """Train every method of `configs` (in order) over data prepared once; write the files into `out`.

    Returns (one result per method, wall seconds). A method that diverges gets a result marked
    ``diverged`` and the others still train.
    """
    methods = list(configs)
    base = configs[methods[0]]
    check_compare_out(out, configs)
    for config in configs.values():  # every method's model and optimizer, before the first one trains
        check_buildable(config)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(base.data, seq_len=base.seq_len, vocab_size=base.vocab_size, tokenizer=base.tokenizer,
                        val_fraction=base.val_fraction, val_tokens=base.val_tokens, cache_dir=base.cache_dir,
                        log=lambda m: print(m, file=sys.stderr))
    results, curves = [], {}
    for method in methods:
        config = configs[method]
        print(f"== {method} ==", file=sys.stderr, flush=True)
        try:
            result = train(config, data)
        except TrainingDiverged as exc:
            print(f"{method}: {exc}", file=sys.stderr)
            result = {"method": method, "val_loss": math.nan, "val_ppl": math.inf, "steps": config.steps,
                      "tokens": 0, "tokens_per_s": 0.0, "weights_bytes": 0, "optimizer_bytes": 0,
                      "lr": config.resolved_lr(), "diverged": True}
        results.append(result)
        curves[method] = read_metrics(os.path.join(config.out, "metrics.jsonl"))
    wall = time.perf_counter() - started
    write_results(out, results, curves, base, data.describe(), wall, argv or [])
    return results, wall


def check_compare_out(out: str, configs: dict[str, Any]) -> None:
    """Refuse, before any data is read, an --out that is a file or holds runs that would be clobbered."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out={out!r} is a file, not a folder; name a folder for the comparison")
    held = [m for m, c in configs.items() if not (c.resume or c.overwrite) and RunFolder(c.out).run_files()]
    if held:
        raise UsageError(f"--out={out!r} already holds runs of {', '.join(held)}; add --resume to continue them "
                         "(finished ones are only scored again), --overwrite to start again, or choose another --out")


def format_table(results: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table, like the paper's Table 2 (perplexity, memory, rank)."""
    mib = 2 ** 20
    full = next((r for r in results if r["method"] == "full" and math.isfinite(r.get("val_ppl", math.inf))), None)
    rows = ["| method | val ppl | vs AdamW | val loss | rank | lr | weights (MiB) | optimizer state (MiB) "
            "| weights + optimizer (MiB) | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ppl = r.get("val_ppl", math.inf)
        versus = f"{100 * (ppl / full['val_ppl'] - 1):+.1f}%" if full and math.isfinite(ppl) else "–"
        rows.append(
            f"| {label(r['method'])} | {ppl:.2f} | {versus} | {r.get('val_loss', math.nan):.4f} | "
            f"{r.get('rank') or '–'} | {r.get('lr', 0):g} | {r['weights_bytes'] / mib:.2f} | "
            f"{r['optimizer_bytes'] / mib:.2f} | {(r['weights_bytes'] + r['optimizer_bytes']) / mib:.2f} | "
            f"{r.get('tokens_per_s', 0):,.0f} |")
    return "\n".join(rows)


def write_results(out: str, results: list[dict[str, Any]], curves: dict[str, list], config, data_description: str,
                  wall_s: float, argv: list[str]) -> None:
    """results.json, results.md, loss.png and memory.png in `out`."""
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    tokens = max((r.get("tokens", 0) for r in results), default=0)
    header = [
        f"# Pretraining comparison: {config.model}, {config.steps} steps, {tokens:,} tokens per method",
        "",
        f"- command: `galore-mini {' '.join(argv[1:]) if argv and argv[0].endswith('galore-mini') else 'compare'}`",
        f"- {data_description}",
        f"- batch {config.batch_size} × grad-accum {config.grad_accum} rows of {config.seq_len} tokens, seed "
        f"{config.seed}, cosine schedule with {config.resolved_warmup()} warm-up steps to "
        f"{config.min_lr_ratio}× the peak, clip {config.grad_clip}, GaLore scale {config.scale}, "
        f"T {config.update_proj_gap}",
        "- memory measured on the live model and optimizer after training (fp32)",
        f"- wall time {wall_s / 60:.1f} min",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n" + format_table(results) + "\n")
    finite = [r for r in results if r.get("weights_bytes")]
    model = os.path.basename(config.model)
    plot_losses(curves, os.path.join(out, "loss.png"), title=f"{model}: training (thin) and validation (dots) loss")
    plot_memory(finite, os.path.join(out, "memory.png"), title=f"{model}: weights + optimizer state")
