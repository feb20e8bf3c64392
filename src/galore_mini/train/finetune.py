"""Fine-tuning: one pretrained model, several methods, one labelled task, side by side.

    config = FinetuneConfig(model="runs/pretrain", task="data/task.csv", methods=("full", "lora", "galore_mini"))
    results = run_finetune(config)      # -> one dict per method; also DIR/results.json, results.md, plots

What each method trains (the same matrices everywhere): the *targets* are the 2-D weights
that ``galore_mini.optim.groups.read_model`` marks projectable (attention and MLP matrices
of the repeated blocks).

* ``full``: every parameter, ``torch.optim.AdamW``.
* ``adam_mini``: every parameter, Adam-mini.
* ``galore`` / ``galore_mini``: every parameter; the targets with projected gradients
  (rank ``--rank``, scale α, refresh every T steps), the rest (embeddings, head, norms,
  biases) with the optimizer's plain rule. ``--layerwise`` updates GaLore-mini inside ``backward()``.
* ``lora``: ``peft`` LoRA adapters (rank ``--rank``, alpha 16, no dropout) on the targets,
  whose weights are frozen; embeddings, head, norms and biases trained.

The classification head is trained fully by every method, and so are the embeddings: as
galore-torch's ``run_glue.py`` does for GaLore (they get the optimizer's plain rule: AdamW
in GaLore, per-token blocks in GaLore-mini) and, for LoRA, as ``peft``'s
``modules_to_save`` would, so that every method trains the same parameters outside the
targets. ``freeze_embeddings=True`` freezes them in ``lora``, ``galore`` and ``galore_mini``
(LoRA as ``peft`` defines it by default).

GaLore's fine-tuning recipe (the paper's GLUE runs, Table 7 and the repository's GLUE
command): scale α = 4 at r = 4 and α = 2 at r = 8, i.e. ``α = 16 / r`` (GaLore's default at
every rank), T = 500. GaLore-mini takes a quarter of that, ``α = 4 / r``, at twice the learning
rate (its own sweep, RESULTS.md): its per-row normalisation makes its step on the projected
weights larger per unit of lr than GaLore's. ``--scale`` sets one α for both. Schedule: linear
warm-up over the first 6% of updates, then linear decay to 0; gradients clipped to global norm 1;
no weight decay; fp32.

Per run (method × seed) the folder ``DIR/runs/<method>/seed<k>/`` holds ``settings.json``,
``checkpoint.pt`` (written after every epoch by the pretraining harness's checkpointer,
:class:`~galore_mini.train.runs.RunFolder`: atomically, with a digest, the one before kept as
``checkpoint.prev.pt``, the folder locked while it trains) and ``result.json`` once done. A
finished run is reused; an interrupted one resumes from its last readable epoch (a damaged newest
checkpoint is moved aside, with one line saying so) and ends exactly where an uninterrupted run
ends (same data order, RNG and optimizer state — tested). Runs whose settings differ from the
folder's are refused (use another ``--out``).

Non-finite gradients are pretraining's policy (:mod:`galore_mini.train.steps`): the update is
skipped and counted (``skipped_steps``, ``skipped_updates`` in each run's result); 20 skipped steps
in a row stop the run as diverged.

Everything that can be checked — task, labels, model, tokenizer, rank, lengths — is checked
in :func:`prepare` before ``DIR`` is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from galore_mini import methods as registry
from galore_mini.errors import UsageError
from galore_mini.memory import optimizer_state_bytes as state_bytes
from galore_mini.methods import Settings, check_targets
from galore_mini.models import model_config
from galore_mini.optim.layerwise import layerwise
from galore_mini.train.config import DEFAULT_GAP, FINETUNE_METHODS, FinetuneConfig  # noqa: F401  (re-exported)
from galore_mini.train.data import EOS_TOKEN, prepare_data
from galore_mini.train.runs import CHECKPOINT, CHECKPOINT_FORMAT, PREVIOUS, RunFolder, atomic_write
from galore_mini.train.steps import MAX_SKIPPED_STEPS, Skips, count_parameters, linear_factor, optimizer_step
from galore_mini.train.tasks import METRIC_NAMES, Task, compute_metrics, load_task

#: what a fine-tuning checkpoint must hold (those of earlier versions too, which had no format or step)
FINETUNE_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "history", "train_time")

LORA_ALPHA = 16.0  # alpha / r equals GaLore's default scale 16 / r
LORA_DROPOUT = 0.0
WARMUP_RATIO = 0.06
DEFAULT_MAX_LENGTH = 128
EXPORT_MARKER = "hf_export.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model", "merges.txt")
_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl"}


# -- files ------------------------------------------------------------------------------------------------


def _readable(tmp: str) -> None:
    # mkstemp makes 0600 files; results are ordinary files that others may read
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


# -- the model: a local folder, a pretrain run, or a hub id --------------------------------------------


def is_pretrain_run(path: str | os.PathLike) -> bool:
    """A ``galore-mini pretrain --out`` folder (it holds ``checkpoint.pt`` or ``checkpoint.prev.pt``)."""
    return (Path(path) / CHECKPOINT).is_file() or (Path(path) / PREVIOUS).is_file()


def export_pretrained(run_dir: str | os.PathLike, log: Callable[[str], None] = lambda m: None) -> Path:
    """Make a pretrain run folder Hugging Face loadable: ``config.json``, ``model.safetensors`` and the tokenizer.

    Reads ``checkpoint.pt`` (model weights and the run's settings) and the run's tokenizer (the
    pretrained one it named, else the byte-level BPE in the harness's data cache, found by
    preparing the same data again: a cache hit). Writes into `run_dir` itself, each file
    atomically, ``hf_export.json`` last; an export of the same checkpoint step is reused.
    Pairs are encoded ``A <|endoftext|> B``; the pad token is ``<|endoftext|>``.
    Only optimizer-method runs can be exported (an adapter run's weights are not a LlamaForCausalLM).
    """
    from tokenizers import Tokenizer, processors
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    run = Path(run_dir)
    checkpoint = run / CHECKPOINT if (run / CHECKPOINT).is_file() else run / PREVIOUS
    stamp = {"checkpoint_bytes": checkpoint.stat().st_size, "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns}
    marker = run / EXPORT_MARKER
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError):
            if {k: v for k, v in json.loads(marker.read_text()).items() if k in stamp} == stamp:
                return run
    # the one loading path: digest checked, a damaged newest checkpoint moved aside for the previous one
    name, state = RunFolder(run, flag=f"--model {run_dir}", restart="pretrain it again").newest_readable(log)
    if state is None:
        raise UsageError(f"--model {run_dir}: the pretrain run holds no checkpoint")
    checkpoint = run / name
    stamp = {"checkpoint_bytes": checkpoint.stat().st_size, "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns}
    settings = state.get("config", {})
    method = settings.get("method")
    if method in registry.ADAPTER_METHODS:
        raise UsageError(f"--model {run_dir}: the pretrain run used --method {method}, an adapter model; "
                         "fine-tuning starts from optimizer-method runs (full, galore, galore_mini, ...)")
    weights = state["model"]
    vocab = weights["model.embed_tokens.weight"].shape[0]
    log(f"exporting the pretrain run {run} (step {state.get('step')}) as a Hugging Face model")
    backend = _pretrain_tokenizer(run, settings)
    eos = backend.token_to_id(EOS_TOKEN)
    if eos is None:
        raise UsageError(f"--model {run_dir}: the run's tokenizer has no {EOS_TOKEN} token to pad with")
    config = model_config(settings.get("model", "tiny"), vocab_size=vocab)
    config.pad_token_id = config.eos_token_id = eos
    config.bos_token_id = None
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UsageError(f"--model {run_dir}: checkpoint.pt does not match its config ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected weights)")
    backend.post_processor = processors.TemplateProcessing(single="$A", pair=f"$A {EOS_TOKEN} $B",
                                                           special_tokens=[(EOS_TOKEN, eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                        model_max_length=config.max_position_embeddings)
    from transformers.utils import logging as hf_logging

    with tempfile.TemporaryDirectory(dir=run, prefix=".hf-export-") as tmp:
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        finally:
            hf_logging.enable_progress_bar()
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), run / name)
    _atomic_json(marker, {**stamp, "step": state.get("step"), "method": method})
    return run


def _pretrain_tokenizer(run: Path, settings: dict[str, Any]):
    from tokenizers import Tokenizer

    own = run / "tokenizer.json"  # an earlier export, or a harness that saves its tokenizer with the run
    if own.is_file():
        return Tokenizer.from_file(str(own))
    name = settings.get("tokenizer")
    if name:
        if str(name).endswith(".json") and os.path.isfile(name):
            return Tokenizer.from_file(name)
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(name)
        if not getattr(fast, "is_fast", False):
            raise UsageError(f"--model {run}: the run's tokenizer {name!r} has no fast (tokenizers) version")
        return Tokenizer.from_str(fast.backend_tokenizer.to_str())
    data = prepare_data(settings.get("data"), seq_len=int(settings.get("seq_len", 128)),
                        vocab_size=int(settings.get("vocab_size", 8192)),
                        val_fraction=float(settings.get("val_fraction", 0.05)),
                        val_tokens=int(settings.get("val_tokens", 65536)), cache_dir=settings.get("cache_dir"))
    return Tokenizer.from_str(data.tokenizer.backend.to_str())


def resolve_model(name: str, log: Callable[[str], None] = lambda m: None) -> tuple[str, str]:
    """(what ``from_pretrained`` reads, a fingerprint of it) for `--model`; errors before any download."""
    path = Path(name).expanduser()
    if path.is_dir():
        if is_pretrain_run(path):
            export_pretrained(path, log)
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: the folder has no config.json (a Hugging Face model folder, or the "
                             "--out folder of `galore-mini pretrain`)")
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise UsageError(f"--model {name}: the folder has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:5])}"
                             " ...); save one beside the model with tokenizer.save_pretrained(folder)")
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt")):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return str(path), h.hexdigest()[:16]
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"--model {name}: no such model folder")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
    except Exception as exc:  # offline, unknown id, gated: one message with the way out
        raise UsageError(f"--model {name}: not a local folder, and the Hugging Face hub could not provide it "
                         f"({str(exc).splitlines()[0][:160]}); without network, download it elsewhere and pass "
                         "the folder") from None
    return name, name


# -- preparing everything before anything is written -------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list


@dataclass
class Setup:
    config: FinetuneConfig
    task: Task
    model_path: str
    model_fingerprint: str
    num_labels: int
    pad_id: int
    max_length: int
    train: Encoded
    val: Encoded
    targets: list[str]  # module names of the projected/adapted matrices
    device: torch.device
    notes: list[str] = field(default_factory=list)
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr, flush=True))

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"model": self.model_path, "model_fingerprint": self.model_fingerprint, "task": self.task.name,
                "task_fingerprint": self.task.fingerprint(), "epochs": c.epochs, "batch_size": c.batch_size,
                "max_length": self.max_length, "rank": c.rank, "scale": c.scale,
                "update_proj_gap": c.update_proj_gap, "freeze_embeddings": c.freeze_embeddings,
                "grad_clip": c.grad_clip, "warmup_ratio": WARMUP_RATIO, "lora_alpha": LORA_ALPHA,
                "lora_dropout": LORA_DROPOUT}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={name}: no CUDA device is available")
    return torch.device(name)


def _positions(model_config, tokenizer) -> int | None:
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if positions is not None and getattr(model_config, "model_type", "") in _ROBERTA_LIKE:
        positions -= 2  # position ids start after the padding index
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000:
        positions = min(positions, limit) if positions else limit
    return positions


def _load_classifier(setup_or_path, num_labels: int, pad_id: int | None, regression: bool, seed: int | None):
    """A fresh ``AutoModelForSequenceClassification``: pretrained body, head drawn from `seed`."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if seed is not None:
        torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": the head, by design
    hf_logging.disable_progress_bar()  # one loading bar per run would drown the training bars
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            setup_or_path, num_labels=num_labels, problem_type="regression" if regression else
            "single_label_classification", pad_token_id=pad_id)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {setup_or_path}: cannot load it as a sequence classifier "
                         f"({str(exc).splitlines()[0][:200]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.float()


def _encode(tokenizer, examples, max_length: int) -> tuple[list[list[int]], int]:
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if any(e.text_pair is not None for e in examples) else None
    if pairs is not None and any(p is None for p in pairs):
        raise UsageError("--task: some rows have a text_pair and some do not; give every row one, or none")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "longer than the model" warning: counted and reported below instead
    try:
        full = tokenizer(texts, pairs, truncation=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    over = sum(len(ids) > max_length for ids in full)
    if not over:
        return full, 0
    cut = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
    return cut, over


def prepare(config: FinetuneConfig, *, load_dataset: Callable | None = None,
            log: Callable[[str], None] = lambda m: None) -> Setup:
    """Load and check task, model, tokenizer, rank and lengths; writes nothing under ``config.out``."""
    from transformers import AutoTokenizer

    config.validate()
    device = _device(config.device)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {config.out}: exists and is not a folder")
    task = load_task(config.task, config.val, load_dataset=load_dataset)
    log(task.describe())
    model_path, fingerprint = resolve_model(config.model, log)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:
        raise UsageError(f"--model {config.model}: cannot load its tokenizer ({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UsageError(f"--model {config.model}: the tokenizer has neither a pad nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    num_labels = 1 if task.regression else len(task.labels)
    model = _load_classifier(model_path, num_labels, tokenizer.pad_token_id, task.regression, seed=None)
    positions = _positions(model.config, tokenizer)
    if config.max_length is not None and positions is not None and config.max_length > positions:
        raise UsageError(f"--max-length={config.max_length} exceeds the model's {positions} positions; "
                         f"use at most {positions}")
    max_length = config.max_length or min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    targets = check_targets(model, config.methods, config.rank)
    train_ids, over_train = _encode(tokenizer, task.train, max_length)
    val_ids, over_val = _encode(tokenizer, task.val, max_length)
    notes = []
    if over_train or over_val:
        why = "the model's positions" if max_length == positions else f"--max-length={max_length}"
        notes.append(f"{over_train} of {len(task.train)} training and {over_val} of {len(task.val)} validation "
                     f"examples are longer than {max_length} tokens ({why}); they are truncated")
        log("note: " + notes[-1])
    vocab = model.get_input_embeddings().num_embeddings
    top = max(max(ids) for ids in train_ids + val_ids if ids)
    if top >= vocab:
        raise UsageError(f"--model {config.model}: its tokenizer yields id {top}, beyond the model's {vocab} "
                         "embeddings; the tokenizer does not belong to this model")
    return Setup(config, task, model_path, fingerprint, num_labels, int(tokenizer.pad_token_id), max_length,
                 Encoded(train_ids, task.label_ids(task.train)), Encoded(val_ids, task.label_ids(task.val)),
                 [name for name, _ in targets], device, notes, log)


# -- one run -------------------------------------------------------------------------------------------


def _collate(encoded: Encoded, index: Sequence[int], pad_id: int, regression: bool):
    rows = [encoded.input_ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[k, :len(r)] = 1
    labels = torch.tensor([encoded.labels[i] for i in index], dtype=torch.float if regression else torch.long)
    return ids, mask, labels


def build_method(setup: Setup, method: str, seed: int):
    """(model, optimizer, layer-wise handle or None) for one run; the head drawn from `seed`."""
    config = setup.config
    model = _load_classifier(setup.model_path, setup.num_labels, setup.pad_id, setup.task.regression, seed)
    model = method_model(model, method, config, setup.targets)
    model.to(setup.device)
    optimizer = method_optimizer(model, method, config)
    handle = None
    if config.layerwise and registry.get(method).layerwise:
        handle = layerwise(model, optimizer, max_grad_norm=config.grad_clip or None)
    return model, optimizer, handle


def _recipe(method: str, config: FinetuneConfig, targets: list[str] | None = None) -> Settings:
    """The fine-tuning recipe's settings of `method` with this run's rank, LR, α and T."""
    return registry.get(method).finetune_settings(
        config.rank, lr=config.resolved_lr(method), scale=config.resolved_scale(method),
        update_proj_gap=config.update_proj_gap, targets=targets, freeze_embeddings=config.freeze_embeddings)


def method_model(model: torch.nn.Module, method: str, config: FinetuneConfig, targets: list[str]) -> torch.nn.Module:
    """What `method` trains of a loaded classifier (the method's ``finetune_model``: embeddings frozen on
    request for the ranked methods, LoRA wrapped around `targets`)."""
    return registry.get(method).finetune_model(model, _recipe(method, config, targets))


def method_optimizer(model: torch.nn.Module, method: str, config: FinetuneConfig) -> torch.optim.Optimizer:
    """The optimizer of one run over `model` as :func:`method_model` left it (LoRA: AdamW on what is trainable)."""
    return registry.get(method).build_optimizer(model, _recipe(method, config))


@torch.no_grad()
def evaluate(model, setup: Setup, batch_size: int) -> dict[str, float]:
    model.eval()
    preds: list = []
    n = len(setup.val.labels)
    for start in range(0, n, batch_size):
        ids, mask, _ = _collate(setup.val, range(start, min(n, start + batch_size)), setup.pad_id,
                                setup.task.regression)
        logits = model(input_ids=ids.to(setup.device), attention_mask=mask.to(setup.device)).logits.float().cpu()
        preds += logits[:, 0].tolist() if setup.task.regression else logits.argmax(-1).tolist()
    model.train()
    return compute_metrics(setup.task.metric, preds, setup.val.labels)


def run_settings(setup: Setup, method: str, seed: int) -> dict[str, Any]:
    """Everything one run's result depends on (a run folder made with other settings is refused)."""
    config = setup.config
    return {**setup.settings(), "method": method, "seed": seed, "lr": config.resolved_lr(method),
            "scale": config.resolved_scale(method) if registry.get(method).projected else None,
            "layerwise": bool(config.layerwise and registry.get(method).layerwise)}


def check_run_folder(folder: Path, settings: dict[str, Any]) -> bool:
    """True when `folder` holds a finished run with `settings`; a `UsageError` when it was made with others."""
    settings_path = folder / "settings.json"
    if not settings_path.is_file():
        return False
    try:
        saved = json.loads(settings_path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"--out: {settings_path} is unreadable; delete {folder} to retrain that run") from None
    differing = sorted(k for k in settings if saved.get(k) != settings[k])
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {settings[k]!r} now" for k in differing[:4])
        raise UsageError(f"--out: {folder} was trained with other settings ({detail}); use another --out, or "
                         "delete that folder to retrain it")
    return (folder / "result.json").is_file()


def train_run(setup: Setup, method: str, seed: int, folder: Path, *,
              on_epoch: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) one method with one seed; returns its result (also ``folder/result.json``)."""
    config = setup.config
    settings = run_settings(setup, method, seed)
    result_path, settings_path = folder / "result.json", folder / "settings.json"
    if check_run_folder(folder, settings):
        return json.loads(result_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = RunFolder(folder, keys=FINETUNE_CHECKPOINT_KEYS, flag="--out",
                            restart=f"delete {folder} to retrain that run")
    checkpoints.acquire(setup.log)
    try:
        # only once the lock is ours: before it, another process may still be writing these
        for stale in folder.glob("*.tmp-*"):
            stale.unlink()
        _atomic_json(settings_path, settings)
        return _train_run(setup, method, seed, settings, checkpoints, on_epoch)
    finally:
        checkpoints.release()


def _train_run(setup: Setup, method: str, seed: int, settings: dict[str, Any], checkpoints: RunFolder,
               on_epoch: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """:func:`train_run` once its folder is claimed: build, resume from the newest readable checkpoint, train."""
    config = setup.config
    model, optimizer, handle = build_method(setup, method, seed)
    total_params, trainable_params = count_parameters(model)
    n_train = len(setup.train.labels)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, round(WARMUP_RATIO * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: linear_factor(step, total_steps, warmup))
    trainable = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, Any]] = []
    start_epoch, train_time, skips = 0, 0.0, Skips()
    _, state = checkpoints.newest_readable(setup.log)
    if state is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value)
        (handle or optimizer).load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history, start_epoch, train_time = state["history"], int(state["epoch"]), float(state["train_time"])
        skips = Skips(**state.get("skips", {}))
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    bar = None
    if config.progress:
        from tqdm.auto import tqdm  # optional (the train extra); only runs that show a bar need it

        bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, file=sys.stderr, dynamic_ncols=True,
                   desc=f"{registry.label(method)} seed {seed}", leave=False)
    model.train()
    for epoch in range(start_epoch, config.epochs):
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        started, loss_sum = time.perf_counter(), 0.0
        for start in range(0, n_train, config.batch_size):
            ids, mask, labels = _collate(setup.train, order[start:start + config.batch_size], setup.pad_id,
                                         setup.task.regression)
            loss = model(input_ids=ids.to(setup.device), attention_mask=mask.to(setup.device),
                         labels=labels.to(setup.device)).loss
            before = getattr(optimizer, "nonfinite_skips", 0)
            loss.backward()  # layer-wise: the update happens in here
            if handle is None:
                norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip) if config.grad_clip > 0 else None
                updatable = sum(1 for p in trainable if p.grad is not None)
                skipped = optimizer_step(optimizer, trainable, norm, updatable)
                optimizer.zero_grad(set_to_none=True)
            else:
                updatable, skipped = len(trainable), getattr(optimizer, "nonfinite_skips", 0) - before
            scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise UsageError(f"{method}: the training loss became {value} in epoch {epoch + 1}; lower --lr "
                                 f"{method}= (now {config.resolved_lr(method):g})")
            skips.record(skipped, updatable)
            if skips.stalled(MAX_SKIPPED_STEPS):
                raise skips.diverged(epoch * steps_per_epoch + start // config.batch_size + 1,
                                     f"lower --lr {method}= (now {config.resolved_lr(method):g})", "")
            loss_sum += value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        train_time += time.perf_counter() - started
        scores = evaluate(model, setup, config.batch_size)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, **scores})
        if bar is not None:
            bar.write(f"{registry.label(method)} seed {seed} epoch {epoch + 1}: {METRIC_NAMES[setup.task.metric]} "
                      f"{scores['score']:.2f}", file=sys.stderr)
        trained = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
        checkpoints.save({"format": CHECKPOINT_FORMAT, "step": (epoch + 1) * steps_per_epoch, "epoch": epoch + 1,
                          "model": trained, "optimizer": (handle or optimizer).state_dict(),
                          "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "history": history,
                          "train_time": train_time, "skips": asdict(skips)})
        if on_epoch is not None:
            on_epoch(method, seed, epoch + 1)
    if bar is not None:
        bar.close()
    final = history[-1]
    result = {"method": method, "label": registry.label(method), "seed": seed, "metric": setup.task.metric,
              "score": final["score"], "accuracy": final.get("accuracy"),
              **{k: v for k, v in final.items() if k not in ("epoch", "train_loss", "score", "accuracy")},
              "epochs": history, "trainable_params": trainable_params, "total_params": total_params,
              "optimizer_state_bytes": state_bytes(optimizer),
              "peak_memory_bytes": (torch.cuda.max_memory_allocated(setup.device) if setup.device.type == "cuda"
                                    else None),
              "train_seconds": train_time, "lr": settings["lr"], "layerwise": settings["layerwise"],
              "rank": config.rank if registry.get(method).ranked else None,
              "scale": settings["scale"],
              "update_proj_gap": config.update_proj_gap if registry.get(method).projected else None,
              "skipped_steps": skips.skipped_steps, "skipped_updates": skips.skipped_updates}
    if skips.skipped_updates:
        setup.log(f"warning: {registry.label(method)} seed {seed}: {skips.skipped_steps} of {total_steps} steps "
                  f"made no update and {skips.skipped_updates} parameter updates were skipped in all (non-finite "
                  "gradients)")
    if handle is not None:
        handle.remove()
    _atomic_json(checkpoints.path / "result.json", result)
    for done in (checkpoints.checkpoint, checkpoints.previous):  # the result is what a finished run keeps
        with contextlib.suppress(OSError):
            done.unlink()
    return result


# -- the comparison -------------------------------------------------------------------------------------


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]], baseline: float | None) -> dict[str, Any]:
    """One object per method from its runs over seeds: means, sample std, and every seed's result."""
    first = runs[0]
    scores = [r["score"] for r in runs]
    out = {"method": first["method"], "label": first["label"], "metric": first["metric"],
           "score": statistics.fmean(scores), "score_std": _spread(scores), "scores": scores,
           "accuracy": (statistics.fmean(r["accuracy"] for r in runs) if first.get("accuracy") is not None else None),
           "trainable_params": first["trainable_params"], "total_params": first["total_params"],
           "optimizer_state_bytes": first["optimizer_state_bytes"],
           "peak_memory_bytes": (max(r["peak_memory_bytes"] for r in runs)
                                 if all(r["peak_memory_bytes"] is not None for r in runs) else None),
           "train_seconds": statistics.fmean(r["train_seconds"] for r in runs), "seeds": [r["seed"] for r in runs],
           "majority_baseline": baseline, "lr": first["lr"], "rank": first["rank"], "scale": first["scale"],
           "update_proj_gap": first["update_proj_gap"], "layerwise": first["layerwise"],
           "epoch_scores": [statistics.fmean(r["epochs"][e]["score"] for r in runs)
                            for e in range(len(first["epochs"]))],
           "runs": runs}
    return out


def results_table(results: list[dict[str, Any]], setup: Setup) -> str:
    task = setup.task
    baseline = task.majority_baseline()
    seeds = results[0]["seeds"] if results else []
    spread = " ± std over seeds" if len(seeds) > 1 else ""
    lines = [f"# Fine-tuning: {task.name}", "",
             f"Model `{setup.config.model}`; {len(task.train):,} train / {len(task.val):,} validation examples; "
             f"metric: {METRIC_NAMES[task.metric]} (points){spread}; seeds {', '.join(map(str, seeds))}; "
             f"{setup.config.epochs} epochs, batch {setup.config.batch_size}, max length {setup.max_length}, "
             f"rank {setup.config.rank}, T {setup.config.update_proj_gap}, GaLore scale α per method "
             f"(column α).", ""]
    if baseline is not None:
        lines += [f"Majority-class baseline: **{baseline:.2f}**.", ""]
    lines += ["| method | score | accuracy | trainable params | optimizer state (KiB) | vs full | peak memory (MiB) "
              "| train s | lr | α |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full = next((r for r in results if r["method"] == "full"), None)
    for r in results:
        score = f"{r['score']:.2f}" + (f" ± {r['score_std']:.2f}" if len(r["seeds"]) > 1 else "")
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        ratio = (f"{r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.2f}×"
                 if full and full["optimizer_state_bytes"] else "–")
        peak = "–" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2 ** 20:.1f}"
        name = r["label"] + (" (layer-wise)" if r["layerwise"] else "")
        lines.append(f"| {name} | {score} | {acc} | {r['trainable_params']:,} | "
                     f"{r['optimizer_state_bytes'] / 1024:,.1f} | {ratio} | {peak} | {r['train_seconds']:.1f} | "
                     f"{r['lr']:g} | {'–' if r['scale'] is None else format(r['scale'], 'g')} |")
    lines += ["", "Optimizer state: bytes of every tensor in `optimizer.state`, measured after training. Peak memory: "
              "`torch.cuda.max_memory_allocated` (– on CPU, where it is not measured)."]
    lines += [f"Note: {n}" for n in setup.notes]
    return "\n".join(lines) + "\n"


def plot_results(results: list[dict[str, Any]], folder: Path, metric_name: str) -> list[Path]:
    """``scores.png`` (validation score per epoch) and ``score_vs_memory.png`` (one point per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        epochs = range(1, len(r["epoch_scores"]) + 1)
        ax.plot(epochs, r["epoch_scores"], marker="o", label=r["label"])
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric_name} (points)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for name, figure in (("scores.png", fig),):
        paths.append(folder / name)
        _save_figure(figure, paths[-1])
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        ax.errorbar(r["optimizer_state_bytes"] / 2 ** 20, r["score"], yerr=r["score_std"] or None, marker="o",
                    capsize=3, linestyle="none", label=r["label"])
        ax.annotate(r["label"], (r["optimizer_state_bytes"] / 2 ** 20, r["score"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel(f"validation {metric_name} (points)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(folder / "score_vs_memory.png")
    _save_figure(fig, paths[-1])
    plt.close(fig)
    return paths


def _save_figure(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-", suffix=".png")
    os.close(fd)
    _readable(tmp)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def run_finetune(config: FinetuneConfig, *, load_dataset: Callable | None = None,
                 on_epoch: Callable[[str, int, int], None] | None = None,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Prepare (all checks), then train every method × seed, write results.json/.md and plots; return the results."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    setup = prepare(config, load_dataset=load_dataset, log=log)
    out = Path(config.out)
    for method in config.methods:  # refuse a folder of other settings before training anything
        for seed in config.seeds:
            check_run_folder(out / "runs" / method / f"seed{seed}", run_settings(setup, method, seed))
    out.mkdir(parents=True, exist_ok=True)
    baseline = setup.task.majority_baseline()
    results = []
    for method in config.methods:
        runs = [train_run(setup, method, seed, out / "runs" / method / f"seed{seed}", on_epoch=on_epoch)
                for seed in config.seeds]
        results.append(aggregate(runs, baseline))
        _atomic_json(out / "results.json", results)
        log(f"{registry.label(method)}: {METRIC_NAMES[setup.task.metric]} {results[-1]['score']:.2f}, optimizer state "
            f"{results[-1]['optimizer_state_bytes'] / 1024:,.1f} KiB, {results[-1]['trainable_params']:,} trainable")
    _atomic_bytes(out / "results.md", results_table(results, setup).encode("utf-8"))
    plot_results(results, out, METRIC_NAMES[setup.task.metric])
    return results


__all__ = ["FinetuneConfig", "run_finetune", "prepare", "export_pretrained", "resolve_model", "train_run",
           "state_bytes"]
