"""`lmlab eval` (texts, tasks, --json, errors), `lmlab eval make-task` (held-out text only; the model trained on
the book wins on its cloze task) and `lmlab compare` (intervals, flips, report.html), on two tiny runs."""

import argparse
import json
import random
import shutil

import pytest
import torch

from lmlab.cli import main
from lmlab.data import TokenDataset
from lmlab.eval import load_task, run_task
from lmlab.eval.maketask import held_out_texts, make_items
from lmlab.eval.tasks import SHIPPED
from lmlab.models.io import load_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus

TRAIN = ["--preset", "llama-tiny", "--vocab-size", "400", "--batch-size", "8", "--seq-len", "64",
         "--eval-every", "1000", "--save-every", "30", "--log-every", "1000", "--warmup-steps", "5", "--lr", "3e-3",
         "--val-fraction", "0.2", "--no-compile"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run a: trained on a book of tales; run b: the same recipe on another text (standard-library docs)."""
    root = tmp_path_factory.mktemp("runs")
    tales = root / "tales.txt"
    tales.write_text(demo_corpus(n_stories=120, seed=3), encoding="utf-8")
    other = root / "docs.txt"
    docs = [m.__doc__ for m in (argparse, json, random, shutil, pytest) if m.__doc__]
    other.write_text("\n\n".join(docs * 3), encoding="utf-8")
    for name, book in (("a", tales), ("b", other)):
        extra = ["--eval-tasks", "fables-mc", "--eval-every", "30"] if name == "a" else []
        assert main(["train", str(book), "--out", str(root / name), "--max-steps", "60", *TRAIN, *extra]) == 0
    return root, tales


def test_make_task_uses_only_held_out_text_and_the_book_model_wins(runs, capsys, tmp_path):
    root, tales = runs
    task_file = tmp_path / "tales-cloze.yaml"
    assert main(["eval", "make-task", "tales.txt", "--run", str(root / "a"), "--kind", "cloze",
                 "--out", str(task_file), "--items", "120"]) == 0
    assert "cloze items from the held-out text of 1 document(s)" in capsys.readouterr().out
    task = load_task(task_file)
    # the dataset's split, read independently of make-task: the val and train token ranges of the book
    tok = Tokenizer.load(root / "a" / "tokenizer.json")
    ds = TokenDataset.open(root / "a" / "data", tok)
    (doc,) = ds.documents
    val = tok.decode(ds.tokens[doc.val[0]:doc.val[1]].tolist())
    train = tok.decode(ds.tokens[doc.train[0]:doc.train[1]].tolist())
    assert held_out_texts(root / "a") == {doc.name: val}
    assert len(task.items) >= 60
    for it in task.items:
        assert it["context"] in val and all(c in val for c in it["choices"])
    # the check can tell: the tales repeat whole sentences, yet items cut from the training part are mostly not
    # in the held-out part
    from_train = make_items([train], "cloze", n=120)
    assert sum(it["context"] in val for it in from_train) < len(from_train) / 2
    model_a, tok_a = load_pretrained(root / "a" / "final")
    model_b, tok_b = load_pretrained(root / "b" / "final")
    acc_a = run_task(model_a, tok_a, task)["metrics"]["acc"]
    acc_b = run_task(model_b, tok_b, task)["metrics"]["acc"]
    assert acc_a > acc_b + 0.1, (acc_a, acc_b)
    # compare: B against A with paired intervals and the flipped items
    assert main(["compare", str(root / "a"), str(root / "b"), "--tasks", str(task_file), "--out",
                 str(tmp_path / "cmp"), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    row = next(r for r in c["rows"] if r["metric"] == "acc")
    assert row["delta"] == pytest.approx(acc_b - acc_a) and row["low"] <= row["delta"] <= row["high"] < 0
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    ra, rb = (r["tasks"][0]["items"] for r in saved["results"])
    assert [f["item"] for f in c["flips"] if f["metric"] == "acc"] == [i for i in range(len(ra))
                                                                       if ra[i]["acc"] != rb[i]["acc"]]
    report = (tmp_path / "cmp" / "report.html").read_text()
    assert report.startswith("<!doctype html>") and "<svg" in report and "<script" not in report
    assert main(["eval", "make-task", "--run", str(root / "a"), "--out", str(task_file)]) == 2
    assert f"{task_file} exists" in capsys.readouterr().err


def test_make_task_is_the_same_command_after_debug(runs, capsys, tmp_path):
    """`lmlab --debug eval make-task ...` was parsed as `eval` with a text named make-task: "unrecognized
    arguments: --run ..."."""
    root, _ = runs
    argv = ["eval", "make-task", "--run", str(root / "a"), "--items", "3", "--out"]
    assert main([*argv, str(tmp_path / "plain.yaml")]) == 0
    assert main(["--debug", *argv, str(tmp_path / "debug.yaml")]) == 0
    plain, debug = load_task(tmp_path / "plain.yaml"), load_task(tmp_path / "debug.yaml")
    assert debug.items == plain.items and len(plain.items) == 3


def test_eval_tasks_json_and_table_equal_the_library(runs, capsys):
    root, tales = runs
    assert main(["eval", str(root / "a"), "--tasks", "fables-mc,fables-lm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, tok = load_pretrained(root / "a" / "final")
    assert out["tasks"] == [run_task(model, tok, load_task(t), batch_size=8) for t in ("fables-mc", "fables-lm")]
    assert main(["eval", str(root / "a"), str(tales), "--tasks", "fables-gen", "--stride", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("loss ") and "bits per byte" in lines[0]
    assert lines[2].startswith("fables-gen") and "corpus_bleu" in lines[2]
    assert lines[3].split() [:3] == ["sacrebleu", "bleu:", "nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:"
                                     + lines[3].split("version:")[1]]


def test_all_checkpoints_write_a_trajectory(runs, capsys):
    from lmlab.train.checkpoint import checkpoint_model
    root, tales = runs
    assert main(["eval", str(root / "a"), "--all-checkpoints", "--tasks", "fables-mc", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["metric"]) for r in rows] == [(30, "acc"), (30, "acc_norm"), (60, "acc"), (60, "acc_norm")]
    tok = Tokenizer.load(root / "a" / "tokenizer.json")
    for step in (30, 60):
        model = checkpoint_model(root / "a" / "checkpoints" / f"step-{step}")
        expected = run_task(model, tok, load_task("fables-mc"), batch_size=8)["metrics"]
        assert {r["metric"]: r["value"] for r in rows if r["step"] == step} == expected
    saved = (root / "a" / "eval" / "trajectory.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in saved] == rows
    # `lmlab train --eval-tasks` logged the same numbers while training (the checkpoint of step 30 is the model
    # that step evaluated)
    logged = {m["step"]: m for m in map(json.loads, (root / "a" / "metrics.jsonl").read_text().splitlines())}
    for r in rows:
        assert logged[r["step"]][f"fables-mc/{r['metric']}"] == r["value"]
    assert (root / "a" / "eval" / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", str(root / "a" / "final"), "--all-checkpoints", "--tasks", "fables-mc"]) == 2
    assert "is not a training run with checkpoints" in capsys.readouterr().err


def test_all_checkpoints_of_a_lora_run_are_its_models_at_those_steps(runs, capsys, tmp_path):
    """A LoRA run's checkpoints hold the frozen weights beside the adapters: `--all-checkpoints` refused them
    ("evaluate the run's final/"). Now each is put together as the run had it and merged: the last checkpoint is
    final/'s model, the first another one."""
    from lmlab.train.checkpoint import checkpoint_model
    from lmlab.tune.lora import checkpoint_adapters
    root, tales = runs
    lo = tmp_path / "lo"
    assert main(["train", str(tales), "--out", str(lo), "--init", str(root / "a" / "final"), "--lora-rank", "4",
                 "--max-steps", "6", "--save-every", "3", "--batch-size", "8", "--seq-len", "64", "--lr", "1e-2",
                 "--eval-every", "0", "--no-compile"]) == 0
    capsys.readouterr()
    assert main(["eval", str(lo), "--all-checkpoints", "--tasks", "fables-mc", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["metric"]) for r in rows] == [(3, "acc"), (3, "acc_norm"), (6, "acc"), (6, "acc_norm")]
    final, tok = load_pretrained(lo / "final")
    expected = run_task(final, tok, load_task("fables-mc"), batch_size=8)["metrics"]
    assert {r["metric"]: r["value"] for r in rows if r["step"] == 6} == expected
    x = torch.tensor([tok.encode("Жили-были кот и лиса")])
    with torch.no_grad():
        last, first = (checkpoint_model(lo / "checkpoints" / f"step-{s}", checkpoint_adapters)(x).logits
                       for s in (6, 3))
        torch.testing.assert_close(last, final.eval()(x).logits, atol=1e-5, rtol=0)
        assert (first - last).abs().max() > 1e-3


def test_probes_on_the_command_line_equal_the_library(runs, capsys):
    from lmlab.eval import probes
    from lmlab.models import GenerationConfig, generate
    root, _ = runs
    assert main(["eval", str(root / "a"), "--probes", "3", "--prompt", "Жили-были", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["probes"]
    model, tok = load_pretrained(root / "a" / "final")
    samples = [generate(model, tok, "Жили-были", GenerationConfig(seed=s)) for s in range(3)]
    ds = TokenDataset.open(root / "a" / "data", tok)
    assert got == probes(samples, tok.decode(ds.tokens[:ds.train_tokens].tolist()))
    assert set(got) == {"distinct_1", "distinct_2", "repetition_4", "self_bleu", "compression_ratio",
                        "longest_shared_ngram"}


@pytest.mark.parametrize("argv, message", [
    (["eval", "{a}", "--tasks", "nope"], "lmlab: error: unknown task 'nope': not a file, nor a shipped task "
                                         "(fables-gen, fables-lm, fables-mc)"),
    (["eval", "{a}", "--tasks", "{bad}"], "lmlab: error: {badjsonl}:2: missing 'answer' (a multiple_choice item has "
                                          "context, choices, answer)"),
    (["eval", "{tmp}/missing", "--tasks", "fables-mc"], "lmlab: error: model directory not found: {tmp}/missing"),
    (["eval", "{a}"], "lmlab: error: give texts to evaluate on, --tasks, --probes N, or several"),
    (["eval", "{a}", "--probes", "0"], "lmlab: error: --probes must be >= 1"),
    (["eval", "{a}", "--tasks", "fables-mc", "--batch-size", "0"], "lmlab: error: --batch-size must be >= 1"),
    (["eval", "{a}", "{a}/../tales.txt", "--stride", "0"], "lmlab: error: stride (0) must be in [1, context length "
                                                           "128]"),
    (["compare", "{a}", "--tasks", "fables-mc"], "lmlab: error: compare needs at least two models"),
    # these three were taken: nothing scored and exit 0, NaN bits per byte, the model's context for 0
    (["eval", "{a}", "--tasks", " , "], "lmlab: error: --tasks ' , ' names no task: give task files or shipped "
                                        "task names, comma-separated"),
    (["compare", "{a}", "{a}", "--tasks", ","], "lmlab: error: --tasks ',' names no task: give task files or "
                                                "shipped task names, comma-separated"),
    (["eval", "{a}", "{tmp}/e1.txt", "{tmp}/e2.txt"], "lmlab: error: the texts are empty"),
    (["eval", "{a}", "{a}/../tales.txt", "--seq-len", "0"], "lmlab: error: --seq-len must be >= 1"),
    # taken before: an empty trajectory and exit 0; every item there is; a traceback; a bootstrap of hours
    (["eval", "{a}", "--all-checkpoints", "--probes", "3"], "lmlab: error: --probes cannot be combined with "
                                                             "--all-checkpoints: score the checkpoints on texts or "
                                                             "--tasks"),
    (["eval", "make-task", "--run", "{a}", "--out", "{tmp}/i0.yaml", "--items", "0"],
     "lmlab: error: --items must be >= 1"),
    (["eval", "{a}", "--tasks", "{tmp}/bin.yaml"], "lmlab: error: {tmp}/bin.yaml: not UTF-8 (byte 1)"),
    (["compare", "{a}", "{a}", "--tasks", "fables-mc", "--resamples", "100001"],
     "lmlab: error: --resamples (100001) must be <= 100000"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, monkeypatch, argv, message):
    root, _ = runs
    monkeypatch.chdir(tmp_path)  # a command taken by mistake writes its default output folder here, not in the checkout
    (tmp_path / "bad.yaml").write_text("name: bad\nkind: multiple_choice\ndata: bad.jsonl\n")
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["x"], "answer": 0}\n'
                                        '{"context": "a", "choices": ["x"]}\n')
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x01")
    fill = dict(a=root / "a", bad=tmp_path / "bad.yaml", badjsonl=tmp_path / "bad.jsonl", tmp=tmp_path)
    assert main([a.format(**fill) for a in argv]) == 2
    assert capsys.readouterr().err == message.format(**fill) + "\n"
    assert not list(tmp_path.glob("i0.*"))


def test_results_already_there_are_kept_unless_forced(runs, capsys, tmp_path):
    """eval --out, compare --out (lmlab-compare by default) and --all-checkpoints replaced earlier results, a
    user's own file in the folder included. Now: refused before anything is scored, one line, exit 2."""
    root, _ = runs
    out = tmp_path / "mine"
    out.mkdir()
    (tmp_path / "three.jsonl").write_text("".join((SHIPPED / "fables-mc.jsonl").read_text().splitlines(True)[:3]))
    (tmp_path / "three.yaml").write_text("name: three\nkind: multiple_choice\ndata: three.jsonl\n")
    runs_ = [(["eval", str(root / "a"), "--tasks", "fables-lm"], ["eval.json"]),
             (["compare", str(root / "a"), str(root / "b"), "--tasks", str(tmp_path / "three.yaml")],
              ["compare.json", "report.html"]),
             (["eval", str(root / "a"), "--all-checkpoints", "--tasks", "fables-lm"],
              ["trajectory.jsonl", "trajectory.png"])]
    for argv, files in runs_:
        for name in files:  # any one of the results is enough to refuse
            (out / name).write_text("my notes")
            assert main([*argv, "--out", str(out)]) == 2
            assert capsys.readouterr().err == (f"lmlab: error: {out / name} exists; replace it with --force, or "
                                               "choose another --out\n")
            assert [p.read_text() for p in out.iterdir()] == ["my notes"]
            (out / name).unlink()
        (out / files[0]).write_text("my notes")
        assert main([*argv, "--out", str(out), "--force"]) == 0
        capsys.readouterr()
        assert (out / files[0]).read_text() != "my notes" and all((out / f).is_file() for f in files)
        for f in files:
            (out / f).unlink()
    # a task of three items: no interval, in the table too
    assert main(["compare", str(root / "a"), str(root / "b"), "--tasks", str(tmp_path / "three.yaml"), "--out",
                 str(tmp_path / "cmp3")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("three ") and table[2].endswith("  none (under 6 items)")
