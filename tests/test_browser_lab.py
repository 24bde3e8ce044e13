"""The Lab tab in a real browser (Debian's Chromium driven by Playwright): it offers the facts lab's own list of
experiments, shows a refused request's reason, cancels a running experiment and starts it again, runs a quick
Absolute Zero experiment to the end and shows its report (heading and inlined plots) in the page, with the
process's log.
Screenshots go to tests/artifacts/browser-lab/."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
# one Chromium set-up for the browser tests: the `browser` fixture, and the skip without a Chromium
from test_browser import browser, pytestmark, ui_page  # noqa: E402, F401
from test_server_support import ServerProcess, kill_run_process  # noqa: E402

from lmlab.lab.facts.experiments import EXPERIMENTS  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts" / "browser-lab"


def test_lab_from_the_ui(tmp_path, browser):  # noqa: F811 (the fixture imported above)
    server = ServerProcess(tmp_path / "ws").start()
    pid = None
    try:
        # (the 422 asked for on purpose is logged by Chromium as a failed load)
        with ui_page(browser, ARTIFACTS, ignore="status of 422") as (page, shot):
            page.goto(f"{server.url}/#lab")
            page.wait_for_selector("body[data-ready]")
            offered = page.eval_on_selector_all("#lab-experiment option", "os => os.map(o => o.value)")
            assert offered == list(EXPERIMENTS)
            page.select_option("#lab-lab", "azr")
            assert page.is_hidden("#lab-experiment-box")  # azr has one experiment
            page.fill("#lab-seeds", "0, 0")
            page.click("#start-lab")
            page.wait_for_selector("#lab-msg.bad")
            assert "seeds" in page.inner_text("#lab-msg") and "distinct" in page.inner_text("#lab-msg")
            shot("01-form")

            # 1. the full-size run takes minutes: it is running when it is cancelled
            page.fill("#lab-seeds", "1")
            page.uncheck("#lab-quick")
            page.click("#start-lab")
            row = '#lab-table tr[data-run="1"]'
            page.wait_for_selector(f'{row}[data-status="running"] button.cancel', timeout=120_000)
            with server.client() as c:
                pid = c.get("/api/v1/runs/1").json()["pid"]
            page.click(f"{row} button.cancel")
            page.wait_for_selector(f'{row}[data-status="cancelled"]', timeout=120_000)
            assert page.query_selector(f"{row} button.cancel") is None
            assert page.query_selector(f"{row} a.report") is None
            assert page.is_hidden("#lab-report")
            # an experiment keeps no checkpoints: a stopped one is started again, a new run with its settings (a
            # double click makes one)
            assert page.inner_text(f"{row} button.restart") == "Start again"
            page.dblclick(f"{row} button.restart")
            row = '#lab-table tr[data-run="2"]'
            page.wait_for_selector(f'{row}[data-status="running"] button.cancel', timeout=120_000)
            page.wait_for_selector("#toast div:not(.bad)")
            assert page.inner_text("#toast").strip() == "Run 2 started with the settings of run 1"
            with server.client() as c:
                r = c.get("/api/v1/runs/2").json()
                pid = r["pid"]
                assert r["params"] == c.get("/api/v1/runs/1").json()["params"] and r["params"]["seeds"] == [1]
                assert len(c.get("/api/v1/runs").json()) == 2
            page.click(f"{row} button.cancel")
            page.wait_for_selector(f'{row}[data-status="cancelled"] button.restart', timeout=120_000)

            # 2. a quick run to the end: its report shows in the page, its plots loaded
            page.fill("#lab-seeds", "0")
            page.check("#lab-quick")
            page.click("#start-lab")
            row = '#lab-table tr[data-run="3"]'
            page.wait_for_selector(f'{row}[data-status="completed"]', timeout=120_000)
            assert "azr · quick" in page.inner_text(row) and page.query_selector(f"{row} a.report") is not None
            report = page.frame_locator("#lab-report")
            assert report.locator("h1").inner_text(timeout=60_000) == "Absolute Zero miniature"
            images = report.locator("img")
            assert images.count() == 2
            for i in range(2):
                assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
            page.wait_for_function("() => document.querySelector('#lab-log').textContent.includes('reproduces:')")
            assert "$ lmlab selfplay azr" in page.inner_text("#lab-log")
            shot("02-report")
            page.click('#tabs button[data-tab="runs"]')  # the Runs tab lists it too, as an experiment
            assert "experiment" in page.inner_text('#runs-table tr[data-run="3"]')
            page.select_option("#lang", "ru")
            assert page.inner_text('#tabs button[data-tab="lab"]') == "Лаборатория"
            page.click('#tabs button[data-tab="lab"]')
            assert page.inner_text("#lab-detail-head").endswith("завершён")
            assert page.inner_text('#lab-table tr[data-run="1"] button.restart') == "Запустить заново"
            shot("03-lab-ru")
    finally:
        kill_run_process(pid)
        server.stop()
