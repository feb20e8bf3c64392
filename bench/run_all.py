"""Run the benchmarks and regenerate BENCHMARKS.md.

    .venv/bin/python bench/run_all.py                  # CPU benchmarks (~8 minutes on 2 cores) → BENCHMARKS.md
    .venv/bin/python bench/run_all.py --only step_time # re-run one; the others are read from bench/results/
    .venv/bin/python bench/run_all.py --smoke --out /tmp/B.md   # tiny shapes: checks the pipeline

Each script writes its JSON under ``bench/results/`` (``--results``); BENCHMARKS.md is rendered from
those files, so a result measured elsewhere (``bench/gpu.py`` on a GPU machine writes
``bench/results/gpu_llama1b.json``) is included when present. Benchmarks are not tests: numbers on a shared
machine are noisy; every ratio is measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BENCH = Path(__file__).resolve().parent
SCRIPTS = ("step_time", "launches", "refresh", "quality")


def _command(name: str, smoke: bool, results: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(BENCH / f"{name}.py"), "--json", str(results / f"{name}.json")] + \
        (["--smoke"] if smoke else []) + extra


def run_script(name: str, smoke: bool, results: Path, extra: list[str], in_process: bool) -> None:
    if in_process:
        import importlib

        module = importlib.import_module(name)
        module.main(["--json", str(results / f"{name}.json")] + (["--smoke"] if smoke else []) + extra)
        return
    cmd = _command(name, smoke, results, extra)
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=C.ROOT)


def _extra(name: str, threads: int) -> list[str]:
    # the host-cost benchmark is single-threaded by design: it measures dispatch, not arithmetic
    return [] if name == "launches" else ["--threads", str(threads)]


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _goal_rows(step: dict | None, refresh: dict | None, quality: dict | None, gpu: dict | None) -> list[list[str]]:
    import step_time

    rows = []
    if step:
        for goal, value, ok in step_time.goals(step):
            rows.append([goal, value, "met" if ok else "missed"])
    if refresh:
        big = [r for r in refresh["results"] if r["shape"] == "4096×11008"]
        for r in big:
            if r["method"] == "power" and r["dtype"] == "fp32":
                rows.append(["warm-started refresh 4096×11008 r=128 (issue: 0.13 s)", C.fmt_time(r["refresh_s"]),
                             "measured"])
            if r["method"] == "svd":
                rows.append(["exact SVD 4096×11008 fp32 (issue: 34 s)", C.fmt_time(r["refresh_s"]), "measured"])
    if quality:
        ref = quality["results"][0]
        worst = max((r for r in quality["results"] if r["method"] == "galore_mini" and r is not ref),
                    key=lambda r: abs(r["ppl_vs_svd_pct"]), default=None)
        if worst:
            fast = [r for r in quality["results"] if r["method"] == "galore_mini" and r is not ref]
            spread = ", ".join(f"{r['ppl_vs_svd_pct']:+.2f}%" for r in fast)
            worse = max(r["ppl_vs_svd_pct"] for r in fast)
            rows.append(["quality: fast refresh paths no more than 1% worse (perplexity) than exact-SVD fp32",
                         f"{spread} (power/randomized × fp32/bf16)",
                         "met" if worse <= 1 else "missed"])
    if gpu:
        for goal in gpu.get("goals", []):
            rows.append([goal["goal"], goal["value"], goal["status"]])
    else:
        rows.append(["H100: LLaMA-1B shapes GaLore-mini step ≤ 0.8× fused AdamW", "not measured here",
                     "run bench/gpu.py on a GPU"])
    return rows


NOTES = """\
* The CPU is shared (2 cores, other jobs running: see each section's load average). Steady steps are medians of
  alternating repetitions and hold up between runs within ~10%; single-shot numbers (the exact SVDs, a first step
  with exact SVD) varied up to 2× between runs of this page (e.g. the exact 4096×11008 SVD: 34 s in the issue,
  35–76 s here).
* "bf16 proj" keeps the projector in bf16 and runs the projection products in bf16 (fp32 moments and weights);
  on this CPU (AVX512-BF16) a bf16 product is ~5× faster than fp32, which is what brings GaLore-mini under
  galore-torch. In fp32, GaLore's two rank-r products per weight (4·r·params FLOPs per step) are the floor, the
  same for every GaLore implementation.
* The quality comparison is one seed of a short run; the exact-SVD path keeps SVD's arbitrary signs (as
  galore-torch does) while the fast paths align each new basis with the previous one, which may be why they
  come out ahead.
* galore-torch's GaLoreAdamW, AdamW and Adam-mini are also matched in `tests/` (parity to fp32 round-off).
* The GPU section was measured on an H100 before the multi-tensor step (`galore_mini/optim/multi_tensor.py`)
  existed, when GaLore-mini's step issued 4,328 device operations at LLaMA-1B's parameter count (`bench/launches.py`
  on commit 6b14a61; now 1,615, see "Host cost"); it is not yet re-measured. Re-run `bench/gpu.py` on a GPU to update it."""


def _when(report: dict) -> str:
    m = report["machine"]
    return f"*Measured {m.get('date')}, load average {m.get('load average', '?')}, git {m.get('git', '?')}.*"


def render(results: Path, commands: list[str]) -> str:
    step, refresh, quality, gpu = (_load(results, n) for n in ("step_time", "refresh", "quality", "gpu_llama1b"))
    import quality as quality_mod
    import refresh as refresh_mod
    import step_time

    first = step or refresh or quality
    out = ["# Benchmarks", "",
           "Generated by `bench/run_all.py` from the JSON files in `bench/results/`; re-run it to regenerate this "
           "page. Benchmarks are not tests: they measure speed and memory side by side with the peer packages, "
           "in one process, alternating between optimizers so machine noise falls on all of them alike.", ""]
    if first and first["config"].get("smoke"):
        out += ["**SMOKE RUN — tiny shapes, numbers meaningless.**", ""]
    if first:
        out += ["## Machine and versions", ""]
        out += [f"* {k}: {v}" for k, v in first["machine"].items()]
        out += [f"* {k}: {v}" for k, v in first["versions"].items()]
        out += [""]
    out += ["## Commands", "", "```sh"] + commands + ["```", ""]
    out += ["## Goals (issue #5)", "", C.markdown_table(["goal", "measured", "status"],
                                                        _goal_rows(step, refresh, quality, gpu)), ""]
    if step:
        out += ["## Step time and optimizer state (CPU)", "", _when(step), "", step_time.render(step), ""]
    launches = _load(results, "launches")
    if launches:
        import launches as launches_mod

        out += ["## Host cost of a step at LLaMA-1B's parameter count", "", _when(launches), "",
                launches_mod.__doc__.split("\n\n")[1].replace("\n", " "), "", launches_mod.render(launches), ""]
    ops = _load(results, "train_step_ops")
    if ops:
        import train_step_ops

        out += ["## A full training step: operations and bytes (CPU, issue #11)", "", _when(ops), "",
                train_step_ops.__doc__.split("\n\n")[1].replace("\n", " "), "", train_step_ops.render(ops),
                train_step_ops.FINDINGS, ""]
    if refresh:
        out += ["## Subspace refresh", "", _when(refresh), "", refresh_mod.render(refresh), ""]
    if quality:
        out += ["## Quality of the fast refresh paths", "", _when(quality), "", quality_mod.render(quality), ""]
    if gpu:
        import gpu as gpu_mod

        out += ["## GPU", "", gpu_mod.render(gpu), ""]
    scaling = _load(results, "fsdp_scaling")
    if scaling:
        import fsdp_scaling

        out += ["## FSDP2 on CPU: 1, 2 and 4 ranks", "", fsdp_scaling.render(scaling), "",
                "Reading: the per-rank state falls as 1/ranks for Adam-mini and close to it for GaLore and "
                "GaLore-mini (their right projectors, left projections' moments and per-head `v` are "
                "replicated). The times here are not a speed measurement: the ranks share 2 cores with other "
                "jobs (see the load average), so 2 and 4 ranks run interleaved on the same cores. The refresh "
                "step runs every weight's refresh side by side (one all-reduce and one all-gather per round for "
                "all weights); the column 'one weight at a time' is the earlier schedule (2-5 collectives per "
                "weight), measured in the same run. Command: `PYTHONPATH=src python3 bench/fsdp_scaling.py` (not part of the commands "
                "above: it spawns processes). Communication per step and refresh: `docs/distributed.md`.", ""]
    for device in ("cuda", "cpu"):
        world1 = _load(results, f"fsdp_world1_{device}")
        if world1:
            import fsdp_world1

            out += [f"## FSDP2 at world size 1 ({device})", "", fsdp_world1.render(world1), "",
                    fsdp_world1.READING[device] + f" Command: `PYTHONPATH=src python3 bench/fsdp_world1.py --device {device} "
                    f"--json bench/results/fsdp_world1_{device}.json` (not part of the commands above).", ""]
    batching = _load(results, "refresh_batching")
    if batching:
        import refresh_batching

        out += ["## Batched refresh on the CPU", "", _when(batching), "", refresh_batching.render(batching), "",
                "Why `core.BATCH_REFRESH_ON_CPU` is off: the exact SVD gains nothing from batching on the CPU; the "
                "power iteration may (read the speed-up column of the run above; not changed on one loaded run). "
                "Command: `PYTHONPATH=src python3 bench/refresh_batching.py --json bench/results/refresh_batching.json` "
                "(not part of the commands above).", ""]
    out += ["## Notes", "", NOTES, ""]
    kernels = _load(results, "update_kernels")
    if kernels:
        import update_kernels

        out += ["## Candidate update formulations (input for the core)", "", update_kernels.render(kernels), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (pipeline check)")
    parser.add_argument("--only", nargs="*", choices=SCRIPTS, help="run only these; render from all results")
    parser.add_argument("--render-only", action="store_true", help="run nothing, re-render from bench/results/")
    parser.add_argument("--results", default=str(BENCH / "results"))
    parser.add_argument("--out", default=str(C.ROOT / "BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-process", action="store_true", help="run the scripts in this process (tests)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    names = [] if args.render_only else (args.only or list(SCRIPTS))
    for name in names:
        run_script(name, args.smoke, results, _extra(name, args.threads), args.in_process)
    smoke = ["--smoke"] if args.smoke else []
    commands = [" ".join([".venv/bin/python", f"bench/{n}.py"] + smoke + _extra(n, args.threads)) for n in SCRIPTS]
    commands.append(" ".join([".venv/bin/python", "bench/run_all.py"] + smoke) + "   # runs the ones above, "
                    "renders this file")
    commands.append(".venv/bin/python bench/train_step_ops.py --json bench/results/train_step_ops.json   # not run by "
                    "run_all (~5 min on 2 shared cores)")
    commands.append("PYTHONPATH=src python3 bench/gpu.py --json bench/results/gpu_llama1b.json   # on a CUDA "
                    "machine; then .venv/bin/python bench/run_all.py --render-only")
    Path(args.out).write_text(render(results, commands))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
