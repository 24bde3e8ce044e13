"""ModelConfig validation, presets, seed keys and JSON round-trip."""

import json

import pytest

from lmlab.models import FAMILIES, SIZES, ModelConfig, Transformer


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=100, n_head=3), "n_embd"),
    (dict(n_head=6, n_kv_head=4), "n_head"),
    (dict(family="bert"), "family"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(dropout=1.5), "dropout"),
    (dict(norm="batchnorm"), "norm"),
    (dict(block_size=2.5), "block_size"),
    (dict(family="llama", n_embd=36, n_head=4), "head_dim"),
    (dict(pad_token_id=10**6), "pad_token_id"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_family_defaults_and_explicit_overrides():
    llama = ModelConfig(family="llama", n_embd=96, n_head=4)
    assert (llama.norm, llama.pos_encoding, llama.mlp, llama.bias, llama.tie_embeddings) == (
        "rmsnorm", "rope", "swiglu", False, False)
    assert llama.intermediate_size == 256  # 8/3 * 96 = 256
    gpt = ModelConfig(family="gpt")
    assert (gpt.prenorm, gpt.final_norm, gpt.intermediate_size) == (False, False, 4 * gpt.n_embd)
    assert ModelConfig(family="gpt2", tie_embeddings=False).tie_embeddings is False


def test_a_family_beside_a_preset_of_another_family_is_refused():
    with pytest.raises(ValueError, match="^preset 'llama-tiny' is the llama family, but family 'gpt' was given too"):
        ModelConfig.preset("llama-tiny", family="gpt")
    assert ModelConfig.preset("llama-tiny", family="llama") == ModelConfig.preset("llama-tiny")
    assert ModelConfig.preset("tiny", family="gpt").family == "gpt"


def test_json_round_trip(tmp_path):
    cfg = ModelConfig.preset("llama-small", n_kv_head=2, dropout=0.1)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json("{nope")


def test_seed_keys_translate():
    arch_research = {"vocab_size": 50257, "embed_dim": 256, "num_heads": 4, "num_layers": 4,
               "max_position_embeddings": 128, "dropout": 0.1}
    cfg = ModelConfig.from_dict(arch_research)  # llm-arch-research's GPT/GPT2 dicts
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.block_size, cfg.dropout) == (256, 4, 4, 128, 0.1)
    azr_app = {"vocab_size": 8000, "d_model": 256, "num_layers": 6, "num_heads": 8, "d_ff": 1024,
               "max_seq_len": 256, "family": "gpt"}
    cfg = ModelConfig.from_dict(azr_app)  # the AZR Model Trainer app's CustomTransformerLM
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.intermediate_size, cfg.block_size) == (256, 6, 8, 1024, 256)
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({"colour": 3})


def test_presets_sizes():
    assert Transformer(ModelConfig.preset("gpt2-tiny")).num_parameters() < 1_000_000
    assert ModelConfig.preset("gpt2-124m").num_parameters() == 124_439_808  # GPT-2 small, tied head
    assert 4e6 < ModelConfig.preset("gpt2-small").num_parameters() < 6e6
    assert 17e6 < ModelConfig.preset("gpt2-medium").num_parameters() < 23e6
    assert 90e6 < ModelConfig.preset("gpt2-large").num_parameters() < 115e6
    assert ModelConfig.preset("small", family="llama").family == "llama"
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("gpt2-huge")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_analytic_parameter_count_matches_the_model(family, size):
    cfg = ModelConfig.preset(f"{family}-{size}", n_kv_head=2 if family == "llama" else None)
    model = Transformer(cfg)
    assert cfg.num_parameters() == model.num_parameters()
    assert cfg.flops_per_token() == model.flops_per_token()


def test_every_preset_is_its_family_at_its_size_and_round_trips():
    for family in FAMILIES:
        for size, shape in SIZES.items():
            cfg = ModelConfig.preset(f"{family}-{size}")
            assert cfg.family == family and {k: getattr(cfg, k) for k in shape} == shape
            assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
