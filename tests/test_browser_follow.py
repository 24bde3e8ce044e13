"""A review's findings in the page, in a real browser on a real `lmlab serve` with tiny models, the server's
answers that would need a long job (a running tune run, a chat model's reply, a model made meanwhile) given by
routes: the Tune tab's chart follows its run when the Runs tab unticks or resumes it; Send keeps the keyboard
(on Stop while the reply streams, on Send after); the Tune form's errors name its own fields; the merge form
offers models made after it was drawn and never a quantized one, and names a weight that is not a number; the
Russian page says loss, durations, the overlay box and an empty chart in Russian; a checkbox keeps its size at
390 px. Screenshots at 1400 and 390 px in English and Russian go to tests/artifacts/browser-follow/."""

from __future__ import annotations

import json

import pytest
from test_browser import ARTIFACTS, TOKEN, browser, playwright_api, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_ux import every_layout
from test_server_support import ServerProcess

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.server.db import Database
from lmlab.server.workspace import Workspace
from lmlab.tokenizers import Tokenizer

SHOTS = ARTIFACTS.parent / "browser-follow"
TUNE = {"method": "sft", "new_model": "base-sft", "dataset": "chats.jsonl"}

# a stand-in for the app's metrics streams: each one kept (url, closed), its events sent by the test
FAKE_STREAMS = """
window.__streams = [];
window.EventSource = class {
  constructor(url) { this.url = url; this.closed = false; this.on = {}; window.__streams.push(this); }
  addEventListener(type, f) { (this.on[type] ||= []).push(f); }
  close() { this.closed = true; }
  emit(type, data) { for (const f of this.on[type] || []) f({ data: JSON.stringify(data) }); }
};
window.__open = (id) => window.__streams.filter((s) => !s.closed && s.url.includes(`/runs/${id}/events`));
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Trained tiny models base, other, quant and late; run 1, a completed SFT run of base (the routes below
    say it is running), and run 2, a completed quantization of base, with no metrics."""
    ws = tmp_path_factory.mktemp("follow") / "ws"
    tok = Tokenizer.train(["abc def ghi " * 20], kind="char", vocab_size=40)
    for name in ("base", "other", "quant", "late"):
        save_pretrained(Workspace(ws).model_path(name), Transformer(ModelConfig.preset(
            "gpt2-tiny", vocab_size=len(tok) + 8, n_layer=1, block_size=16)), tok)
    db = Database(Workspace(ws).sqlite_url())
    for params, kind in ((TUNE, "tune"), ({"new_model": "q", "to": "int8", "method": "rtn"}, "quantize")):
        run = db.add_run("base", [], params, True, 100, kind=kind)
        db.update_run(run["id"], status="completed")
    db.close()
    server = ServerProcess(ws, token=TOKEN).start()
    yield server
    server.stop()


def patch_json(page, pattern, change):
    """GET `pattern` answered with the server's JSON as `change(json)` returns it."""
    def handle(route):
        if route.request.method != "GET":
            return route.fallback()
        try:
            res = route.fetch()
            route.fulfill(response=res, json=change(res.json()))
        except playwright_api.Error as exc:  # a poll still in flight when the test closed its page (CI, teardown)
            if "disposed" not in str(exc) and "closed" not in str(exc):
                raise
    page.route(pattern, handle)


def test_tune_chart_follows_its_run_unticked_or_resumed_in_the_runs_tab(server, browser):  # noqa: F811
    state = {"status": "running", "can_resume": False}
    with ui_page(browser, SHOTS / "tune") as (page, shot):
        page.add_init_script(FAKE_STREAMS)
        patch_json(page, "**/api/v1/runs", lambda runs: [{**r, **state} if r["id"] == 1 else r for r in runs])
        page.route("**/api/v1/runs/1/resume", lambda route: (state.update(status="running", can_resume=False),
                                                              route.fulfill(json={**route.fetch().json(), **state})))
        page.goto(f"{server.url}/?token={TOKEN}#tune")
        page.wait_for_selector("body[data-ready]")
        page.click('#tn-runs tr[data-run="1"] button.view')
        page.click('#tabs button[data-tab="runs"]')
        page.check('#runs-table tr[data-run="1"] input[type=checkbox]')
        page.uncheck('#runs-table tr[data-run="1"] input[type=checkbox]')
        # ticked and unticked here, shown in Tune: its stream stays open, and its points reach the Tune chart
        assert page.evaluate("__open(1).length") == 1
        page.evaluate("for (const step of [1, 2, 3]) __open(1)[0].emit('metric', { step, loss: 3 - step / 2 })")
        page.click('#tabs button[data-tab="tune"]')
        page.wait_for_selector("#chart-tune-loss .lg")
        assert page.eval_on_selector("#chart-tune-loss .lg", "e => e.dataset.count") == "3"
        # the run stops (its stream ends) and is resumed from the Runs tab, still unticked: followed again
        state.update(status="interrupted", can_resume=True)
        page.evaluate("__open(1)[0].emit('end', {})")
        page.click('#tabs button[data-tab="runs"]')
        page.click('#runs-table tr[data-run="1"] button.resume')
        page.wait_for_function("() => __open(1).length === 1")
        page.evaluate("__open(1)[0].emit('metric', { step: 1, loss: 2.5 })")
        page.click('#tabs button[data-tab="tune"]')
        page.wait_for_function("() => document.querySelector('#chart-tune-loss .lg').dataset.count === '1'")
        shot("tune-followed-1400")


CARDS = lambda cards: [{**c, "chat": c["name"] == "base"} for c in cards]  # noqa: E731
REPLY = "".join(f"data: {x}\n\n" for x in (json.dumps({"choices": [{"delta": {"content": "5"}}]}),
                                          json.dumps({"choices": [{"delta": {}, "finish_reason": "stop"}]}), "[DONE]"))


def test_send_keeps_the_keyboard(server, browser):  # noqa: F811
    held = []

    def request(page):  # the held request, once Playwright has routed it (its handler runs while the page is waited on)
        for _ in range(200):
            if held:
                return held.pop(0)
            page.wait_for_timeout(50)
        raise AssertionError("the chat request never came")

    with ui_page(browser, SHOTS / "chat") as (page, shot):
        patch_json(page, "**/api/v1/cards", CARDS)
        page.route("**/api/v1/chat/fit", lambda route: route.fulfill(json={"drop": 0}))
        page.route("**/v1/chat/completions", lambda route: held.append(route))
        page.goto(f"{server.url}/?token={TOKEN}#chat")
        page.wait_for_selector('#chat-model option[value="base"]', state="attached")
        page.fill("#chat-input", "2+3?")
        page.focus("#chat-send")
        page.keyboard.press("Enter")
        # while the reply streams Send is off: the keyboard is on Stop
        page.wait_for_function("() => document.activeElement.id === 'chat-stop'")
        assert page.is_disabled("#chat-send")
        request(page).fulfill(status=200, content_type="text/event-stream", body=REPLY)
        page.wait_for_selector(".chat-turn.assistant:not(.streaming)")
        assert page.inner_text(".chat-turn.assistant .chat-text") == "5"
        assert page.evaluate("document.activeElement.id") == "chat-send"
        # sent from the text box, stopped from the keyboard: back on Send
        page.fill("#chat-input", "4+1?")
        page.keyboard.press("Enter")
        page.wait_for_selector("#chat-stop:not([disabled])")
        page.focus("#chat-stop")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.activeElement.id === 'chat-send'")
        assert page.inner_text("#chat-msg") == "Stopped: that reply is not kept in the conversation."
        shot("chat-1400")


# FastAPI's 422 for a tune request out of range, one error per field the Tune form names in its own words
ERRORS = [("lora_rank", "less_than_equal", {"le": 1024}), ("lora_hard_tokens", "less_than_equal", {"le": 4096}),
          ("lora_alpha", "greater_than", {"gt": 0}), ("lora_dropout", "less_than", {"lt": 1}),
          ("max_steps", "greater_than_equal", {"ge": 1}), ("prompts_per_step", "greater_than_equal", {"ge": 1}),
          ("sft_weight", "greater_than_equal", {"ge": 0}), ("alpha", "less_than_equal", {"le": 1}),
          ("new_model", "string_too_long", {"max_length": 100})]
RU = ["Ранг: должно быть не больше 1024", "Строки самых трудных токенов: должно быть не больше 4096",
      "Альфа: должно быть больше 0", "Прореживание: должно быть меньше 1", "Шагов: должно быть не меньше 1",
      "Запросов на шаг: должно быть не меньше 1", "Вес NLL выбранных ответов (DPO + NLL): должно быть не меньше 0"]


def test_tune_errors_name_the_tune_form_fields(server, browser):  # noqa: F811
    detail = [{"loc": ["body", f], "type": t, "msg": "", "input": 0, "ctx": c} for f, t, c in ERRORS]
    with ui_page(browser, SHOTS / "tune-errors", ignore="status of 422") as (page, shot):
        page.route("**/api/v1/runs/tune", lambda route: route.fulfill(status=422, json={"detail": detail}))
        page.goto(f"{server.url}/?token={TOKEN}#tune")
        page.wait_for_selector('#tn-model option[value="base"]', state="attached")
        page.select_option("#lang", "ru")
        page.select_option("#tn-method", "grpo")  # no dataset needed
        page.click("#tn-start")
        page.wait_for_selector("#tn-msg.bad")
        alpha = page.inner_text('label:has(#tn-alpha) span')
        new = page.inner_text('label:has(#tn-new) span')
        assert page.inner_text("#tn-msg") == "✗ " + "; ".join(
            RU + [f"{alpha}: должно быть не больше 1", f"{new}: не длиннее 100 символов"])
        assert "Альфа" not in (alpha, new)  # the distillation's alpha, not LoRA's
        shot("tune-errors-1400-ru")


def test_merge_form_offers_the_models_it_can_merge_with(server, browser):  # noqa: F811
    state = {"late": False, "runs": False}
    quantized = {"kind": "quantize", "parent": "base"}
    models = lambda ms: [{**m, "origin": quantized if m["name"] == "quant" else m["origin"]}  # noqa: E731
                         for m in ms if m["name"] != "late" or state["late"]]
    with ui_page(browser, SHOTS / "merge", ignore="status of 400") as (page, shot):
        patch_json(page, "**/api/v1/models", models)
        patch_json(page, "**/api/v1/runs", lambda runs: runs if state["runs"] else [])
        sent = []
        page.route("**/api/v1/runs/merge", lambda route: (sent.append(route.request.post_data_json),
                                                          route.fulfill(status=400, json={"detail": "held"})))
        page.goto(f"{server.url}/?token={TOKEN}#model/base")
        page.wait_for_selector("#mp-merge-form")
        others = "es => es.map(e => e.value)"
        assert page.eval_on_selector_all("#mpm-others input", others) == ["other"]
        page.check('#mpm-others input[value="other"]')
        # a model made meanwhile (a run finished): offered, what was ticked stays ticked
        state.update(late=True, runs=True)
        page.wait_for_function("() => document.querySelectorAll('#mpm-others input').length === 2")
        assert page.eval_on_selector_all("#mpm-others input", others) == ["late", "other"]
        assert page.is_checked('#mpm-others input[value="other"]')
        # a weight that is not a number is named, and nothing is sent
        page.fill("#mpm-weights", "1, x")
        page.click("#mp-merge")
        assert page.inner_text("#mpm-msg") == "✗ Weights, one per model: “x” is not a number"
        page.select_option("#lang", "ru")
        page.fill("#mpm-weights", "1,")
        page.click("#mp-merge")
        assert page.inner_text("#mpm-msg") == "✗ Веса, по одному на модель: «» — не число"
        assert sent == []
        page.fill("#mpm-weights", "1, 0.5")
        page.click("#mp-merge")
        page.wait_for_selector("#mpm-msg.bad >> text=held")
        assert sent[0]["weights"] == [1, 0.5] and sent[0]["others"] == ["other"]
        shot("merge-1400-ru")


def test_russian_words_an_empty_chart_and_a_checkbox_at_390(server, browser):  # noqa: F811
    with ui_page(browser, SHOTS / "words") as (page, shot):
        page.add_init_script(FAKE_STREAMS)
        patch_json(page, "**/api/v1/runs", lambda runs: [{**r, "elapsed_s": 13} for r in runs])
        page.goto(f"{server.url}/?token={TOKEN}#runs")
        page.click('#runs-table tr[data-run="2"] button >> text=Chart')
        page.uncheck('#runs-table tr[data-run="1"] input[type=checkbox]')
        page.select_option("#lang", "ru")
        # a selected run that logs no metrics: said so, not "select a run"
        assert page.text_content("#chart-loss .chart-empty") == "этот запуск не записывает метрик"
        loss = "Потери (обучение — сплошная, валидация — пунктир)"
        assert page.inner_text("figure:has(#chart-loss) figcaption").split("\n")[0] == loss  # then CSV, PNG
        overlay = page.get_attribute('#runs-table tr[data-run="2"] input[type=checkbox]', "aria-label")
        assert overlay == "наложить запуск 2"
        assert page.text_content("#runs-table thead th:last-child") == "Действия"
        assert page.text_content("h1") == "lmlab"
        page.select_option("#lang", "en")
        assert page.text_content("#chart-loss .chart-empty") == "this run records no metrics"
        page.goto(f"{server.url}/?token={TOKEN}#run/2")
        page.wait_for_selector("[data-fact=elapsed] dd")
        page.select_option("#lang", "ru")
        page.wait_for_function("() => document.querySelector('[data-fact=elapsed] dd').textContent === '13 с'")
        page.select_option("#lang", "en")
        page.wait_for_function("() => document.querySelector('[data-fact=elapsed] dd').textContent === '13 s'")
        # the Tune form's long checkbox label beside its box: the box keeps its size at 390 px
        page.goto(f"{server.url}/?token={TOKEN}#tune")
        page.wait_for_selector('#tn-model option[value="base"]', state="attached")

        def box(page):
            size = page.eval_on_selector("#tn-lora-new-tokens", "e => [e.offsetWidth, e.offsetHeight]")
            assert size[0] >= 13 and size[0] == size[1], size
        assert every_layout(page, shot, "tune", ready=box) == []
