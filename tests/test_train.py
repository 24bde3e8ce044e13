"""The trainer and `lmlab train/eval/demo`: exact resume (also after Ctrl-C and crashes), the schedule,
learning below the unigram baseline, checkpoints, metrics, hooks, early stopping, bad input."""

import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.data import prepare_texts
from lmlab.train import (
    Callback,
    Objective,
    TrainConfig,
    Trainer,
    checkpoints,
    latest_checkpoint,
    lr_at,
    resume_run,
    train,
)
from lmlab.train.demo_corpus import demo_corpus
from lmlab.train.trainer import read_run_config


@pytest.fixture(scope="module")
def text():
    return demo_corpus(n_stories=300, seed=3)


@pytest.fixture(scope="module")
def tok(text):
    return lmlab.Tokenizer.train([text], kind="bpe", vocab_size=384)


@pytest.fixture(scope="module")
def ds(text, tok, tmp_path_factory):
    return prepare_texts([text], tok, tmp_path_factory.mktemp("ds"), seq_len=32)


def model_cfg(tok, dropout=0.1):
    return lmlab.ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=32, dropout=dropout)


class Record(Callback):
    def __init__(self, stop_at=None):
        self.steps, self.losses, self.lrs, self.evals, self.checkpoints = [], [], [], [], []
        self.stop_at, self.ended = stop_at, None

    def on_step(self, trainer, metrics):
        self.steps.append(metrics["step"])
        self.losses.append(metrics["loss"])
        self.lrs.append(metrics["lr"])
        if trainer.step == self.stop_at:
            trainer.should_stop = True

    def on_eval(self, trainer, metrics):
        self.evals.append(metrics["val_loss"])
        metrics["lab_probe"] = len(self.evals)  # a lab's own metric, logged with the eval line

    def on_checkpoint(self, trainer, path):
        self.checkpoints.append(path.name)

    def on_train_end(self, trainer, result):
        self.ended = result.stop_reason


def base(**kw):
    # dropout on and 2 micro-steps per optimizer step: resume must restore the dropout RNG too
    return TrainConfig(**{**dict(max_steps=16, batch_size=4, grad_accum_steps=2, warmup_steps=3, lr=3e-3,
                                 log_every=1, eval_every=5, eval_batches=2, save_every=0, seed=7), **kw})


@pytest.fixture(scope="module")
def reference(tok, ds, tmp_path_factory):
    """16 uninterrupted steps: what every interrupted-and-resumed run below must reproduce."""
    rec = Record()
    out = tmp_path_factory.mktemp("reference")
    train(model_cfg(tok), tok, ds, base(), out, [rec])
    return rec, out


def same_weights(a_dir, b_dir):
    a, _ = lmlab.load(a_dir)
    b, _ = lmlab.load(b_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_metrics_are_never_written_through_a_planted_link(tmp_path, tok, ds):
    """metrics.jsonl replaced by a link while the run trains (the web app serves that file): the trainer appended
    its lines to the file the link names, outside the run. Now the run stops with a one-line error."""
    outside = tmp_path / "outside.jsonl"
    outside.write_text("SECRET\n")
    out = tmp_path / "run"

    class Plant(Callback):
        def on_step(self, trainer, metrics):
            if trainer.step == 2:
                (out / "metrics.jsonl").unlink()
                (out / "metrics.jsonl").symlink_to(outside)

    with pytest.raises(ValueError) as err:
        train(model_cfg(tok), tok, ds, base(max_steps=4, eval_every=0), out, [Plant()])
    assert str(err.value) == f"{out / 'metrics.jsonl'} is a symbolic link, not the run's own file; remove it"
    assert outside.read_text() == "SECRET\n"


def test_resume_continues_exactly(tmp_path, tok, ds, reference):
    """8 steps, stop, resume, 8 more == 16 uninterrupted: losses, learning rates, data order, weights."""
    full, full_dir = reference
    first, second = Record(stop_at=8), Record()
    r = train(model_cfg(tok), tok, ds, base(), tmp_path, [first])
    assert r.stop_reason == "stopped" and first.ended == "stopped"
    assert latest_checkpoint(tmp_path).name == "step-8"
    train(model_cfg(tok), tok, ds, base(), tmp_path, [second], resume=True)
    assert first.steps + second.steps == list(range(1, 17)) == full.steps
    torch.testing.assert_close(first.losses + second.losses, full.losses, atol=1e-6, rtol=0)
    assert first.lrs + second.lrs == full.lrs
    same_weights(full_dir / "final", tmp_path / "final")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # the lines after the checkpoint were not logged twice
    # a finished run resumed does nothing more
    assert train(model_cfg(tok), tok, ds, base(), tmp_path, resume=True).steps == 16


class NextToken(Objective):
    """Language modelling as an objective: the same numbers as the built-in step, with a metric and a state."""

    def __init__(self):
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        x, y = batch
        loss = model(x, y).loss
        return loss, {"double_loss": 2 * loss, "calls": torch.tensor(float(self.calls)),
                      "calls_total": torch.tensor(float(self.calls))}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_an_objective_steps_as_the_loop_does_logs_its_metrics_and_resumes_with_its_state(tmp_path, tok, ds,
                                                                                        reference):
    full, full_dir = reference
    first, second = Record(stop_at=8), Record()
    train(model_cfg(tok), tok, ds, base(), tmp_path, [first], objective=NextToken())
    train(model_cfg(tok), tok, ds, base(), tmp_path, [second], resume=True, objective=NextToken())
    torch.testing.assert_close(first.losses + second.losses, full.losses, atol=1e-6, rtol=0)
    same_weights(full_dir / "final", tmp_path / "final")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["double_loss"] for m in lines] == pytest.approx([2 * m["loss"] for m in lines], abs=1e-6)
    # two micro-batches a step: the mean of the calls' numbers; the count resumed from the checkpoint's state
    assert [m["calls"] for m in lines] == [2 * m["step"] - 0.5 for m in lines]
    # a running count (a name ending in _total) is its last micro-batch's value, not a mean
    assert [m["calls_total"] for m in lines] == [2 * m["step"] for m in lines]


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path, tok, ds, reference):
    full, full_dir = reference

    class CtrlC(Callback):
        def on_step(self, trainer, metrics):
            if trainer.step == 5:
                os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends

    first, second = Record(), Record()
    r = train(model_cfg(tok), tok, ds, base(), tmp_path, [CtrlC(), first])
    assert r.stop_reason == "interrupted" and r.steps == 5
    assert latest_checkpoint(tmp_path).name == "step-5" and not (tmp_path / "final").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    train(model_cfg(tok), tok, ds, base(), tmp_path, [second], resume=True)
    torch.testing.assert_close(first.losses + second.losses, full.losses, atol=1e-6, rtol=0)
    same_weights(full_dir / "final", tmp_path / "final")


def test_a_crash_leaves_the_last_checkpoint_usable(tmp_path, tok, ds, reference):
    full, _ = reference

    class Boom(Callback):
        def on_step(self, trainer, metrics):
            if trainer.step == 7:
                raise RuntimeError("boom")

    first, second = Record(), Record()
    with pytest.raises(RuntimeError, match="boom"):
        train(model_cfg(tok), tok, ds, base(save_every=3), tmp_path, [first, Boom()])
    assert latest_checkpoint(tmp_path).name == "step-6"
    assert not list((tmp_path / "checkpoints").glob(".*"))
    train(model_cfg(tok), tok, ds, base(save_every=3), tmp_path, [second], resume=True)
    torch.testing.assert_close(first.losses[:6] + second.losses, full.losses, atol=1e-6, rtol=0)


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path, tok, ds):
    """The library's train() guards a run folder as `lmlab train` does: a new run there would prune the old
    run's checkpoints with its own, and a later resume could load the old run's weights as the new final/."""
    train(model_cfg(tok), tok, ds, base(max_steps=4, save_every=2), tmp_path / "a")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "checkpoints").iterdir()}
    with pytest.raises(ValueError, match="already holds a run"):
        train(model_cfg(tok), tok, ds, base(max_steps=2, seed=8), tmp_path / "a")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "checkpoints").iterdir()} == before
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["seed"] == 7
    (tmp_path / "b" / "final").mkdir(parents=True)  # a finished run whose checkpoints were deleted
    with pytest.raises(ValueError, match="already holds a run"):
        train(model_cfg(tok), tok, ds, base(max_steps=2), tmp_path / "b")


def test_a_failed_checkpoint_write_leaves_nothing_half_written(tmp_path, tok, ds, monkeypatch):
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        train(model_cfg(tok), tok, ds, base(max_steps=8, save_every=3), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3"]  # no step-6, no temp
    monkeypatch.setattr(torch, "save", real_save)
    assert train(model_cfg(tok), tok, ds, base(max_steps=8, save_every=3), tmp_path, resume=True).steps == 8


def test_schedule_moves_every_optimizer_step(tmp_path, tok, ds):
    cfg = base(max_steps=12, warmup_steps=4, grad_accum_steps=3, min_lr=3e-4)
    rec = Record()
    train(model_cfg(tok), tok, ds, cfg, tmp_path, [rec])
    assert rec.lrs == [lr_at(s, cfg, 12) for s in range(12)]
    assert len(set(rec.lrs)) == 12  # a new value at every optimizer step, not per micro-step or epoch
    assert rec.lrs[:4] == pytest.approx([3e-3 * k / 4 for k in (1, 2, 3, 4)])
    assert rec.lrs[4] == pytest.approx(3e-4 + 0.5 * 2.7e-3 * (1 + math.cos(math.pi / 8)))
    assert rec.lrs[-1] == pytest.approx(3e-4)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["tokens"] for m in lines] == [s * 4 * 32 * 3 for s in range(1, 13)]  # 3 micro-batches a step


def test_schedule_shapes_and_horizons():
    linear = base(schedule="linear", warmup_steps=0, min_lr=0.0)
    assert [lr_at(s, linear, 10) for s in (0, 4, 9)] == pytest.approx([2.7e-3, 1.5e-3, 0.0])
    const = base(schedule="constant", warmup_steps=2)
    assert [lr_at(s, const, 10) for s in range(4)] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3])
    cosine = base(warmup_steps=0)  # min_lr None: lr / 10
    assert lr_at(9, cosine, 10) == pytest.approx(3e-4) and lr_at(0, cosine, None) == 3e-3


def test_extending_a_finished_cosine_run_keeps_the_learning_rate_at_min_lr(tmp_path, tok, ds):
    """A finished cosine run resumed with a larger max_steps went from min_lr back to about half the peak (the
    schedule was re-planned over the new horizon). It keeps its horizon and trains on at min_lr; the resume is
    recorded in resumes.jsonl, config.json stays as the run started, and settings other than stop conditions
    (and how the run runs) are refused."""
    cfg = base(max_steps=8, grad_accum_steps=1, warmup_steps=2, min_lr=3e-4)
    first, second, third = Record(), Record(), Record()
    train(model_cfg(tok), tok, ds, cfg, tmp_path, [first])
    assert first.lrs == [lr_at(s, cfg, 8) for s in range(8)] and first.lrs[-1] == 3e-4
    original = (tmp_path / "config.json").read_bytes()
    train(model_cfg(tok), tok, ds, dataclasses.replace(cfg, max_steps=12), tmp_path, [second], resume=True)
    assert second.steps == [9, 10, 11, 12] and second.lrs == [3e-4] * 4
    with pytest.raises(ValueError, match=r"lr \(0.003 -> 0.001\), seed \(7 -> 8\) cannot change"):
        train(model_cfg(tok), tok, ds, dataclasses.replace(cfg, max_steps=14, lr=1e-3, seed=8), tmp_path, resume=True)
    resume_run(tmp_path, {"max_steps": 14}, callbacks=[third])  # the run's settings now: max_steps 12, not 8
    assert third.steps == [13, 14] and third.lrs == [3e-4] * 2
    assert (tmp_path / "config.json").read_bytes() == original
    records = [json.loads(x) for x in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert [(r["from_step"], r["changed"], r["schedule_steps"]) for r in records] == [
        (8, {"max_steps": [8, 12]}, 8), (12, {"max_steps": [12, 14]}, 8)]
    assert records[0]["note"] == "the cosine schedule keeps its horizon of 8 steps, and the learning rate stays at " \
                                 "min_lr past it"


def test_extending_a_run_whose_warm_up_outlasts_it_says_what_the_learning_rate_does(tmp_path, tok, ds):
    """A 6-step run with the default-like warm-up longer than it: extended, the note said the learning rate "stays
    at min_lr" while it went on climbing (lr_at has no decay when the warm-up is as long as the horizon)."""
    cfg = base(max_steps=6, grad_accum_steps=1, warmup_steps=10, min_lr=3e-4)
    second = Record()
    train(model_cfg(tok), tok, ds, cfg, tmp_path)
    train(model_cfg(tok), tok, ds, dataclasses.replace(cfg, max_steps=12), tmp_path, [second], resume=True)
    assert second.lrs == [lr_at(s, cfg, 6) for s in range(6, 12)] == [cfg.lr * (s + 1) / 10 for s in range(6, 10)] + [
        cfg.lr] * 2
    note = json.loads((tmp_path / "resumes.jsonl").read_text())["note"]
    assert note == ("the cosine schedule keeps its horizon of 6 steps, which the warm-up (10 steps) outlasts: the "
                    "learning rate climbs to step 10, then stays at its peak (this run never had a decay)")


def test_a_wsd_run_extended_on_resume_is_the_longer_wsd_run(tmp_path, tok, ds):
    """Warmup-stable-decay: the peak, then a (1 - sqrt) decay over the last 20% of the steps. A finished 10-step
    run extended to 20 continues from the checkpoint that ends its stable phase (step 8, kept whatever
    keep_last says) and decays at the new end: the same learning rates, losses and weights as a run planned
    for 20 steps from the start."""
    short = base(max_steps=10, grad_accum_steps=1, warmup_steps=2, schedule="wsd", min_lr=3e-4, keep_last=1)
    long = dataclasses.replace(short, max_steps=20)
    ref, first, second = Record(), Record(), Record()
    train(model_cfg(tok), tok, ds, long, tmp_path / "long", [ref])
    decay = [3e-4 + 2.7e-3 * (1 - math.sqrt(k / 4)) for k in (1, 2, 3, 4)]
    assert ref.lrs == [1.5e-3] + [3e-3] * 15 + decay and decay[-1] == 3e-4
    train(model_cfg(tok), tok, ds, short, tmp_path / "run", [first])
    assert first.lrs[8:] == [3e-4 + 2.7e-3 * (1 - math.sqrt(0.5)), 3e-4]
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-8", "step-10"]
    train(model_cfg(tok), tok, ds, long, tmp_path / "run", [second], resume=True)
    assert second.steps == list(range(9, 21)) and first.lrs[:8] + second.lrs == ref.lrs
    torch.testing.assert_close(first.losses[:8] + second.losses, ref.losses, atol=1e-6, rtol=0)
    same_weights(tmp_path / "long" / "final", tmp_path / "run" / "final")
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-16", "step-20"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # the first plan's decay steps are not in the log
    record = json.loads((tmp_path / "run" / "resumes.jsonl").read_text())
    assert (record["from_step"], record["schedule_steps"]) == (8, 20) and "stable-phase" in record["note"]


def test_learns_below_the_unigram_baseline_and_logs_well_formed_metrics(tmp_path, tok, ds):
    rec = Record()
    r = train(model_cfg(tok, dropout=0.0), tok, ds,
              base(max_steps=60, batch_size=8, grad_accum_steps=1, eval_every=20, eval_batches=4, log_every=5),
              tmp_path, [rec])
    baseline = ds.unigram_entropy()  # the loss of the best model that ignores context
    assert rec.evals[0] > rec.evals[-1] and rec.evals[-1] < 0.8 * baseline, (rec.evals, baseline)
    assert r.best_val_loss == min(rec.evals) and r.stop_reason == "max_steps" and rec.ended == "max_steps"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1] + list(range(5, 61, 5))
    for m in lines:
        assert {"step", "tokens", "elapsed_s", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(m)
        assert m["tokens"] == m["step"] * 8 * 32 and math.isfinite(m["loss"]) and m["tokens_per_s"] > 0
        assert 0 < m["mfu"] < 1 and m["grad_norm"] > 0
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in evals] == [20, 40, 60] and [m["val_loss"] for m in evals] == rec.evals
    assert [m["lab_probe"] for m in evals] == [1, 2, 3] and not any("lab_probe" in m for m in lines if m not in evals)
    for m in evals:
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
        assert m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2) / ds.bytes_per_token())
    training = json.loads((tmp_path / "final" / "training.json").read_text())
    assert training["steps"] == 60 and training["last_eval"]["val_loss"] == rec.evals[-1]
    run = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(run["train"]).max_steps == 60 and run["model"]["vocab_size"] == len(tok)
    assert TrainConfig.load(tmp_path / "config.json") == TrainConfig.from_dict(run["train"])
    # the final model directory is the trained model: same val loss when reloaded
    model, tok2 = lmlab.load(tmp_path / "final")
    with torch.no_grad():
        losses = [model(x, y).loss.item() for x, y in ds.eval_batches(8, 32, 4)]
    assert sum(losses) / len(losses) == pytest.approx(rec.evals[-1], abs=1e-5)
    assert tok2.encode("дед лиса") == tok.encode("дед лиса")


# A fixed-seed run's metrics lines as the trainer wrote them when it still read the loss back from the device
# every step (recorded from that code; timings left out). Each logged loss is its own step's loss (the mean
# over its micro-batches), not a mean since the previous line. Compared to 1e-6: another CPU's kernels may
# round differently, and a wrong step or micro-batch is off by 1e-2 or more.
BEFORE = [
    {"step": 1, "loss": 5.948378562927246, "lr": 0.001, "grad_norm": 1.096655249595642},
    {"step": 3, "loss": 5.798048973083496, "lr": 0.0030000000000000005, "grad_norm": 1.1599953174591064,
     "probe": 1.0},
    {"step": 4, "loss": 5.6642351150512695, "lr": 0.0027421729424061793, "grad_norm": 1.2191073894500732},
    {"step": 6, "loss": 5.384860992431641, "lr": 0.0012328270575938211, "grad_norm": 1.1637275218963623,
     "val_loss": 5.345484018325806},
    {"step": 8, "loss": 5.369720458984375, "lr": 0.00030000000000000003, "grad_norm": 1.0170444250106812,
     "val_loss": 5.306360721588135},
]
_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__format__")


def test_the_step_loop_reads_the_device_only_on_logged_steps(tmp_path, tok, ds, monkeypatch):
    """Reading a tensor back (.item(), float(), bool(), .tolist(), .cpu()) makes the host wait for the GPU's
    queue to drain, so the loop reads only on the steps it writes a metrics line (log_every, evaluations, a
    hook's own metric) and the logged numbers stay what they were."""
    import lmlab.train.trainer as trainer_module

    class Probe(Callback):  # a hook's metric on step 3 gets that step a line of its own
        def on_step(self, trainer, metrics):
            if trainer.step == 3:
                metrics["probe"] = 1.0

    read_at = set()  # trainer.step whenever trainer.py reads a tensor

    def watch(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename == trainer_module.__file__:
                if isinstance(frame.f_locals.get("self"), Trainer):
                    read_at.add(frame.f_locals["self"].step)
                    break
                frame = frame.f_back  # a helper of trainer.py's: the Trainer's method that called it
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in _READS:
        watch(name)
    cfg = base(max_steps=8, log_every=4, eval_every=6, device="cpu", peak_flops=1e12)
    r = train(model_cfg(tok), tok, ds, cfg, tmp_path, [Probe()])
    monkeypatch.undo()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert read_at == {m["step"] for m in lines} == {1, 3, 4, 6, 8}  # before: every step (0-7 in train_step)
    assert [{k: m[k] for k in BEFORE[i]} for i, m in enumerate(lines)] == [
        {k: pytest.approx(v, rel=1e-6) for k, v in want.items()} for want in BEFORE]
    assert [m["loss"] for m in r.history] == [m["loss"] for m in lines] and r.final_loss == lines[-1]["loss"]
    assert all(type(m[k]) is float for m in lines for k in ("loss", "grad_norm"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_steps_between_logged_steps_never_wait_for_it(tmp_path, tok, ds):
    """torch.cuda.set_sync_debug_mode("error") raises on any operation that makes the host wait for the GPU; it
    is on for the steps that write no metrics line (2, 3, 5, 7: log_every 4, evaluations at 6 and at the end)."""

    class Strict(Callback):
        def on_step(self, trainer, metrics):
            torch.cuda.set_sync_debug_mode("error" if trainer.step + 1 in (2, 3, 5, 7) else "default")

    try:
        r = train(model_cfg(tok), tok, ds, base(max_steps=8, log_every=4, eval_every=6, device="cuda", peak_flops=1e12),
                  tmp_path, [Strict()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [m["step"] for m in r.history] == [1, 4, 6, 8]


def test_the_library_prints_nothing_and_logs_each_metrics_line(tmp_path, tok, ds, capsys, caplog):
    """The Trainer only logs (the `lmlab.train` logger); a library user sees output only by configuring logging,
    and each metrics line is one record: the progress line, with the logged dict as `record.metrics`."""
    caplog.set_level(logging.INFO, logger="lmlab.train")
    train(model_cfg(tok), tok, ds, base(max_steps=4, log_every=2, eval_every=4, peak_flops=1e12), tmp_path)
    assert capsys.readouterr() == ("", "")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.metrics for r in caplog.records] == lines
    assert [r.getMessage().split(" lr ")[0] for r in caplog.records] == [
        f"step {m['step']}/4 loss {m['loss']:.4f}" for m in lines]
    assert caplog.records[-1].getMessage().endswith(f"| val {lines[-1]['val_loss']:.4f} ppl {lines[-1]['val_ppl']:.1f} "
                                                    f"bpb {lines[-1]['val_bpb']:.3f}")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream, shown", [
    (_Terminal, "\r" + "step 1/8 loss 5.1".ljust(100) + "\r" + "step 2/8 loss 5.0".ljust(100)
     + "\r" + "step 4/8 loss 4.9 | val 4.8".ljust(100) + "\n" + "\r" + "step 5/8 loss 4.7".ljust(100)
     + "\ninterrupted at step 5\n"),
    (io.StringIO, "step 1/8 loss 5.1\nstep 2/8 loss 5.0\nstep 4/8 loss 4.9 | val 4.8\nstep 5/8 loss 4.7\n"
                  "interrupted at step 5\n"),
])
def test_the_console_shows_one_live_line_on_a_terminal_and_plain_lines_elsewhere(stream, shown):
    """`lmlab train`'s console: on a terminal the progress line is overwritten in place and an evaluation's line
    stays; a message ends the live line first. In a log file (the web app's jobs) every record is a line."""
    from lmlab.train.console import console_progress, log
    out = stream()
    with console_progress(out):
        for step, text in [(1, "loss 5.1"), (2, "loss 5.0"), (4, "loss 4.9 | val 4.8"), (5, "loss 4.7")]:
            log.info("step %d/8 %s", step, text, extra={"metrics": {"step": step, **({"val_loss": 4.8} if
                                                                                    "val" in text else {})}})
        log.info("interrupted at step 5")
    assert out.getvalue() == shown


def test_val_loss_is_the_mean_over_target_tokens_of_padded_batches(tmp_path, tok):
    """Batches padded unequally (the knowledge lab's are): each batch's mean loss counts once per target token
    the loss counts, so the val loss is the mean over all tokens. It was weighted by rows, which gives the
    tokens of a mostly padded row the weight of a full one."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = [torch.randint(4, len(tok), (2, 16), generator=g) for _ in range(2)]
    y = [torch.randint(4, len(tok), (2, 16), generator=g) for _ in range(2)]
    y[0][1, 3:] = 0      # <PAD>: a row of 3 targets beside one of 16
    y[1][0, 10:] = -100  # ignored: 10 targets beside 16

    class Padded:
        train_tokens = 10**6

        def eval_batches(self, batch_size, seq_len, max_batches=None):
            return zip(x, y)

        def bytes_per_token(self):
            return 2.0

    model = lmlab.Transformer(lmlab.ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=16))
    trainer = Trainer(model, tok, Padded(), base(device="cpu", peak_flops=1.0), tmp_path)
    val = trainer.evaluate()["val_loss"]
    with torch.no_grad():
        logits = torch.cat([model(xb).logits for xb in x]).flatten(0, 1)
    targets = torch.cat(y).flatten()
    counted = (targets != 0) & (targets != -100)
    reference = torch.nn.functional.cross_entropy(logits[counted], targets[counted]).item()
    assert counted.sum() == 16 + 3 + 10 + 16
    assert val == pytest.approx(reference, rel=1e-6, abs=0)


def test_dtype_auto_is_fp16_with_a_grad_scaler_on_gpus_without_bf16(monkeypatch, tmp_path, tok, ds):
    """auto took bf16 on every GPU; T4 and V100 only emulate it (slowly). The capability query is mocked: a GPU
    whose bf16 is emulated only gets fp16 autocast with a gradient scaler; an Ampere one gets bf16."""
    from lmlab.train.trainer import autocast_dtype
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("auto", cuda) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None and autocast_dtype("fp32", cuda) is None
    assert autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    # fp16 with its scaler (on the CPU here): stopped and resumed == uninterrupted, the scale included
    cfg = base(max_steps=6, dtype="fp16")
    full, first, second = Record(), Record(stop_at=3), Record()
    train(model_cfg(tok), tok, ds, cfg, tmp_path / "full", [full])
    train(model_cfg(tok), tok, ds, cfg, tmp_path / "cut", [first])
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] == 65536.0 and state["grad_scaler"]["_growth_tracker"] == 3
    train(model_cfg(tok), tok, ds, cfg, tmp_path / "cut", [second], resume=True)
    assert first.losses + second.losses == full.losses
    end = json.loads((tmp_path / "cut" / "checkpoints" / "step-6" / "state.json").read_text())["grad_scaler"]
    assert end["_growth_tracker"] == 6


def test_checkpoints_keep_last(tmp_path, tok, ds):
    rec = Record()
    train(model_cfg(tok), tok, ds, base(max_steps=12, grad_accum_steps=1, save_every=3, keep_last=2), tmp_path, [rec])
    assert rec.checkpoints == ["step-3", "step-6", "step-9", "step-12"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-12", "step-9"]
    files = {p.name for p in (tmp_path / "checkpoints" / "step-12").iterdir()}
    assert files == {"model.safetensors", "optimizer.pt", "state.json", "config.json"}
    state = json.loads((tmp_path / "checkpoints" / "step-12" / "state.json").read_text())
    assert state["step"] == 12 and state["tokens"] == 12 * 4 * 32 and {"torch", "data"} <= set(state["rng"])


def test_early_stopping_after_patience_evals_without_improvement(tmp_path, tok, ds):
    rec = Record()
    # lr 0.5 without warm-up diverges, so the val loss stops improving soon
    r = train(model_cfg(tok), tok, ds, base(max_steps=300, lr=0.5, warmup_steps=0, grad_accum_steps=1,
                                            eval_every=2, early_stopping_patience=2), tmp_path, [rec])
    assert r.stop_reason == "early_stopping" and r.steps == 2 * len(rec.evals) < 300
    best = min(range(len(rec.evals)), key=lambda i: (rec.evals[i], i))
    assert len(rec.evals) - 1 - best == 2, rec.evals  # exactly `patience` evals after the best one
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_bad_configs(tmp_path, tok, ds):
    with pytest.raises(ValueError, match="stop condition"):
        TrainConfig()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(max_steps=1, batch_size=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(max_steps=1, schedule="step")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig.from_dict({"max_steps": 1, "lr": "fast"})
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"max_steps": 1, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"^tracker \('wandb'\) must be one of trackio$"):
        TrainConfig(max_steps=1, tracker="wandb")
    with pytest.raises(ValueError, match="seq_len"):
        train(model_cfg(tok), tok, ds, base(seq_len=64), tmp_path / "long")
    with pytest.raises(ValueError, match="GiB"):  # a config that does not fit in memory
        train(lmlab.ModelConfig.preset("gpt2-large", vocab_size=len(tok), block_size=32), tok, ds,
              base(batch_size=200000, max_steps=1), tmp_path / "huge")
    assert not (tmp_path / "huge").exists() and not (tmp_path / "long").exists()


def test_a_tracker_without_its_package_is_a_clear_error_before_anything_is_written(tmp_path, tok, ds, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # what an uninstalled package looks like to import
    with pytest.raises(ValueError, match=r"^--tracker trackio needs the trackio package: pip install trackio$"):
        train(model_cfg(tok), tok, ds, base(tracker="trackio"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, tok, ds):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(model_cfg(tok), tok, ds, base(tensorboard=True), tmp_path)


# ---- the command line -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def book(tmp_path_factory):
    path = tmp_path_factory.mktemp("books") / "tales.txt"
    path.write_text(demo_corpus(n_stories=150, seed=1), encoding="cp1251")  # a legacy-encoded Russian book
    return path


def test_cli_train_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, book, capsys):
    """The Trainer reads a checkpoint's files before loading any (before: an UnpicklingError traceback, exit 1)."""
    run = tmp_path / "run"
    assert main(["train", str(book), "--preset", "llama-tiny", "--vocab-size", "300", "--out", str(run),
                 "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--save-every", "2",
                 "--eval-batches", "1"]) == 0
    capsys.readouterr()
    (run / "checkpoints" / "step-2" / "optimizer.pt").write_bytes(b"{")
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmlab: error: cannot read the checkpoint {run / 'checkpoints' / 'step-2'} (UnpicklingError); it "
                   "is damaged: delete it to resume from the one before, if there is one"], err


def test_cli_train_resume_eval_generate(tmp_path, book, capsys):
    run = tmp_path / "run"
    args = ["train", str(book), "--preset", "llama-tiny", "--vocab-size", "400", "--out", str(run),
            "--max-steps", "8", "--batch-size", "4", "--seq-len", "64", "--eval-every", "4", "--save-every", "4",
            "--log-every", "2", "--warmup-steps", "2", "--lr", "2e-3", "--schedule", "linear", "--no-compile"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stopped after 8 steps (max_steps)" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1/8", "2/8", "4/8", "6/8",
                                                                                          "8/8"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 8 and "val_loss" in lines[-1]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["lr"] == 2e-3 and saved["train"]["schedule"] == "linear"
    assert saved["train"]["max_steps"] == 8 and saved["model"]["family"] == "llama"
    assert saved["model"]["vocab_size"] == 400 and (run / "data" / "tokens.bin").is_file()
    assert main(["train", "--out", str(run), "--resume", "--lr", "1e-3", "--max-steps", "12"]) == 2
    assert "lmlab: error: a resumed run keeps the settings it started with: lr (0.002 -> 0.001) cannot change" \
        in capsys.readouterr().err
    assert main(["train", str(book), "--out", str(run), "--resume", "--vocab-size", "300", "--max-steps", "12"]) == 2
    assert capsys.readouterr().err == ("lmlab: error: --resume continues the run in --out with its own data, "
                                       "tokenizer and model; drop SOURCES, --vocab-size\n")
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "resuming: max_steps 8 -> 12; the linear schedule keeps its horizon of 8 steps" in out
    assert "stopped after 12 steps" in out
    assert json.loads((run / "config.json").read_text()) == saved  # how the run started
    assert json.loads((run / "resumes.jsonl").read_text())["changed"] == {"max_steps": [8, 12]}
    assert json.loads((run / "final" / "training.json").read_text())["steps"] == 12
    assert main(["eval", str(run / "final"), str(book)]) == 0
    assert "bits per byte" in capsys.readouterr().out
    assert main(["generate", str(run / "final"), "--prompt", "Жили", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Жили")
    # fine-tune from the final model: its tokenizer and weights are reused, nothing is retrained
    assert main(["train", str(book), "--init", str(run / "final"), "--out", str(tmp_path / "ft"), "--max-steps", "2",
                 "--batch-size", "4", "--seq-len", "64", "--eval-batches", "1"]) == 0
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    trained = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(first - trained) < abs(first - lines[0]["loss"])  # starts from trained weights, not scratch


_TIMINGS = ("elapsed_s", "tokens_per_s", "mfu")


def test_trackio_holds_the_metrics_lines_and_a_resume_continues_its_run(tmp_path, book):
    """`--tracker trackio`: the run's config and every metrics line go to a Trackio run in its local store; a
    resume after a crash logs on in the same tracker run, without the lines the tracker already holds."""
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}

    def lmlab_cli(*argv):
        proc = subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, argv)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    run = tmp_path / "run"
    lmlab_cli("train", book, "--preset", "llama-tiny", "--vocab-size", "300", "--out", run, "--max-steps", "6",
              "--batch-size", "4", "--seq-len", "32", "--eval-every", "3", "--log-every", "2", "--save-every", "4",
              "--eval-batches", "1", "--device", "cpu", "--peak-flops", "1e12", "--tracker", "trackio")
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # a crash after step 6 was logged, before its checkpoint: the resume starts from step 4 and logs 6 again
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "final")
    lmlab_cli("train", "--out", run, "--resume", "--max-steps", "8")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 6, 8] and lines[:4] == first[:4]
    name = json.loads((run / "tracker.json").read_text())["run"]
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([S.get_runs('lmlab'), S.get_logs('lmlab', sys.argv[1]), "
            "S.get_run_config('lmlab', sys.argv[1])]))")
    proc = subprocess.run([sys.executable, "-c", read, name], env=env, capture_output=True, text=True, timeout=120)
    runs, logs, config = json.loads(proc.stdout)
    assert runs == [name] and name.startswith("run-")
    # every line once; step 6 as first logged (the resume logged the same numbers again, with other timings)
    assert [{k: v for k, v in m.items() if k != "timestamp"} for m in logs] == first[:5] + lines[5:]
    assert [{k: v for k, v in m.items() if k not in _TIMINGS} for m in (first[4], lines[4])] == [
        {k: v for k, v in lines[4].items() if k not in _TIMINGS}] * 2
    assert config["train"] == read_run_config(run)["train"]  # the settings it continued with (max_steps 8)


def test_a_moved_run_directory_resumes(tmp_path, book):
    """config.json named the run's own data by its absolute path, so a moved (or copied) run directory could
    not be resumed. A dataset inside the run directory is named relative to it."""
    run = tmp_path / "run"
    assert main(["train", str(book), "--preset", "llama-tiny", "--vocab-size", "300", "--out", str(run),
                 "--max-steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
                 "--save-every", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["dataset"] == "data"
    (tmp_path / "moved").mkdir()
    run = run.rename(tmp_path / "moved" / "run")
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6"]) == 0
    assert json.loads((run / "final" / "training.json").read_text())["steps"] == 6


@pytest.mark.parametrize("argv, message", [
    (["train", "missing.txt", "--preset", "gpt2-tiny", "--out", "{tmp}/r", "--max-steps", "1"], "missing.txt"),
    (["train", "{empty}", "--preset", "gpt2-tiny", "--out", "{tmp}/r", "--max-steps", "1"], "empty"),
    (["train", "{book}", "--preset", "gpt2-nope", "--out", "{tmp}/r", "--max-steps", "1"], "preset"),
    (["train", "{book}", "--preset", "gpt2-tiny", "--out", "{tmp}/r", "--max-steps", "0"], "max_steps"),
    (["train", "{book}", "--preset", "gpt2-tiny", "--out", "{tmp}/r", "--max-steps", "1", "--schedule", "step"],
     "schedule"),
    (["train", "{book}", "--out", "{tmp}/r", "--max-steps", "1"], "--preset"),
    (["train", "--out", "{tmp}/nothing", "--resume"], "not a run directory"),
    (["train", "--dataset", "{tmp}/nodata", "--tokenizer", "{tmp}/t.json", "--preset", "gpt2-tiny", "--out",
      "{tmp}/r", "--max-steps", "1"], "not found"),
    (["eval", "{tmp}/nomodel", "{book}"], "not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, book, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("   \n")
    argv = [a.format(tmp=tmp_path, book=book, empty=tmp_path / "empty.txt") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error:") and "\n" not in err and message in err, err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_debug_shows_the_traceback_and_a_bug_is_not_bad_input(capsys, monkeypatch):
    """Bad input is one line (with --debug, the traceback first); a ValueError from a failed operation deep
    inside (here numpy's reshape) is a bug: its traceback, a line saying so, exit 1 (it was one line, exit 2,
    as if the user were at fault)."""
    assert main(["--debug", "info", "--preset", "gpt2-nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-1].startswith("lmlab: error: preset ('gpt2-nope')")
    assert main(["info", "--preset", "gpt2-nope", "--debug"]) == 2 and "Traceback" in capsys.readouterr().err
    assert main(["info", "--preset", "gpt2-nope"]) == 2
    assert capsys.readouterr().err.startswith("lmlab: error: preset ('gpt2-nope') is unknown")
    monkeypatch.setattr(lmlab.ModelConfig, "num_parameters", lambda self: int(np.zeros(3).reshape(2, 2).sum()))
    assert main(["info", "--preset", "gpt2-tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and "cannot reshape array of size 3" in err[-2]
    assert err[-1] == ("lmlab: internal error: ValueError; this is a bug in lmlab, please report it with the "
                       "traceback above")


def test_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "x", "--max-steps", "many"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_demo_learns_the_book(tmp_path, capsys):
    """The full `lmlab demo`: learns the generated book well below the unigram baseline, and its final/
    works with `lmlab generate`."""
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Before training (random weights):" in out and "After training:" in out
    training = json.loads((tmp_path / "demo" / "final" / "training.json").read_text())
    before = training["demo"]["val_loss_before"]
    after, unigram = training["last_eval"]["val_loss"], training["demo"]["unigram_baseline"]
    assert after < 0.5 * unigram < before, (before, after, unigram)
    assert main(["generate", str(tmp_path / "demo" / "final"), "--prompt", "Жили-были", "--greedy",
                 "--max-new-tokens", "20"]) == 0
    assert "Жили-были" in capsys.readouterr().out


def test_demo_stopped_by_sigterm_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """SIGTERM during the demo's training: the trainer checkpoints, the demo exits 0 with the resume command
    (it crashed formatting a missing final val loss), and that command finishes the run."""
    from lmlab.train.trainer import Trainer
    real, steps = Trainer.train_step, []

    def step_then_sigterm(self):
        out = real(self)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "continue it with `lmlab train --out" in out and "After training" not in out
    assert latest_checkpoint(tmp_path / "demo").name == "step-3" and not (tmp_path / "demo" / "final").exists()
    monkeypatch.setattr(Trainer, "train_step", real)
    assert main(["train", "--out", str(tmp_path / "demo"), "--resume"]) == 0
    assert json.loads((tmp_path / "demo" / "final" / "training.json").read_text())["steps"] == 20


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path, book, umask, file_mode, dir_mode):
    """Every file lmlab writes (run config, tokenizer, token files, metrics, checkpoints, the model directory,
    generation.json, GGUF and Hugging Face exports) gets what open() gives under the user's umask: 0644 under
    022 (a group or a web server serving exports can read it), 0600 under 077. Temporary files from mkstemp
    (and safetensors' own) were 0600 whatever the umask, and the rename kept that."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    old = os.umask(umask)
    try:
        assert main(["train", str(book), "--preset", "llama-tiny", "--vocab-size", "300", "--out", str(run),
                     "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
                     "--save-every", "1"]) == 0
        lmlab.GenerationConfig(max_new_tokens=7).save(run / "final" / "generation.json")
        assert main(["export", "gguf", str(run / "final"), str(run / "model.gguf")]) == 0
        assert main(["export", "hf", str(run / "final"), str(run / "hf")]) == 0
    finally:
        os.umask(old)
    names = {p.relative_to(run).as_posix(): p.stat().st_mode & 0o777 for p in run.rglob("*")}
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "data/tokens.bin", "data/tokens.json",
            "checkpoints/step-2/model.safetensors", "checkpoints/step-2/state.json", "final/model.safetensors",
            "final/config.json", "final/tokenizer.json", "final/training.json", "final/generation.json",
            "model.gguf", "hf/model.safetensors", "hf/config.json", "hf/tokenizer.json"} <= set(names)
    wrong = {name: oct(mode) for name, mode in names.items()
             if mode != (dir_mode if (run / name).is_dir() else file_mode)}
    assert not wrong, wrong


def test_early_stopping_survives_an_extension_and_a_finished_run_stays_finished(tmp_path, tok, ds):
    """A run stopped by max_steps and extended counted its last step's extra evaluation in early stopping (an
    uninterrupted run never evaluates there), so it stopped elsewhere; resuming a run that early stopping had
    ended trained on and replaced its final model."""
    es = dict(lr=3e-2, schedule="constant", warmup_steps=0, eval_every=5, early_stopping_patience=1)
    whole = train(model_cfg(tok), tok, ds, base(max_steps=60, **es), tmp_path / "whole")
    assert whole.stop_reason == "early_stopping" and whole.steps < 60
    train(model_cfg(tok), tok, ds, base(max_steps=7, **es), tmp_path / "ext")
    extended = train(model_cfg(tok), tok, ds, base(max_steps=60, **es), tmp_path / "ext", resume=True)
    assert (extended.steps, extended.stop_reason) == (whole.steps, "early_stopping")
    same_weights(tmp_path / "whole" / "final", tmp_path / "ext" / "final")
    final = (tmp_path / "whole" / "final" / "model.safetensors").read_bytes()
    again = train(model_cfg(tok), tok, ds, base(max_steps=60, **es), tmp_path / "whole", resume=True)
    assert (again.steps, again.stop_reason) == (whole.steps, "early_stopping")
    assert (tmp_path / "whole" / "final" / "model.safetensors").read_bytes() == final


def test_a_run_folder_is_trained_by_one_process_at_a_time(tmp_path, tok, ds):
    """Nothing stopped a second process from resuming a run that was still training: both wrote metrics.jsonl
    and one renamed the other's checkpoints away. The process that trains a run holds its lock."""
    import threading

    from lmlab.train.checkpoint import lock_run, unlock_run
    train(model_cfg(tok), tok, ds, base(max_steps=4), tmp_path / "run")
    held = []  # taken by another thread, as a process training it would (the thread that holds it may again)
    thread = threading.Thread(target=lambda: held.append(lock_run(tmp_path / "run")))
    thread.start()
    thread.join()
    try:
        with pytest.raises(ValueError, match="run is being trained by another process; wait for it to end"):
            train(model_cfg(tok), tok, ds, base(max_steps=8), tmp_path / "run", resume=True)
    finally:
        unlock_run(held[0])
    assert train(model_cfg(tok), tok, ds, base(max_steps=8), tmp_path / "run", resume=True).steps == 8


@pytest.mark.parametrize("config, message", [
    (dict(early_stopping_patience=2, eval_every=0), "set --eval-every too"),
    (dict(early_stopping_patience=2, seq_len=32), "the held-out split has no window of 32 tokens"),
    (dict(seed=2**64), "seed"),
])
def test_settings_that_could_never_act_are_refused(tmp_path, tok, text, config, message):
    """Early stopping without evaluations or without validation windows was silently off; a seed past 64 bits
    was a traceback."""
    small = prepare_texts([text[:3000]], tok, tmp_path / "ds", seq_len=32, val_fraction=0.01)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(model_cfg(tok), tok, small, base(**config), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_resume_refuses_other_data_or_another_model_and_prepare_another_dataset(tmp_path, tok, text, capsys):
    """`lmlab data prepare` wrote a new dataset over the one a run trained on, and the run resumed on it silently;
    a run resumed from Python with another dropout went on and recorded the new config in final/ only."""
    ds_dir = tmp_path / "ds"
    book = tmp_path / "book.txt"
    book.write_text(text[:20000])
    tok.save(tmp_path / "tok.json")
    assert main(["data", "prepare", str(book), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(ds_dir)]) == 0
    ds = lmlab.data.TokenDataset.open(ds_dir, tok)
    train(model_cfg(tok), tok, ds, base(max_steps=4), tmp_path / "run")
    book.write_text(text[20000:32000])
    capsys.readouterr()
    assert main(["data", "prepare", str(book), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(ds_dir)]) == 2
    assert capsys.readouterr().err == (f"lmlab: error: {ds_dir} already holds a dataset; replace it with --force "
                                       "(overwrite=True in Python), or choose another folder\n")
    assert main(["data", "prepare", str(book), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(ds_dir),
                 "--force"]) == 0
    other = lmlab.data.TokenDataset.open(ds_dir, tok)
    with pytest.raises(ValueError, match=r"the dataset is not the one this run started on \(tokens "):
        train(model_cfg(tok), tok, other, base(max_steps=8), tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match=r"a resumed run keeps its model: dropout \(0.1 -> 0.5\) cannot change"):
        train(model_cfg(tok, dropout=0.5), tok, ds, base(max_steps=8), tmp_path / "run", resume=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(init="INIT", tokenizer="TOK"), "--init brings its tokenizer: leave out --tokenizer"),
    (dict(init="INIT", vocab_size=999, tokenizer_kind="char"),
     "--init brings its tokenizer: leave out --tokenizer-kind, --vocab-size"),
    (dict(dataset="DS", tokenizer="TOK", val_fraction=0.5, weights={"nosuch": 2.0}, preset="llama-tiny"),
     "--dataset holds its split and weights: leave out --val-fraction, --weight"),
    (dict(tokenizer="TOK", vocab_size=999, preset="llama-tiny"),
     "--tokenizer is trained already: leave out --vocab-size"),
])
def test_settings_the_data_or_model_brings_are_refused_not_ignored(tmp_path, tok, ds, text, kwargs, message):
    """`lmlab train --init M --tokenizer T` trained with M's tokenizer and exit 0; with --dataset, --val-fraction,
    --weight, --vocab-size and --tokenizer-kind were ignored the same way."""
    from lmlab.train import train_from_sources
    init = tmp_path / "init"
    lmlab.models.io.save_pretrained(init, lmlab.Transformer(model_cfg(tok)), tok)
    tok.save(tmp_path / "tok.json")
    (tmp_path / "book.txt").write_text(text[:5000])
    fill = {"INIT": init, "TOK": tmp_path / "tok.json", "DS": ds.path}
    kwargs = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    sources = [] if "dataset" in kwargs else [tmp_path / "book.txt"]
    with pytest.raises(ValueError, match=re.escape(message)):
        train_from_sources(tmp_path / "run", base(max_steps=1), sources=sources, **kwargs)
    assert not (tmp_path / "run").exists()


def test_an_interrupt_during_an_evaluation_keeps_the_previous_checkpoint(tmp_path, tok, ds, reference):
    """A second Ctrl-C inside the step-10 evaluation checkpointed step 10, whose metrics line was never written:
    the resumed log went 9, 11 and step 10's val loss was lost. The step is checkpointed once its bookkeeping is
    done; before that the previous checkpoint stays the latest, and the resume matches an uninterrupted run."""
    full, _ = reference

    class Interrupt(Callback):
        def on_eval(self, trainer, metrics):
            if trainer.step == 10:
                raise KeyboardInterrupt

    r = train(model_cfg(tok), tok, ds, base(save_every=4), tmp_path, [Interrupt()])
    assert r.stop_reason == "interrupted" and latest_checkpoint(tmp_path).name == "step-8"
    again = Record()
    train(model_cfg(tok), tok, ds, base(save_every=4), tmp_path, [again], resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))
    torch.testing.assert_close(again.losses, full.losses[8:], atol=1e-6, rtol=0)


def test_an_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, tok, ds, caplog,
                                                                                   monkeypatch):
    """It said "the latest checkpoint is None; continue with --resume", and --resume then failed."""
    real = Trainer.train_step

    def step(self):
        if self.step == 2:  # mid-step: no checkpoint is written
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    with caplog.at_level(logging.INFO):
        r = train(model_cfg(tok), tok, ds, base(save_every=0), tmp_path / "run")
    assert r.stop_reason == "interrupted" and latest_checkpoint(tmp_path / "run") is None
    assert (f"interrupted at step 2, before the first checkpoint: there is nothing to resume; remove "
            f"{tmp_path / 'run'} to start again") in caplog.text


def test_a_finished_run_resumed_reports_the_best_val_loss_it_first_reported(tmp_path, tok, ds, reference):
    """The stop step's off-schedule evaluation counted toward the best val loss only in the process that ran it:
    resumed at its end (its final/ cut short by a crash, or a no-op resume), the run reported a worse one than
    the uninterrupted run, and wrote it into final/training.json."""
    rec, ref_out = reference
    assert min(rec.evals) < min(rec.evals[:-1])  # the last evaluation (step 16, off the schedule) is the best
    shutil.copytree(ref_out, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "final")
    result = train(model_cfg(tok), tok, ds, base(), tmp_path / "run", resume=True)
    assert result.best_val_loss == min(rec.evals)
    saved = json.loads((tmp_path / "run" / "final" / "training.json").read_text())
    assert saved["best_val_loss"] == min(rec.evals)


def test_a_malformed_resume_record_is_one_line(tmp_path, tok, ds):
    out = tmp_path / "run"
    train(model_cfg(tok), tok, ds, base(max_steps=2, eval_every=0), out)
    for line, number in (("{}", 1), ('[1]', 1), ('{"changed": {"max_steps": 5}}', 2)):
        (out / "resumes.jsonl").write_text(('{"changed": {}}\n' if number == 2 else "") + line + "\n")
        with pytest.raises(ValueError, match=rf"resumes.jsonl:{number}: not a resume record"):
            read_run_config(out)


def test_a_run_that_fails_its_trainers_checks_leaves_no_folder(tmp_path, text, capsys):
    """Early stopping with no validation text is refused by the Trainer, after the data were prepared: the
    folder then held data/, and the same command without the bad flag was refused ("holds data")."""
    book = tmp_path / "book.txt"
    book.write_text(text[:20000], encoding="utf-8")
    common = [str(book), "--out", str(tmp_path / "run"), "--preset", "llama-tiny", "--vocab-size", "300",
              "--batch-size", "2", "--seq-len", "16", "--max-steps", "2"]
    assert main(["train", *common, "--early-stopping-patience", "1", "--eval-every", "1",
                 "--val-fraction", "0.0001"]) == 2
    assert "needs validation text" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", *common]) == 0


@pytest.mark.parametrize("flags, message", [(["--budget", "nan"], "must be a positive finite number"),
                                            (["--budget", "inf"], "must be a positive finite number"),
                                            (["--device", "cuda"], "cuda")])
def test_the_demo_refuses_a_budget_or_device_before_writing_anything(tmp_path, flags, message, capsys):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is no error here")
    assert main(["demo", "--out", str(tmp_path / "demo"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_a_warm_up_as_long_as_the_run_is_said(tmp_path, tok, ds, caplog):
    """TrainConfig's 100 warm-up steps over a 3-step run: the learning rate never reached lr and nothing said so."""
    with caplog.at_level(logging.INFO):
        train(model_cfg(tok), tok, ds, base(max_steps=3, warmup_steps=100, eval_every=0), tmp_path / "long")
        train(model_cfg(tok), tok, ds, base(max_steps=3, warmup_steps=2, eval_every=0), tmp_path / "short")
    notes = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert notes == ["note: the warm-up (100 steps) is as long as the run (3 steps): the learning rate climbs all "
                     "run and never decays; give fewer warm-up steps"]


def test_a_model_too_big_for_the_memory_is_refused_before_it_is_built(tmp_path, monkeypatch, capsys):
    """`lmlab train --n-layer 30000` built the model (45-56 s, 7 GB) and only then said it needs ~564 GiB: the
    check reads the config alone, so it runs first."""
    import lmlab.train.recipes as recipes
    import lmlab.train.trainer as trainer_module
    built = []
    real = recipes.Transformer
    monkeypatch.setattr(recipes, "Transformer", lambda cfg: built.append(cfg) or real(cfg))
    monkeypatch.setattr(trainer_module, "available_memory", lambda device: 1)
    (tmp_path / "book.txt").write_text("Жили-были дед да баба. " * 50)
    assert main(["train", str(tmp_path / "book.txt"), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--max-steps", "1"]) == 2
    assert "available on cpu" in capsys.readouterr().err and built == []
