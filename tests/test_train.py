"""The trainer: exact resume, the schedule, learning below the unigram baseline, checkpoints, hooks."""

import json
import math

import pytest
import torch

import lmlab
from lmlab.data import prepare_texts
from lmlab.train import Callback, TrainConfig, latest_checkpoint, lr_at, train

TEXT = ("жили-были дед да баба. дед ловил рыбу, баба пряла пряжу. " * 300
        + "the old man caught fish and the old woman spun yarn. " * 300)


@pytest.fixture(scope="module")
def tok():
    return lmlab.Tokenizer.train([TEXT], kind="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def ds(tok, tmp_path_factory):
    return prepare_texts([TEXT], tok, tmp_path_factory.mktemp("ds"), seq_len=32)


def model_cfg(tok, dropout=0.1):
    return lmlab.ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=32, dropout=dropout)


class Record(Callback):
    def __init__(self, stop_at=None):
        self.losses, self.lrs, self.stop_at, self.evals, self.checkpoints = [], [], stop_at, [], []

    def on_step(self, trainer, metrics):
        self.losses.append(metrics["loss"])
        self.lrs.append(metrics["lr"])
        if trainer.step == self.stop_at:
            trainer.should_stop = True

    def on_eval(self, trainer, metrics):
        self.evals.append(metrics["val_loss"])

    def on_checkpoint(self, trainer, path):
        self.checkpoints.append(path.name)


def base(**kw):
    return TrainConfig(**{**dict(max_steps=16, batch_size=4, warmup_steps=3, lr=3e-3, log_every=1,
                                 eval_every=5, eval_batches=2, save_every=0, seed=7), **kw})


def test_resume_continues_exactly(tmp_path, tok, ds):
    """N steps, stop, resume, N more == 2N uninterrupted: losses, learning rates and data order
    (dropout on, gradient accumulation on)."""
    cfg = base(grad_accum_steps=2)
    full = Record()
    train(model_cfg(tok), tok, ds, cfg, tmp_path / "full", [full])
    first, second = Record(stop_at=8), Record()
    r = train(model_cfg(tok), tok, ds, cfg, tmp_path / "split", [first])
    assert r.stop_reason == "stopped" and latest_checkpoint(tmp_path / "split").name == "step-8"
    train(model_cfg(tok), tok, ds, cfg, tmp_path / "split", [second], resume=True)
    assert len(full.losses) == 16 and len(first.losses) + len(second.losses) == 16
    torch.testing.assert_close(first.losses + second.losses, full.losses, atol=1e-6, rtol=0)
    assert first.lrs + second.lrs == full.lrs
    a, _ = lmlab.load(tmp_path / "full" / "final")
    b, _ = lmlab.load(tmp_path / "split" / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # nothing logged twice


def test_schedule_moves_every_optimizer_step(tmp_path, tok, ds):
    cfg = base(max_steps=20, warmup_steps=4, grad_accum_steps=3, min_lr=3e-4)
    rec = Record()
    train(model_cfg(tok), tok, ds, cfg, tmp_path / "run", [rec])
    assert rec.lrs == [lr_at(s, cfg, 20) for s in range(20)]
    assert len(set(rec.lrs)) == 20  # a new value at every optimizer step
    assert rec.lrs[:4] == pytest.approx([3e-3 * k / 4 for k in (1, 2, 3, 4)])
    assert rec.lrs[4] == pytest.approx(3e-4 + 0.5 * 2.7e-3 * (1 + math.cos(math.pi / 16)))
    assert rec.lrs[-1] == pytest.approx(3e-4)
    linear = base(schedule="linear", warmup_steps=0, min_lr=0.0)
    assert [lr_at(s, linear, 10) for s in (0, 4, 9)] == pytest.approx([2.7e-3, 1.5e-3, 0.0])


def test_val_loss_falls_below_the_unigram_baseline(tmp_path, tok, ds):
    rec = Record()
    r = train(model_cfg(tok, dropout=0.0), tok, ds, base(max_steps=60, batch_size=8, eval_every=20),
              tmp_path / "run", [rec])
    baseline = ds.unigram_entropy()
    assert rec.evals[-1] < 0.7 * baseline, (rec.evals, baseline)
    assert r.best_val_loss == min(rec.evals)
    training = json.loads((tmp_path / "run" / "final" / "training.json").read_text())
    assert training["steps"] == 60 and training["last_eval"]["val_loss"] == rec.evals[-1]


def test_checkpoints_keep_last_and_early_stopping(tmp_path, tok, ds):
    rec = Record()
    train(model_cfg(tok), tok, ds, base(max_steps=12, save_every=3, keep_last=2), tmp_path / "run", [rec])
    assert rec.checkpoints == ["step-3", "step-6", "step-9", "step-12"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-12", "step-9"]
    rec = Record()
    r = train(model_cfg(tok), tok, ds, base(max_steps=200, lr=1.0, warmup_steps=0, eval_every=2,
                                            early_stopping_patience=2), tmp_path / "early", [rec])
    assert r.stop_reason == "early_stopping" and r.steps < 200


def test_a_crash_leaves_the_last_checkpoint_usable(tmp_path, tok, ds):
    class Boom(Callback):
        def on_step(self, trainer, metrics):
            if trainer.step == 7:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(model_cfg(tok), tok, ds, base(save_every=3), tmp_path / "run", [Boom()])
    assert latest_checkpoint(tmp_path / "run").name == "step-6"
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))
    r = train(model_cfg(tok), tok, ds, base(save_every=3), tmp_path / "run", resume=True)
    assert r.steps == 16 and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_bad_configs():
    with pytest.raises(ValueError, match="stop condition"):
        TrainConfig()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(max_steps=1, batch_size=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(max_steps=1, schedule="step")


def test_memory_budget_is_checked(tmp_path, tok, ds):
    with pytest.raises(ValueError, match="GiB"):
        train(lmlab.ModelConfig.preset("gpt2-large", vocab_size=len(tok), block_size=32), tok, ds,
              base(batch_size=200000, max_steps=1), tmp_path / "run")


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, tok, ds):
    class CtrlC(Callback):
        def on_step(self, trainer, metrics):
            if trainer.step == 5:
                raise KeyboardInterrupt

    r = train(model_cfg(tok), tok, ds, base(), tmp_path / "run", [CtrlC()])
    assert r.stop_reason == "interrupted" and r.steps == 5
    assert latest_checkpoint(tmp_path / "run").name == "step-5"
    assert not (tmp_path / "run" / "final").exists()
    assert train(model_cfg(tok), tok, ds, base(), tmp_path / "run", resume=True).steps == 16
