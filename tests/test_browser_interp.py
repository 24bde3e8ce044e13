"""Look inside, on a model's page, in a real browser on a real `lmlab serve`: the logit lens drawn as the API
computes it (each cell the top token, shaded by the target's probability), one head's attention chosen by layer
and head, activation patching with its summary; a refusal in words; no console errors, no serious axe finding,
no sideways scroll of the page at 390 px (the tables scroll in their own box); screenshots at 1400 and 390 px in
English and Russian in tests/artifacts/ux/interp/."""

from __future__ import annotations

import torch
from test_browser import TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_ux import SHOTS, every_layout
from test_server_support import ServerProcess

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus


def test_look_inside_a_model(tmp_path, browser):  # noqa: F811
    ws = tmp_path / "ws"
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    torch.manual_seed(0)
    save_pretrained(ws / "models" / "m", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=2,
                                                                        block_size=64)), tok)
    server = ServerProcess(ws, token=TOKEN).start()
    try:
        with ui_page(browser, SHOTS / "interp", ignore="status of 422") as (page, shot):
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{server.url}/?token={TOKEN}#model/m")
            page.wait_for_selector("#ip-form")
            with server.client() as c:
                lens = c.post("/api/v1/models/m/interp", json={"view": "lens", "prompt": "Once upon a time"}).json()
                attn = c.post("/api/v1/models/m/interp", json={"view": "attention", "prompt": "Once upon"}).json()
                patch = c.post("/api/v1/models/m/interp", json={"view": "patch", "prompt": "the cat",
                                                                 "corrupt": "the dog"}).json()
            page.click("#ip-go")
            page.wait_for_selector("#ip-lens")
            # rows: the last block first, down to the embeddings; a cell per position with the top token
            cells = page.eval_on_selector_all("#ip-lens tbody tr", """rows => rows.map(r => [
                r.querySelector('th').textContent,
                [...r.querySelectorAll('td')].map(d => [d.textContent, +d.dataset.v])])""")
            want = [[s, [[top[0]["token"], p] for top, p in zip(lens["top"][i], lens["target"]["prob"][i])]]
                    for i, s in enumerate(lens["streams"])][::-1]
            assert cells == want
            assert page.eval_on_selector_all("#ip-lens thead th", "hs => hs.map(h => h.textContent)")[1:] == \
                lens["tokens"]
            shot("interp-lens-1400")

            page.select_option("#ip-view", "attention")
            assert page.is_disabled("#ip-target")
            page.fill("#ip-prompt", "Once upon")
            page.click("#ip-go")
            page.wait_for_selector("#ip-attention")
            page.select_option("#ip-layer", "1")
            page.select_option("#ip-head", "2")
            page.wait_for_selector('#ip-attention caption:has-text("Layer 1, head 2")')
            weights = page.eval_on_selector_all("#ip-attention tbody tr", "rows => rows.map(r => "
                                                "[...r.querySelectorAll('td')].map(d => +d.dataset.v))")
            assert weights == attn["attention"][1][2]
            shot("interp-attention-1400")

            # a refusal in words, then patching
            page.select_option("#ip-view", "patch")
            page.fill("#ip-prompt", "the cat")
            page.fill("#ip-corrupt", "a dog")
            page.click("#ip-go")
            page.wait_for_selector("#ip-msg.bad")
            assert page.inner_text("#ip-msg") == "✗ prompt and corrupt must have the same number of tokens (7 vs 5)"
            page.fill("#ip-corrupt", "the dog")
            page.click("#ip-go")
            page.wait_for_selector("#ip-patch")
            shown = page.eval_on_selector_all("#ip-patch tbody tr", "rows => rows.map(r => "
                                              "[...r.querySelectorAll('td')].map(d => +d.dataset.v))")
            assert shown == patch["restored"][::-1]
            assert page.inner_text("#ip-patch-summary") == (
                f"logit(“{patch['target']['text']}”) − logit(“{patch['foil']['text']}”): "
                f"{patch['logit_diff_clean']:.3f} clean, {patch['logit_diff_corrupt']:.3f} corrupted.")

            # the section is drawn anew in each language, with the last view
            problems = every_layout(page, shot, "interp", lambda p: (p.wait_for_selector("#ip-patch"),
                                                                     p.locator("#mp-interp").scroll_into_view_if_needed()))
            assert not problems, problems
            assert page.inner_text("#mp-h-interp") == "Заглянуть внутрь"
    finally:
        server.stop()
