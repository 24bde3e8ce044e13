"""Steering directions (lmlab.lab.interp.steer): the difference of means on a case computed by hand, coefficient 0
changing nothing, ablation removing the component at every stream, steered KV-cached generation against a steered
full recompute, hooks removed after an exception, the direction files round trip, and the CLI end to end."""

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.lab.interp import Residuals
from lmlab.lab.interp.steer import Direction, Steering, cyrillic_share, difference_of_means, neutral_kl
from lmlab.models import GenerationConfig, ModelConfig, Transformer, fast, generate, generate_ids
from lmlab.models.io import load_pretrained, save_pretrained
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
            zero_sampled = generate_ids(model, [IDS], max_new_tokens=12, temperature=0.9, top_k=20, seed=3)
        with Steering(model, d, 1.0):
            one = model(torch.tensor([IDS])).logits
    assert torch.equal(zero, plain)
    assert zero_text == generate_ids(model, [IDS], max_new_tokens=12, do_sample=False)
    assert zero_sampled == generate_ids(model, [IDS], max_new_tokens=12, temperature=0.9, top_k=20, seed=3)
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
    with pytest.raises(ValueError, match=r"^the coefficient \(-1001\) must be between -1000 and 1000$"):
        Steering(model, d, -1001)  # the web app's bound, for the library as for the command line
    Steering(model, d, 1000.0)


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


@pytest.fixture
def model_dir(tmp_path):
    text = "the cat sat on the mat. кот сидел на ковре. " * 20
    tok = Tokenizer.train([text], kind="char", vocab_size=60)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=48, n_kv_head=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    (tmp_path / "ru.txt").write_text("кот сидел\nна ковре\n", encoding="utf-8")
    (tmp_path / "en.txt").write_text("the cat sat\non the mat\n\n", encoding="utf-8")
    return save_pretrained(tmp_path / "model", model, tok)


def steer_argv(model_dir, out, *extra):
    d = model_dir.parent
    return ["lab", "interp", "steer", "--model", str(model_dir), "--positive", str(d / "ru.txt"), "--negative",
            str(d / "en.txt"), "--neutral", str(d / "ru.txt"), "--layer", "1", "--coefs", "0,8", "--samples", "2",
            "--max-new-tokens", "6", "--out", str(out), *extra]


def test_cli_builds_measures_and_generates_with_a_direction(model_dir, tmp_path, capsys):
    out = tmp_path / "steer"
    assert main(steer_argv(model_dir, out)) == 0
    res = json.loads((out / "results.json").read_text())
    model, tok = load_pretrained(model_dir)
    want = difference_of_means(model, [tok.encode("кот сидел"), tok.encode("на ковре")],
                               [tok.encode("the cat sat"), tok.encode("on the mat")], 1)
    d = Direction.load(out)
    torch.testing.assert_close(d.vector, want.vector, atol=1e-6, rtol=0)
    assert [r["coefficient"] for r in res["coefficients"]] == ["0", "8", "ablate"]
    assert res["coefficients"][0]["kl_neutral"] == 0.0 and res["coefficients"][1]["kl_neutral"] > 0
    assert res["checks"]["coefficient_0_costs_no_kl"] and res["checks"]["ablation_removes_the_component"]
    assert res["layer"] == 1 and res["norm"] == pytest.approx(want.norm, rel=1e-5)
    assert (out / "steer.png").is_file() and "steering direction" in (out / "report.html").read_text()
    # the samples at coefficient 8 are what generate gives with the same direction, coefficient and seed
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.8, top_k=40, seed=0, stop_at_eos=False)
    with Steering(model, d, 8.0):
        assert generate(model, tok, ["the cat sat", "on the mat"], cfg) == res["samples"]["8"]
    capsys.readouterr()
    gen = ["generate", str(model_dir), "--prompt", "the cat", "--greedy", "--max-new-tokens", "8", "--ignore-eos",
           "--no-stream"]
    assert main([*gen, "--steer", str(out / "direction.safetensors"), "--steer-coef", "8"]) == 0
    with Steering(model, d, 8.0):
        steered = generate(model, tok, "the cat", max_new_tokens=8, do_sample=False, stop_at_eos=False)
    assert capsys.readouterr().out == "the cat" + steered + "\n"
    assert main([*gen, "--steer", str(out), "--steer-ablate"]) == 0
    with Steering(model, d, ablate=True):
        ablated = generate(model, tok, "the cat", max_new_tokens=8, do_sample=False, stop_at_eos=False)
    assert capsys.readouterr().out == "the cat" + ablated + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--steer-coef", "2"], "--steer-coef and --steer-ablate need --steer DIR_OR_FILE"),
    (["--steer", "NOPE"], "NOPE does not exist"),
    (["--steer", "DIR", "--steer-coef", "1", "--steer-ablate"], "not both"),
    (["--steer", "DIR", "--steer-coef", "nan"], "--steer-coef (nan) must be a finite number"),
    # 1e30 x the direction overflowed the stream's norm: NaN probabilities, "internal error" (a CLI fuzz)
    (["--steer", "DIR", "--steer-coef", "1e30"], "--steer-coef (1e+30) must be between -1000 and 1000"),
    (["--steer", "WIDE"], "the direction has width 7, the model's residual stream 64"),
])
def test_generate_bad_steering_is_one_line_exit_2(model_dir, tmp_path, capsys, argv, message):
    Direction(torch.ones(64), 1).save(tmp_path / "DIR")
    Direction(torch.ones(7), 1).save(tmp_path / "WIDE")
    argv = [str(tmp_path / a) if a in ("DIR", "WIDE", "NOPE") else a for a in argv]
    message = message.replace("NOPE", str(tmp_path / "NOPE"))
    assert main(["generate", str(model_dir), "--prompt", "the", "--max-new-tokens", "2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("extra, message", [
    (["--layer", "9"], "layer 9 out of range: the model has residual streams 0..2"),
    (["--coefs", "0,x"], "--coefs '0,x': give numbers separated by commas"),
    (["--positive", "MISSING"], "--positive MISSING: no such file"),
    (["--negative", "EMPTY"], "--negative EMPTY: no line of text"),
    (["--coefs", "0,-1e30"], "--coefs must be between -1000 and 1000"),
])
def test_steer_bad_input_is_one_line_exit_2(model_dir, tmp_path, capsys, extra, message):
    (tmp_path / "EMPTY").write_text("\n  \n")
    extra = [str(tmp_path / a) if a in ("MISSING", "EMPTY") else a for a in extra]
    message = message.replace("MISSING", str(tmp_path / "MISSING")).replace("EMPTY", str(tmp_path / "EMPTY"))
    assert main([*steer_argv(model_dir, tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o" / "direction.safetensors").exists()


def test_a_zero_direction_is_refused_before_anything_is_written(model_dir, tmp_path, capsys):
    """The same texts on both sides: direction.json and .safetensors of a zero vector were written, then ablation
    failed, and the same --out was refused on the next try."""
    out, ru = tmp_path / "o", str(model_dir.parent / "ru.txt")
    argv = steer_argv(model_dir, out)
    same = [ru if a.endswith("en.txt") else a for a in argv]
    assert main(same) == 2
    assert capsys.readouterr().err == ("lmlab: error: the positive and negative sets have the same mean at stream 1: "
                                       "the direction is zero; give sets that differ\n")
    assert not out.exists()
    assert main(argv) == 0 and (out / "direction.safetensors").is_file()
    model, tok = load_pretrained(model_dir)
    with pytest.raises(ValueError, match="the direction is zero"):  # the same texts in another order too
        difference_of_means(model, [tok.encode("кот сидел"), tok.encode("на ковре")],
                            [tok.encode("на ковре"), tok.encode("кот сидел")], 1)


def test_other_views_still_need_a_prompt(model_dir, tmp_path, capsys):
    assert main(["lab", "interp", "lens", "--model", str(model_dir), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "lmlab: error: lens needs --prompt"
