"""Our Transformer against transformers' own classes on the same (random) weights, fp32."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmlab.interop.hf_mapping import (  # noqa: E402
    from_hf_state_dict,
    hf_config_dict,
    model_config_from_hf,
    to_hf_state_dict,
)
from lmlab.models import ModelConfig, Transformer, fast  # noqa: E402

HF = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(vocab_size=101, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   rope_theta=10000.0)),
    "gpt": (transformers.OpenAIGPTConfig, transformers.OpenAIGPTLMHeadModel,
            dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def hf_model(family):
    config_cls, model_cls, kwargs = HF[family]
    torch.manual_seed(1)
    hf = model_cls(config_cls(**kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms; randomise so the mapping is tested
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in name or "norm" in name else 0.0))
    return hf


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt"])
def test_logits_match_transformers(family):
    hf = hf_model(family)
    cfg = model_config_from_hf(hf.config)
    assert cfg.family == family
    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    idx = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt"])
def test_state_dict_round_trip_into_transformers(family):
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=97, n_kv_head=2 if family == "llama" else None)
    ours = Transformer(cfg).eval()
    config_cls, model_cls, _ = HF[family]
    hf = model_cls(config_cls(**hf_config_dict(cfg))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and all("position_ids" in m or "bias" in m and family == "gpt" for m in missing), missing
    idx = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_llama_left_padded_logits_match_transformers():
    hf = hf_model("llama")
    cfg = model_config_from_hf(hf.config)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    idx = torch.randint(4, 101, (2, 12))
    mask = torch.ones_like(idx)
    mask[0, :5] = 0
    pos = Transformer.positions_from_mask(mask)
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask, position_ids=pos).logits
        got = ours(idx, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got[0, 5:], expected[0, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt"])
def test_training_loss_and_gradients_match_transformers(family, fused):
    """The training path, plain and with the Trainer's CPU fast paths (fused head + cross-entropy, RMSNorm's
    written-out gradient), against autograd through transformers' model and F.cross_entropy: the same loss
    and the same gradient for every weight, with ignored targets."""
    hf = hf_model(family)
    cfg = model_config_from_hf(hf.config)
    ours = Transformer(cfg).eval()  # eval: no dropout in either; gradients still flow
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    if fused:
        fast.for_training(ours)
    idx = torch.randint(0, 101, (3, 40))
    targets = torch.randint(0, 101, (3, 40))
    targets[0, :7] = -100
    targets[2, 30:] = -100
    loss = ours(idx, targets).loss
    loss.backward()
    logits = hf(idx).logits
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 101), targets.view(-1), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    ours_grads = to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, cfg)
    for name, p in hf.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_head_loss_survives_underflow_and_honours_logit_gradients():
    """Rows whose target probability underflows fp32 (a logit gap > 104) still get the exact loss, and a
    gradient reaching the returned logits adds to the loss's."""
    from lmlab.models.fast import HeadCrossEntropy

    torch.manual_seed(0)
    x = torch.randn(12, 8)
    x[:3] *= 60.0                                                  # confident and wrong: p(target) -> 0
    w = torch.randn(20, 8)
    targets = torch.randint(0, 20, (12,))
    targets[:3] = (x[:3] @ w.t()).argmin(-1)
    valid = torch.ones(12, dtype=torch.bool)
    valid[5] = False
    assert (torch.softmax(x[:3] @ w.t(), -1).gather(1, targets[:3, None]) == 0).all()
    weights = torch.randn(12, 20)
    for fused in (True, False):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            loss, logits = HeadCrossEntropy.apply(xx, ww, targets, valid)
        else:
            logits = xx @ ww.t()
            loss = torch.nn.functional.cross_entropy(logits, targets.masked_fill(~valid, -100), ignore_index=-100)
        (loss + (logits * weights).sum() * 1e-3).backward()
        if fused:
            got = (loss.detach(), xx.grad, ww.grad)
        else:
            expected = (loss.detach(), xx.grad, ww.grad)
    assert torch.isfinite(got[0]) and got[0] > 100
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
