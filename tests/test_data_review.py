"""What a review of the data tools found, each fixed: a folder of no documents taken for an empty corpus (a
contamination check of nothing said every item was clean), dedup writing two documents to one file, dedup's
JSON in the locale's encoding, contamination's --out over any file, drift's --out over a user's files, a
language code in capitals or in words keeping no document, and the web API reading a path given in a query."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_server_support import client, settings, upload

from lmlab.cli import main


def test_a_folder_of_no_documents_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "eval.txt").write_text("the quick brown fox jumps over the lazy dog again and again and again\n")
    for argv in (["data", "contamination", "--train", str(tmp_path / "empty"), "--eval", str(tmp_path / "eval.txt")],
                 ["data", "dedup", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                 ["data", "filter", str(tmp_path / "empty"), "--filters", "gopher", "--out", str(tmp_path / "o")],
                 ["data", "inspect", str(tmp_path / "empty")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "no documents (" in err and f"in the folder {tmp_path / 'empty'}" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_dedup_refuses_two_documents_of_one_file_name_and_writes_utf8_in_any_locale(tmp_path, capsys):
    (tmp_path / "notes").write_text("hello world, a first note\n")
    (tmp_path / "notes.txt").write_text("other text here, a second note\n")
    assert main(["data", "dedup", str(tmp_path / "notes"), str(tmp_path / "notes.txt"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "two documents would be written as the same file: texts/notes.txt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "ru").mkdir()
    (tmp_path / "ru" / "a.txt").write_text("Ёжик шёл по лесу.\n\nЁжик шёл по лесу.\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, "-X", "utf8=0", "-m", "lmlab.cli", "data", "dedup", str(tmp_path / "ru"),
                        "--out", str(tmp_path / "d"), "--level", "paragraph"], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert "Ёжик" in (tmp_path / "d" / "clusters.json").read_text(encoding="utf-8")


def test_contamination_out_never_replaces_a_file(tmp_path, capsys):
    train = tmp_path / "train.txt"
    train.write_text("the quick brown fox jumps over the lazy dog again and again and again\n")
    assert main(["data", "contamination", "--train", str(train), "--eval", str(train), "--out", str(train)]) == 2
    assert f"--out {train} exists; choose a new file" in capsys.readouterr().err
    assert train.read_text().startswith("the quick")  # it held JSON after the run
    assert main(["data", "contamination", "--train", str(train), "--eval", str(train), "--out",
                 str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["items"] == 1


def test_drift_refuses_a_folder_with_a_users_files(tmp_path):
    from lmlab.lab.drift import run_drift
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("precious")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        run_drift(run, out)
    assert (out / "report.html").read_text() == "precious"


def test_language_codes_are_read_as_the_model_has_them():
    from lmlab.data.filters import parse_filters
    assert parse_filters("lang=RU+Uk", "document")[0].langs == ("ru", "uk")
    with pytest.raises(ValueError, match="'russian' is not a language code of py3langid's model"):
        parse_filters("lang=russian", "document")


def test_the_api_reads_no_path_given_in_a_filter(tmp_path):
    with client(settings(tmp_path)) as c:
        assert upload(c).status_code == 201
        for spec in ("c4:bad_words=/etc/passwd", "c4:bad_words=/nonexistent"):  # a line of any file; a 500
            r = c.get("/api/v1/books/tales.txt/data/filters", params={"spec": spec})
            assert r.status_code == 422 and "reads no path given in a request" in r.json()["detail"], r.text
