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
                rows.append(["warm-started refresh 4096×11008 r=128 (expected: ~0.13 s on 2 cores)",
                             C.fmt_time(r["refresh_s"]), "measured"])
            if r["method"] == "svd":
                rows.append(["exact SVD 4096×11008 fp32 (expected: ~34 s on 2 cores)", C.fmt_time(r["refresh_s"]),
                             "measured"])
    if quality:
        ref = quality["results"][0]
        fast = [r for r in quality["results"] if r["method"] == "galore_mini" and r is not ref]
        if fast:
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
  with exact SVD) varied up to 2× between runs (e.g. the exact 4096×11008 SVD took 34 s to 76 s).
* "bf16 proj" keeps the projector in bf16 and runs the projection products in bf16 (fp32 moments and weights);
  on this CPU (AVX512-BF16) a bf16 product is ~5× faster than fp32, which is what brings GaLore-mini under
  galore-torch. In fp32, GaLore's two rank-r products per weight (4·r·params FLOPs per step) are the floor, the
  same for every GaLore implementation.
* galore-torch's GaLoreAdamW, AdamW and Adam-mini are also matched in `tests/` (parity to fp32 round-off)."""

# Results whose run recorded no commit (run outside a git checkout): the commit their JSON was committed with.
COMMITTED_WITH = {("gpu_llama1b", "2026-11-24 11:33 UTC"): "3083d9d (the run recorded no commit; its results "
                                                           "were committed with this code)"}

QUESTIONS = """\
* [At a glance: the targets](#at-a-glance-the-targets)
* [How fast is an optimizer step?](#how-fast-is-an-optimizer-step) — against torch's AdamW and the peer packages,
  on the CPU; the host cost of a step; what a whole training step dispatches
* [What does the subspace refresh cost?](#what-does-the-subspace-refresh-cost)
* [Does the fast refresh cost quality?](#does-the-fast-refresh-cost-quality)
* [What does FSDP2 cost?](#what-does-fsdp2-cost)
* [Memory: the estimator against measurement](#memory-the-estimator-against-measurement)
* [GPU figures](#gpu-figures)
* [Notes](#notes)"""

MEMORY = """\
The optimizer-state figures in the tables above and in RESULTS.md are measured on live optimizers. The memory
estimator (`galore-mini memory`, `galore_mini.memory.estimate`) builds the model and the optimizer on the meta
device and counts the state each optimizer declares; it is checked against real allocations by tests, not by a
benchmark: `tests/test_memory.py` requires estimate == measured to the byte, per state key, for every method on
`tiny` (fp32 and bf16 weights) and `llama_20m` (bf16), and the per-rank view (`--world-size N`) rank by rank
against real FSDP2 runs at 2 and 3 ranks; `tests/test_memory_finetune.py` does the same for the fine-tuning view.
The same check from the command line, in one process, on any model that fits (exit code 1 on any difference):

```sh
galore-mini memory --model llama_20m --methods all --dtype fp32 --measure
```

What is counted, the formulas, LLaMA-7B's figures and the per-rank view under FSDP2:
[docs/memory.md](docs/memory.md). The GPU's peak memory of a whole training step (weights, gradients, state and
activations), measured with `torch.cuda.max_memory_allocated`: [GPU figures](#gpu-figures)."""

FSDP_SCALING_READING = (
    "Reading: the per-rank state falls as 1/ranks for Adam-mini and close to it for GaLore and GaLore-mini (their "
    "right projectors, left projections' moments and per-head `v` are replicated). The times here are not a speed "
    "measurement: the ranks share 2 cores with other jobs (see the load average), so 2 and 4 ranks run interleaved "
    "on the same cores. The refresh step runs every weight's refresh side by side (one all-reduce and one "
    "all-gather per round for all weights); the column 'one weight at a time' runs the refreshes one after "
    "another (2-5 collectives per weight), measured in the same run. Communication per step and refresh: "
    "`docs/distributed.md`.")

BATCHING_READING = (
    "Why `refresh.BATCH_REFRESH_ON_CPU` is off: the exact SVD gains nothing from batching on the CPU; the power "
    "iteration may (read the speed-up column; not changed on one loaded run). On a GPU one process batches "
    "same-shaped refreshes into one batched matmul.")

QUALITY_READING = (
    "One seed of a short run on a language whose entropy floor is known. The exact-SVD path keeps SVD's arbitrary "
    "signs (as galore-torch does) while the fast paths align each new basis with the previous one, which may be why "
    "they come out ahead. On real text, over four seeds of the pretraining demo, neither fast path is measurably "
    "worse than the exact SVD: [RESULTS.md](RESULTS.md#projector-refresh-exact-svd-power-iteration-bf16).")

GPU_NOTE = (
    "These GPU figures come from the code of commit 3083d9d, which had no multi-tensor step: GaLore-mini's step "
    "then issued 4,328 device operations at LLaMA-1B's parameter count (`bench/launches.py` on commit 6b14a61) "
    "against 1,615 now (see [the host cost](#the-host-cost-of-a-step-at-llama-1bs-parameter-count)); that step "
    "was most likely bound by the host issuing them. Not yet re-measured: run `bench/gpu.py` on a GPU to update "
    "this section.")


def _provenance(report: dict, name: str, command: str, note: str = "") -> str:
    """One line: when, on what, at which commit, and the command that reproduces the section's table."""
    m, versions = report["machine"], report.get("versions") or {}
    code = m.get("git") or COMMITTED_WITH.get((name, m.get("date")), "not recorded")
    where = (f"{m['gpu']} (CUDA {m.get('cuda', '?')})" if m.get("gpu") else
             f"{m.get('cpu', '?')}, {m.get('cpus visible', '?')} cores visible, {m.get('torch threads', '?')} "
             "torch threads")
    parts = [f"Measured {m.get('date')}", f"on {where}" + (f", torch {versions['torch']}" if versions.get("torch")
                                                              else ""),
             f"load average {m.get('load average', '?')}", f"code at git {code}"]
    return "*" + "; ".join(parts) + f".* Command: `{command}`" + (f" ({note})" if note else "")


def _section(title: str, report: dict, name: str, command: str, body: list[str], note: str = "") -> list[str]:
    """A titled section: its provenance line, then its body (paragraphs and tables)."""
    return [title, "", _provenance(report, name, command, note=note), ""] + [part for b in body for part in (b, "")]


def _script(name: str, smoke: bool, threads: int | None, prefix: str = ".venv/bin/python") -> str:
    parts = [prefix, f"bench/{name}.py"] + (["--threads", str(threads)] if threads else []) + \
        (["--smoke"] if smoke else []) + ["--json", f"bench/results/{name}.json"]
    return " ".join(parts)


def _threads(report: dict) -> int:
    # the CPU scripts run by run_all take --threads; where the config did not record it, the torch threads did
    return int(report["config"].get("threads") or report["machine"].get("torch threads", 2))


def render(results: Path, commands: list[str]) -> str:
    step, refresh, quality, gpu = (_load(results, n) for n in ("step_time", "refresh", "quality", "gpu_llama1b"))
    import quality as quality_mod
    import refresh as refresh_mod
    import step_time

    first = step or refresh or quality
    smoke = bool(first and first["config"].get("smoke"))
    out = ["# Benchmarks", "",
           "How fast galore-mini's optimizers are and what their refresh, sharding and memory cost, measured side by "
           "side with torch's AdamW and the peer packages (galore-torch, adam-mini, apollo-torch, "
           "pytorch-optimizer), in one process, alternating between optimizers so that machine noise falls on all "
           "of them alike. Benchmarks are not tests. Every section states when and where it was measured, at which "
           "commit, and the command that reproduces it. Training quality (perplexity, fine-tuning accuracy) is in "
           "[RESULTS.md](RESULTS.md).", "",
           "This page is generated by `bench/run_all.py` from the JSON files in `bench/results/`:", "", "```sh"]
    out += commands + ["```", ""]
    if smoke:
        out += ["**SMOKE RUN — tiny shapes, numbers meaningless.**", ""]
    out += [QUESTIONS, ""]
    out += ["## At a glance: the targets", "", C.markdown_table(["target", "measured", "status"],
                                                               _goal_rows(step, refresh, quality, gpu)), ""]

    out += ["## How fast is an optimizer step?", ""]
    if step:
        out += _section("### On the CPU, against torch's AdamW and the peers", step, "step_time",
                        _script("step_time", smoke, _threads(step)), [step_time.render(step)])
    launches = _load(results, "launches")
    if launches:
        import launches as launches_mod

        out += _section("### The host cost of a step at LLaMA-1B's parameter count", launches, "launches",
                        _script("launches", smoke, None),
                        [launches_mod.__doc__.split("\n\n")[1].replace("\n", " "), launches_mod.render(launches)])
    ops = _load(results, "train_step_ops")
    if ops:
        import train_step_ops

        out += _section("### A whole training step: operations and bytes (CPU)", ops, "train_step_ops",
                        _script("train_step_ops", smoke, None, "PYTHONPATH=src .venv/bin/python"),
                        [train_step_ops.__doc__.split("\n\n")[1].replace("\n", " "),
                         train_step_ops.render(ops) + train_step_ops.FINDINGS],
                        note="~5 min on 2 shared cores; not run by `run_all.py`")
    out += ["On a GPU: [GPU figures](#gpu-figures).", ""]

    out += ["## What does the subspace refresh cost?", ""]
    if refresh:
        out += _section("### One weight's refresh, by method", refresh, "refresh",
                        _script("refresh", smoke, _threads(refresh)), [refresh_mod.render(refresh)])
    batching = _load(results, "refresh_batching")
    if batching:
        import refresh_batching

        out += _section("### Batched refreshes on the CPU", batching, "refresh_batching",
                        _script("refresh_batching", smoke, None, "PYTHONPATH=src python3"),
                        [refresh_batching.render(batching), BATCHING_READING], note="not run by `run_all.py`")
    out += ["The refresh cost amortised over a whole step, per optimizer: the `amortised refresh` column of "
            "[the step-time table](#on-the-cpu-against-torchs-adamw-and-the-peers).", ""]

    if quality:
        out += _section("## Does the fast refresh cost quality?", quality, "quality",
                        _script("quality", smoke, _threads(quality)), [quality_mod.render(quality), QUALITY_READING])

    scaling = _load(results, "fsdp_scaling")
    world1 = {device: _load(results, f"fsdp_world1_{device}") for device in ("cuda", "cpu")}
    if scaling or any(world1.values()):
        out += ["## What does FSDP2 cost?", ""]
    for device, report in world1.items():
        if report:
            import fsdp_world1

            out += _section(f"### At world size 1 ({device}): sharded against plain", report, f"fsdp_world1_{device}",
                            f"PYTHONPATH=src python3 bench/fsdp_world1.py --device {device} --json "
                            f"bench/results/fsdp_world1_{device}.json",
                            [fsdp_world1.render(report), fsdp_world1.READING[device]],
                            note="a process group of one; not run by `run_all.py`")
    if scaling:
        import fsdp_scaling

        out += _section("### At 1, 2 and 4 ranks (CPU)", scaling, "fsdp_scaling",
                        "PYTHONPATH=src python3 bench/fsdp_scaling.py --json bench/results/fsdp_scaling.json",
                        [fsdp_scaling.render(scaling), FSDP_SCALING_READING],
                        note="spawns one process per rank; not run by `run_all.py`")

    out += ["## Memory: the estimator against measurement", "", MEMORY, ""]

    if gpu:
        import gpu as gpu_mod

        out += _section("## GPU figures", gpu, "gpu_llama1b",
                        "PYTHONPATH=src python3 bench/gpu.py --json bench/results/gpu_llama1b.json",
                        [gpu_mod.render(gpu), GPU_NOTE], note="on a CUDA machine, ~4-6 minutes on one H100")
    else:
        out += ["## GPU figures", "",
                "Not measured here: run `bench/gpu.py` on a GPU, then `bench/run_all.py --render-only`.", ""]
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
    smoke = " --smoke" if args.smoke else ""
    commands = [f".venv/bin/python bench/run_all.py{smoke}                   # runs {', '.join(SCRIPTS)}, renders "
                "this page (= make bench)",
                f".venv/bin/python bench/run_all.py{smoke} --only step_time  # re-runs one; the others are read from "
                "bench/results/",
                ".venv/bin/python bench/run_all.py --render-only       # re-renders only (after a script run alone, "
                "e.g. bench/gpu.py on a GPU)"]
    Path(args.out).write_text(render(results, commands))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
