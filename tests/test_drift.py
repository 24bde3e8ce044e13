"""Embedding drift (lab/drift.py): rows of tokens that never occur in training move exactly as AdamW's weight decay
alone predicts (untied head), the callback and the checkpoint report agree, and the CLI's errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.data import prepare_texts
from lmlab.lab.drift import DriftCallback, drift_by_kind, hidden_drift, neighbours, row_drift, token_kinds
from lmlab.models import ModelConfig, Transformer
from lmlab.tokenizers import Tokenizer
from lmlab.train import Callback, TrainConfig, lr_at, train
from lmlab.train.console import quiet
from lmlab.train.demo_corpus import demo_corpus
from lmlab.train.drift import token_counts

UNSEEN = "zebra quokka narwhal axolotl pangolin okapi"  # in the tokenizer, never in the training data


def _run(tmp, family: str):
    text = demo_corpus(n_stories=30, seed=0)
    tok = Tokenizer.train([text, UNSEEN], kind="word", vocab_size=400, min_frequency=1)
    ds = prepare_texts([text], tok, tmp / "data", seq_len=16)
    mc = ModelConfig(family=family, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, block_size=16)
    torch.manual_seed(0)
    model = Transformer(mc)
    cb = DriftCallback(model, every=10)
    tc = TrainConfig(max_steps=30, batch_size=4, lr=3e-2, warmup_steps=5, weight_decay=0.5, eval_every=0,
                     save_every=10, keep_last=0, log_every=100, device="cpu", seed=0, peak_flops=1e12, sample_every=0)
    with quiet():
        train(model, tok, ds, tc, tmp / "run", [cb])
    return tok, ds, tc, cb


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    torch.set_num_threads(1)
    return _run(tmp_path_factory.mktemp("drift"), "llama")


def _prediction(tc: TrainConfig, start: int, end: int) -> float:
    """1 - prod (1 - lr_t wd) over optimizer steps start..end-1, from the schedule itself."""
    return 1 - math.prod(1 - lr_at(t, tc, tc.max_steps) * tc.weight_decay for t in range(start, end))


def test_never_seen_rows_drift_as_weight_decay_alone_predicts(untied):
    tok, ds, tc, cb = untied
    counts = token_counts(ds, len(tok))
    unseen = np.flatnonzero(counts == 0)
    assert {tok.id_to_token(int(i)) for i in unseen} >= set(UNSEEN.split())
    assert [step for step, _, _ in cb.records] == [10, 20, 30]
    for step, drift, decay in cb.records:
        expected = _prediction(tc, 0, step)
        assert decay == pytest.approx(expected, rel=1e-12)
        np.testing.assert_allclose(drift[unseen], expected, rtol=0, atol=2e-6)
        # the seen rows get gradients and move far more: the prediction is about the unseen ones only
        assert drift[counts > 50].min() > 2 * expected


def test_a_tied_head_gives_never_seen_rows_a_gradient(tmp_path):
    tok, ds, tc, cb = _run(tmp_path, "gpt2")
    unseen = np.flatnonzero(token_counts(ds, len(tok)) == 0)
    step, drift, decay = cb.records[-1]
    # the softmax pushes never-seen tokens' logits down through the shared rows: not decay alone
    assert np.abs(drift[unseen] - _prediction(tc, 0, step)).min() > 1e-3


def test_report_from_checkpoints(untied, tmp_path, capsys):
    tok, ds, tc, cb = untied
    run = ds.path.parent / "run"
    out = tmp_path / "report"
    assert main(["lab", "data", "drift", "--run", str(run), "--out", str(out), "--token", "the", "--token", " old",
                 "--probe", "the old man", "--top", "5"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == [10, 20, 30] and res["verdict"] == "holds"
    # from checkpoint 10 to 30: the callback's rows (both measured from step 0) give the same interval drift
    first, last = cb.records[0][1], cb.records[-1][1]
    unseen = np.flatnonzero(np.array(res["counts"]) == 0)
    assert res["unseen_tokens"] == len(unseen)
    assert res["decay_only"][-1] == pytest.approx(_prediction(tc, 10, 30), rel=1e-12)
    np.testing.assert_allclose(np.array(res["drift_final"])[unseen], _prediction(tc, 10, 30), atol=2e-6)
    assert first[unseen].max() < last[unseen].min()  # decay keeps going
    assert len(res["volatile"]) == 5 and res["volatile"][0]["drift"] == max(res["drift_final"])
    # a token by its name, or by a text that is one token; shown as text
    assert [r["token"] for r in res["neighbours"]] == ["'the'", "'old'"] and len(res["probes"]) == 1
    assert (out / "drift_vs_frequency.png").stat().st_size > 0 and "drift" in (out / "report.html").read_text()
    assert main(["lab", "data", "drift", "--run", str(run), "--out", str(out)]) == 2  # never overwrites
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_too_few_checkpoints_unknown_tokens_and_empty_probes_are_refused(untied, tmp_path, capsys):
    tok, ds, tc, cb = untied
    run = ds.path.parent / "run"
    assert main(["lab", "data", "drift", "--run", str(run), "--out", str(tmp_path / "a"), "--token", "qqqq"]) == 2
    assert "not tokens of this run's tokenizer (nor texts of one token): 'qqqq'" in capsys.readouterr().err
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    (tmp_path / "one" / "config.json").write_text(json.dumps({"train": {}, "model": {}}))
    assert main(["lab", "data", "drift", "--run", str(tmp_path / "one"), "--out", str(tmp_path / "b")]) == 2
    assert "drift needs at least two" in capsys.readouterr().err
    assert main(["lab", "data", "drift", "--run", str(run), "--out", str(tmp_path / "c"), "--probe", ""]) == 2
    assert capsys.readouterr().err == "lmlab: error: --probe '' is empty: it gives no tokens\n"
    assert not (tmp_path / "c").exists()


def test_a_bare_string_is_not_a_list_of_probes_or_tokens(untied, tmp_path):
    """probes="Марья" was five probes, one per letter (tokens= the same), as merge_dirs refuses a single path."""
    from lmlab.lab.drift import run_drift
    tok, ds, tc, cb = untied
    run = ds.path.parent / "run"
    for kw, value in (("probes", "Марья"), ("tokens", "the")):
        with pytest.raises(ValueError, match=f"^{kw} must be a list of texts, not the single string '{value}'; "
                                             f"give \\['{value}'\\]$"):
            run_drift(run, tmp_path / "o", **{kw: value})
    assert not (tmp_path / "o").exists()


def test_row_drift_and_neighbours_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    b = torch.tensor([[3.0, 4.0], [2.0, 0.0], [0.0, 0.5], [0.9, 0.1]])
    assert row_drift(a, b).tolist() == pytest.approx([0.0, 1.0, 0.5, 0.0])
    assert neighbours(a, [1], k=2) == {1: [3, 0]}


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer, metrics):
        trainer.should_stop = trainer.should_stop or trainer.step == self.step


def _tracked(tmp, tok, ds, callbacks=(), resume=False):
    """`--drift-every 5 --drift-probes "the old man"` on the untied model of _run, 30 steps."""
    mc = ModelConfig(family="llama", vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, block_size=16)
    torch.manual_seed(0)
    model = Transformer(mc)
    tc = TrainConfig(max_steps=30, batch_size=4, lr=3e-2, warmup_steps=5, weight_decay=0.5, eval_every=0,
                     save_every=10, keep_last=0, log_every=100, device="cpu", seed=0, peak_flops=1e12, sample_every=0,
                     drift_every=5, drift_probes=["the old man"])
    with quiet():
        train(model, tok, ds, tc, tmp, list(callbacks), resume=resume)
    return tc, json.loads((tmp / "drift.json").read_text())


def test_drift_every_writes_drift_json_and_a_resumed_run_records_what_an_uninterrupted_one_does(untied, tmp_path):
    tok, ds, _, _ = untied
    tc, whole = _tracked(tmp_path / "whole", tok, ds)
    assert [r["step"] for r in whole["records"]] == [5, 10, 15, 20, 25, 30] and whole["step"] == 30
    counts = token_counts(ds, len(tok))
    assert whole["counts"] == counts.tolist() and whole["probes"] == ["the old man"]
    top = np.argsort(-np.array(whole["drift"]))[:20]
    assert [v["id"] for v in whole["volatile"]] == top.tolist()
    assert [v["token"] for v in whole["volatile"]] == [tok.decode([int(i)]) for i in top]
    for r in whole["records"]:  # decay alone, from the learning rates the run used
        assert r["decay_only"] == pytest.approx(_prediction(tc, 0, r["step"]), rel=1e-12)
    unseen = np.flatnonzero(counts == 0)
    np.testing.assert_allclose(np.array(whole["drift"])[unseen], _prediction(tc, 0, 30), rtol=0, atol=2e-6)
    # the probe's drift is its last hidden states' relative change from step 0 to the final weights
    mc = ModelConfig(family="llama", vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, block_size=16)
    torch.manual_seed(0)
    start, final = Transformer(mc), lmlab.load(tmp_path / "whole" / "final")[0]
    assert whole["records"][-1]["probes"][0] == pytest.approx(
        hidden_drift(start, final, [tok.encode("the old man")])[0], rel=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "drift/mean" in m] == [5, 10, 15, 20, 25, 30]
    # stopped at step 10 (a checkpoint), resumed to 30: the same records as the run that never stopped
    _tracked(tmp_path / "parts", tok, ds, [StopAt(10)])
    _, parts = _tracked(tmp_path / "parts", tok, ds, resume=True)
    assert [r["step"] for r in parts["records"]] == [5, 10, 15, 20, 25, 30]
    for a, b in zip(whole["records"], parts["records"]):
        assert b["decay_only"] == pytest.approx(a["decay_only"], rel=1e-12)
        for key in ("mean", "max"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
        assert b["probes"][0] == pytest.approx(a["probes"][0], rel=1e-5)
    np.testing.assert_allclose(parts["drift"], whole["drift"], rtol=1e-4, atol=1e-7)


def test_drift_by_kind_by_hand():
    kinds = token_kinds({"reasoning": np.array([3, 0, 1, 0, 2]), "knowledge": np.array([0, 4, 1, 0, 1]),
                         "noise": np.array([0, 0, 1, 0, 0])})
    assert kinds.tolist() == ["reasoning", "knowledge", "mixed", "absent", "reasoning"]  # 2 of 3 is enough
    drift, counts = np.array([0.2, 0.4, 0.1, 0.05, 0.3]), np.array([1, 1, 4, 0, 5])
    # count bins (powers of two): [1, 1, 3, 0, 3]; their median drifts 0.3, 0.3, 0.2, 0.05, 0.2
    rows = {r["kind"]: r for r in drift_by_kind(drift, kinds, counts)}
    assert list(rows) == ["knowledge", "reasoning", "mixed", "absent"]
    assert rows["reasoning"] == pytest.approx({"kind": "reasoning", "tokens": 2, "median_count": 3.0,
                                               "mean_drift": 0.25, "mean_adjusted_drift": (0.2 / 0.3 + 1.5) / 2})
    assert rows["knowledge"]["mean_adjusted_drift"] == pytest.approx(0.4 / 0.3)
    assert rows["mixed"]["mean_adjusted_drift"] == pytest.approx(0.5)
    assert rows["absent"] == pytest.approx({"kind": "absent", "tokens": 1, "median_count": 0.0, "mean_drift": 0.05,
                                            "mean_adjusted_drift": 1.0})


def test_report_by_kind_of_text_from_lab_data_split(untied, tmp_path, capsys):
    tok, ds, tc, cb = untied
    book = tmp_path / "book.txt"
    book.write_text(demo_corpus(n_stories=30, seed=0) + "\n\nIf it rains, then the ground is wet; therefore we "
                    "stay in, because we conclude that it follows.\n")
    assert main(["lab", "data", "split", str(book), "--out", str(tmp_path / "split")]) == 0
    out = tmp_path / "kinds"
    run = ds.path.parent / "run"
    assert main(["lab", "data", "drift", "--run", str(run), "--out", str(out), "--kinds", str(tmp_path / "split")]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["kind"]: r for r in res["by_kind"]}
    assert sum(r["tokens"] for r in rows.values()) == len(tok)
    assert rows["absent"]["tokens"] >= len(UNSEEN.split()) and rows["knowledge"]["tokens"] > 100
    assert "reasoning" in rows  # the one argued paragraph's own words
    assert "drift by the kind of text" in (out / "report.html").read_text()
    assert main(["lab", "data", "drift", "--run", str(run), "--out", str(tmp_path / "x"),
                 "--kinds", str(tmp_path)]) == 2
    assert "lacks reasoning.txt, knowledge.txt, noise.txt: give the --out folder of `lmlab lab data split`" \
        in capsys.readouterr().err


def test_a_token_inside_a_character_is_named_by_its_bytes():
    """The volatile tokens and neighbours were named repr(decode): every byte-level token that ends inside a UTF-8
    character read '\ufffd', many tokens one name."""
    from lmlab.lab.drift import token_name
    tok = Tokenizer.train(["Марья пошла к морю, и море шумело. " * 40], kind="bpe", vocab_size=300)
    names = [token_name(tok, i) for i in range(len(tok)) if tok.decode([i])]  # (special tokens decode to "")
    assert len(set(names)) == len(names) and not any("\ufffd" in n for n in names)
    whole = tok.token_to_id("Ġи") or tok.encode(" и")[0]
    assert token_name(tok, whole) == repr(tok.decode([whole]))  # whole text: as before
    partial = [n for n in names if "<0x" in n]
    assert partial and all(n.startswith("'") and n.endswith("'") for n in partial)
    assert token_name(tok, len(tok)) == f"#{len(tok)}"
