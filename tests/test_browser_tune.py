"""The Tune tab in a real browser, on a real `lmlab serve` with a tiny model: a bad dataset refused with the
server's line naming the line, a good one uploaded and previewed with its trained tokens marked (the API's mask,
token for token), a tiny SFT run started from the form whose loss chart is drawn while it runs, cancelled from
its row, the chart then holding every logged point; the form's fields per method; a distillation run
into a new student started from the form, its two loss parts charted; no console errors, no
serious or critical axe-core finding, no sideways scroll at 390 px; screenshots at 1400 and 390 px in English
and Russian in tests/artifacts/ux/tune/."""

from __future__ import annotations

import json

from test_browser import TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_ux import SHOTS, every_layout
from test_server_support import ServerProcess, upload
from test_server_tune import CHATS, TEXT, jsonl

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.server.workspace import Workspace
from lmlab.tokenizers import Tokenizer

BAD = [CHATS[0], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]


def files(name, records):
    return {"name": name, "mimeType": "application/jsonl", "buffer": jsonl(records)}


def test_upload_preview_and_a_run_with_its_chart_from_the_view(tmp_path, browser):  # noqa: F811
    ws = tmp_path / "ws"
    tok = Tokenizer.train([TEXT], kind="char", vocab_size=120)
    save_pretrained(Workspace(ws).model_path("base"), Transformer(ModelConfig.preset(
        "gpt2-tiny", vocab_size=len(tok) + 8, n_layer=1, block_size=48)), tok)
    server = ServerProcess(ws, token=TOKEN).start()
    with server.client() as c:  # a book for the distillation below
        assert upload(c, "lessons.txt", ((TEXT + "\n") * 30).encode()).status_code == 201
    try:
        with ui_page(browser, SHOTS / "tune", ignore="status of 422") as (page, shot):
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{server.url}/?token={TOKEN}#tune")
            page.wait_for_selector("body[data-ready]")
            page.wait_for_selector('#tn-model option[value="base"]', state="attached")
            tabs = page.eval_on_selector_all("#tabs button", "bs => bs.map(b => b.dataset.tab)")
            assert tabs[tabs.index("selfplay") + 1] == "tune"

            # a bad file: the server's one line, naming the file and the line; nothing listed
            page.set_input_files("#tn-file", files("bad.jsonl", BAD))
            page.click("#tn-upload-go")
            page.wait_for_selector("#tn-upload-msg.bad")
            assert page.inner_text("#tn-upload-msg") == "✗ bad.jsonl:2: message 2: empty assistant turn"
            assert page.is_visible("#tn-datasets-empty")

            # a good one: listed, and previewed with the model's tokens, the trained ones marked
            page.set_input_files("#tn-file", files("chats.jsonl", CHATS))
            page.click("#tn-upload-go")
            page.wait_for_selector('#tn-datasets tr[data-dataset="chats.jsonl"]')
            assert page.inner_text("#tn-upload-msg") == "chats.jsonl: 8 examples of conversations, checked"
            page.wait_for_selector('#tn-preview-rows .tn-row[data-line="1"]')
            with server.client() as c:
                api = c.get("/api/v1/datasets/chats.jsonl/preview", params={"model": "base", "rows": 5}).json()
            assert page.inner_text("#tn-preview-summary").startswith(
                f"8 examples · {api['supervised_tokens']} trained tokens · 0 cut to the context of 49 tokens.")
            shown = page.eval_on_selector_all("#tn-preview-rows .tn-row", """rows => rows.map(r =>
                [...r.querySelectorAll('.tn-tok')].map(s => [s.textContent, s.classList.contains('sup')]))""")
            assert shown == [[[x["text"], x["trained"]] for x in r["tokens"]] for r in api["rows"]]
            first = "".join(text for text, trained in shown[0] if trained)
            assert first == CHATS[0]["messages"][-1]["content"] + "<|end|>" == "5.<|end|>"
            # the same name again: replaced only when the user says so (it was replaced without a word)
            asked = []
            page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
            page.set_input_files("#tn-file", files("chats.jsonl", CHATS[:3]))
            page.click("#tn-upload-go")
            page.wait_for_selector("#tn-upload-msg.bad")
            assert asked == ["chats.jsonl exists already: replace it with this file?"]
            assert page.inner_text("#tn-upload-msg") == "✗ chats.jsonl exists already and was kept as it was"
            with server.client() as c:
                assert c.get("/api/v1/datasets").json()[0]["examples"] == 8
            page.once("dialog", lambda d: d.accept())
            page.click("#tn-upload-go")
            page.wait_for_function("() => document.querySelector('#tn-upload-msg').textContent.includes('3 examples')")
            page.once("dialog", lambda d: d.accept())
            page.set_input_files("#tn-file", files("chats.jsonl", CHATS))
            page.click("#tn-upload-go")
            page.wait_for_function("() => document.querySelector('#tn-upload-msg').textContent.includes('8 examples')")
            page.wait_for_selector('#tn-preview-rows .tn-row[data-line="1"]')

            # a tiny SFT run from the form: its loss chart is drawn while it runs (the metrics stream), and it
            # is cancelled from its row (it checkpoints and stops); the chart then holds every logged point
            page.fill("#tn-steps", "1000")
            page.fill("#tn-batch", "2")
            page.fill("#tn-lr", "0.001")
            assert page.input_value("#tn-new") == "base-sft"
            page.click("#tn-start")
            page.wait_for_selector('#tn-runs tr[data-run="1"][data-status="running"]')
            drawn = "() => +document.querySelector('#chart-tune-loss').dataset.points > 0"
            page.wait_for_function(drawn, timeout=120_000)
            assert page.get_attribute('#tn-runs tr[data-run="1"]', "data-status") == "running"
            page.click('#tn-runs tr[data-run="1"] button.cancel')
            page.wait_for_selector('#tn-runs tr[data-run="1"][data-status="cancelled"] button.resume', timeout=120_000)
            with server.client() as c:
                rows = c.get("/api/v1/runs/1/metrics").json()["metrics"]
                run = c.get("/api/v1/runs/1").json()
            assert 0 < len(rows) < 1000 and [m["step"] for m in rows] == list(range(1, len(rows) + 1))
            everything = sum(("loss" in m) + ("val_loss" in m) for m in rows)
            page.wait_for_function(f"() => +document.querySelector('#chart-tune-loss').dataset.points === {everything}")
            assert run["can_resume"] and page.inner_text("#tn-detail-head") == \
                "#1 · base → base-sft · SFT on chats.jsonl · cancelled"

            problems = every_layout(page, shot, "tune", lambda p: p.wait_for_function("""() => {
                const el = document.querySelector('#chart-tune-loss'), u = el && el.querySelector('.uplot');
                return u && u.offsetWidth <= el.clientWidth && u.offsetWidth > el.clientWidth - 4; }"""))
            assert not problems, problems
            assert page.inner_text("#tab-tune h2") == "Дообучение обученной модели"
            # the server's refusal in the page's language (app.py's Problem), its reason the reader's own line
            page.set_input_files("#tn-file", files("bad.jsonl", BAD))
            page.click("#tn-upload-go")
            page.wait_for_selector("#tn-upload-msg.bad")
            assert page.inner_text("#tn-upload-msg") == ("✗ Набор данных «bad.jsonl» не подходит: bad.jsonl:2: "
                                                         "message 2: empty assistant turn")
            page.select_option("#lang", "en")

            # the form asks for what each method needs: a loss and pairs (none uploaded here), or a task
            page.set_viewport_size({"width": 1400, "height": 900})
            page.select_option("#tn-method", "dpo")
            assert page.is_visible("#tn-loss") and not page.is_visible("#tn-task")
            assert page.input_value("#tn-new") == "base-dpo"
            # DPO + NLL's weight goes with the losses it is added to, not with orpo or kto
            assert page.is_visible("#tn-sft-weight")
            page.select_option("#tn-loss", "orpo")
            assert not page.is_visible("#tn-sft-weight")
            page.select_option("#tn-loss", "dpo")
            # conversations are not pairs: no dataset offered
            assert page.eval_on_selector_all("#tn-dataset option", "os => os.length") == 0
            page.click("#tn-start")
            assert page.inner_text("#tn-msg").startswith("✗ Choose a dataset of the kind this method trains on")
            page.select_option("#tn-method", "grpo")
            assert page.is_visible("#tn-task") and not page.is_visible("#tn-dataset") and page.is_visible("#tn-group")
            assert page.eval_on_selector_all("#tn-task option", "os => os.map(o => o.value)") == [
                "addition", "count", "sort", "format"]
            shot("tune-grpo-form-1400")
            # LoRA with the chat tokens' rows: the form sends the switch (the request is held here and answered
            # with a 422, which the form shows)
            sent = []

            def hold(route):
                sent.append(route.request.post_data_json)
                route.fulfill(status=422, content_type="application/json", body='{"detail": "held by the test"}')
            page.route("**/api/v1/runs/tune", hold)
            page.fill("#tn-lora-rank", "2")
            page.check("#tn-lora-new-tokens")
            assert not page.is_visible("#tn-lora-hard")  # the hardest tokens' rows: SFT only
            page.dblclick("#tn-start")  # one request, not two
            page.wait_for_selector("#tn-msg.bad")
            page.select_option("#tn-method", "sft")
            page.fill("#tn-lora-hard", "3")
            page.click("#tn-start")
            page.wait_for_function("() => document.querySelector('#tn-msg').textContent.includes('held')")
            page.unroute("**/api/v1/runs/tune")
            assert [(r["method"], r["lora_rank"], r["lora_new_tokens"], r.get("lora_hard_tokens")) for r in sent] == [
                ("grpo", 2, True, None), ("sft", 2, True, 3)]
            # a run behind another in the queue is announced as queued (a new run is at position 0 until the
            # supervisor starts it: queued only when every job slot is taken)
            page.route("**/api/v1/runs/tune", lambda route: route.fulfill(
                status=201, content_type="application/json", body=json.dumps({**run, "queue_position": 1})))
            page.click("#tn-start")
            page.wait_for_function("() => document.querySelector('#tn-msg').textContent.includes('queued')")
            assert page.inner_text("#tn-msg") == "Run 1 is queued (position 2)"
            page.unroute("**/api/v1/runs/tune")
            page.fill("#tn-lora-rank", "")
            page.fill("#tn-lora-hard", "")
            page.uncheck("#tn-lora-new-tokens")
            page.select_option("#tn-method", "grpo")

            # distillation: the model teaches a new student of a preset on books; no dataset, no LoRA; the
            # temperature and alpha belong to the logits mode only
            page.select_option("#tn-method", "distill")
            assert page.is_visible("#tn-preset") and page.is_visible("#tn-books") and page.is_visible("#tn-alpha")
            assert not page.is_visible("#tn-dataset") and not page.is_visible("#tn-lora-rank")
            page.select_option("#tn-mode", "sequence")
            assert not page.is_visible("#tn-temperature") and not page.is_visible("#tn-alpha")
            page.select_option("#tn-mode", "logits")
            page.select_option("#tn-preset", "gpt2-tiny")
            assert page.input_value("#tn-new") == "base-gpt2-tiny"
            page.click("#tn-start")
            assert page.inner_text("#tn-msg") == "✗ Choose at least one book for the student."
            page.check('#tn-books input[value="lessons.txt"]')
            page.fill("#tn-steps", "3")
            page.fill("#tn-batch", "2")
            page.click("#tn-start")
            page.wait_for_selector('#tn-runs tr[data-run="2"][data-status="completed"]', timeout=120_000)
            with server.client() as c:
                rows = [m for m in c.get("/api/v1/runs/2/metrics").json()["metrics"] if "kd_loss" in m]
                assert c.get("/api/v1/models/base-gpt2-tiny").json()["origin"]["method"] == "distill"
            assert [m["step"] for m in rows] == [1, 2, 3]
            page.wait_for_function("() => +document.querySelector('#chart-tune-kd').dataset.points === 6")
            assert page.inner_text("#tn-detail-head") == \
                "#2 · base → base-gpt2-tiny · distilled into gpt2-tiny on lessons.txt · completed"
            shot("tune-distill-1400")
            # a GRPO run without a KL term logs no KL: its view has the reward chart only
            with server.client() as c:
                r = c.post("/api/v1/runs/tune", json={"method": "grpo", "model": "base", "new_model": "base-grpo",
                                                      "task": "addition", "max_steps": 2, "group_size": 2,
                                                      "prompts_per_step": 2, "max_new_tokens": 4, "kl_coef": 0,
                                                      "eval_prompts": 2})
                assert r.status_code == 201, r.text
            page.wait_for_selector(f'#tn-runs tr[data-run="{r.json()["id"]}"][data-status="completed"]',
                                   timeout=120_000)
            page.click(f'#tn-runs tr[data-run="{r.json()["id"]}"] button.view')
            page.wait_for_function("() => +document.querySelector('#chart-tune-reward').dataset.points === 2")
            assert page.eval_on_selector_all("#tn-charts .chart", "cs => cs.map(c => c.id)") == ["chart-tune-reward"]
            # a deleted dataset's preview goes with it (it stayed, its model selector doing nothing)
            assert page.is_visible("#tn-preview")
            page.once("dialog", lambda d: d.accept())
            page.click('#tn-datasets tr[data-dataset="chats.jsonl"] button.danger')
            page.wait_for_selector('#tn-datasets tr[data-dataset="chats.jsonl"]', state="detached")
            assert not page.is_visible("#tn-preview")
            # a long name (the server takes up to 200 characters) wraps at 390 px instead of widening the page
            long = "chats_" + "of_the_long_winter_evenings_" * 6 + ".jsonl"  # no space to break at
            page.set_viewport_size({"width": 390, "height": 900})
            page.set_input_files("#tn-file", files(long, CHATS))
            page.click("#tn-upload-go")
            page.wait_for_selector(f'#tn-datasets tr[data-dataset="{long}"]')
            page.wait_for_selector('#tn-preview-rows .tn-row[data-line="1"]')
            assert page.evaluate("() => document.scrollingElement.scrollWidth") <= 390
    finally:
        server.stop()
