"""What param_groups projects is read from structure: the matrices of the repeated blocks, any naming.

Each model here is one that main read wrong without a word: a user's transformer with q_proj … down_proj
directly in the block, fc1/fc2 blocks, blocks held as attributes, torch's own TransformerEncoder, tied
embeddings. The target spec follows Hugging Face's `optim_target_modules`.
"""

import logging
import types

import pytest
import torch
from torch import nn

import galore_mini as gm
from conftest import tiny_llama

D, HEADS, KV_HEADS, INTER, VOCAB = 32, 4, 2, 64, 64
HEAD_DIM = D // HEADS


class FlatBlock(nn.Module):
    """A Llama-like block with every projection directly in the block (no attention / MLP submodule)."""

    def __init__(self, head_attrs=True, bias=False):
        super().__init__()
        if head_attrs:
            self.num_heads, self.num_kv_heads = HEADS, KV_HEADS
        self.norm1 = nn.LayerNorm(D)
        self.q_proj = nn.Linear(D, D, bias=bias)
        self.k_proj = nn.Linear(D, KV_HEADS * HEAD_DIM, bias=bias)
        self.v_proj = nn.Linear(D, KV_HEADS * HEAD_DIM, bias=bias)
        self.o_proj = nn.Linear(D, D, bias=bias)
        self.norm2 = nn.LayerNorm(D)
        self.gate_proj = nn.Linear(D, INTER, bias=bias)
        self.up_proj = nn.Linear(D, INTER, bias=bias)
        self.down_proj = nn.Linear(INTER, D, bias=bias)


class FcBlock(nn.Module):
    """A ViT-style block: torch's MultiheadAttention and an fc1/fc2 MLP."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.fc1 = nn.Linear(D, INTER)
        self.fc2 = nn.Linear(INTER, D)


class TinyLM(nn.Module):
    def __init__(self, block=FlatBlock, layers=2, tie=False, **block_options):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(block(**block_options) for _ in range(layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def _info(groups, name):
    return next(i for i in groups.infos if i.name == name)


def _projected(groups):
    return sorted(i.name for i in groups.infos if "rank" in i.options)


def _random_grads(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


FLAT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("heads_from", ["attributes", "config"])
def test_projections_directly_in_the_block(heads_from):
    model = TinyLM(head_attrs=heads_from == "attributes")
    if heads_from == "config":
        model.config = types.SimpleNamespace(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    groups = gm.param_groups(model, "galore_mini", rank=4)
    assert _projected(groups) == sorted(f"blocks.{i}.{n}.weight" for i in range(2) for n in FLAT)
    roles = {n: _info(groups, f"blocks.0.{n}.weight").role for n in FLAT}
    assert roles == {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attn_out",
                     "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    assert _info(groups, "blocks.0.q_proj.weight").block == f"heads:{HEAD_DIM}"
    assert _info(groups, "blocks.0.k_proj.weight").block == f"heads:{HEAD_DIM}"  # 2 kv heads of 8
    assert _info(groups, "blocks.0.v_proj.weight").block == "rows"
    for name in ("embed.weight", "head.weight", "norm.weight", "blocks.0.norm1.weight"):
        assert "rank" not in _info(groups, name).options
    opt = gm.GaLoreMini(groups, lr=1e-2)
    _random_grads(model)
    opt.step()
    k = model.blocks[0].k_proj.weight
    assert opt.state[k]["exp_avg_sq"].shape == (KV_HEADS,)
    assert opt.state[k]["exp_avg"].shape == (4, D)  # low-rank first moment: the block is projected


def test_unknown_head_size_falls_back_to_rows_and_says_so(caplog):
    model = TinyLM(head_attrs=False)
    with caplog.at_level(logging.INFO, logger="galore_mini"):
        groups = gm.param_groups(model, "adam_mini")
    q = _info(groups, "blocks.0.q_proj.weight")
    assert q.block == "rows" and "head size unknown" in q.note
    assert "head size unknown" in str(groups)
    assert "head size of 4 query/key weight(s) could not be read" in caplog.text
    assert [r.levelname for r in caplog.records if "query/key" in r.message] == ["WARNING"]


def test_unrecognised_roles_get_rows_and_are_named(caplog):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, INTER), nn.Linear(INTER, D)

    model = TinyLM(block=Odd)
    with caplog.at_level(logging.INFO, logger="galore_mini"):
        groups = gm.param_groups(model, "galore_mini", rank=4)
    a = _info(groups, "blocks.1.a.weight")
    assert (a.role, a.block, a.options["rank"]) == ("linear", "rows", 4)
    assert "role unknown: one v block per output neuron" in str(groups)
    assert "4 weight(s) have no recognised role" in caplog.text


def test_fc_blocks_with_torch_multihead_attention():
    model = TinyLM(block=FcBlock)
    groups = gm.param_groups(model, "galore_mini", rank=4)
    per_block = ["attn.in_proj_weight", "attn.out_proj.weight", "fc1.weight", "fc2.weight"]
    assert _projected(groups) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in per_block)
    qkv = _info(groups, "blocks.0.attn.in_proj_weight")
    assert (qkv.role, qkv.block) == ("qkv", f"rows:{HEADS}x{HEAD_DIM},{HEADS}x{HEAD_DIM},{D}x1")
    assert _info(groups, "blocks.0.fc1.weight").role == "mlp"
    assert _info(groups, "blocks.0.attn.out_proj.weight").role == "attn_out"
    assert _info(groups, "blocks.0.fc1.bias").options == {"weight_decay": 0.0, "block": "elementwise"}
    opt = gm.GaLoreMini(groups, lr=1e-2)
    _random_grads(model)
    opt.step()
    assert opt.state[model.blocks[0].attn.in_proj_weight]["exp_avg_sq"].shape == (HEADS + HEADS + D,)


def test_torch_transformer_encoder_and_blocks_held_as_attributes():
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=INTER, batch_first=True)
    stack = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    encoder = nn.Sequential(nn.Embedding(VOCAB, D), stack, nn.Linear(D, VOCAB))
    groups = gm.param_groups(encoder, "galore", rank=4)
    per_layer = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]
    assert _projected(groups) == sorted(f"1.layers.{i}.{n}" for i in range(2) for n in per_layer)

    class TwoBlocks(nn.Module):  # blocks as attributes, not in a list: identical siblings
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, D)
            self.block1, self.block2 = FcBlock(), FcBlock()
            self.out = nn.Linear(D, VOCAB)

    groups = gm.param_groups(TwoBlocks(), "galore", rank=4)
    assert _projected(groups) == sorted(f"block{i}.{n}" for i in (1, 2) for n in
                                        ["attn.in_proj_weight", "attn.out_proj.weight", "fc1.weight", "fc2.weight"])


def test_gpt2_projects_every_conv1d_of_the_blocks_and_not_the_tied_head():
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=HEADS, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = gm.param_groups(model, "galore", rank=4)
    per_layer = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert _projected(groups) == sorted(f"transformer.h.{i}.{n}" for i in range(2) for n in per_layer)
    with pytest.raises(gm.UsageError, match="tied to the input embedding"):
        gm.param_groups(model, "galore", rank=4, target_modules=["lm_head"])


def test_tied_embeddings_are_never_projected():
    same = gm.param_groups(TinyLM(tie=True), "galore", rank=4)
    assert [i.role for i in same.infos if i.name in ("embed.weight", "head.weight")] == ["embedding"]
    model = TinyLM()
    model.head.weight = nn.Parameter(model.embed.weight.data)  # another Parameter over the same storage
    groups = gm.param_groups(model, "galore", rank=4)
    head = _info(groups, "head.weight")
    assert (head.role, "rank" in head.options, head.note) == ("output", False, "tied to the input embedding")
    with pytest.raises(gm.UsageError, match=r"selects head.weight, which is tied"):
        gm.param_groups(model, "galore", rank=4, target_modules=r"head|blocks\..*")
    llama = tiny_llama()
    llama.config.tie_word_embeddings = True
    llama.tie_weights()
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    groups = gm.param_groups(llama, "galore", rank=4)
    assert all(not i.name.startswith(("lm_head", "model.embed")) for i in groups.projected())
    assert len(groups.projected()) == 14


def test_llama_projects_the_seven_matrices_of_each_layer_and_logs_one_line(caplog):
    model = tiny_llama(hidden=32, heads=4, kv_heads=2, intermediate=64)
    with caplog.at_level(logging.INFO, logger="galore_mini"):
        gm.create_optimizer(model, "galore_mini", rank=8)
    expected = sorted(f"model.layers.{i}.{part}.{n}.weight" for i in range(2)
                      for part, names in (("self_attn", FLAT[:4]), ("mlp", FLAT[4:])) for n in names)
    assert _projected(gm.param_groups(model, "galore_mini", rank=8)) == expected
    projected = sum(p.numel() for n, p in model.named_parameters() if f"{n}" in expected)
    total = sum(p.numel() for p in model.parameters())
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [f"galore_mini: GaLore-mini projects 14 weights, {projected:,} of {total:,} parameters "
                     f"({projected / total:.1%}) at rank 8; target all-linear: model.layers (2 × LlamaDecoderLayer)"]


@pytest.mark.parametrize("spec, expected", [
    ("all-linear", None),
    ("all_linear", None),
    (["q_proj", "v_proj"], ("self_attn.q_proj", "self_attn.v_proj")),
    (["model.layers.1.mlp.down_proj"], None),
    (r".*\.(q|v)_proj", ("self_attn.q_proj", "self_attn.v_proj")),
    ([r"model\.layers\.\d+\.mlp\.up_proj"], ("mlp.up_proj",)),
    (["lm_head"], None),
])
def test_target_spec(spec, expected):
    model = tiny_llama()
    groups = gm.param_groups(model, "galore", rank=4, target_modules=spec)
    default = _projected(gm.param_groups(model, "galore", rank=4))
    if spec in ("all-linear", "all_linear"):
        assert _projected(groups) == default
    elif spec == ["model.layers.1.mlp.down_proj"]:
        assert _projected(groups) == ["model.layers.1.mlp.down_proj.weight"]
    elif spec == ["lm_head"]:  # named explicitly, the (untied) output layer may be projected
        assert _projected(groups) == ["lm_head.weight"] and _info(groups, "lm_head.weight").role == "output"
    else:
        assert _projected(groups) == sorted(f"model.layers.{i}.{n}.weight" for i in range(2) for n in expected)


@pytest.mark.parametrize("spec, message", [
    ("q_proj", r"'q_proj' matches no nn.Linear"),  # a string is a whole-name regex, as in Hugging Face
    (["q_proj", "nope"], r"'nope' matches no nn.Linear"),
    (["norm"], r"'norm' matches no nn.Linear .*it matches \d+ other module\(s\), "
               r"e.g. 'model.layers.0.input_layernorm'"),
    (["q_prj"], r"did you mean 'q_proj'"),
    ("(", "not a valid regular expression"),
    (5, "use 'all-linear', a list"),
    ([], "use 'all-linear', a list"),
])
def test_target_spec_that_matches_nothing_is_an_error(spec, message):
    with pytest.raises(gm.UsageError, match=message):
        gm.param_groups(tiny_llama(), "galore", rank=4, target_modules=spec)


def test_projecting_nothing_is_an_error_for_every_projected_method():
    net = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 10))
    for method in gm.METHODS:
        if gm.methods.get(method).projected:
            with pytest.raises(gm.UsageError, match="would project nothing: the model has no repeated blocks"):
                gm.create_optimizer(net, method, rank=4)
        else:  # methods that do not project have nothing to miss
            gm.create_optimizer(net, method)
    with pytest.raises(gm.UsageError, match="project=False on every selected weight"):
        gm.param_groups(tiny_llama(), "galore", rank=4, overrides={r"layers": {"project": False}})
    groups = gm.param_groups(net, "galore", rank=4, target_modules=["0"])
    assert _projected(groups) == ["0.weight"]


def test_options_that_cannot_apply_and_unknown_methods_are_errors():
    model = tiny_llama()
    with pytest.raises(gm.UsageError, match=r"target_modules only apply to methods that project .*'adam_mini'"):
        gm.param_groups(model, "adam_mini", target_modules=["q_proj"])
    with pytest.raises(gm.UsageError, match=r"rank, update_proj_gap only apply"):
        gm.param_groups(model, "full", rank=8, update_proj_gap=10)
    with pytest.raises(gm.UsageError, match=r"method='galore_mni' is unknown \(did you mean 'galore_mini'\?\)"):
        gm.create_optimizer(model, "galore_mni")
    with pytest.raises(gm.UsageError, match="'lora' is an adapter method"):
        gm.param_groups(model, "lora")
    with pytest.raises(gm.UsageError, match=r"'update_proj_gapp' \(did you mean 'update_proj_gap'\?\)"):
        gm.create_optimizer(model, "galore", rank=8, update_proj_gapp=10)
    with pytest.raises(gm.UsageError, match=r"rule 'lm_head' sets project, but method='adam_mini' does not project"):
        gm.param_groups(model, "adam_mini", overrides={"lm_head": {"project": True}})
    with pytest.raises(gm.UsageError, match=r"rule 'lm_head' gives rank=2 but matches no projected weight"):
        gm.param_groups(model, "galore", overrides={"lm_head": {"rank": 2}})
    groups = gm.param_groups(model, "galore", overrides={"lm_head": {"rank": 2, "project": True}})
    assert _info(groups, "lm_head.weight").options["rank"] == 2


def test_create_optimizer_reads_the_registry():
    model = tiny_llama()
    for method in gm.METHODS:
        entry = gm.methods.get(method)
        opt = gm.create_optimizer(model, method, rank=8)
        assert type(opt).__name__ == entry.optimizer
        group = opt.param_groups[0]
        assert group["lr"] == entry.default_lr
        if entry.eps is not None:
            assert group["eps"] == entry.eps
        for key, value in entry.options.items():
            assert all(g[key] == value for g in opt.param_groups)
        assert any("rank" in g for g in opt.param_groups) == entry.projected
        assert any("block" in g for g in opt.param_groups) == entry.blocked


def test_hybrid_layer_list_and_nested_blocks():
    class Experts(nn.Module):  # blocks inside blocks belong to the outer block
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(D)
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, INTER), nn.GELU(), nn.Linear(INTER, D))
                                         for _ in range(2))

    model = TinyLM(layers=0)
    model.blocks = nn.ModuleList([FlatBlock(), Experts(), FcBlock()])  # three layer types in one list
    groups = gm.param_groups(model, "galore", rank=4)
    assert groups.reading.blocks == [("blocks", 3, "FlatBlock/Experts/FcBlock")]
    expected = [f"blocks.0.{n}.weight" for n in FLAT] + [f"blocks.1.experts.{e}.{i}.weight" for e in (0, 1)
                                                         for i in (0, 2)]
    expected += [f"blocks.2.{n}" for n in ("attn.in_proj_weight", "attn.out_proj.weight", "fc1.weight", "fc2.weight")]
    assert _projected(groups) == sorted(expected)
