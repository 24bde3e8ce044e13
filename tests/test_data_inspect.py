"""lmlab data inspect: documents, characters, tokens, duplicates, encodings, languages and the epoch advisor
on a fixture equal hand counts."""

import json

import pytest

from lmlab.cli import main
from lmlab.data.inspect import MAX_USEFUL_EPOCHS, epoch_advice, histogram, inspect
from lmlab.models import ModelConfig
from lmlab.tokenizers import Tokenizer

RU1 = ("Анна Сергеевна вышла из вагона на маленькой станции, где поезд стоял всего две минуты.\n\n"
       "Было раннее утро, над платформой висел туман, и в нём едва угадывались очертания водокачки.\n")
RU2 = "Через час нашёлся извозчик, молчаливый старик с рыжей бородой и лошадью, которая спала на ходу.\n"
EN = ("The quick brown fox jumps over the lazy dog, and the dog does not mind at all.\n\n"
      "Later that day the fox came back and found the dog still asleep under the old oak tree.\n")
# a paragraph of EN again, in a new document
EN2 = "Later that day the fox came back and found the dog still asleep under the old oak tree.\n\nA new one here.\n"


def corpus(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "cp.txt").write_bytes(RU1.encode("cp1251"))
    (a / "en.txt").write_bytes(EN.encode("utf-8"))
    (a / "en_copy.txt").write_bytes(b"\xef\xbb\xbf" + EN.encode("utf-8"))  # the same text behind a BOM
    (a / "koi.txt").write_bytes(RU2.encode("koi8_r"))
    (b / "en2.md").write_bytes(EN2.encode("utf-8"))
    return a, b


@pytest.fixture(scope="module")
def char_tok():
    return Tokenizer.train([RU1, RU2, EN, EN2], kind="char")


def test_inspect_equals_hand_counts(tmp_path, char_tok):
    a, b = corpus(tmp_path)
    assert all(len(char_tok.encode(t)) == len(t) for t in (RU1, RU2, EN, EN2))  # one token per character
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=char_tok.vocab_size)
    chars = len(RU1) + len(RU2) + 2 * len(EN) + len(EN2)
    report = inspect([a, b, a / "en.txt"], char_tok, model_config=cfg, planned_tokens=10 * chars)
    sa, sb = report["sources"][:2]
    assert len(report["sources"]) == 3 and report["sources"][2]["documents"] == 0  # en.txt: counted in a
    assert [(d["name"], d["characters"], d["tokens"], d["encoding"], d["language"]) for d in sa["per_document"]] == [
        ("cp.txt", len(RU1), len(RU1), "cp1251", "ru"), ("en.txt", len(EN), len(EN), "utf-8", "en"),
        ("en_copy.txt", len(EN), len(EN), "utf-8-sig", "en"), ("koi.txt", len(RU2), len(RU2), "koi8_r", "ru")]
    assert (sa["documents"], sa["characters"], sa["tokens"]) == (4, len(RU1) + len(RU2) + 2 * len(EN),
                                                                 len(RU1) + len(RU2) + 2 * len(EN))
    assert sa["encodings"] == {"cp1251": 1, "utf-8": 1, "utf-8-sig": 1, "koi8_r": 1}
    assert sa["languages"] == {"ru": 2, "en": 2}
    # a: en_copy repeats en (1 of 4 documents; its 2 of the 7 paragraphs)
    en_pars = [p.strip() for p in EN.split("\n\n")]
    assert {k: sa[k] for k in ("duplicate_documents", "paragraphs", "duplicate_paragraphs")} == {
        "duplicate_documents": 1, "paragraphs": 7, "duplicate_paragraphs": 2}
    assert sa["duplicate_document_share"] == 1 / 4 and sa["duplicate_paragraph_share"] == 2 / 7
    all_par_chars = sum(len(p.strip()) for t in (RU1, RU2, EN, EN) for p in t.split("\n\n"))
    assert sa["duplicate_character_share"] == sum(map(len, en_pars)) / all_par_chars
    # b alone has no duplicate; in total its first paragraph repeats EN's second
    assert (sb["duplicate_documents"], sb["duplicate_paragraphs"], sb["paragraphs"]) == (0, 0, 2)
    total = report["total"]
    assert (total["documents"], total["characters"], total["tokens"]) == (5, chars, chars)
    assert (total["duplicate_documents"], total["paragraphs"], total["duplicate_paragraphs"]) == (1, 9, 3)
    lengths = sorted([len(RU1), len(RU2), len(EN), len(EN), len(EN2)])
    assert sum(h["documents"] for h in total["token_histogram"]) == 5
    for h in total["token_histogram"]:
        assert h["documents"] == sum(h["min"] <= n < h["max"] for n in lengths) > 0
    n = cfg.num_parameters()
    assert total["parameters"] == n and total["tokens_per_parameter"] == chars / n
    assert total["epoch_advice"]["epochs"] == 10.0 and "10.0 times" in total["epoch_advice"]["warning"]


def test_histogram_and_epoch_advisor_boundaries():
    assert histogram([0, 1, 2, 3, 4, 1023, 1024]) == [
        {"min": 0, "max": 1, "documents": 1}, {"min": 1, "max": 2, "documents": 1},
        {"min": 2, "max": 4, "documents": 2}, {"min": 4, "max": 8, "documents": 1},
        {"min": 512, "max": 1024, "documents": 1}, {"min": 1024, "max": 2048, "documents": 1}]
    assert MAX_USEFUL_EPOCHS == 4
    assert epoch_advice(1000, 4000)["warning"] is None  # exactly 4 epochs: fine
    assert "4.0 times" in epoch_advice(1000, 4001)["warning"] and "worth less" in epoch_advice(1000, 4001)["warning"]
    assert "almost nothing" in epoch_advice(1000, 16001)["warning"]
    assert epoch_advice(1000, 16000)["warning"].endswith("add data if you can")


def test_cli_inspect_writes_the_report_and_refuses_bad_input(tmp_path, capsys, char_tok):
    a, b = corpus(tmp_path)
    char_tok.save(tmp_path / "tok.json")
    chars = len(RU1) + len(RU2) + 2 * len(EN) + len(EN2)
    base = ["data", "inspect", str(a), str(b), "--tokenizer", str(tmp_path / "tok.json")]
    # 2 steps × 2 sequences × 10 tokens = 40 tokens
    assert main([*base, "--max-steps", "2", "--batch-size", "2", "--seq-len", "10", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "inspect.json").read_text(encoding="utf-8"))
    assert report["total"]["tokens"] == chars and report["total"]["epoch_advice"]["planned_tokens"] == 40
    assert report["total"]["epoch_advice"]["warning"] is None and "fine" in out
    assert f"{chars:>12,}" in out and "cp1251:1" in out and "koi8_r:1" in out
    # a second report over the first: refused (it was replaced without a word), replaced with --force
    first = (tmp_path / "r" / "inspect.json").read_text(encoding="utf-8")
    assert main([*base, "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == (f"lmlab: error: {tmp_path / 'r' / 'inspect.json'} exists; replace it "
                                               "with --force, or choose another --out")
    assert (tmp_path / "r" / "inspect.json").read_text(encoding="utf-8") == first
    assert main([*base, "--out", str(tmp_path / "r"), "--force"]) == 0
    capsys.readouterr()
    assert "epoch_advice" not in json.loads((tmp_path / "r" / "inspect.json").read_text())["total"]
    assert main([*base, "--planned-tokens", str(5 * chars)]) == 0
    assert "warning: the plan repeats the data 5.0 times" in capsys.readouterr().out
    for argv, message in [(["data", "inspect", str(a), "--planned-tokens", "100"], "need --tokenizer"),
                          ([*base, "--max-steps", "5"], "--seq-len or --preset"),
                          ([*base, "--max-steps", "5", "--planned-tokens", "9"], "not both"),
                          ([*base, "--planned-tokens", "0"], "must be > 0"),
                          (["data", "inspect", str(tmp_path / "nope")], "nope"),
                          ([*base, "--out", str(a / "cp.txt")], "not a folder")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmlab: error:") and message in err and err.count("\n") == 1, err
    assert (a / "cp.txt").read_bytes() == RU1.encode("cp1251")
