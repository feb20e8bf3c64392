"""Labelled tasks for ``galore-mini finetune``: files, folders, GLUE, the offline Debian task; metrics.

A task is two lists of :class:`Example` (``text``, optional ``text_pair``, ``label``) and the
metric it is scored by. Sources (``--task``):

* a ``.csv``, ``.tsv`` or ``.jsonl`` file with the columns ``text`` (and optionally
  ``text_pair``) and ``label``; labels may be strings or integers. It is split 90/10 into
  train/validation deterministically: every row is ranked by the SHA-1 of its text (and
  pair), and the first tenth of that order is validation. The split therefore depends
  neither on the row order nor on the seed, and identical texts land on the same side.
  ``--val FILE`` gives the validation rows instead;
* a folder holding ``train.{csv,tsv,jsonl}`` and ``validation.*`` (or ``dev.*``);
* ``glue/<name>`` (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) through
  ``datasets.load_dataset("nyu-mll/glue", name)`` — needs the network once; scored on the
  validation split (``validation_matched`` for MNLI) with the official metrics;
* ``debian-sections``: the offline default (see :func:`debian_sections`).

Checks, all before anything is trained or written: a label column exists, every row has
text and a label, at least two classes, no validation label that training never shows.

Metrics are computed here without scikit-learn/scipy: accuracy, binary F1 (positive class
``1``), Matthews correlation (multi-class form), Pearson and Spearman (average ranks for
ties). Scores are reported in points (×100), as the GLUE tables do; a task with two
official metrics (MRPC, QQP: F1 and accuracy; STS-B: Pearson and Spearman) is scored by
their mean, as the GLUE leaderboard averages them.

Example::

    >>> from galore_mini.train.tasks import compute_metrics
    >>> compute_metrics("accuracy", [0, 1, 1, 0], [0, 1, 0, 0])["accuracy"]
    75.0
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from galore_mini.errors import UsageError

VAL_FRACTION = 0.1
DEBIAN_TASK = "debian-sections"

#: GLUE task -> (text column, pair column or None, number of labels (1: regression), metric)
GLUE_TASKS: dict[str, tuple[str, str | None, int, str]] = {
    "cola": ("sentence", None, 2, "matthews"),
    "sst2": ("sentence", None, 2, "accuracy"),
    "mrpc": ("sentence1", "sentence2", 2, "f1_accuracy"),
    "qqp": ("question1", "question2", 2, "f1_accuracy"),
    "stsb": ("sentence1", "sentence2", 1, "pearson_spearman"),
    "mnli": ("premise", "hypothesis", 3, "accuracy"),
    "qnli": ("question", "sentence", 2, "accuracy"),
    "rte": ("sentence1", "sentence2", 2, "accuracy"),
    "wnli": ("sentence1", "sentence2", 2, "accuracy"),
}
_GLUE_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}
METRIC_NAMES = {"accuracy": "accuracy", "matthews": "Matthews corr.", "f1_accuracy": "F1/accuracy mean",
                "pearson_spearman": "Pearson/Spearman mean"}


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: Any  # a class name (str or int) or a float for regression


@dataclass
class Task:
    """Train and validation examples, the label names (empty for regression) and the metric."""

    name: str
    train: list[Example]
    val: list[Example]
    labels: list[Any] = field(default_factory=list)
    metric: str = "accuracy"
    source: str = ""

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def has_pairs(self) -> bool:
        return any(e.text_pair is not None for e in self.train)

    def label_ids(self, examples: Sequence[Example]) -> list:
        if self.regression:
            return [float(e.label) for e in examples]
        index = {name: i for i, name in enumerate(self.labels)}
        return [index[e.label] for e in examples]

    def majority_baseline(self) -> float | None:
        """The validation score of always predicting training's most common class (points), None for regression."""
        if self.regression:
            return None
        common = Counter(e.label for e in self.train).most_common(1)[0][0]
        index = self.labels.index(common)
        return compute_metrics(self.metric, [index] * len(self.val), self.label_ids(self.val))["score"]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in (self.train, self.val):
            for e in split:
                h.update(json.dumps([e.text, e.text_pair, e.label]).encode("utf-8"))
            h.update(b"|")
        return h.hexdigest()[:16]

    def describe(self) -> str:
        kind = "regression" if self.regression else f"{len(self.labels)} classes"
        return (f"task {self.name}: {len(self.train):,} train / {len(self.val):,} validation examples, {kind}, "
                f"metric {METRIC_NAMES.get(self.metric, self.metric)}")


# -- metrics ------------------------------------------------------------------------------------------


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation, the multi-class (Gorodkin) form; binary inputs give the usual MCC."""
    classes = sorted(set(pred) | set(gold))
    n = len(gold)
    correct = sum(p == g for p, g in zip(pred, gold))
    p_count, g_count = Counter(pred), Counter(gold)
    cov_pg = correct * n - sum(p_count[k] * g_count[k] for k in classes)
    cov_pp = n * n - sum(p_count[k] ** 2 for k in classes)
    cov_gg = n * n - sum(g_count[k] ** 2 for k in classes)
    return 0.0 if cov_pp == 0 or cov_gg == 0 else cov_pg / math.sqrt(cov_pp * cov_gg)


def f1_binary(pred: Sequence[int], gold: Sequence[int]) -> float:
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g != 1 for p, g in zip(pred, gold))
    fn = sum(p != 1 and g == 1 for p, g in zip(pred, gold))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def compute_metrics(metric: str, pred: Sequence, gold: Sequence) -> dict[str, float]:
    """Every metric of `metric`'s family in points, plus ``score`` (the one the tables rank by)."""
    if not gold:
        raise UsageError("no validation examples to score")
    if metric == "pearson_spearman":
        pearson, spearman = _pearson(pred, gold), _pearson(_ranks(pred), _ranks(gold))
        out = {"pearson": 100 * pearson, "spearman": 100 * spearman}
        out["score"] = (out["pearson"] + out["spearman"]) / 2
        return out
    out = {"accuracy": 100 * sum(p == g for p, g in zip(pred, gold)) / len(gold)}
    if metric == "accuracy":
        out["score"] = out["accuracy"]
    elif metric == "matthews":
        out["matthews"] = 100 * matthews(pred, gold)
        out["score"] = out["matthews"]
    elif metric == "f1_accuracy":
        out["f1"] = 100 * f1_binary(pred, gold)
        out["score"] = (out["f1"] + out["accuracy"]) / 2
    else:
        raise UsageError(f"unknown metric {metric!r}")
    return out


# -- reading files ------------------------------------------------------------------------------------


def _read_rows(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{what}: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what}: {str(path)!r} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{what}: {path}:{line_no} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UsageError(f"{what}: {path}:{line_no} must be a JSON object with 'text' and 'label'")
            rows.append(record)
        return rows
    if suffix in (".csv", ".tsv"):
        # TSV as GLUE ships it: no quoting, one row a line
        reader = (csv.DictReader(io.StringIO(raw)) if suffix == ".csv"
                  else csv.DictReader(io.StringIO(raw), delimiter="\t", quoting=csv.QUOTE_NONE))
        return [dict(r) for r in reader]
    raise UsageError(f"{what}: {str(path)!r} must end in .csv, .tsv or .jsonl")


def _parse_label(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return text


def examples_from_rows(rows: list[dict[str, Any]], where: str, what: str = "--task") -> list[Example]:
    """`rows` (dicts) as examples; a missing column or an empty cell is a `UsageError` naming the row."""
    if not rows:
        raise UsageError(f"{what}: {where} holds no rows")
    columns = set(rows[0])
    if "label" not in columns:
        raise UsageError(f"{what}: {where} has no 'label' column (columns: {', '.join(sorted(map(str, columns)))}); "
                         "a task needs 'text' [+ 'text_pair'] and 'label'")
    if "text" not in columns:
        raise UsageError(f"{what}: {where} has no 'text' column (columns: {', '.join(sorted(map(str, columns)))})")
    examples = []
    for i, row in enumerate(rows, 1):
        text, pair, label = row.get("text"), row.get("text_pair"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{what}: {where} row {i} has an empty 'text'")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise UsageError(f"{what}: {where} row {i} has no label")
        pair = pair if isinstance(pair, str) and pair != "" else None
        examples.append(Example(text, pair, _parse_label(label)))
    return examples


def _row_key(e: Example) -> str:
    return hashlib.sha1(json.dumps([e.text, e.text_pair]).encode("utf-8")).hexdigest()


def split_examples(examples: list[Example], fraction: float = VAL_FRACTION) -> tuple[list[Example], list[Example]]:
    """Deterministic split: rank by SHA-1 of the text, the first `fraction` is validation (file order kept)."""
    ranked = sorted(range(len(examples)), key=lambda i: (_row_key(examples[i]), i))
    n_val = max(1, round(fraction * len(examples)))
    val_ids = set(ranked[:n_val])
    return ([e for i, e in enumerate(examples) if i not in val_ids], [e for i, e in enumerate(examples) if i in val_ids])


def _find_split(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for ext in (".csv", ".tsv", ".jsonl"):
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def _check_labels(task: Task) -> Task:
    train_labels = Counter(e.label for e in task.train)
    if task.regression:
        return task
    if len(train_labels) < 2:
        only = next(iter(train_labels))
        raise UsageError(f"--task: the training split has one class only ({only!r}); a classifier needs at least two")
    unseen = sorted({e.label for e in task.val} - set(train_labels), key=str)
    if unseen:
        raise UsageError(f"--task: validation labels {', '.join(map(repr, unseen[:5]))} never occur in training; "
                         "every validation label must be a training label")
    if not task.val:
        raise UsageError("--task: the validation split is empty")
    return task


def _label_order(labels) -> list:
    # integers numerically, strings alphabetically; mixed sorts as strings so the order is still fixed
    values = list(set(labels))
    if all(isinstance(v, int) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def load_task(task: str | None, val: str | None = None, *, load_dataset: Callable | None = None,
              cache_dir: str | os.PathLike | None = None) -> Task:
    """The :class:`Task` that `--task` (and `--val`) name; see the module docstring."""
    if task is None or task == DEBIAN_TASK:
        if val is not None:
            raise UsageError(f"--val applies to --task FILE, not to {DEBIAN_TASK}")
        return debian_sections()
    if task.lower().startswith("glue/"):
        if val is not None:
            raise UsageError("--val applies to --task FILE, not to a GLUE task (GLUE has its validation split)")
        return glue_task(task.split("/", 1)[1], load_dataset=load_dataset, cache_dir=cache_dir)
    path = Path(task).expanduser()
    if not path.exists():
        raise UsageError(f"--task: {task!r} does not exist; give a .csv/.tsv/.jsonl file, a folder with train.* and "
                         f"validation.*, glue/<name> or {DEBIAN_TASK}")
    if path.is_dir():
        if val is not None:
            raise UsageError("--val applies to --task FILE; a folder brings its own validation.* file")
        train_file = _find_split(path, ("train",))
        val_file = _find_split(path, ("validation", "val", "dev"))
        if train_file is None or val_file is None:
            raise UsageError(f"--task: the folder {task!r} needs train.{{csv,tsv,jsonl}} and validation.{{csv,tsv,jsonl}}")
        train = examples_from_rows(_read_rows(train_file, "--task"), str(train_file))
        valid = examples_from_rows(_read_rows(val_file, "--task"), str(val_file))
    else:
        train = examples_from_rows(_read_rows(path, "--task"), str(path))
        if val is not None:
            valid = examples_from_rows(_read_rows(Path(val).expanduser(), "--val"), val, what="--val")
        else:
            if len(train) < 10:
                raise UsageError(f"--task: {task!r} has {len(train)} rows; a 90/10 split needs at least 10")
            train, valid = split_examples(train)
    labels = _label_order(e.label for e in train)
    return _check_labels(Task(path.stem if path.is_file() else path.name, train, valid, labels, "accuracy", str(path)))


# -- GLUE ---------------------------------------------------------------------------------------------


def glue_task(name: str, *, load_dataset: Callable | None = None, cache_dir=None) -> Task:
    """A GLUE task through ``datasets``; `load_dataset` stands in for ``datasets.load_dataset`` (tests)."""
    key = _GLUE_ALIASES.get(name.lower(), name.lower())
    if key not in GLUE_TASKS:
        raise UsageError(f"--task glue/{name}: unknown GLUE task; use one of {', '.join('glue/' + k for k in GLUE_TASKS)}")
    text_col, pair_col, n_labels, metric = GLUE_TASKS[key]
    if load_dataset is None:
        try:
            from datasets import load_dataset
        except ImportError:
            raise UsageError("--task glue/...: needs the `datasets` package (pip install 'galore-mini[train]')") from None
    try:
        data = load_dataset("nyu-mll/glue", key, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:  # offline, hub errors, missing config: all mean the same to the user
        raise UsageError(f"--task glue/{key}: cannot load nyu-mll/glue from the Hugging Face hub "
                         f"({str(exc).splitlines()[0][:200]}); GLUE needs the network once (then it is cached), "
                         "or export it to train/validation files and pass the folder") from None
    val_split = "validation_matched" if key == "mnli" else "validation"

    def convert(split: str) -> list[Example]:
        if split not in data:
            raise UsageError(f"--task glue/{key}: the dataset has no {split!r} split")
        rows = data[split]
        out = []
        for row in rows:
            label = row["label"]
            if label is None or (n_labels > 1 and int(label) < 0):
                continue  # GLUE hides test labels as -1
            out.append(Example(str(row[text_col]), str(row[pair_col]) if pair_col else None,
                               float(label) if n_labels == 1 else int(label)))
        return out

    train, valid = convert("train"), convert(val_split)
    labels = [] if n_labels == 1 else list(range(n_labels))
    return _check_labels(Task(f"glue/{key}", train, valid, labels, metric, f"nyu-mll/glue {key}"))


# -- the offline default: Debian package descriptions -> their Section -------------------------------

#: topical sections (the language/library sections are left out: their descriptions name them outright)
DEBIAN_SECTIONS = ("games", "graphics", "mail", "math", "net", "science", "sound", "text")
DEBIAN_PER_CLASS = 600
_PACKAGE_LISTS = ("/var/lib/apt/lists/*_Packages", "/var/lib/apt/lists/*_Packages.lz4",
                  "/var/lib/apt/lists/*_Packages.gz", "/var/lib/apt/lists/*_Packages.xz")


def _read_package_list(path: str) -> str:
    if path.endswith(".lz4"):
        if shutil.which("lz4") is None:
            raise UsageError(f"{DEBIAN_TASK}: {path} is lz4-compressed and the `lz4` program is missing "
                             "(apt-get install lz4)")
        return subprocess.run(["lz4", "-dc", path], check=True, capture_output=True).stdout.decode("utf-8", "replace")
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    if path.endswith(".xz"):
        import lzma

        return lzma.open(path, "rt", encoding="utf-8", errors="replace").read()
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _parse_stanzas(text: str):
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            yield fields


def _apt_package_records() -> tuple[list[str], str]:
    """Every package record apt knows: ``apt-cache dumpavail`` (decompresses any list format), else the list files."""
    if shutil.which("apt-cache"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True).stdout
            if b"Package:" in out:
                return [out.decode("utf-8", "replace")], "apt-cache dumpavail"
    paths = sorted({p for pattern in _PACKAGE_LISTS for p in glob.glob(pattern)})
    if not paths:
        raise UsageError(f"{DEBIAN_TASK}: apt knows no packages and /var/lib/apt/lists holds no package lists "
                         "(run `apt-get update` once), or pass --task FILE")
    return [_read_package_list(p) for p in paths], ", ".join(paths)


def debian_sections(lists: Sequence[str] | None = None, sections: Sequence[str] = DEBIAN_SECTIONS,
                    per_class: int = DEBIAN_PER_CLASS) -> Task:
    """Debian package one-line descriptions labelled by their archive Section (offline, no hub).

    Source: apt's package records (``apt-cache dumpavail``; else the lists in
    ``/var/lib/apt/lists/*_Packages*``), present after any ``apt-get update``; `lists` names files instead. Rows: the ``Description`` of every package in one of `sections`,
    a description that occurs under two sections dropped, duplicates kept once. At most
    `per_class` per section (the first by package name). The split keeps every binary
    package of one source package on one side (hash of the ``Source`` name, 10%), so
    ``foo`` and ``foo-data`` never straddle it. Not the pretraining text (Python's docs).
    """
    if lists is None:
        texts, where = _apt_package_records()
    else:
        texts, where = [_read_package_list(p) for p in lists], ", ".join(lists)
    by_text: dict[str, tuple[str, str, str]] = {}
    clash: set[str] = set()
    wanted = set(sections)
    for text_block in texts:
        for fields in _parse_stanzas(text_block):
            section = fields.get("Section", "").rsplit("/", 1)[-1]  # contrib/net -> net
            text = fields.get("Description", "").strip()
            if section not in wanted or not text:
                continue
            source = fields.get("Source", fields["Package"]).split()[0]
            seen = by_text.get(text)
            if seen is not None and seen[1] != section:
                clash.add(text)
            elif seen is None or fields["Package"] < seen[0]:
                by_text[text] = (fields["Package"], section, source)
    rows = sorted((pkg, section, source, text) for text, (pkg, section, source) in by_text.items() if text not in clash)
    taken: Counter = Counter()
    train, valid = [], []
    for pkg, section, source, text in rows:
        if taken[section] >= per_class:
            continue
        taken[section] += 1
        digest = int(hashlib.sha1(source.encode("utf-8")).hexdigest(), 16) / 16 ** 40
        (valid if digest < VAL_FRACTION else train).append(Example(text, None, section))
    missing = [s for s in sections if taken[s] == 0]
    if missing:
        raise UsageError(f"{DEBIAN_TASK}: the package lists hold no package in section(s) {', '.join(missing)}")
    task = Task(DEBIAN_TASK, train, valid, sorted(sections), "accuracy", where)
    return _check_labels(task)


def write_task(task: Task, folder: str | os.PathLike) -> Path:
    """Write `task` as ``train.jsonl`` + ``validation.jsonl`` (the folder form ``--task`` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", task.train), ("validation", task.val)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for e in split:
                row = {"text": e.text, "label": e.label}
                if e.text_pair is not None:
                    row["text_pair"] = e.text_pair
                f.write(json.dumps(row) + "\n")
    return folder
