"""lmlab lab merge (lab/merge.py): the saved curves against the models they came from, and the barrier formula."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.data import TokenDataset
from lmlab.lab.merge import barrier, held_out_loss
from lmlab.models.io import load_pretrained


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "merge"
    torch.set_num_threads(1)
    assert main(["lab", "merge", "--quick", "--seeds", "0,1", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_path_ends_are_the_models_and_the_barrier_is_the_formula(quick):
    out, res = quick
    ds = TokenDataset.open(out / "data")
    seq = res["config"]["block_size"]
    for row in res["per_seed"]:
        runs = out / "runs" / f"seed{row['seed']}"
        for label, (a, b) in (("siblings (linear)", ("sibling1", "sibling2")),
                              ("siblings (slerp)", ("sibling1", "sibling2")),
                              ("strangers (linear)", ("stranger1", "stranger2"))):
            curve = row[label]
            ends = [held_out_loss(load_pretrained(runs / m / "final")[0], ds, seq) for m in (a, b)]
            assert curve["loss"][0] == pytest.approx(ends[0], abs=1e-6)
            assert curve["loss"][-1] == pytest.approx(ends[1], abs=1e-6)
            t, loss = np.asarray(curve["t"]), np.asarray(curve["loss"])
            by_hand = max(loss[i] - ((1 - t[i]) * loss[0] + t[i] * loss[-1]) for i in range(len(t)))
            assert curve["barrier"] == pytest.approx(by_hand, abs=1e-9)
        # the two siblings and the two strangers are different models (else every barrier is 0 by construction)
        assert row["siblings (linear)"]["loss"][0] != row["siblings (linear)"]["loss"][-1]
        assert row["strangers (linear)"]["loss"][0] != row["strangers (linear)"]["loss"][-1]
    table = {r["path"]: r for r in res["table"]}
    assert table["siblings (linear)"]["barrier (nats)"] == pytest.approx(
        np.mean([r["siblings (linear)"]["barrier"] for r in res["per_seed"]]))
    assert table["siblings (linear)"]["barrier (nats)_std"] == pytest.approx(
        np.std([r["siblings (linear)"]["barrier"] for r in res["per_seed"]], ddof=1))
    mid = [r["siblings (linear)"]["loss"][r["siblings (linear)"]["t"].index(0.5)] for r in res["per_seed"]]
    assert table["siblings (linear)"]["midpoint loss"] == pytest.approx(np.mean(mid))
    assert (out / "paths.png").stat().st_size > 0 and "merge" in (out / "report.html").read_text()


def test_one_seed_reports_no_spread(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    argv = ["lab", "merge", "--quick", "--seeds", "0", "--out", str(tmp_path / "my merge")]
    monkeypatch.setattr(sys, "argv", ["lmlab", *argv])
    assert main(argv) == 0
    res = json.loads((tmp_path / "my merge" / "results.json").read_text())
    # the Reproduce line runs in a shell: a path with a space is quoted
    assert res["command"] == f"lmlab lab merge --quick --seeds 0 --out '{tmp_path / 'my merge'}'"
    b = {r["path"]: r["barrier (nats)"] for r in res["table"]}
    assert all("barrier (nats)_std" not in r for r in res["table"])
    assert res["measured"] == (f"barrier over 1 seed(s): siblings {b['siblings (linear)']:.3f} nats, "
                               f"strangers {b['strangers (linear)']:.3f} nats")
    assert "±" not in (tmp_path / "my merge" / "report.html").read_text()


def test_barrier_of_a_straight_and_a_bent_path():
    t = np.linspace(0, 1, 5)
    assert barrier(t, [1.0, 1.5, 2.0, 2.5, 3.0]) == pytest.approx(0.0)
    assert barrier(t, [1.0, 2.0, 4.0, 2.0, 1.0]) == pytest.approx(3.0)


def test_an_existing_folder_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["lab", "merge", "--quick", "--out", str(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_seeds_and_preset_are_checked_before_anything_is_written(tmp_path):
    """No seed was a StatisticsError after out/data was written; a seed twice trained its models, then found the
    second's folder taken; an unknown preset was refused once out/data was there."""
    from lmlab.lab.merge import MergeLabConfig, run_merge_lab

    cfg = MergeLabConfig(parent_steps=1, finetune_steps=1, points=3, vocab_size=300, stories=5)
    for seeds in ([], [0, 0], [-1]):
        with pytest.raises(ValueError, match=r"^--seeds \(.*\) must be distinct integers from 0 to 2\^31 - 1, at "
                                             "least one"):
            run_merge_lab(tmp_path / "m", seeds, cfg)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match=r"^preset \('nope'\) is unknown; choose one of gpt-tiny, "):
        MergeLabConfig(preset="nope")
    for points in (4, 2):  # 4: the "midpoint loss" was the one at t = 2/3
        with pytest.raises(ValueError, match=rf"^points must be odd and >= 3 \(both ends and t = 0.5\), got {points}$"):
            MergeLabConfig(points=points)
