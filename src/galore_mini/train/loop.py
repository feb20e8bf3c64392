"""The pretraining loop, nanoGPT-style: one config dataclass, one explicit loop.

    config = TrainConfig(method="galore_mini", model="tiny", steps=500, out="runs/x")
    result = train(config)          # -> dict with val_loss, val_ppl, tokens_per_s, memory …

What a step is: ``grad_accum`` micro-batches of ``batch_size`` rows (per process) of
``seq_len`` tokens, loss averaged, gradients clipped to ``grad_clip`` (global norm),
one optimizer update, one scheduler step. The learning rate follows a linear
warm-up over ``warmup_steps`` (default 10% of ``steps``) and a cosine down to
``min_lr_ratio`` (0.1) of the peak at the last step, as in the GaLore paper;
ReLoRA multiplies it by its jagged restart factor.

Every ``eval_every`` steps (and at the end) the fixed validation rows are scored:
val loss and ``ppl = exp(mean loss)``. Progress goes to a tqdm bar (loss, ppl,
tokens/s) and every ``log_every`` steps a line to ``out/metrics.jsonl``.

Checkpoints (``out/checkpoint.pt``, every ``save_every`` steps and at the end) hold
the model, optimizer, scheduler, data position, every process's RNG state, the
config and the training time. They are written atomically: a temporary file in
the same folder, ``fsync``, ``os.replace``, ``fsync`` of the folder — a crash
mid-write leaves the previous checkpoint intact and a ``*.tmp-*`` file that the
next ``resume`` deletes. ``resume=True`` continues from the checkpoint and ends
bit-for-bit where the uninterrupted run would have (CPU; same world size), the
metrics log cut back to the checkpoint's step so no line appears twice.

DDP: under ``torchrun --nproc_per_node N`` the loop joins the process group
(``gloo`` on CPU, ``nccl`` on GPU), wraps the model in ``DistributedDataParallel``,
gives each process its slice of every global micro-batch, and lets process 0
write logs and checkpoints. ``batch_size`` is per process, so the global batch is
``batch_size × grad_accum × world_size`` rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from galore_mini.errors import UsageError
from galore_mini.train.baselines import ADAPTER_METHODS, LORA_ALPHA, LORA_DROPOUT, RELORA_PRUNE
from galore_mini.train.evaluate import EvalResult, evaluate, perplexity

OPTIMIZER_METHODS = ("full", "adam_mini", "galore", "galore_mini", "galore_mini_a1", "galore_mini_a2",
                     "galore_adafactor", "galore_8bit", "galore_mini_8bit")
METHODS = OPTIMIZER_METHODS + ADAPTER_METHODS
_PROJECTED = {"galore", "galore_mini", "galore_mini_a1", "galore_mini_a2", "galore_adafactor", "galore_8bit",
              "galore_mini_8bit"}
_RANKED = _PROJECTED | set(ADAPTER_METHODS)

# Peak learning rates per method. The GaLore family keeps the paper's 1e-2 (scale 0.25) at every size;
# the others are the best of a sweep over {1e-3, 3e-3, 1e-2} on `tiny` (300 steps, default corpus),
# as the paper tuned its baselines — see docs/pretraining.md for the table.
DEFAULT_LR = {
    "full": 3e-3,
    "adam_mini": 1e-3,
    "galore": 1e-2,
    "galore_mini": 1e-2,
    "galore_mini_a1": 1e-2,
    "galore_mini_a2": 1e-2,
    "galore_adafactor": 1e-2,
    "galore_8bit": 1e-2,
    "galore_mini_8bit": 1e-2,
    "low_rank": 1e-3,
    "lora": 3e-3,
    "relora": 1e-3,
}

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "final.json"
CHECKPOINT_FORMAT = 1
# fields that may differ between a run and its resumption (they do not change the trajectory)
_RESUME_FREE = {"resume", "progress", "out", "save_every", "log_every", "cache_dir", "device"}


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
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    progress: bool = True

    # -- derived values -------------------------------------------------------------------------

    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    def resolved_rank(self) -> int:
        if self.rank is not None:
            return self.rank
        from galore_mini.train.memory import default_rank

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
            options[key.strip()] = _parse_value(text.strip())
        return options

    def validate(self) -> None:
        """Every field checked before anything is built, each failure a `UsageError` naming the flag."""
        if self.method not in METHODS:
            raise UsageError(f"--method={self.method!r} is unknown; use one of {', '.join(METHODS)}")

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                bound = "a non-negative" if allow_zero else "a positive"
                raise UsageError(f"--{name.replace('_', '-')}={value!r} must be {bound} integer")

        for name in ("steps", "batch_size", "grad_accum", "seq_len", "vocab_size", "val_tokens", "update_proj_gap"):
            positive(name)
        for name in ("eval_every", "log_every", "save_every"):
            positive(name, allow_zero=True)
        for name in ("warmup_steps", "rank", "relora_every", "relora_warmup"):
            if getattr(self, name) is not None:
                positive(name, allow_zero=name in ("warmup_steps", "relora_warmup"))
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr={self.lr!r} must be a positive number")
        for name, low, high in (("min_lr_ratio", 0.0, 1.0), ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0),
                                ("lora_dropout", 0.0, 1.0), ("relora_prune", 0.0, 1.0), ("val_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise UsageError(f"--{name.replace('_', '-')}={value!r} must be between {low} and {high}")
        for name in ("weight_decay", "grad_clip", "scale", "lora_alpha"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be non-negative")
        options = self.parsed_optimizer_options()
        if options and self.method in ADAPTER_METHODS:
            raise UsageError(f"--optimizer-options apply to the optimizer methods, not to {self.method!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise UsageError(f"--device={self.device!r}: use auto, cpu or cuda[:N]")


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


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={device}: no CUDA device is available")
    if world <= 1:
        return Dist(device=torch.device(device if device.startswith("cuda") else ("cuda" if use_cuda else "cpu")))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


# -- checkpoints ----------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside `path`, fsync, rename over `path`, fsync the folder.

    A crash at any point leaves either the old file or the new one at `path`, never half of one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def stale_temporaries(out: Path) -> list[Path]:
    """Half-written checkpoint files a killed run left behind."""
    return sorted(out.glob(CHECKPOINT + ".tmp-*"))


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
    """(model, optimizer, ReLoRA or None) for `config`: the model seeded by ``config.seed``, same init for every method."""
    import galore_mini as gm
    from galore_mini.train import baselines
    from galore_mini.train.model import build_model

    model = build_model(config.model, vocab_size=vocab_size, seed=config.seed)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and config.seq_len > max_positions:
        raise UsageError(f"--seq-len={config.seq_len} exceeds the model's max_position_embeddings={max_positions}")
    rank = config.resolved_rank()
    if config.method in _RANKED:
        baselines.check_rank(model, rank)
    if config.method in ADAPTER_METHODS:
        model = baselines.build_baseline(config.method, model, rank, lora_alpha=config.lora_alpha,
                                         lora_dropout=config.lora_dropout)
    model.to(device)
    betas = (config.beta1, config.beta2)
    lr = config.resolved_lr()
    if config.method in ADAPTER_METHODS:
        optimizer = gm.create_optimizer(model, "full", lr=lr, weight_decay=config.weight_decay, betas=betas)
    else:
        optimizer = gm.create_optimizer(model, config.method, lr=lr, rank=rank, update_proj_gap=config.update_proj_gap,
                                        scale=config.scale, weight_decay=config.weight_decay, betas=betas,
                                        proj_type=config.proj_type, **config.parsed_optimizer_options())
    relora = None
    if config.method == "relora":
        relora = baselines.ReLoRA(model, optimizer, config.resolved_relora_every(), config.resolved_relora_warmup(),
                                  config.relora_prune, broadcast=broadcast)
    return model, optimizer, relora


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
    from galore_mini.train.memory import optimizer_state_bytes, weights_bytes

    return weights_bytes(model), optimizer_state_bytes(optimizer)


# -- the loop ---------------------------------------------------------------------------------------------


def train(config: TrainConfig, data=None, *, on_step: Callable[[int], None] | None = None,
          load_dataset: Callable | None = None) -> dict[str, Any]:
    """Run (or resume) one pretraining run; returns the final metrics (also written to ``out/final.json``).

    `data`: an already prepared :class:`galore_mini.train.data.PretrainData` (``compare`` shares one
    across methods); `on_step(step)` is called after every completed update (tests inject faults
    there); `load_dataset` stands in for ``datasets.load_dataset`` for ``--data c4``.
    """
    from galore_mini.train.data import prepare_data

    config.validate()
    dist_info = setup_distributed(config.device)
    out = Path(config.out)
    log = _logger(dist_info.is_main)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist_info.barrier()

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
    total_params, trainable_params = count_parameters(model)
    warmup = config.resolved_warmup()

    def lr_factor(step: int) -> float:
        factor = cosine_factor(step, config.steps, warmup, config.min_lr_ratio)
        return factor * relora.lr_factor(step) if relora is not None else factor

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    stream = data.train_stream(config.batch_size * dist_info.world_size, config.seed)

    start_step, train_time = 0, 0.0
    checkpoint_path = out / CHECKPOINT
    metrics_path = out / METRICS
    if config.resume:
        if dist_info.is_main:
            for tmp in stale_temporaries(out):
                log(f"removing {tmp.name}, a checkpoint write that did not finish")
                tmp.unlink()
        if checkpoint_path.exists():
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            _check_resumable(config, state, dist_info)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            stream.load_state_dict(state["data"])
            _set_rng_state(state["rng"][dist_info.rank], dist_info.device)
            start_step, train_time = int(state["step"]), float(state["train_time"])
            if dist_info.is_main:
                _truncate_metrics(metrics_path, start_step)
            log(f"resumed from {checkpoint_path} at step {start_step}")
            del state
        else:
            log(f"no checkpoint in {out}; starting from scratch")
    if start_step == 0 and dist_info.is_main:
        metrics_path.write_text("")
    dist_info.barrier()

    ddp_model = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda"
                                            else None)
    autocast_dtype = torch.bfloat16 if config.bf16 else None
    tokens_per_step = config.batch_size * config.grad_accum * dist_info.world_size * config.seq_len
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = _progress_bar(config, start_step, dist_info.is_main)
    last_eval: EvalResult | None = None
    window_tokens, window_time, window_loss, window_steps = 0, 0.0, 0.0, 0

    def run_eval(step: int) -> EvalResult:
        result = evaluate(model, data.val, config.batch_size, dist_info.device, autocast_dtype,
                          dist_info.rank, dist_info.world_size)
        _log_metrics(metrics_path, dist_info, kind="eval", step=step, tokens=step * tokens_per_step,
                     val_loss=result.loss, val_ppl=result.ppl)
        message = f"step {step}: val loss {result.loss:.4f}, val ppl {result.ppl:.2f}"
        if bar is not None:
            bar.write(message, file=sys.stderr)
        else:
            log(message)
        return result

    def save(step: int) -> None:
        rng = _gather_rng(dist_info)
        if dist_info.is_main:
            atomic_save({"format": CHECKPOINT_FORMAT, "step": step, "config": asdict(config),
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "data": stream.state_dict(), "rng": rng,
                         "train_time": train_time, "world_size": dist_info.world_size}, checkpoint_path)
        dist_info.barrier()

    model.train()
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        step_loss = torch.zeros((), device=dist_info.device)
        for micro in range(config.grad_accum):
            batch = stream.next()
            rows = batch[dist_info.rank * config.batch_size:(dist_info.rank + 1) * config.batch_size]
            rows = rows.to(dist_info.device, non_blocking=True)
            last = micro == config.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not dist_info.enabled) else ddp_model.no_sync()
            with sync:
                with torch.autocast(dist_info.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = ddp_model(input_ids=rows, labels=rows).loss / config.grad_accum
                loss.backward()
            step_loss += loss.detach()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if relora is not None:
            relora.after_step(step)
        if dist_info.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(step_loss)
            step_loss /= dist_info.world_size
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"the training loss became {loss_value} at step {step + 1}; lower --lr "
                             f"(now {config.resolved_lr():g}) or raise --warmup-steps")
        elapsed = time.perf_counter() - started
        train_time += elapsed
        done = step + 1
        window_tokens += tokens_per_step
        window_time += elapsed
        window_loss += loss_value
        window_steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", ppl=f"{perplexity(loss_value):.1f}",
                            tok_s=f"{tokens_per_step / max(elapsed, 1e-9):.0f}", refresh=False)
        if config.log_every and (done % config.log_every == 0 or done == config.steps):
            _log_metrics(metrics_path, dist_info, kind="train", step=done, tokens=done * tokens_per_step,
                         loss=window_loss / window_steps, lr=step_lr,
                         tokens_per_s=window_tokens / max(window_time, 1e-9))
            window_tokens, window_time, window_loss, window_steps = 0, 0.0, 0.0, 0
        if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
            last_eval = run_eval(done)
        if (config.save_every and done % config.save_every == 0) or done == config.steps:
            save(done)
        if on_step is not None:
            on_step(done)
    if bar is not None:
        bar.close()

    if last_eval is None:  # resumed a finished run: nothing trained, score it again
        last_eval = evaluate(model, data.val, config.batch_size, dist_info.device, autocast_dtype,
                             dist_info.rank, dist_info.world_size)
    weights, optimizer_bytes = _memory(model, optimizer)
    result = {
        "method": config.method, "model": config.model, "val_loss": last_eval.loss, "val_ppl": last_eval.ppl,
        "steps": config.steps, "tokens": config.steps * tokens_per_step,
        "tokens_per_s": config.steps * tokens_per_step / max(train_time, 1e-9), "train_time_s": train_time,
        "weights_bytes": weights, "optimizer_bytes": optimizer_bytes, "params": total_params,
        "trainable_params": trainable_params, "lr": config.resolved_lr(),
        "rank": config.resolved_rank() if config.method in _RANKED else None,
        "update_proj_gap": config.update_proj_gap if config.method in _PROJECTED else None,
        "world_size": dist_info.world_size, "val_tokens": last_eval.tokens, "vocab_size": data.vocab_size,
        "seq_len": config.seq_len, "seed": config.seed,
    }
    if dist_info.is_main:
        (out / FINAL).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _check_resumable(config: TrainConfig, state: dict, dist_info: Dist) -> None:
    saved = state.get("config", {})
    differing = sorted(name for name, value in asdict(config).items()
                       if name not in _RESUME_FREE and name in saved and saved[name] != value)
    if differing:
        detail = ", ".join(f"{n}: checkpoint {saved[n]!r}, now {getattr(config, n)!r}" for n in differing)
        raise UsageError(f"--resume: the checkpoint in {config.out} was made with other settings ({detail}); "
                         "use the same settings or another --out")
    if int(state.get("world_size", 1)) != dist_info.world_size:
        raise UsageError(f"--resume: the checkpoint was written by {state.get('world_size')} processes, "
                         f"this run has {dist_info.world_size}; resume with the same --nproc_per_node")


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
