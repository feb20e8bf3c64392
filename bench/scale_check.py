"""Scale check on a GPU: AdamW, GaLore and GaLore-mini (paper's and recommended setting) on ``llama_60m``.

At the widths a CPU can train (h64–h256) the projected methods pay more for their rank than at the paper's
sizes, so the ranking there is a weak guide to the ranking at 60 M parameters and up. This script trains
``llama_60m`` (hidden 512, 8 layers) on the default corpus, in bf16 autocast on one GPU, once per method
through the harness (``galore-mini pretrain``: same data, tokenizer, initial weights, token budget and
schedule for every method), and writes the figures to ``bench/results/scale_check.json``; ``--render``
prints the markdown table that RESULTS.md carries.

    PYTHONPATH=src python bench/scale_check.py --steps 1000            # about ten minutes on one H200
    PYTHONPATH=src python bench/scale_check.py --render

Each method runs at its registry default learning rate unless ``--lr METHOD=LR`` says otherwise; other
flags (``--vocab-size``, ``--cache-dir`` …) go to ``galore-mini pretrain`` unchanged;
``galore_mini_vproj`` is GaLore-mini with ``v_source="projected"``, ``galore_mini_io`` GaLore-mini with
element-wise ``v`` on the embedding and output layers (``embedding_block="elementwise"``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

DEFAULT_JSON = HERE / "results" / "scale_check.json"
#: run name -> (registry method, extra optimizer options)
RUNS = {
    "full": ("full", ""),
    "galore": ("galore", ""),
    "galore_mini": ("galore_mini", ""),
    "galore_mini_vproj": ("galore_mini", "v_source=projected"),
    "galore_mini_io": ("galore_mini", "embedding_block=elementwise"),
}


def train(name: str, args, out: Path, extra: list[str]) -> dict:
    method, options = RUNS[name]
    folder = out / name
    cmd = [sys.executable, "-m", "galore_mini", "pretrain", "--method", method, "--model", args.model,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--device", args.device, "--eval-every", "0", "--save-every", "0", "--seed", str(args.seed),
           "--out", str(folder), "--overwrite", "--no-progress"]
    if args.bf16:
        cmd.append("--bf16")
    if args.data:
        cmd += ["--data", args.data]
    if options:
        cmd += ["--optimizer-options", options]
    lr = dict(item.split("=") for item in args.lr).get(name)
    if lr:
        cmd += ["--lr", lr]
    cmd += extra
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(run=name, method=method, error=(proc.stderr or proc.stdout)[-1500:], exit=proc.returncode)
    final = json.loads((folder / "final.json").read_text())
    return {**final, "run": name, "options": options, "wall_s": round(time.perf_counter() - started, 1)}


def render(results: dict) -> str:
    m = results["machine"]
    cfg = results["config"]
    lines = [f"`{cfg['model']}`, {cfg['steps']} steps of {cfg['batch_size']} × {cfg['seq_len']} tokens "
             f"({cfg['steps'] * cfg['batch_size'] * cfg['seq_len'] / 1e6:.1f} M tokens), "
             f"{'bf16 autocast' if cfg['bf16'] else 'fp32'}, seed {cfg['seed']}; {m.get('gpu', m['cpu'])}, "
             f"{m['date']}, torch {results['versions']['torch']}.\n",
             "| method | lr | val ppl | optimizer state | tokens/s |", "|---|---:|---:|---:|---:|"]
    for row in results["results"]:
        if "error" in row:
            lines.append(f"| {row['run']} | – | failed (exit {row['exit']}) | – | – |")
            continue
        lines.append(f"| {row['run']} | {row['lr']:g} | {row['val_ppl']:.2f} | "
                     f"{row['optimizer_bytes'] / 2**20:.1f} MiB | {row['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--data", help="text file or folder (default: the harness's default corpus)")
    parser.add_argument("--lr", nargs="*", default=[], help="RUN=LR overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/scale_check", help="run folders")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--render", action="store_true", help="print the table from --json and exit")
    args, extra = parser.parse_known_args(argv)  # the rest goes to `galore-mini pretrain` as it is
    path = Path(args.json)
    if args.render:
        print(render(json.loads(path.read_text())))
        return
    results = dict(kind="scale_check", machine=C.machine(), versions=C.versions(),
                   config=dict(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               bf16=args.bf16, seed=args.seed, data=args.data, device=args.device,
                               pretrain_flags=extra), results=[])
    for name in args.runs:
        row = train(name, args, Path(args.out), extra)
        print(json.dumps({k: row.get(k) for k in ("run", "val_ppl", "wall_s", "error")}), flush=True)
        results["results"].append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
