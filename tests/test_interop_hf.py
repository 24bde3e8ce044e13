"""lmlab <-> Hugging Face transformers, checked with transformers itself: logits, pipeline generation,
Trainer, tokenizer files, and a GPT-2-style checkpoint whose vocabulary is not lmlab's."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from lmlab.interop import export_hf, from_hf_model, import_hf, to_hf_model, to_hf_tokenizer  # noqa: E402
from lmlab.models import GenerationConfig, ModelConfig, Transformer, generate  # noqa: E402
from lmlab.models.io import load_pretrained, save_pretrained  # noqa: E402
from lmlab.tokenizers import Tokenizer  # noqa: E402

TEXT = ("the cat sat on the mat. the dog sat on the log. a bird flew over the tree and sang a song. "
        "the fox ran into the wood, and the cat ran after the fox. ") * 30
FAMILIES = ["gpt2", "llama", "gpt"]


def trained(family: str, tmp_path, steps: int = 60, **overrides):
    """A tiny model trained for a few dozen steps, so greedy decoding is not a constant token."""
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=tok.vocab_size + 3, block_size=64, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.tensor(tok.encode(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,))
        batch = torch.stack([ids[s:s + 33] for s in starts.tolist()])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = save_pretrained(tmp_path / f"lmlab-{family}", model, tok)
    return path, model, tok


def logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("family,overrides", [("gpt2", {}), ("llama", {"n_kv_head": 2}), ("gpt", {}),
                                              ("gpt2", {"tie_embeddings": False}),
                                              ("llama", {"tie_embeddings": True, "rope_theta": 500000.0})])
def test_export_then_import_keeps_logits(tmp_path, family, overrides):
    src, model, tok = trained(family, tmp_path, steps=5, **overrides)
    out = export_hf(src, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                        "gpt": "OpenAIGPTLMHeadModel"}[family]]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 3, 0)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == config["architectures"][0]
    idx = torch.randint(0, model.config.vocab_size, (2, 48))
    expected = logits(model, idx)
    torch.testing.assert_close(logits(hf, idx), expected, atol=1e-5, rtol=1e-5)

    back = import_hf(out, tmp_path / "back")
    again, again_tok = load_pretrained(back)
    assert again.config == model.config  # dropout, init_std, rope_theta, tying: all survive the trip
    assert again_tok.fingerprint() == tok.fingerprint()  # token files made with it stay valid
    torch.testing.assert_close(logits(again, idx), logits(hf, idx), atol=1e-5, rtol=1e-5)


def test_tokenizer_files_load_with_autotokenizer_and_match_lmlab(tmp_path):
    src, model, tok = trained("gpt2", tmp_path, steps=1)
    (src / "chat_template.jinja").write_text("{% for m in messages %}<BOS>{{ m['content'] }}<EOS>{% endfor %}")
    out = export_hf(src, tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert (fast.bos_token_id, fast.eos_token_id, fast.unk_token_id, fast.pad_token_id) == (2, 3, 1, 0)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "the cat sat on the <EOS> mat, naïvely 🐈"
    assert fast(text).input_ids == tok.encode(text)  # no BOS added; "<EOS>" in text stays text, as in lmlab
    assert fast.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert fast.model_max_length == model.config.block_size
    chat = fast.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<BOS>hi<EOS>"
    back = import_hf(out, tmp_path / "back")
    assert (back / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_greedy_equals_lmlab_generate(tmp_path, family):
    src, model, tok = trained(family, tmp_path)
    out = export_hf(src, tmp_path / "hf")
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    for prompt in ["the cat", "a bird flew", "the fox ran into"]:
        ours = generate(model, tok, prompt, GenerationConfig(max_new_tokens=24, do_sample=False))
        theirs = pipe(prompt, max_new_tokens=24, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert theirs == ours
        assert len(set(tok.encode(ours))) > 3  # trained: not one token repeated


def test_trainer_three_steps_lower_the_loss(tmp_path):
    src, model, tok = trained("llama", tmp_path, steps=0)
    out = export_hf(src, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok.encode(TEXT)
    rows = [ids[i * 32:(i + 1) * 32] for i in range(8)]
    data = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in rows]
    batch = torch.tensor(rows)

    def loss() -> float:
        hf.eval()
        with torch.no_grad():
            return hf(input_ids=batch, labels=batch).loss.item()

    before = loss()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=hf, args=args, train_dataset=data)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(logged) == 3
    after = loss()
    assert after < before - 0.05, (before, after, logged)


def test_in_memory_adapters_match(tmp_path):
    """llm-arch-research's HFAdapter.from_llm_model / HFTokenizerAdapter, done by value: to_hf_model, from_hf_model."""
    _, model, tok = trained("gpt2", tmp_path, steps=1)
    hf = to_hf_model(model)
    idx = torch.randint(0, model.config.vocab_size, (1, 20))
    torch.testing.assert_close(logits(hf, idx), logits(model, idx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(from_hf_model(hf), idx), logits(model, idx), atol=1e-5, rtol=1e-5)
    prompt = tok.encode("the cat")
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
    ours = generate(model, tok, "the cat", max_new_tokens=10, do_sample=False)
    assert to_hf_tokenizer(tok).decode(out[0, len(prompt):]) == ours


def test_generation_json_becomes_generation_config(tmp_path):
    src, _, _ = trained("gpt2", tmp_path, steps=0)
    GenerationConfig(max_new_tokens=77, temperature=0.7, top_k=40, top_p=0.9).save(src / "generation.json")
    out = export_hf(src, tmp_path / "hf")
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.max_new_tokens, gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (77, True, 0.7, 40, 0.9)
    # stop strings and generation past EOS were left behind: transformers stopped where lmlab would not
    GenerationConfig(stop_strings=["\n\n"], stop_at_eos=False).save(src / "generation.json")
    gen = transformers.GenerationConfig.from_pretrained(export_hf(src, tmp_path / "hf2"))
    assert (gen.stop_strings, gen.eos_token_id) == (["\n\n"], None)


def _saved_hf(path, config, seed=0):
    """A transformers model of `config` with random weights and lmlab's tokenizer, saved as a checkpoint."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=config.vocab_size)
    to_hf_tokenizer(tok).save_pretrained(path)
    return model


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


SCALED = ("GPT-2 attention scaled other than by 1/sqrt(head size) (scale_attn_weights false or "
          "scale_attn_by_inverse_layer_idx true) is not supported")


@pytest.mark.parametrize("changes, message", [
    # settings lmlab's attention does not compute: imported, they gave other logits (max diff 4.17) and no error
    ({"scale_attn_weights": False}, SCALED),
    ({"scale_attn_by_inverse_layer_idx": True}, SCALED),
    # values of the wrong type: "false" read as true (the checkpoint's own head thrown away), or a traceback
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, not 'false'"),
    ({"n_head": 0}, "n_head must be an integer >= 1, not 0"),
    ({"n_embd": None}, "n_embd must be an integer >= 1, not None"),
    ({"model_type": ["gpt2"]}, "model_type must be a string, not ['gpt2']"),
    ({"initializer_range": "x"}, "initializer_range must be a number, not 'x'"),
])
def test_a_config_lmlab_cannot_represent_is_refused_naming_the_key(tmp_path, changes, message):
    path = tmp_path / "hf"
    _saved_hf(path, transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            tie_word_embeddings=False))
    _edit_config(path, **changes)
    with pytest.raises(ValueError) as e:
        import_hf(path, tmp_path / "m")
    assert str(e.value) == f"{path / 'config.json'}: {message}" and "\n" not in str(e.value)


def test_llama_configs_refused_or_read_as_transformers_reads_them(tmp_path):
    """rope_scaling as a string or a list crashed (AttributeError), num_key_value_heads 0 reached a shape error;
    eos_token_id as a list of one was refused and `architectures` as a string read as its first letter."""
    path = tmp_path / "hf"
    model = _saved_hf(path, transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, max_position_embeddings=64,
                                                     bos_token_id=2, eos_token_id=3, pad_token_id=0))
    for changes, message in (({"rope_scaling": "linear"}, "rope_scaling must be an object, not 'linear'"),
                             ({"rope_scaling": [1]}, "rope_scaling must be an object, not [1]"),
                             ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, not 0")):
        saved = (path / "config.json").read_text()
        _edit_config(path, **changes)
        with pytest.raises(ValueError, match=re.escape(message)):
            import_hf(path, tmp_path / "m")
        (path / "config.json").write_text(saved)
    _edit_config(path, eos_token_id=[3], architectures="LlamaForCausalLM")
    ours, _ = load_pretrained(import_hf(path, tmp_path / "m"))
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        assert (ours(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_tokenizer_files_that_are_not_json_objects_and_named_chat_templates(tmp_path):
    """tokenizer_config.json that is not JSON, or a list, crashed the import; a chat template given as named
    templates (transformers' list form) was dropped; a chat_template.jinja that is not UTF-8 crashed the export."""
    path = tmp_path / "hf"
    _saved_hf(path, transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=2, eos_token_id=3))
    tc = path / "tokenizer_config.json"
    saved = json.loads(tc.read_text())
    for text, message in (("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object, not a list")):
        tc.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            import_hf(path, tmp_path / "m")
    tc.write_text(json.dumps({**saved, "chat_template": [{"name": "tool_use", "template": "T"},
                                                         {"name": "default", "template": "{{ messages }}"}]}))
    out = import_hf(path, tmp_path / "m")
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    (out / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ValueError, match="chat_template.jinja is not UTF-8 text"):
        export_hf(out, tmp_path / "back")


# ---- a checkpoint whose vocabulary is not lmlab's (the situation of the real GPT-2) -----------------

def gpt2_style_checkpoint(path, *, bare_names: bool = False):
    """A GPT-2-like checkpoint: byte-level BPE whose ids 0..3 are ordinary bytes and whose only special
    token, <|endoftext|>, is the last id (bos = eos = unk), and no pad token."""
    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok.add_special_tokens(["<|endoftext|>"])
    eot = hf_tok.token_to_id("<|endoftext|>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=eot + 1, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    if bare_names:  # the hub's gpt2 stores "h.0.attn..." and "wte.weight", without "transformer."
        state = load_file(path / "model.safetensors")
        save_file({k.removeprefix("transformer."): v for k, v in state.items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
    return model, fast


@pytest.mark.parametrize("bare_names", [False, True])
def test_foreign_vocabulary_is_imported_and_kept(tmp_path, bare_names):
    hf, fast = gpt2_style_checkpoint(tmp_path / "gpt2", bare_names=bare_names)
    eot = fast.eos_token_id
    assert fast.convert_ids_to_tokens([0, 1, 2, 3]) == ["!", '"', "#", "$"]
    dst = import_hf(tmp_path / "gpt2", tmp_path / "lmlab")
    assert not (dst / "tokenizer.json").exists() and (dst / "hf_tokenizer" / "tokenizer.json").is_file()
    model, tok = load_pretrained(dst)
    assert tok is None and model.config.pad_token_id is None  # 0 is "!", not padding
    idx = torch.randint(0, eot + 1, (2, 30))
    torch.testing.assert_close(logits(model, idx), logits(hf, idx), atol=1e-5, rtol=1e-5)

    out = export_hf(dst, tmp_path / "hf-again")  # the original tokenizer and special ids come back
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (eot, eot, None)
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again.eos_token == "<|endoftext|>" and again("the cat").input_ids == fast("the cat").input_ids
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded, idx), logits(hf, idx), atol=1e-5, rtol=1e-5)


def test_foreign_vocabulary_exports_to_gguf_with_its_own_specials(tmp_path):
    gguf = pytest.importorskip("gguf")
    from lmlab.interop import export_gguf

    hf, fast = gpt2_style_checkpoint(tmp_path / "gpt2")
    path = export_gguf(import_hf(tmp_path / "gpt2", tmp_path / "lmlab"), tmp_path / "gpt2.gguf").path
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    eot = fast.eos_token_id
    assert fields["tokenizer.ggml.tokens"][:4] == ["!", '"', "#", "$"]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (eot, eot)
    assert "tokenizer.ggml.padding_token_id" not in fields
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    text = "the fox ran into the wood, 3 times!"
    ids = fast(text).input_ids
    assert llm.tokenize(text.encode(), add_bos=False) == ids
    llm.eval(ids)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    assert abs(llm.scores[: len(ids)] - expected).max() < 1e-2
