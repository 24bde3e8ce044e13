"""Steering directions (lmlab.lab.interp.steer): the difference of means on a case computed by hand, coefficient 0
changing nothing, ablation removing the component at every stream, steered KV-cached generation against a steered
full recompute, hooks removed after an exception, the direction files round trip, and the CLI end to end."""

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.lab.interp import Residuals
from lmlab.lab.interp.steer import Direction, Steering, cyrillic_share, difference_of_means, neutral_kl
from lmlab.models import ModelConfig, Transformer, fast, generate_ids
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer

IDS = [5, 9, 11, 30, 2, 7, 8, 40]


def tiny(family):
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=61, block_size=48,
                             n_kv_head=2 if family == "llama" else None)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so a steered model's greedy text differs
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def random_direction(model, layer, scale=3.0):
    torch.manual_seed(1)
    with Residuals(model) as res, torch.no_grad():
        model(torch.tensor([IDS]))
    size = float(res.streams[layer].norm(dim=-1).mean())                     # the stream's typical norm
    v = torch.randn(model.config.n_embd)
    return Direction(v / v.norm() * size * scale, layer)


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_direction_is_the_difference_of_means_by_hand():
    model = tiny("llama")  # RoPE: stream 0 is the token embeddings themselves
    E = model.tok_emb.weight.detach()
    d = difference_of_means(model, [[5, 9], [11]], [[30], [2, 30]], layer=0)
    torch.testing.assert_close(d.vector, (E[5] + E[9] + E[11]) / 3 - (2 * E[30] + E[2]) / 3, atol=1e-6, rtol=0)
    assert d.layer == 0 and d.norm == pytest.approx(float(d.vector.norm()))
    assert (d.meta["positive_tokens"], d.meta["negative_tokens"]) == (3, 3)
    with pytest.raises(ValueError, match=r"layer 3 out of range: the model has residual streams 0..2"):
        difference_of_means(model, [[5]], [[6]], layer=3)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_coefficient_zero_changes_nothing(family):
    model = tiny(family)
    d = random_direction(model, 1)
    with torch.no_grad():
        plain = model(torch.tensor([IDS])).logits
        with Steering(model, d, 0.0):
            assert hooks(model) == 1
            zero = model(torch.tensor([IDS])).logits
            zero_text = generate_ids(model, [IDS], max_new_tokens=12, do_sample=False)
        with Steering(model, d, 1.0):
            one = model(torch.tensor([IDS])).logits
    assert torch.equal(zero, plain)
    assert zero_text == generate_ids(model, [IDS], max_new_tokens=12, do_sample=False)
    assert (one - plain).abs().max() > 0.1  # the same hook with a coefficient does act


@pytest.mark.parametrize("family", ["gpt", "gpt2", "llama"])
def test_ablation_removes_the_component_at_every_stream(family):
    model = tiny(family)
    d = random_direction(model, 1)
    u = d.vector / d.vector.norm()
    with torch.no_grad(), Steering(model, d, ablate=True), Residuals(model) as res:
        model(torch.tensor([IDS]))
    with torch.no_grad(), Residuals(model) as plain:
        model(torch.tensor([IDS]))
    for s in range(model.config.n_layer + 1):
        along = res.streams[s][0] @ u                                         # (T,) at every position
        scale = float(res.streams[s].abs().max())
        assert float(along.abs().max()) <= 1e-6 * scale * model.config.n_embd, s
        assert float((plain.streams[s][0] @ u).abs().max()) > 1e-2 * scale  # there was a component to remove


def greedy_recompute(model, prompt, n):
    out = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(prompt):]


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_steered_cached_generation_equals_steered_recompute(family, mode):
    model = tiny(family)
    d = random_direction(model, 1, scale=2.0)
    kw = {"ablate": True} if mode == "ablate" else {"coef": 1.0}
    plain = generate_ids(model, [IDS], max_new_tokens=20, do_sample=False, stop_at_eos=False)[0]
    with Steering(model, d, **kw):
        cached = generate_ids(model, [IDS], max_new_tokens=20, do_sample=False, stop_at_eos=False)[0]
        full = greedy_recompute(model, IDS, 20)
    assert cached == full
    assert cached != plain  # the steering changes the text, so the equality above compares steered texts
    assert fast.decoder(model) is not None  # the fast one-token path is back once the hooks are gone


def test_hooks_are_removed_after_an_exception():
    model = tiny("gpt")
    d = random_direction(model, 2)
    with torch.no_grad():
        plain = model(torch.tensor([IDS])).logits
    for kw in ({"coef": 2.0}, {"ablate": True}):
        with pytest.raises(RuntimeError, match="boom"), Steering(model, d, **kw):
            assert hooks(model) > 0
            raise RuntimeError("boom")
        assert hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([IDS])).logits, plain)


def test_direction_files_round_trip_and_bad_files(tmp_path):
    model = tiny("llama")
    d = difference_of_means(model, [[5, 9]], [[30]], layer=1, meta={"positive": "ru.txt"})
    d.save(tmp_path / "dir")
    for path in (tmp_path / "dir", tmp_path / "dir" / "direction.safetensors"):
        back = Direction.load(path)
        assert torch.equal(back.vector, d.vector) and back.layer == 1 and back.meta == d.meta
    info = json.loads((tmp_path / "dir" / "direction.json").read_text())
    assert info["n_embd"] == 64 and info["norm"] == pytest.approx(d.norm) and info["positive"] == "ru.txt"
    with pytest.raises(ValueError, match="is not a steering direction: it needs direction.safetensors"):
        Direction.load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        Direction.load(tmp_path / "nope")
    other = Transformer(ModelConfig.preset("llama-tiny", vocab_size=61, n_embd=32, n_head=4, n_kv_head=2))
    with pytest.raises(ValueError, match="the direction has width 64, the model's residual stream 32"):
        Steering(other, d, 1.0)
    with pytest.raises(ValueError, match="not both"):
        Steering(model, d, 1.0, ablate=True)


def test_cyrillic_share_and_kl():
    assert cyrillic_share("Жили-были a b") == pytest.approx(8 / 10)
    assert cyrillic_share("123 !") is None
    model = tiny("llama")
    d = random_direction(model, 1)
    assert neutral_kl(model, [IDS], d, 0.0) == 0.0
    # KL(P || Q) by hand over the positions of one text
    with torch.no_grad():
        p = model(torch.tensor([IDS])).logits[0].log_softmax(-1)
        with Steering(model, d, 0.5):
            q = model(torch.tensor([IDS])).logits[0].log_softmax(-1)
    want = float((p.exp() * (p - q)).sum(-1).mean())
    assert neutral_kl(model, [IDS], d, 0.5) == pytest.approx(want, rel=1e-5)
