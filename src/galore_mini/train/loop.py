"""The pretraining loop, nanoGPT-style: one config dataclass, one explicit loop.

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
ReLoRA multiplies it by its jagged restart factor.

Skipped updates. Our optimizers skip a parameter whose gradient is not finite and
count it (``optimizer.nonfinite_skips``); for torch's AdamW (``full`` and the adapter
baselines) the loop skips the whole update when the global gradient norm is not
finite. A step in which no parameter was updated is a *skipped step*. Both counts go
to every ``metrics.jsonl`` training line and to ``final.json``; ``max_skipped_steps``
(default 20) consecutive skipped steps stop the run with :class:`TrainingDiverged`
(exit code 2 on the command line): a run that no longer learns is not a success.
A non-finite training loss stops it at once.

Every ``eval_every`` steps (and at the end) the fixed validation rows are scored:
val loss and ``ppl = exp(mean loss)``. Progress goes to a tqdm bar (loss, ppl,
tokens/s) and every ``log_every`` steps a line to ``out/metrics.jsonl``.

The run folder (:mod:`galore_mini.train.runs`): an ``out`` holding a run is refused
unless ``resume`` or ``overwrite``; a lock stops a second run on it. Checkpoints
(``checkpoint.pt``, every ``save_every`` steps and at the end; the one before kept as
``checkpoint.prev.pt``) hold the model, optimizer, scheduler, data position, every
process's RNG state, the progress record and the config, and are written atomically.
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
import importlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from galore_mini import methods as registry
from galore_mini.errors import UsageError
from galore_mini.methods import LORA_ALPHA, LORA_DROPOUT, RELORA_PRUNE, Settings
from galore_mini.models import build_model
from galore_mini.train.evaluate import EvalResult, evaluate, perplexity
from galore_mini.train.runs import (  # noqa: F401  (names re-exported for callers of loop)
    CHECKPOINT, CHECKPOINT_FORMAT, FINAL, METRICS, PREVIOUS, RunFolder, atomic_save)

# fields that may differ between a run and its resumption (they do not change the trajectory)
_RESUME_FREE = {"resume", "overwrite", "progress", "out", "save_every", "log_every", "cache_dir", "device",
                "max_skipped_steps"}
# create_optimizer keywords that have flags of their own
_FLAG_OPTIONS = {"lr": "--lr", "rank": "--rank", "update_proj_gap": "--update-proj-gap", "scale": "--scale",
                 "weight_decay": "--weight-decay", "betas": "--beta1/--beta2", "proj_type": "--proj-type",
                 "method": "--method", "model": "--model"}


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite; the message says which knob to turn."""


@dataclass
class TrainConfig:
    """Everything a pretraining run depends on; CLI flags and TOML/YAML files map onto these fields."""

    # what
    model: str = "tiny"
    method: str = "galore_mini"
    # data (see galore_mini.train.data)
    data: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 8192
    seq_len: int = 128
    val_fraction: float = 0.05
    val_tokens: int = 65536
    cache_dir: str | None = None
    # batch and length
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 500
    # optimizer and schedule
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    max_skipped_steps: int = 20  # stop after this many consecutive steps without any update (0: never)
    rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    optimizer_options: str = ""  # "key=value,..." passed to gm.create_optimizer (e.g. moment_policy=project)
    # baselines
    lora_alpha: float = LORA_ALPHA
    lora_dropout: float = LORA_DROPOUT
    relora_every: int | None = None
    relora_warmup: int | None = None
    relora_prune: float = RELORA_PRUNE
    # the run
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 100
    out: str = "runs/pretrain"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    fsdp: bool = False  # shard the model with FSDP2 (fully_shard per decoder layer + root) instead of DDP
    fsdp_mixed_precision: str | None = None  # "bf16": FSDP2 computes in bf16, reduces gradients in fp32
    progress: bool = True

    # -- derived values -------------------------------------------------------------------------

    def resolved_lr(self) -> float:
        return registry.get(self.method, "--method").default_lr if self.lr is None else self.lr

    def resolved_rank(self) -> int:
        if self.rank is not None:
            return self.rank
        from galore_mini.models import default_rank

        return default_rank(self.model)

    def resolved_warmup(self) -> int:
        return max(1, round(0.1 * self.steps)) if self.warmup_steps is None else self.warmup_steps

    def resolved_relora_every(self) -> int:
        return max(1, self.steps // 4) if self.relora_every is None else self.relora_every

    def resolved_relora_warmup(self) -> int:
        every = self.resolved_relora_every()
        return max(1, every // 10) if self.relora_warmup is None else self.relora_warmup

    def parsed_optimizer_options(self) -> dict[str, Any]:
        """``"moment_policy=project,adaptive_gap=true"`` → ``{"moment_policy": "project", "adaptive_gap": True}``."""
        options: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in self.optimizer_options.split(","))):
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--optimizer-options: {item!r} is not KEY=VALUE")
            key = key.strip()
            if key in _FLAG_OPTIONS:
                raise UsageError(f"--optimizer-options: {key!r} has a flag of its own; use {_FLAG_OPTIONS[key]}")
            options[key] = _parse_value(text.strip())
        return options

    def validate(self) -> None:
        """Every field checked before anything is built, each failure a `UsageError` naming the flag."""
        method = registry.get(self.method, "--method")

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                bound = "a non-negative" if allow_zero else "a positive"
                raise UsageError(f"--{name.replace('_', '-')}={value!r} must be {bound} integer")

        for name in ("steps", "batch_size", "grad_accum", "seq_len", "vocab_size", "val_tokens", "update_proj_gap"):
            positive(name)
        for name in ("eval_every", "log_every", "save_every", "max_skipped_steps"):
            positive(name, allow_zero=True)
        for name in ("warmup_steps", "rank", "relora_every", "relora_warmup"):
            if getattr(self, name) is not None:
                positive(name, allow_zero=name in ("warmup_steps", "relora_warmup"))
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr={self.lr!r} must be a positive number")
        for name, low, high in (("min_lr_ratio", 0.0, 1.0), ("lora_dropout", 0.0, 1.0), ("relora_prune", 0.0, 1.0),
                                ("val_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise UsageError(f"--{name.replace('_', '-')}={value!r} must be between {low} and {high}")
        for name in ("beta1", "beta2"):  # beta = 1 never forgets and divides by zero in the bias correction
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UsageError(f"--{name}={value!r} must be in [0, 1), e.g. 0.9 for beta1 and 0.999 for beta2")
        for name in ("weight_decay", "grad_clip", "scale", "lora_alpha"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"--{name.replace('_', '-')}={value!r} must be a non-negative number")
        from galore_mini.optim.projection import PROJ_TYPES

        if self.proj_type not in PROJ_TYPES:
            raise UsageError(f"--proj-type={self.proj_type!r}: use one of {', '.join(PROJ_TYPES)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise UsageError(f"--device={self.device!r}: use auto, cpu or cuda[:N]")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                             "--overwrite deletes it; give one")
        if self.fsdp_mixed_precision is not None:
            from galore_mini.train.sharded import MIXED_PRECISION

            if not self.fsdp:
                raise UsageError(f"--fsdp-mixed-precision={self.fsdp_mixed_precision} is FSDP2's policy; add --fsdp")
            if self.fsdp_mixed_precision not in MIXED_PRECISION:
                raise UsageError(f"--fsdp-mixed-precision={self.fsdp_mixed_precision!r}: use "
                                 f"{', '.join(MIXED_PRECISION)} (or leave it out for fp32)")
        if self.fsdp:
            from galore_mini.train.sharded import check_method

            check_method(self.method)
        options = self.parsed_optimizer_options()
        if options and method.kind == "adapter":
            raise UsageError(f"--optimizer-options apply to the optimizer methods, not to {self.method!r}")
        if options:
            check_optimizer_options(self.method, options, self.optimizer_options)


def check_optimizer_options(method: str, options: dict[str, Any], text: str) -> None:
    """Refuse `options` that do not fit, before any data is read: wrong types, then whatever the optimizer
    itself refuses when built over a two-layer stand-in model and stepped once (global RNG untouched)."""
    from galore_mini.optim.core import PROJECTION_DEFAULTS

    expected = {k: type(v) for k, v in PROJECTION_DEFAULTS.items() if v is not None} | {"eps": float}
    for key, value in options.items():
        kind = expected.get(key)
        if kind is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = isinstance(value, bool) if kind is bool else number if kind in (int, float) else isinstance(value, kind)
        if not ok:
            wanted = {bool: "true or false", str: "a word"}.get(kind, "a number")
            raise UsageError(f"--optimizer-options: {key}={value!r} must be {wanted}")
    key = (method, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key in _OPTIONS_CHECKED:  # validate() runs for make_config and again in train()
        return
    with optimizer_option_errors(text), torch.random.fork_rng(devices=[]):
        from transformers import LlamaConfig, LlamaForCausalLM

        import galore_mini as gm

        torch.manual_seed(0)
        stand_in = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2,
                                                max_position_embeddings=8))
        optimizer = gm.create_optimizer(stand_in, method, rank=2, **options)
        for p in stand_in.parameters():
            p.grad = torch.full_like(p, 1e-3)
        optimizer.step()
    _OPTIONS_CHECKED.add(key)


_OPTIONS_CHECKED: set[tuple] = set()


@contextlib.contextmanager
def optimizer_option_errors(text: str):
    """What the optimizer says about `--optimizer-options`, as one `UsageError` naming the flag."""
    try:
        yield
    except (UsageError, ValueError, TypeError, FloatingPointError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--optimizer-options={text!r}: {first}") from None


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(TrainConfig)}


def load_config_file(path: str) -> dict[str, Any]:
    """Fields from a ``.toml`` or ``.yaml``/``.yml`` file (keys may use dashes); unknown keys are an error."""
    if not os.path.isfile(path):
        raise UsageError(f"--config: no such file {path!r}")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                values = tomllib.load(f)
        elif path.endswith((".yaml", ".yml")):
            import yaml

            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        else:
            raise UsageError(f"--config: {path!r} must end in .toml, .yaml or .yml")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--config: cannot read {path!r} ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise UsageError(f"--config: cannot parse {path!r} ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config: {path!r} must hold a table of settings")
    known = config_fields()
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"--config: unknown setting {key!r} in {path!r}")
        out[name] = value
    return out


def make_config(file_values: dict[str, Any] | None = None, **flags: Any) -> TrainConfig:
    """Defaults ← config file ← explicit flags, type-checked against the dataclass."""
    values = {**(file_values or {}), **flags}
    known = config_fields()
    for name, value in values.items():
        if name not in known:
            raise UsageError(f"unknown setting {name!r}")
        default = known[name].default
        expected = type(default) if default is not None else None
        if value is None or expected is None:
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif expected is bool and not isinstance(value, bool):
            raise UsageError(f"setting {name}={value!r} must be true or false")
        elif expected in (int, str) and (not isinstance(value, expected) or isinstance(value, bool)):
            raise UsageError(f"setting {name}={value!r} must be {'an integer' if expected is int else 'a string'}")
    if isinstance(values.get("lr"), int) and not isinstance(values.get("lr"), bool):
        values["lr"] = float(values["lr"])
    config = TrainConfig(**values)
    config.validate()
    return config


# -- the learning-rate schedule -------------------------------------------------------------------------


def cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier for update `step` (0-based): linear warm-up to 1, then cosine to `min_ratio` at the end."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- distributed set-up -----------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the job (a single process when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def setup_distributed(device: str, fsdp: bool = False) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA).

    `fsdp` in a single process: a process group of one (FSDP2 needs a device mesh).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={device}: no CUDA device is available")
    if world <= 1:
        single = torch.device(device if device.startswith("cuda") else ("cuda" if use_cuda else "cpu"))
        if fsdp:
            from galore_mini.train.sharded import world_of_one_group

            if single.index is not None:
                torch.cuda.set_device(single)
            importlib.import_module("torch.distributed.nn.functional")  # see below
            world_of_one_group("nccl" if single.type == "cuda" else "gloo")
        return Dist(device=single)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # DistributedDataParallel imports torch.distributed.nn.functional, whose functions take
        # `group=group.WORLD` as a default argument: imported after init_process_group, those defaults
        # hold the world process group for the life of the interpreter, so destroy_process_group cannot
        # free it and gloo's worker and socket threads run on into interpreter shutdown (the intermittent
        # "terminate called without an active exception" at exit). Imported first, they hold None.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def leave_distributed(clean: bool = True) -> None:
    """Leave the process group, so that no communication thread outlives the interpreter.

    `clean` (the run succeeded on this process): first wait at a barrier, so no process tears its
    connections down while a peer may still send. After a failure there is no barrier (a peer may never
    arrive); torchrun stops the other processes. A no-op outside a process group.
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    gc.collect()  # anything in a reference cycle that still holds the group goes while Python is whole
    dist.destroy_process_group()


# -- run folder and checkpoints ----------------------------------------------------------------------------


def stale_temporaries(out: Path) -> list[Path]:
    """Half-written checkpoint files a killed run left behind."""
    return RunFolder(out).temporaries()


def on_main(dist_info: Dist, fn: Callable[[], Any]) -> Any:
    """`fn()` on process 0, its result on every process; a `UsageError` there is raised on every process.

    Decisions about the run folder are made once, so that every process acts on the same one and a
    refusal on process 0 does not leave the others waiting in a collective.
    """
    if not dist_info.enabled:
        return fn()
    import torch.distributed as tdist

    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if dist_info.is_main:
        try:
            outcome = [("ok", fn())]
        except UsageError as exc:
            outcome = [("error", str(exc))]
        except BaseException as exc:  # the others must not wait forever: tell them, then raise it here
            outcome, failure = [("error", f"process 0 failed: {type(exc).__name__}: {exc}")], exc
    tdist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    kind, value = outcome[0]
    if kind == "error":
        raise UsageError(value)
    return value


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_rng(dist_info: Dist) -> list[dict[str, torch.Tensor]]:
    mine = _rng_state(dist_info.device)
    if not dist_info.enabled:
        return [mine]
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(everyone, {k: v.cpu() for k, v in mine.items()})
    return everyone


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


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
        from galore_mini.train.sharded import shard_model  # torch.distributed's FSDP2, for --fsdp runs only

        model = shard_model(model, config.fsdp_mixed_precision)
    with optimizer_option_errors(config.optimizer_options) if config.optimizer_options else contextlib.nullcontext():
        optimizer = method.build_optimizer(model, settings)
    return model, optimizer, method.step_hooks(model, optimizer, settings)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), shared ones once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def _memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    from galore_mini.memory import optimizer_state_bytes, weights_bytes

    return weights_bytes(model), optimizer_state_bytes(optimizer)


# -- the loop ---------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What changes from step to step and must survive a resume (it is saved in every checkpoint)."""

    step: int = 0  # updates completed
    train_time: float = 0.0  # seconds spent in training steps (evaluation and saving excluded)
    skipped_steps: int = 0  # steps in which no parameter was updated (non-finite gradients)
    skipped_updates: int = 0  # parameter updates skipped, over all steps
    consecutive_skips: int = 0  # skipped steps in a row, up to the last step


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
    relora: Any
    stream: Any
    params: tuple[int, int]
    tokens_per_step: int
    trainable: list[torch.nn.Parameter]
    progress: Progress = dataclasses.field(default_factory=Progress)
    ddp_model: torch.nn.Module | None = None
    bar: Any = None
    window: _Window = dataclasses.field(default_factory=_Window)
    last_eval: EvalResult | None = None

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
    from galore_mini.train.data import prepare_data

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
        import torch.distributed as tdist

        def broadcast(t: torch.Tensor) -> None:
            tdist.broadcast(t, src=0)

    torch.manual_seed(config.seed)
    model, optimizer, relora = build_training(config, data.vocab_size, dist_info.device, broadcast)
    if config.fsdp:
        log(f"FSDP2: {dist_info.world_size} process(es), each decoder layer and the root sharded"
            + (f", {config.fsdp_mixed_precision} mixed precision" if config.fsdp_mixed_precision else ""))
    warmup = config.resolved_warmup()

    def lr_factor(step: int) -> float:
        factor = cosine_factor(step, config.steps, warmup, config.min_lr_ratio)
        return factor * relora.lr_factor(step) if relora is not None else factor

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    stream = data.train_stream(config.batch_size * dist_info.world_size, config.seed)
    tokens_per_step = config.batch_size * config.grad_accum * dist_info.world_size * config.seq_len
    return Run(config, dist_info, folder, log, data, model, optimizer, scheduler, relora, stream,
               count_parameters(model), tokens_per_step, [p for p in model.parameters() if p.requires_grad])


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
        from galore_mini.train import sharded
        from galore_mini.train.runs import DCP_META

        state = loaded["state"] if dist_info.is_main else folder.load(f"{name}/{DCP_META}", sharded=True)
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
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.stream.load_state_dict(state["data"])
    _set_rng_state(state["rng"][dist_info.rank], dist_info.device)
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
        from torch.nn.parallel import DistributedDataParallel

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
    skipped = _optimizer_step(run.optimizer, trainable, norm, updatable)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.relora is not None:
        run.relora.after_step(step)
    if dist_info.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(step_loss)
        step_loss /= dist_info.world_size
    loss_value = float(step_loss)
    if not math.isfinite(loss_value):
        _log_metrics(run.folder.metrics, dist_info, kind="diverged", step=step + 1, loss=loss_value)
        raise TrainingDiverged(f"the training loss became {loss_value} at step {step + 1}; lower --lr "
                               f"(now {config.resolved_lr():g}) or raise --warmup-steps")
    return StepOutcome(loss_value, step_lr, time.perf_counter() - started, skipped, updatable)


def _optimizer_step(optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                    norm: torch.Tensor | None, updatable: int) -> int:
    """Step `optimizer`; how many parameter updates were skipped for non-finite gradients.

    Our optimizers skip and count per parameter (``nonfinite_skips``). torch's do not look: there the
    whole update is skipped when the global gradient norm is not finite, so a NaN never reaches the
    weights of any method.
    """
    before = getattr(optimizer, "nonfinite_skips", None)
    if before is None:
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of DTensor gradients is a DTensor
            norm = norm.full_tensor()
        if not math.isfinite(float(norm)):
            return updatable
        optimizer.step()
        return 0
    optimizer.step()
    return optimizer.nonfinite_skips - before


def after_step(run: Run, outcome: StepOutcome) -> None:
    """Count the step, update the bar, and log, stop on a stall, evaluate and save when due."""
    config, progress, window = run.config, run.progress, run.window
    progress.step += 1
    done = progress.step
    progress.train_time += outcome.seconds
    progress.skipped_updates += outcome.skipped
    stalled = outcome.updatable > 0 and outcome.skipped >= outcome.updatable
    progress.skipped_steps += stalled
    progress.consecutive_skips = progress.consecutive_skips + 1 if stalled else 0
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
    if config.max_skipped_steps and progress.consecutive_skips >= config.max_skipped_steps:
        _log_metrics(run.folder.metrics, run.dist, kind="diverged", step=done, skipped_steps=progress.skipped_steps,
                     skipped_updates=progress.skipped_updates)
        raise TrainingDiverged(
            f"diverged: every update of the last {progress.consecutive_skips} steps (to step {done}) was skipped "
            f"for non-finite gradients, so the model stopped learning; lower --lr (now {config.resolved_lr():g}) "
            f"or raise --warmup-steps (--max-skipped-steps={config.max_skipped_steps} sets how many such steps stop "
            "a run)")
    if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
        run.last_eval = run_eval(run)
    if (config.save_every and done % config.save_every == 0) or done == config.steps:
        save(run)


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
    rng = _gather_rng(run.dist)
    progress = run.progress
    if run.config.fsdp:
        from galore_mini.train import sharded

        meta = {"format": CHECKPOINT_FORMAT, "step": progress.step, "config": asdict(run.config),
                "scheduler": run.scheduler.state_dict(), "data": run.stream.state_dict(), "rng": rng,
                "train_time": progress.train_time, "progress": asdict(progress), "world_size": run.dist.world_size}
        sharded.save_checkpoint(run.folder, run.model, run.optimizer, meta, run.dist.is_main, run.dist.barrier)
        return
    if run.dist.is_main:
        run.folder.save({"format": CHECKPOINT_FORMAT, "step": progress.step, "config": asdict(run.config),
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
        from galore_mini.train import sharded

        weights, optimizer_bytes = sharded.memory(run.model, run.optimizer)
    else:
        weights, optimizer_bytes = _memory(run.model, run.optimizer)
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
    free = _RESUME_FREE | ({"batch_size"} if resharded else set())
    differing = sorted(name for name, value in asdict(config).items()
                       if name not in free and name in saved and saved[name] != value)
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
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=f"{config.method}", dynamic_ncols=True, file=sys.stderr)
