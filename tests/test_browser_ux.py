"""The web app for a newcomer, in a real browser: the guided start (a one-click demo on an empty workspace),
every view at 1400 and 390 px (screenshots into tests/artifacts/ux/, no sideways scroll at 390 px, no serious
or critical accessibility violation found by axe-core, tests/data/axe.min.js from the npm package axe-core),
errors in words that name the form field (in English and Russian), exports only where they work, the
Generate form's settings that do not apply switched off, and a models table that keeps keyboard focus."""

from __future__ import annotations

import json
from pathlib import Path

from test_browser import ARTIFACTS, TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_server_support import BOOK, ServerProcess

from lmlab.server.routers.demo import DEMO_BOOK, DEMO_VOCAB
from lmlab.train.demo_corpus import demo_corpus
from lmlab.train.recipes import demo_model_config

SHOTS = ARTIFACTS.parent / "ux"
AXE = Path(__file__).parent / "data" / "axe.min.js"
VIEWS = ("books", "data", "models", "train", "runs", "generate", "evaluate", "chat", "selfplay", "tune", "lab")
DEMO_STEPS = 30  # the button asks for the demo's 300 steps; the test's request is cut to these


def axe_violations(page) -> list[str]:
    """Serious and critical axe-core findings on the page as it is: 'rule: target' per offending node."""
    if not page.evaluate("() => !!window.axe"):  # evaluated, not a <script>: the app's CSP allows no inline script
        page.evaluate(AXE.read_text(encoding="utf-8") + "\n;void 0")
    found = page.evaluate("""async () => (await axe.run(document, {resultTypes: ["violations"]})).violations
        .filter(v => v.impact === "serious" || v.impact === "critical")
        .flatMap(v => v.nodes.map(n => `${v.id}: ${n.target.join(" ")}`))""")
    return found


def every_layout(page, shot, name: str, ready=None) -> list[str]:
    """English, then Russian, at 1400 and 390 px: no sideways scroll of the page, a full-page screenshot
    NAME-WIDTH[-ru], and the serious or critical axe findings as 'lang @width: finding'. `ready(page)` waits,
    after each switch, for what is drawn again."""
    problems = []
    for lang in ("en", "ru"):
        page.select_option("#lang", lang)
        for width in (1400, 390):
            page.set_viewport_size({"width": width, "height": 900})
            if ready is not None:
                ready(page)
            wide = page.evaluate("() => document.scrollingElement.scrollWidth")
            assert wide <= width, (lang, width, wide)
            shot(f"{name}-{width}{'-ru' if lang == 'ru' else ''}")
            problems += [f"{lang} @{width}: {v}" for v in axe_violations(page)]
    return problems


def show(page, view: str) -> None:
    page.click(f'#tabs button[data-tab="{view}"]')
    page.wait_for_selector(f"#tab-{view}:not([hidden])")


def test_demo_from_an_empty_workspace_then_every_view_at_1400_and_390_px(tmp_path, browser):  # noqa: F811
    server = ServerProcess(tmp_path / "ws", token=TOKEN).start()
    try:
        with ui_page(browser, SHOTS) as (page, shot):
            page.goto(f"{server.url}/?token={TOKEN}")
            page.wait_for_selector("body[data-ready]")
            # an empty workspace: the guide, with the demo, on the first tab; the tabs in workflow order
            assert page.is_visible("#guide #demo-go")
            assert page.eval_on_selector_all("#tabs button", "bs => bs.map(b => b.dataset.tab)") == list(VIEWS)
            page.route("**/api/v1/demo", lambda route: route.continue_(post_data=json.dumps({"max_steps": DEMO_STEPS})))
            page.click("#demo-go")
            page.wait_for_selector('#tab-runs:not([hidden]) #runs-table tr[data-run="1"]')
            # while it runs the header says so, legibly on its dark bar (it was .muted grey, 3.7:1)
            assert page.inner_text("#jobs-indicator") in ("1 running · 0 queued", "0 running · 1 queued")
            assert [v for v in axe_violations(page) if v.endswith("#jobs-indicator")] == []
            with server.client() as c:
                run = c.get("/api/v1/runs/1").json()
                model = c.get("/api/v1/models/demo").json()
                book = c.get(f"/api/v1/books/{DEMO_BOOK}").json()
            assert (run["model"], run["books"], run["max_steps"]) == ("demo", [DEMO_BOOK], DEMO_STEPS)
            want = demo_model_config(DEMO_VOCAB).to_dict()
            assert {k: model["config"][k] for k in want} == want and model["tokenizer_kind"] == "bpe"
            assert book["chars"] == len(demo_corpus())
            page.wait_for_selector('#runs-table tr[data-run="1"][data-status=completed]', timeout=300_000)
            # once trained: the guide's step 3 is done; the books table names its token estimate and its rule
            show(page, "books")
            assert "✓" in page.inner_text("#guide li:nth-child(3)")
            assert page.inner_text('#books-table tr[data-book="demo-tales.txt"] td:nth-child(4)') == \
                f"≈ {int(len(demo_corpus()) / 4 + 0.5):,}"  # JavaScript rounds halves up
            show(page, "generate")
            page.fill("#g-seed", "1")
            page.click("#gen-go")
            page.wait_for_function("() => document.querySelector('#gen-msg').textContent.includes('tokens/s')")

            # a quick lab experiment, so that the Lab view shows a report: its table scrolls within the report
            # (it was wider than the frame, cut at the frame's edge)
            with server.client() as c:
                azr = {"lab": "azr", "quick": True, "seeds": [0]}
                assert c.post("/api/v1/runs/experiment", json=azr).status_code == 201
            show(page, "lab")
            page.click('#lab-table tr[data-run="2"][data-status=completed] button.view', timeout=300_000)
            report = page.frame_locator("#lab-report")
            assert report.locator("h1").inner_text(timeout=60_000) == "Absolute Zero miniature"
            for width in (1400, 390):
                page.set_viewport_size({"width": width, "height": 900})
                sizes = page.frames[1].evaluate("() => [document.scrollingElement.scrollWidth, innerWidth]")
                assert sizes[0] <= sizes[1], (width, sizes)
                page.locator("#lab-report").screenshot(path=str(SHOTS / f"lab-report-{width}.png"))

            wide, problems = {}, []
            for width in (1400, 390):
                page.set_viewport_size({"width": width, "height": 900})
                for view in VIEWS:
                    show(page, view)
                    if view == "runs":
                        page.wait_for_function("() => +document.querySelector('#chart-loss').dataset.points > 0")
                    wide[(view, width)] = page.evaluate("() => document.scrollingElement.scrollWidth")
                    shot(f"{view}-{width}")
                    problems += [f"{view} @{width}: {v}" for v in axe_violations(page)]
                # the demo run's own page (#run/1, runpage.js) is a view too
                page.evaluate("() => { location.hash = 'run/1'; }")
                # drawn at this width (the page may first show the charts drawn at the previous one)
                page.wait_for_function("""() => {
                    const el = document.querySelector('#tab-run:not([hidden]) #rp-chart-loss');
                    const u = el && el.querySelector('.uplot'); return u && u.offsetWidth <= el.clientWidth; }""")
                wide[("run", width)] = page.evaluate("() => document.scrollingElement.scrollWidth")
                shot(f"run-{width}")
                problems += [f"run @{width}: {v}" for v in axe_violations(page)]
                # the demo model's own page (#model/demo, modelpage.js): its card, once loaded, and its actions
                page.evaluate("() => { location.hash = 'model/demo'; }")
                page.wait_for_selector('#tab-model:not([hidden]) #mp-card [data-fact="bpw"] dd:text-is("32")')
                wide[("model", width)] = page.evaluate("() => document.scrollingElement.scrollWidth")
                shot(f"model-{width}")
                problems += [f"model @{width}: {v}" for v in axe_violations(page)]
            assert {v: wide[(v, 390)] for v in (*VIEWS, "run", "model") if wide[(v, 390)] > 390} == {}
            assert not problems, problems
            # at 390 px the header stays within its bar and every tab is on screen (or scrolls within the nav)
            page.set_viewport_size({"width": 390, "height": 900})
            outside = page.eval_on_selector_all("header > *, #tabs button", """es => es.filter(e => {
                const r = e.getBoundingClientRect(), h = document.querySelector("header").getBoundingClientRect();
                return r.top < h.top || r.bottom > h.bottom || r.left < 0 || r.right > 390; }).map(e => e.outerHTML)""")
            assert outside == []
            page.select_option("#lang", "ru")
            for view in VIEWS:
                show(page, view)
                shot(f"{view}-390-ru")
            assert not axe_violations(page)
    finally:
        server.stop()


def test_errors_name_the_field_exports_keep_focus_and_generate_switches(tmp_path, browser):  # noqa: F811
    server = ServerProcess(tmp_path / "ws", token=TOKEN).start()
    try:
        with server.client() as c:
            assert c.post("/api/v1/books", files={"file": ("tales.txt", BOOK.encode())}).status_code == 201
            for name, tok in (("bpe-model", "bpe"), ("char-model", "char")):
                assert c.post("/api/v1/models", json={"name": name, "preset": "gpt2-tiny", "tokenizer_kind": tok,
                                                      "vocab_size": 300}).status_code == 201
                # listed as trained: the table's offers depend on the model's kind only
                (tmp_path / "ws" / "models" / name / "model.safetensors").write_bytes(b"")
        # (the 422s the test asks for are logged by Chromium as failed loads)
        with ui_page(browser, SHOTS / "errors", ignore="status of 422") as (page, shot):
            page.goto(f"{server.url}/?token={TOKEN}#lab")
            page.wait_for_selector("body[data-ready]")
            # a validation error in words, naming the field by its label, in the page's language
            page.fill("#lab-seeds", "x, 1")
            page.click("#start-lab")
            page.wait_for_function("() => document.querySelector('#lab-msg').textContent !== ''")
            assert page.inner_text("#lab-msg") == "✗ Seeds (comma list): “x” is not a whole number"
            page.select_option("#lang", "ru")
            page.click("#start-lab")
            page.wait_for_function("() => document.querySelector('#lab-msg').textContent.includes('целое')")
            label = page.inner_text('label:has(#lab-seeds) span')
            assert page.inner_text("#lab-msg") == f"✗ {label}: «x» — не целое число"
            page.select_option("#lang", "en")
            # every interface string has a Russian text of its own (Loss, Val loss, Weight decay, Seed had none)
            same = page.evaluate("""async () => Object.entries((await import("/static/i18n.js")).STRINGS)
                .filter(([k, [en, ru]]) => en === ru).map(([k]) => k)""")
            assert same == ["api.docs", "chart.csv", "chart.png", "rp.mfu"]  # API, CSV, PNG, MFU: the same in Russian
            show(page, "models")
            page.fill("#model-vocab", "3")
            page.wait_for_function("() => document.querySelector('#estimate').textContent.includes('Vocabulary')")
            assert page.inner_text("#estimate") == "✗ Vocabulary size: must be at least 5"
            page.fill("#model-vocab", "300")
            # the custom-architecture fields take the form's width, in columns (they stacked in one cell)
            page.select_option("#model-source", "custom")
            columns = page.eval_on_selector_all("#custom-fields label", "ls => new Set(ls.map(l => l.offsetLeft)).size")
            assert columns == 4  # six fields of 210 px or more: four to a row in the 1280 px page's form
            shot("custom-fields")
            page.select_option("#model-source", "preset")
            # GGUF holds byte-level BPE only: not offered for the character-tokenizer model
            assert page.is_visible('tr[data-model="bpe-model"] a.export-gguf')
            assert page.is_visible('tr[data-model="char-model"] a.export-hf')
            assert not page.query_selector('tr[data-model="char-model"] a.export-gguf')

            # the models table redraws when a run starts; the focused button keeps the focus
            page.focus('tr[data-model="char-model"] button.train')
            page.eval_on_selector('tr[data-model="char-model"]', "tr => { tr.dataset.old = '1'; }")
            with server.client() as c:
                assert c.post("/api/v1/runs", json={"model": "bpe-model", "books": ["tales.txt"],
                                                    "max_steps": 1, "new_version": True}).status_code == 201
            # the row is drawn anew (without the mark) once the page has seen the run
            page.wait_for_function("() => !document.querySelector('tr[data-model=\"char-model\"]').dataset.old",
                                   timeout=60_000)
            focused = page.evaluate("() => [document.activeElement.closest('tr')?.dataset.model,"
                                    " document.activeElement.className]")
            assert focused == ["char-model", "train"]

            # Generate: the prompt right after the model and its version; settings that do not apply are switched off
            show(page, "generate")
            order = page.eval_on_selector_all("#gen-form input, #gen-form select, #gen-form textarea",
                                              "es => es.map(e => e.id)")
            assert order[:3] == ["gen-model", "gen-version", "gen-prompt"]
            sampling = ["#g-temperature", "#g-top_k", "#g-top_p", "#g-seed"]
            assert [page.is_disabled(s) for s in [*sampling, "#g-length_penalty"]] == [False] * 4 + [True]
            page.check("#g-greedy")
            assert [page.is_disabled(s) for s in sampling] == [True] * 4
            page.uncheck("#g-greedy")
            page.fill("#g-num_beams", "3")
            assert [page.is_disabled(s) for s in [*sampling, "#g-length_penalty", "#g-stream"]] == \
                [True] * 4 + [False, True]
    finally:
        server.stop()
