"""Small corpora, model configs and run settings shared by the pretraining-harness tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from galore_mini.train.loop import TrainConfig

WORDS = ("the optimizer projects each gradient into a small subspace and keeps the moments there while "
         "a neuron shares one second moment so the state shrinks and training still converges to a good "
         "model of text with many layers heads tokens and steps").split()


def sentence(rng: random.Random) -> str:
    """A sentence from a little bigram-ish grammar: structure a tiny model can learn in a few steps."""
    start = rng.randrange(len(WORDS) - 8)
    words = WORDS[start:start + rng.randint(4, 8)]
    if rng.random() < 0.3:
        words = words + [rng.choice(WORDS)]
    return " ".join(words).capitalize() + "."


def document(rng: random.Random, sentences: int = 12) -> str:
    return " ".join(sentence(rng) for _ in range(sentences)) + "\n"


def write_corpus(folder: Path, docs: int = 40, seed: int = 0) -> Path:
    """A folder of `docs` .txt documents (a few KB in all)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(docs):
        (folder / f"doc{i:03d}.txt").write_text(document(rng), encoding="utf-8")
    return folder


def write_model(path: Path, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64) -> Path:
    """A JSON LlamaConfig small enough that a test step takes milliseconds."""
    path.write_text(json.dumps(dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                    num_attention_heads=heads, max_position_embeddings=64)))
    return path


def small_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A run over the synthetic corpus: vocab 300, seq 32, batch 4, 12 steps, no progress bar."""
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    model = tmp_path / "model.json"
    if not model.exists():
        write_model(model)
    settings = dict(model=str(model), data=str(corpus), vocab_size=300, seq_len=32, batch_size=4, steps=12,
                    eval_every=4, save_every=4, log_every=2, val_tokens=512, val_fraction=0.2, rank=8,
                    update_proj_gap=5, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"),
                    progress=False, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


class Killed(RuntimeError):
    """Raised from `on_step` to stop a run the way a crash would (after a checkpoint, before the next)."""


def kill_at(step):
    def on_step(done):
        if done == step:
            raise Killed(f"simulated kill after step {done}")

    return on_step
