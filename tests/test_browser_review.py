"""What a review of the web app found in the browser (each check fails without its fix): export links offered for
an int8 model (the server answers 422, the download failed silently), the device cuda offered on a server without
one, the supervisor's reasons a run stopped left in English in the Russian page, and the run page's Copy button
throwing where the page is no secure context (http://NAME that is not localhost: no navigator.clipboard).
Screenshots at 1400 and 390 px, English and Russian, go to tests/artifacts/review/."""

from __future__ import annotations

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
import torch  # noqa: E402
from test_browser import ARGS, ARTIFACTS, CHROMIUM, pytestmark, ui_page  # noqa: E402, F401
from test_server_support import BOOK, ServerProcess  # noqa: E402

from lmlab.models import ModelConfig, Transformer  # noqa: E402
from lmlab.models.io import save_pretrained  # noqa: E402
from lmlab.models.quant import quantize_dir  # noqa: E402
from lmlab.server.db import Database  # noqa: E402
from lmlab.server.workspace import Workspace  # noqa: E402
from lmlab.tokenizers import Tokenizer  # noqa: E402

SHOTS = ARTIFACTS.parent / "review"
TOKEN = "review-test-token"
NAME = "lmlab.test"  # resolved to 127.0.0.1 by the browser alone: an http origin that is no secure context
STOPPED = "the server was stopped; resume to continue from the last checkpoint"
STOPPED_RU = "сервер был остановлен; продолжите запуск, чтобы продолжить с последней контрольной точки"
KILLED = "the training process was killed by SIGKILL"


@pytest.fixture()
def lan_browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, f"--host-resolver-rules=MAP {NAME} 127.0.0.1"])
        yield b
        b.close()


def workspace(ws):
    """A trained model m, q its int8 quantization, and two training runs of m stopped by the supervisor."""
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=200)
    save_pretrained(ws / "models" / "m", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=len(tok), n_layer=1,
                                                                        block_size=32)), tok)
    quantize_dir(ws / "models" / "m", ws / "models" / "q", bits=8)
    db = Database(Workspace(ws).sqlite_url())
    ids = []
    for error in (STOPPED, KILLED):
        run = db.add_run("m", [], {"max_steps": 5, "batch_size": 4, "seq_len": 32}, False, 5)
        db.update_run(run["id"], status="interrupted", stop_reason="interrupted", error=error, launches=1)
        ids.append(run["id"])
    db.engine.dispose()
    return ids


def test_links_devices_run_errors_and_copy(tmp_path, lan_browser):
    stopped, killed = workspace(tmp_path / "ws")
    server = ServerProcess(tmp_path / "ws", token=TOKEN).start()
    url = f"http://{NAME}:{server.port}"
    try:
        with ui_page(lan_browser, SHOTS) as (page, shot):
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{url}/?token={TOKEN}#models")
            page.wait_for_selector("body[data-ready]")
            assert page.evaluate("window.isSecureContext") is False and page.evaluate("navigator.clipboard") is None
            page.wait_for_selector('tr[data-model="q"]')
            links = lambda m: page.eval_on_selector_all(f'tr[data-model="{m}"] a', "as => as.map(a => a.className)")  # noqa: E731
            assert links("m") == ["model-link", "download", "export-hf"]  # char tokenizer: no GGUF
            assert links("q") == ["model-link", "download"]  # int8: nothing to export
            for lang in ("en", "ru"):
                page.select_option("#lang", lang)
                for width in (1400, 390):
                    page.set_viewport_size({"width": width, "height": 900})
                    shot(f"models-{lang}-{width}")
            page.select_option("#lang", "en")
            page.click('#tabs button[data-tab="train"]')
            devices = page.eval_on_selector_all("#t-device option", "os => os.map(o => o.value)")
            assert devices == (["auto", "cpu", "cuda"] if torch.cuda.is_available() else ["auto", "cpu"])

            page.set_viewport_size({"width": 1400, "height": 900})
            page.evaluate(f"location.hash = '#run/{stopped}'")
            page.wait_for_selector('#tab-run [data-part="error"]')
            assert page.inner_text('#tab-run [data-part="error"]') == STOPPED
            page.wait_for_selector("#rp-copy")
            command = page.inner_text("#rp-command-text")
            page.click("#rp-copy")  # threw "Cannot read properties of undefined (reading 'writeText')"
            page.wait_for_function("() => document.querySelector('#toast').textContent !== ''")
            assert page.evaluate("getSelection().toString()") == command and command.startswith("lmlab train")
            assert page.inner_text("#toast") in ("Copied", "The command is selected: press Ctrl+C to copy it")
            shot("run-copy-en-1400")
            page.select_option("#lang", "ru")
            page.wait_for_function(f"() => document.querySelector('#tab-run [data-part=\"error\"]').textContent === "
                                   f"{STOPPED_RU!r}")
            for width in (1400, 390):
                page.set_viewport_size({"width": width, "height": 900})
                shot(f"run-error-ru-{width}")
            page.evaluate(f"location.hash = '#run/{killed}'")
            page.wait_for_function("() => document.querySelector('#tab-run [data-part=\"error\"]')?.textContent === "
                                   "'процесс запуска был убит сигналом SIGKILL'")
            page.select_option("#lang", "en")
            page.wait_for_function("() => document.querySelector('#tab-run [data-part=\"error\"]').textContent === "
                                   f"{KILLED!r}")
            shot("run-error-en-390")
    finally:
        server.stop()
