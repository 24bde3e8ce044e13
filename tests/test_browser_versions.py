"""Versions from the web UI in a real browser (Debian's Chromium driven by Playwright): training a trained
model from scratch asks first (declined: nothing starts); accepted, it makes a new version, and the earlier one
is still downloadable from the Models tab's version picker (its weights byte for byte) and generates; a
continued run shows its parent and the model its lineage. Screenshots at 1400 and 390 px go to
tests/artifacts/browser-versions/."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect  # noqa: E402
from test_browser import browser, pytestmark, ui_page  # noqa: E402, F401
from test_server_support import FAST, TINY_MODEL, ServerProcess, upload, wait_run  # noqa: E402

from lmlab.models import GenerationConfig, generate  # noqa: E402
from lmlab.models.io import load_pretrained  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts" / "browser-versions"
DONE = lambda r: r["status"] not in ("queued", "running")  # noqa: E731


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _train_from_the_form(page, continued: bool) -> None:
    page.click('#tabs button[data-tab="train"]')
    page.select_option("#train-model", "tiny")
    page.fill("#t-max_steps", "6")
    page.fill("#t-batch_size", "4")
    if not page.evaluate("document.querySelector('#train-form details').open"):
        page.click("#train-form details summary")
    page.fill("#t-seq_len", "32")
    page.fill("#t-eval_batches", "2")
    if page.is_checked("#t-init_from_trained") != continued:
        page.click("#t-init_from_trained")
    page.click("#start-training")


def test_a_retrain_keeps_the_earlier_version_downloadable(tmp_path, browser):  # noqa: F811 (fixture import)
    ws = tmp_path / "ws"
    server = ServerProcess(ws).start()
    with server.client() as c:  # version 1: run 1, 8 steps
        upload(c)
        c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL})
        r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 8, "save_every": 4,
                                         **FAST})
        assert wait_run(c, r.json()["id"], DONE, "training")["status"] == "completed"
    first = _sha((ws / "models" / "tiny" / "model.safetensors").read_bytes())
    try:
        with ui_page(browser, ARTIFACTS) as (page, shot):
            page.goto(f"{server.url}/#train")
            page.wait_for_selector("body[data-ready]")
            # 1. from scratch on a trained model: asked first; declined, nothing starts
            asked = []
            page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
            _train_from_the_form(page, continued=False)
            page.wait_for_function("() => true")  # the click's handler has run (confirm() blocks it)
            assert len(asked) == 1 and asked[0].startswith("tiny is already trained (run 1, 8 steps). Train a new "
                                                           "version from scratch?"), asked
            with server.client() as c:
                assert [r["id"] for r in c.get("/api/v1/runs").json()] == [1]
            # accepted: run 2, a new version from scratch
            page.once("dialog", lambda d: d.accept())
            page.click("#start-training")
            page.wait_for_selector('#runs-table tr[data-run="2"][data-status=completed]', timeout=180_000)
            with server.client() as c:
                assert c.get("/api/v1/runs/2").json()["init_from_trained"] is False
            assert _sha((ws / "models" / "tiny" / "model.safetensors").read_bytes()) != first
            # run 1 keeps its download in the runs table though the model's weights are run 2's now
            with page.expect_download() as info:
                page.click('#runs-table tr[data-run="1"] a.download')
            assert info.value.suggested_filename == "tiny-run1.zip"
            assert _sha(zipfile.ZipFile(info.value.path()).read("tiny-run1/model.safetensors")) == first

            # 2. the earlier version downloads from the Models tab, byte for byte
            page.click('#tabs button[data-tab="models"]')
            row = '#models-table tr[data-model="tiny"]'
            page.wait_for_selector(f'{row} select.version option[value="1"]', state="attached")
            assert page.inner_text(f'{row} select.version option[value="1"]') == "run 1: final, 8 steps"
            assert page.inner_text(f'{row} select.version option[value="1:4"]') == "run 1: step 4 (4 in all)"
            page.select_option(f"{row} select.version", "1")
            with page.expect_download() as info:
                page.click(f"{row} a.download")
            assert info.value.suggested_filename == "tiny-run1.zip"
            assert _sha(zipfile.ZipFile(info.value.path()).read("tiny-run1/model.safetensors")) == first
            for width in (1400, 390):
                page.set_viewport_size({"width": width, "height": 900})
                shot(f"01-models-versions-{width}")
            page.set_viewport_size({"width": 1280, "height": 900})

            # 3. and generates: the text of run 1's final model, as the library gives it
            page.click('#tabs button[data-tab="generate"]')
            page.select_option("#gen-model", "tiny")
            page.wait_for_selector('#gen-version option[value="1"]', state="attached")
            page.select_option("#gen-version", "1")
            # a version chosen while a refresh of the list is still loading stays chosen (it went back to the current
            # weights: the list kept the value from before its wait, and CI's loaded runs generated from run 2)
            assert page.evaluate("""async () => {
                const real = window.fetch, sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));
                window.fetch = async (...a) => { const r = await real(...a);
                                                 if (String(a[0]).includes("/versions")) await sleep(800); return r; };
                try {
                    const sel = document.querySelector("#gen-version");
                    sel.value = "";
                    document.querySelector("#gen-model").dispatchEvent(new Event("change"));  // the list reloads
                    await sleep(100);
                    sel.value = "1";                                   // chosen meanwhile
                    await sleep(1500);
                    return sel.value;
                } finally { window.fetch = real; }
            }""") == "1"
            page.fill("#gen-prompt", "Once upon")
            page.fill("#g-max_new_tokens", "24")
            page.fill("#g-seed", "5")
            page.click("#gen-go")
            page.wait_for_function("() => document.querySelector('#gen-msg').textContent.includes('tokens/s')")
            # sampled with a seed (temperature 0.8, top-k 40: the form's defaults): the text depends on the exact
            # weights, and the current version's differs, so this tells the two apart
            cfg = GenerationConfig(max_new_tokens=24, temperature=0.8, top_k=40, seed=5)
            ref, now = (generate(*load_pretrained(d), "Once upon", cfg)
                        for d in (ws / "runs" / "run-1" / "final", ws / "models" / "tiny"))
            assert page.inner_text("#gen-output").strip() == ref.strip() and ref != now
            for width in (1400, 390):
                page.set_viewport_size({"width": width, "height": 900})
                shot(f"02-generate-version-{width}")
            page.set_viewport_size({"width": 1280, "height": 900})

            # 4. continued: no question; the run names its parent, the model its lineage
            page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
            _train_from_the_form(page, continued=True)
            page.wait_for_selector('#runs-table tr[data-run="3"][data-status=completed]', timeout=180_000)
            assert len(asked) == 1
            page.click('#runs-table tr[data-run="3"] button')
            assert "continues run 2 (after its step 6)" in page.inner_text("#run-detail-head")
            page.click('#tabs button[data-tab="models"]')
            # the models table follows the runs' refresh (GET /runs, then /models): waited for, not read at once
            expect(page.locator(row)).to_contain_text("trained, 12 steps")
            assert "runs #3 ← #2" in page.inner_text(row)
            shot("03-lineage-1280")
    finally:
        server.stop()


def test_self_play_versions_are_named_as_such(tmp_path, browser):  # noqa: F811 (fixture import)
    """A self-play model's versions (the API's list, tested with real runs in test_server_selfplay.py) are
    offered as the self-play run's iterations and final model, in English and Russian."""
    ws = tmp_path / "ws"
    server = ServerProcess(ws).start()
    with server.client() as c:
        assert c.post("/api/v1/models", json={"name": "tiny-sp", **TINY_MODEL}).status_code == 201
    (ws / "models" / "tiny-sp" / "model.safetensors").write_bytes(b"")  # listed as trained
    versions = [{"run": 3, "kind": "selfplay", "step": 30, "steps": 42, "current": False, "created_at": 1.0},
                {"run": 3, "kind": "selfplay", "step": None, "steps": 52, "current": True, "created_at": 2.0}]
    try:
        with ui_page(browser, ARTIFACTS / "selfplay") as (page, shot):
            page.route("**/api/v1/models/tiny-sp/versions", lambda route: route.fulfill(json=versions))
            page.goto(f"{server.url}/#models")
            page.wait_for_selector("body[data-ready]")
            picker = 'tr[data-model="tiny-sp"] select.version'
            page.wait_for_selector(f'{picker} option[value="3:30"]', state="attached")
            assert page.eval_on_selector_all(f"{picker} option", "os => os.map(o => [o.value, o.textContent])") == [
                ["", "current"], ["3:30", "self-play run 3: iteration 30 (42 steps in all)"]]
            for width in (1400, 390):
                page.set_viewport_size({"width": width, "height": 900})
                shot(f"models-selfplay-versions-{width}")
            page.select_option("#lang", "ru")
            page.wait_for_selector(f'{picker} option[value="3:30"]', state="attached")
            assert page.inner_text(f'{picker} option[value="3:30"]') == \
                "самоигра, запуск 3: итерация 30 (42 шагов всего)"
    finally:
        server.stop()
