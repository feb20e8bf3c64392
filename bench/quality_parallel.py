"""Run many `quality_study.py` runs at once, one process per run, and merge their results into one JSON.

The quality study trains tiny models on one thread each, so a machine with many cores finishes a table
of variants × seeds in the time of one run. Each run is a ``VARIANT:LR:SEED`` triple; the rest of the
arguments (``--models``, ``--steps``, ``--batch-size``, ...) are passed to every run unchanged. A run
is started only while at least ``--run-seconds`` remain before ``--deadline``, so a time-boxed machine
returns finished runs rather than half-trained ones; runs already in ``--json`` are skipped.

    PYTHONPATH=src python bench/quality_parallel.py --jobs 14 --json bench/results/quality_variants.json \\
        --runs galore:1e-2:0 galore_mini:1e-2:0 galore_mini_vproj:3e-3:0 -- \\
        --models configs/llama_h128_l4_v1024.json --steps 2000 --seq-len 64 --batch-size 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality_study as Q  # noqa: E402


def parse_run(text: str) -> tuple[str, float, int]:
    try:
        variant, lr, seed = text.split(":")
        run = (variant, float(lr), int(seed))
    except ValueError:
        raise SystemExit(f"--runs: {text!r} is not VARIANT:LR:SEED (e.g. galore_mini:1e-2:0)") from None
    if variant not in Q.VARIANTS:
        raise SystemExit(f"--runs: unknown variant {variant!r}; use one of {', '.join(Q.VARIANTS)}")
    return run


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, study = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, type=parse_run, help="VARIANT:LR:SEED, in priority order")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--json", required=True, help="results file the runs are merged into")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds from now to stop starting runs")
    parser.add_argument("--run-seconds", type=float, default=0.0, help="a run is started only if this much time is left")
    args = parser.parse_args(own)
    settings = Q.parse(["diag", *study])
    started = time.monotonic()
    out = Path(args.json)
    results = Q.load_results(out)
    done = {r.get("key") for r in results["runs"]}
    todo = []
    for model in settings.models:
        size = Q.read_size(model)["name"]
        for variant, lr, seed in args.runs:
            key = Q.run_key(size, variant, lr, seed, settings.steps, settings.batch_size, settings.seq_len, settings.data)
            if key not in done:
                todo.append((model, variant, lr, seed))
    scratch = Path(tempfile.mkdtemp(prefix="quality-parallel-"))
    running: list[tuple[subprocess.Popen, Path, str]] = []
    while todo or running:
        left = args.deadline - (time.monotonic() - started)
        while todo and len(running) < args.jobs and left >= args.run_seconds:
            model, variant, lr, seed = todo.pop(0)
            part = scratch / f"{len(running)}-{time.monotonic_ns()}.json"
            cmd = [sys.executable, str(HERE / "quality_study.py"), "diag", *study, "--models", model,
                   "--variants", variant, "--diag-lr", repr(lr), "--diag-seeds", str(seed), "--json", str(part)]
            label = f"{variant} lr={lr:g} seed={seed}"
            print(f"[{time.strftime('%H:%M:%S')}] start {label}", flush=True)
            running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                            part, label))
        if not running:
            break  # nothing more may start before the deadline
        time.sleep(1.0)
        for entry in list(running):
            proc, part, label = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            err = proc.stderr.read()
            if proc.returncode != 0 or not part.exists():
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {label} (exit {proc.returncode}):\n{err[-2000:]}", flush=True)
                continue
            rows = json.loads(part.read_text())["runs"]
            results = Q.load_results(out)
            results["runs"] += rows
            results["machine"] = json.loads(part.read_text())["machine"]
            Q.save_results(out, results)
            for row in rows:
                print(f"[{time.strftime('%H:%M:%S')}] done {label}: val ppl {row['val_ppl']:.2f} "
                      f"({row['train_seconds']:.0f} s)", flush=True)
    if todo:
        print(f"not started before the deadline: {len(todo)} runs", flush=True)


if __name__ == "__main__":
    main()
