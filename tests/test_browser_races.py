"""What a user set stays set when data arrives late or the page is drawn again (the runs are refreshed every 2 s),
in a real browser; each case holds an answer back with page.route to make the order certain. And the runs table
passes axe's colour contrast with a self-play row selected, the state in which its grey kind labels sit on blue."""

from __future__ import annotations

import pytest
from test_browser import TOKEN, browser, ui_page  # noqa: F401 (browser: the fixture)
from test_browser_charts import write_runs
from test_browser_ux import SHOTS, axe_violations
from test_server_support import TINY_MODEL, ServerProcess, upload

PARA = "The river ran past the old mill and the miller counted every sack of grain twice before dusk came."
DUPS = "\n\n".join([PARA, "Another paragraph about a fox who liked apples very much indeed.", PARA, PARA,
                    "A third one, with nothing repeated, just to be different from the rest of the book."]) + "\n"
V = lambda run, step, steps, current=False: {"run": run, "kind": "train", "step": step, "steps": steps,  # noqa: E731
                                             "current": current, "created_at": 1.0}
VERSIONS = {"a": [V(7, 2, 4), V(7, None, 4, True)], "b": [V(5, 3, 6), V(5, None, 6), V(6, None, 9, True)]}
STEERING = {"a": [], "b": [{"name": "bdir", "layer": 1, "norm": 2.0}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Run 1 (training) and run 2 (self-play), completed; books tales.txt and dups.txt; models a and b (listed
    as trained) and blank."""
    ws = tmp_path_factory.mktemp("races") / "ws"
    write_runs(ws, [(20, 1, 10, 512, 0.3, 1.3)], 4).close()
    srv = ServerProcess(ws, token=TOKEN).start()
    with srv.client() as c:
        assert upload(c).status_code == 201
        assert upload(c, "dups.txt", DUPS.encode()).status_code == 201
        for name in ("a", "b", "blank"):
            assert c.post("/api/v1/models", json={"name": name, **TINY_MODEL}).status_code == 201
    for name in ("a", "b"):
        (ws / "models" / name / "model.safetensors").write_bytes(b"")  # listed as trained
    yield srv
    srv.stop()


def _model_of(route) -> str:
    return route.request.url.split("/models/")[1].split("/")[0]


def test_a_version_picked_in_the_models_table_stays_when_the_table_is_drawn_again(server, browser):  # noqa: F811
    with ui_page(browser, SHOTS / "races-models") as (page, shot):
        page.route("**/api/v1/models/*/versions", lambda route: route.fulfill(json=VERSIONS.get(_model_of(route), [])))
        page.goto(f"{server.url}/?token={TOKEN}#models")
        row = '#models-table tr[data-model="b"]'
        page.wait_for_selector(f'{row} select.version option[value="5"]', state="attached")
        page.select_option(f"{row} select.version", "5")
        assert page.get_attribute(f"{row} a.download", "href").endswith("/models/b/download?run=5&token=" + TOKEN)
        page.evaluate("() => { document.querySelector('tr[data-model=\"b\"] select.version').old = true; }")
        with server.client() as c:  # another client starts a run: the runs change, the models table is drawn anew
            assert c.post("/api/v1/runs", json={"model": "blank", "books": ["tales.txt"], "max_steps": 2,
                                                "batch_size": 2, "seq_len": 16, "eval_every": 0}).status_code == 201
        page.wait_for_function("() => !document.querySelector('tr[data-model=\"b\"] select.version').old")
        # the new row's picker is filled, then set to the picked version again (it went back to the current one)
        page.wait_for_function("() => document.querySelector('tr[data-model=\"b\"] select.version').value === '5'")
        assert page.get_attribute(f"{row} a.download", "href").endswith("/models/b/download?run=5&token=" + TOKEN)


def test_a_late_answer_for_the_model_left_does_not_fill_the_generate_lists(server, browser):  # noqa: F811
    held = []

    def answer(route):
        name = _model_of(route)
        if name == "a":  # the first model's answers come late, after the user has picked model b
            held.append(route)
        else:
            route.fulfill(json=(VERSIONS if route.request.url.endswith("/versions") else STEERING).get(name, []))
    with ui_page(browser, SHOTS / "races-generate") as (page, shot):
        page.route("**/api/v1/models/*/versions", answer)
        page.route("**/api/v1/models/*/steering", answer)
        page.goto(f"{server.url}/?token={TOKEN}#generate")
        page.wait_for_selector("body[data-ready]")
        assert page.input_value("#gen-model") == "a"
        page.select_option("#gen-model", "b")
        page.wait_for_selector('#gen-version option[value="5:3"]', state="attached")
        page.wait_for_selector('#g-steer option[value="bdir"]', state="attached")
        page.select_option("#gen-version", "5:3")
        page.select_option("#g-steer", "bdir")
        assert held
        for route in held:
            route.fulfill(json=(VERSIONS if route.request.url.endswith("/versions") else STEERING)["a"])
        page.evaluate("() => new Promise((done) => setTimeout(done, 300))")  # the late answers are handled
        options = page.eval_on_selector_all("#gen-version option", "os => os.map(o => o.value)")
        # b's lists and choices; a's answers had replaced them (versions "", "7:2"; nothing chosen)
        assert (page.input_value("#gen-model"), options, page.input_value("#gen-version"),
                page.input_value("#g-steer")) == ("b", ["", "5", "5:3"], "5:3", "bdir")


def test_an_opened_duplicate_cluster_stays_open_when_another_card_answers(server, browser):  # noqa: F811
    with ui_page(browser, SHOTS / "races-data") as (page, shot):
        page.goto(f"{server.url}/?token={TOKEN}#data")
        page.wait_for_selector('#dt-book option[value="dups.txt"]', state="attached")
        page.select_option("#dt-book", "dups.txt")
        page.click("#dt-dups-go")
        page.click(".dt-cluster summary")
        assert page.eval_on_selector(".dt-cluster", "d => d.open")
        held = []
        page.route("**/data/filters*", lambda route: held.append(route))
        page.click("#dt-filters-go")
        page.wait_for_function("() => document.querySelector('#dt-filters .dt-out').textContent !== ''")
        assert page.eval_on_selector(".dt-cluster", "d => d.open")
        for route in held:
            route.continue_()
        page.unroute("**/data/filters*")
        page.wait_for_selector("#dt-filters-summary")
        assert page.eval_on_selector(".dt-cluster", "d => d.open")  # it was closed: every card was drawn again


def test_a_selected_self_play_row_passes_colour_contrast(server, browser):  # noqa: F811
    with ui_page(browser, SHOTS / "races-runs") as (page, shot):
        page.goto(f"{server.url}/?token={TOKEN}#runs")
        page.wait_for_selector('#runs-table tr[data-run="2"] .kind', state="attached")
        page.click('#runs-table tr[data-run="2"] td:last-child button')  # View: the self-play run is current
        page.wait_for_selector('#runs-table tr[data-run="2"].selected')
        assert [v for v in axe_violations(page) if v.startswith("color-contrast")] == []
