"""Distributed training through torchrun on CPU (gloo): 2 processes follow the 1-process loss curve with
the same global batch, with DDP and with FSDP2 (fully_shard), and checkpoints move between them; with dropout
on, each rank draws its own masks and a resumed run reproduces the uninterrupted one.

Why equal at all: every process draws the whole global batch from the same seeded generator and keeps its
half; DDP and FSDP average the gradients, so each optimizer step sees the gradient of the same 8 windows.
What differs is only the order of floating-point sums (two means of 4 rows averaged instead of one mean of
8; gloo's all-reduce), ~1e-7 relative per step in fp32, which AdamW's 1/sqrt(v) can amplify only where v is
tiny. Measured worst difference over the 10 losses and 2 val losses: 4.8e-7 (DDP and FSDP; 9.5e-7 in an
earlier run). The bound, 1e-5, is 10x that, and 1000x below what one different batch row moves the loss."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import lmlab
from lmlab.data import prepare_texts
from lmlab.train.demo_corpus import demo_corpus
from lmlab.train.recipes import resume_run

TOL = 1e-5


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run(n_procs, tmp_path, name, extra=(), model=("--preset", "gpt2-tiny")):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}",
           "-m", "lmlab.cli", "train", "--dataset", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "tok.json"),
           *model, "--out", str(out), "--max-steps", "10", "--batch-size", "8", "--seq-len", "64",
           "--log-every", "1", "--eval-every", "5", "--eval-batches", "3", "--warmup-steps", "2", "--lr", "3e-3",
           "--save-every", "5", "--device", "cpu", *extra]
    if name.endswith("resumed"):
        cmd = cmd[:5] + ["-m", "lmlab.cli", "train", "--out", str(out), "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return metrics(out)


def curve(lines):
    return [m["loss"] for m in lines] + [m["val_loss"] for m in lines if "val_loss" in m]


def assert_close(a, b):
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst < TOL, (worst, a, b)
    return worst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    text = demo_corpus(n_stories=200, seed=2)
    tok = lmlab.Tokenizer.train([text], vocab_size=512)
    tok.save(tmp / "tok.json")
    prepare_texts([text], tok, tmp / "ds", seq_len=64)
    return tmp


def test_two_processes_match_one_with_ddp_and_fsdp(setup):
    one = run(1, setup, "one")
    assert [m["step"] for m in one] == list(range(1, 11)) and one[-1]["loss"] < one[0]["loss"] - 0.5
    ddp = run(2, setup, "ddp")
    worst_ddp = assert_close(curve(one), curve(ddp))
    fsdp = run(2, setup, "fsdp", ["--fsdp"])
    worst_fsdp = assert_close(curve(one), curve(fsdp))
    print(f"max |1 process - 2 processes|: DDP {worst_ddp:.2e}, FSDP {worst_fsdp:.2e}")
    for name in ("ddp", "fsdp"):
        training = json.loads((setup / name / "final" / "training.json").read_text())
        assert training["world_size"] == 2 and training["steps"] == 10
        a, _ = lmlab.load(setup / "one" / "final")
        b, _ = lmlab.load(setup / name / "final")
        for (key, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert (p - q).abs().max() < 1e-3, key  # full weights, gathered from the shards

    # An FSDP checkpoint resumes with FSDP (2 processes) and with 1 process: steps 6-10 again.
    for name in ("fsdp-resumed", "fsdp-1proc-resumed"):
        shutil.copytree(setup / "fsdp", setup / name)
        shutil.rmtree(setup / name / "checkpoints" / "step-10")
        shutil.rmtree(setup / name / "final")
    again = run(2, setup, "fsdp-resumed")
    assert [m["step"] for m in again] == list(range(1, 11))
    assert_close(curve(fsdp), curve(again))
    result = resume_run(setup / "fsdp-1proc-resumed", {"fsdp": False})
    assert result.steps == 10
    assert_close(curve(fsdp), curve(metrics(setup / "fsdp-1proc-resumed")))


def test_torchrun_trains_from_raw_books(setup):
    """Rank 0 trains the tokenizer and prepares the token file while the other rank waits, then loads them."""
    book = setup / "book.txt"
    book.write_text(demo_corpus(n_stories=100, seed=5), encoding="utf-8")
    out = setup / "books"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmlab.cli",
           "train", str(book), "--preset", "llama-tiny", "--vocab-size", "300", "--out", str(out), "--max-steps", "3",
           "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("stopped after 3 steps") == 1  # rank 0 reports, alone
    assert [m["step"] for m in metrics(out)] == [1, 3]
    tok = lmlab.Tokenizer.load(out / "tokenizer.json")
    assert json.loads((out / "data" / "tokens.json").read_text())["tokenizer_fingerprint"] == tok.fingerprint()


MASKS = """
import json, os, sys
import torch, lmlab
from lmlab.data import TokenDataset
from lmlab.train import TrainConfig, train

tmp = sys.argv[1]
tok = lmlab.Tokenizer.load(f"{tmp}/tok.json")
torch.manual_seed(0)
model = lmlab.Transformer(lmlab.ModelConfig.preset("gpt2-tiny", vocab_size=len(tok), dropout=0.5))
masks = []
model.drop.register_forward_hook(lambda m, i, o: masks.append(((o == 0) & (i[0] != 0)).flatten().tolist()))
train(model, tok, TokenDataset.open(f"{tmp}/ds", tok), TrainConfig(max_steps=1, batch_size=8, seq_len=64,
      eval_batches=1, eval_every=0, device="cpu", peak_flops=1.0), f"{tmp}/masks")
with open(f"{tmp}/mask-{os.environ['RANK']}.json", "w") as f:
    json.dump(masks[0], f)
"""


def test_ranks_draw_their_own_dropout_and_resume_it(setup):
    """Every rank seeded torch's RNG alike, so both processes dropped the same units of their own rows, and a
    checkpoint kept rank 0's RNG state only. Each rank is seeded apart (the data generator stays shared) and its
    state is saved and restored: with dropout on, 2 processes stopped at step 5 and resumed reproduce the
    uninterrupted run exactly."""
    script = setup / "masks.py"
    script.write_text(MASKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(setup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = (json.loads((setup / f"mask-{r}.json").read_text()) for r in (0, 1))
    assert len(a) == len(b) == 4 * 64 * 64 and 0.45 < sum(a) / len(a) < 0.55 and 0.45 < sum(b) / len(b) < 0.55
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    assert 0.45 < same < 0.55, same  # independent masks agree on half the units; identical ones on all

    vocab = lmlab.Tokenizer.load(setup / "tok.json").vocab_size
    lmlab.ModelConfig.preset("gpt2-tiny", vocab_size=vocab, dropout=0.1).save(setup / "dropout.json")
    model = ("--model-config", str(setup / "dropout.json"))
    full = run(2, setup, "dropout", model=model)
    shutil.copytree(setup / "dropout", setup / "dropout-resumed")
    shutil.rmtree(setup / "dropout-resumed" / "checkpoints" / "step-10")
    shutil.rmtree(setup / "dropout-resumed" / "final")
    state = json.loads((setup / "dropout-resumed" / "checkpoints" / "step-5" / "state.json").read_text())
    assert len(state["rng"]["torch"]) == 2 and state["rng"]["torch"][0] != state["rng"]["torch"][1]
    again = run(2, setup, "dropout-resumed", model=model)
    assert [m["step"] for m in again] == list(range(1, 11))
    assert curve(again) == curve(full)
    no_dropout = run(2, setup, "no-dropout")  # dropout matters here: the curve is another one
    assert abs(curve(no_dropout)[-1] - curve(full)[-1]) > 1e-3
