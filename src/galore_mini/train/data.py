"""Pretraining data: find the corpus, train or load a tokenizer, split, tokenise once, pack, batch.

Sources (``--data``):

* nothing: the default corpus, the Python documentation sources that Debian's
  ``python3.11-doc`` installs (``/usr/share/doc/python3.11/html/_sources``, ~11 MB of reST).
  Where that package is missing (any non-Debian machine, a pip install), the fallback is text
  every Python installation has: the standard library's own ``.py`` files
  (``sysconfig.get_paths()["stdlib"]``), each file one document, whole (code, docstrings and
  comments), without its test suites (``test``, ``tests``, ``idle_test``), ``site-packages`` and
  ``__pycache__`` (~12 MB for CPython 3.11). One line says so; the figures then differ from the
  documented ones, since the text (and its size, with the Python version) differs;
* a folder: every ``.txt`` file below it is one document, every line of a ``.jsonl`` file
  (``{"text": ...}``) is one document (hidden folders, e.g. our own cache, are skipped);
* a text file: cut into documents at blank lines, consecutive paragraphs joined until a
  document holds at least ``MIN_DOC_CHARS`` characters; a ``.jsonl`` file: one document a line;
* ``c4``: ``allenai/c4`` (``en``) streamed through ``datasets`` with ``streaming=True``, as the
  GaLore paper trains; the train stream is tokenised on the fly, the validation set is the
  head of C4's own validation split.

Split. Every document goes to validation or training by a hash of its *content*
(``sha1(text) < val_fraction``), so the split does not depend on file order or on
which other files are present, and duplicated documents never straddle it. The
validation set is the first ``val_tokens`` tokens of the validation documents (in
hash order) packed into ``seq_len`` rows: the same fixed tensor for every method
trained on the same data, tokenizer and ``seq_len``.

Tokenizer. By default a byte-level BPE (``tokenizers``) trained on the training
documents only, with ``<|endoftext|>`` as the document separator; or
``tokenizer=NAME_OR_PATH`` for a pretrained one (a ``tokenizer.json`` file, a
local folder, or a Hugging Face hub name). The tokenizer and the token ids
(``.npy``, uint16 when the vocabulary allows) are cached in a folder whose name
is a hash of the documents, the vocabulary size, the split and the tokenizer, so
tokenising the 11 MB default corpus happens once. The cache sits beside the data
(``<data>/.galore-mini-cache``) when that folder is writable and not a system
location, else under ``$XDG_CACHE_HOME/galore-mini`` (``~/.cache/galore-mini``);
``cache_dir`` overrides both.

Batches. Training tokens are one stream (documents joined by the separator) cut
into rows of ``seq_len`` tokens; each epoch visits the rows in a permutation
seeded by ``(seed, epoch)``. The position in the stream is one integer (rows
consumed), so resuming is exact and costs nothing. Under DDP every rank computes
the same global micro-batch and takes its own slice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from galore_mini.errors import UsageError

DEFAULT_CORPUS = "/usr/share/doc/python3.11/html/_sources"
EOS_TOKEN = "<|endoftext|>"
MIN_DOC_CHARS = 1000
CACHE_FORMAT = 1  # bump when the cached files change meaning
_SYSTEM_ROOTS = ("/usr/", "/opt/", "/etc/", "/lib/", "/bin/", "/sbin/", "/snap/", "/nix/")
C4_TOKENIZER_DOCS = 20000  # C4 training documents a BPE for `--data c4` is trained on
_ENCODE_CHUNK = 256  # documents per encode_batch call


def _missing_corpus_hint() -> str:
    return ("point --data at a text file, a folder of .txt/.jsonl files, or 'c4'; "
            "the default corpus comes from `apt-get install python3.11-doc` (or `make corpus`)")


# -- documents ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One document: a stable key (file, file:line) for messages and its text."""

    key: str
    text: str


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--data: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8 may hold NULs, but no text does: this is binary (or UTF-16/32 text)
        raise UsageError(f"--data: {str(path)!r} is binary, not text ({data.count(0):,} NUL bytes of {len(data):,}, "
                         f"the first at offset {nul}); give UTF-8 text (UTF-16 text: convert it with "
                         "`iconv -f utf-16 -t utf-8`)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--data: {str(path)!r} is not UTF-8 text (invalid byte at offset {exc.start}); "
                         "convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _paragraph_documents(path: Path, text: str) -> list[Document]:
    docs, current = [], []
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= MIN_DOC_CHARS:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return [Document(f"{path}#{i}", d) for i, d in enumerate(docs) if d.strip()]


def _jsonl_documents(path: Path, text: str) -> list[Document]:
    docs = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--data: {path}:{line_no} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"--data: {path}:{line_no} has no string field 'text' (each line must be "
                             '{"text": "..."})')
        if record["text"].strip():
            docs.append(Document(f"{path}:{line_no}", record["text"]))
    return docs


def read_documents(source: str | os.PathLike) -> list[Document]:
    """The documents of a text file, a ``.jsonl`` file or a folder (see the module docstring)."""
    path = Path(source).expanduser()
    if not path.exists():
        if str(source) == DEFAULT_CORPUS:
            raise UsageError(f"the default corpus {DEFAULT_CORPUS} is not installed; {_missing_corpus_hint()}")
        raise UsageError(f"--data: {str(source)!r} does not exist; {_missing_corpus_hint()}")
    if path.is_file():
        text = _read_text(path)
        docs = _jsonl_documents(path, text) if path.suffix == ".jsonl" else _paragraph_documents(path, text)
        if not docs:
            raise UsageError(f"--data: {str(path)!r} contains no text")
        return docs
    files = sorted(p for p in path.rglob("*")
                   if p.suffix in (".txt", ".jsonl") and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UsageError(f"--data: the folder {str(path)!r} holds no .txt or .jsonl files; {_missing_corpus_hint()}")
    docs = []
    for file in files:
        text = _read_text(file)
        if file.suffix == ".jsonl":
            docs.extend(_jsonl_documents(file, text))
        elif text.strip():
            docs.append(Document(str(file), text))
    if not docs:
        raise UsageError(f"--data: the files under {str(path)!r} contain no text")
    return docs


def stdlib_sources() -> Path:
    """Where this Python's standard library lives (the fallback corpus)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """The fallback corpus: every ``.py`` file of the standard library (tests and site-packages aside), one
    document each, in path order; files that are not UTF-8 are left out."""
    root = stdlib_sources() if root is None else root
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP]  # never walk into them
        paths.extend(Path(folder) / f for f in files if f.endswith(".py"))
    docs = []
    for path in sorted(paths, key=lambda p: p.relative_to(root).parts):
        if path.is_file():
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip() and "\0" not in text:
                docs.append(Document(str(path.relative_to(root)), text))
    return docs


def _default_documents(log: Callable[[str], None]) -> tuple[list[Document], str, Path | None]:
    """(documents, source label, cache root) of the default corpus, or of its fallback (saying so)."""
    if Path(DEFAULT_CORPUS).exists():
        return read_documents(DEFAULT_CORPUS), DEFAULT_CORPUS, None
    root = stdlib_sources()
    docs = stdlib_documents(root)
    if len(docs) < 2:
        raise UsageError(f"the default corpus {DEFAULT_CORPUS} is not installed and the standard library's sources "
                         f"({root}) are not there to fall back on; {_missing_corpus_hint()}")
    size = sum(len(d.text.encode("utf-8")) for d in docs)
    log(f"the default corpus {DEFAULT_CORPUS} (Debian's python3.11-doc) is not installed; training on the Python "
        f"standard library's own sources instead ({root}: {len(docs)} .py files, {size / 1e6:.1f} MB); "
        "`make corpus` installs the default, --data takes any text")
    # the standard library may sit in a writable folder (pyenv, conda): never put our cache inside it
    return docs, f"{root} (.py sources)", default_cache_root(None)


def _content_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation) by content hash; both non-empty; validation in hash order, train in key order.

    A document is in validation when the first 8 hex digits of ``sha1(text)`` read as a
    fraction of 2³² fall below `val_fraction`. With few documents none may qualify; then
    the one with the smallest hash is moved to validation, so small corpora still work.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction={val_fraction} must be between 0 and 1")
    if len(docs) < 2:
        raise UsageError("--data: need at least two documents to hold some out for validation "
                         f"(found {len(docs)}; a text file is cut at blank lines into documents of "
                         f"{MIN_DOC_CHARS}+ characters)")
    hashed = sorted(((_content_hash(d.text), d) for d in docs), key=lambda hd: (hd[0], hd[1].key))
    threshold = int(val_fraction * 16 ** 8)
    val = [d for h, d in hashed if int(h[:8], 16) < threshold]
    val_ids = {id(d) for d in val}
    train = [d for d in docs if id(d) not in val_ids]
    if not val:
        val, train = [hashed[0][1]], [d for d in docs if d is not hashed[0][1]]
    if not train:
        train, val = [val[-1]], val[:-1]
    return train, val


# -- tokenizers -----------------------------------------------------------------------------------


class TextTokenizer:
    """The few things the harness needs from a tokenizer, over `tokenizers` or `transformers` ones."""

    def __init__(self, backend, eos_id: int, vocab_size: int, name: str):
        self.backend = backend
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.name = name

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self.backend, "encode_batch"):  # tokenizers.Tokenizer
            return [e.ids for e in self.backend.encode_batch(texts)]
        return self.backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids))

    def digest(self) -> str:
        """SHA-256 of the tokenizer's full definition (vocabulary, merges, normalisation), or of its name when
        it has no serialised form: two tokenizers that map text to ids alike have the same digest."""
        backend = getattr(self.backend, "backend_tokenizer", self.backend)  # transformers' fast ones wrap one
        if not hasattr(backend, "to_str"):
            return hashlib.sha256(f"name={self.name}".encode("utf-8")).hexdigest()
        # what maps text to ids, canonically ordered (key order in the serialised form is not guaranteed)
        definition = json.loads(backend.to_str())
        canonical = {key: definition.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode("utf-8")).hexdigest()


def train_bpe(texts: list[str], vocab_size: int) -> "tokenizers.Tokenizer":  # noqa: F821
    """A byte-level BPE with `vocab_size` entries (fewer if the text runs out of merges) and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise UsageError(f"--vocab-size={vocab_size} must exceed 257 (256 bytes and the separator)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def load_pretrained_tokenizer(name_or_path: str) -> TextTokenizer:
    """A ``tokenizer.json`` file, or a folder / hub name that ``transformers.AutoTokenizer`` reads."""
    if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(name_or_path)
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise UsageError(f"--tokenizer: {name_or_path!r} has no {EOS_TOKEN} token to separate documents")
        return TextTokenizer(backend, eos, backend.get_vocab_size(), name_or_path)
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tokenizer: cannot load {name_or_path!r} ({str(exc).splitlines()[0]})") from None
    eos = backend.eos_token_id if backend.eos_token_id is not None else backend.sep_token_id
    if eos is None:
        raise UsageError(f"--tokenizer: {name_or_path!r} has no end-of-sequence token to separate documents")
    return TextTokenizer(backend, int(eos), len(backend), name_or_path)


def _cached_tokenizer(folder: Path, tokenizer: str | None, label_suffix: str = ""):
    """The pretrained tokenizer named by `tokenizer`, else the BPE cached in `folder`."""
    if tokenizer:
        return load_pretrained_tokenizer(tokenizer)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return _bpe_wrapper(backend, f"byte-level BPE {backend.get_vocab_size()}{label_suffix}")


def _bpe_wrapper(backend, name: str) -> TextTokenizer:
    return TextTokenizer(backend, backend.token_to_id(EOS_TOKEN), backend.get_vocab_size(), name)


def encode_documents(tokenizer: TextTokenizer, docs: Iterable[str]) -> np.ndarray:
    """Every document's ids followed by the separator, as one array (uint16 when the vocabulary fits)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32
    docs = list(docs)
    pieces = []
    for start in range(0, len(docs), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch(docs[start:start + _ENCODE_CHUNK]):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(np.asarray([tokenizer.eos_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


# -- caching --------------------------------------------------------------------------------------


def default_cache_root(source: Path | None) -> Path:
    """Beside the data when that folder is writable and not a system location, else the user cache."""
    if source is not None:
        folder = source if source.is_dir() else source.parent
        resolved = str(folder.resolve()) + "/"
        if os.access(folder, os.W_OK) and not resolved.startswith(_SYSTEM_ROOTS):
            return folder / ".galore-mini-cache"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "galore-mini"


def _atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array))


# -- the prepared data set ------------------------------------------------------------------------


@dataclass
class PretrainData:
    """Tokenised training stream, fixed validation rows and the tokenizer that made them."""

    tokenizer: TextTokenizer
    seq_len: int
    val: torch.Tensor  # [rows, seq_len] int64
    train_ids: np.ndarray | None = None  # the packed-from stream (None for streamed sources)
    source: str = ""
    cache_dir: str | None = None
    streaming: Callable[[], Iterator[str]] | None = field(default=None, repr=False)
    skip: Callable[[int], Iterator[str]] | None = field(default=None, repr=False)
    #: digest of what was tokenised (every document's content and the split) and how (tokenizer, vocabulary)
    fingerprint: str = ""
    documents: int | None = None  # how many documents (None for streamed sources)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def train_rows(self) -> int | None:
        return None if self.train_ids is None else len(self.train_ids) // self.seq_len

    def describe(self) -> str:
        train = (f"{len(self.train_ids):,} training tokens ({self.train_rows:,} rows)" if self.train_ids is not None
                 else "streamed training tokens")
        return (f"data {self.source}: {train}, {self.val.numel():,} validation tokens ({len(self.val)} rows of "
                f"{self.seq_len}), tokenizer {self.tokenizer.name} ({self.vocab_size} ids)")

    def train_stream(self, micro_batch: int, seed: int) -> "PackedStream | StreamedBatches":
        """Global micro-batches of `micro_batch` rows (all ranks' rows together)."""
        if self.train_ids is not None:
            return PackedStream(self.train_ids, self.seq_len, micro_batch, seed)
        return StreamedBatches(self.tokenizer, self.seq_len, micro_batch, self.streaming, self.skip)


def pack_rows(ids: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a token stream into full rows of `seq_len` (at most `max_tokens` tokens), as int64."""
    usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    rows = usable // seq_len
    return torch.from_numpy(ids[:rows * seq_len].astype(np.int64)).view(rows, seq_len)


class PackedStream:
    """Rows of a packed token stream in a fresh permutation per epoch; state = rows consumed."""

    def __init__(self, ids: np.ndarray, seq_len: int, micro_batch: int, seed: int):
        self.rows = len(ids) // seq_len
        if self.rows < 1:
            raise UsageError(f"the training split has {len(ids)} tokens, fewer than one row of --seq-len={seq_len}")
        self.data = torch.from_numpy(ids[:self.rows * seq_len].astype(np.int64)).view(self.rows, seq_len)
        self.micro_batch = micro_batch
        self.seed = seed
        self.position = 0
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.rows, generator=gen)
        return self._perm

    def next(self) -> torch.Tensor:
        picked = []
        for position in range(self.position, self.position + self.micro_batch):
            epoch, index = divmod(position, self.rows)
            picked.append(self._permutation(epoch)[index])
        self.position += self.micro_batch
        return self.data[torch.stack(picked)]

    @property
    def epoch(self) -> float:
        return self.position / self.rows

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class StreamedBatches:
    """Rows cut from documents tokenised as they stream in; state = documents read + tokens left over."""

    def __init__(self, tokenizer: TextTokenizer, seq_len: int, micro_batch: int,
                 open_stream: Callable[[], Iterator[str]], skip: Callable[[int], Iterator[str]] | None):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.open_stream = open_stream
        self.skip = skip
        self.docs_read = 0
        self.buffer: list[int] = []
        self._docs: Iterator[str] | None = None

    def _iterator(self) -> Iterator[str]:
        if self._docs is None:
            if self.docs_read and self.skip is not None:
                self._docs = self.skip(self.docs_read)
            else:
                stream = self.open_stream()
                for _ in range(self.docs_read):
                    next(stream)
                self._docs = stream
        return self._docs

    def next(self) -> torch.Tensor:
        need = self.micro_batch * self.seq_len
        docs = self._iterator()
        while len(self.buffer) < need:
            chunk = [text for _, text in zip(range(_ENCODE_CHUNK // 4), docs)]
            if not chunk:
                raise UsageError(f"the training stream ended after {self.docs_read} documents")
            self.docs_read += len(chunk)
            for ids in self.tokenizer.encode_batch(chunk):
                self.buffer.extend(ids)
                self.buffer.append(self.tokenizer.eos_id)
        rows, self.buffer = self.buffer[:need], self.buffer[need:]
        return torch.tensor(rows, dtype=torch.int64).view(self.micro_batch, self.seq_len)

    def state_dict(self) -> dict:
        return {"docs_read": self.docs_read, "buffer": torch.tensor(self.buffer, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.docs_read = int(state["docs_read"])
        self.buffer = [int(i) for i in state["buffer"].tolist()]
        self._docs = None


# -- preparing --------------------------------------------------------------------------------------


def _fingerprint(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def prepare_data(data: str | None = None, *, seq_len: int, vocab_size: int = 8192, tokenizer: str | None = None,
                 val_fraction: float = 0.05, val_tokens: int = 65536, cache_dir: str | None = None,
                 is_main: bool = True, barrier: Callable[[], None] | None = None,
                 load_dataset: Callable | None = None, log: Callable[[str], None] = lambda msg: None
                 ) -> PretrainData:
    """Tokenizer, cached token ids and fixed validation rows for `data` (see the module docstring).

    Under DDP only the main process writes the cache; `barrier` lets the others wait for it
    and then read the same files. `load_dataset` stands in for ``datasets.load_dataset`` (tests).
    """
    if seq_len < 2:
        raise UsageError(f"--seq-len={seq_len} must be at least 2")
    if val_tokens < seq_len:
        raise UsageError(f"--val-tokens={val_tokens} must hold at least one row of --seq-len={seq_len}")
    if data is not None and str(data).lower() == "c4":
        return _prepare_c4(seq_len=seq_len, vocab_size=vocab_size, tokenizer=tokenizer, val_tokens=val_tokens,
                           cache_dir=cache_dir, is_main=is_main, barrier=barrier, load_dataset=load_dataset, log=log)
    if data is None:
        docs, source, root = _default_documents(log)
        name = Path(source).name if source == DEFAULT_CORPUS else "python-stdlib"
    else:
        source, root = str(data), None
        docs = read_documents(source)
        name = Path(source).name or "data"
    train_docs, val_docs = split_documents(docs, val_fraction)
    key = _fingerprint([f"format={CACHE_FORMAT}", f"vocab={vocab_size}", f"val_fraction={val_fraction!r}",
                        f"tokenizer={tokenizer or 'bpe'}"]
                       + [f"{'v' if i < len(val_docs) else 't'}{_content_hash(d.text)}"
                          for i, d in enumerate(val_docs + train_docs)])
    if cache_dir:
        root = Path(cache_dir).expanduser()
    elif root is None:
        root = default_cache_root(Path(source).expanduser())
    folder = root / f"{name}-{key[:16]}"
    ready = folder / "meta.json"
    if is_main and not ready.exists():
        log(f"tokenizing {len(docs)} documents from {source} (cache: {folder})")
        if tokenizer:
            tok = load_pretrained_tokenizer(tokenizer)
        else:
            backend = train_bpe([d.text for d in train_docs], vocab_size)
            tok = _bpe_wrapper(backend, f"byte-level BPE {backend.get_vocab_size()}")
            _atomic_write(folder / "tokenizer.json", lambda f: f.write(backend.to_str()), mode="w")
        _save_npy(folder / "train.npy", encode_documents(tok, (d.text for d in train_docs)))
        _save_npy(folder / "val.npy", encode_documents(tok, (d.text for d in val_docs)))
        meta = {"source": source, "documents": len(docs), "train_documents": len(train_docs),
                "val_documents": len(val_docs), "vocab_size": tok.vocab_size, "tokenizer": tokenizer,
                "format": CACHE_FORMAT}
        _atomic_write(ready, lambda f: f.write(json.dumps(meta, indent=1)), mode="w")
    if barrier is not None:
        barrier()
    tok = _cached_tokenizer(folder, tokenizer)
    train_ids = np.load(folder / "train.npy")
    val = pack_rows(np.load(folder / "val.npy"), seq_len, val_tokens)
    if len(val) == 0:
        raise UsageError(f"the validation split has fewer than --seq-len={seq_len} tokens; "
                         "raise --val-fraction, lower --seq-len or give more text")
    if len(train_ids) < seq_len:
        raise UsageError(f"the training split has {len(train_ids)} tokens, fewer than one row of --seq-len={seq_len}; "
                         "give more text")
    return PretrainData(tok, seq_len, val, train_ids=train_ids, source=source, cache_dir=str(folder), fingerprint=key,
                        documents=len(docs))


def _c4_opener(load_dataset: Callable | None, split: str):
    def load():
        loader = load_dataset
        if loader is None:
            from datasets import load_dataset as loader
        return loader("allenai/c4", "en", split=split, streaming=True)

    def open_stream() -> Iterator[str]:
        return (row["text"] for row in load())

    def skip(n: int) -> Iterator[str]:
        dataset = load()
        if hasattr(dataset, "skip"):
            return (row["text"] for row in dataset.skip(n))
        rows = iter(dataset)
        for _ in range(n):
            next(rows)
        return (row["text"] for row in rows)

    return open_stream, skip


def _prepare_c4(*, seq_len, vocab_size, tokenizer, val_tokens, cache_dir, is_main, barrier, load_dataset, log
                ) -> PretrainData:
    """C4 streamed: tokenizer (trained on the first `C4_TOKENIZER_DOCS` train documents) and val rows cached."""
    train_open, train_skip = _c4_opener(load_dataset, "train")
    val_open, _ = _c4_opener(load_dataset, "validation")
    key = _fingerprint([f"format={CACHE_FORMAT}", "c4/en", f"vocab={vocab_size}", f"tokenizer={tokenizer or 'bpe'}",
                        f"docs={C4_TOKENIZER_DOCS}", f"val_tokens={val_tokens}"])
    folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_root(None)) / f"c4-en-{key[:16]}"
    ready = folder / "meta.json"
    if is_main and not ready.exists():
        log(f"preparing C4 (streamed; cache: {folder})")
        try:
            if tokenizer:
                tok = load_pretrained_tokenizer(tokenizer)
            else:
                texts = [t for _, t in zip(range(C4_TOKENIZER_DOCS), train_open())]
                backend = train_bpe(texts, vocab_size)
                tok = _bpe_wrapper(backend, f"byte-level BPE {backend.get_vocab_size()} (C4)")
                _atomic_write(folder / "tokenizer.json", lambda f: f.write(backend.to_str()), mode="w")
            ids: list[np.ndarray] = []
            count = 0
            val_docs = val_open()
            while count < val_tokens:
                chunk = [t for _, t in zip(range(64), val_docs)]
                if not chunk:
                    break
                ids.append(encode_documents(tok, chunk))
                count += len(ids[-1])
        except UsageError:
            raise
        except Exception as exc:  # datasets/huggingface_hub raise many types when the hub is out of reach
            raise UsageError(f"--data c4: cannot stream allenai/c4 ({exc}); it needs the Hugging Face hub, "
                             "or point --data at local text") from None
        _save_npy(folder / "val.npy", np.concatenate(ids) if ids else np.zeros(0, np.int32))
        _atomic_write(ready, lambda f: f.write(json.dumps({"source": "c4", "vocab_size": tok.vocab_size})), mode="w")
    if barrier is not None:
        barrier()
    tok = _cached_tokenizer(folder, tokenizer, " (C4)")
    val = pack_rows(np.load(folder / "val.npy"), seq_len, val_tokens)
    if len(val) == 0:
        raise UsageError(f"C4's validation split gave fewer than --seq-len={seq_len} tokens")
    return PretrainData(tok, seq_len, val, source="c4", cache_dir=str(folder), streaming=train_open,
                        skip=train_skip, fingerprint=key)
