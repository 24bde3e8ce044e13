"""lmlab <-> Hugging Face transformers, checked with transformers itself: logits, pipeline generation,
Trainer, tokenizer files, and a GPT-2-style checkpoint whose vocabulary is not lmlab's."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

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
    # generation past EOS was left behind: transformers stopped where lmlab would not (stop strings: the next test)
    GenerationConfig(stop_at_eos=False).save(src / "generation.json")
    gen = transformers.GenerationConfig.from_pretrained(export_hf(src, tmp_path / "hf2"))
    assert gen.eos_token_id is None
    # lmlab's beam search keeps the best beams whatever do_sample says; do_sample true made transformers sample them
    GenerationConfig(num_beams=4, temperature=0.7).save(src / "generation.json")
    gen = transformers.GenerationConfig.from_pretrained(export_hf(src, tmp_path / "hf3"))
    assert (gen.num_beams, gen.do_sample, gen.temperature) == (4, False, None)  # no sampling knob either


def test_an_export_with_stop_strings_generates_in_transformers(tmp_path):
    """generation.json's stop strings went into generation_config.json, and transformers' generate then raised
    "There are one or more stop strings ... but we could not locate a tokenizer" from model.generate(ids) and from
    pipeline(...): they are left out, and the export generates as lmlab does."""
    src, model, tok = trained("gpt2", tmp_path, steps=20)
    GenerationConfig(max_new_tokens=12, do_sample=False, stop_strings=[".", "\n\n"]).save(src / "generation.json")
    out = export_hf(src, tmp_path / "hf")
    assert "stop_strings" not in json.loads((out / "generation_config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tok.encode("the cat")
    new = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    ours = generate(model, tok, "the cat", max_new_tokens=12, do_sample=False)  # no stop strings: all 12 tokens
    assert to_hf_tokenizer(tok).decode(new[0, len(prompt):]) == ours
    pipe = transformers.pipeline("text-generation", str(out))
    assert pipe("the cat", return_full_text=False)[0]["generated_text"] == ours


@pytest.mark.parametrize("ours", [
    GenerationConfig(max_new_tokens=24, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.1),
    GenerationConfig(max_new_tokens=5, do_sample=False, repetition_penalty=1.3),
    GenerationConfig(num_beams=3, length_penalty=0.5, do_sample=False)])
def test_generation_defaults_survive_export_and_import(tmp_path, ours):
    """import_hf never read generation_config.json: export -> import lost temperature, top_k, max_new_tokens..."""
    src, _, _ = trained("gpt2", tmp_path, steps=0)
    ours.save(src / "generation.json")
    back = import_hf(export_hf(src, tmp_path / "hf"), tmp_path / "back")
    assert GenerationConfig.load(back / "generation.json") == ours


def test_a_foreign_generation_config_imports_what_lmlab_knows(tmp_path):
    """transformers' meaning where the file is silent (no sampling; sampling with top-k 50); keys lmlab lacks and
    values it refuses are left out, never an error."""
    src, _, _ = trained("gpt2", tmp_path, steps=0)
    out = export_hf(src, tmp_path / "hf")
    gen = out / "generation_config.json"
    base = json.loads(gen.read_text())
    assert not {"do_sample", "temperature", "max_new_tokens"} & set(base)  # no generation.json: token ids alone
    assert not (import_hf(out, tmp_path / "plain") / "generation.json").exists()
    gen.write_text(json.dumps({**base, "max_new_tokens": 30, "no_repeat_ngram_size": 3, "typical_p": 0.5}))
    assert GenerationConfig.load(import_hf(out, tmp_path / "a") / "generation.json") == GenerationConfig(
        max_new_tokens=30, do_sample=False)
    gen.write_text(json.dumps({**base, "do_sample": True, "temperature": 0.8, "top_p": 0, "top_k": "many",
                               "repetition_penalty": None, "num_beams": -2, "max_new_tokens": 2.5}))
    assert GenerationConfig.load(import_hf(out, tmp_path / "b") / "generation.json") == GenerationConfig(
        do_sample=True, temperature=0.8, top_k=50)


def test_a_chat_model_export_stops_at_the_end_of_its_turn(tmp_path):
    """generation_config.json listed <EOS> alone: transformers' generate ran past <|end|> to max_new_tokens (the
    GGUF export had eot_token_id). Here the model's every next token is <|end|>: the reply is empty in both."""
    from lmlab.tune import chat

    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    base = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=len(tok), block_size=64, tie_embeddings=False))
    model, tok, _ = chat.add_chat_tokens(base.eval(), tok)
    end = tok.token_to_id(chat.END)
    with torch.no_grad():  # a constant final hidden state (norm weight 0, bias 1) read by a head that favours <|end|>
        model.norm_f.weight.zero_()
        model.norm_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = 1.0
    src = save_pretrained(tmp_path / "chat", model, tok)
    chat.write_template(src)
    out = export_hf(src, tmp_path / "hf")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, end]
    messages = [{"role": "user", "content": "the cat"}]
    assert chat.generate_reply(model, tok, messages, do_sample=False, max_new_tokens=8) == ""
    fast = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = fast.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert prompt["input_ids"][0].tolist() == chat.render(messages, tok, add_generation_prompt=True)[0]
    new = hf.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert new.tolist() == [end]
    # and back: the import takes that list (lmlab stops there too), the next export writes it again
    again = export_hf(import_hf(out, tmp_path / "back"), tmp_path / "hf-again")
    assert json.loads((again / "generation_config.json").read_text())["eos_token_id"] == [3, end]


def test_to_hf_model_merges_lora_adapters_and_refuses_a_quantized_model(tmp_path):
    """to_hf_model copied the base weights of a model with LoRA adapters (logits off by 4.6 in review) and raised
    KeyError 'blocks.0.attn.qkv.weight' on an int8 model."""
    from lmlab.interop._files import load_model_dir
    from lmlab.models.quant import quantize_dir
    from lmlab.tune.lora import LoRAConfig, apply_lora, lora_layers

    src, model, _ = trained("llama", tmp_path, steps=1)
    idx = torch.randint(0, model.config.vocab_size, (1, 20))
    plain = logits(model, idx)
    torch.manual_seed(1)
    apply_lora(model, LoRAConfig(rank=2, tokens=(5, 9)))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.2)
        model.tok_emb.lora_rows.normal_(0, 1.0)
    adapted = logits(model, idx)
    assert (adapted - plain).abs().max() > 0.1
    torch.testing.assert_close(logits(to_hf_model(model), idx), adapted, atol=1e-5, rtol=1e-5)
    assert (adapted - logits(model, idx)).abs().max() == 0  # the model itself keeps its adapters unmerged

    quantized = quantize_dir(src, tmp_path / "int8", 8)[0]
    with pytest.raises(ValueError) as refused:
        load_model_dir(quantized)
    int8, _ = load_pretrained(quantized)
    with pytest.raises(ValueError) as e:
        to_hf_model(int8)
    assert str(e.value) == str(refused.value).replace(str(quantized), "the model")


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
                             ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, not 0"),
                             # transformers 5 reads rope_parameters', 4 the top-level one: lmlab read the latter
                             ({"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                              "rope_theta (10000) and rope_parameters.rope_theta (500000) disagree")):
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


@pytest.mark.parametrize("family, tie", [("gpt2", True), ("gpt2", None), ("llama", True)])
def test_a_checkpoints_own_head_is_kept_whatever_tie_word_embeddings_says(tmp_path, family, tie):
    """tie_word_embeddings true (or absent: GPT-2's default) beside an lm_head.weight other than the embedding: the
    import tied the head and threw the checkpoint's away (logits off by 2.4); transformers 5 keeps it untied."""
    path = tmp_path / "hf"
    shape = dict(vocab_size=300, tie_word_embeddings=False, bos_token_id=2, eos_token_id=3)
    _saved_hf(path, transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **shape)
              if family == "gpt2" else transformers.LlamaConfig(
                  hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, **shape))
    config = json.loads((path / "config.json").read_text())
    config.pop("tie_word_embeddings")
    (path / "config.json").write_text(json.dumps(config if tie is None else {**config, "tie_word_embeddings": tie}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert not torch.equal(theirs.lm_head.weight, theirs.get_input_embeddings().weight)
    ours, _ = load_pretrained(import_hf(path, tmp_path / "m"))
    idx = torch.randint(0, 300, (2, 24))
    torch.testing.assert_close(logits(ours, idx), logits(theirs, idx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(from_hf_model(theirs), idx), logits(theirs, idx), atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("kind", ["char", "word"])
def test_unk_decodes_as_in_transformers(tmp_path, kind):
    """lmlab's decode dropped <UNK> (a special token) where the export's tokenizer prints it, so "decoding matches
    too" was false for char and word models on text with what their vocabulary lacks; <PAD> <BOS> <EOS> stay out."""
    tok = Tokenizer.train([TEXT], kind=kind, vocab_size=40)
    model = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=len(tok), block_size=64))
    out = export_hf(save_pretrained(tmp_path / "m", model, tok), tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(out)
    text = "the cat sat, Жили-были 漢字 the zebra."
    ids = tok.encode(text)
    assert fast(text).input_ids == ids and ids.count(tok.unk_id) >= 2
    assert tok.decode(ids) == fast.decode(ids) and "<UNK>" in tok.decode(ids)
    assert tok.decode_batch([ids, ids[:3]]) == fast.batch_decode([ids, ids[:3]])
    framed = [tok.bos_id, *ids, tok.eos_id, tok.pad_id]
    assert tok.decode(framed) == fast.decode(ids)


# ---- a checkpoint whose vocabulary is not lmlab's (the situation of the real GPT-2) -----------------

def gpt2_style_checkpoint(path, *, bare_names: bool = False, post: str | None = None):
    """A GPT-2-like checkpoint: byte-level BPE whose ids 0..3 are ordinary bytes and whose only special
    token, <|endoftext|>, is the last id (bos = eos = unk), and no pad token. `post`: a post-processor's template
    ("<|endoftext|> $A": BOS first, as Llama's tokenizers do)."""
    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok.add_special_tokens(["<|endoftext|>"])
    eot = hf_tok.token_to_id("<|endoftext|>")
    if post:
        hf_tok.post_processor = processors.TemplateProcessing(single=post, special_tokens=[("<|endoftext|>", eot)])
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


def test_merge_and_quantize_keep_a_foreign_tokenizer(tmp_path):
    """merge and quantize copied generation.json and the chat template but not hf_tokenizer/, the only tokenizer
    an imported GPT-2-style model has: `lmlab export hf` of the merged model failed "has no tokenizer.json"."""
    from lmlab.models.merge import merge_dirs
    from lmlab.models.quant import quantize_dir

    hf, fast = gpt2_style_checkpoint(tmp_path / "gpt2")
    eot = fast.eos_token_id
    gen = tmp_path / "gpt2" / "generation_config.json"  # stop ids kept in hf_tokenizer/ travel with it
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": [eot, 17]}))
    src = import_hf(tmp_path / "gpt2", tmp_path / "lmlab")
    merged = merge_dirs([src, src], tmp_path / "merged", "linear")
    quantized = quantize_dir(src, tmp_path / "int8", 8)[0]
    files = sorted(f.name for f in (src / "hf_tokenizer").iterdir())
    assert "generation_config.json" in files and "tokenizer.json" in files
    for made in (merged, quantized):
        assert sorted(f.name for f in (made / "hf_tokenizer").iterdir()) == files
        for name in files:
            assert (made / "hf_tokenizer" / name).read_bytes() == (src / "hf_tokenizer" / name).read_bytes()
    out = export_hf(merged, tmp_path / "hf-merged")
    assert transformers.AutoTokenizer.from_pretrained(out)("the cat").input_ids == fast("the cat").input_ids
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [eot, 17]
    idx = torch.randint(0, eot + 1, (2, 30))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded, idx), logits(hf, idx), atol=1e-5, rtol=1e-5)


def test_merging_models_of_two_foreign_tokenizers_is_refused(tmp_path):
    from lmlab.models.merge import merge_dirs

    gpt2_style_checkpoint(tmp_path / "gpt2")
    a = import_hf(tmp_path / "gpt2", tmp_path / "a")
    b = import_hf(tmp_path / "gpt2", tmp_path / "b")
    file = b / "hf_tokenizer" / "tokenizer.json"
    data = json.loads(file.read_text())
    data["model"]["vocab"] = {t: len(data["model"]["vocab"]) - 1 - i for t, i in data["model"]["vocab"].items()}
    file.write_text(json.dumps(data))  # the same tokens, numbered the other way round
    with pytest.raises(ValueError, match=re.escape("have different tokenizers (hf_tokenizer/tokenizer.json differs)")):
        merge_dirs([a, b], tmp_path / "merged", "linear")


def test_a_checkpoints_stop_ids_survive_import_and_export(tmp_path):
    """eos_token_id [eot, 17] in generation_config.json (a chat checkpoint's end of turn beside its EOS): the import
    never read it and the export wrote the tokenizer's EOS alone, so transformers ran past 17 after the trip."""
    _, fast = gpt2_style_checkpoint(tmp_path / "gpt2")
    eot = fast.eos_token_id
    gen = tmp_path / "gpt2" / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": [eot, 17]}))
    out = export_hf(import_hf(tmp_path / "gpt2", tmp_path / "lmlab"), tmp_path / "hf-again")
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [eot, 17]
    config = tmp_path / "gpt2" / "config.json"  # without generation_config.json: config.json's list
    gen.unlink()
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token_id": [eot, 18]}))
    out = export_hf(import_hf(tmp_path / "gpt2", tmp_path / "lmlab2"), tmp_path / "hf-again2")
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [eot, 18]
    for value in ([eot, 999], "x"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token_id": value}))
        message = f"{config}: eos_token_id must be a token id below {eot + 1} or a list of them, not {value!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            import_hf(tmp_path / "gpt2", tmp_path / "lmlab3")
    # lmlab's own vocabulary: generation stops at <EOS> (and a chat model's <|end|>) only, so another id is refused
    src, _, _ = trained("gpt2", tmp_path, steps=0)
    hf = export_hf(src, tmp_path / "hf")
    gen = hf / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": [3, 7]}))
    with pytest.raises(ValueError, match=re.escape("stops generation at ids [3, 7] (eos_token_id), but an lmlab model "
                                                   "stops only at 3")):
        import_hf(hf, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / "lmlab3").exists()


def test_shards_in_a_subfolder_are_read_and_none_outside_the_folder(tmp_path):
    """An index naming "sub/model-00001-of-....safetensors" (transformers joins the name to the folder and loads it)
    was refused as "a shard that is missing". A name or a linked folder that leads out of the checkpoint is refused,
    saying so."""
    src, model, _ = trained("gpt2", tmp_path, steps=0)
    hf = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(export_hf(src, tmp_path / "hf")).save_pretrained(
        hf, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    index = hf / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    (hf / "sub").mkdir()
    (hf / first).rename(hf / "sub" / first)

    def name_it(name):
        index.write_text(json.dumps({**data, "weight_map": {k: name if v == first else v
                                                            for k, v in data["weight_map"].items()}}))

    name_it(f"sub/{first}")
    assert type(transformers.AutoModelForCausalLM.from_pretrained(hf)).__name__ == "GPT2LMHeadModel"
    back, _ = load_pretrained(import_hf(hf, tmp_path / "back"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / first).write_bytes((hf / "sub" / first).read_bytes())
    (hf / "linked").symlink_to(outside)
    for name, message in ((f"../outside/{first}", f"names a shard outside its folder: '../outside/{first}'"),
                          (str(outside / first), f"names a shard outside its folder: '{outside / first}'"),
                          (f"linked/{first}", f"names a shard, linked/{first}, in a folder that a symbolic link "
                                              f"takes outside {hf}"),
                          ("sub/nope.safetensors", "names a shard that is missing: sub/nope.safetensors")):
        name_it(name)
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(f"{index} {message}")):
            import_hf(hf, tmp_path / "m")
    assert not (tmp_path / "m").exists()


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


def test_a_checkpoints_stop_ids_reach_the_gguf_export(tmp_path):
    """eos_token_id [eot, 17, 18] in generation_config.json survived the import, but the GGUF export wrote the
    tokenizer's EOS alone, and llama.cpp ran past 17 and 18. GGUF has three stop keys, EOS, EOT and EOM, and
    llama.cpp stops at each; a fourth id is refused, saying so, rather than dropped."""
    gguf = pytest.importorskip("gguf")
    from lmlab.interop import export_gguf

    _, fast = gpt2_style_checkpoint(tmp_path / "gpt2")
    eot = fast.eos_token_id
    gen = tmp_path / "gpt2" / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": [eot, 17, 18]}))
    path = export_gguf(import_hf(tmp_path / "gpt2", tmp_path / "lmlab"), tmp_path / "stops.gguf").path
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")] == [eot, 17, 18]
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": [eot, 17, 18, 19]}))
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'lmlab4'} stops generation at ids [17, 18, 19, {eot}], but GGUF holds three at most "
            "(llama.cpp's EOS, EOT and EOM ids): llama.cpp would not stop at [19]; keep three in its "
            "hf_tokenizer/generation_config.json")):
        export_gguf(import_hf(tmp_path / "gpt2", tmp_path / "lmlab4"), tmp_path / "four.gguf")
    assert not (tmp_path / "four.gguf").exists()
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    assert [i for i in range(eot + 1) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)] == [17, 18, eot]


def test_gguf_adds_bos_when_the_checkpoints_tokenizer_does(tmp_path):
    """add_bos_token was always false: for a tokenizer whose post-processor puts BOS first (Llama's), llama.cpp
    saw other prompt ids than transformers. A post-processor that adds what llama.cpp cannot is refused."""
    gguf = pytest.importorskip("gguf")
    from lmlab.interop import export_gguf

    _, fast = gpt2_style_checkpoint(tmp_path / "gpt2", post="<|endoftext|> $A")
    text, eot = "the fox ran into the wood", fast.eos_token_id
    assert fast(text).input_ids[0] == eot
    path = export_gguf(import_hf(tmp_path / "gpt2", tmp_path / "lmlab"), tmp_path / "bos.gguf").path
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"]) == (True, False)

    file = tmp_path / "lmlab" / "hf_tokenizer" / "tokenizer.json"
    for template, added in (("$A <|endoftext|>", (False, True)),
                            ("<|endoftext|> $A <|endoftext|> <|endoftext|>", None)):
        tok = HFTokenizer.from_file(str(file))
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<|endoftext|>", eot)])
        tok.save(str(file))
        if added is None:
            with pytest.raises(ValueError, match="llama.cpp can only add BOS before and EOS after a text"):
                export_gguf(tmp_path / "lmlab", tmp_path / "odd.gguf")
            continue
        fields = gguf.GGUFReader(export_gguf(tmp_path / "lmlab", tmp_path / "eos.gguf").path).fields
        assert (fields["tokenizer.ggml.add_bos_token"].contents(), fields["tokenizer.ggml.add_eos_token"].contents()) \
            == added
    assert not (tmp_path / "odd.gguf").exists()
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    assert llm.tokenize(text.encode()) == fast(text).input_ids
