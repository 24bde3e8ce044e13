"""The Data tab's API (routers/data.py) on a book's stored text: each card equals the data library's function
on the same text (inspect's duplicates and tokens, dedup_texts, apply_filters, contamination), planted
duplicates and contaminated items are found, the drift card relays the drift.json of the runs on the book, and bad
requests get the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_server_support import client, settings, upload

from lmlab.data import prepare_texts
from lmlab.data.dedup import DedupConfig, dedup_texts
from lmlab.data.filters import apply_filters, parse_filters
from lmlab.data.inspect import duplicates
from lmlab.eval.contamination import contamination
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.server.db import Database
from lmlab.server.routers import data as data_router
from lmlab.server.workspace import Workspace
from lmlab.tokenizers import Tokenizer
from lmlab.train import TrainConfig, train
from lmlab.train.console import quiet

PARAS = [f"The {w} walked to the river on day {i} and counted {i * 7} stones by the old mill before supper."
         for i, w in enumerate(["fox", "hare", "wolf", "bear", "owl", "crow", "mouse", "cat"])]
NEAR = PARAS[2].replace("supper", "dinner")  # its last word of 19 changed: a near copy
# a multiple-choice task of the workspace; item 1's solved text is in the book word for word
ITEMS = ['{"context": "The owl walked to the river on day 4 and counted 28 stones by the old mill", '
         '"choices": [" before supper.", " at noon."], "answer": 0}',
         '{"context": "A dragon flew over seven silver mountains", "choices": [" at dawn.", " at dusk."], "answer": 1}']
BOOK = "\n\n".join(PARAS + [PARAS[0], NEAR, PARAS[5]]) + "\n"


@pytest.fixture(scope="module")
def dt(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=80)
    save_pretrained(ws / "models" / "m", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=80, n_layer=1,
                                                                        block_size=32)), tok)
    (ws / "tasks").mkdir()
    (ws / "tasks" / "river.yaml").write_text("name: river\nkind: multiple_choice\ndata: river.jsonl\n")
    (ws / "tasks" / "river.jsonl").write_text("\n".join(ITEMS[::-1]) + "\n")  # the book's item second
    # The runs are written before the server starts: its supervisor would take a queued run for its own job.
    db = Database(Workspace(ws).sqlite_url())
    drift = drift_run(db, ws, tok)
    drift_run(db, ws, tok, run=db.add_run("m", ["other.txt"], {}, False, 30))  # another book's run: not listed
    plain = db.add_run("m", ["river.txt"], {}, False, 30)  # a run on the book without drift tracking
    db.update_run(plain["id"], status="completed")
    db.engine.dispose()
    with client(settings(ws)) as c:
        assert upload(c, "river.txt", BOOK.encode()).status_code == 201
        c.tok, c.drift_run = tok, drift
        yield c


def drift_run(db, ws, tok, run=None) -> dict:
    """A completed 30-step run on river.txt that tracked drift every 10 steps (its drift.json), in the database."""
    run = run or db.add_run("m", ["river.txt"], {"drift_every": 10}, False, 30)
    run_dir = ws / "runs" / f"run-{run['id']}"
    ds = prepare_texts([BOOK], tok, run_dir / "data", seq_len=16)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, block_size=16))
    tc = TrainConfig(max_steps=30, batch_size=4, lr=3e-2, warmup_steps=5, eval_every=0, save_every=0, log_every=100,
                     device="cpu", seed=0, peak_flops=1e12, sample_every=0, drift_every=10)
    with quiet():
        train(model, tok, ds, tc, run_dir)
    db.update_run(run["id"], status="completed")
    return json.loads((run_dir / "drift.json").read_text())


def get(c, card, **query):
    return c.get(f"/api/v1/books/river.txt/data/{card}", params=query)


def test_overview_counts_as_the_library(dt):
    o = get(dt, "overview", model="m", planned_tokens=10 * len(BOOK)).json()
    assert {k: o[k] for k in duplicates([BOOK])} == duplicates([BOOK])
    assert (o["paragraphs"], o["duplicate_paragraphs"], o["characters"]) == (11, 2, len(BOOK))
    assert o["tokens"] == len(dt.tok.encode(BOOK)) and o["parameters"] == o["chinchilla_tokens"] // 20
    assert o["epoch_advice"]["epochs"] == 10 * len(BOOK) / o["tokens"] and o["epoch_advice"]["warning"]
    assert sum(b["documents"] for b in o["paragraph_histogram"]) == 11
    assert o["language"] == "en" and "tokens" not in get(dt, "overview").json()


def test_the_overview_tokenises_a_bounded_sample_and_says_so(dt, monkeypatch):
    """A GET must not tokenise a whole book in the server (20 MiB: 41 s, 6.7 GB, and an aborted server under
    a memory cap): past TOKENS_SAMPLE characters the count is an estimate from the first paragraphs."""
    seen = []
    real_encode, real_batch = Tokenizer.encode, Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode",
                        lambda self, text, **k: seen.append(len(text)) or real_encode(self, text, **k))
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, texts, **k: seen.append(sum(map(len, texts))) or real_batch(self, texts, **k))
    monkeypatch.setattr(data_router, "TOKENS_SAMPLE", 300)
    o = get(dt, "overview", model="m").json()
    sample = BOOK[:BOOK.rfind("\n\n", 0, 300)]  # the first whole paragraphs within 300 characters
    assert sample == "\n\n".join(PARAS[:3]) and max(seen) <= 300
    assert o["tokens"] == round(len(dt.tok.encode(sample)) * len(BOOK) / len(sample))  # (characters: exact here)
    assert (o["tokens_estimated"], o["tokens_counted_characters"]) == (True, len(sample))
    assert sum(b["documents"] for b in o["paragraph_histogram"]) == 3 and o["characters"] == len(BOOK)
    monkeypatch.setattr(data_router, "TOKENS_SAMPLE", len(BOOK))  # all of it: the count is exact
    o = get(dt, "overview", model="m").json()
    assert (o["tokens"], o["tokens_estimated"]) == (len(dt.tok.encode(BOOK)), False)


def test_another_sites_page_may_not_start_a_whole_book_read(dt):
    """GETs pass the cross-site check, but these read a whole book or dataset in the server: a page of another
    site (Sec-Fetch-Site: cross-site or same-site) is refused; the web app (same-origin) and scripts are not."""
    for site in ("cross-site", "same-site"):
        for path in ("/api/v1/books/river.txt/data/overview?model=m", "/api/v1/books/river.txt/data/duplicates",
                     "/api/v1/datasets/d.jsonl/preview?model=m"):
            r = dt.get(path, headers={"Sec-Fetch-Site": site})
            assert (r.status_code, r.json()["detail"]) == (403, f"refused: a page of another site (Sec-Fetch-Site: "
                                                                f"{site}) may not make this server read a whole book "
                                                                "or dataset; use the web UI of this server")
    for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
        assert dt.get("/api/v1/books/river.txt/data/overview?model=m", headers=headers).status_code == 200
    assert dt.get("/api/v1/books", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # other reads pass


def test_duplicates_are_dedup_texts_clusters_with_shared_shingles(dt):
    d = get(dt, "duplicates").json()
    want = dedup_texts([BOOK], DedupConfig(level="paragraph"))
    assert d["stats"] == {**want.stats, "config": want.stats["config"]}
    assert (want.stats["exact_duplicates"], want.stats["removed"]) == (2, 3)  # two copies and the near one
    kinds = {c["kind"]: c for c in d["clusters"]}
    near = kinds["near"]
    assert [m["kept"] for m in near["members"]] == [True, False]
    assert near["members"][1]["preview"] == NEAR.strip()
    assert near["shared_shingles"] == 14  # 19 words: 15 shingles each, the last differs ("supper" / "dinner")
    assert near["members"][1]["jaccard_with_first"] == round(14 / 16, 4)


def test_duplicates_refuse_a_signature_too_long_in_a_sentence(dt):
    with pytest.raises(ValueError) as want:  # each knob within its bounds, their product not
        DedupConfig(level="paragraph", bands=33, rows=32)
    r = get(dt, "duplicates", bands=33, rows=32)
    assert r.status_code == 422, r.text
    assert r.json() == {"detail": str(want.value), "error": {"key": "settings_invalid",
                                                             "params": {"reason": str(want.value)}}}


def test_filters_are_apply_filters(dt):
    f = get(dt, "filters", spec="c4,fineweb").json()
    kept, receipts = apply_filters([BOOK], ["river.txt"], parse_filters("c4,fineweb"))
    assert f["kept"] == (kept[0] is not None)
    assert {k: f[k] for k in receipts} == receipts
    # each paragraph judged on its own: C4's three-sentence minimum removes all eleven one-sentence paragraphs
    p = get(dt, "filters", spec="c4,fineweb", level="paragraph").json()
    kept, receipts = apply_filters([BOOK], ["river.txt"], parse_filters("c4,fineweb", "paragraph"))
    assert {k: p[k] for k in receipts} == receipts and p["level"] == "paragraph"
    assert (p["paragraphs_in"], p["paragraphs_kept"], p["kept"]) == (11, 0, False)
    p = get(dt, "filters", spec="c4:min_sentences=1", level="paragraph").json()
    assert (p["paragraphs_in"], p["paragraphs_kept"], p["kept"]) == (11, 11, True)
    assert get(dt, "filters", spec="c4", level="line").status_code == 422


def test_contamination_flags_the_planted_item(dt):
    r = get(dt, "contamination", task="tasks/river.yaml").json()
    assert (r["items"], r["contaminated"], r["clean"]) == (2, 1, 1)
    (item,) = r["per_item"]
    assert item["index"] == 1 and item["matched"] == item["ngrams"] == 7  # 19 words: seven 13-grams
    solved = ("The owl walked to the river on day 4 and counted 28 stones by the old mill before supper.")
    assert item == {**contamination([BOOK], [solved])[0], "index": 1, "documents": ["river.txt"], "text": solved}
    # an item shorter than n words counts as one n-gram of its own length (found here word for word)
    assert get(dt, "contamination", task="tasks/river.yaml", n=20).json()["contaminated"] == 1


@pytest.mark.parametrize("card, query, status, detail", [
    ("filters", {"spec": "gopher,nope"}, 422, "unknown filter 'nope'"),
    ("contamination", {"task": "tasks/none.yaml"}, 404, "task 'tasks/none.yaml' not found"),
    ("overview", {"planned_tokens": 5}, 422, "the epoch advisor counts tokens: choose a model (its tokenizer)"),
    ("overview", {"model": "ghost"}, 404, "model 'ghost' not found"),
])
def test_bad_requests(dt, card, query, status, detail):
    r = get(dt, card, **query)
    assert r.status_code == status and r.json()["detail"].startswith(detail), r.text
    assert dt.get("/api/v1/books/nope.txt/data/overview").status_code == 404


def test_drift_relays_the_runs_drift_json(dt):
    (run,) = get(dt, "drift").json()["runs"]
    want = dt.drift_run
    assert (run["model"], run["status"], run["step"], run["tied_embeddings"]) == ("m", "completed", 30, False)
    assert run["records"] == want["records"] and [r["step"] for r in run["records"]] == [10, 20, 30]
    assert run["volatile"] == want["volatile"] and run["vocab_size"] == len(dt.tok) == 40
    assert run["points"] == {"count": want["counts"], "drift": want["drift"]}  # 40 tokens: all of them
    counts, drift = np.array(want["counts"]), np.array(want["drift"])
    assert run["unseen_tokens"] == int((counts == 0).sum()) > 0
    assert run["unseen_mean"] == pytest.approx(drift[counts == 0].mean(), rel=1e-12)
    assert run["mean"] == pytest.approx(drift.mean(), rel=1e-12)
    # at most `points` tokens: a fixed sample of (count, drift) pairs of the same tokens, the same on every call
    few = get(dt, "drift", points=10).json()["runs"][0]["points"]
    assert few == get(dt, "drift", points=10).json()["runs"][0]["points"] and len(few["drift"]) == 10
    pairs = set(zip(want["counts"], want["drift"]))
    assert set(zip(few["count"], few["drift"])) <= pairs
    assert dt.get("/api/v1/books/nope.txt/data/drift").status_code == 404
