"""Self-play from the web UI in a real browser (Debian's Chromium driven by Playwright): start a run from the
Self-play tab, watch its reward and KL charts fill while it runs, cancel it (it offers to resume), then run a
short one to the end and find its model in the Models tab with where it came from. Screenshots go to
tests/artifacts/browser-selfplay/."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
# one Chromium set-up for the browser tests: the `browser` fixture, and the skip without a Chromium
from test_browser import browser, pytestmark, ui_page  # noqa: E402, F401
from test_server_support import FAST, TINY_MODEL, ServerProcess, kill_run_process, upload, wait_run  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts" / "browser-selfplay"

POINTS = "+document.querySelector('#chart-reward').dataset.points"


def _start(page, new_model: str, iterations: int) -> None:
    page.click('#tabs button[data-tab="selfplay"]')
    page.select_option("#sp-model", "tiny")
    page.fill("#sp-new_model", new_model)
    page.select_option("#sp-reward", "seed")
    page.fill("#sp-prompts", "Once upon\nЖил-был")
    page.fill("#sp-iterations", str(iterations))
    page.fill("#sp-group_size", "4")
    page.fill("#sp-max_new_tokens", "8")
    if not page.evaluate("document.querySelector('#sp-form details').open"):
        page.click("#sp-form details summary")
    page.fill("#sp-prompts_per_iteration", "2")
    page.fill("#sp-lr", "0.001")
    page.click("#start-selfplay")
    page.wait_for_selector("#tab-runs:not([hidden])")


def test_selfplay_from_the_ui(tmp_path, browser):  # noqa: F811 (the fixture imported above)
    server = ServerProcess(tmp_path / "ws").start()
    with server.client() as c:  # a trained model to start from (the UI's training is tests/test_browser.py's)
        upload(c)
        c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL})
        r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 12, **FAST})
        assert wait_run(c, r.json()["id"], lambda r: r["status"] == "completed", "training")
    pid = None
    try:
        with ui_page(browser, ARTIFACTS) as (page, shot):
            page.goto(f"{server.url}/#selfplay")
            page.wait_for_selector("body[data-ready]")
            assert page.input_value("#sp-new_model") == "tiny-sp"  # a free name is suggested
            assert page.is_hidden("#sp-judge-box")
            page.select_option("#sp-reward", "perplexity")
            assert page.is_visible("#sp-judge-box")
            shot("01-form")

            # 1. a run that cannot finish (100000 iterations), under the suggested name: its reward chart fills
            #    while it runs, and the form suggests another name; cancel it
            _start(page, "tiny-sp", 100_000)
            row = '#runs-table tr[data-run="2"]'
            page.wait_for_selector(f'{row}[data-kind="selfplay"][data-status="running"]')
            page.wait_for_function(f"() => {POINTS} >= 2", timeout=120_000)
            seen = page.evaluate(f"() => {POINTS}")
            page.wait_for_function(f"() => {POINTS} > {seen}", timeout=120_000)  # redrawn as iterations arrive
            assert page.is_hidden("#train-charts") and int(page.get_attribute("#chart-kl", "data-points")) > 0
            assert "tiny → tiny-sp" in page.inner_text(row)
            page.click('#tabs button[data-tab="selfplay"]')
            assert page.input_value("#sp-new_model") == "tiny-sp2"  # tiny-sp is the running run's
            state = page.inner_text('#models-table tr[data-model="tiny"]')  # read by it, not training
            assert "read by self-play (run 2)" in state and "training" not in state, state
            page.click('#tabs button[data-tab="runs"]')
            with server.client() as c:
                pid = c.get("/api/v1/runs/2").json()["pid"]
            shot("02-running")
            page.click(f"{row} button.cancel")
            page.wait_for_selector(f'{row}[data-status="cancelled"]', timeout=60_000)
            page.wait_for_selector(f"{row} button.resume")  # the cancel saved a checkpoint: it can be resumed
            assert page.query_selector('#models-table tr[data-model="tiny-sp"]') is None  # cancelled: no model

            # 2. a short run to the end: the charts hold one point per iteration; its model appears with its origin
            _start(page, "tiny-sp", 4)
            row = '#runs-table tr[data-run="3"]'
            page.wait_for_selector(f'{row}[data-status="completed"]', timeout=120_000)
            page.wait_for_function("() => document.querySelector('#chart-reward').dataset.points === '4'")
            assert page.get_attribute("#chart-kl", "data-points") == "4"
            shot("03-completed")
            page.click('#tabs button[data-tab="models"]')
            model_row = '#models-table tr[data-model="tiny-sp"]'
            page.wait_for_selector(model_row)
            assert "self-play of tiny (reward seed, run 3)" in page.inner_text(model_row)
            page.select_option("#lang", "ru")
            assert page.inner_text('#tabs button[data-tab="selfplay"]') == "Самоигра"
            assert "самоигра от tiny" in page.inner_text(model_row)
            shot("04-models-ru")
    finally:
        kill_run_process(pid)
        server.stop()
