"""Look inside, on a model's page, in a real browser on a real `lmlab serve`: the logit lens drawn as the API
computes it (each cell the top token, shaded by the target's probability), one head's attention chosen by layer
and head, activation patching with its summary; a refusal in words; the feature browser of a saved sparse
autoencoder; no console errors, no serious axe finding, no sideways scroll of the page at 390 px (the tables
scroll in their own box); screenshots at 1400 and 390 px in English and Russian in tests/artifacts/ux/interp/."""

from __future__ import annotations

import torch
from test_browser import TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_ux import SHOTS, every_layout
from test_server_support import ServerProcess, upload

from lmlab.lab.interp.sae import SAEConfig, save_sae, stream_activations, train_sae
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus


def test_look_inside_a_model(tmp_path, browser):  # noqa: F811
    ws = tmp_path / "ws"
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=2, block_size=64))
    save_pretrained(ws / "models" / "m", model, tok)
    book = demo_corpus(n_stories=4, seed=2)
    x = torch.tensor(tok.encode(book)[:64 * 8]).view(8, 64)
    sae, _ = train_sae(stream_activations(model.eval(), x, 1).flatten(0, 1),
                       SAEConfig(d_in=64, n_features=32, kind="topk", k=4, stream=1, steps=20, batch_size=64))
    save_sae(sae, ws / "models" / "m" / "sae" / "s1")
    server = ServerProcess(ws, token=TOKEN).start()
    with server.client() as c:
        assert upload(c, "tales.txt", book.encode()).status_code == 201
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
            # the sparse autoencoder saved beside it: its features over the book, as the API gives them
            with server.client() as c:
                cards = c.post("/api/v1/models/m/saes/s1/browse", json={"book": "tales.txt",
                                                                      "features": [0, 7]}).json()["features"]
            page.fill("#ip-sae-features", "0, 7")
            page.click("#ip-sae-go")
            page.wait_for_selector('.ip-card[data-feature="7"]')
            shown = page.eval_on_selector_all(".ip-card", """cs => cs.map(c => [+c.dataset.feature,
                [...c.querySelectorAll('.ip-contexts li')].map(li => li.querySelector('mark').textContent)])""")
            assert shown == [[c["feature"], [x["tokens"][x["at"]] for x in c["contexts"]]] for c in cards]
            shot("interp-sae-1400")
            problems = every_layout(page, shot, "interp", lambda p: (p.wait_for_selector("#ip-patch"),
                                                                     p.locator("#mp-interp").scroll_into_view_if_needed()))
            assert not problems, problems
            assert page.inner_text("#mp-h-interp") == "Заглянуть внутрь"
    finally:
        server.stop()
