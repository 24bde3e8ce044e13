"""The interpretability lab (lmlab.lab.interp): logit lens against the model's logits, attention from the hooks
against a recomputation from the weights written here, activation patching's fixed points, hooks removed after
an exception, and `lmlab lab interp` end to end."""

import json
import math

import pytest
import torch

from lmlab.cli import main
from lmlab.lab.interp import (
    AttentionRecorder,
    Residuals,
    activation_patching,
    attention_patterns,
    logit_lens,
    restored_fraction,
    run_with_residuals,
    views,
)
from lmlab.lab.interp.report import label
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer

IDS = [5, 9, 11, 30, 2, 7, 8, 40]
CORRUPT = [5, 9, 12, 30, 2, 7, 8, 40]


def tiny(family, **kw):
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=61, block_size=48,
                             n_kv_head=2 if family == "llama" else None, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so predictions differ between prompts
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


@pytest.mark.parametrize("family", ["gpt", "gpt2", "llama"])
def test_last_logit_lens_row_is_the_models_logits(family):
    model = tiny(family)
    lens = logit_lens(model, IDS)
    with torch.no_grad():
        own = model(torch.tensor([IDS])).logits[0]
    assert lens.shape == (model.config.n_layer + 1, len(IDS), 61)
    torch.testing.assert_close(lens[-1], own, atol=1e-6, rtol=0)
    # an earlier stream is a different read-out (the lens would be trivial if every row were the last)
    assert (lens[0] - own).abs().max() > 0.1


def reference_attention(model, ids):
    """Written from the weights, not through the model's modules: x -> norm -> q, k (RoPE, GQA) -> causal
    softmax, block by block, with the residual updated by the model's blocks between layers."""
    cfg = model.config
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    T = len(ids)
    x = model.tok_emb.weight[torch.tensor(ids)]
    if model.pos_emb is not None:
        x = x + model.pos_emb.weight[:T]
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = torch.outer(pos, inv)                                             # (T, D/2)
    out = []
    for block in model.blocks:
        h = block.norm1(x) if cfg.prenorm else x
        W, b = block.attn.qkv.weight, block.attn.qkv.bias
        qkv = h @ W.T + (b if b is not None else 0)
        q = qkv[:, :H * D].view(T, H, D)
        k = qkv[:, H * D:H * D + K * D].view(T, K, D)
        if cfg.pos_encoding == "rope":  # rotate pairs (i, i + D/2) by angle pos * inv_freq[i]
            def rot(t):
                a, c = t[..., :D // 2], t[..., D // 2:]
                cos, sin = ang.cos()[:, None], ang.sin()[:, None]
                return torch.cat([a * cos - c * sin, c * cos + a * sin], -1)
            q, k = rot(q), rot(k)
        probs = torch.empty(H, T, T)
        for head in range(H):
            kv = head // (H // K)
            s = q[:, head] @ k[:, kv].T / math.sqrt(D)
            s = s + torch.triu(torch.full((T, T), float("-inf")), 1)
            probs[head] = torch.exp(s - s.max(-1, keepdim=True).values)
            probs[head] /= probs[head].sum(-1, keepdim=True)
        out.append(probs)
        x = block(x[None], *_block_args(model, T))[0]
    return torch.stack(out)


def _block_args(model, T):
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if model.config.pos_encoding == "rope" else None
    return rope, None, None, 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_from_the_hook_equals_a_recomputation_from_the_weights(family):
    model = tiny(family, n_head=4)
    if family == "llama":
        assert model.config.n_kv_head == 2  # GQA: two query heads share each key head
    with torch.no_grad():
        got = attention_patterns(model, IDS)
        want = reference_attention(model, IDS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_attention_follows_the_mask_the_model_builds():
    """With a padding mask the model attends under its own mask (not plain causal): the recorder follows it."""
    model = tiny("llama")
    ids = torch.tensor([[0, 0] + IDS[:6]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(ids, attention_mask=am, position_ids=Transformer.positions_from_mask(am))
    first = rec.probs[0][0]                                                  # (H, T, T)
    assert float(first[:, 2:, :2].abs().max()) == 0.0                        # real tokens never see the padding
    with torch.no_grad():
        plain = attention_patterns(model, IDS[:6])[0]
    torch.testing.assert_close(first[:, 2:, 2:], plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_patching_everything_restores_all_and_nothing_restores_none(family):
    model = tiny(family)
    target = int(run_with_residuals(model, IDS)[0][0, -1].argmax())
    res = activation_patching(model, IDS, CORRUPT, target)
    assert res["d_clean"] != pytest.approx(res["d_corrupt"], abs=0.1)        # the corruption matters
    T = len(IDS)
    every = torch.ones(1, T, dtype=torch.bool)
    assert restored_fraction(model, IDS, CORRUPT, target, res["foil"], {0: every}) == 1.0
    clean, source = run_with_residuals(model, IDS)
    patched, _ = run_with_residuals(model, CORRUPT, {0: every}, source)  # the corrupt run, every stream clean
    assert torch.equal(patched, clean)                                      # every logit, not only the difference
    assert restored_fraction(model, IDS, CORRUPT, target, res["foil"], {0: ~every}) == 0.0
    restored = res["restored"]
    assert restored.shape == (model.config.n_layer + 1, T)
    # At the embeddings only the changed position carries the corruption; at the last stream only the last
    # position feeds the prediction: both restore all of it (batched rows: float rounding only).
    torch.testing.assert_close(restored[0], torch.eye(T)[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(restored[-1], torch.eye(T)[-1], atol=1e-5, rtol=0)


def test_patching_a_prompt_onto_itself_changes_nothing():
    model = tiny("llama")
    clean, source = run_with_residuals(model, IDS)
    patched, _ = run_with_residuals(model, IDS, {1: torch.tensor([[True] * 4 + [False] * 4])}, source)
    assert torch.equal(clean, patched)


def test_hooks_are_removed_after_an_exception():
    model = tiny("gpt2")

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    for manager in (Residuals(model), AttentionRecorder(model)):
        with pytest.raises(RuntimeError, match="boom"):
            with manager:
                assert hooks() > 0
                model(torch.tensor([IDS]))
                raise RuntimeError("boom")
        assert hooks() == 0
    with pytest.raises(ValueError, match="out of range"):  # refused before any hook is registered
        with Residuals(model, {9: torch.ones(1, 8, dtype=torch.bool)}, []):
            pass
    assert hooks() == 0


@pytest.fixture
def model_dir(tmp_path):
    text = "the cat sat on the mat. the dog sat on the log. " * 20
    tok = Tokenizer.train([text], kind="char", vocab_size=40)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=48, n_kv_head=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    return save_pretrained(tmp_path / "model", model, tok)


def test_cli_writes_reports(model_dir, tmp_path, capsys):
    out = tmp_path / "patch"
    assert main(["lab", "interp", "patch", "--model", str(model_dir), "--prompt", "the cat sat",
                 "--corrupt", "the dog sat", "--target", " ", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["checks"] == {"everything_restores_100%": True, "nothing_restores_0%": True}
    assert res["restored_all_positions_stream0"] == pytest.approx(1.0, abs=1e-6)
    assert len(res["restored"]) == 3 and len(res["restored"][0]) == 11
    assert (out / "patch.png").is_file() and "activation patching" in (out / "report.html").read_text()
    for view, png in (("lens", "lens.png"), ("attention", "attention.png")):
        out = tmp_path / view
        assert main(["lab", "interp", view, "--model", str(model_dir), "--prompt", "the cat", "--out", str(out)]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["verdict"] == "holds" and (out / png).is_file()
    assert len(res["attention"]) == 2 and len(res["attention"][0][0]) == 7
    tok = Tokenizer.load(model_dir / "tokenizer.json")
    assert main(["lab", "interp", "lens", "--model", str(model_dir), "--prompt", "the cat", "--bos",
                 "--out", str(tmp_path / "bos")]) == 0
    tokens = json.loads((tmp_path / "bos" / "results.json").read_text())["tokens"]
    assert tokens == [label(tok, i) for i in [tok.bos_id, *tok.encode("the cat")]]


@pytest.mark.parametrize("argv, message", [
    (["patch", "--prompt", "the cat sat"], "--corrupt is needed by patch"),
    (["patch", "--prompt", "the cat sat", "--corrupt", "the dog"], "same number of tokens (11 vs 7)"),
    (["lens", "--prompt", "the cat", "--foil", "x"], "--foil is for patch only"),
    (["lens", "--prompt", "", ], "--prompt is empty"),
    (["lens", "--prompt", "the cat", "--top-k", "0"], "--top-k (0) must be >= 1"),
    (["lens", "--prompt", "the cat", "--target", "Ж"], "--target 'Ж' starts with a character the tokenizer does not "
                                                      "know (it reads as <UNK>)"),
])
def test_cli_bad_input_is_one_line_exit_2(model_dir, tmp_path, capsys, argv, message):
    assert main(["lab", "interp", argv[0], "--model", str(model_dir), *argv[1:], "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("argv, message", [
    (["attention", "--prompt", "the", "--layer", "7", "--top-k", "3", "--kind", "bogus", "--steps", "5"],
     "lab interp attention does not read --top-k, --layer, --kind, --steps; drop them"),
    (["lens", "--prompt", "the", "--samples", "3", "--seed", "0"], "lab interp lens does not read --samples, --seed; "
                                                                    "drop them"),
    (["patch", "--prompt", "the", "--corrupt", "tha", "--quick"], "lab interp patch does not read --quick; drop it"),
    (["steer", "--positive", "P", "--negative", "P", "--neutral", "P", "--layer", "1", "--prompt", "the cat"],
     "lab interp steer does not read --prompt; drop it"),
    (["sae", "--books", "P", "--bos", "--target", "x"], "lab interp sae --kind topk does not read --target, --bos; "
                                                        "drop them"),
    (["sae", "--books", "P", "--kind", "l1", "--k", "4"], "lab interp sae --kind l1 does not read --k; drop it"),
    (["sae", "--books", "P", "--l1", "0.5"], "lab interp sae --kind topk does not read --l1; drop it"),
])
def test_a_flag_the_view_does_not_read_is_refused(model_dir, tmp_path, capsys, argv, message):
    """Each was ignored without a word: an attention report of a 2-layer model "at --layer 7"."""
    (tmp_path / "P").write_text("the cat sat\n")
    argv = [str(tmp_path / "P") if a == "P" else a for a in argv]
    assert main(["lab", "interp", argv[0], "--model", str(model_dir), *argv[1:], "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"lmlab: error: {message} (a setting that would be ignored is refused)\n"
    assert not (tmp_path / "o").exists()


def test_a_folder_with_results_is_not_overwritten(model_dir, tmp_path, capsys):
    out = tmp_path / "lens"
    assert main(["lab", "interp", "lens", "--model", str(model_dir), "--prompt", "the cat", "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    assert main(["lab", "interp", "lens", "--model", str(model_dir), "--prompt", "the dog", "--out", str(out)]) == 2
    assert f"{out} exists and is not an empty folder; choose another --out" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_a_folder_of_the_users_files_is_not_overwritten(model_dir, tmp_path, capsys):
    """Without results.json in it, a folder's report.html and lens.png were replaced by the report's."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("my precious notes")
    (out / "lens.png").write_bytes(b"my plot")
    assert main(["lab", "interp", "lens", "--model", str(model_dir), "--prompt", "the cat", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"lmlab: error: {out} exists and is not an empty folder; choose another --out "
                                       "(nothing is overwritten)\n")
    assert (out / "report.html").read_text() == "my precious notes" and (out / "lens.png").read_bytes() == b"my plot"
    assert sorted(p.name for p in out.iterdir()) == ["lens.png", "report.html"]


def test_a_token_inside_a_character_is_labelled_by_its_bytes():
    """Byte-level BPE tokens that end inside a UTF-8 character all decoded to "\ufffd": in a heatmap's ticks and
    results.json the two halves of "М" (D0 9C) read alike."""
    import re
    tok = Tokenizer.train(["Марья пошла к морю, а медведь за ней. " * 20], kind="bpe", vocab_size=300)
    # the single-byte tokens, by GPT-2's alphabet: 0xD0 is written "Ð" (kept as itself), 0x9C "ľ" (256 + 62: the
    # 63rd byte moved out of the unprintable ranges 0x00-0x20, 0x7F-0xA0, 0xAD)
    assert label(tok, tok.token_to_id("Ð")) == "<0xD0>" and label(tok, tok.token_to_id("ľ")) == "<0x9C>"
    for text in ("Марья пошла", "медведь"):
        ids = tok.encode(text)
        labels = [label(tok, i) for i in ids]
        assert "\ufffd" not in "".join(labels) and any("<0x" in x for x in labels)  # some token splits a letter
        assert len(set(labels)) == len(set(ids))
        parts = [p for x in labels for p in re.split(r"(<0x[0-9A-F]{2}>)", x)]  # text, <0xNN>, text, ...
        back = b"".join(bytes([int(p[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", p) else p.encode() for p in parts)
        assert back == text.encode()                                                  # labels are the bytes
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=32))
    ids = tok.encode("Марья")
    assert views.lens_view(model, tok, ids)["tokens"] == [label(tok, i) for i in ids]


def test_top_k_past_the_vocabulary_keeps_every_token():
    model = tiny("gpt2")
    view = views.lens_view(model, Tokenizer.train(["abc"], kind="char", vocab_size=61), IDS, k=1000)
    assert [len(pos) for pos in view["top"][0]] == [61] * len(IDS)
    assert sorted(x["id"] for x in view["top"][-1][-1]) == list(range(61))


def test_patched_runs_compute_the_last_position_only():
    """Each stream's T patched rows need logit(target) - logit(foil) at the last position only: logits for
    every position would hold T x T x vocab numbers (gigabytes for a long prompt on a large vocabulary)."""
    model = tiny("llama")
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        res = activation_patching(model, IDS, CORRUPT, 3)
    finally:
        handle.remove()
    T = len(IDS)
    assert shapes[:2] == [(1, 1, 61), (1, 1, 61)]                             # the clean and corrupted runs
    assert shapes[2:] == [(T, 1, 61)] * (model.config.n_layer + 1)            # one batch of T rows per stream
    torch.testing.assert_close(res["restored"][0], torch.eye(T)[2], atol=1e-5, rtol=0)
