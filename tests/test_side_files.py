"""A run that starts from a model directory (`lmlab train --init`, `tune sft`, `tune dpo`, `tune grpo`) keeps that
model's side files in final/: its generation defaults, its chat template and hf_tokenizer/ where it has one. They were
dropped: a chat model trained further lost its template (and `lmlab export` its tokenizer_config.json's
chat_template)."""

import json

import pytest
import torch

from lmlab.models import ModelConfig, Transformer
from lmlab.models.generation import GenerationConfig
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.tokenizers.chat_format import TEMPLATE
from lmlab.train import Callback, TrainConfig
from lmlab.train.recipes import INIT_FILES, CarrySideFiles, resume_run, train_from_sources
from lmlab.tune import preference as P
from lmlab.tune.chat import with_chat_tokens
from lmlab.tune.grpo import GRPOConfig, run_grpo
from lmlab.tune.sft import resume_sft, run_sft

TEXT = ("the cat sat on the mat. the dog sat on the log. кот сидел на ковре, а пёс лежал у дома. "
        "a bird flew over the tree and sang a song. ") * 20
HF_FILES = {"tokenizer.json": '{"its": "own"}', "tokenizer_config.json": '{"eos_token": "<|endoftext|>"}',
            "generation_config.json": '{"eos_token_id": [0, 1]}'}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A model directory with every side file: generation.json, lmlab's chat template, hf_tokenizer/."""
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=32))
    path = save_pretrained(tmp_path_factory.mktemp("m") / "start", model, tok,
                           generation=GenerationConfig(max_new_tokens=7, temperature=0.3))
    (path / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    (path / "hf_tokenizer").mkdir()
    for name, text in HF_FILES.items():
        (path / "hf_tokenizer" / name).write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def assert_carried(start, final):
    for name in ("generation.json", "chat_template.jinja", *(f"hf_tokenizer/{n}" for n in HF_FILES)):
        assert (final / name).read_bytes() == (start / name).read_bytes(), name
    model, _ = load_pretrained(final)  # still a model directory that loads
    assert model.config.vocab_size == load_pretrained(start)[0].config.vocab_size


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, metrics):
        trainer.should_stop = trainer.step == self.step


def config(**kw):
    return TrainConfig(**{**dict(max_steps=4, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1, log_every=1,
                                 eval_every=0, save_every=2, seed=3, device="cpu"), **kw})


def test_train_init_keeps_the_starting_model_s_side_files_through_a_resume(tmp_path, start, book):
    train_from_sources(tmp_path / "whole", config(), sources=[book], init=start)
    assert_carried(start, tmp_path / "whole" / "final")
    # stopped, the starting model moved away, resumed: the run's own copy (RUN/init_files) is what final/ gets
    copy = copied(start, tmp_path / "moved")
    train_from_sources(tmp_path / "cut", config(), sources=[book], init=copy, callbacks=[StopAt(2)])
    assert (tmp_path / "cut" / INIT_FILES / "chat_template.jinja").is_file()
    remove(copy)
    assert resume_run(tmp_path / "cut").steps == 4
    assert_carried(start, tmp_path / "cut" / "final")


def copied(start, folder):
    copy = folder / "start"
    copy.mkdir(parents=True)
    for f in start.rglob("*"):
        target = copy / f.relative_to(start)
        target.mkdir(exist_ok=True) if f.is_dir() else target.write_bytes(f.read_bytes())
    return copy


def remove(folder):
    for f in sorted(folder.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    folder.rmdir()


def test_sft_keeps_the_starting_model_s_side_files_through_a_resume(tmp_path, start):
    """tune sft dropped them too: an imported model fine-tuned on prompt-completion pairs (its vocabulary
    unchanged) lost hf_tokenizer/ and its generation defaults."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in [
        ("the cat", " sat on the mat."), ("кот сидел", " на ковре."), ("the dog", " sat on the log."),
        ("a bird", " flew over the tree.")] * 3), encoding="utf-8")
    copy = copied(start, tmp_path / "moved")
    run_sft(copy, pairs, tmp_path / "sft", config(seq_len=None), callbacks=[StopAt(2)], echo=lambda s: None)
    remove(copy)  # the resume needs nothing but the run's folder
    assert resume_sft(tmp_path / "sft", echo=lambda s: None).steps == 4
    assert_carried(start, tmp_path / "sft" / "final")


def test_sft_on_conversations_keeps_generation_defaults_but_not_a_tokenizer_that_no_longer_matches(tmp_path, start):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for q, a in [("the cat?", "sat."), ("кот?", "на ковре."), ("a bird?", "sang.")] * 3),
                     encoding="utf-8")
    run_sft(start, chats, tmp_path / "sft", config(max_steps=2, save_every=0, seq_len=None), echo=lambda s: None)
    final = tmp_path / "sft" / "final"
    assert (final / "generation.json").read_bytes() == (start / "generation.json").read_bytes()
    assert (final / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE
    assert not (final / "hf_tokenizer").exists()  # the chat tokens were added: 300 tokens grew


def test_a_run_from_scratch_has_no_init_files_and_a_refused_start_leaves_none(tmp_path, start, book):
    train_from_sources(tmp_path / "fresh", config(max_steps=2, save_every=0), sources=[book], preset="llama-tiny")
    assert not (tmp_path / "fresh" / INIT_FILES).exists()
    assert not (tmp_path / "fresh" / "final" / "chat_template.jinja").exists()
    (tmp_path / "app").mkdir()  # a folder made before the run (the web app's): the copy goes with a failed start
    with pytest.raises(ValueError, match="counts evaluations"):  # the Trainer's own check, after the copy
        train_from_sources(tmp_path / "app", config(early_stopping_patience=2), sources=[book], init=start)
    assert not (tmp_path / "app" / INIT_FILES).exists()


def test_hf_tokenizer_is_left_out_once_the_tokenizer_gained_tokens(tmp_path, start):
    """A tokenizer that grew (LoRA's chat tokens) no longer matches the imported one: its files would be wrong."""
    grown, added = with_chat_tokens(Tokenizer.load(start / "tokenizer.json"))
    assert added
    folder = tmp_path / "final"
    folder.mkdir()
    grown.save(folder / "tokenizer.json")
    CarrySideFiles(start).on_final(None, folder)
    assert not (folder / "hf_tokenizer").exists()
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE
    (folder / "generation.json").write_text('{"written": "by a later hook"}')
    CarrySideFiles(start).on_final(None, folder)  # what is there already stays
    assert json.loads((folder / "generation.json").read_text()) == {"written": "by a later hook"}


def test_a_preference_run_keeps_the_starting_model_s_side_files(tmp_path, start):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in [
        ("the cat", " sat on the mat.", " ran away"), ("кот сидел", " на ковре.", " у дома")]), encoding="utf-8")
    P.run_preference(tmp_path / "dpo", config(max_steps=2, save_every=0, seq_len=None), model_dir=start,
                     data=pairs, cfg=P.PreferenceConfig("dpo"), say=lambda s: None)
    assert_carried(start, tmp_path / "dpo" / "final")


def test_a_grpo_run_keeps_the_starting_model_s_side_files(tmp_path, start):
    run_grpo(start, tmp_path / "grpo", GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4),
             reward="repetition", prompts=["the cat", "кот"], log=None)
    assert_carried(start, tmp_path / "grpo" / "final")
