"""Steering in the Generate view in a real browser, on a real `lmlab serve`: the model's saved directions are
offered, a steered greedy generation (added with a coefficient, then ablated) shows the API's text for the same
request, and the coefficient is disabled while ablating. No console errors, no serious or critical axe-core
finding, no sideways scroll at 390 px; screenshots at 1400 and 390 px, English and Russian, in
tests/artifacts/ux/steer/."""

from __future__ import annotations

import torch
from test_browser import TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_modelpage import shots
from test_browser_ux import SHOTS, show
from test_server_support import ServerProcess

from lmlab.lab.interp.steer import Direction
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus

REQUEST = {"model": "steered", "prompt": "Once upon", "max_new_tokens": 12, "do_sample": False, "top_k": 40,
           "temperature": 0.8, "top_p": 1, "repetition_penalty": 1, "num_beams": 1, "length_penalty": 1,
           "stop_strings": []}


def test_generate_with_a_steering_direction(tmp_path, browser):  # noqa: F811
    ws = tmp_path / "ws"
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    torch.manual_seed(0)
    folder = save_pretrained(ws / "models" / "steered", Transformer(ModelConfig.preset(
        "llama-tiny", vocab_size=120, block_size=64, n_kv_head=2)), tok)
    torch.manual_seed(1)
    Direction(torch.randn(64) * 4, 1, {"method": "difference of means"}).save(folder / "steering" / "ru-en")
    server = ServerProcess(ws, token=TOKEN).start()
    problems = []
    try:
        with server.client() as c:
            plain = c.post("/api/v1/generate", json=REQUEST).json()["text"]
            added, ablated = (c.post("/api/v1/generate", json={**REQUEST, "steer": "ru-en", **how}).json()["text"]
                              for how in ({"steer_coef": 4}, {"steer_ablate": True}))
        assert len({plain, added, ablated}) == 3  # each setting gives its own text
        with ui_page(browser, SHOTS / "steer") as (page, shot):
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{server.url}/?token={TOKEN}#generate")
            page.wait_for_selector("body[data-ready]")
            show(page, "generate")
            page.wait_for_selector('#g-steer option[value="ru-en"]', state="attached")
            assert page.eval_on_selector_all("#g-steer option", "os => os.map(o => o.textContent)") == [
                "none", "ru-en (layer 1, norm " + f"{float(Direction.load(folder / 'steering' / 'ru-en').norm):.2f})"]
            assert page.is_disabled("#g-steer-coef") and page.is_disabled("#g-steer-ablate")
            page.fill("#gen-prompt", REQUEST["prompt"])
            page.fill("#g-max_new_tokens", "12")
            page.check("#g-greedy")
            for setup, want in ((lambda: None, plain),
                                (lambda: (page.select_option("#g-steer", "ru-en"), page.fill("#g-steer-coef", "4")),
                                 added),
                                (lambda: page.check("#g-steer-ablate"), ablated)):
                setup()
                page.click("#gen-go")
                page.wait_for_function("() => !document.querySelector('#gen-go').disabled && "
                                       "document.querySelector('#gen-msg').textContent.includes('tokens')")
                assert page.inner_text("#gen-output") == want
            assert page.is_disabled("#g-steer-coef") and not page.is_disabled("#g-steer-ablate")
            page.uncheck("#g-steer-ablate")
            problems += shots(page, shot, "generate-steer")
            page.select_option("#lang", "ru")
            assert page.inner_text("#tab-generate fieldset.steer legend") == "Направление управления (steering)"
            problems += shots(page, shot, "generate-steer-ru")
        assert not problems, problems
    finally:
        server.stop()
