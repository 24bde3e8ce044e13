"""The runs table (sorting, filtering, the settings diff, keyboard focus across refreshes) and a run's page
(#run/ID: phase, timing, samples, settings, the command line, clone) in a real browser, against a real
`lmlab serve` and real training processes. Screenshots at 1400 and 390 px go to tests/artifacts/runpage/."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
# one Chromium set-up for the browser tests: the `browser` fixture, and the skip without a Chromium
from test_browser import browser, pytestmark, ui_page  # noqa: E402, F401
from test_server_support import FAST, TINY_MODEL, ServerProcess, kill_run_process, upload, wait_for  # noqa: E402

WIDEST = "sel => Math.max(...[...document.querySelectorAll(sel + ' *')].map(e => e.getBoundingClientRect().right))"
ARTIFACTS = Path(__file__).parent / "artifacts" / "runpage"
TOKEN = "runpage-test-token"
PHASES = {"starting": "starting…", "tokenizer": "preparing the tokenizer…", "data": "preparing the data…"}


def js_round(x: float) -> int:
    """Math.round: halves go up (Python's round takes them to even)."""
    return math.floor(x + 0.5)


def settings_of(r):
    """What the page's diff compares (runpage.js settingsOf)."""
    return {"kind": r["kind"], "model": r["model"], "books": ", ".join(r["books"]),
            "init_from_trained": r["init_from_trained"], **r["params"]}


def test_runs_table_and_run_page(tmp_path, browser):  # noqa: F811 (the fixture imported above)
    server = ServerProcess(tmp_path / "ws", token=TOKEN).start()
    frozen = None
    try:
        c = server.client()
        assert upload(c).status_code == 201
        for name in ("tiny", "tiny2"):
            assert c.post("/api/v1/models", json={"name": name, **TINY_MODEL}).status_code == 201
        base = {"books": ["tales.txt"], "max_steps": 6, "eval_every": 3, "log_every": 1, **FAST}
        def done(body):  # one at a time: a model trains in one run at a time
            i = c.post("/api/v1/runs", json=body).json()["id"]
            wait_for(lambda: c.get(f"/api/v1/runs/{i}").json()["status"] == "completed", what=f"run {i}")
            return i
        a = done({"model": "tiny", **base})
        b = done({"model": "tiny", **base, "lr": 2e-3, "seed": 3, "new_version": True})
        d = done({"model": "tiny2", **base, "max_steps": 8})
        ids = [a, b, d]
        runs = {r["id"]: r for r in c.get("/api/v1/runs").json()}

        with ui_page(browser, ARTIFACTS) as (page, shot):
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{server.url}/?token={TOKEN}#runs")
            page.wait_for_selector("body[data-ready]")
            rows = lambda: page.eval_on_selector_all("#runs-table tbody tr", "rs => rs.map(r => +r.dataset.run)")  # noqa: E731
            assert rows() == sorted(ids, reverse=True)  # newest first
            # sorting: by the loss, ascending, then reversed; the tokens/s column is the run's mean
            # equal values keep the newest first (runpage.js tableRuns): runs a and b log the same tokens, so their
            # means are equal whenever their clocks agree to the millisecond (CI saw it once, 3-2-1 for 3-1-2)
            page.click('button.sort[data-sort="loss"]')
            assert rows() == sorted(ids, key=lambda i: (runs[i]["last_loss"], -i))
            assert page.get_attribute('th:has(button[data-sort="loss"])', "aria-sort") == "ascending"
            page.click('button.sort[data-sort="loss"]')
            assert rows() == sorted(ids, key=lambda i: (-runs[i]["last_loss"], -i))
            page.click('button.sort[data-sort="tps"]')
            assert rows() == sorted(ids, key=lambda i: (runs[i]["tokens_per_s_mean"], -i))
            for i in ids:
                tds = page.eval_on_selector_all(f'#runs-table tr[data-run="{i}"] td', "t => t.map(x => x.textContent)")
                assert tds[7] == f"{js_round(runs[i]['tokens_per_s_mean']):,}"
            # filtering: by a setting, by a word (the model), by a result, by status
            page.fill("#runs-filter", "lr>0.0015")
            assert rows() == [b]
            page.fill("#runs-filter", "tiny2")
            assert rows() == [d]
            worst = max(ids, key=lambda i: runs[i]["last_loss"])
            page.fill("#runs-filter", f"loss<{runs[worst]['last_loss']} kind=train")
            assert sorted(rows()) == sorted(i for i in ids if i != worst)
            page.fill("#runs-filter", "")
            page.select_option("#runs-status", "failed")
            assert rows() == [] and page.is_visible("#runs-table")
            page.select_option("#runs-status", "")
            page.click('button.sort[data-sort="id"]')
            assert rows() == sorted(ids)
            # by a setting: the sort list holds every setting of the runs
            page.select_option("#runs-sort", "p:lr -1")
            assert rows() == sorted(ids, key=lambda i: (-runs[i]["params"]["lr"], -i))
            page.select_option("#runs-sort", "p:max_steps 1")
            assert rows() == sorted(ids, key=lambda i: (runs[i]["params"]["max_steps"], -i))
            assert page.get_attribute('th:has(button[data-sort="loss"])', "aria-sort") == "none"
            page.click('button.sort[data-sort="id"]')
            assert page.input_value("#runs-sort") == "id 1"
            shot("runs-table-1400")

            # compare a and b: only the settings that differ
            page.uncheck(f'#runs-table tr[data-run="{a}"] input[type=checkbox]')  # (the Runs tab overlays the newest)
            for i in (a, b):
                page.check(f'#runs-table tr[data-run="{i}"] input[type=checkbox]')
            for i in ids:
                if i not in (a, b):
                    page.uncheck(f'#runs-table tr[data-run="{i}"] input[type=checkbox]')
            page.click("#runs-compare-btn")
            shown = page.eval_on_selector_all("#compare-table tr[data-setting]", "rs => rs.map(r => r.dataset.setting)")
            sa, sb = settings_of(runs[a]), settings_of(runs[b])
            # b was asked as a new version of a trained model (new_version, kept for starting it again)
            assert shown == sorted(k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k)) == ["lr", "new_version",
                                                                                                   "seed"]
            assert page.inner_text('#compare-table tr[data-setting="lr"]').split("\t")[1:] == ["0.001", "0.002"]
            shot("runs-compare-1400")

            # keyboard focus survives the table's refreshes
            page.evaluate("""() => { window.runsFetches = 0; const f = window.fetch;
                window.fetch = (...args) => { if (String(args[0]).endsWith('/api/v1/runs')) window.runsFetches++;
                                              return f(...args); }; }""")
            page.focus(f'#runs-table tr[data-run="{a}"] button.danger')
            page.evaluate("() => { document.activeElement.mark = 'focused'; }")
            page.wait_for_function("() => window.runsFetches >= 2", timeout=20000)
            page.wait_for_timeout(300)
            assert page.evaluate("() => document.activeElement.mark") == "focused"
            page.keyboard.press("Shift+Tab")  # and keeps working from there
            assert page.evaluate("() => document.activeElement.closest('tr')?.dataset.run") == str(a)

            # a run's page, by its link and its own address
            overview = c.get(f"/api/v1/runs/{a}/overview").json()
            page.click(f'a.run-link[href="#run/{a}"]')
            page.wait_for_selector("#rp-command-text")
            assert page.url.endswith(f"#run/{a}") and page.is_hidden("#tab-runs")
            assert page.inner_text("#rp-title") == f"Run #{a} · tiny"
            fact = lambda k: page.inner_text(f'[data-fact="{k}"] dd')  # noqa: E731
            assert fact("tps_mean") == f"{js_round(runs[a]['tokens_per_s_mean']):,}"
            assert fact("tps_now") == f"{js_round(runs[a]['tokens_per_s']):,}"
            assert fact("steps") == "6 / 6" and fact("phase") == "completed"
            assert page.inner_text("#rp-command-text") == overview["command"]
            samples = [json.loads(x) for x in (tmp_path / "ws" / "runs" / f"run-{a}" / "samples.jsonl")
                       .read_text().splitlines()]
            assert page.eval_on_selector_all("#rp-samples .sample", "s => s.map(x => +x.dataset.step)") == [6, 3]
            texts = page.eval_on_selector_all("#rp-samples .sample .output", "s => s.map(x => x.textContent)")
            assert texts == [s["prompt"] + s["text"] for line in reversed(samples) for s in line["samples"]]
            settings = page.eval_on_selector_all("#rp-settings dt", "ts => ts.map(t => t.textContent)")
            config = overview["config"]
            assert settings == [*config["train"], *("model." + k for k in config["model"])]
            # the charts: charts.js's uPlot chart in the page's own element, every train and val point of the run
            page.wait_for_function("() => +document.querySelector('#rp-chart-loss').dataset.points === 8")
            assert page.evaluate("() => document.querySelector('#rp-chart-loss').uplot != null")
            assert page.evaluate("() => document.querySelector('#rp-chart-loss').clientWidth > 100")
            metrics = [json.loads(x) for x in (tmp_path / "ws" / "runs" / f"run-{a}" / "metrics.jsonl")
                       .read_text().splitlines()]
            assert fact("mfu") == f"{[m for m in metrics if m.get('mfu') is not None][-1]['mfu'] * 100:.2f} %"
            shot("run-page-1400")
            page.set_viewport_size({"width": 390, "height": 844})
            # the charts are drawn again at the new width (a debounced resize handler), as test_browser_ux waits
            page.wait_for_function("""() => [...document.querySelectorAll('#run-page [id^="rp-chart-"]')].every(el => {
                const u = el.querySelector('.uplot'); return !u || u.offsetWidth <= el.clientWidth; })""")
            # nothing of the page reaches past the screen's right edge (the header is the phone layout's work)
            assert page.evaluate(WIDEST, "#run-page") <= 390
            shot("run-page-390")
            page.set_viewport_size({"width": 1400, "height": 900})
            # the same page opened from its address
            page.goto(f"{server.url}/#run/{b}")
            page.wait_for_selector("#rp-title")
            assert page.inner_text("#rp-title") == f"Run #{b} · tiny"
            # clone: the train form holds b's settings
            page.wait_for_selector("#rp-clone")
            page.click("#rp-clone")
            assert page.is_visible("#tab-train")
            assert [page.input_value(f"#t-{k}") for k in ("max_steps", "batch_size", "lr", "seed", "eval_every")] == \
                ["6", "4", "0.002", "3", "3"]
            assert page.eval_on_selector_all("#train-books input:checked", "i => i.map(x => x.value)") == ["tales.txt"]

            # a self-play run's page: its sampled completions with their rewards
            sp = c.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-sp", "iterations": 2,
                                                       "group_size": 2, "prompts_per_iteration": 1,
                                                       "max_new_tokens": 6, "prompts": ["Once"]}).json()["id"]
            wait_for(lambda: c.get(f"/api/v1/runs/{sp}").json()["status"] == "completed", what="the self-play run")
            page.goto(f"{server.url}/#run/{sp}")
            page.wait_for_selector("#rp-completions tbody tr")
            spm = [json.loads(x) for x in (tmp_path / "ws" / "runs" / f"run-{sp}" / "metrics.jsonl").read_text()
                   .splitlines()]
            got = page.eval_on_selector_all("#rp-completions tbody tr",
                                            "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
            assert got == [[str(m["step"]), f"{m['reward']:.4f}", f"{m['kl']:.4f}", m["sample"]] for m in reversed(spm)]
            assert page.inner_text("#rp-title") == f"Run #{sp} · tiny → tiny-sp"
            page.wait_for_function("() => +document.querySelector('#rp-chart-reward').dataset.points === 2")
            shot("run-page-selfplay-1400")
            page.select_option("#lang", "ru")  # the page in Russian: its strings are translated
            title = f"Запуск №{sp} · tiny → tiny-sp"
            page.wait_for_function(f"() => document.querySelector('#rp-title').textContent === {json.dumps(title)}")
            assert page.inner_text('[data-fact="phase"] dt') == "Этап" and page.inner_text("#rp-completions h3") == \
                "Сгенерированные продолжения и их награды"
            shot("run-page-selfplay-ru-1400")
            page.select_option("#lang", "en")

            # a run that prepares: its charts say so (not "no data yet — select a run")
            body = {"model": "tiny2", **base, "max_steps": 100000, "new_version": True}
            e = c.post("/api/v1/runs", json=body).json()["id"]
            frozen = wait_for(lambda: c.get(f"/api/v1/runs/{e}").json()["pid"], 60, 0.02, "the run's process")
            os.killpg(frozen, signal.SIGSTOP)
            run = c.get(f"/api/v1/runs/{e}").json()
            wait_for(lambda: c.get(f"/api/v1/runs/{e}").json()["phase"] == run["phase"], 10, 0.2, "the phase to settle")
            run = c.get(f"/api/v1/runs/{e}").json()
            assert run["current_step"] == 0 and run["phase"] in PHASES, run
            page.goto(f"{server.url}/#run/{e}")
            page.wait_for_selector('[data-fact="phase"]')
            page.wait_for_function(f"""() => document.querySelector('[data-fact="phase"] dd').textContent
                                    === {json.dumps(PHASES[run['phase']])}""")
            assert page.text_content("#rp-chart-loss .chart-empty") == PHASES[run["phase"]]
            page.goto(f"{server.url}/#runs")
            page.wait_for_selector("body[data-ready]")
            page.wait_for_selector(f'#runs-table tr[data-run="{e}"]')
            for i in ids:
                page.uncheck(f'#runs-table tr[data-run="{i}"] input[type=checkbox]')
            page.check(f'#runs-table tr[data-run="{e}"] input[type=checkbox]')
            assert page.text_content("#chart-loss .chart-empty") == PHASES[run["phase"]]
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(300)
            assert page.evaluate("() => document.querySelector('#runs-table').getBoundingClientRect().right") <= 390
            assert page.evaluate(WIDEST, "#runs-tools") <= 390
            shot("runs-table-390")
    finally:
        if frozen:
            kill_run_process(frozen)
        server.stop()
