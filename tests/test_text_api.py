"""Text-level API: model directory save/load, generate/stream with a real tokenizer, the CLI edges."""

import json

import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.models.io import load_pretrained, save_pretrained

TEXT = ("Жили-были дед да баба. The old man and the old woman lived by the sea. 🎉\n"
        "Дед ловил неводом рыбу, а баба пряла свою пряжу. They lived in a small hut.\n") * 20


@pytest.fixture(scope="module")
def tok():
    return lmlab.Tokenizer.train([TEXT], kind="bpe", vocab_size=300)


def fit(tok, block_size=64):
    """A tiny model fitted for a few dozen steps, so generations are not noise."""
    torch.manual_seed(0)
    cfg = lmlab.ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, block_size=block_size)
    model = lmlab.Transformer(cfg)
    ids = torch.tensor(tok.encode(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _step in range(60):
        starts = torch.randint(0, len(ids) - block_size - 1, (8,))
        x = torch.stack([ids[s:s + block_size] for s in starts])
        y = torch.stack([ids[s + 1:s + block_size + 1] for s in starts])
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tok):
    return fit(tok)


def test_save_load_identical_logits_and_tokenizer(tmp_path, trained, tok):
    save_pretrained(tmp_path / "m", trained, tok)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors",
                                                                  "tokenizer.json"]
    model, tok2 = load_pretrained(tmp_path / "m")
    idx = torch.tensor([tok.encode(TEXT[:200])[:64]])
    with torch.no_grad():
        assert torch.equal(model(idx).logits, trained(idx).logits)
    assert tok2.encode(TEXT) == tok.encode(TEXT)


def test_saving_over_a_model_replaces_it_whole_and_keeps_the_users_files(tmp_path, trained, tok):
    """A plain model saved into a quantized model's folder: its quantization.json, training.json and tokenizer
    (none passed) go, so the folder loads as the new model; a folder of the user's stays. A quantized model
    saved anew carries its quantization.json."""
    from lmlab.models.quant import quantize_dir
    save_pretrained(tmp_path / "m", trained, tok, training={"steps": 60})
    quantize_dir(tmp_path / "m", tmp_path / "q8", 8)
    (tmp_path / "q8" / "steering").mkdir()
    (tmp_path / "q8" / "steering" / "happy.safetensors").write_bytes(b"mine")
    (tmp_path / "q8" / "chat_template.jinja").write_text("{{ x }}")
    lmlab.save(tmp_path / "q8", trained, overwrite=True)  # refused without it (tests/test_api_guards.py)
    assert sorted(p.name for p in (tmp_path / "q8").iterdir()) == ["config.json", "model.safetensors", "steering"]
    assert (tmp_path / "q8" / "steering" / "happy.safetensors").read_bytes() == b"mine"
    model, tok2 = load_pretrained(tmp_path / "q8")
    idx = torch.tensor([tok.encode(TEXT[:200])[:64]])
    with torch.no_grad():
        assert torch.equal(model(idx).logits, trained(idx).logits)
    assert tok2 is None
    quantize_dir(tmp_path / "m", tmp_path / "q8b", 8)
    q8, qtok = load_pretrained(tmp_path / "q8b")
    lmlab.save(tmp_path / "again", q8, qtok)
    again, _ = load_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(idx).logits, q8(idx).logits)


def test_load_errors_are_clear(tmp_path, trained, tok):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "nope")
    save_pretrained(tmp_path / "m", trained, tok)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        load_pretrained(tmp_path / "m")


def test_a_rope_block_size_the_weights_cannot_have_is_refused_before_its_tables(tmp_path, trained, tok, capsys):
    """block_size sizes no parameter of a RoPE model, only its cos/sin tables (2 x block_size x head_dim)."""
    import json
    save_pretrained(tmp_path / "m", trained, tok)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "block_size": 10**12}))
    stored = sum(p.numel() for p in trained.state_dict().values())
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == (
        f"lmlab: error: {tmp_path / 'm' / 'config.json'} describes RoPE tables of {2 * 10**12 * 16:,} values "
        f"(block_size {10**12:,}) but the weights hold {stored:,} values: they do not belong together (nothing was "
        "allocated)\n")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "block_size": 2**18}))  # 2**23 values: loads
    assert load_pretrained(tmp_path / "m")[0].config.block_size == 2**18


def test_generate_with_no_prompts_gives_no_texts(trained, tok):
    assert lmlab.generate(trained, tok, []) == lmlab.generate(trained, tok, [], num_beams=2) == []


def test_stream_concatenates_to_generate(trained, tok):
    kw = dict(max_new_tokens=40, temperature=0.9, top_k=20, seed=5)
    full = lmlab.generate(trained, tok, "Дед ловил", **kw)
    pieces = list(lmlab.stream(trained, tok, "Дед ловил", **kw))
    assert len(pieces) > 1 and "".join(pieces) == full


def test_stop_strings_cut_generation_and_stream(trained, tok):
    free = lmlab.generate(trained, tok, "The old", max_new_tokens=40, do_sample=False, stop_at_eos=False)
    stop = free[5:8]  # a string we know the greedy continuation produces
    cut = lmlab.generate(trained, tok, "The old", max_new_tokens=40, do_sample=False, stop_strings=[stop])
    assert cut == free[:free.index(stop)]
    streamed = "".join(lmlab.stream(trained, tok, "The old", max_new_tokens=40, do_sample=False,
                                    stop_strings=[stop]))
    assert streamed == cut


def test_edge_prompts_behave(trained, tok):
    assert isinstance(lmlab.generate(trained, tok, "", max_new_tokens=5, seed=0), str)  # starts from <BOS>
    long_prompt = TEXT * 3  # far longer than block_size 64
    assert len(tok.encode(long_prompt)) > 64
    out = lmlab.generate(trained, tok, long_prompt, max_new_tokens=70, do_sample=False, stop_at_eos=False)
    assert len(tok.encode(out)) >= 60
    assert isinstance(lmlab.generate(trained, tok, "漢字 ∮ unknown ⛄", max_new_tokens=5, seed=0), str)
    batch = lmlab.generate(trained, tok, ["Дед", "The old woman lived"], max_new_tokens=10, do_sample=False)
    assert batch == [lmlab.generate(trained, tok, p, max_new_tokens=10, do_sample=False)
                     for p in ["Дед", "The old woman lived"]]


def test_cli_info_and_generate(tmp_path, trained, tok, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error:") and "\n" not in err
    assert main(["info", "--preset", "gpt2-124m"]) == 0
    assert "124,439,808" in capsys.readouterr().out
    save_pretrained(tmp_path / "m", trained, tok)
    # a run is taken as its final model, as eval and chat take it (its config.json was read as a model's)
    save_pretrained(tmp_path / "run" / "final", trained, tok)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {}, "model": trained.config.to_dict()}))
    assert main(["info", str(tmp_path / "m")]) == 0
    alone = capsys.readouterr().out
    assert main(["info", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out == alone.replace(str(tmp_path / "m"), str(tmp_path / "run" / "final"))
    assert main(["generate", str(tmp_path / "m"), "--prompt", "Дед", "--greedy", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    expected = lmlab.generate(trained, tok, "Дед", max_new_tokens=12, do_sample=False)
    assert out == "Дед" + expected + "\n"
    assert main(["generate", str(tmp_path / "m"), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_prompt_lookup_drafts():
    """The draft: what followed the last n-gram's latest earlier occurrence, repeated from there when it
    reaches the end of the context (a loop of period 2 drafts k tokens, not 2)."""
    from lmlab.models.generation import _draft
    ids = torch.tensor([5, 1, 2, 7, 8, 9, 6, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    assert _draft(ids, 3) == [3, 4, 5]                       # "1 2" occurred last at 7: its continuation
    assert _draft(ids, 9) == [3, 4, 5, 6, 0, 1, 2, 3, 4]     # ... which then repeats
    assert _draft(torch.tensor([9, 4, 5, 4, 5, 4, 5, 4, 5]), 6) == [4, 5, 4, 5, 4, 5]
    assert _draft(torch.tensor([1, 2, 3]), 4) == []          # the last token never occurred before
    assert _draft(torch.tensor([3, 1, 2, 3]), 2) == [1, 2]   # no earlier 2-gram "2 3": the 1-gram "3"


def test_prompt_lookup_gives_the_greedy_text_in_fewer_passes(trained, tok, monkeypatch):
    """Drafts verified in one forward keep greedy's tokens exactly (past the 64-token window too, where the
    cache is rebuilt), and once the text repeats what is in its context they save most passes."""
    passes = []
    forward = lmlab.Transformer.forward
    monkeypatch.setattr(lmlab.Transformer, "forward",
                        lambda self, *a, **kw: passes.append(1) or forward(self, *a, **kw))
    for prompt, stop_at_eos in (("The old man and", False), ("Дед ловил", True)):
        ids = tok.encode(prompt)
        plain = lmlab.generate_ids(trained, [ids], do_sample=False, max_new_tokens=200, stop_at_eos=stop_at_eos)
        passes.clear()
        fast = lmlab.generate_ids(trained, [ids], do_sample=False, max_new_tokens=200, stop_at_eos=stop_at_eos,
                                  prompt_lookup=8)
        assert fast == plain, prompt
        # the model has learned the ~90-token verse, so its second pass through it comes from drafts
        assert len(passes) < len(plain[0]) - 60, (len(passes), len(plain[0]))
    text = lmlab.generate(trained, tok, "They lived in a", do_sample=False, max_new_tokens=60)
    assert "".join(lmlab.stream(trained, tok, "They lived in a", do_sample=False, max_new_tokens=60,
                                prompt_lookup=4)) == text
    with pytest.raises(ValueError, match="prompt_lookup"):
        lmlab.GenerationConfig(prompt_lookup=-1)


@pytest.mark.parametrize("block_size", [16, 64])
def test_prompt_lookup_drafts_longer_than_the_rebuilt_cache(tok, trained, block_size):
    """A draft longer than the 3/4 of the window a full cache is rebuilt from (block_size 64: drafts over 47
    tokens) fed fewer positions than it had tokens: the draft's logits were misaligned and the cache length
    went negative. Drafts are clamped to fit, and the text is greedy's."""
    model = trained if block_size == 64 else fit(tok, block_size)
    ids = tok.encode("The old man and")
    plain = lmlab.generate_ids(model, [ids], do_sample=False, max_new_tokens=150, stop_at_eos=False)
    fast = lmlab.generate_ids(model, [ids], do_sample=False, max_new_tokens=150, stop_at_eos=False,
                              prompt_lookup=64)
    assert fast == plain


def test_bad_generation_json_is_one_line_naming_the_field(tmp_path, trained, tok, capsys):
    """An unknown key (or a wrong type) in a model directory's generation.json was a TypeError traceback."""
    save_pretrained(tmp_path / "m", trained, tok)
    gen = tmp_path / "m" / "generation.json"
    for text, field in (('{"temprature": 0.5}', "temprature"), ('{"temperature": "hot"}', "temperature"),
                        ('["greedy"]', "must be a mapping of its fields, not list"),
                        ('{"top_k": 4,}', "generation.json")):
        gen.write_text(text)
        with pytest.raises(ValueError, match=field):
            lmlab.GenerationConfig.load(gen)
    gen.write_text('{"temprature": 0.5}')
    pytest.importorskip("transformers")
    assert main(["export", "hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lmlab: error: {gen}: unknown GenerationConfig field(s): temprature"
