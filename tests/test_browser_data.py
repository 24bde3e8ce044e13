"""The Data tab in a real browser on a real `lmlab serve`: a book's overview with a model's tokens and the
epoch advisor, its repeated paragraphs with a near-copy cluster opened to its members and shared shingles,
the filters' receipts, a contaminated item of a workspace task, and a run's embedding drift (its chart over the
steps, every token against its count, the most volatile tokens) — each as the API answers; no console
errors, no serious axe finding, no sideways scroll at 390 px; screenshots at 1400 and 390 px in English and
Russian in tests/artifacts/ux/data/."""

from __future__ import annotations

from test_browser import TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_ux import SHOTS, every_layout
from test_server_data import BOOK, ITEMS, NEAR, drift_run
from test_server_support import ServerProcess, upload

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.server.db import Database
from lmlab.server.workspace import Workspace
from lmlab.tokenizers import Tokenizer


def test_the_data_tab(tmp_path, browser):  # noqa: F811
    ws = tmp_path / "ws"
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=80)
    save_pretrained(ws / "models" / "m", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=80, n_layer=1,
                                                                        block_size=32)), tok)
    db = Database(Workspace(ws).sqlite_url())
    drift = drift_run(db, ws, tok)
    db.close()
    (ws / "tasks").mkdir(exist_ok=True)  # (the database made the workspace)
    (ws / "tasks" / "river.yaml").write_text("name: river\nkind: multiple_choice\ndata: river.jsonl\n")
    (ws / "tasks" / "river.jsonl").write_text("\n".join(ITEMS[::-1]) + "\n")
    server = ServerProcess(ws, token=TOKEN).start()
    with server.client() as c:
        assert upload(c, "river.txt", BOOK.encode()).status_code == 201
        api = {card: c.get(f"/api/v1/books/river.txt/data/{card}", params=q).json() for card, q in (
            ("overview", {"model": "m", "planned_tokens": 10 * len(BOOK)}), ("duplicates", {}),
            ("filters", {"spec": "gopher,c4,fineweb"}), ("contamination", {"task": "tasks/river.yaml"}),
            ("drift", {}))}
        paragraphs = c.get("/api/v1/books/river.txt/data/filters", params={"spec": "fineweb",
                                                                             "level": "paragraph"}).json()
    try:
        with ui_page(browser, SHOTS / "data") as (page, shot):
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{server.url}/?token={TOKEN}#data")
            page.wait_for_selector('#dt-book option[value="river.txt"]', state="attached")
            page.wait_for_selector('#dt-task option[value="tasks/river.yaml"]', state="attached")
            page.select_option("#dt-model", "m")
            page.fill("#dt-planned", str(10 * len(BOOK)))
            page.click("#dt-overview-go")
            page.wait_for_selector("#dt-facts")
            o = api["overview"]
            assert page.inner_text('#dt-facts [data-fact="paragraphs"] dd') == "11"
            assert page.inner_text('#dt-facts [data-fact="tokens"] dd') == f"{o['tokens']:,}"
            assert page.inner_text("#dt-epochs") == o["epoch_advice"]["warning"]

            page.click("#dt-dups-go")
            page.wait_for_selector("#dt-dups-summary")
            near = next(c for c in api["duplicates"]["clusters"] if c["kind"] == "near")
            page.click(f'.dt-cluster[data-cluster="{near["id"]}"] summary')
            rows = page.eval_on_selector_all(f'.dt-cluster[data-cluster="{near["id"]}"] tbody tr',
                                             "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
            assert rows[1] == ["✗", f"{near['members'][1]['start']}–{near['members'][1]['end']}", "0.88", NEAR.strip()]

            page.click("#dt-filters-go")
            page.wait_for_selector("#dt-receipts")
            names = page.eval_on_selector_all("#dt-receipts tbody td:first-child", "ds => ds.map(d => d.textContent)")
            assert names == [r["name"] for r in api["filters"]["filters"]]
            for name in ("gopher", "c4"):  # Gopher's 50 words and C4's 3 sentences: no paragraph here has them
                page.uncheck(f'#dt-filters .checks input[value="{name}"]')
            page.check("#dt-per-paragraph")
            page.click("#dt-filters-go")
            page.wait_for_selector("#dt-filters-summary:has-text('paragraph by paragraph')")
            assert page.inner_text("#dt-filters-summary") == (
                f"Judged paragraph by paragraph: {paragraphs['paragraphs_kept']} of 11 paragraphs pass, "
                f"{paragraphs['characters_kept']:,} of {len(BOOK):,} characters stay.")

            page.select_option("#dt-task", "tasks/river.yaml")
            page.click("#dt-contam-go")
            page.wait_for_selector("#dt-contam-summary")
            assert page.inner_text("#dt-contam-summary") == \
                "1 of 2 items share a 13-word n-gram with the book; 1 are clean."
            assert page.inner_text("#dt-contam-items tbody td:first-child") == "1"

            page.click("#dt-drift-go")
            page.wait_for_selector("#dt-drift-scatter .uplot")
            (run,) = api["drift"]["runs"]
            assert page.inner_text("#dt-drift-summary") == \
                f"Run #{run['id']} (m) at step 30: mean drift {run['mean']:.4g} over 40 tokens."
            # three lines of three records each over the steps; every token a point against its count
            assert page.get_attribute("#dt-drift-steps", "data-points") == "9"
            assert page.get_attribute("#dt-drift-scatter", "data-points") == "40"
            first = page.eval_on_selector("#dt-drift-volatile tbody tr", "r => [...r.cells].map(c => c.textContent)")
            top = drift["volatile"][0]
            assert first[0] == '"' + top["token"] + '"' and first[2] == str(top["count"])

            # drawn again at the new width (a charts' resize waits 150 ms)
            problems = every_layout(page, shot, "data", lambda p: p.wait_for_function(
                "() => [...document.querySelectorAll('#dt-drift .uplot')].every(u => u.offsetWidth <= innerWidth)"))
            assert not problems, problems
            assert page.inner_text("#tab-data h2") == "Что в книге"
    finally:
        server.stop()
