"""Shared helpers of the benchmark scripts: machine description, timing, state bytes, the reference model."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

PEER_PACKAGES = ("torch", "galore-mini", "galore-torch", "adam-mini", "apollo-torch", "pytorch-optimizer",
                 "transformers", "numpy")


def versions() -> dict[str, str]:
    found = {}
    for name in PEER_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus visible": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
    }
    try:
        info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            info["git"] = head.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def optional_import(name: str):
    """The module, or None when the package is not installed (benchmarks skip such peers)."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 — a peer that fails to import for any reason is skipped, and said so
        return None


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn, device=None) -> float:
    """Seconds one call of `fn` takes (device synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from `obj` (dicts, lists, and plain objects such as galore-torch's
    projector), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.numel() else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def state_bytes(optimizer) -> int:
    seen: set[int] = set()
    return sum(tensor_bytes(state, seen) for state in optimizer.state.values())


def llama_blocks(layers: int, dim: int, ffn: int, heads: int, vocab: int = 32, dtype=torch.float32,
                 device="cpu", seed: int = 0):
    """A LlamaModel with `layers` blocks and a tiny vocabulary: the parameters are the blocks'."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaModel(config)
    return model.to(dtype)


def fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "–"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def fmt_bytes(n: int | float) -> str:
    if n != n:
        return "–"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_ratio(x: float) -> str:
    return "–" if x != x else f"{x:.2f}×"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"1024x2752x256,2048x5461x512"`` → ``[(1024, 2752, 256), (2048, 5461, 512)]`` (M×N×R)."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def add_shape_arguments(parser, *, layers: int, dim: int, ffn: int, heads: int, rank: int, threads: int) -> None:
    """The LLaMA-block shape, rank and thread options the step benchmarks share (defaults per script)."""
    for name, default in (("layers", layers), ("dim", dim), ("ffn", ffn), ("heads", heads), ("rank", rank),
                          ("threads", threads)):
        parser.add_argument(f"--{name}", type=int, default=default)


def run_and_report(args, run, render) -> dict:
    """Run a benchmark, print its rendered report and, with ``--json PATH``, save the raw report."""
    report = run(args)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report
