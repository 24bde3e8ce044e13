"""`lmlab train`, `lmlab eval` and `lmlab demo` from the command line, including bad input."""

import json

import pytest

from lmlab.cli import main
from lmlab.train.demo_corpus import demo_corpus


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    path = tmp_path_factory.mktemp("books") / "tales.txt"
    path.write_text(demo_corpus(n_stories=150, seed=1), encoding="cp1251")  # a legacy-encoded Russian book
    return path


def test_train_resume_eval_generate(tmp_path, book, capsys):
    run = tmp_path / "run"
    args = ["train", str(book), "--preset", "llama-tiny", "--vocab-size", "400", "--out", str(run),
            "--max-steps", "12", "--batch-size", "4", "--seq-len", "64", "--eval-every", "6", "--save-every", "6",
            "--log-every", "3", "--warmup-steps", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stopped after 12 steps (max_steps)" in out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 12 and "val_loss" in lines[-1]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 12 and saved["model"]["family"] == "llama"
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "18"]) == 0
    assert "stopped after 18 steps" in capsys.readouterr().out
    assert main(["eval", str(run / "final"), str(book)]) == 0
    assert "bits per byte" in capsys.readouterr().out
    assert main(["generate", str(run / "final"), "--prompt", "Жили", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert main(["info", str(run / "final")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["train", "missing.txt", "--preset", "gpt2-tiny", "--out", "{tmp}/r", "--max-steps", "1"], "missing.txt"),
    (["train", "{empty}", "--preset", "gpt2-tiny", "--out", "{tmp}/r", "--max-steps", "1"], "empty"),
    (["train", "{book}", "--preset", "gpt2-nope", "--out", "{tmp}/r", "--max-steps", "1"], "preset"),
    (["train", "{book}", "--preset", "gpt2-tiny", "--out", "{tmp}/r", "--max-steps", "0"], "max_steps"),
    (["train", "{book}", "--out", "{tmp}/r", "--max-steps", "1"], "--preset"),
    (["train", "--out", "{tmp}/nothing", "--resume"], "not a run directory"),
    (["eval", "{tmp}/nomodel", "{book}"], "not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, book, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("   \n")
    argv = [a.format(tmp=tmp_path, book=book, empty=tmp_path / "empty.txt") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error:") and "\n" not in err and message in err, err
    assert not (tmp_path / "r" / "final").exists()


@pytest.mark.slow
def test_demo_learns_the_book(tmp_path, capsys):
    from lmlab.train.recipes import run_demo
    summary = run_demo(tmp_path / "demo", max_steps=300, echo=lambda *a: None)
    assert summary["val_loss_after"] < 0.5 * summary["unigram_baseline"] < summary["val_loss_before"]
    assert main(["generate", str(tmp_path / "demo" / "final"), "--prompt", "Жили-были", "--greedy",
                 "--max-new-tokens", "20"]) == 0
    assert "Жили-были" in capsys.readouterr().out
