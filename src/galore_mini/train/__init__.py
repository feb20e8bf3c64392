"""The harness: LLaMA models, data, the pretraining loop, evaluation, memory estimates, CLI."""
