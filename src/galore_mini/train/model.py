"""LLaMA-style models from named configurations.

The named sizes follow the GaLore paper's table of LLaMA models (hidden size,
MLP width, layers, heads); `tiny` and `llama_20m` are small enough for a
2-core CPU. A path to a JSON file holding a Hugging Face `LlamaConfig` (or any
dict of its fields) works too.

Example::

    from galore_mini.train.model import build_model
    model = build_model("tiny", vocab_size=8192)
"""

from __future__ import annotations

import json
import os
from typing import Any

from galore_mini.errors import UsageError

# hidden, intermediate (MLP), layers, heads, vocab
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, vocab_size=8192, max_position_embeddings=1024),
    "llama_20m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, vocab_size=32000, max_position_embeddings=1024),
    "llama_60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, vocab_size=32000, max_position_embeddings=1024),
    "llama_130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, vocab_size=32000, max_position_embeddings=1024),
    "llama_350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24,
                       num_attention_heads=16, vocab_size=32000, max_position_embeddings=1024),
    "llama_1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24,
                     num_attention_heads=32, vocab_size=32000, max_position_embeddings=1024),
    "llama_7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, vocab_size=32000, max_position_embeddings=2048),
}


def model_config(name_or_path: str | dict, vocab_size: int | None = None, **overrides):
    """A `transformers.LlamaConfig` for a named size, a JSON path or a dict of fields."""
    from transformers import LlamaConfig

    if isinstance(name_or_path, dict):
        fields = dict(name_or_path)
    elif name_or_path in MODEL_CONFIGS:
        fields = dict(MODEL_CONFIGS[name_or_path])
    elif isinstance(name_or_path, str) and name_or_path.endswith(".json"):
        if not os.path.isfile(name_or_path):
            raise UsageError(f"--model: no such config file {name_or_path!r}")
        try:
            with open(name_or_path, encoding="utf-8") as f:
                fields = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--model: {name_or_path!r} is not a readable JSON config ({exc})") from None
    else:
        known = ", ".join(MODEL_CONFIGS)
        raise UsageError(f"--model: unknown model {name_or_path!r}; use one of {known} or a path to a JSON config")
    if vocab_size is not None:
        fields["vocab_size"] = int(vocab_size)
    fields.update(overrides)
    fields.setdefault("tie_word_embeddings", False)
    fields.setdefault("rms_norm_eps", 1e-6)
    return LlamaConfig(**fields)


def build_model(name_or_config, vocab_size: int | None = None, seed: int | None = 0, dtype=None):
    """A freshly initialised `LlamaForCausalLM` (deterministic for a given seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = name_or_config if isinstance(name_or_config, LlamaConfig) else model_config(name_or_config, vocab_size)
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
