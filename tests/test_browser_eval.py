"""The Evaluate tab in a real browser, on a real `lmlab serve` with a tiny trained model: two models compared
on a task from the view (the numbers shown are the API's), a training run's trajectory drawn, a refusal in
words; no console errors, no serious or critical axe-core finding, no sideways scroll at 390 px, screenshots
at 1400 and 390 px in tests/artifacts/ux/ (eval-*.png)."""

from __future__ import annotations

from test_browser import TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_ux import SHOTS, axe_violations, show
from test_server_support import FAST, TINY_MODEL, ServerProcess, wait_for

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus

ROW = '#ev-results tr[data-model="{}"][data-task="fables-mc"][data-metric="acc"]'


def test_evaluate_compare_and_trajectory_from_the_view(tmp_path, browser):  # noqa: F811
    ws = tmp_path / "ws"
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    save_pretrained(ws / "models" / "rand", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=1,
                                                                           block_size=64)), tok)
    server = ServerProcess(ws, token=TOKEN).start()
    try:
        with server.client() as c:
            assert c.post("/api/v1/books", files={"file": ("tales.txt", demo_corpus(n_stories=20).encode())}
                          ).status_code == 201
            assert c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL}).status_code == 201
            run = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 6,
                                               "save_every": 3, "eval_every": 0, **FAST}).json()
            wait_for(lambda: c.get(f"/api/v1/runs/{run['id']}").json()["status"] == "completed", what="training")
        with ui_page(browser, SHOTS / "eval") as (page, shot):
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{server.url}/?token={TOKEN}#evaluate")
            page.wait_for_selector("body[data-ready]")
            page.wait_for_selector('#ev-tasks input[value="fables-mc"]')
            # the tab sits after Generate, in workflow order
            tabs = page.eval_on_selector_all("#tabs button", "bs => bs.map(b => b.dataset.tab)")
            assert tabs[tabs.index("generate") + 1] == "evaluate"
            # offered first: the first trained model and the first multiple-choice task
            checked = "es => es.filter(e => e.checked).map(e => e.value)"
            assert page.eval_on_selector_all("#ev-models input", checked) == ["rand"]
            assert page.eval_on_selector_all("#ev-tasks input", checked) == ["fables-mc"]
            # a refusal in words, before anything is sent
            for box in page.query_selector_all("#ev-tasks input:checked"):
                box.uncheck()
            page.click("#ev-start")
            assert page.inner_text("#ev-msg") == "✗ Choose at least one task."

            # two models on a task: per-model results and the comparison, as the API has them
            page.check('#ev-models input[value="tiny"]')
            page.check('#ev-models input[value="rand"]')
            page.check('#ev-tasks input[value="fables-mc"]')
            page.click("#ev-start")
            page.wait_for_selector('#ev-table tr[data-status="completed"]', timeout=120_000)
            page.wait_for_selector(ROW.format("tiny"))
            eval_id = int(page.get_attribute('#ev-table tr[data-status="completed"]', "data-run"))
            with server.client() as c:
                api = c.get(f"/api/v1/runs/{eval_id}/eval").json()
            want = {r["model"]: r["tasks"][0]["metrics"]["acc"] for r in api["results"]}
            for model in ("tiny", "rand"):
                cell = page.locator(ROW.format(model) + " td.value")
                assert float(cell.get_attribute("data-value")) == want[model]["value"]
                assert cell.inner_text() == f"{want[model]['value']:.4f}"
                interval = page.inner_text(ROW.format(model) + " td:nth-child(5)")
                assert interval == f"[{want[model]['low']:.4f}, {want[model]['high']:.4f}]"
            # the baseline is the first model checked in the list's order (alphabetical)
            assert (api["comparison"]["base"], api["comparison"]["models"]) == ("rand", ["rand", "tiny"])
            assert page.inner_text("#ev-detail h4:nth-of-type(2)") == "Comparison against rand"
            row = next(r for r in api["comparison"]["rows"] if r["metric"] == "acc")
            delta = page.locator('#ev-compare tr[data-model="tiny"][data-metric="acc"] td.delta')
            assert float(delta.get_attribute("data-value")) == row["delta"]
            assert delta.inner_text() == ("+" if row["delta"] > 0 else "") + f"{row['delta']:.4f}"
            flips = len(api["comparison"]["flips"])
            assert page.inner_text("#ev-flips summary") == f"Answers that flipped (an item on a metric): {flips}"
            assert page.get_attribute("#ev-report", "href").endswith(f"/api/v1/runs/{eval_id}/report?token={TOKEN}")
            shots(page, shot, "compare")

            # the training run's checkpoints: the trajectory, charted
            page.select_option("#ev-mode", "run")
            page.select_option("#ev-run", str(run["id"]))
            page.click("#ev-start")
            page.wait_for_selector(f'#ev-table tr[data-run="{eval_id + 1}"][data-status=completed]', timeout=120_000)
            page.wait_for_selector("#ev-chart .uplot")
            with server.client() as c:
                trajectory = c.get(f"/api/v1/runs/{eval_id + 1}/eval").json()["trajectory"]
            shown = page.eval_on_selector_all("#ev-trajectory tbody tr", """trs => trs.map(tr =>
                [+tr.cells[0].textContent, tr.cells[1].textContent, tr.cells[2].textContent,
                 +tr.cells[3].dataset.value])""")
            assert shown == [[p["step"], p["task"], p["metric"], p["value"]] for p in trajectory]
            assert [p["step"] for p in trajectory] == [3, 3, 6, 6]
            shots(page, shot, "trajectory")
    finally:
        server.stop()


def shots(page, shot, name: str) -> None:
    """At 1400 and 390 px: a screenshot, no sideways scroll, no serious or critical axe-core finding (the
    chart is drawn again at the new width first)."""
    for width in (1400, 390):
        page.set_viewport_size({"width": width, "height": 900})
        show(page, "evaluate")
        page.wait_for_function("""() => { const u = document.querySelector('#ev-chart .uplot');
            return !u || u.offsetWidth <= document.querySelector('#ev-chart').clientWidth; }""")
        shot(f"eval-{name}-{width}")
        assert page.evaluate("() => document.scrollingElement.scrollWidth") <= width
        assert axe_violations(page) == []
