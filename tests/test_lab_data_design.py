"""lmlab lab data design: curation removes exactly the planted near copies and the noise the split rules name,
samples reach their token budget in a seeded order, a --quick run's verdict and numbers (target loss and an eval
task's accuracy) follow from its own models, and the refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.eval.tasks import load_task, run_task
from lmlab.lab.design import DesignLabConfig, design, run_design_lab, sample
from lmlab.lab.mix import target_loss
from lmlab.models.io import load_pretrained
from lmlab.tokenizers import Tokenizer

TALE = ("Жили-были дед да баба. Однажды дед пошёл в лес и нашёл большую репку. Дед обрадовался и всё рассказал "
        "бабе, и они пошли вместе домой.")
OTHER = ("Once upon a time a fox walked along the river and found a silver key. The fox was glad and told the hare, "
         "and they went home together before supper.")


def test_design_drops_near_copies_and_noise():
    # the last word changed: a near copy of Jaccard 0.91 (MinHash/LSH catches it with probability 0.9998; the
    # middle word this changed before left Jaccard 0.62, caught with probability 0.25, by luck of the hashes)
    copy = TALE.replace("домой", "обратно")
    junk = "# $ % & * + = < > | ~ ^ # $ % & * + = < > | ~ ^ a b c d e f g h"  # words enough, mostly symbols
    paragraphs = [TALE, OTHER, copy, junk, "too short", TALE]
    kept, removed = design(paragraphs)
    assert kept == [0, 1]
    assert removed == {"duplicates": 2, "noise/symbols": 1, "noise/short": 1}


def test_samples_reach_their_budget_in_a_seeded_order():
    lengths = [5, 7, 3, 9, 4, 6]
    a, b = sample(lengths, 12, seed=3), sample(lengths, 12, seed=3)
    assert a == b and sum(lengths[i] for i in a) >= 12
    assert sum(lengths[i] for i in a) - max(lengths[i] for i in a) < 12  # one paragraph fewer is under budget
    assert sample(lengths, 10**6, seed=0) == list(range(6))  # the whole pool at most


def tale_endings_task(folder, n=80):
    """A multiple-choice task on held-out tales of the pool's grammar: a sentence's first three words, and its own
    ending against the endings of two other sentences."""
    import json
    import random
    import re

    from lmlab.train.demo_corpus import demo_corpus
    text = demo_corpus(n_stories=60, seed=7)
    sentences = [x.split() for x in re.split(r"(?<=[.!?])\s+", text) if len(x.split()) >= 6]
    rng, items = random.Random(0), []
    for words in rng.sample(sentences, n):
        others = [" ".join(o[3:]) for o in rng.sample(sentences, 2)]
        choices = [" ".join(words[3:]), *others]
        rng.shuffle(choices)
        answer = choices.index(" ".join(words[3:]))
        items.append({"context": " ".join(words[:3]), "choices": choices, "answer": answer})
    lines = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items)
    (folder / "endings.jsonl").write_text(lines, encoding="utf-8")
    (folder / "endings.yaml").write_text("name: endings\nkind: multiple_choice\ndata: endings.jsonl\n",
                                         encoding="utf-8")
    return folder / "endings.yaml"


def test_a_quick_run_scores_its_own_models(tmp_path):
    task = tale_endings_task(tmp_path)
    cfg = dataclasses.replace(DesignLabConfig.quick(), tasks=(str(task),))
    res = run_design_lab(tmp_path / "d", None, None, [0, 1], cfg, workers=1)
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json")
    got = {}
    for r in res["per_seed"]:  # each arm's model on the eval task, as lmlab eval scores it
        for arm in ("designed", "same budget", "larger"):
            model, _ = load_pretrained(tmp_path / "d" / "runs" / f"{arm.replace(' ', '-')}-{r['seed']}" / "final")
            got[arm, r["seed"]] = run_task(model, tok, load_task(task))["metrics"]["acc"]
            assert r["tasks"]["endings"][arm] == got[arm, r["seed"]]
    assert len(set(got.values())) > 2  # the arms' models score differently: a mix-up of arms would show
    wins = sum(r["tasks"]["endings"]["designed"] >= r["tasks"]["endings"]["same budget"] for r in res["per_seed"])
    assert res["checks"]["on endings (acc), the designed set scores at least as well as the same-size sample on "
                         ">= 2/3 of the seeds"] == (wins / 2 >= 2 / 3)
    assert res["designed"] < res["paragraphs"] and res["removed"]["duplicates"] >= 11 * 20 // 2
    ids = np.load(tmp_path / "d" / "target.npy")
    for r in res["per_seed"]:
        t = r["tokens"]
        assert t["designed"] == res["budget_tokens"] <= t["same budget"]
        assert t["larger"] >= min(4 * res["budget_tokens"], res["pool_tokens"])
        model, _ = load_pretrained(tmp_path / "d" / "runs" / f"designed-{r['seed']}" / "final")
        assert target_loss(model, ids, cfg.block_size) == pytest.approx(r["designed"], rel=1e-6)
    beats = sum(r["designed"] < r["same budget"] for r in res["per_seed"])
    assert res["checks"]["the designed set beats a random sample of the same size on >= 2/3 of the seeds"] == (
        beats / 2 >= 2 / 3)
    assert (tmp_path / "d" / "report.html").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--larger", "1"], "larger (1.0) must be a finite number above 1"),
    (["--larger", "inf"], "larger (inf) must be a finite number above 1"),
    (["--larger", "nan"], "larger (nan) must be a finite number above 1"),
    (["books.txt"], "give both SOURCES and --target, or neither"),
    (["--steps", "0"], "--steps (0) must be >= 1"),
    (["--tasks", "nope"], "unknown task 'nope'"),
])
def test_refusals_exit_2(tmp_path, capsys, argv, message):
    assert main(["lab", "data", "design", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target, message", [
    ("hi", "the target has 2 tokens, fewer than one window of 33"),
    (None, "curation removed every paragraph"),
])
@pytest.mark.parametrize("exists", [False, True])
def test_a_refused_set_up_leaves_out_as_it_was(tmp_path, capsys, target, message, exists):
    pool = tmp_path / "pool.txt"
    if target is None:  # four paragraphs of symbols: all noise
        pool.write_text("\n\n".join(c * 60 for c in "#$%&"))
    else:
        pool.write_text("\n\n".join([TALE, OTHER, TALE + " " + OTHER, OTHER + " " + TALE]))
    (tmp_path / "t.txt").write_text(target or TALE)
    out = tmp_path / "o"
    if exists:
        out.mkdir()
    argv = ["lab", "data", "design", str(pool), "--target", str(tmp_path / "t.txt"), "--quick", "--seeds", "0",
            "--workers", "1", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err, err
    assert (sorted(out.iterdir()) == []) if exists else not out.exists()
