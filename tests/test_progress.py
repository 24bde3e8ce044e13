"""What a run tells whoever watches its directory: samples.jsonl (generations at fixed prompts every N steps,
equal to generating from the weights of that step) and phase.json (what it is doing)."""

import json
import shutil

import pytest
from safetensors.torch import load_model

import lmlab
import lmlab.train.progress as progress
import lmlab.train.recipes as recipes
from lmlab.data import prepare_texts
from lmlab.models import fast, generate
from lmlab.train import TrainConfig, resume_run, train, train_from_sources
from lmlab.train.demo_corpus import demo_corpus


@pytest.fixture(scope="module")
def tok_ds(tmp_path_factory):
    text = demo_corpus(n_stories=60, seed=3)
    tok = lmlab.Tokenizer.train([text], kind="bpe", vocab_size=300)
    return tok, prepare_texts([text], tok, tmp_path_factory.mktemp("ds"), seq_len=32)


def config(**kw):
    return TrainConfig(**{**dict(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, eval_every=3,
                                 eval_batches=1, save_every=3, seed=5, sample_prompts=["", "Once"], sample_tokens=6),
                          **kw})


def samples(out):
    return [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def model_cfg(tok):
    return lmlab.ModelConfig.preset("gpt2-tiny", vocab_size=len(tok), block_size=32, dropout=0.0)


def test_samples_are_the_generations_of_the_weights_at_their_step(tmp_path, tok_ds):
    tok, ds = tok_ds
    train(model_cfg(tok), tok, ds, config(), tmp_path / "run")
    lines = samples(tmp_path / "run")
    assert [x["step"] for x in lines] == [3, 6]  # at each evaluation, the last step included
    assert [[s["prompt"] for s in x["samples"]] for x in lines] == [["", "Once"]] * 2
    # the text of step N is what the checkpoint of step N generates
    for step in (3, 6):
        weights = tmp_path / "run" / "checkpoints" / f"step-{step}"
        model = lmlab.Transformer(model_cfg(tok))
        load_model(model, str(weights / "model.safetensors"))
        fast.for_training(model).eval()  # as the trainer's model on a CPU
        expected = [generate(model, tok, p, max_new_tokens=6, temperature=0.8, top_k=40, seed=5) for p in ("", "Once")]
        assert [s["text"] for s in lines[[3, 6].index(step)]["samples"]] == expected
    assert json.loads((tmp_path / "run" / "phase.json").read_text())["phase"] == "saving"  # final/ last


def test_sample_every_n_steps_never_and_trimmed_on_resume(tmp_path, tok_ds):
    tok, ds = tok_ds
    train(model_cfg(tok), tok, ds, config(sample_every=2, max_steps=4), tmp_path / "every")
    assert [x["step"] for x in samples(tmp_path / "every")] == [2, 4]
    train(model_cfg(tok), tok, ds, config(sample_every=0), tmp_path / "never")
    assert not (tmp_path / "never" / "samples.jsonl").exists()
    # a run stopped after step 4 with a checkpoint at 3: resumed, step 4's samples are written again, once
    out = tmp_path / "resumed"
    train(model_cfg(tok), tok, ds, config(sample_every=1, max_steps=4, save_every=3, keep_last=0), out)
    (out / "final").rename(tmp_path / "final-4")
    shutil.rmtree(out / "checkpoints" / "step-4")
    resume_run(out, {"max_steps": 5})
    assert [x["step"] for x in samples(out)] == [1, 2, 3, 4, 5]


def test_train_from_sources_reports_its_phases(tmp_path, monkeypatch):
    """The phases in the order a run goes through them, as phase.json says them."""
    seen = []
    real = progress.write_phase

    def record(run_dir, phase, step=None):
        seen.append(phase)
        real(run_dir, phase, step)
    monkeypatch.setattr(progress, "write_phase", record)
    monkeypatch.setattr(recipes, "write_phase", record)
    book = tmp_path / "book.txt"
    book.write_text(demo_corpus(n_stories=20, seed=1), encoding="utf-8")
    (tmp_path / "run").mkdir()  # as the web app makes it (a folder that is not there is not made for the phase)
    train_from_sources(tmp_path / "run", config(max_steps=4, eval_every=2, save_every=0, sample_every=0),
                       sources=[book], preset="gpt2-tiny", model_fields={"block_size": 32}, tokenizer_kind="char")
    assert seen == ["tokenizer", "data", "training", "evaluating", "training", "evaluating", "training", "saving",
                    "training", "saving"]
