"""Defects an adversarial review of the Python API found (each test fails without its fix): the library kept
fewer guards than the CLI (an empty run folder, a group size int8 ignores), and guards both lacked: sizes in
config.json allocated before anything was checked, merges that overflow fp32 written as NaN models, files a run
writes before its settings were checked, user files a run replaced, a diverged run that crashed in its sampler,
symbolic links followed out of a model folder."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lmlab.interop import export_hf, import_hf
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.models.merge import merge_dirs
from lmlab.models.quant import quantize_dir
from lmlab.tokenizers import Tokenizer
from lmlab.train import Callback, TrainConfig
from lmlab.tune.chats import SHIPPED
from lmlab.tune.grpo import GRPOConfig, run_grpo
from lmlab.tune.lora import LoRAConfig, apply_lora, lora_layers, merge_lora_dir, save_adapter
from lmlab.tune.preference import PreferenceConfig, run_preference
from lmlab.tune.sft import resume_sft, run_sft

TEXT = "Once upon a time a small fox ran to the river. Жил-был кот у синего моря. " * 40


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-review")
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    save_pretrained(tmp / "base", Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=64)),
                    tok)
    torch.manual_seed(1)
    save_pretrained(tmp / "other", Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=64)),
                    tok)
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}:", "chosen": f" {w}.", "rejected": f" no {w}"}) + "\n"
                             for w in ("fox", "cat", "river", "sea", "time", "small")))
    chats = tmp / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"a {w}?"},
                                                      {"role": "assistant", "content": f"the {w}."}]}) + "\n"
                             for w in ("fox", "cat", "river", "sea", "time", "small") * 4))
    return tmp


def train_config(**kw):
    return TrainConfig(**{"max_steps": 2, "batch_size": 2, "seq_len": 32, "device": "cpu", "eval_every": 0,
                          "log_every": 1, "save_every": 0, **kw})


def test_an_empty_run_folder_is_refused_by_the_library_too(base, tmp_path, monkeypatch):
    """out="" is the current folder to Path: the library wrote a whole run among the files there."""
    monkeypatch.chdir(tmp_path)
    calls = [lambda: run_sft(base / "base", SHIPPED, "", train_config()),
             lambda: run_preference("", train_config(), model_dir=base / "base", data=base / "pairs.jsonl",
                                    cfg=PreferenceConfig("dpo")),
             lambda: run_grpo(base / "base", " ", GRPOConfig(steps=1), task="addition")]
    for call in calls:
        with pytest.raises(ValueError, match=r"the run's folder \(out\) is empty"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_sizes_in_config_json_are_checked_against_the_weights_before_anything_is_allocated(base, tmp_path):
    model = tmp_path / "model"
    save_pretrained(model, *load_pretrained(base / "base"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "n_layer": 10**7}))  # ~5e11 parameters
    with pytest.raises(ValueError, match=r"describes 533,760,[\d,]+ parameters but the weights hold "
                                         r"[\d,]+ values: they do not belong together"):
        load_pretrained(model)
    (model / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="config.json is not UTF-8 text"):  # was a UnicodeDecodeError
        load_pretrained(model)


def test_merges_that_overflow_fp32_are_refused_not_written(base, tmp_path):
    with pytest.raises(ValueError, match=r"the merge gives non-finite weights \(\d+ tensors"):
        merge_dirs([base / "other"], tmp_path / "m", "task-arithmetic", base=base / "base", weights=[1e308])
    with pytest.raises(ValueError, match="non-finite"):
        merge_dirs([base / "other"], tmp_path / "m", "task-arithmetic", base=base / "base", lam=1e39)
    model, tok = load_pretrained(base / "base")
    apply_lora(model, LoRAConfig(rank=2), tok)
    with torch.no_grad():
        for layer in lora_layers(model).values():  # B @ A x alpha / r = 3e38 x 2 x 2 per weight, past fp32
            layer.lora_B.fill_(3e38)
            layer.lora_A.fill_(1.0)
    save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    with pytest.raises(ValueError, match=r"merging .*adapter gives non-finite weights"):
        merge_lora_dir(base / "base", tmp_path / "adapter", tmp_path / "m")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308}))
    with pytest.raises(ValueError, match=r"^LoRA alpha \(1e\+308\) must be at most 1e\+06$"):  # before it merges
        merge_lora_dir(base / "base", tmp_path / "adapter", tmp_path / "m")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": 5}))
    with pytest.raises(ValueError, match="target_modules must be a list of module names, not 5"):  # a TypeError
        merge_lora_dir(base / "base", tmp_path / "adapter", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_settings_the_trainer_refuses_are_refused_before_a_run_writes_anything(base, tmp_path):
    """run_sft and run_preference wrote their data copy (and the chat template) first: the failed run's folder
    then refused a retry (it holds data.jsonl) and a resume (no checkpoint)."""
    too_long = train_config(seq_len=1000)
    with pytest.raises(ValueError, match=r"seq_len \(1000\) exceeds the model's block_size \(\d+\)"):
        run_sft(base / "base", SHIPPED, tmp_path / "sft", too_long)
    with pytest.raises(ValueError, match=r"seq_len \(1000\) exceeds"):
        run_preference(tmp_path / "dpo", too_long, model_dir=base / "base", data=base / "pairs.jsonl",
                       cfg=PreferenceConfig("dpo"))
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()


@pytest.mark.parametrize("name", ["resumes.jsonl", "samples.jsonl", "drift.json", "adapter"])
def test_a_run_does_not_replace_a_users_file_of_a_name_it_writes(base, tmp_path, name):
    out = tmp_path / "run"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text("mine")
    with pytest.raises(ValueError, match=f"holds {name}, which a new run would overwrite"):
        run_sft(base / "base", SHIPPED, out, train_config(), lora=LoRAConfig(rank=2))
    assert (out / name).read_text() == "mine"


def test_a_diverged_run_stops_with_a_one_line_error_and_keeps_its_last_checkpoint(base, tmp_path):
    """At --lr 1e30 the weights became inf and the sampler crashed (RuntimeError: probability tensor contains
    inf or nan); without samples, the non-finite weights were saved as a checkpoint over the last good one."""
    with pytest.raises(ValueError, match=r"^training diverged: its weights are no longer finite at step \d+; no "
                                         r"checkpoint had been written\. Start a new run \(in another folder\)"):
        run_sft(base / "base", base / "chats.jsonl", tmp_path / "lr", train_config(
            max_steps=6, lr=1e30, warmup_steps=0, sample_every=1, sample_prompts=["Hi"]), echo=lambda *_: None)

    class Diverge(Callback):  # what a too-high learning rate does, at a known step
        def on_step(self, trainer, metrics):
            if trainer.step == 3:
                with torch.no_grad():
                    next(p for p in trainer.model.parameters() if p.requires_grad).fill_(math.inf)

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^training diverged: its weights are no longer finite at step 3; its "
                                         r"last checkpoint, step-2, is kept"):
        run_sft(base / "base", base / "chats.jsonl", out, train_config(max_steps=6, save_every=1),
                callbacks=[Diverge()], echo=lambda *_: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    weights = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_a_loss_that_is_not_finite_before_any_update_does_not_blame_the_learning_rate(base, tmp_path):
    """A new model's --init-std 1e30 (or a distillation --temperature of 1e30) gave a NaN loss at step 1, from the
    starting weights, and the message said to lower --lr, which had not acted yet."""
    tok = Tokenizer.load(base / "base" / "tokenizer.json")
    torch.manual_seed(0)
    start = save_pretrained(tmp_path / "start", Transformer(ModelConfig.preset(
        "gpt2-tiny", vocab_size=len(tok), block_size=64, init_std=1e30)), tok)
    with pytest.raises(ValueError) as refused:
        run_sft(start, base / "chats.jsonl", tmp_path / "run", train_config(), echo=lambda *_: None)
    assert str(refused.value) == ("training diverged: the loss is nan at step 1, before any update, so not through the "
                                  "learning rate; no checkpoint had been written. Check what sets the starting weights "
                                  "or scales the loss (a new model's --init-std, say)")


@pytest.mark.parametrize("settings, message", [
    (dict(loss="kto", desirable_weight=math.nan), "desirable_weight must be a positive finite number"),
    (dict(loss="kto", undesirable_weight=-5.0), "undesirable_weight must be a positive finite number"),
    (dict(loss="dpo", beta="0.1"), "beta must be a number, not '0.1'"),
])
def test_preference_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        PreferenceConfig(**settings)


def test_quantize_keeps_the_cli_guards_and_does_not_follow_links(base, tmp_path):
    with pytest.raises(ValueError, match="--group-size is for int4; int8 has one scale per output row"):
        quantize_dir(base / "base", tmp_path / "q", 8, 64)  # wrote an int8 model, group size dropped
    model = tmp_path / "model"
    save_pretrained(model, *load_pretrained(base / "base"))
    (tmp_path / "secret.txt").write_text("outside the model folder")
    for name in ("generation.json", "chat_template.jinja"):
        (model / name).symlink_to(tmp_path / "secret.txt")
    quantize_dir(model, tmp_path / "q", 8)
    merge_dirs([model, copy.copy(base / "other")], tmp_path / "m", "linear")
    for out in (tmp_path / "q", tmp_path / "m"):
        assert not (out / "generation.json").exists() and not (out / "chat_template.jinja").exists()


def test_one_calibration_path_as_a_string_is_that_book(base, tmp_path):
    """calibration="book.txt" is the book, not its characters read as paths: the same model as [book]."""
    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    quantize_dir(base / "base", tmp_path / "one", 4, 32, method="gptq", calibration=str(book), calibration_tokens=512)
    quantize_dir(base / "base", tmp_path / "list", 4, 32, method="gptq", calibration=[str(book)],
                 calibration_tokens=512)
    one, listed = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "list"))
    assert one.keys() == listed.keys() and all(torch.equal(one[k], listed[k]) for k in one)


def test_a_reply_to_bad_messages_and_a_string_of_prompts_are_one_line_errors(base):
    from lmlab.tune.chat import add_chat_tokens, generate_reply
    model, tok, _ = add_chat_tokens(*load_pretrained(base / "base"))
    with pytest.raises(ValueError, match="message 1 needs a role"):  # KeyError: 'bot'
        generate_reply(model, tok, [{"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match="message 2 needs a role"):  # TypeError deep in the renderer
        generate_reply(model, tok, [{"role": "user", "content": "hi"}, {"role": "user", "content": 5}])
    with pytest.raises(ValueError, match="prompts must be a list of prompts, not one string"):  # 5 prompts: h e l l o
        run_grpo(base / "base", base / "grpo", GRPOConfig(steps=1), reward="length", prompts="hello")


def test_a_resume_and_an_import_check_sizes_before_allocating(base, tmp_path):
    out = tmp_path / "run"
    run_sft(base / "base", base / "chats.jsonl", out, train_config(save_every=1), echo=lambda *_: None)
    config = json.loads((out / "config.json").read_text())
    config["model"]["n_layer"] = 10**7
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describes 533,76"):
        resume_sft(out)
    pytest.importorskip("transformers")
    hf = export_hf(base / "base", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**7}))
    with pytest.raises(ValueError, match="describes 533,76"):
        import_hf(hf, tmp_path / "back")


def test_a_chat_model_stays_one_through_preference_and_grpo_runs(base, tmp_path):
    """DPO and GRPO from a chat model wrote final/ without the chat template (the Chat view then no longer offered
    the model); SFT on prompt-completion data from a plain model wrote one although it has no chat tokens."""
    from lmlab.tune.chat import add_chat_tokens, write_template
    chatty = tmp_path / "chatty"
    save_pretrained(chatty, *add_chat_tokens(*load_pretrained(base / "base"))[:2])
    write_template(chatty)
    run_preference(tmp_path / "dpo", train_config(), model_dir=chatty, data=base / "pairs.jsonl",
                   cfg=PreferenceConfig("dpo"), say=lambda *_: None)
    run_grpo(chatty, tmp_path / "grpo", GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4,
                                                   eval_prompts=2, device="cpu"), task="addition", log=None)
    template = (chatty / "chat_template.jinja").read_text()
    for run in ("dpo", "grpo"):
        assert (tmp_path / run / "final" / "chat_template.jinja").read_text() == template
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"Say {w}:", "completion": f" {w}."}) + "\n"
                             for w in ("fox", "cat", "sea", "river") * 3))
    run_sft(base / "base", plain, tmp_path / "sft", train_config(), echo=lambda *_: None)
    assert not (tmp_path / "sft" / "final" / "chat_template.jinja").exists()


@pytest.mark.parametrize("settings, message", [
    (dict(method="slerp", t="0.5"), "--t must be a number, not '0.5'"),
    (dict(method="ties", base=True, density="0.5"), "--density must be a number, not '0.5'"),
    (dict(method="linear", weights="12"), "--weights must be a list of numbers, not '12'"),
])
def test_merge_settings_of_the_wrong_type_are_one_line_errors(settings, message):
    from lmlab.models.merge import check_parameters  # a TypeError from a comparison, or '12' read as 2 weights
    method, base = settings.pop("method"), settings.pop("base", None)
    with pytest.raises(ValueError, match=message):
        check_parameters(method, 2, base, settings.pop("weights", None), **settings)


def test_what_the_review_of_these_fixes_found(base, tmp_path):
    """A reviewer of the fixes above found: numpy scalars refused as merge or preference settings; `import hf
    --force` over a quantized model leaving its quantization.json (the imported weights then unreadable); a train
    resume still allocating what config.json says before any check; a failed start's phase.json blocking the
    retry."""
    import numpy as np

    from lmlab.models.merge import check_parameters
    from lmlab.models.quant import quantize_dir
    from lmlab.train.recipes import resume_run, train_from_sources
    assert check_parameters("slerp", 2, None, None, t=np.float32(0.3))["t"] == pytest.approx(0.3)
    assert check_parameters("linear", 2, None, [np.int64(1), np.float32(2)])  # (slerp refuses weights)
    assert PreferenceConfig("dpo", beta=np.float64(0.2)).beta == 0.2
    pytest.importorskip("transformers")
    hf = export_hf(base / "base", tmp_path / "hf")
    quantize_dir(base / "base", tmp_path / "q", 8)
    import_hf(hf, tmp_path / "q", overwrite=True)
    assert not (tmp_path / "q" / "quantization.json").exists() and load_pretrained(tmp_path / "q")
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    out = tmp_path / "run"
    out.mkdir()
    (out / "phase.json").write_text('{"phase": "data"}')  # what a start that failed in its checks left
    train_from_sources(out, TrainConfig(max_steps=2, batch_size=2, seq_len=16, device="cpu", save_every=1),
                       sources=[book], preset="llama-tiny", model_fields={"block_size": 16}, vocab_size=300)
    config = json.loads((out / "config.json").read_text())
    config["model"]["n_layer"] = 10**7
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describes 533,76"):
        resume_run(out)
