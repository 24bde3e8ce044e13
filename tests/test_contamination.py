"""Contamination (src/lmlab/eval/contamination.py): planted copies of eval items in the training text are all
found, near misses (12 shared words at n = 13) and clean items are not; the clean-subset score equals the task
scored on its clean items alone; `lmlab data contamination` and its errors."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from lmlab.cli import main
from lmlab.eval import load_task, run_task
from lmlab.eval.contamination import check, contamination
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer


def fresh_words(seed: int):
    rng = random.Random(seed)
    i = 0
    while True:
        i += 1
        yield f"{rng.choice('bdfgklmnprstvz')}{rng.choice('aeiou')}{i:x}"


@pytest.fixture()
def planted(tmp_path):
    """Training text of 3 documents; 16 lm items: 0-5 copied from training (case and punctuation changed,
    split anywhere into context / continuation), 6-7 short (5 words; 6 in training, 7 not), 8-11 near misses
    sharing exactly 12 consecutive words with training, 12-15 unrelated."""
    fresh = fresh_words(1)
    docs = [[next(fresh) for _ in range(300)] for _ in range(3)]
    rng = random.Random(2)
    texts = []
    for i in range(16):
        d = docs[i % 3]
        if i < 6:
            s = rng.randrange(250)
            w = [x.upper() if k % 3 == 0 else x + "," for k, x in enumerate(d[s:s + 20 + i])]
        elif i == 6:
            w = d[100:105]
        elif i < 12 and i != 7:
            s = rng.randrange(280)
            w = [next(fresh) for _ in range(6)] + d[s:s + 12] + [next(fresh) for _ in range(6)]
        else:
            w = [next(fresh) for _ in range(5 if i == 7 else 24)]
        cut = rng.randrange(1, len(w))
        texts.append({"context": " ".join(w[:cut]), "continuation": " ".join(w[cut:])})
    (tmp_path / "train").mkdir()
    for k, d in enumerate(docs):
        (tmp_path / "train" / f"doc{k}.txt").write_text(" ".join(d) + "\n")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    (tmp_path / "task.yaml").write_text("name: planted\nkind: lm\ndata: items.jsonl\n")
    # the same texts as multiple choice: the continuation is the right choice among three
    mc = []
    for t in texts:
        choices = [t["continuation"], " ".join(next(fresh) for _ in range(3)), " ".join(next(fresh) for _ in range(4))]
        answer = rng.randrange(3)
        choices[0], choices[answer] = choices[answer], choices[0]
        mc.append({"context": t["context"], "choices": choices, "answer": answer})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(t) + "\n" for t in mc))
    (tmp_path / "mc.yaml").write_text("name: planted-mc\nkind: multiple_choice\ndata: mc.jsonl\n")
    (tmp_path / "eval.txt").write_text("\n\n".join(f"{t['context']} {t['continuation']}" for t in texts) + "\n")
    return tmp_path, texts


def test_every_planted_item_is_flagged_and_no_clean_one(planted):
    root, texts = planted
    r = check([root / "train"], str(root / "task.yaml"))
    assert r["contaminated"] == [0, 1, 2, 3, 4, 5, 6] and r["clean"] == 9
    rows = r["per_item"]
    for i in range(6):  # 20 + i words wholly inside one training document: every 13-gram matches
        assert (rows[i]["ngrams"], rows[i]["matched"], rows[i]["documents"]) == (8 + i, 8 + i, [f"doc{i % 3}.txt"])
    assert (rows[6]["ngrams"], rows[6]["matched"]) == (1, 1)  # shorter than n: the whole item is one gram
    assert [rows[i]["matched"] for i in range(7, 16)] == [0] * 9
    # the same near misses are caught at n = 12, and the same items when the eval is a text of paragraphs
    assert check([root / "train"], str(root / "task.yaml"), n=12)["contaminated"] == [*range(7), 8, 9, 10, 11]
    assert check([root / "train"], str(root / "eval.txt"))["contaminated"] == list(range(7))


def test_overlap_counts_distinct_ngrams_against_every_document():
    train = ["a b c d e f", "x y z c d e"]
    (row,) = contamination(train, ["Z, C: d e F g"], n=3, train_names=["one", "two"])
    # grams: z c d, c d e, d e f, e f g -> "z c d" in two, "c d e" in both, "d e f" in one
    assert (row["ngrams"], row["matched"], row["overlap"], row["documents"]) == (4, 3, 0.75, ["one", "two"])


def test_training_text_in_pieces_and_yo(monkeypatch):
    """The training text is cut into words a piece at a time (the n-grams of a 45 MB book at once held 2.1 GB,
    docs/LOG.md): a gram across two pieces is still found, once per document; and ё matches е."""
    import lmlab.data.dedup as dd
    train = [" ".join(f"w{i}" for i in range(50)) + " Ёлка зелёная", "w20 w21 w22 w23"]
    items = ["W20, w21 w22 w23 w24", "w48 w49 елка зеленая", "w3 w5 w7 w9 w11"]
    whole = contamination(train, items, n=4)
    monkeypatch.setattr(dd, "WORD_CHUNK_CHARS", 5)  # a piece a word or two long
    rows = contamination(iter(train), items, n=4)
    assert rows == whole
    assert [(r["matched"], r["documents"]) for r in rows] == [(2, ["text-0", "text-1"]), (1, ["text-0"]), (0, [])]
    assert [r["matched"] for r in contamination(train, ["w1 w2 w3"], n=4)] == [1]  # shorter than n: one gram


def test_clean_subset_score_equals_the_task_scored_on_its_clean_items(planted):
    root, texts = planted
    torch.manual_seed(0)
    tok = Tokenizer.train([(root / "eval.txt").read_text()], kind="char")
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=256, vocab_size=len(tok))).eval()
    task = load_task(root / "mc.yaml")
    r = check([root / "train"], str(root / "mc.yaml"), model=model, tokenizer=tok)
    assert r["contaminated"] == [0, 1, 2, 3, 4, 5, 6]
    clean = dataclasses.replace(task, items=[t for i, t in enumerate(task.items) if i >= 7])
    ref_all, ref_clean = run_task(model, tok, task), run_task(model, tok, clean)
    assert r["scores"]["all"] == {**ref_all["metrics"], "n": 16}
    assert r["scores"]["clean"] == {**ref_clean["metrics"], "n": 9}
    assert r["scores"]["all"]["acc"] != r["scores"]["clean"]["acc"]  # the subsets differ: the check can tell
    save_pretrained(root / "model", model, tok)
    assert main(["data", "contamination", "--train", str(root / "train"), "--eval", str(root / "mc.yaml"),
                 "--model", str(root / "model"), "--device", "cpu", "--out", str(root / "c.json")]) == 0
    assert json.loads((root / "c.json").read_text())["scores"] == r["scores"]


def test_cli_prints_the_contaminated_items(planted, capsys):
    root, _ = planted
    assert main(["data", "contamination", "--train", str(root / "train"), "--eval", str(root / "task.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "planted: 7 of 16 items share a 13-gram with the training text (9 clean)"
    assert out[1].startswith("  item 0: 8/8 n-grams (100%) in doc0.txt: '") and len(out) == 8


@pytest.mark.parametrize("args, message", [
    (["--eval", "no-such-task"], "no such file or folder: no-such-task"),
    (["--eval", "ROOT/nope.yaml"], "unknown task 'ROOT/nope.yaml': not a file, nor a shipped task"),
    (["--eval", "ROOT/task.yaml", "--n", "0"], "n (0) must be at least 1"),
    (["--eval", "ROOT/eval.txt", "--model", "ROOT/train"], "--model scores tasks; ROOT/eval.txt is a text"),
])
def test_cli_errors_exit_2_with_one_line(planted, capsys, args, message):
    root, _ = planted
    args = [a.replace("ROOT", str(root)) for a in args]
    assert main(["data", "contamination", "--train", str(root / "train"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: ") and message.replace("ROOT", str(root)) in err and err.count("\n") == 1


def test_a_model_needs_a_task_not_a_text(planted):
    root, _ = planted
    with pytest.raises(ValueError, match="--model scores tasks; .*eval.txt is a text"):
        check([root / "train"], str(root / "eval.txt"), model=object())
