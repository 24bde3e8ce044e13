"""fast.py against model.py: each CPU fast path computes what the plain path computes, for every ModelConfig
field. A field added to ModelConfig fails here until it has values to try below and fast.py implements it."""

import copy
import dataclasses

import pytest
import torch

from lmlab.models import KVCache, ModelConfig, Transformer, fast
from lmlab.models.model import LMHead, RMSNorm

BASES = {
    "gpt2": dict(family="gpt2", vocab_size=61, n_layer=2, n_head=4, n_embd=32, block_size=24),
    "llama": dict(family="llama", vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=24),
}
# Values to try for every field of ModelConfig, one field changed at a time from each base.
VALUES = {
    "family": ["gpt", "gpt2", "llama"], "vocab_size": [97], "n_layer": [1, 3], "n_head": [2, 8],
    "n_embd": [48], "block_size": [16], "n_kv_head": [1, 2], "intermediate_size": [40], "dropout": [0.2],
    "norm": ["layernorm", "rmsnorm"], "pos_encoding": ["learned", "rope"], "mlp": ["gelu", "swiglu"],
    "prenorm": [True, False], "final_norm": [True, False], "tie_embeddings": [True, False],
    "bias": [True, False], "norm_eps": [1e-3], "rope_theta": [500.0], "init_std": [0.05],
    "pad_token_id": [None, 5],
}
CASES = [pytest.param(base, name, value, id=f"{base}-{name}={value}")
         for base in BASES for name, values in VALUES.items() for value in values]
FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def test_every_config_field_is_tried_and_named_by_the_fast_paths():
    assert set(VALUES) == FIELDS, f"give values to try for {sorted(FIELDS - set(VALUES))}"
    assert fast.ANY_VALUE | fast.SWITCHES.keys() == FIELDS, \
        f"fast.py does not say how it handles {sorted(FIELDS - fast.ANY_VALUE - fast.SWITCHES.keys())}"


def build(base: str, name: str, value) -> Transformer:
    cfg = ModelConfig(**{**BASES[base], name: value})
    assert fast.supports(cfg), f"the fast paths do not implement {name}={value!r}"
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # larger weights than the init, so logits are far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.5 if p.dim() < 2 else 0.0)).mul_(4 if p.dim() == 2 else 1)
    return model


@pytest.mark.parametrize("base,name,value", CASES)
def test_decoder_equals_the_modules(base, name, value):
    """One-token steps through fast.Decoder against Transformer.forward on its own cache: plain rows, and
    left-padded rows with an attention mask and positions from it (batched generation)."""
    model = build(base, name, value).eval()
    T = model.config.block_size
    step = fast.decoder(model, keep=False)
    assert step is not None
    idx = torch.randint(4, model.config.vocab_size, (3, T))
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[1, :3] = False                                                  # row 1: three pads on the left
    prefill = T // 2
    mask[2, [0, prefill + 1]] = False                                   # and a new token that is padding
    with torch.inference_mode():
        for padded in (False, True):
            ours, plain = KVCache(model.config, 3), KVCache(model.config, 3)
            kw = (lambda S: dict(attention_mask=mask[:, :S],
                                 position_ids=Transformer.positions_from_mask(mask[:, :S])[:, -1:])) if padded \
                else (lambda S: {})
            first = dict(attention_mask=mask[:, :prefill],
                         position_ids=Transformer.positions_from_mask(mask[:, :prefill])) if padded else {}
            model(idx[:, :prefill], cache=ours, **first)
            model(idx[:, :prefill], cache=plain, **first)
            for t in range(prefill, T):
                a = step(idx[:, t:t + 1], ours, **kw(t + 1))
                b = model(idx[:, t:t + 1], cache=plain, **kw(t + 1)).logits[:, -1]
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert ours.length == plain.length == T


@pytest.mark.parametrize("base,name,value", CASES)
def test_fused_training_equals_the_modules(base, name, value):
    """fast.for_training's modules against the plain ones: the same loss and every gradient, with ignored
    targets and padding, dropout on where the config has it (the same random masks: the same seed)."""
    plain = build(base, name, value).train()
    fused = fast.for_training(copy.deepcopy(plain))
    assert any(type(m) is fast.FusedLMHead for m in fused.modules())
    assert not any(type(m) in (LMHead, RMSNorm) for m in fused.modules())
    V = plain.config.vocab_size
    idx = torch.randint(0, V, (3, 12))
    targets = torch.randint(0, V, (3, 12))
    targets[0, :4] = -100
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[2, :5] = 0
    out = {}
    for label, model in (("plain", plain), ("fused", fused)):
        torch.manual_seed(7)
        loss = model(idx, targets, attention_mask=mask).loss
        loss.backward()
        out[label] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(out["fused"][0], out["plain"][0], atol=1e-5, rtol=1e-5)
    for n, g in out["plain"][1].items():
        torch.testing.assert_close(out["fused"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)
    assert plain.state_dict().keys() == fused.state_dict().keys()


def test_unknown_switch_values_take_the_plain_path():
    model = build("llama", "norm", "rmsnorm")
    model.config.norm = "scalenorm"  # a value model.py might learn before fast.py does
    assert not fast.supports(model.config)
    assert fast.decoder(model) is None
    fast.for_training(model)
    assert type(model.lm_head) is LMHead and type(model.blocks[0].norm1) is RMSNorm


def test_the_decoder_is_kept_for_an_eval_model_and_rebuilt_when_a_weight_changes():
    model = build("gpt2", "bias", True).eval()
    first = fast.decoder(model)
    assert fast.decoder(model) is first                                  # kept between generations
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.mul_(2)                            # an in-place write: a new version
    second = fast.decoder(model)
    assert second is not first
    torch.testing.assert_close(second.layers[0].fc[0], model.blocks[0].mlp.fc.weight.t())
    assert fast.decoder(model, keep=False) is second and fast.decoder(model, keep=False) is not second


def test_a_kept_decoder_is_rebuilt_after_a_fused_optimizer_step():
    """The fused AdamW kernel writes the weights without moving their version counters: a decoder kept from
    before the step generated from the old weights (a model that trains and generates in turn)."""
    model = build("gpt2", "bias", True)
    optimizer = model.configure_optimizer(lr=0.1)                       # fused=True, as the Trainer's
    ids = torch.tensor([[1, 2, 3]])
    model.eval()
    before = fast.decoder(model)
    model.train()
    model(ids, ids).loss.backward()
    optimizer.step()
    model.eval()
    after = fast.decoder(model)
    assert after is not before
    torch.testing.assert_close(after.layers[0].fc[0], model.blocks[0].mlp.fc.weight.t())
