"""The pretraining loop, nanoGPT-style: one config, one explicit loop.

    config = TrainConfig(method="galore_mini", model="tiny", steps=500, out="runs/x")
    result = train(config)          # -> dict with val_loss, val_ppl, tokens_per_s, memory …

:func:`train` reads top to bottom: claim the run folder, set up (data, model,
optimizer, schedule), resume, then per step :func:`train_step` and
:func:`after_step` (log, evaluate, save), then the result. Everything that changes
from step to step lives in one :class:`Progress` record, which the checkpoint holds.

What a step is: ``grad_accum`` micro-batches of ``batch_size`` rows (per process) of
``seq_len`` tokens, loss averaged, gradients clipped to ``grad_clip`` (global norm),
one optimizer update, one scheduler step. The learning rate follows a linear
warm-up over ``warmup_steps`` (default 10% of ``steps``) and a cosine down to
``min_lr_ratio`` (0.1) of the peak at the last step, as in the GaLore paper;
a method's step hooks may scale it (ReLoRA's jagged restarts).

The config (:class:`~galore_mini.train.config.TrainConfig`) is a dataclass of components, each
field documented where it is declared; the schedule, the parameter counts and the non-finite
policy below are :mod:`galore_mini.train.steps`, shared with fine-tuning.

Skipped updates. Our optimizers skip a parameter whose gradient is not finite and
count it (``optimizer.nonfinite_skips``); for torch's AdamW (``full`` and the adapter
baselines) the loop skips the whole update when the global gradient norm is not
finite. A step in which no parameter was updated is a *skipped step*. Both counts go
to every ``metrics.jsonl`` training line and to ``final.json``; ``max_skipped_steps``
(default 20) consecutive skipped steps stop the run with :class:`TrainingDiverged`
(exit code 2 on the command line): a run that no longer learns is not a success.
A non-finite training loss stops it at once. Divergence can also leave every number finite (weights
blown up until every activation and gradient is exactly 0): the run stops as diverged when the loss
sits at or above ln(vocabulary), a uniform guess, with every gradient exactly zero for
``max_dead_steps`` (5) steps in a row, or when it rises above ln(vocabulary) and ``divergence_factor``
(10) times its lowest value so far; 0 turns either check off. A diverged run writes a ``diverged``
line to ``metrics.jsonl`` and ``final.json`` with ``"diverged": true`` and the reason.

Every ``eval_every`` steps (and at the end) the fixed validation rows are scored:
val loss and ``ppl = exp(mean loss)``. Progress goes to a tqdm bar (loss, ppl,
tokens/s) and every ``log_every`` steps a line to ``out/metrics.jsonl``.

The run folder (:mod:`galore_mini.train.runs`): an ``out`` holding a run is refused
unless ``resume`` or ``overwrite``; a lock stops a second run on it. Checkpoints
(``checkpoint.pt``, every ``save_every`` steps and at the end; the one before kept as
``checkpoint.prev.pt``) hold the model, optimizer, scheduler, data position, every
process's RNG state, the progress record and the config (by flat field names), and are written
atomically with a SHA-256 digest that is verified before a checkpoint is used.
``resume=True`` continues from the newest readable checkpoint (falling back to the
previous one, with a message) and ends bit-for-bit where the uninterrupted run would
have (CPU; same world size), the metrics log cut back to the checkpoint's step so no
line appears twice.

DDP: under ``torchrun --nproc_per_node N`` the loop joins the process group
(``gloo`` on CPU, ``nccl`` on GPU), wraps the model in ``DistributedDataParallel``,
gives each process its slice of every global micro-batch, and lets process 0
write logs and checkpoints. ``batch_size`` is per process, so the global batch is
``batch_size × grad_accum × world_size`` rows. Decisions about the run folder are
made by process 0 and shared, so a refusal stops every process with the same message.
:func:`train` does not leave the process group (callers may train again in it);
:func:`leave_distributed` does, after dropping every reference to the DDP wrapper
(see its docstring for why the order matters).

FSDP2 (``fsdp=True``, ``--fsdp``): instead of DDP the model is sharded with ``fully_shard``
(each decoder layer, then the root; ``fsdp_mixed_precision="bf16"`` for a bf16 compute policy)
before the optimizer is built, and checkpoints are DCP folders (``checkpoint-dcp/``, the previous
one ``checkpoint-dcp.prev/``) resumed bit-for-bit at the same world size; one process is allowed.
See :mod:`galore_mini.train.sharded`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from galore_mini import methods as registry
from galore_mini.errors import UsageError
from galore_mini.memory import optimizer_state_bytes, weights_bytes
from galore_mini.methods import Settings, StepHooks
from galore_mini.models import build_model, model_fields
from galore_mini.train import sharded
from galore_mini.train.config import (  # noqa: F401  (names re-exported for callers of loop)
    TrainConfig, check_optimizer_options, config_fields, load_config_file, make_config, optimizer_option_errors)
from galore_mini.train.data import prepare_data
from galore_mini.train.distributed import (  # noqa: F401  (names re-exported for callers of loop)
    Dist, gather_rng, leave_distributed, on_main, set_rng_state, setup_distributed)
from galore_mini.train.evaluate import EvalResult, evaluate, perplexity
from galore_mini.train.runs import (  # noqa: F401  (names re-exported for callers of loop)
    CHECKPOINT, CHECKPOINT_FORMAT, DCP_META, FINAL, METRICS, PREVIOUS, RunFolder, atomic_save, atomic_write)
from galore_mini.train.steps import (  # noqa: F401  (names re-exported for callers of loop)
    Skips, TrainingDiverged, cosine_factor, count_parameters, optimizer_step)

# -- run folder and checkpoints ----------------------------------------------------------------------------


def stale_temporaries(out: Path) -> list[Path]:
    """Half-written checkpoint files a killed run left behind."""
    return RunFolder(out).temporaries()


# -- metrics log ------------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")))


# -- building the pieces ------------------------------------------------------------------------------------


def build_training(config: TrainConfig, vocab_size: int, device: torch.device,
                   broadcast: Callable[[torch.Tensor], None] | None = None):
    """(model, optimizer, step hooks) for `config`: the model seeded by ``config.seed``, same init for every
    method, then built, optimized and hooked as the method's registry entry says."""
    method = registry.get(config.method, "--method")
    model = build_model(config.model, vocab_size=vocab_size, seed=config.seed)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and config.seq_len > max_positions:
        raise UsageError(f"--seq-len={config.seq_len} exceeds the model's max_position_embeddings={max_positions}")
    settings = Settings(rank=config.resolved_rank(), lr=config.resolved_lr(), weight_decay=config.weight_decay,
                        betas=(config.beta1, config.beta2), scale=config.scale, update_proj_gap=config.update_proj_gap,
                        proj_type=config.proj_type, optimizer_options=config.parsed_optimizer_options(),
                        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                        relora_every=config.resolved_relora_every(), relora_warmup=config.resolved_relora_warmup(),
                        relora_prune=config.relora_prune, broadcast=broadcast)
    model = method.build_model(model, settings)
    model.to(device)
    if config.fsdp:  # before the optimizer, so that it is built over the sharded (DTensor) parameters
        model = sharded.shard_model(model, config.fsdp_mixed_precision)
    with optimizer_option_errors(config.optimizer_options) if config.optimizer_options else contextlib.nullcontext():
        optimizer = method.build_optimizer(model, settings)
    return model, optimizer, method.step_hooks(model, optimizer, settings)


def check_buildable(config: TrainConfig) -> None:
    """Build `config`'s model and optimizer on the meta device (no memory, no data, global RNG untouched), so
    that whatever they refuse (a rank too large for the model, an option the optimizer rejects) is refused
    before anything trains: ``compare`` checks every method this way before training the first."""
    unsharded = dataclasses.replace(config, fsdp=False, fsdp_mixed_precision=None)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        build_training(unsharded, config.vocab_size, torch.device("meta"))


# -- the loop ---------------------------------------------------------------------------------------------


@dataclass
class Progress(Skips):
    """What changes from step to step and must survive a resume (it is saved in every checkpoint)."""

    step: int = 0  # updates completed
    train_time: float = 0.0  # seconds spent in training steps (evaluation and saving excluded)
    min_loss: float = math.inf  # the lowest training loss so far (the divergence guard's reference)
    dead_steps: int = 0  # steps in a row at or above ln(vocabulary) with every gradient zero


@dataclass
class _Window:
    """Training steps since the last metrics line, averaged into it."""

    tokens: int = 0
    time: float = 0.0
    loss: float = 0.0
    steps: int = 0


@dataclass
class StepOutcome:
    loss: float
    lr: float
    seconds: float
    skipped: int  # parameter updates skipped in this step
    updatable: int  # parameters that had a gradient
    zero_gradients: bool = False  # every gradient of the step was exactly zero


@dataclass
class Run:
    """One training run's parts, built by :func:`set_up`."""

    config: TrainConfig
    dist: Dist
    folder: RunFolder
    log: Callable[[str], None]
    data: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    hooks: StepHooks  # the method's per-step behaviour (ReLoRA's jagged LR and restarts; none for most)
    stream: Any
    params: tuple[int, int]
    tokens_per_step: int
    trainable: list[torch.nn.Parameter]
    progress: Progress = dataclasses.field(default_factory=Progress)
    ddp_model: torch.nn.Module | None = None
    bar: Any = None
    window: _Window = dataclasses.field(default_factory=_Window)
    last_eval: EvalResult | None = None
    fingerprints: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the run's inputs were

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.config.bf16 else None


def train(config: TrainConfig, data=None, *, on_step: Callable[[int], None] | None = None,
          load_dataset: Callable | None = None) -> dict[str, Any]:
    """Run (or resume) one pretraining run; returns the final metrics (also written to ``out/final.json``).

    `data`: an already prepared :class:`galore_mini.train.data.PretrainData` (``compare`` shares one
    across methods); `on_step(step)` is called after every completed update (tests inject faults
    there); `load_dataset` stands in for ``datasets.load_dataset`` for ``--data c4``.
    """
    config.validate()
    dist_info = setup_distributed(config.device, config.fsdp)
    log = _logger(dist_info.is_main)
    folder = RunFolder(config.out)
    on_main(dist_info, lambda: folder.claim(config.resume, config.overwrite, log))
    run = None
    try:
        run = set_up(config, dist_info, folder, log, data, load_dataset)
        if config.resume:
            resume(run)
        start_logging(run)
        run.model.train()
        for step in range(run.progress.step, config.steps):
            outcome = train_step(run, step)
            after_step(run, outcome)
            if on_step is not None:
                on_step(run.progress.step)
        return result(run)
    finally:
        if run is not None:
            close(run)
        folder.release()


def set_up(config: TrainConfig, dist_info: Dist, folder: RunFolder, log: Callable[[str], None], data=None,
           load_dataset: Callable | None = None) -> Run:
    """Data, model, optimizer, schedule and batch stream for `config`, every process the same."""
    if data is None:
        data = prepare_data(config.data, seq_len=config.seq_len, vocab_size=config.vocab_size,
                            tokenizer=config.tokenizer, val_fraction=config.val_fraction, val_tokens=config.val_tokens,
                            cache_dir=config.cache_dir, is_main=dist_info.is_main, barrier=dist_info.barrier,
                            load_dataset=load_dataset, log=log)
    elif data.seq_len != config.seq_len:
        raise UsageError(f"the prepared data has seq_len={data.seq_len}, the config {config.seq_len}")
    log(data.describe())

    broadcast = None
    if dist_info.enabled:
        def broadcast(t: torch.Tensor) -> None:
            tdist.broadcast(t, src=0)

    torch.manual_seed(config.seed)
    model, optimizer, hooks = build_training(config, data.vocab_size, dist_info.device, broadcast)
    if config.fsdp:
        log(f"FSDP2: {dist_info.world_size} process(es), each decoder layer and the root sharded"
            + (f", {config.fsdp_mixed_precision} mixed precision" if config.fsdp_mixed_precision else ""))
    warmup = config.resolved_warmup()

    def lr_factor(step: int) -> float:
        factor = cosine_factor(step, config.steps, warmup, config.min_lr_ratio)
        return factor * hooks.lr_factor(step)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    stream = data.train_stream(config.batch_size * dist_info.world_size, config.seed)
    tokens_per_step = config.batch_size * config.grad_accum * dist_info.world_size * config.seq_len
    return Run(config, dist_info, folder, log, data, model, optimizer, scheduler, hooks, stream,
               count_parameters(model), tokens_per_step, [p for p in model.parameters() if p.requires_grad],
               fingerprints=input_fingerprints(config, data))


def input_fingerprints(config: TrainConfig, data) -> dict[str, Any]:
    """What shapes the run beyond its settings, by content rather than by name: the model config's fields,
    the data (a digest of every document and the split), the tokenizer and its vocabulary."""
    return {"model": model_fields(config.model), "data": data.fingerprint, "documents": data.documents,
            "tokenizer": data.tokenizer.name, "tokenizer_digest": data.tokenizer.digest(),
            "vocab_size": data.vocab_size}


def check_inputs(config: TrainConfig, saved: dict[str, Any] | None, now: dict[str, Any],
                 log: Callable[[str], None]) -> None:
    """Refuse to resume over inputs that changed since the checkpoint, naming what changed (checkpoints of
    versions that recorded no fingerprints are let through: their weights are still checked on loading).
    ``--allow-new-data`` lets changed data through, with a message; the tokenizer must still be the same."""
    if not saved:
        return
    how = "restore it, or start again with --overwrite (or another --out)"
    if saved.get("model") != now["model"]:
        was, new = saved.get("model") or {}, now["model"]
        changed = ", ".join(f"{k}: {was.get(k, '(unset)')!r} then, {new.get(k, '(unset)')!r} now"
                            for k in sorted(set(was) | set(new)) if was.get(k) != new.get(k))
        raise UsageError(f"--resume: the model config --model={config.model} changed since the checkpoint "
                         f"({changed}); {how}")
    if saved.get("data") != now["data"]:
        counts = (f"{saved.get('documents')} documents then, {now['documents']} now"
                  if saved.get("documents") != now["documents"] else "the documents' content differs")
        data = f"--data={config.data or '(the default corpus)'}"
        if not config.allow_new_data:
            raise UsageError(f"--resume: the data {data} changed since the checkpoint ({counts}), so its tokens "
                             f"would not be the ones trained on; {how}, or add --allow-new-data to go on over the "
                             "new data on purpose")
        log(f"--allow-new-data: the data {data} changed since the checkpoint ({counts}); the rows trained so far "
            "count as done and the run goes on over the new data")
    for key in ("tokenizer", "vocab_size"):
        if saved.get(key) != now[key]:
            raise UsageError(f"--resume: the {key.replace('_', ' ')} changed since the checkpoint "
                             f"({saved.get(key)!r} then, {now[key]!r} now); {how}")
    if saved.get("tokenizer_digest") != now["tokenizer_digest"]:
        raise UsageError(f"--resume: the tokenizer {now['tokenizer']} maps text to other ids than when the "
                         f"checkpoint was written (its definition changed); {how}")


def resume(run: Run) -> None:
    """Load the newest readable checkpoint (process 0 picks it, falling back to the previous one)."""
    config, dist_info, folder = run.config, run.dist, run.folder

    loaded: dict[str, Any] = {}

    def pick() -> str | None:
        folder.remove_temporaries(run.log)
        if config.fsdp:
            path, loaded["state"] = folder.newest_readable_dcp(run.log)
            return None if path is None else path.name
        name, loaded["state"] = folder.newest_readable(run.log)
        return name

    name = on_main(dist_info, pick)
    if name is None:
        run.log(f"no checkpoint in {folder.path}; starting from scratch")
        return
    if config.fsdp:
        state = loaded["state"] if dist_info.is_main else folder.load(f"{name}/{DCP_META}", sharded=True)
        check_inputs(config, state.get("fingerprints"), run.fingerprints, run.log)
        if _check_resumable(config, state, dist_info):
            saved_world = len(state["rng"])
            run.log(f"resharding: the checkpoint was written by {saved_world} processes, this run has "
                    f"{dist_info.world_size}; DCP reshards the model and optimizer state (equal to round-off of "
                    "the reductions), the batches go on unchanged, and process k takes the random-number state "
                    f"of process k mod {saved_world} (dropout draws other masks than the uninterrupted run)")
            state["rng"] = [state["rng"][r % saved_world] for r in range(dist_info.world_size)]
        sharded.load_checkpoint(folder.path / name, run.model, run.optimizer)
    else:
        state = loaded["state"] if dist_info.is_main else folder.load(name)
        _check_resumable(config, state, dist_info)
        check_inputs(config, state.get("fingerprints"), run.fingerprints, run.log)
        try:
            run.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # a checkpoint without fingerprints, of a model since changed
            first = str(exc).strip().splitlines()[1:2] or [str(exc).strip()]
            raise UsageError(f"--resume: the checkpoint's weights do not fit the model --model={config.model} builds "
                             f"now ({first[0].strip()}); restore the model config, or start again with --overwrite "
                             "(or another --out)") from None
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.stream.load_state_dict(state["data"])
    set_rng_state(state["rng"][dist_info.rank], dist_info.device)
    saved = state.get("progress", {})
    run.progress = Progress(**{**saved, "step": int(state["step"]), "train_time": float(state["train_time"])})
    if dist_info.is_main:
        _truncate_metrics(folder.metrics, run.progress.step)
    run.log(f"resumed from {folder.path / name} at step {run.progress.step}")


def start_logging(run: Run) -> None:
    """A fresh metrics log for a fresh run; the DDP wrapper and the progress bar."""
    dist_info = run.dist
    if run.progress.step == 0 and dist_info.is_main:
        run.folder.metrics.write_text("")
    dist_info.barrier()
    run.ddp_model = run.model
    if dist_info.enabled and not run.config.fsdp:
        run.ddp_model = DistributedDataParallel(run.model, device_ids=[dist_info.local_rank]
                                                if dist_info.device.type == "cuda" else None)
    run.bar = _progress_bar(run.config, run.progress.step, dist_info.is_main)


def train_step(run: Run, step: int) -> StepOutcome:
    """One update (0-based `step`): accumulate, clip, step the optimizer and the schedule."""
    config, dist_info = run.config, run.dist
    started = time.perf_counter()
    step_loss = torch.zeros((), device=dist_info.device)
    for micro in range(config.grad_accum):
        batch = run.stream.next()
        rows = batch[dist_info.rank * config.batch_size:(dist_info.rank + 1) * config.batch_size]
        rows = rows.to(dist_info.device, non_blocking=True)
        last = micro == config.grad_accum - 1
        if config.fsdp:  # reduce-scatter the gradient once, after the last micro-batch
            run.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        else:
            sync = contextlib.nullcontext() if (last or not dist_info.enabled) else run.ddp_model.no_sync()
        with sync:
            with torch.autocast(dist_info.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss = run.ddp_model(input_ids=rows, labels=rows).loss / config.grad_accum
            loss.backward()
        step_loss += loss.detach()
    trainable = run.trainable
    norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip) if config.grad_clip > 0 else None
    step_lr = run.optimizer.param_groups[0]["lr"]
    updatable = sum(1 for p in trainable if p.grad is not None)
    if norm is None and config.max_dead_steps:  # the dead-model guard needs the norm also without clipping
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    zero = None if norm is None else (norm.full_tensor() if hasattr(norm, "full_tensor") else norm) == 0
    skipped = optimizer_step(run.optimizer, trainable, norm, updatable)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.hooks.after_step(step)
    if dist_info.enabled:
        tdist.all_reduce(step_loss)
        step_loss /= dist_info.world_size
    loss_value = float(step_loss)
    if not math.isfinite(loss_value):
        diverge(run, step + 1, f"the training loss became {loss_value} at step {step + 1}; lower --lr "
                f"(now {config.resolved_lr():g}) or raise --warmup-steps", loss=loss_value)
    return StepOutcome(loss_value, step_lr, time.perf_counter() - started, skipped, updatable,
                       bool(zero) if zero is not None else False)


def diverge(run: Run, step: int, message: str, **record: Any) -> None:
    """Stop the run as diverged: a ``diverged`` line in ``metrics.jsonl``, ``final.json`` saying so, and
    :class:`TrainingDiverged` (exit code 2 on the command line) with `message`."""
    _log_metrics(run.folder.metrics, run.dist, kind="diverged", step=step, **record)
    if run.dist.is_main:
        run.folder.final.write_text(json.dumps({"method": run.config.method, "model": run.config.model,
                                                "diverged": True, "step": step, "reason": message, **record},
                                               indent=1) + "\n")
    raise TrainingDiverged(message)


def after_step(run: Run, outcome: StepOutcome) -> None:
    """Count the step, update the bar, and log, stop on a stall, evaluate and save when due."""
    config, progress, window = run.config, run.progress, run.window
    progress.step += 1
    done = progress.step
    progress.train_time += outcome.seconds
    progress.record(outcome.skipped, outcome.updatable)
    window.tokens += run.tokens_per_step
    window.time += outcome.seconds
    window.loss += outcome.loss
    window.steps += 1
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{outcome.loss:.3f}", ppl=f"{perplexity(outcome.loss):.1f}",
                            tok_s=f"{run.tokens_per_step / max(outcome.seconds, 1e-9):.0f}", refresh=False)
    if config.log_every and (done % config.log_every == 0 or done == config.steps):
        _log_metrics(run.folder.metrics, run.dist, kind="train", step=done, tokens=done * run.tokens_per_step,
                     loss=window.loss / window.steps, lr=outcome.lr, tokens_per_s=window.tokens / max(window.time, 1e-9),
                     skipped_steps=progress.skipped_steps, skipped_updates=progress.skipped_updates)
        run.window = _Window()
    if progress.stalled(config.max_skipped_steps):
        error = progress.diverged(done, f"lower --lr (now {config.resolved_lr():g}) or raise --warmup-steps ",
                                  f"(--max-skipped-steps={config.max_skipped_steps} sets how many such steps stop a "
                                  "run)")
        diverge(run, done, str(error), skipped_steps=progress.skipped_steps, skipped_updates=progress.skipped_updates)
    check_divergence(run, outcome)
    if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
        run.last_eval = run_eval(run)
    if (config.save_every and done % config.save_every == 0) or done == config.steps:
        save(run)


def check_divergence(run: Run, outcome: StepOutcome) -> None:
    """Divergence that leaves every number finite (see ``--max-dead-steps`` and ``--divergence-factor``): a loss
    at or above ln(vocabulary) with all gradients exactly zero for N steps in a row, or a loss above
    ln(vocabulary) and `factor` times the lowest so far."""
    config, progress, done = run.config, run.progress, run.progress.step
    uniform = math.log(run.data.vocab_size)
    lowest, progress.min_loss = progress.min_loss, min(progress.min_loss, outcome.loss)
    # "at or above" to float32 round-off: a loss of exactly uniform logits is ln(vocabulary) computed in float32
    flat = outcome.loss >= uniform * (1 - 1e-6) and outcome.zero_gradients
    progress.dead_steps = progress.dead_steps + 1 if flat else 0
    advice = f"lower --lr (now {config.resolved_lr():g}) or raise --warmup-steps"
    if config.max_dead_steps and progress.dead_steps >= config.max_dead_steps:
        diverge(run, done, f"diverged: for the last {progress.dead_steps} steps (to step {done}) the training loss "
                f"was {outcome.loss:.4g}, at or above ln(vocabulary) = {uniform:.4g} (a uniform guess), with every "
                f"gradient exactly zero, so the model stopped learning; {advice} (--max-dead-steps=0 turns this "
                "check off)", loss=outcome.loss)
    if config.divergence_factor and outcome.loss > uniform and outcome.loss > config.divergence_factor * lowest:
        diverge(run, done, f"diverged: the training loss rose to {outcome.loss:.4g} at step {done}, above "
                f"ln(vocabulary) = {uniform:.4g} and {config.divergence_factor:g} times its lowest so far "
                f"({lowest:.4g}); {advice} (--divergence-factor=0 turns this check off)", loss=outcome.loss)


def run_eval(run: Run) -> EvalResult:
    """Score the validation rows, log the result."""
    done, dist_info = run.progress.step, run.dist
    scored = evaluate(run.model, run.data.val, run.config.batch_size, dist_info.device, run.autocast_dtype,
                      dist_info.rank, dist_info.world_size, collective=run.config.fsdp)
    _log_metrics(run.folder.metrics, dist_info, kind="eval", step=done, tokens=done * run.tokens_per_step,
                 val_loss=scored.loss, val_ppl=scored.ppl)
    message = f"step {done}: val loss {scored.loss:.4f}, val ppl {scored.ppl:.2f}"
    if run.bar is not None:
        run.bar.write(message, file=sys.stderr)
    else:
        run.log(message)
    return scored


def save(run: Run) -> None:
    """A checkpoint of everything the next step depends on (process 0 writes it)."""
    rng = gather_rng(run.dist)
    progress = run.progress
    if run.config.fsdp:
        meta = {"format": CHECKPOINT_FORMAT, "step": progress.step, "config": run.config.flat(),
                "fingerprints": run.fingerprints,
                "scheduler": run.scheduler.state_dict(), "data": run.stream.state_dict(), "rng": rng,
                "train_time": progress.train_time, "progress": asdict(progress), "world_size": run.dist.world_size}
        sharded.save_checkpoint(run.folder, run.model, run.optimizer, meta, run.dist.is_main, run.dist.barrier)
        return
    if run.dist.is_main:
        run.folder.save({"format": CHECKPOINT_FORMAT, "step": progress.step, "config": run.config.flat(),
                         "fingerprints": run.fingerprints,
                         "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                         "scheduler": run.scheduler.state_dict(), "data": run.stream.state_dict(), "rng": rng,
                         "train_time": progress.train_time, "progress": asdict(progress),
                         "world_size": run.dist.world_size})
    run.dist.barrier()


def result(run: Run) -> dict[str, Any]:
    """The run's figures, written to ``final.json``."""
    config, dist_info, progress = run.config, run.dist, run.progress
    method = registry.get(config.method)
    if run.last_eval is None:  # resumed a finished run: nothing trained, score it again
        run.last_eval = evaluate(run.model, run.data.val, config.batch_size, dist_info.device, run.autocast_dtype,
                                 dist_info.rank, dist_info.world_size, collective=config.fsdp)
    if config.fsdp:  # what process 0 holds: its shards
        weights, optimizer_bytes = sharded.memory(run.model, run.optimizer)
    else:
        weights, optimizer_bytes = weights_bytes(run.model), optimizer_state_bytes(run.optimizer)
    total_params, trainable_params = run.params
    tokens = config.steps * run.tokens_per_step
    figures = {
        "method": config.method, "model": config.model, "val_loss": run.last_eval.loss, "val_ppl": run.last_eval.ppl,
        "steps": config.steps, "tokens": tokens, "tokens_per_s": tokens / max(progress.train_time, 1e-9),
        "train_time_s": progress.train_time, "weights_bytes": weights, "optimizer_bytes": optimizer_bytes,
        "params": total_params, "trainable_params": trainable_params, "lr": config.resolved_lr(),
        "rank": config.resolved_rank() if method.ranked else None,
        "update_proj_gap": config.update_proj_gap if method.projected else None,
        "world_size": dist_info.world_size, "val_tokens": run.last_eval.tokens, "vocab_size": run.data.vocab_size,
        "seq_len": config.seq_len, "seed": config.seed, "skipped_steps": progress.skipped_steps,
        "skipped_updates": progress.skipped_updates,
    }
    if progress.skipped_updates:
        run.log(f"warning: {progress.skipped_steps} of {config.steps} steps made no update and "
                f"{progress.skipped_updates} parameter updates were skipped in all (non-finite gradients)")
    if dist_info.is_main:
        run.folder.final.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def close(run: Run) -> None:
    """Close the bar and drop the DDP wrapper, also when the run failed."""
    if run.bar is not None:
        run.bar.close()
        run.bar = None
    run.ddp_model = None


def _check_resumable(config: TrainConfig, state: dict, dist_info: Dist) -> bool:
    """Refuse a checkpoint this run cannot continue; True when it is a sharded one resharded to this world size."""
    saved = state.get("config", {})
    saved_world = int(state.get("world_size", 1))
    resharded = config.fsdp and saved_world != dist_info.world_size
    # resharded, the per-process batch changes with the world size; the global batch is checked below
    differing = config.differences(saved, {"batch_size"} if resharded else set())
    if differing:
        detail = ", ".join(f"{n}: checkpoint {saved[n]!r}, now {getattr(config, n)!r}" for n in differing)
        raise UsageError(f"--resume: the checkpoint in {config.out} was made with other settings ({detail}); "
                         "use the same settings, --overwrite to start again, or another --out")
    if resharded:
        rows = int(saved.get("batch_size", config.batch_size)) * saved_world
        if config.batch_size * dist_info.world_size != rows:
            per = f"--batch-size {rows // dist_info.world_size}" if rows % dist_info.world_size == 0 else \
                f"a number of processes that divides {rows}"
            raise UsageError(f"--resume: the checkpoint was written by {saved_world} processes of --batch-size "
                             f"{saved.get('batch_size')} ({rows} rows per micro-batch in all); at "
                             f"{dist_info.world_size} processes use {per}, so that the run goes on over the same "
                             "batches")
    elif saved_world != dist_info.world_size:
        raise UsageError(f"--resume: the checkpoint was written by {state.get('world_size')} processes, "
                         f"this run has {dist_info.world_size}; resume with the same --nproc_per_node (or "
                         "train with --fsdp, whose checkpoints reshard)")
    return resharded


def _log_metrics(path: Path, dist_info: Dist, **record: Any) -> None:
    if not dist_info.is_main:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _logger(is_main: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if is_main:
            print(message, file=sys.stderr, flush=True)

    return log


def _progress_bar(config: TrainConfig, start: int, is_main: bool):
    if not (config.progress and is_main):
        return None
    from tqdm.auto import tqdm  # optional (the train extra); only runs that show a bar need it

    return tqdm(total=config.steps, initial=start, desc=f"{config.method}", dynamic_ncols=True, file=sys.stderr)
