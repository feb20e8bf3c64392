import os

import pytest
import torch

# a deterministic, small thread count keeps parallel test workers from oversubscribing 2 cores
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_llama(vocab=128, hidden=32, layers=2, heads=4, kv_heads=None, intermediate=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


@pytest.fixture
def llama():
    return tiny_llama()


def batches(vocab=128, n=4, batch=4, seq=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]
