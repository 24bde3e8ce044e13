"""DDP through torchrun: 2 CPU processes (gloo) follow the same loss curve as 1 process with the same
global batch. Each process draws the whole global batch and keeps its half, and DDP averages gradients,
so the only difference is the order of floating-point sums."""

import json
import os
import subprocess
import sys

import pytest

import lmlab
from lmlab.data import prepare_texts
from lmlab.train.demo_corpus import demo_corpus


def run(n_procs, tmp_path, name, extra=()):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}",
           "-m", "lmlab.cli", "train", "--dataset", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "tok.json"),
           "--preset", "gpt2-tiny", "--out", str(out), "--max-steps", "10", "--batch-size", "8", "--seq-len", "64",
           "--log-every", "1", "--eval-every", "5", "--eval-batches", "4", "--warmup-steps", "2", "--lr", "3e-3",
           "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines], [m["val_loss"] for m in lines if "val_loss" in m]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    text = demo_corpus(n_stories=200, seed=2)
    tok = lmlab.Tokenizer.train([text], vocab_size=512)
    tok.save(tmp / "tok.json")
    prepare_texts([text], tok, tmp / "ds", seq_len=64)
    return tmp


def test_two_processes_match_one(setup):
    single, single_val = run(1, setup, "one")
    double, double_val = run(2, setup, "two")
    assert len(single) == len(double) == 10
    for a, b in zip(single + single_val, double + double_val):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (single, double)
    assert single[-1] < single[0] - 0.5  # and it actually trained
    sharded, sharded_val = run(2, setup, "fsdp", ["--fsdp"])  # FSDP2 (fully_shard) on gloo, CPU
    for a, b in zip(single + single_val, sharded + sharded_val):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (single, sharded)
    assert (setup / "fsdp" / "final" / "model.safetensors").is_file()
    print("max |1-proc - 2-proc| loss difference:", max(abs(a - b) for a, b in zip(single, double)))
