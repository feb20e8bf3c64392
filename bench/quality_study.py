"""Which optimizer when: learning-rate sweeps, seeds and GaLore-mini's gap on models whose projected matrices dominate.

Every run trains one LLaMA from a JSON config on the default corpus (the Python docs; a BPE with the
config's ``vocab_size`` trained on them) with the harness's recipe — seed → same init and batch order
for every method, linear warm-up over 10% of the steps, cosine to 10% of the peak, gradient clipping
at 1.0, no weight decay, rank = hidden/4, refresh gap T = 200 — and scores the fixed validation rows
at the end (token-mean cross-entropy, ``ppl = exp``). The loop is the harness's (`galore_mini.train`)
written out here so that a run can use optimizers the CLI cannot build: AdamW with the GaLore family's
two learning rates, and GaLore-mini variants for the gap diagnosis (see `VARIANTS`). One difference:
the global RNG is re-seeded after the model is built (the harness seeds once before), so the random
start of GaLore-mini's power-iteration refresh draws other numbers than in a harness run.

Phases (each a list of runs; results are appended to ``--json`` as they finish and a run already
there is skipped, so an interrupted study resumes where it stopped):

* ``sweep``  — every method of ``--methods`` at every lr of its grid (``--lrs`` or `LR_GRID`), seed 0;
* ``seeds``  — every method at its best swept lr, seeds ``--seeds``;
* ``diag``   — GaLore-mini variants at GaLore-mini's best lr (one table per hypothesis), seed 0;
* ``memory`` — optimizer state bytes of every method and variant after one step (no training);
* ``report`` — markdown tables and the sweep plot from what ``--json`` holds (no training).

    PYTHONPATH=src python bench/quality_study.py sweep --models configs/llama_h256_l4_v2048.json --steps 300
    PYTHONPATH=src python bench/quality_study.py report --plot docs/results/quality-sweep.png
    PYTHONPATH=src python bench/quality_study.py sweep --smoke      # seconds: a 2-layer h32 model, 3 steps

Update sizes. Each run also measures, at ``--probes`` evenly spaced steps, the RMS of the weight
change of every projected matrix divided by that step's learning rate (``rms(ΔW)/η_t``) and the same
for the embedding and output layers: the size of each method's normalised step, which is what a
shared learning rate has to suit.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import galore_mini as gm  # noqa: E402
from galore_mini.errors import UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "quality_study.json"

#: name -> (registry method, description, builder options). Builder options: ``split`` (AdamW with the
#: GaLore family's two rates), ``create`` (extra keyword arguments for gm.create_optimizer).
VARIANTS: dict[str, dict] = {
    "full": dict(method="full", what="AdamW, one lr for every weight"),
    "full_split": dict(method="full", split=True,
                       what="AdamW, attention/MLP matrices at lr×scale, embedding/output/norms at lr "
                            "(GaLore's split)"),
    "adam_mini": dict(method="adam_mini", what="Adam-mini"),
    "galore": dict(method="galore", what="GaLore-AdamW (exact SVD)"),
    "galore_mini": dict(method="galore_mini", what="GaLore-mini approach 3 (the paper's; power-iteration refresh)"),
    # the gap diagnosis: each changes one thing of galore_mini
    "galore_mini_a1": dict(method="galore_mini_a1", what="approach 1: v from the low-rank R, block means there"),
    "galore_mini_a2": dict(method="galore_mini_a2", what="approach 2: v from full G, applied before back-projection"),
    "galore_mini_svd": dict(method="galore_mini", create=dict(proj_method="svd"),
                            what="approach 3 with GaLore's exact-SVD refresh"),
    "galore_mini_io_adam": dict(method="galore_mini", create=dict(overrides={r"embed_tokens|lm_head":
                                                                           {"block": "elementwise"}}),
                                what="approach 3, embedding/output with elementwise v (as GaLore gives them)"),
    # GaLore-mini's last 5%: element-wise v on the embedding/output layers (a), the row second moment
    # from the back-projected gradient P Pᵀ G (b), both (c)
    "galore_mini_vproj": dict(method="galore_mini", create=dict(v_source="projected"),
                              what="approach 3, v fed from the back-projected gradient P Pᵀ G"),
    "galore_mini_io_vproj": dict(method="galore_mini", create=dict(v_source="projected", overrides={
        r"embed_tokens|lm_head": {"block": "elementwise"}}),
        what="approach 3, v from P Pᵀ G, embedding/output with elementwise v"),
    "galore_mini_io_s0.1": dict(method="galore_mini", create=dict(scale=0.1, overrides={
        r"embed_tokens|lm_head": {"block": "elementwise"}}),
        what="approach 3, scale 0.1, embedding/output with elementwise v"),
    "galore_mini_T50": dict(method="galore_mini", create=dict(update_proj_gap=50), what="approach 3, T=50"),
    "galore_mini_s0.1": dict(method="galore_mini", create=dict(scale=0.1), what="approach 3, scale 0.1"),
    "galore_mini_s1": dict(method="galore_mini", create=dict(scale=1.0), what="approach 3, scale 1"),
    "galore_s1": dict(method="galore", create=dict(scale=1.0), what="GaLore, scale 1"),
}
MAIN = ("full", "full_split", "adam_mini", "galore", "galore_mini")
DIAG = ("galore_mini_a1", "galore_mini_a2", "galore_mini_svd", "galore_mini_io_adam", "galore_mini_T50",
        "galore_mini_s0.1", "galore_mini_s1")
#: a half-decade grid around each method's registry default
LR_GRID = {
    "full": (1e-3, 3e-3, 1e-2),
    "full_split": (3e-3, 1e-2, 3e-2),
    "adam_mini": (1e-3, 3e-3, 1e-2),
    "galore": (3e-3, 1e-2, 3e-2),
    "galore_mini": (1e-3, 3e-3, 1e-2),
}
SCALE = 0.25


# -- model and data ------------------------------------------------------------------------------


def _model_tools():
    try:  # the harness is being reorganised; accept either home of the model builder
        from galore_mini.models import build_model, model_config  # type: ignore
    except ImportError:
        from galore_mini.models import build_model, model_config
    return build_model, model_config


def read_size(path: str) -> dict:
    """The JSON config's fields plus the derived rank (hidden/4) and parameter split."""
    _, model_config = _model_tools()
    config = model_config(path)
    # LlamaConfig fills a missing hidden_size with 4096; a study of widths must not inherit that silently
    raw = json.loads(Path(path).read_text()) if str(path).endswith(".json") else {}
    hidden = raw.get("hidden_size") if str(path).endswith(".json") else getattr(config, "hidden_size", None)
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
        raise UsageError(f"--models: {path!r} has no positive integer hidden_size; the study sets rank = hidden_size/4 "
                         "and reads the width from it — add \"hidden_size\" to the JSON")
    return dict(path=path, name=Path(path).stem, hidden=hidden, layers=config.num_hidden_layers,
                vocab=config.vocab_size, rank=hidden // 4)


_DATA: dict[tuple, object] = {}


def load_data(vocab: int, seq_len: int, val_tokens: int, source: str | None = None, cache_dir: str | None = None):
    from galore_mini.train.data import prepare_data

    key = (vocab, seq_len, val_tokens, source, cache_dir)
    if key not in _DATA:
        _DATA[key] = prepare_data(source, seq_len=seq_len, vocab_size=vocab, val_tokens=val_tokens, cache_dir=cache_dir,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
    return _DATA[key]


# -- one run -------------------------------------------------------------------------------------


def build_optimizer(model, variant: str, lr: float, rank: int):
    spec = VARIANTS[variant]
    if spec.get("split"):
        groups = gm.param_groups(model, "galore", rank=rank, scale=SCALE)
        plain = [{"params": g["params"], "lr": lr * SCALE if "rank" in g else lr} for g in groups]
        # no decay anywhere, as for every other variant (torch's AdamW would default to 0.01)
        return torch.optim.AdamW(plain, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    options = dict(rank=rank, update_proj_gap=200, scale=SCALE)  # rank and gap only reach projected groups
    options.update(spec.get("create", {}))
    return gm.create_optimizer(model, spec["method"], lr=lr, weight_decay=0.0, **options)


def state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps (moments, projectors, step counters)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):  # quantised moments keep their pieces in a dict
                total += sum(t.numel() * t.element_size() for t in value.values() if torch.is_tensor(t))
    return total


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """The harness's schedule: linear warm-up, then cosine down to `min_ratio` of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def val_loss(model, rows: torch.Tensor, batch: int) -> float:
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        ids = rows[start:start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train()
    return total / count


def train_one(size: dict, variant: str, lr: float, seed: int, args) -> dict:
    build_model, model_config = _model_tools()
    data = load_data(size["vocab"], args.seq_len, args.val_tokens, args.data, args.cache_dir)
    config = model_config(size["path"], vocab_size=data.vocab_size)
    model = build_model(config, seed=seed).to(args.device)
    torch.manual_seed(seed)
    optimizer = build_optimizer(model, variant, lr, size["rank"])
    warmup = max(1, round(0.1 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps, warmup))
    stream = data.train_stream(args.batch_size, seed)
    infos = gm.param_groups(model, "galore", rank=size["rank"]).infos
    projected = [i.param for i in infos if i.projectable]
    io = [i.param for i in infos if i.role in ("embedding", "output")]
    probe_steps = ({round(k * (args.steps - 1) / max(1, args.probes - 1)) for k in range(args.probes)}
                   if args.probes else set())
    probes = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    started = time.perf_counter()
    losses, diverged = [], False
    for step in range(args.steps):
        ids = stream.next().to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        probing = step in probe_steps
        if probing:
            before = {p: p.detach().clone() for p in projected + io}
        eta = lr * lr_factor(step, args.steps, warmup)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if probing:
            def rms(params):
                return statistics.fmean(float((p.detach() - before[p]).pow(2).mean().sqrt()) / eta for p in params)
            probes.append(dict(step=step + 1, projected=rms(projected), io=rms(io)))
            del before
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            diverged = True
            break
    seconds = time.perf_counter() - started
    loss_val = float("inf") if diverged else val_loss(model, data.val.to(args.device), args.batch_size)
    return dict(size=size["name"], model=size["path"], hidden=size["hidden"], rank=size["rank"], variant=variant,
                method=VARIANTS[variant]["method"], lr=lr, seed=seed, steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, data=args.data, val_tokens=int(data.val[:, 1:].numel()), val_loss=loss_val,
                val_ppl=math.exp(loss_val) if math.isfinite(loss_val) and loss_val < 700 else float("inf"),
                train_loss_last20=statistics.fmean(losses[-20:]), diverged=diverged,
                optimizer_bytes=state_bytes(optimizer), train_seconds=round(seconds, 1), update_rms=probes,
                device=str(args.device), when=C.machine()["date"])


def measure_state(size: dict, variant: str) -> int:
    """Optimizer state bytes of `variant` on `size` after one step on random tokens (no training data needed)."""
    build_model, model_config = _model_tools()
    model = build_model(model_config(size["path"]), seed=0)
    optimizer = build_optimizer(model, variant, 1e-3, size["rank"])
    ids = torch.randint(0, size["vocab"], (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return state_bytes(optimizer)


# -- results file --------------------------------------------------------------------------------


def run_key(size: str, variant: str, lr: float, seed: int, steps: int, batch: int, seq: int,
            data: str | None = None) -> str:
    key = f"{size}|{variant}|lr={lr:g}|seed={seed}|steps={steps}|batch={batch}x{seq}"
    return key + (f"|data={data}" if data else "")


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return dict(kind="quality_study", machine=C.machine(), versions=C.versions(), runs=[])


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def matching(results: dict, size: str, args, variant: str | None = None, seed: int | None = None) -> list[dict]:
    return [r for r in results["runs"] if r["size"] == size and r["steps"] == args.steps
            and r.get("data") == args.data
            and r["batch_size"] == args.batch_size and r["seq_len"] == args.seq_len
            and (variant is None or r["variant"] == variant) and (seed is None or r["seed"] == seed)]


def best_lr(results: dict, size: str, variant: str, args) -> float | None:
    """The lr of the lowest seed-0 validation loss of `variant`'s sweep (None: not swept yet)."""
    points = sweep_points(size, variant, results, args)
    runs = [r for r in matching(results, size, args, variant, seed=0) if r["lr"] in points]
    return min(runs, key=lambda r: r["val_loss"])["lr"] if runs else None


def lr_grid(variant: str, args) -> tuple[float, ...]:
    if args.lrs:
        return tuple(args.lrs)
    return LR_GRID.get(variant, ())


def ladder(lr: float, up: bool) -> float:
    """The next rate on the 1-3-10 ladder above (or below) `lr`: 1e-2 → 3e-2 → 1e-1, 1e-2 → 3e-3 → 1e-3."""
    ones = lr / 10.0 ** math.floor(math.log10(lr) + 1e-9) < 2
    if up:
        return float(f"{lr * 3 if ones else lr * 10 / 3:.0e}")
    return float(f"{lr * 0.3 if ones else lr / 3:.0e}")


def sweep_points(size: str, variant: str, results: dict, args) -> list[float]:
    """The grid, plus rungs of the 1-3-10 ladder beyond whichever edge holds the best loss (at most
    ``--extend`` of them), so that every swept best is interior: a best at the edge is not a best."""
    points = list(lr_grid(variant, args))
    for _ in range(args.extend):
        runs = {r["lr"]: r["val_loss"] for r in matching(results, size, args, variant, seed=0) if r["lr"] in points}
        if len(runs) < len(points):
            break  # the grid is not finished yet
        best = min(runs, key=runs.get)
        if best == max(points):
            points.append(ladder(best, up=True))
        elif best == min(points):
            points.append(ladder(best, up=False))
        else:
            break
    return points


def plan(phase: str, size: dict, results: dict, args) -> list[tuple[str, float, int]]:
    if phase == "sweep":
        return [(v, lr, 0) for v in args.methods for lr in sweep_points(size["name"], v, results, args)]
    if phase == "seeds":
        out = []
        for v in args.methods:
            lr = best_lr(results, size["name"], v, args)
            if lr is None:
                raise UsageError(f"seeds: {v} has no sweep for {size['name']} at these steps/batch; run `sweep` first")
            out += [(v, lr, s) for s in args.seeds]
        return out
    if phase == "diag":
        lr = args.diag_lr or best_lr(results, size["name"], "galore_mini", args)
        if lr is None:
            raise UsageError("diag: no galore_mini sweep to take the lr from; run `sweep` first or pass --diag-lr")
        return [(v, lr, s) for v in args.variants for s in args.diag_seeds]
    raise UsageError(f"unknown phase {phase!r}")


def run_phase(args) -> dict:
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    results = load_results(path)
    if args.phase == "memory":
        for model_path in args.models:
            size = read_size(model_path)
            for variant in args.methods + [v for v in args.variants if v not in args.methods]:
                row = dict(size=size["name"], hidden=size["hidden"], vocab=size["vocab"], rank=size["rank"],
                           variant=variant, optimizer_bytes=measure_state(size, variant))
                print(f"{size['name']} {variant}: {row['optimizer_bytes'] / 2**20:.2f} MiB", file=sys.stderr)
                results = load_results(path)
                memory = [m for m in results.get("memory", []) if (m["size"], m["variant"]) != (row["size"], variant)]
                results["memory"] = memory + [row]
                save_results(path, results)
        return results
    for model_path in args.models:
        size = read_size(model_path)
        if args.smoke:
            size["rank"] = 4
        while True:  # re-plan after every run: a finished grid may call for a rung beyond its edge
            todo = [(v, lr, seed) for v, lr, seed in plan(args.phase, size, results, args)
                    if not any(r.get("key") == run_key(size["name"], v, lr, seed, args.steps, args.batch_size,
                                                       args.seq_len, args.data) for r in results["runs"])]
            if not todo:
                break
            variant, lr, seed = todo[0]
            key = run_key(size["name"], variant, lr, seed, args.steps, args.batch_size, args.seq_len, args.data)
            print(f"[{time.strftime('%H:%M:%S')}] {key}", file=sys.stderr, flush=True)
            row = train_one(size, variant, lr, seed, args)
            row["key"] = key
            results = load_results(path)  # another phase may have appended meanwhile
            results["runs"].append(row)
            results["machine"] = C.machine()
            save_results(path, results)
            print(f"    val ppl {row['val_ppl']:.2f}  ({row['train_seconds']:.0f} s, state "
                  f"{row['optimizer_bytes'] / 2**20:.2f} MiB)", file=sys.stderr, flush=True)
    return results


# -- report --------------------------------------------------------------------------------------


def summary(runs: list[dict]) -> tuple[float, float, int]:
    ppl = [r["val_ppl"] for r in runs]
    return statistics.fmean(ppl), (statistics.stdev(ppl) if len(ppl) > 1 else 0.0), len(ppl)


def report(results: dict, plot: str | None) -> str:
    runs = results["runs"]
    lines = []
    settings = sorted({(r["size"], r["steps"], r["batch_size"], r["seq_len"], r["hidden"], r["rank"]) for r in runs})
    for size, steps, batch, seq, hidden, rank in settings:
        these = [r for r in runs if (r["size"], r["steps"], r["batch_size"], r["seq_len"]) == (size, steps, batch, seq)]
        lines.append(f"### {size}: {steps} steps of {batch}×{seq} tokens, rank {rank}\n")
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in these)]
        lrs = sorted({r["lr"] for r in these if r["seed"] == 0})
        header = "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"
        lines += ["Seed 0, val perplexity by peak learning rate:\n", header, "|---|" + "---:|" * len(lrs)]
        for v in variants:
            cells = []
            for lr in lrs:
                hit = [r for r in these if r["variant"] == v and r["lr"] == lr and r["seed"] == 0]
                cells.append(f"{hit[0]['val_ppl']:.1f}" if hit else "")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines += ["", "Seeds at each variant's best lr (mean ± sample std over seeds):\n",
                  "| variant | lr | seeds | val ppl | min – max | optimizer state | "
                  "normalised update rms (projected / emb+out) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for v in variants:
            by_lr = {}
            for r in these:
                if r["variant"] == v:
                    by_lr.setdefault(r["lr"], []).append(r)
            lr, group = max(by_lr.items(), key=lambda kv: (len(kv[1]), -statistics.fmean(x["val_loss"] for x in kv[1])))
            mean, sd, n = summary(group)
            probe = [p for r in group for p in r.get("update_rms", [])]
            upd = (f"{statistics.fmean(p['projected'] for p in probe):.3f} / "
                   f"{statistics.fmean(p['io'] for p in probe):.3f}"
                   if probe else "")
            lines.append(f"| {v} | {lr:g} | {n} | {mean:.2f} ± {sd:.2f} | "
                         f"{min(r['val_ppl'] for r in group):.2f} – {max(r['val_ppl'] for r in group):.2f} | "
                         f"{group[0]['optimizer_bytes'] / 2**20:.2f} MiB | {upd} |")
        lines.append("")
    memory = results.get("memory", [])
    if memory:
        names = sorted({(m["hidden"], m["size"]) for m in memory})
        variants = [v for v in VARIANTS if any(m["variant"] == v for m in memory)]
        lines += ["### Optimizer state (MiB; one step on random tokens, rank = hidden/4)\n",
                  "| variant | " + " | ".join(n for _, n in names) + " |", "|---|" + "---:|" * len(names)]
        for v in variants:
            cells = [next((f"{m['optimizer_bytes'] / 2**20:.2f}" for m in memory
                           if (m["size"], m["variant"]) == (n, v)), "") for _, n in names]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    if plot:
        write_plot(runs, plot)
        lines.append(f"(plot: {plot})")
    return "\n".join(lines)


def write_plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({(r["hidden"], r["size"], r["steps"], r["batch_size"]) for r in runs})
    colours = {v: f"C{i}" for i, v in enumerate(LR_GRID)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for ax, (_, size, steps, batch) in zip(axes[0], sizes):
        for v in VARIANTS:
            pts = sorted((r["lr"], r["val_ppl"]) for r in runs if (r["size"], r["steps"], r["batch_size"]) ==
                         (size, steps, batch) and r["variant"] == v and r["seed"] == 0 and v in LR_GRID)
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [min(p[1], 1e4) for p in pts], marker="o", label=v, color=colours[v])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation perplexity (seed 0)")
        ax.set_title(f"{size}, {steps} steps × {batch} rows")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# -- command line --------------------------------------------------------------------------------


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("sweep", "seeds", "diag", "memory", "report"))
    parser.add_argument("--models", nargs="+", default=[str(ROOT / "configs" / "llama_h256_l4_v2048.json")])
    parser.add_argument("--methods", nargs="+", default=list(MAIN), choices=list(VARIANTS))
    parser.add_argument("--variants", nargs="+", default=list(DIAG), choices=list(VARIANTS))
    parser.add_argument("--lrs", nargs="+", type=float, help="one lr grid for every method (default: LR_GRID)")
    parser.add_argument("--extend", type=int, default=2,
                        help="sweep: at most this many 1-3-10 rungs beyond an edge that holds the best")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--diag-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--diag-lr", type=float, help="lr of the diagnosis runs (default: galore_mini's best)")
    parser.add_argument("--data", help="text file or folder (default: the harness's default corpus)")
    parser.add_argument("--cache-dir", help="where the tokenizer and token ids are cached (default: the harness's)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-tokens", type=int, default=32768)
    parser.add_argument("--probes", type=int, default=6, help="steps at which update sizes are measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the model trains (cpu, cuda)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--plot", help="report: write the lr-sweep plot here")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer h32 model, 3 steps (checks the plumbing)")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke = Path("/tmp/galore-mini-quality-smoke.json")
        smoke.write_text(json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=512, max_position_embeddings=64)))
        args.models, args.steps, args.batch_size, args.seq_len, args.val_tokens = [str(smoke)], 3, 2, 32, 256
        if args.json == str(DEFAULT_JSON):
            args.json = "/tmp/galore-mini-quality-smoke-results.json"
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.phase == "report":
        print(report(load_results(Path(args.json)), args.plot))
        return
    run_phase(args)


if __name__ == "__main__":
    main()
