"""The web app from the keyboard alone, in a real browser: every view is reached and walked with the Tab key
(the tabs are pressed with Enter, a run's page and a model's page are opened from their tables' links), and
every control on it (buttons, links, inputs, selects, the charts' controls and export buttons, the tables' row
controls, what the page styles as clickable) gets the focus in the walk and shows that it has it (the pixels
around it differ from the same control without focus); and a table that redraws every 2 s (the Lab tab's, on
every refresh of the runs) keeps the focus on the control that had it, which it does not without ux.js's
keepFocus (the same check, run on a page whose keepFocus is a plain replace, must fail). Screenshots at 1400
and 390 px go to tests/artifacts/browser-keyboard/."""

from __future__ import annotations

import pytest
from test_browser import ARTIFACTS, TOKEN, browser, pytestmark, ui_page  # noqa: F401
from test_browser_charts import write_runs
from test_browser_ux import VIEWS  # the tabs in their order
from test_server_support import BOOK, TINY_MODEL, ServerProcess

SHOTS = ARTIFACTS.parent / "browser-keyboard"

# A name for a control that stays the same when its table row is drawn anew: its id, else its row's key or
# the nearest element with an id, its tag and class, and its place among the controls of that tag there.
DESCRIBE = """() => { window.describeControl = (e) => {
  if (e.id) return "#" + e.id;
  const row = e.closest("tr[data-run], tr[data-model], tr[data-book]");
  const scope = row || e.parentElement.closest("[id]");
  const key = row ? "tr[" + (row.dataset.run ?? row.dataset.model ?? row.dataset.book) + "]" : "#" + (scope?.id ?? "");
  const same = [...(scope || document).querySelectorAll(e.tagName)];
  return `${key} ${e.tagName.toLowerCase()}.${e.className}[${same.indexOf(e)}]`;
}; }"""

# The controls on screen: what HTML makes interactive, what has a tabindex or a widget role, and what the page
# styles as clickable (a pointer cursor of its own): disabled ones and those in closed or hidden parts aside.
CONTROLS = """() => {
  const shown = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden";
  const pointer = (e) => getComputedStyle(e).cursor === "pointer"
    && getComputedStyle(e.parentElement).cursor !== "pointer";
  const all = [...document.querySelectorAll("body *")].filter((e) =>
    e.matches("a[href], button, input:not([type=hidden]), select, textarea, summary, [tabindex], [role=button], "
              + "[role=link], [role=tab], [contenteditable=true]") || pointer(e));
  return [...new Set(all.filter((e) => shown(e) && !e.matches(":disabled")).map(describeControl))];
}"""


@pytest.fixture()
def server(tmp_path):
    """Two completed training runs with metrics and a self-play run (the runs view draws all six charts),
    a completed lab experiment, a book and a model listed as trained."""
    ws = tmp_path / "ws"
    db = write_runs(ws, [(30, 1, 10, 512, 0.37, 1.3), (20, 2, 4, 1024, 0.61, 2.9)], 6)
    run = db.add_run("", [], {"lab": "azr", "quick": True, "seeds": [0]}, False, None, kind="experiment")
    db.update_run(run["id"], status="completed")
    failed = db.add_run("tiny", [], {"models": ["tiny"], "tasks": ["fables-mc"]}, False, None, kind="eval")
    db.update_run(failed["id"], status="failed", error="the eval exited")  # a row of the Evaluate table
    db.close()
    (ws / "runs" / f"run-{run['id']}").mkdir(parents=True)
    (ws / "runs" / f"run-{run['id']}" / "report.html").write_text("<!doctype html><title>r</title><p>a report")
    server = ServerProcess(ws, token=TOKEN).start()
    with server.client() as c:
        assert c.post("/api/v1/books", files={"file": ("tales.txt", BOOK.encode())}).status_code == 201
        assert c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL}).status_code == 201
    (ws / "models" / "tiny" / "model.safetensors").write_bytes(b"")  # listed as trained: all its offers shown
    yield server
    server.stop()


def focused(page) -> str | None:
    return page.evaluate("() => { const e = document.activeElement; return e && e !== document.body"
                         " && e !== document.documentElement ? describeControl(e) : null; }")


def ring_shown(page, name: str) -> bool:
    """Whether the focused control (`name`) looks different without the focus: the pixels of its box and 4 px
    around it, with the focus and after blur(); then it has the focus again (found by its name if its row was
    drawn anew meanwhile), and the walk goes on from it."""
    box = page.evaluate("""() => { const r = document.activeElement.getBoundingClientRect();
        const x = Math.max(0, r.x - 4), y = Math.max(0, r.y - 4);
        return {x, y, width: Math.min(innerWidth, r.right + 4) - x,
                height: Math.min(innerHeight, r.bottom + 4) - y}; }""")
    if box["width"] <= 0 or box["height"] <= 0:
        return False
    with_focus = page.screenshot(clip=box)
    page.evaluate("() => { window.kbFocused = document.activeElement; document.activeElement.blur(); }")
    without = page.screenshot(clip=box)
    # the name is looked up among the controls on screen: a hidden tab's table has rows of the same key
    # (the Runs table lists the Evaluate tab's runs too), and focus() on a hidden one leaves the focus nowhere
    page.evaluate("""(name) => { const e = window.kbFocused.isConnected ? window.kbFocused
        : [...document.querySelectorAll(window.kbFocused.tagName)]
            .find((x) => x.getClientRects().length > 0 && describeControl(x) === name);
        e.focus(); }""", name)
    return with_focus != without


def walk(page, limit: int = 400) -> tuple[list[str], list[str], str | None]:
    """Press Tab until the focus comes round to the first control it reached -> (the controls reached in
    order, those of them without a visible focus indicator, and where the focus jumped back to a control it
    had passed, if it did: stopped there)."""
    page.evaluate("() => window.scrollTo(0, 0)")
    order, unseen = [], []
    for _ in range(limit):
        page.keyboard.press("Tab")
        name = focused(page)
        if name is None:  # past the last control: the next Tab goes to the first
            continue
        if name in order:
            return order, unseen, None if name == order[0] else f"from {order[-1]} back to {name}"
        order.append(name)
        if not ring_shown(page, name):
            unseen.append(name)
    raise AssertionError(f"the focus did not come round in {limit} presses of Tab: {order}")


def tab_to(page, name: str, limit: int = 400) -> None:
    """Press Tab from the top of the page until `name` has the focus."""
    page.evaluate("() => { document.activeElement?.blur(); window.scrollTo(0, 0); }")
    for _ in range(limit):
        page.keyboard.press("Tab")
        if focused(page) == name:
            return
    raise AssertionError(f"{name} is not reached with Tab")


def test_every_view_is_walked_with_the_tab_key_and_every_control_shows_its_focus(server, browser):  # noqa: F811
    with ui_page(browser, SHOTS) as (page, shot):
        page.goto(f"{server.url}/?token={TOKEN}#books")
        page.wait_for_selector("body[data-ready]")
        page.evaluate(DESCRIBE)
        problems = []
        for width in (1400, 390):
            page.set_viewport_size({"width": width, "height": 900})
            for view in (*VIEWS, "run", "model"):
                if view == "run":  # a run's own page, from its link in the runs table
                    tab_to(page, f"#tabs button.[{VIEWS.index('runs')}]")
                    page.keyboard.press("Enter")
                    tab_to(page, "tr[1] a.run-link[0]")
                    page.keyboard.press("Enter")
                    page.wait_for_selector("#tab-run:not([hidden]) #rp-chart-loss .uplot")
                elif view == "model":  # a model's own page, from its link in the models table: card and actions
                    tab_to(page, f"#tabs button.[{VIEWS.index('models')}]")
                    page.keyboard.press("Enter")
                    tab_to(page, "tr[tiny] a.model-link[0]")
                    page.keyboard.press("Enter")
                    page.wait_for_selector("#tab-model:not([hidden]) #mp-measure")
                else:
                    tab_to(page, f"#tabs button.[{VIEWS.index(view)}]")
                    page.keyboard.press("Enter")
                    page.wait_for_selector(f"#tab-{view}:not([hidden])")
                if view == "runs":  # the three runs overlaid (their checkboxes ticked with Space): all six charts
                    for run_id in (1, 2, 3):
                        if not page.is_checked(f'#runs-table tr[data-run="{run_id}"] input'):
                            tab_to(page, f"tr[{run_id}] input.[0]")
                            page.keyboard.press("Space")
                    page.wait_for_function("() => +document.querySelector('#chart-loss').dataset.points > 0 && "
                                           "+document.querySelector('#chart-reward').dataset.points > 0")
                # what closed <details> hold is a control too once they are open
                page.evaluate("() => document.querySelectorAll('.tab:not([hidden]) details')"
                              ".forEach(d => { d.open = true; })")
                order, unseen, jump = walk(page)
                problems += [f"{view} @{width}: the focus jumped {jump}"] if jump else []
                missing = sorted(set(page.evaluate(CONTROLS)) - set(order))
                problems += [f"{view} @{width}: not reached: {m}" for m in missing]
                problems += [f"{view} @{width}: no visible focus: {u}" for u in unseen]
                assert len(order) > 10, f"{view} @{width}: " + " | ".join(order)
                shot(f"{view}-{width}")
        assert not problems, "\n".join(problems)
        # the walk finds what it looks for: a button taken out of the Tab order, a select without a focus ring
        page.evaluate("""() => {
            document.querySelector('#books-table tr[data-book="tales.txt"] button').tabIndex = -1;
            document.querySelector('#lang').style.outline = 'none'; }""")
        tab_to(page, f"#tabs button.[{VIEWS.index('books')}]")
        page.keyboard.press("Enter")
        page.wait_for_selector("#tab-books:not([hidden])")
        order, unseen, jump = walk(page)
        assert (sorted(set(page.evaluate(CONTROLS)) - set(order)), unseen, jump) == (
            ["tr[tales.txt] button.[0]"], ["#lang"], None)


KEEP_FOCUS_OFF = "export function keepFocus(tbody, rows) { tbody.replaceChildren(...rows); }\n"


@pytest.mark.parametrize("keep_focus", [True, False])
@pytest.mark.parametrize("tab, table, run, after", [("lab", "#lab-table", 4, "a.run-link[0]"),
                                                    ("evaluate", "#ev-table", 5, "button.restart[1]")])
def test_the_lab_table_redrawn_every_2_s_keeps_the_focus(server, browser, keep_focus, tab, table, run,  # noqa: F811
                                                         after):
    """The Lab and Evaluate tabs' tables are drawn anew on every refresh of the runs (every 2 s); the focused
    button of a row has the focus after two redraws, as it had. With keepFocus made a plain replace, the focus is
    lost: the check is one that can fail."""
    with ui_page(browser, SHOTS / ("focus" if keep_focus else "focus-off")) as (page, shot):
        if not keep_focus:
            def patched(route):
                body = route.fetch().text()
                start = body.index("export function keepFocus(")
                end = body.index("\n}\n", start) + 3
                route.fulfill(body=body[:start] + KEEP_FOCUS_OFF + body[end:], content_type="text/javascript")
            page.route("**/static/ux.js", patched)
        page.goto(f"{server.url}/?token={TOKEN}#{tab}")
        page.wait_for_selector("body[data-ready]")
        page.evaluate(DESCRIBE)
        tab_to(page, f"tr[{run}] button.view[0]")
        row = f'{table} tr[data-run="{run}"]'
        for _ in range(2):  # a mark on the row, gone once the row is drawn anew
            page.eval_on_selector(row, "tr => { tr.dataset.old = '1'; }")
            page.wait_for_function(f"() => !document.querySelector('{row}').dataset.old")
        kept = focused(page)
        if keep_focus:
            assert kept == f"tr[{run}] button.view[0]"
            page.keyboard.press("Tab")  # and the walk goes on from it
            assert focused(page) == f"tr[{run}] {after}"
        else:
            assert kept is None
