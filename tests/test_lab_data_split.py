"""lmlab lab data split (lab/split.py): labels and scores on a hand-made fixture against the documented rules, the
model's signals against a direct computation, the files a mixture takes, and the CLI's refusals."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import torch.nn.functional as F

from lmlab.cli import main
from lmlab.lab.split import heuristic_scores, label, model_scores, passages
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer

# (passage, label, rule): one per rule, English and Russian
FIXTURE = [
    ("Since every even number is even, and if the claim holds for n, then it follows that the bound is tight. "
     "Therefore the proof is complete, because nothing else can happen.", "reasoning", "reasoning/markers"),
    ("Paris is the capital of France. The Eiffel Tower was built in 1889 by Gustave Eiffel and is 330 metres tall.",
     "knowledge", "knowledge/default"),
    ("buy now buy now buy now buy now buy now buy now buy now", "noise", "noise/repetition"),
    ("x = {a} + [b] * <c> ; y = (d) / |e| ; z = #f", "noise", "noise/symbols"),
    ("Home\nAbout us\nContact\nLogin here or sign up today", "noise", "noise/short_lines"),
    ("Если число делится на четыре, то оно чётное, поэтому и сумма двух таких чисел делится на два. "
     "Следовательно, утверждение верно.", "reasoning", "reasoning/markers"),
    ("Москва — это столица России. Город основан в 1147 году князем Юрием Долгоруким.", "knowledge",
     "knowledge/default"),
    ("Ok, see you.", "noise", "noise/short"),
    ("The fox ran into the wood and slept under a tree until the morning came.", "knowledge", "knowledge/default"),
]


@pytest.mark.parametrize("text, want, rule", FIXTURE)
def test_labels_follow_the_documented_rules(text, want, rule):
    assert label(heuristic_scores(text)) == (want, rule)


def test_scores_by_hand():
    s = heuristic_scores(FIXTURE[1][0])
    # entities: France, Eiffel, Tower, Gustave, Eiffel (Paris and The start sentences); numbers 1889, 330; date 1889;
    # one definition ("is the")
    assert (s["words"], s["entities"], s["numbers"], s["dates"], s["definitions"], s["markers"]) == (21, 5, 2, 1, 1, 0)
    assert s["knowledge"] == pytest.approx(100 * (2 + 1 + 5 + 2 * 1) / 21)
    s = heuristic_scores(FIXTURE[0][0])
    # since, if, then, follows, therefore, proof, because
    assert s["markers"] == 7 and s["reasoning"] == pytest.approx(100 * 3 * 7 / s["words"])
    s = heuristic_scores(FIXTURE[5][0])
    assert s["markers"] == 3 and s["entities"] == 0  # если, поэтому, следовательно
    s = heuristic_scores(FIXTURE[2][0])
    assert s["repetition"] == pytest.approx(1 - 2 / 12)  # 12 word 3-grams, 2 distinct
    s = heuristic_scores(FIXTURE[4][0])
    assert s["short_lines"] == pytest.approx(3 / 4) and s["lines"] == 4
    assert heuristic_scores("«Не бойся», — сказал Иван.")["entities"] == 1  # Иван; «Не» starts the sentence


def test_the_model_rule_and_the_order_of_rules():
    s = heuristic_scores(FIXTURE[0][0])
    assert label({**s, "loss_z": 3.5, "loss_gap": 0.6}) == ("noise", "noise/model")
    assert label({**s, "loss_z": 2.9, "loss_gap": 0.6}) == ("reasoning", "reasoning/markers")
    assert label({**s, "loss_z": 9.0, "loss_gap": 0.4}) == ("reasoning", "reasoning/markers")  # a tight corpus's z
    assert label({**heuristic_scores("Ok, see you."), "loss_z": 9.0, "loss_gap": 3.0})[1] == "noise/short"  # in order


def test_passages():
    assert passages("a b\n\n \n c\nd \n\n") == ["a b", "c\nd"]
    assert passages("a b\n\nc", "document") == ["a b\n\nc"] and passages(" \n", "document") == []


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = Tokenizer.train([t for t, _, _ in FIXTURE] * 5, kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=16, n_layer=1, n_embd=32))
    save_pretrained(d / "m", model, tok)
    return d / "m", model, tok


def test_model_signals_against_a_direct_computation(model_dir):
    path, model, tok = model_dir
    text = FIXTURE[0][0]  # longer than the block: several windows
    got = model_scores(path, [text])[0]
    ids = torch.tensor(tok.encode(text, add_bos=True))
    assert len(ids) > 2 * 16 + 1
    model.eval()
    model.zero_grad()
    nll = torch.cat([F.cross_entropy(model(ids[i:i + 17][None, :-1]).logits[0], ids[i + 1:i + 17], reduction="none")
                     for i in range(0, len(ids) - 1, 16)])
    assert len(nll) == len(ids) - 1
    loss = nll.mean()
    loss.backward()
    norm = torch.stack([p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None]).sum().sqrt()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert got["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert got["loss_z"] is None and got["loss_gap"] == 0.0  # one passage: no z-score, the median is its own loss
    # the z-score over MIN_PASSAGES_FOR_Z passages: by hand from the losses
    texts = [t for t, _, _ in FIXTURE] + [FIXTURE[0][0] + " " + FIXTURE[1][0]]
    rows = model_scores(path, texts)
    losses = [r["loss"] for r in rows]
    med = statistics.median(losses)
    mad = 1.4826 * statistics.median([abs(v - med) for v in losses])
    assert [r["loss_z"] for r in rows] == pytest.approx([(v - med) / mad for v in losses])


def test_cli_writes_labels_files_and_report(tmp_path, model_dir):
    src = tmp_path / "book.txt"
    src.write_text("\n\n".join(t for t, _, _ in FIXTURE) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["lab", "data", "split", str(src), "--model", str(model_dir[0]), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "passages.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["text"], r["label"], r["rule"]) for r in rows] == FIXTURE  # fewer than 10 passages: no model rule
    assert all(r["scores"]["loss"] > 0 and r["scores"]["grad_norm"] > 0 for r in rows)
    for lab in ("reasoning", "knowledge", "noise"):
        want = "\n\n".join(t for t, w, _ in FIXTURE if w == lab) + "\n"
        assert (out / f"{lab}.txt").read_text(encoding="utf-8") == want
    res = json.loads((out / "results.json").read_text())
    assert res["counts"] == {"reasoning": 2, "knowledge": 3, "noise": 4}
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "reasoning: examples" in page and "Москва" in page and "noise/repetition" in page
    # the class files are mixture sources as they stand
    assert main(["data", "prepare", str(out / "reasoning.txt"), str(out / "knowledge.txt"), "--tokenizer",
                 str(model_dir[0]), "--weight", "reasoning=2", "--out", str(tmp_path / "tokens")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["missing.txt"], "missing.txt"),
    (["book.txt", "--model", "nomodel"], "nomodel"),
])
def test_cli_refuses_bad_input(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_text("Some text here for a paragraph.\n")
    assert main(["lab", "data", "split", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: ") and message in err


def test_an_existing_folder_is_refused(tmp_path, capsys):
    (tmp_path / "book.txt").write_text("Some text here for a paragraph.\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert main(["lab", "data", "split", str(tmp_path / "book.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_sources_that_share_a_file_name_are_told_apart(tmp_path):
    for folder, text in (("x", "The fox ran into the wood because it was cold and therefore it hid.\n\n"
                               "Another plain sentence about a cat that sat on the mat today.\n"),
                         ("y", "#### $$$$ %%%% &&&& ****\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.txt").write_text(text)
    out = tmp_path / "out"
    assert main(["lab", "data", "split", str(tmp_path / "x" / "notes.txt"), str(tmp_path / "y" / "notes.txt"),
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "passages.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["source"], r["index"]) for r in rows] == [("x/notes.txt", 0), ("x/notes.txt", 1), ("y/notes.txt", 0)]
    per_source = json.loads((out / "results.json").read_text())["extra_tables"][0]["rows"]
    assert per_source == [{"source": "x/notes.txt", "reasoning": 1, "knowledge": 1, "noise": 0},
                          {"source": "y/notes.txt", "reasoning": 0, "knowledge": 0, "noise": 1}]
