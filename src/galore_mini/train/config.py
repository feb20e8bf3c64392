"""The settings of both training loops: one small dataclass per component, a docstring under every field.

A loop's config (:class:`TrainConfig` for pretraining, :class:`FinetuneConfig` for fine-tuning)
is a few top-level choices plus components (torchtitan's layout): the data, the batch, the
optimizer, the projection, the schedule, the adapters, checkpoints and logs, the output and the
hardware. The two loops share the components they have in common (:class:`ProjectionConfig`,
:class:`BatchConfig`, :class:`OutputConfig`), each with its own defaults.

The docstring under a field is its help text: :func:`field_help` reads it from the source, and
the command line (:mod:`galore_mini.cli.pretrain`) makes one flag per field from it, with the
field's type and default. Every field is also reachable by its flat name, as flags, config files
and checkpoints spell it (``config.lr`` is ``config.optimizer.lr``), and a config is built from flat
names too::

    >>> from galore_mini.train.config import TrainConfig
    >>> config = TrainConfig(method="galore", steps=50, lr=0.01)
    >>> config.optimizer.lr, config.lr, config.training.steps
    (0.01, 0.01, 50)
    >>> config.flat()["proj_type"]
    'std'

Validation (:meth:`TrainConfig.validate`) checks every field before any data is read; each failure
is one :class:`~galore_mini.errors.UsageError` naming the flag and the fix.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import math
import os
import textwrap
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

import torch

from galore_mini import methods as registry
from galore_mini.errors import UsageError
from galore_mini.models import default_rank, model_config
from galore_mini.optim.core import PROJECTION_DEFAULTS
from galore_mini.optim.groups import create_optimizer
from galore_mini.optim.projection import PROJ_TYPES
from galore_mini.methods import LORA_ALPHA, LORA_DROPOUT, RELORA_PRUNE
from galore_mini.train.sharded import MIXED_PRECISION, check_method

# create_optimizer keywords that have flags of their own
_FLAG_OPTIONS = {"lr": "--lr", "rank": "--rank", "update_proj_gap": "--update-proj-gap", "scale": "--scale",
                 "weight_decay": "--weight-decay", "betas": "--beta1/--beta2", "proj_type": "--proj-type",
                 "method": "--method", "model": "--model"}

# -- reading the field docstrings ---------------------------------------------------------------------------


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """``{field: the docstring under it}`` of the dataclass `cls`, read from its source (empty without one)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): flags without help text
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag(name: str) -> str:
    """``warmup_steps`` → ``--warmup-steps``."""
    return "--" + name.replace("_", "-")


def value_type(cls: type, name: str) -> type | None:
    """int, float, str or bool: the type a field's annotation names first (None for anything else)."""
    annotation = {f.name: f.type for f in fields(cls)}[name]
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    for kind in (bool, int, float, str):
        if text.split("|")[0].strip() == kind.__name__:
            return kind
    return None


# -- components and the flat view over them -----------------------------------------------------------------


def _is_component(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())


def settings(cls):
    """Class decorator over a dataclass with components: flat attributes, a flat constructor, :meth:`flat`.

    ``cls(**values)`` takes top-level fields, whole components, or any component field by its own
    name; ``obj.name`` reads and writes a component field by its name. Field names are unique across
    the components, so a flat name says which component it belongs to.
    """
    cls = dataclass(init=False)(cls)
    owners: dict[str, str] = {}
    for f in fields(cls):
        if _is_component(f):
            for leaf in fields(f.default_factory()):
                owners[leaf.name] = f.name
                setattr(cls, leaf.name, property(
                    lambda self, c=f.name, n=leaf.name: getattr(getattr(self, c), n),
                    lambda self, value, c=f.name, n=leaf.name: setattr(getattr(self, c), n, value)))

    def __init__(self, **values: Any) -> None:
        for f in fields(cls):
            if _is_component(f):
                part = values.pop(f.name, None) or f.default_factory()
                own = {n: values.pop(n) for n in [n for n, c in owners.items() if c == f.name and n in values]}
                setattr(self, f.name, dataclasses.replace(part, **own) if own else part)
            elif f.name in values:
                setattr(self, f.name, values.pop(f.name))
            elif f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
            else:
                raise TypeError(f"{cls.__name__}() needs {f.name!r}")
        if values:
            raise TypeError(f"{cls.__name__}() got unknown settings: {', '.join(sorted(values))}")

    cls.__init__ = __init__
    cls.owners = owners
    return cls


def leaves(config_or_cls) -> Iterator[tuple[type, dataclasses.Field, Any]]:
    """(the dataclass that declares it, the field, its default) for every flat field, in declaration order."""
    instance = config_or_cls() if isinstance(config_or_cls, type) else config_or_cls
    for f in fields(instance):
        if _is_component(f):
            part = getattr(instance, f.name)
            for leaf in fields(part):
                yield type(part), leaf, getattr(part, leaf.name)
        else:
            yield type(instance), f, getattr(instance, f.name)


class FlatSettings:
    """What both configs offer: :meth:`flat`, the inverse of the flat constructor."""

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (what config files, flags and checkpoints use)."""
        return {f.name: getattr(self, f.name) for _, f, _ in leaves(self)}


# -- components shared by both loops -------------------------------------------------------------------------


@dataclass
class ProjectionConfig:
    """GaLore's low-rank projection (and the rank of the adapter baselines)."""

    rank: int | None = None
    """GaLore / low-rank / LoRA rank (default: per model size, 32 for tiny)"""
    update_proj_gap: int = 200
    """GaLore subspace refresh interval T"""
    scale: float | None = 0.25
    """GaLore scale alpha"""


@dataclass
class BatchConfig:
    """What one update sees, and how its gradient is bounded."""

    batch_size: int = 16
    """rows per micro-batch per process"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: off)"""


@dataclass
class OutputConfig:
    """Where a run writes and what it runs on."""

    out: str = "runs/pretrain"
    """run folder: metrics.jsonl, checkpoint.pt, final.json"""
    device: str = "auto"
    """auto, cpu or cuda[:N]"""
    progress: bool = True
    """progress bar"""


# -- pretraining's own components -----------------------------------------------------------------------------


@dataclass
class DataConfig:
    """The corpus, its tokenizer and the validation set (see :mod:`galore_mini.train.data`)."""

    data: str | None = None
    """text file, folder of .txt/.jsonl, or 'c4' (default: the Python docs from python3.11-doc, else the standard
    library's sources)"""
    tokenizer: str | None = None
    """pretrained tokenizer (tokenizer.json, folder or hub name); default: BPE trained on the data"""
    vocab_size: int = 8192
    """vocabulary of the trained BPE"""
    seq_len: int = 128
    """tokens per row"""
    val_fraction: float = 0.05
    """share of documents held out for validation"""
    val_tokens: int = 65536
    """validation tokens scored (a fixed set)"""
    cache_dir: str | None = None
    """where tokenizer and token ids are cached (default: beside the data, or ~/.cache/galore-mini)"""


@dataclass
class TrainingConfig:
    """How long the run is, what a step accumulates, and when a run that no longer learns stops."""

    grad_accum: int = 1
    """micro-batches per optimizer step"""
    steps: int = 500
    """optimizer steps"""
    max_skipped_steps: int = 20
    """stop as diverged after this many consecutive steps whose every update was skipped for non-finite gradients
    (0: never)"""
    max_dead_steps: int = 5
    """stop as diverged after this many consecutive steps whose training loss is at or above ln(vocabulary), the
    loss of a uniform guess, with every gradient exactly zero: a model that no longer learns (0: never)"""
    divergence_factor: float = 10.0
    """stop as diverged when the training loss rises above ln(vocabulary) and above this multiple of its lowest
    value so far (0: never)"""


@dataclass
class OptimizerConfig:
    """The optimizer's own settings (the method picks the optimizer)."""

    lr: float | None = None
    """peak learning rate (default: per method, see docs/pretraining.md)"""
    weight_decay: float = 0.0
    """decoupled weight decay (not on norms and biases)"""
    beta1: float = 0.9
    """Adam beta1"""
    beta2: float = 0.999
    """Adam beta2"""
    proj_type: str = "std"
    """GaLore projection side: std, reverse_std, left, right, full"""
    optimizer_options: str = ""
    """extra gm.create_optimizer options as KEY=VALUE,... (e.g. moment_policy=project,proj_method=power); optimizer
    methods only"""


@dataclass
class ScheduleConfig:
    """The learning-rate schedule: linear warm-up, then cosine to a floor (the GaLore paper's)."""

    warmup_steps: int | None = None
    """linear warm-up steps (default: 10% of --steps)"""
    min_lr_ratio: float = 0.1
    """cosine schedule ends at this fraction of the peak"""


@dataclass
class AdapterConfig:
    """The adapter baselines' settings (LoRA, ReLoRA)."""

    lora_alpha: float = LORA_ALPHA
    """LoRA alpha"""
    lora_dropout: float = LORA_DROPOUT
    """LoRA dropout"""
    relora_every: int | None = None
    """ReLoRA: merge and restart every N steps (default: --steps/4)"""
    relora_warmup: int | None = None
    """ReLoRA: LR re-warm-up steps after a restart (default: a tenth of --relora-every)"""
    relora_prune: float = RELORA_PRUNE
    """ReLoRA: fraction of adapter moments zeroed by magnitude at a restart"""


@dataclass
class CheckpointConfig:
    """Evaluation, logging, checkpoints and what happens to a run already in the folder."""

    eval_every: int = 100
    """validate every N steps (0: only at the end)"""
    log_every: int = 10
    """write a metrics line every N steps"""
    save_every: int = 100
    """checkpoint every N steps (0: only at the end)"""
    resume: bool = False
    """continue from OUT/checkpoint.pt (or checkpoint.prev.pt when the newest is unreadable)"""
    overwrite: bool = False
    """delete the run already in OUT and start again (without it, an OUT holding a run is refused)"""
    allow_new_data: bool = False
    """with --resume: go on over data that changed since the checkpoint (documents added on purpose); the rows
    already trained on count as done; the tokenizer must stay the same (runs started with --tokenizer)"""


@dataclass
class HardwareConfig:
    """Seed, precision and parallelism."""

    seed: int = 0
    """seed of the initial weights and the data order"""
    bf16: bool = False
    """bfloat16 autocast"""
    fsdp: bool = False
    """under torchrun: shard the model with FSDP2 (each decoder layer and the root) instead of DDP; checkpoints
    become DCP folders (OUT/checkpoint-dcp/)"""
    fsdp_mixed_precision: str | None = None
    """with --fsdp: bf16 (compute in bfloat16, reduce gradients in fp32; default: fp32)"""


# fields that may differ between a run and its resumption (they do not change the trajectory)
RESUME_FREE = {"resume", "overwrite", "progress", "out", "save_every", "log_every", "cache_dir", "device",
               "max_skipped_steps", "max_dead_steps", "divergence_factor", "allow_new_data"}


@settings
class TrainConfig(FlatSettings):
    """Everything a pretraining run depends on; flags and TOML/YAML files map onto the flat field names."""

    model: str = "tiny"
    """named size (tiny, llama_20m, llama_60m, llama_130m, llama_350m, llama_1b, llama_7b) or a JSON LlamaConfig
    path"""
    method: str = "galore_mini"
    """optimizer or baseline (see docs/pretraining.md)"""
    dataset: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    # -- derived values -------------------------------------------------------------------------

    def resolved_lr(self) -> float:
        return registry.get(self.method, "--method").default_lr if self.lr is None else self.lr

    def resolved_rank(self) -> int:
        return default_rank(self.model) if self.rank is None else self.rank

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
            options[key] = parse_value(text.strip())
        return options

    def validate(self) -> None:
        """Every field checked before anything is built, each failure a `UsageError` naming the flag."""
        method = registry.get(self.method, "--method")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "vocab_size", "val_tokens", "update_proj_gap"):
            check_count(name, getattr(self, name))
        for name in ("eval_every", "log_every", "save_every", "max_skipped_steps", "max_dead_steps"):
            check_count(name, getattr(self, name), allow_zero=True)
        for name in ("warmup_steps", "rank", "relora_every", "relora_warmup"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name), allow_zero=name in ("warmup_steps", "relora_warmup"))
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr={self.lr!r} must be a positive number")
        for name in ("min_lr_ratio", "lora_dropout", "relora_prune", "val_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{flag(name)}={value!r} must be between 0.0 and 1.0")
        for name in ("beta1", "beta2"):  # beta = 1 never forgets and divides by zero in the bias correction
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UsageError(f"--{name}={value!r} must be in [0, 1), e.g. 0.9 for beta1 and 0.999 for beta2")
        for name in ("weight_decay", "grad_clip", "scale", "lora_alpha", "divergence_factor"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"{flag(name)}={value!r} must be a non-negative number")
        if self.proj_type not in PROJ_TYPES:
            raise UsageError(f"--proj-type={self.proj_type!r}: use one of {', '.join(PROJ_TYPES)}")
        check_device(self.device)
        self.check_model()
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                             "--overwrite deletes it; give one")
        if self.fsdp_mixed_precision is not None:
            if not self.fsdp:
                raise UsageError(f"--fsdp-mixed-precision={self.fsdp_mixed_precision} is FSDP2's policy; add --fsdp")
            if self.fsdp_mixed_precision not in MIXED_PRECISION:
                raise UsageError(f"--fsdp-mixed-precision={self.fsdp_mixed_precision!r}: use "
                                 f"{', '.join(MIXED_PRECISION)} (or leave it out for fp32)")
        if self.fsdp:
            check_method(self.method)
        options = self.parsed_optimizer_options()
        if options and method.kind == "adapter":
            raise UsageError(f"--optimizer-options apply to the optimizer methods, not to {self.method!r}")
        if options:
            check_optimizer_options(self.method, options, self.optimizer_options)

    def check_model(self) -> None:
        """The model config checked before any data is read (its vocabulary comes from the tokenizer later)."""
        checked = model_config(self.model, vocab_size=self.vocab_size)
        max_positions = getattr(checked, "max_position_embeddings", None)
        if max_positions is not None and self.seq_len > max_positions:
            raise UsageError(f"--seq-len={self.seq_len} exceeds the model's max_position_embeddings={max_positions}")

    def differences(self, saved: dict[str, Any], free: set[str] = frozenset()) -> list[str]:
        """The flat fields whose value in `saved` (a checkpoint's settings) differs from this config's,
        leaving out those in :data:`RESUME_FREE` and `free`."""
        return sorted(name for name, value in self.flat().items()
                      if name not in RESUME_FREE | set(free) and name in saved and saved[name] != value)


# -- shared checks ------------------------------------------------------------------------------------------


def check_count(name: str, value: Any, allow_zero: bool = False) -> None:
    """A `UsageError` unless `value` is a positive (or, with `allow_zero`, non-negative) integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        bound = "a non-negative" if allow_zero else "a positive"
        raise UsageError(f"{flag(name)}={value!r} must be {bound} integer")


def check_device(device: str) -> None:
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise UsageError(f"--device={device!r}: use auto, cpu or cuda[:N]")


def check_optimizer_options(method: str, options: dict[str, Any], text: str) -> None:
    """Refuse `options` that do not fit, before any data is read: wrong types, then whatever the optimizer
    itself refuses when built over a two-layer stand-in model and stepped once (global RNG untouched)."""
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
        from transformers import LlamaConfig, LlamaForCausalLM  # heavy: only when options are given

        torch.manual_seed(0)
        stand_in = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2,
                                                max_position_embeddings=8))
        optimizer = create_optimizer(stand_in, method, rank=2, **options)
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


def parse_value(text: str) -> Any:
    """``"true"`` → True, ``"none"`` → None, ``"3"`` → 3, ``"1e-3"`` → 0.001, anything else the text."""
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


# -- files and flags → a TrainConfig -------------------------------------------------------------------------


def config_fields() -> dict[str, dataclasses.Field]:
    """Every flat field of :class:`TrainConfig` by name, in declaration order."""
    return {f.name: f for _, f, _ in leaves(TrainConfig)}


def load_config_file(path: str) -> dict[str, Any]:
    """Fields from a ``.toml`` or ``.yaml``/``.yml`` file (keys may use dashes); unknown keys are an error."""
    if not os.path.isfile(path):
        raise UsageError(f"--config: no such file {path!r}")
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as f:
                values = tomllib.load(f)
        elif path.endswith((".yaml", ".yml")):
            import yaml  # optional: only YAML config files need it

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
    """Defaults ← config file ← explicit flags, type-checked against the fields' defaults, then validated."""
    values = {**(file_values or {}), **flags}
    defaults = {f.name: default for _, f, default in leaves(TrainConfig)}
    for name, value in values.items():
        if name not in defaults:
            raise UsageError(f"unknown setting {name!r}")
        expected = type(defaults[name]) if defaults[name] is not None else None
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


# -- fine-tuning --------------------------------------------------------------------------------------------

#: the methods with a fine-tuning recipe (those the registry gives a `finetune_lr`) and the default subset
FINETUNE_METHODS = registry.FINETUNE_METHODS
FINETUNE_DEFAULT_METHODS = registry.FINETUNE_DEFAULT_METHODS
DEFAULT_GAP = registry.FINETUNE_GAP


@settings
class FinetuneConfig(FlatSettings):
    """Everything a fine-tuning comparison depends on (the command line maps onto these fields)."""

    model: str
    """Hugging Face model folder or hub id, or a `galore-mini pretrain --out` folder"""
    task: str | None = None
    """CSV/TSV/JSONL file, a folder with train.* and validation.*, glue/<name>; None: the offline Debian task"""
    val: str | None = None
    """validation file for a task file (default: a deterministic 10%)"""
    methods: tuple[str, ...] = FINETUNE_DEFAULT_METHODS
    """the methods compared, in this order"""
    layerwise: bool = False
    """galore_mini updates each weight inside backward()"""
    freeze_embeddings: bool = False
    """freeze the embeddings in lora/galore/galore_mini (default: every method trains them)"""
    epochs: int = 3
    """passes over the training examples"""
    lr: dict[str, float] = field(default_factory=dict)
    """peak LR per method; a method left out gets the registry's finetune_lr"""
    max_length: int | None = None
    """tokens per example, longer ones truncated (None: min(128, the model's positions))"""
    seeds: tuple[int, ...] = (0,)
    """one run per seed; several give mean and spread"""
    projection: ProjectionConfig = field(default_factory=lambda: ProjectionConfig(
        rank=8, update_proj_gap=DEFAULT_GAP, scale=None))  # scale None: the registry's finetune_scale_rank / rank
    batch: BatchConfig = field(default_factory=BatchConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(out="runs/finetune"))

    def resolved_scale(self, method: str) -> float:
        """α for `method`: ``--scale`` when given, else the registry's ``finetune_scale_rank / rank``."""
        return registry.get(method).finetune_scale_rank / self.rank if self.scale is None else self.scale

    def resolved_lr(self, method: str) -> float:
        if method in self.lr:
            return self.lr[method]
        value = registry.get(method).finetune_lr
        if value is None:
            raise UsageError(f"--methods: {method!r} has no fine-tuning default LR; pass --lr {method}=LR")
        return value

    def validate(self) -> None:
        if not self.methods:
            raise UsageError("--methods: name at least one method")
        for m in self.methods:
            registry.get(m, "--methods")
            if m not in FINETUNE_METHODS:
                raise UsageError(f"--methods: {m!r} is not a fine-tuning method; use some of "
                                 f"{', '.join(FINETUNE_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise UsageError("--methods: a method is named twice")
        layerwise = [m for m in FINETUNE_METHODS if registry.get(m).layerwise]
        if self.layerwise and not set(layerwise) & set(self.methods):
            raise UsageError(f"--layerwise applies to {', '.join(layerwise)}, which is not among --methods")
        for name in ("rank", "epochs", "batch_size", "update_proj_gap"):
            check_count(name, getattr(self, name))
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise UsageError(f"--max-length={self.max_length!r} must be an integer of at least 2")
        if self.scale is not None and not self.scale > 0:
            raise UsageError(f"--scale={self.scale!r} must be positive")
        for method, value in self.lr.items():
            if method not in self.methods:
                raise UsageError(f"--lr: {method!r} is not among --methods ({', '.join(self.methods)})")
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"--lr {method}={value!r} must be a positive number")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("--seed: give one or more distinct integers (e.g. 0,1,2)")
        if self.grad_clip < 0:
            raise UsageError(f"--grad-clip={self.grad_clip!r} must be non-negative")
        check_device(self.device)
