"""Quality filters: each rule's decision on a fixture equals the rule as documented (hand counts, thresholds at
the boundary), the receipts count what was removed, prepare --filters records them, and no training window
of a filtered dataset touches validation text."""

import json
import math

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.data import TokenDataset, prepare
from lmlab.data.filters import C4, FineWeb, Gopher, Lang, apply_filters, filter_help, identify, parse_filters
from lmlab.tokenizers import EOS_ID, Tokenizer

# 50 words of mean length exactly 3 ("(cat)" is 3 once its brackets are stripped; "—" is not a word) and two
# of Gopher's stop words.
BASE = ["the", "and", "(cat)"] + ["cat"] * 47


def text_of(ws, per_line=5, prefix=lambda j: "", suffix=lambda j: ""):
    return "\n".join(prefix(j) + " ".join(ws[i:i + per_line]) + suffix(j)
                     for j, i in enumerate(range(0, len(ws), per_line)))


def decision(f, text):
    v = f(text)
    return (v.rule, v.value)


def test_gopher_rules_at_their_thresholds():
    g = Gopher()
    assert decision(g, text_of(BASE) + "\n— —") == (None, None)  # 50 words; dashes are not words
    # word count: 50..100,000 kept
    assert decision(g, text_of(BASE[:49])) == ("word_count", 49)
    assert decision(Gopher(max_words=49), text_of(BASE)) == ("word_count", 50)
    # mean word length: 3..10 kept
    assert decision(g, text_of(BASE[:-1] + ["ca"])) == ("mean_word_length", 2.98)  # 149 / 50
    long = ["the", "and"] + ["abcdefghij"] * 48  # 486 / 50 = 9.72
    assert decision(Gopher(max_mean_word_length=9.72), text_of(long)) == (None, None)
    assert decision(Gopher(max_mean_word_length=9.71), text_of(long)) == ("mean_word_length", 9.72)
    # symbols (# ... …) per word <= 0.1; "#" alone is not a word
    assert decision(g, text_of(BASE) + " # # # ... …") == (None, None)  # 5 / 50
    assert decision(g, text_of(BASE) + " # # # ... … #") == ("symbol_word_ratio", 0.12)
    # bullet lines <= 0.9 of the 10 lines; an em dash (Russian dialogue) is no bullet
    assert decision(g, text_of(BASE, prefix=lambda j: "- " if j < 9 else "— ")) == (None, None)
    assert decision(g, text_of(BASE, prefix=lambda j: "• ")) == ("bullet_lines_ratio", 1.0)
    # lines ending in an ellipsis <= 0.3
    assert decision(g, text_of(BASE, suffix=lambda j: "..." if j < 3 else "")) == (None, None)
    assert decision(g, text_of(BASE, suffix=lambda j: "…" if j < 4 else "")) == ("ellipsis_lines_ratio", 0.4)
    # words with a letter >= 0.8
    assert decision(g, text_of(BASE[:40] + ["1234"] * 10)) == (None, None)
    assert decision(g, text_of(BASE[:39] + ["1234"] * 11)) == ("alpha_words_ratio", 0.78)
    # stop words: at least 2 occurrences, from the list of the text's script
    assert decision(g, text_of(["cat"] + BASE[1:])) == ("stop_words", 1)
    assert decision(g, text_of(["и", "в"] + ["кошка"] * 48)) == (None, None)
    assert decision(g, text_of(["the", "and"] + ["кошка"] * 48)) == ("stop_words", 0)  # Cyrillic: Russian list
    assert decision(Gopher(min_stop_words=3), text_of(BASE)) == ("stop_words", 2)


C4_LINES = ["The cat sat on the mat.",                         # kept
            "",                                                  # blank lines stay
            "Four words only here.",                            # < 5 words
            "— Он сказал это тихо.",                            # 4 words: the dash is not one
            "This line has no terminal punctuation",            # no . ! ? " ” »
            "Please enable JavaScript to see this page.",       # javascript
            "«Он сказал, что придёт завтра»",                   # 5 words ending in »: kept, no sentence
            "Is this the end of the story? Yes! It is."]        # kept, 3 sentences


def test_c4_line_and_document_rules(tmp_path):
    text = "\n".join(C4_LINES)
    v = C4(min_sentences=4)(text)
    assert v.text == "\n".join([C4_LINES[i] for i in (0, 1, 6, 7)])
    assert v.lines_removed == {"line_min_words": 2, "line_terminal_punctuation": 1, "line_javascript": 1}
    assert [rule for rule, _ in v.line_examples] == ["line_min_words", "line_min_words", "line_terminal_punctuation",
                                                    "line_javascript"]
    assert decision(C4(min_sentences=5), text) == ("sentences", 4)
    assert decision(C4(min_words_per_line=4, min_sentences=5), text) == (None, None)  # "Four words..." kept: 5
    assert decision(C4(), text + "\nLorem Ipsum dolor sit amet, consectetur.") == ("lorem_ipsum", "lorem ipsum")
    assert decision(C4(), text + "\nfunction f() { return 1; }") == ("curly_brace", "{")
    (tmp_path / "bad.txt").write_text("badword\nvery bad phrase\n", encoding="utf-8")
    bad = C4(bad_words=str(tmp_path / "bad.txt"))
    assert decision(bad, text) == (None, None)
    assert decision(bad, text + "\nThis is a BADWORD, said the cat.") == ("bad_words", "badword")
    assert decision(bad, text + "\nIt was a very  bad phrase.") == (None, None)  # phrases match as written
    assert decision(bad, text + "\nIt was a very bad phrase indeed.") == ("bad_words", "very bad phrase")
    with pytest.raises(FileNotFoundError, match="bad-words"):
        C4(bad_words=str(tmp_path / "missing.txt"))


def fw_line(i, end="."):
    return f"Line {i:04d} of the text, padded: ".ljust(39, "z") + end  # 40 characters with its end


def test_fineweb_rules_at_their_thresholds():
    f = FineWeb()
    # lines ending in punctuation >= 0.12
    assert decision(f, "\n".join(fw_line(i, "." if i < 3 else "z") for i in range(25))) == (None, None)  # 3/25
    assert decision(f, "\n".join(fw_line(i, "." if i < 2 else "z") for i in range(25))) == ("line_punct_ratio", 0.08)
    # short lines (<= 30 characters) <= 0.67
    short = [f"Short line {i:03d}." for i in range(68)]
    assert decision(f, "\n".join(short[:67] + [fw_line(i) for i in range(33)])) == (None, None)
    assert decision(f, "\n".join(short + [fw_line(i) for i in range(32)])) == ("short_line_ratio", 0.68)
    half = FineWeb(max_short_line_ratio=0.5)
    assert decision(half, "x" * 29 + ".\n" + "y" * 30 + ".") == (None, None)  # 30 and 31 characters
    assert decision(half, "x" * 29 + ".\n" + "y" * 29 + ".") == ("short_line_ratio", 1.0)
    # characters of repeated lines (each repeat after the first) <= 0.01 of all lines' characters
    lines = [fw_line(i) for i in range(100)]
    assert decision(f, "\n".join(lines + lines[:1])) == (None, None)  # 40 / 4040
    assert decision(f, "\n".join(lines + lines[:1] + lines[:1])) == ("duplicate_line_chars", round(80 / 4080, 4))
    assert decision(FineWeb(max_duplicate_line_chars=80 / 4080), "\n".join(lines + lines[:1] * 2)) == (None, None)
    assert decision(f, "\n\n  \n") == ("empty", 0)


RUSSIAN = ("Анна Сергеевна вышла из вагона на маленькой станции, где поезд стоял всего две минуты. Было раннее "
           "утро, над платформой висел туман, и в нём едва угадывались очертания водокачки.")
ENGLISH = "The quick brown fox jumps over the lazy dog, and the dog does not mind at all, since it is asleep."


def test_language_filter_keeps_its_languages_above_the_score():
    lang, p = identify(RUSSIAN)
    assert lang == "ru" and 0.65 < p <= 1
    assert decision(Lang(langs=("ru",), min_score=p), RUSSIAN) == (None, None)
    assert decision(Lang(langs=("ru",), min_score=math.nextafter(p, 2)), RUSSIAN) == ("language_score", round(p, 4))
    assert decision(Lang(langs=("ru",)), ENGLISH) == ("language", "en")
    assert decision(Lang(langs=("ru", "en")), ENGLISH) == (None, None)


def test_parse_filters_and_its_errors(tmp_path):
    fs = parse_filters("gopher:max_words=1e6:min_mean_word_length=2.5, c4 ,fineweb,lang=ru+uk:min_score=0.5")
    assert fs == [Gopher(max_words=1_000_000, min_mean_word_length=2.5), C4(), FineWeb(),
                  Lang(langs=("ru", "uk"), min_score=0.5)]
    for spec, message in [("gopher,bert", "unknown filter 'bert'"), ("gopher:words=3", "KEY one of min_words"),
                          ("gopher:min_words=2.5", "min_words='2.5' is not int"),
                          ("fineweb:max_short_line_ratio=2", "must be <= 1"), ("lang=", "at least one language"),
                          (",", "no filter"), ("c4:bad_words=" + str(tmp_path / "no.txt"), "no bad-words file")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            parse_filters(spec)
    helps = filter_help().splitlines()  # every threshold with its default, as `lmlab data filter --help` shows
    assert "    max_words=100000: remove documents with more words (a novel has more: raise it for books)" in helps
    assert "  lang=CODE[+CODE]" in helps and "    langs=ru: ISO 639-1 codes to keep (lang=ru+uk)" in helps


def test_receipts_count_removals_in_order():
    texts = [text_of(BASE), text_of(BASE[:10]), "{" + text_of(BASE), "\n".join(C4_LINES), ENGLISH]
    names = ["good", "short", "brace", "c4", "en"]
    kept, receipts = apply_filters(texts, names, [Gopher(), C4(min_sentences=1)])
    # Gopher removes short (10 words), c4 (35 words) and en (20 words); C4 sees good and brace only
    g, c = receipts["filters"]
    assert (g["documents_in"], g["documents_removed"], g["removed_by_rule"]) == (5, 3, {"word_count": 3})
    assert [e["document"] for e in g["examples"]] == ["short", "c4", "en"]
    assert g["characters_removed"] == len(texts[1]) + len(texts[3]) + len(texts[4])
    # BASE's lines have no terminal punctuation: C4 drops all ten, leaving no sentence; brace goes first
    assert (c["documents_in"], c["removed_by_rule"]) == (2, {"sentences": 1, "curly_brace": 1})
    assert c["lines_removed_by_rule"] == {"line_terminal_punctuation": 10}
    assert len(c["line_examples"]) == 5 and c["line_examples"][0] == {
        "document": "good", "rule": "line_terminal_punctuation", "line": " ".join(BASE[:5])}
    assert kept == [None] * 5 and receipts["documents_kept"] == 0 and receipts["characters_kept"] == 0
    assert g["params"]["max_words"] == 100_000 and c["params"]["min_sentences"] == 1


class WordTokenizer:
    """One id per distinct whitespace word (assigned on first sight): texts of distinct words hold every id
    once, so a token tells where its text came from."""

    eos_id = EOS_ID

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __len__(self) -> int:
        return 30_000

    def encode_batch(self, texts):
        return [[self.ids.setdefault(w, len(self.ids) + 4) for w in t.split()] for t in texts]

    def decode(self, ids):
        words = {i: w for w, i in self.ids.items()}
        return " ".join(words[i] for i in ids if i in words)

    def fingerprint(self) -> str:
        return "words"


def filtered_corpus(folder):
    """Three books of distinct words; each has lines C4 drops (four words, no full stop); book c has a brace."""
    for b, n_lines in (("a", 60), ("b", 30), ("c", 20)):
        rows = []
        for i in range(n_lines):
            rows.append(" ".join(f"{b}{i}w{k}" for k in range(6)) + ".")
            if i % 3 == 0:
                rows.append(" ".join(f"{b}{i}drop{k}" for k in range(4)) + ".")
        if b == "c":
            rows.append("c{brace")
        (folder / f"{b}.txt").write_text("\n".join(rows), encoding="utf-8")


def test_paragraph_level_filters_keep_val_out_of_training(tmp_path):
    """--filter-level paragraph: each book keeps its paragraphs that pass (here all but the one with a brace),
    and the held-out slice is the tail of what is kept, so no training batch holds a validation token."""
    for b in "ab":
        paragraphs = [" ".join(f"{b}{p}s{i}w{k}" for k in range(6)) + "." for p in range(12) for i in range(3)]
        paragraphs = ["\n".join(paragraphs[i:i + 3]) for i in range(0, len(paragraphs), 3)]
        paragraphs[4] += f"\n{b}{{brace"
        (tmp_path / f"{b}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    tok = WordTokenizer()
    ds = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tok, tmp_path / "ds", val_fraction=0.2,
                 filters=parse_filters("c4:min_sentences=1", "paragraph"))
    words = {i: w for w, i in tok.ids.items()}
    flat = ds.tokens.tolist()
    assert [d.name for d in ds.documents] == ["a.txt", "b.txt"]
    assert not any(words.get(t, "").startswith(("a4s", "b4s")) or "brace" in words.get(t, "") for t in flat)
    assert sum(d.train[1] - d.train[0] + d.val_tokens for d in ds.documents) == 2 * 11 * 3 * 6
    val_ids = set(flat[ds.train_tokens:]) - {EOS_ID}
    assert len(val_ids) >= 2 * 0.2 * 11 * 3 * 6 - 2
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, y = ds.sample_batch(16, 32, g)
        assert not val_ids & (set(x.flatten().tolist()) | set(y.flatten().tolist()))


def test_prepare_with_filters_records_them_and_keeps_val_out_of_training(tmp_path):
    filtered_corpus(tmp_path)
    tok = WordTokenizer()
    filters = parse_filters("c4:min_sentences=1,fineweb")
    ds = prepare([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"], tok, tmp_path / "ds",
                 val_fraction=0.2, filters=filters)
    header = json.loads((tmp_path / "ds" / "tokens.json").read_text(encoding="utf-8"))
    receipts = json.loads((tmp_path / "ds" / "receipts.json").read_text(encoding="utf-8"))
    assert [d.name for d in ds.documents] == ["a.txt", "b.txt"]  # c.txt: removed for its brace
    c4, fw = header["filters"]["filters"]
    assert (c4["name"], c4["documents_removed"], c4["removed_by_rule"]) == ("c4", 1, {"curly_brace": 1})
    assert c4["lines_removed_by_rule"] == {"line_min_words": 20 + 10}  # a: 20 drop lines, b: 10
    assert c4["params"] == {"min_words_per_line": 5, "min_sentences": 1, "bad_words": ""}
    assert (fw["documents_in"], fw["documents_removed"]) == (2, 0)
    assert "examples" not in c4 and receipts["filters"][0]["examples"][0]["document"] == "c.txt"
    assert ds.stats()["filters"] == header["filters"]  # train puts stats() into the run's config.json
    assert {k: v for k, v in receipts.items() if k != "filters"} == \
        {k: v for k, v in header["filters"].items() if k != "filters"} == \
        {"documents_in": 3, "documents_kept": 2, "characters_in": sum(len((tmp_path / f"{b}.txt").read_text())
                                                                     for b in "abc"),
         "characters_kept": receipts["characters_kept"]}
    # the dropped lines are nowhere in the token file; each val part is the tail of its filtered book
    flat = ds.tokens.tolist()
    words = {i: w for w, i in tok.ids.items()}
    assert not any("drop" in words.get(t, "") or words.get(t, "").startswith("c") for t in flat)
    for d, n_words in zip(ds.documents, (60 * 6, 30 * 6)):
        part = flat[d.train[0]:d.train[1]] + flat[d.val[0]:d.val[1]]
        assert len(part) == n_words and d.val_tokens == math.ceil(0.2 * n_words)
        assert words[part[-1]] == f"{d.name[0]}{n_words // 6 - 1}w5."
    val_ids = set(flat[ds.train_tokens:]) - {EOS_ID}
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, y = ds.sample_batch(16, 32, g)
        assert not val_ids & (set(x.flatten().tolist()) | set(y.flatten().tolist()))
    # a prepare without filters (over the dataset, as asked) records none and leaves no stale receipts
    ds2 = prepare([tmp_path / "a.txt"], tok, tmp_path / "ds", val_fraction=0.2, overwrite=True)
    assert "filters" not in ds2.header and "filters" not in ds2.stats()
    assert not (tmp_path / "ds" / "receipts.json").exists()
    assert np.array_equal(TokenDataset.open(tmp_path / "ds").tokens, ds2.tokens)


def test_cli_filter_and_prepare_filters(tmp_path, capsys):
    filtered_corpus(tmp_path)
    out = tmp_path / "kept"
    assert main(["data", "filter", str(tmp_path / "a.txt"), str(tmp_path / "c.txt"), "--filters",
                 "c4:min_sentences=1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 documents kept" in printed and "curly_brace 1" in printed
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "receipts.json"]
    for name in ("a.txt.md", "a.txt.md.txt"):
        (tmp_path / name).write_text("Some text.", encoding="utf-8")
    assert out.joinpath("a.txt").read_text(encoding="utf-8") == "\n".join(
        line for line in (tmp_path / "a.txt").read_text(encoding="utf-8").split("\n") if "drop" not in line)
    for argv, message in [(["filter", str(tmp_path / "a.txt"), "--filters", "gopher", "--out", str(out)],
                           "not an empty folder"),
                          (["filter", str(tmp_path / "a.txt"), "--filters", "bert", "--out", str(tmp_path / "o")],
                           "unknown filter"),
                          (["filter", str(tmp_path / "a.txt"), "--filters", "gopher:min_words=x", "--out",
                            str(tmp_path / "o")], "not int"),
                          (["filter", str(tmp_path / "nope.txt"), "--filters", "c4", "--out", str(tmp_path / "o")],
                           "nope.txt"),
                          (["filter", *(str(tmp_path / n) for n in ("a.txt", "a.txt.md", "a.txt.md.txt")),
                            "--filters", "c4", "--out", str(tmp_path / "o")], "the same file: a.txt.md.txt")]:
        assert main(["data", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmlab: error:") and message in err and err.count("\n") == 1, err
    assert out.joinpath("a.txt").is_file() and not (tmp_path / "o").exists()  # nothing overwritten or made


def test_cli_prepare_filters_removing_everything_writes_nothing(tmp_path, capsys):
    filtered_corpus(tmp_path)
    Tokenizer.train([(tmp_path / f"{b}.txt").read_text() for b in "ac"], kind="char").save(tmp_path / "tok.json")
    base = ["data", "prepare", str(tmp_path / "c.txt"), "--tokenizer", str(tmp_path / "tok.json")]
    assert main([*base, "--out", str(tmp_path / "ds"), "--filters", "c4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: the filters removed every document") and not (tmp_path / "ds").exists()
    assert main([*base, "--out", str(tmp_path / "ds"), "--filters", "fineweb"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 1 documents kept" in printed and "fineweb  removed 0 of 1" in printed
    assert json.loads((tmp_path / "ds" / "tokens.json").read_text())["filters"]["filters"][0]["name"] == "fineweb"


def test_cli_train_filters_its_sources_before_the_tokenizer_and_records_them(tmp_path, capsys):
    filtered_corpus(tmp_path)
    run = tmp_path / "run"
    books = [str(tmp_path / f"{b}.txt") for b in "abc"]
    args = ["train", *books, "--out", str(run), "--tokenizer-kind", "word", "--vocab-size", "2000",
            "--preset", "llama-tiny", "--n-layer", "1", "--block-size", "16", "--max-steps", "2", "--batch-size", "2",
            "--eval-every", "0", "--no-compile", "--sample-every", "0"]
    assert main([*args, "--filters", "c4:min_sentences=1"]) == 0
    capsys.readouterr()
    saved = json.loads((run / "config.json").read_text())
    c4 = saved["data_stats"]["filters"]["filters"][0]  # the run knows what its data went through
    assert (c4["name"], c4["documents_removed"], c4["lines_removed_by_rule"]) == ("c4", 1, {"line_min_words": 30})
    header = json.loads((run / "data" / "tokens.json").read_text())
    assert [d["name"] for d in header["documents"]] == ["a.txt", "b.txt"]
    vocab = Tokenizer.load(run / "tokenizer.json").hf.get_vocab()
    assert "a0w1" in vocab and not any("drop" in w or w.startswith("c") for w in vocab)  # learnt on the kept text
    assert (run / "data" / "receipts.json").is_file()
    prepared = ["train", "--dataset", str(run / "data"), "--tokenizer", str(run / "tokenizer.json"), *args[6:]]
    for argv, message in [([*prepared, "--filters", "c4"], "--filters run on book files/folders; a prepared"),
                          ([*args, "--filters", "bert"], "unknown filter")]:
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["train", "--out", str(run), "--resume", "--filters", "c4"]) == 2
    assert "drop --filters" in capsys.readouterr().err


def test_paragraph_level_judges_each_paragraph_and_a_document_keeps_those_that_pass(tmp_path, capsys):
    a = ("Alpha one two three four five six seven eight.\n\nBeta { one two three four five six seven eight.\n\n\n"
         "Gamma one two three four five six seven eight.")
    b = "Delta { one two three four five six seven eight."
    kept, r = apply_filters([a, b], ["a.txt", "b.txt"], parse_filters("c4:min_sentences=1,fineweb", "paragraph"))
    assert kept == ["Alpha one two three four five six seven eight.\n\n"
                    "Gamma one two three four five six seven eight.", None]
    assert apply_filters([a, b], ["a.txt", "b.txt"], parse_filters("c4:min_sentences=1"))[0] == [None, None]
    assert {k: r[k] for k in ("level", "documents_in", "documents_kept", "paragraphs_in", "paragraphs_kept")} == \
        {"level": "paragraph", "documents_in": 2, "documents_kept": 1, "paragraphs_in": 4, "paragraphs_kept": 2}
    c4, fw = r["filters"]
    assert (c4["paragraphs_in"], c4["paragraphs_removed"], c4["documents_in"], c4["documents_removed"]) == (4, 2, 2, 1)
    assert c4["removed_by_rule"] == {"curly_brace": 2} and [e["document"] for e in c4["examples"]] == ["a.txt ¶2",
                                                                                                      "b.txt ¶1"]
    assert c4["characters_removed"] == len("Beta { one two three four five six seven eight.") + len(b)
    assert (fw["paragraphs_in"], fw["paragraphs_removed"], fw["documents_in"], fw["documents_removed"]) == (2, 0, 1, 0)
    with pytest.raises(ValueError, match="the filter level must be one of document, paragraph"):
        parse_filters("c4", "line")
    (tmp_path / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "b.txt").write_text(b, encoding="utf-8")
    assert main(["data", "filter", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--filters", "c4:min_sentences=1",
                 "--filter-level", "paragraph", "--out", str(tmp_path / "kept")]) == 0
    assert "1 of 2 documents kept, 2 of 4 paragraphs" in capsys.readouterr().out
    assert (tmp_path / "kept" / "a.txt").read_text(encoding="utf-8") == kept[0]
    assert not (tmp_path / "kept" / "b.txt").exists()
    assert main(["data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", "x", "--out", str(tmp_path / "d"),
                 "--filter-level", "paragraph"]) == 2
    assert "--filter-level applies to --filters" in capsys.readouterr().err
