"""A model's page and the Chat tab in a real browser, on a real `lmlab serve`: a model quantized from its page (a
job of the server) appears as a new model whose card shows the API's numbers, and tokens/s appear only once
measured; a conversation with a model that has a chat template streams replies equal to the API's greedy ones,
with its history; models without a template are not offered. No console errors, no serious or critical axe-core
finding, no sideways scroll at 390 px; screenshots at 1400 and 390 px, English and Russian, in
tests/artifacts/ux/ (model-page-*.png, chat-*.png)."""

from __future__ import annotations

import json

import httpx
import torch
from test_browser import TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_ux import SHOTS, axe_violations, show
from test_server_support import BOOK, ServerProcess

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus
from lmlab.tune.chat import add_chat_tokens, write_template

TURN = '#chat-log .chat-turn[data-role="assistant"]'


def make_models(ws):
    """`base` (weights saved by hand, no template) and `chatty` (lmlab's chat tokens and template added)."""
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    torch.manual_seed(0)
    save_pretrained(ws / "models" / "base", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=1,
                                                                           block_size=64)), tok)
    model, chat_tok, _ = add_chat_tokens(Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=1,
                                                                        block_size=96)), tok)
    save_pretrained(ws / "models" / "chatty", model, chat_tok)
    write_template(ws / "models" / "chatty")


def greedy(c: httpx.Client, messages: list[dict], max_tokens: int) -> str:
    r = c.post("/v1/chat/completions", json={"model": "chatty", "messages": messages, "temperature": 0,
                                             "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def shots(page, shot, name: str) -> list[str]:
    """Screenshots at 1400 and 390 px (no sideways scroll at 390); the axe-core findings at both."""
    problems = []
    for width in (1400, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(100)
        wide = page.evaluate("() => document.scrollingElement.scrollWidth")
        assert wide <= width, (name, width, wide)
        shot(f"{name}-{width}")
        problems += [f"{name} @{width}: {v}" for v in axe_violations(page)]
    page.set_viewport_size({"width": 1400, "height": 900})
    return problems


def served_models(tmp_path) -> ServerProcess:
    """make_models' workspace and the book tales.txt, served (the caller stops it)."""
    make_models(tmp_path / "ws")
    server = ServerProcess(tmp_path / "ws", token=TOKEN).start()
    try:
        with server.client() as c:
            assert c.post("/api/v1/books", files={"file": ("tales.txt", BOOK.encode())}).status_code == 201
    except BaseException:
        server.stop()
        raise
    return server


def test_quantize_from_the_model_page_and_chat_with_a_template_model(tmp_path, browser):  # noqa: F811
    server = served_models(tmp_path)
    problems = []
    try:
        # (the refusals the test asks for, 409 and 422, and the reply it cuts off are logged by Chromium as failed
        # loads)
        with ui_page(browser, SHOTS / "modelpage", ignore=("status of 409", "status of 422", "net::ERR_FAILED")) as (
                page, shot):
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{server.url}/?token={TOKEN}#models")
            page.wait_for_selector("body[data-ready]")
            # the models table links each model to its page
            page.click('#models-table tr[data-model="base"] a.model-link')
            page.wait_for_selector('#tab-model:not([hidden]) #mp-card [data-fact="bpw"] dd:text-is("32")')
            assert page.url.endswith("#model/base")
            assert page.inner_text('#mp-card [data-fact="weights"] dd') == "fp32"
            assert page.inner_text('#mp-card [data-fact="tps"] dd').startswith("not measured")
            # a refusal in words: the name of a model that exists
            page.fill("#mp-new_model", "chatty")
            page.click("#mp-quantize")
            page.wait_for_selector("#mp-msg.bad")
            assert page.inner_text("#mp-msg") == ("✗ a model named 'chatty' already exists; choose another name for "
                                                  "the new model")
            # in Russian, the server's named error in Russian (it was the English sentence)
            page.select_option("#lang", "ru")
            page.fill("#mp-new_model", "chatty")
            page.click("#mp-quantize")
            page.wait_for_function("() => document.querySelector('#mp-msg').textContent.includes('Модель')")
            assert page.inner_text("#mp-msg") == "✗ Модель с именем «chatty» уже есть; выберите другое имя"
            page.fill("#mp-new_model", "CHATTY")  # a name that differs only in case: said in Russian too now
            page.click("#mp-quantize")
            page.wait_for_function("() => document.querySelector('#mp-msg').textContent.includes('регистром')")
            assert page.inner_text("#mp-msg") == ("✗ Имя «chatty» уже занято, а имена, которые отличаются только "
                                                  "регистром букв, на некоторых системах попадут в одну папку: "
                                                  "выберите другое вместо «CHATTY»")
            shot("ru-case-twin")
            page.select_option("#lang", "en")
            # int4 g32 with GPTQ on the workspace's book, kept head
            page.select_option("#mp-to", "int4")
            page.select_option("#mp-method", "gptq")
            page.check('#mp-calibration input[value="tales.txt"]')
            page.fill("#mp-new_model", "base-int4")
            page.click("#mp-quantize")
            page.wait_for_selector('#mp-jobs tr[data-status="completed"] a.model-link', timeout=120_000)
            run_id = int(page.get_attribute("#mp-jobs tr[data-run]", "data-run"))
            with server.client() as c:
                assert c.get(f"/api/v1/runs/{run_id}").json()["params"] == {
                    "new_model": "base-int4", "to": "int4", "group_size": 32, "method": "gptq",
                    "calibration": ["tales.txt"], "keep_head": False}
                card = c.get("/api/v1/models/base-int4/card").json()
            problems += shots(page, shot, "model-page-job")
            page.click('#mp-jobs tr[data-status="completed"] a.model-link')
            page.wait_for_selector('#mp-card [data-fact="weights"] dd:text-is("int4 g32 gptq")')
            bpw = page.inner_text('#mp-card [data-fact="bpw"] dd')
            assert bpw == f"{round(card['bits_per_weight'], 3):g} · quantized layers 5"
            assert page.inner_text('#mp-card [data-fact="made"] dd') == f"quantized from base (#{run_id})"
            # a quantized model is not quantized again: the form says why instead
            assert page.inner_text("#mp-action-quantize p") == ("This model is quantized already; quantize the model "
                                                                "it was made from.")
            # tokens/s: measured on request, then shown as stored
            page.click("#mp-measure")
            page.wait_for_function("() => !document.querySelector('#mp-card [data-fact=tps] dd')"
                                   ".textContent.startsWith('not measured')")
            with server.client() as c:
                speed = c.get("/api/v1/models/base-int4/card").json()["speed"]
            shown = page.inner_text('#mp-card [data-fact="tps"] dd')
            tps = f"{speed['tokens_per_s']:,.1f}".removesuffix(".0")  # as JavaScript's toLocaleString shows it
            assert shown.startswith(f"{tps} tokens/s\n{speed['new_tokens']} tokens from <BOS> · "
                                    f"threads: {speed['threads']} · "), shown
            problems += shots(page, shot, "model-page")
            page.select_option("#lang", "ru")
            problems += shots(page, shot, "model-page-ru")
            page.select_option("#lang", "en")
            # the runs table names the job as what it made
            show(page, "runs")
            assert page.inner_text(f'#runs-table tr[data-run="{run_id}"] td:nth-child(3)') == (
                "base → base-int4quantization")

            # ---- chat ----
            show(page, "chat")
            page.wait_for_selector('#chat-model option[value="chatty"]', state="attached")
            assert page.eval_on_selector_all("#chat-model option", "os => os.map(o => o.value)") == ["chatty"]
            assert "Without a template: base, base-int4." in page.inner_text("#chat-why")
            page.fill("#chat-temperature", "0")
            page.fill("#chat-max_tokens", "12")
            page.fill("#chat-system", "Answer briefly.")
            history = [{"role": "system", "content": "Answer briefly."}]
            for i, text in enumerate(["Once upon a time", "And then?"]):
                page.fill("#chat-input", text)
                page.press("#chat-input", "Enter")  # Enter sends
                page.wait_for_function(f"() => document.querySelectorAll('{TURN}:not(.streaming)').length == {i + 1}")
                history.append({"role": "user", "content": text})
                with server.client() as c:
                    want = greedy(c, history, 12)
                assert page.inner_text(f"{TURN} >> nth={i} >> .chat-text") == want and want
                history.append({"role": "assistant", "content": want})
            assert page.eval_on_selector_all("#chat-log .chat-turn", "ts => ts.map(t => t.dataset.role)") == [
                "user", "assistant", "user", "assistant"]
            # a conversation that outgrows the context (96 tokens) leaves out its oldest rounds, the system prompt
            # kept, as `lmlab chat` does (every later message failed with the server's context error)
            text, kept = "The fox ran to the river and", history[1:]
            with server.client() as c:
                while True:
                    r = c.post("/v1/chat/completions", json={"model": "chatty", "temperature": 0, "max_tokens": 12,
                               "messages": history[:1] + kept + [{"role": "user", "content": text}]})
                    if r.status_code == 200:
                        break
                    assert r.json()["error"]["code"] == "context_length_exceeded" and kept, r.text
                    kept = kept[2:]
            dropped = len(history) - 1 - len(kept)
            assert dropped >= 2  # the setting overflows
            page.fill("#chat-input", text)
            page.press("#chat-input", "Enter")
            page.wait_for_function(f"() => document.querySelectorAll('{TURN}:not(.streaming)').length == 3")
            assert page.inner_text(f"{TURN} >> nth=2 >> .chat-text") == r.json()["choices"][0]["message"]["content"]
            assert page.eval_on_selector_all("#chat-log .chat-turn.dropped", "ts => ts.length") == dropped
            assert page.inner_text("#chat-msg").startswith("The oldest turns no longer fit in the model's context: ")
            # a turn that fails after the server said which rounds to leave out leaves them in (they were dropped
            # for good), and its text goes back into the box
            fit = []
            page.on("request", lambda q: fit.append(q.post_data_json) if "/chat/fit" in q.url else None)
            page.route("**/v1/chat/completions", lambda route: route.abort())
            page.fill("#chat-input", text)
            page.press("#chat-input", "Enter")
            page.wait_for_selector(f"{TURN}.failed")
            with server.client() as c:
                assert c.post("/api/v1/chat/fit", json=fit[-1]).json()["drop"] > 0  # the failed turn would drop
            assert page.eval_on_selector_all("#chat-log .chat-turn.dropped", "ts => ts.length") == dropped
            assert page.input_value("#chat-input") == text
            assert page.inner_text("#chat-msg") == "✗ The server could not be reached: no reply came."
            page.unroute("**/v1/chat/completions")
            problems += shots(page, shot, "chat")
            hint = page.get_attribute("#chat-system", "placeholder")
            page.select_option("#lang", "ru")
            problems += shots(page, shot, "chat-ru")
            # what the form was made with follows the language (it stayed English)
            assert (hint, page.get_attribute("#chat-system", "placeholder")) == ("e.g. Answer briefly.",
                                                                                 "например: Отвечай кратко.")
            assert page.get_attribute("#chat-max_tokens", "placeholder") == "до конца контекста"
            # refusals in Russian: a message too long for the context (the server's, named), a setting out of range
            page.fill("#chat-input", "Жили-были дед да баба. " * 20)
            page.press("#chat-input", "Enter")
            page.wait_for_function("() => document.querySelector('#chat-msg').textContent.includes('длинное')")
            assert page.inner_text("#chat-msg").startswith("✗ Сообщение слишком длинное для контекста модели (")
            assert page.input_value("#chat-input") == "Жили-были дед да баба. " * 20  # not to be typed again
            page.fill("#chat-temperature", "5")
            page.press("#chat-input", "Enter")
            assert page.inner_text("#chat-msg") == "✗ Температура: должно быть не больше 2"
            page.fill("#chat-temperature", "0")
            page.select_option("#lang", "en")
            page.click("#chat-clear")
            assert page.inner_text("#chat-log") == "The conversation is empty."
            page.fill("#chat-input", "Once upon a time")
            page.press("#chat-input", "Enter")
            page.wait_for_function(f"() => document.querySelectorAll('{TURN}:not(.streaming)').length == 1")
            # its model deleted meanwhile: the conversation goes (it stayed, to be carried on with whichever model
            # the list showed next)
            with server.client() as c:
                assert c.delete("/api/v1/models/chatty").status_code == 204
            show(page, "models")
            show(page, "chat")
            page.wait_for_function("() => !document.querySelector('#chat-model option')")
            assert page.inner_text("#chat-log") == "The conversation is empty."

            # a double click on a start button sends one request (the second got a 409 shown over the first's
            # success, although the job ran)
            posts = []
            page.on("request", lambda q: posts.append(q.url) if q.method == "POST" and "/runs/quantize" in q.url
                    else None)
            page.goto(f"{server.url}/?token={TOKEN}#model/base")
            page.wait_for_selector("#tab-model:not([hidden]) #mp-quantize")
            page.select_option("#mp-to", "int8")
            page.select_option("#mp-method", "rtn")
            page.fill("#mp-new_model", "base-int8")
            page.dblclick("#mp-quantize")
            page.wait_for_selector("#mp-msg.ok")
            page.wait_for_timeout(300)
            assert len(posts) == 1 and page.get_attribute("#mp-msg", "class") == "msg ok", posts
    finally:
        server.stop()
    assert not problems, problems


def test_what_is_filled_in_on_the_model_page_survives_a_language_switch(tmp_path, browser):  # noqa: F811
    """The quantize and merge forms are drawn again in the new language; what was chosen and typed stays, and the
    forms' own rules still hold (a typed name is kept when the format changes; an untyped one follows it)."""
    server = served_models(tmp_path)
    try:
        with ui_page(browser, SHOTS / "modelpage-language") as (page, _shot):
            page.goto(f"{server.url}/?token={TOKEN}#model/base")
            page.wait_for_selector("#mp-quantize-form #mp-to")
            page.select_option("#mp-to", "int4")
            page.select_option("#mp-group_size", "64")
            page.select_option("#mp-method", "gptq")
            page.check('#mp-calibration input[value="tales.txt"]')
            page.check("#mp-keep_head")
            page.select_option("#mpm-method", "ties")
            page.check('#mpm-others input[value="chatty"]')
            page.fill("#mpm-density", "0.7")
            assert page.input_value("#mp-new_model") == "base-int4"
            page.select_option("#lang", "ru")
            page.wait_for_selector('#mp-h-quantize:text-is("Квантовать в новую модель")')
            page.wait_for_timeout(100)
            values = page.evaluate("""() => { const q = (s) => document.querySelector(s); return {
                to: q('#mp-to').value, g: q('#mp-group_size').value, g_off: q('#mp-group_size').disabled,
                method: q('#mp-method').value, name: q('#mp-new_model').value,
                cal: q('#mp-calibration input[value="tales.txt"]').checked,
                cal_off: q('#mp-calibration input').disabled,
                head: q('#mp-keep_head').checked, merge: q('#mpm-method').value, density: q('#mpm-density').value,
                density_off: q('#mpm-density').disabled, other: q('#mpm-others input[value="chatty"]').checked}; }""")
            assert values == {"to": "int4", "g": "64", "g_off": False, "method": "gptq", "name": "base-int4",
                              "cal": True, "cal_off": False, "head": True, "merge": "ties", "density": "0.7",
                              "density_off": False, "other": True}
            # an untyped name still follows the format; a typed one stays through a switch and a change of format
            page.select_option("#mp-to", "int8")
            assert page.input_value("#mp-new_model") == "base-int8"
            page.fill("#mp-new_model", "mine")
            page.select_option("#lang", "en")
            page.wait_for_selector('#mp-h-quantize:text-is("Quantize into a new model")')
            page.wait_for_timeout(100)
            assert page.input_value("#mp-new_model") == "mine"
            page.select_option("#mp-to", "int4")
            assert page.input_value("#mp-new_model") == "mine"
            # a quantization behind another run in the queue is announced as queued, not as started (the
            # request is answered here, as the server answers when a run waits)
            answer = {"id": 7, "kind": "quantize", "status": "queued", "queue_position": 1, "model": "base",
                      "params": {"new_model": "mine"}}
            page.route("**/api/v1/runs/quantize", lambda route: route.fulfill(
                status=201, content_type="application/json", body=json.dumps(answer)))
            page.click("#mp-quantize")
            page.wait_for_selector("#mp-msg.ok")
            assert page.inner_text("#mp-msg") == "Run 7 is queued (position 2)"
    finally:
        server.stop()
