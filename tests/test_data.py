"""Corpus discovery, the content-hash split, tokenizer caching, packing and C4 streaming (local stand-in)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from galore_mini.errors import UsageError
from galore_mini.train import data as D
from pretrain_fixtures import document, write_corpus


def _prepare(corpus, tmp_path, **kw):
    settings = dict(seq_len=32, vocab_size=300, val_fraction=0.2, val_tokens=512, cache_dir=str(tmp_path / "cache"))
    settings.update(kw)
    return D.prepare_data(str(corpus), **settings)


def test_folder_documents_txt_and_jsonl_hidden_folders_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}))
    (tmp_path / ".galore-mini-cache").mkdir()
    (tmp_path / ".galore-mini-cache" / "c.txt").write_text("cache, not data")
    (tmp_path / "notes.md").write_text("not a .txt")
    docs = D.read_documents(tmp_path)
    assert [d.text for d in docs] == ["first document\n", "second", "third"]


def test_text_file_cut_at_blank_lines_into_documents_of_min_size(tmp_path):
    paragraphs = [f"paragraph {i} " + "x" * 300 for i in range(10)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs))
    docs = D.read_documents(path)
    # 4 paragraphs of ~313 chars reach 1000 characters; the text is kept exactly
    assert [len(d.text.split("\n\n")) for d in docs] == [4, 4, 2]
    assert "\n\n".join(d.text for d in docs) == path.read_text()


def test_split_is_by_content_so_file_order_and_new_files_do_not_move_documents(tmp_path):
    rng = random.Random(0)
    docs = [D.Document(f"d{i}", document(rng)) for i in range(200)]
    train, val = D.split_documents(docs, 0.1)
    assert 5 <= len(val) <= 40 and len(train) + len(val) == 200
    shuffled = docs[::-1] + [D.Document("new", document(rng))]
    train2, val2 = D.split_documents(shuffled, 0.1)
    assert {d.text for d in val} <= {d.text for d in val2}
    assert {d.text for d in train} <= {d.text for d in train2}
    # tiny corpora still get one validation document
    train3, val3 = D.split_documents(docs[:2], 0.01)
    assert len(train3) == 1 and len(val3) == 1


def test_prepare_caches_tokenizer_and_ids_and_the_key_follows_vocab(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    first = _prepare(corpus, tmp_path)
    assert first.vocab_size == 300 and first.val.shape[1] == 32 and first.val.dtype == torch.int64
    assert first.val.shape[0] == 512 // 32
    ids = first.train_ids
    assert ids.dtype == np.uint16 and (ids == first.tokenizer.eos_id).sum() > 0

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(D, "train_bpe", no_training)
    again = _prepare(corpus, tmp_path)
    assert torch.equal(again.val, first.val) and np.array_equal(again.train_ids, ids)
    with pytest.raises(AssertionError, match="cached"):
        _prepare(corpus, tmp_path, vocab_size=320)


def test_tokenizer_is_trained_on_training_documents_only(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    seen = []
    real = D.train_bpe
    monkeypatch.setattr(D, "train_bpe", lambda texts, vocab: seen.extend(texts) or real(texts, vocab))
    _prepare(corpus, tmp_path)
    train, val = D.split_documents(D.read_documents(corpus), 0.2)
    assert sorted(seen) == sorted(d.text for d in train)
    assert not set(seen) & {d.text for d in val}


def test_round_trip_decodes_the_text(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    prepared = _prepare(corpus, tmp_path)
    text = "The optimizer projects each gradient."
    ids = prepared.tokenizer.encode_batch([text])[0]
    assert prepared.tokenizer.decode(ids) == text


def test_cache_goes_beside_writable_data_else_to_the_user_cache(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    assert D.default_cache_root(corpus) == corpus / ".galore-mini-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.default_cache_root(D.Path("/usr/share/doc")) == tmp_path / "xdg" / "galore-mini"
    prepared = D.prepare_data(str(corpus), seq_len=32, vocab_size=300, val_fraction=0.2, val_tokens=512)
    assert prepared.cache_dir.startswith(str(corpus / ".galore-mini-cache"))
    # the cache inside the data folder is not read back as data
    assert len(D.read_documents(corpus)) == 40


def test_packed_stream_epochs_are_permutations_and_resume_exactly():
    ids = np.arange(10 * 8, dtype=np.uint16)
    stream = D.PackedStream(ids, seq_len=8, micro_batch=3, seed=1)
    batches = [stream.next() for _ in range(6)]  # 18 rows: one epoch of 10 and 8 of the next
    rows = torch.cat(batches)
    assert sorted(rows[:10, 0].tolist()) == list(range(0, 80, 8))
    assert all(torch.equal(r, torch.arange(r[0], r[0] + 8)) for r in rows)
    assert rows[:10, 0].tolist() != rows[10:, 0].tolist()[:10]  # a fresh permutation each epoch
    state = {"position": 9}
    resumed = D.PackedStream(ids, 8, 3, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat([resumed.next() for _ in range(3)]), rows[9:18])
    other_seed = D.PackedStream(ids, 8, 3, seed=2)
    assert not torch.equal(other_seed.next(), batches[0])


def test_validation_rows_are_the_same_for_any_seed_and_batch(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    a = _prepare(corpus, tmp_path)
    b = _prepare(corpus, tmp_path, cache_dir=str(tmp_path / "other-cache"))
    assert torch.equal(a.val, b.val)
    first_rows = a.train_stream(4, seed=0).next()
    assert not any(torch.equal(first_rows[0], v) for v in a.val)


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


BAD_SOURCES = {
    "missing": (lambda p: p / "missing", "does not exist"),
    "empty file": (lambda p: _write(p / "empty.txt", ""), "contains no text"),
    "non-UTF-8": (lambda p: _write(p / "latin.txt", "caf\xe9 cr\xe8me".encode("latin-1")), "is not UTF-8 text"),
    "jsonl without text": (lambda p: _write(p / "bad.jsonl", '{"content": "x"}\n'), "no string field 'text'"),
    "folder without text files": (lambda p: (p / "d").mkdir() or p / "d", "holds no .txt or .jsonl"),
    "one document": (lambda p: _write(p / "one.txt", "just one short document"), "at least two documents"),
    "300 KB of NUL bytes": (lambda p: _write(p / "zeros.txt", bytes(300_000)),
                            r"is binary, not text \(300,000 NUL bytes of 300,000, the first at offset 0\)"),
    "a binary file among text files": (lambda p: write_corpus(p / "mixed", docs=3) and
                                       _write(p / "mixed" / "image.txt", b"GIF89a\x01\x00\x00\x00\xff") and p / "mixed",
                                       r"image.txt' is binary, not text"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_are_usage_errors(tmp_path, case):
    make, message = BAD_SOURCES[case]
    with pytest.raises(UsageError, match=message):
        _prepare(make(tmp_path), tmp_path)


def _fake_stdlib(folder, files=8):
    """A stand-in standard library: a few modules, a test suite and site-packages (which must be left out)."""
    rng = random.Random(5)
    for i in range(files):
        package = folder / ("email" if i % 2 else "") / f"mod{i}.py"
        package.parent.mkdir(parents=True, exist_ok=True)
        package.write_text(f'"""Module {i}."""\n\n' + "".join(f"# {document(rng, 2)}" for _ in range(6)))
    for left_out in ("test/test_mod.py", "site-packages/pkg/x.py", "email/__pycache__/mod1.py"):
        (folder / left_out).parent.mkdir(parents=True, exist_ok=True)
        (folder / left_out).write_text("NOT PART OF THE CORPUS\n")
    (folder / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    return folder


def test_missing_default_corpus_falls_back_to_the_standard_library_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEFAULT_CORPUS", str(tmp_path / "no-python-docs"))
    stdlib = _fake_stdlib(tmp_path / "lib" / "python3.x")
    monkeypatch.setattr(D, "stdlib_sources", lambda: stdlib)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    said = []
    prepared = D.prepare_data(None, seq_len=32, vocab_size=300, val_fraction=0.2, val_tokens=256, log=said.append)
    fallback = [m for m in said if "not installed" in m]
    assert len(fallback) == 1 and "standard library" in fallback[0] and str(stdlib) in fallback[0]
    assert "8 .py files" in fallback[0] and "make corpus" in fallback[0]
    # exactly the eight modules, whole: the test suite, site-packages, caches and non-UTF-8 files left out
    docs = D.stdlib_documents(stdlib)
    assert sorted(d.key for d in docs) == sorted(str(p.relative_to(stdlib)) for p in stdlib.rglob("mod*.py")
                                                 if "__pycache__" not in p.parts)
    assert all("NOT PART" not in d.text for d in docs)
    text = prepared.tokenizer.decode(prepared.val[0].tolist())
    assert "NOT PART" not in text and len(prepared.val) > 0 and prepared.train_rows > 0
    # the library sits in a writable folder here, as with pyenv or conda: the cache still goes to the user's
    assert not any(p.name.startswith(".galore") for p in stdlib.rglob("*"))
    assert prepared.cache_dir.startswith(str(tmp_path / "user-cache" / "galore-mini" / "python-stdlib-"))


def test_the_fallback_reads_this_pythons_own_standard_library():
    docs = D.stdlib_documents()
    keys = {d.key for d in docs}
    assert "os.py" in keys and os.path.join("email", "message.py") in keys
    assert not any(k.split(os.sep)[0] in ("test", "site-packages") for k in keys)
    assert sum(len(d.text) for d in docs) > 2_000_000  # megabytes of text, like the documented default


def test_missing_default_corpus_and_standard_library_says_how_to_point_data_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEFAULT_CORPUS", str(tmp_path / "no-python-docs"))
    monkeypatch.setattr(D, "stdlib_sources", lambda: tmp_path / "no-stdlib")
    with pytest.raises(UsageError, match="not installed and the standard library's sources .* point --data at a text"):
        D.prepare_data(None, seq_len=32, cache_dir=str(tmp_path / "cache"))


# -- C4 through `datasets` streaming, with local JSONL standing in for the hub ----------------------------


def _c4_standin(tmp_path):
    """``load_dataset`` that serves local JSONL with C4's fields, through the real streaming code path."""
    import datasets

    rng = random.Random(3)
    files = {}
    for split, count in (("train", 120), ("validation", 30)):
        path = tmp_path / f"c4-{split}.jsonl"
        with open(path, "w") as f:
            for i in range(count):
                f.write(json.dumps({"text": document(rng, 4), "timestamp": "2019-04-25", "url": f"u{i}"}) + "\n")
        files[split] = str(path)
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.load_dataset("json", data_files=files[split], split="train", streaming=True)

    return load_dataset, calls


def test_c4_streams_tokenises_on_the_fly_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "C4_TOKENIZER_DOCS", 60)
    load_dataset, calls = _c4_standin(tmp_path)
    prepared = D.prepare_data("c4", seq_len=32, vocab_size=300, val_tokens=256, cache_dir=str(tmp_path / "cache"),
                              load_dataset=load_dataset)
    assert ("allenai/c4", "en", "train", True) in calls and ("allenai/c4", "en", "validation", True) in calls
    assert prepared.val.shape == (8, 32) and prepared.train_ids is None
    stream = prepared.train_stream(3, seed=0)
    batches = [stream.next() for _ in range(5)]
    assert all(b.shape == (3, 32) for b in batches)
    # the stream is the documents in order, separated by EOS: the first row starts the first document
    first_doc = next(iter(load_dataset("allenai/c4", "en", "train", True)))["text"]
    assert prepared.tokenizer.decode(batches[0][0].tolist()).startswith(first_doc[:20])
    state = stream.state_dict()
    following = [stream.next() for _ in range(3)]
    resumed = prepared.train_stream(3, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next()) for a in following)
    # the val rows and tokenizer come from the cache the second time (no stream opened for them)
    calls.clear()
    again = D.prepare_data("c4", seq_len=32, vocab_size=300, val_tokens=256, cache_dir=str(tmp_path / "cache"),
                           load_dataset=load_dataset)
    assert torch.equal(again.val, prepared.val) and calls == []


def test_c4_unreachable_is_a_usage_error(tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    with pytest.raises(UsageError, match="cannot stream allenai/c4"):
        D.prepare_data("c4", seq_len=32, vocab_size=300, cache_dir=str(tmp_path / "cache"), load_dataset=offline)
    assert not os.path.exists(tmp_path / "cache" / "meta.json")
