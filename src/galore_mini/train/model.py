"""LLaMA-style models from named configurations (kept for the harness; they live in :mod:`galore_mini.models`).

Example::

    from galore_mini.train.model import build_model
    model = build_model("tiny", vocab_size=8192)
"""

from galore_mini.models import MODEL_CONFIGS, build_model, model_config

__all__ = ["MODEL_CONFIGS", "build_model", "model_config"]
