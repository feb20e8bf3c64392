"""Model configurations by name, and models built from them: what the harness trains and the estimator counts.

The named sizes follow the GaLore paper's table of LLaMA models (hidden size, MLP width, layers,
heads); ``tiny`` and ``llama_20m`` are small enough for a 2-core CPU. A path to a JSON file
holding a Hugging Face config (``config.json`` as ``save_pretrained`` writes it, or any dict of
its fields) works too; ``model_type`` picks the config class (default ``llama``).

Configs are checked strictly, because ``transformers`` accepts any keyword and falls back to its
defaults (a misspelled ``hidden_sise`` would give a 7B model): an unknown key is a
:class:`~galore_mini.errors.UsageError` with a did-you-mean naming the key and the file; the keys
of :data:`REQUIRED_KEYS` must be present (``vocab_size`` may come from the caller instead, as the
harness takes it from the tokenizer); sizes must be positive integers, the heads must divide the
hidden size (unless ``head_dim`` is given) and the key/value heads must divide the heads.

This module imports ``transformers`` only when a config or model is built.

Example::

    >>> from galore_mini.models import build_model
    >>> model = build_model("tiny", vocab_size=8192)
    >>> sum(p.numel() for p in model.parameters())
    2901120
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
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

# the GaLore paper's rank per size (128 at 60M … 1024 at 7B); the two small test sizes get a rank below their width
DEFAULT_RANKS = {"tiny": 32, "llama_20m": 64, "llama_60m": 128, "llama_130m": 256, "llama_350m": 256,
                 "llama_1b": 512, "llama_7b": 1024}
FALLBACK_RANK = 128

#: keys a Llama-layout config must state (``vocab_size`` may be passed separately)
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_POSITIVE_KEYS = REQUIRED_KEYS + ("num_key_value_heads", "head_dim", "max_position_embeddings")
# Keys Hugging Face writes into config.json beyond the config class's own fields, in this and earlier
# transformers versions (generation settings and renamed fields of 4.x), so a saved config loads.
_HF_FILE_KEYS = frozenset((
    "_name_or_path", "_attn_implementation_autoset", "add_cross_attention", "architectures", "bad_words_ids",
    "begin_suppress_tokens", "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
    "diversity_penalty", "do_sample", "dtype", "early_stopping", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label",
    "is_decoder", "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length", "model_type",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_labels", "num_return_sequences",
    "output_attentions", "output_hidden_states", "output_scores", "prefix", "problem_type", "pruned_heads",
    "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate", "rope_scaling",
    "rope_theta", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss",
    "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript", "transformers_version",
    "typical_p", "use_bfloat16",
))


def default_rank(model) -> int:
    """The paper's rank for a named size (GaLore: 128 at 60M … 1024 at 7B), else 128."""
    return DEFAULT_RANKS.get(model, FALLBACK_RANK) if isinstance(model, str) else FALLBACK_RANK


def _config_class(model_type: str, source: str):
    from transformers import CONFIG_MAPPING, LlamaConfig

    if model_type == "llama":
        return LlamaConfig
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"model config {source}: model_type={model_type!r} is not a transformers model type{hint}")
    return CONFIG_MAPPING[model_type]


def _known_keys(cls) -> set[str]:
    keys = {name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")}
    keys |= set(getattr(cls, "attribute_map", {}) or {})
    return keys | _HF_FILE_KEYS


def check_config_fields(fields: dict[str, Any], source: str = "(dict)", cls=None,
                        vocab_from_caller: bool = False) -> None:
    """Raise :class:`UsageError` for an unknown key, a missing required key or a bad size in `fields`.

    `source` names where the fields came from (the JSON path) in every message; `cls` is the config
    class (default: from ``model_type``, else ``LlamaConfig``); `vocab_from_caller`: ``vocab_size``
    will be supplied separately, so it need not be in `fields`.
    """
    if cls is None:
        cls = _config_class(fields.get("model_type", "llama"), source)
    known = _known_keys(cls)
    for key in fields:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"model config {source}: unknown key {key!r}{hint}; {cls.__name__} does not take it "
                             f"(needed: {', '.join(REQUIRED_KEYS)})")
    # the Llama-layout keys this class really has (GPT-2 names its sizes n_embd, n_layer … and is not checked here)
    required = [k for k in REQUIRED_KEYS if k in known and not (k == "vocab_size" and vocab_from_caller)]
    missing = [k for k in required if fields.get(k) is None]
    if missing:
        extra = " (or pass --vocab-size)" if missing == ["vocab_size"] else ""
        raise UsageError(f"model config {source}: missing {', '.join(missing)}{extra}; a model config needs "
                         f"{', '.join(REQUIRED_KEYS)}")
    for key in _POSITIVE_KEYS:
        value = fields.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UsageError(f"model config {source}: {key}={value!r} must be a positive integer")
    hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
    if hidden and heads and fields.get("head_dim") is None and hidden % heads:
        raise UsageError(f"model config {source}: num_attention_heads={heads} does not divide hidden_size={hidden}; "
                         "change one, or give head_dim")
    kv_heads = fields.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise UsageError(f"model config {source}: num_key_value_heads={kv_heads} does not divide "
                         f"num_attention_heads={heads}")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"--model: no such config file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--model: {path!r} is not a readable JSON config ({exc})") from None
    if not isinstance(fields, dict):
        raise UsageError(f"--model: {path!r} holds a JSON {type(fields).__name__}, not an object of config fields")
    return fields


def model_fields(name_or_path: str) -> dict[str, Any]:
    """The fields a model name or JSON path stands for, as written (unchecked): what a run's model *is*,
    whatever its path (a run records them, and a resumed run must find the same)."""
    if name_or_path in MODEL_CONFIGS:
        return dict(MODEL_CONFIGS[name_or_path])
    if isinstance(name_or_path, str) and name_or_path.endswith(".json"):
        return _read_json(name_or_path)
    known = ", ".join(MODEL_CONFIGS)
    raise UsageError(f"--model: unknown model {name_or_path!r}; use one of {known} or a path to a JSON config")


def model_config(name_or_path: str | dict, vocab_size: int | None = None, **overrides):
    """A Hugging Face config (``LlamaConfig`` unless ``model_type`` says otherwise) for a named size, a
    JSON path or a dict of fields, checked strictly (see the module docstring); `vocab_size` and
    `overrides` replace fields."""
    if isinstance(name_or_path, dict):
        fields, source = dict(name_or_path), "(dict)"
    elif isinstance(name_or_path, str) and name_or_path in MODEL_CONFIGS:
        fields, source = dict(MODEL_CONFIGS[name_or_path]), repr(name_or_path)
    elif isinstance(name_or_path, str) and name_or_path.endswith(".json"):
        fields, source = _read_json(name_or_path), repr(name_or_path)
    else:
        known = ", ".join(MODEL_CONFIGS)
        raise UsageError(f"--model: unknown model {name_or_path!r}; use one of {known} or a path to a JSON config")
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise UsageError(f"vocab_size={vocab_size!r} must be a positive integer")
        fields["vocab_size"] = vocab_size
    fields.update(overrides)
    cls = _config_class(fields.get("model_type", "llama"), source)
    check_config_fields(fields, source, cls)
    fields.pop("model_type", None)
    fields.setdefault("tie_word_embeddings", False)
    if "rms_norm_eps" in _known_keys(cls):
        fields.setdefault("rms_norm_eps", 1e-6)
    return cls(**fields)


def build_model(name_or_config, vocab_size: int | None = None, seed: int | None = 0, dtype=None, device=None):
    """A freshly initialised causal LM (deterministic for a given seed); ``device="meta"`` allocates nothing.

    `name_or_config`: a named size, JSON path, dict of fields (all through :func:`model_config`) or a
    config object. Llama configs build ``LlamaForCausalLM``, others ``AutoModelForCausalLM.from_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig

    if isinstance(name_or_config, PretrainedConfig):
        config = name_or_config
    else:
        config = model_config(name_or_config, vocab_size)
    if seed is not None and device is None:
        torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if isinstance(config, LlamaConfig):
            model = LlamaForCausalLM(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
