"""param_groups reads Llama, Mistral/Qwen2 (grouped-query), GPT-2 (Conv1D, fused qkv) and plain models."""

import pytest
import torch
from torch import nn

import galore_mini as gm
from conftest import tiny_llama


def _info(groups, name):
    return next(i for i in groups.infos if i.name == name)


def test_llama_layout():
    model = tiny_llama(hidden=32, heads=4, kv_heads=2, intermediate=64)
    groups = gm.param_groups(model, "galore_mini", rank=8, weight_decay=0.1)
    q = _info(groups, "model.layers.0.self_attn.q_proj.weight")
    k = _info(groups, "model.layers.0.self_attn.k_proj.weight")
    assert (q.role, q.block, q.options["rank"]) == ("query", "heads:8", 8)
    assert k.shape == (16, 32) and k.block == "heads:8"  # 2 kv heads of head_dim 8
    assert _info(groups, "model.layers.0.self_attn.v_proj.weight").block == "rows"
    assert _info(groups, "model.layers.0.mlp.down_proj.weight").options["rank"] == 8
    embed = _info(groups, "model.embed_tokens.weight")
    head = _info(groups, "lm_head.weight")
    norm = _info(groups, "model.norm.weight")
    assert (embed.role, embed.block, "rank" in embed.options) == ("embedding", "rows", False)
    assert (head.role, head.block, "rank" in head.options) == ("output", "rows", False)
    assert (norm.role, norm.block, norm.options["weight_decay"]) == ("norm", "tensor", 0.0)
    assert q.options["weight_decay"] == 0.1
    text = str(groups)
    assert "model.layers.0.self_attn.q_proj.weight" in text and "GaLore r=8 (right)" in text
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_grouped_query_families(family):
    import transformers

    config_cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family]
    model_cls = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[family]
    config = config_cls(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32)
    model = model_cls(config)
    groups = gm.param_groups(model, "adam_mini")
    k = _info(groups, "model.layers.0.self_attn.k_proj.weight")
    assert k.shape == (16, 48) and k.block == "heads:8"
    if family == "qwen2":  # Qwen2 has q/k/v biases: plain Adam, no decay
        bias = _info(groups, "model.layers.0.self_attn.q_proj.bias")
        assert (bias.role, bias.block, bias.options["weight_decay"]) == ("bias", "elementwise", 0.0)
    opt = gm.AdamMini(groups, lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.state[k.param]["exp_avg_sq"].shape == (2,)


def test_gpt2_conv1d_and_fused_qkv():
    import transformers

    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    groups = gm.param_groups(model, "galore_mini", rank=4)
    c_attn = _info(groups, "transformer.h.0.attn.c_attn.weight")
    assert c_attn.shape == (32, 96) and c_attn.role == "qkv"
    assert c_attn.block == "cols:4x8,4x8,32x1" and c_attn.options["rank"] == 4
    assert _info(groups, "transformer.h.0.mlp.c_fc.weight").block == "cols"
    assert _info(groups, "transformer.wte.weight").role == "embedding"
    opt = gm.GaLoreMini(groups, lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.state[c_attn.param]["exp_avg_sq"].shape == (4 + 4 + 32,)


def test_plain_linear_model_needs_a_target_and_takes_overrides():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(32, 32)
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
            self.head = nn.Linear(32, 10)

    net = Net()
    # no repeated blocks: the default rule selects nothing, and GaLore that projects nothing is an error
    with pytest.raises(gm.UsageError, match=r"no repeated blocks.*attn\.weight.*target_modules"):
        gm.param_groups(net, "galore", rank=4)
    groups = gm.param_groups(net, "galore", rank=4, target_modules=["attn", "mlp"],
                             overrides=[(r"^mlp\.2\.weight$", {"rank": 2}), (r"^mlp\.", {"project": False})])
    assert _info(groups, "attn.weight").options["rank"] == 4
    assert _info(groups, "mlp.2.weight").options["rank"] == 2  # first match wins
    assert "rank" not in _info(groups, "mlp.0.weight").options
    assert "rank" not in _info(groups, "head.weight").options  # not targeted
    gm.GaLoreAdamW(groups)


def test_rank_above_small_weights_falls_back_with_a_log(caplog):
    model = tiny_llama(hidden=32, heads=4, kv_heads=2, intermediate=64)  # k and v are 16×32
    with caplog.at_level("WARNING", logger="galore_mini"):
        groups = gm.param_groups(model, "galore", rank=20)
    unprojected = {i.name.split(".")[-2] for i in groups.infos if i.projectable and "rank" not in i.options}
    assert unprojected == {"k_proj", "v_proj"}
    assert caplog.text.count("left unprojected") == 1
    with pytest.raises(gm.UsageError, match=r"project nothing: rank=32 is not below the smaller side of any"):
        gm.param_groups(model, "galore", rank=32)


def test_full_method_is_torch_adamw_without_decay_on_norms():
    model = tiny_llama()
    opt = gm.create_optimizer(model, "full", lr=1e-3, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.0, 0.1}
