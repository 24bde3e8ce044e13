"""The runs view's charts in a real browser: for every chart the readout under the mouse is the data point there
(the API's metrics of that run), on each chart, not just the last one drawn; smoothing, log scale, the x axis
(step, tokens, wall time), zoom and its reset change what is drawn as computed here; CSV export equals the
metrics, PNG export is an image of the chart. The runs are written into the workspace's database before the
server starts (metrics shaped as the Trainer and text self-play log them), so the numbers are known and no
training is needed. Screenshots at 1400 and 390 px go to tests/artifacts/browser-charts/."""

from __future__ import annotations

import csv
import io
import math
import re
import struct
from pathlib import Path

import pytest
from test_browser import ARTIFACTS, TOKEN, browser, playwright_api, pytestmark, ui_page  # noqa: F401
from test_server_support import ServerProcess

from lmlab.server.db import Database
from lmlab.server.workspace import Workspace

SHOTS = ARTIFACTS.parent / "browser-charts"
TRAIN_KEYS = {"loss": ["loss", "val_loss"], "bpb": ["val_bpb"], "lr": ["lr"], "tps": ["tokens_per_s"]}
SP_KEYS = {"reward": ["reward"], "kl": ["kl"]}
X_KEYS = {"step": "step", "tokens": "tokens", "time": "elapsed_s"}


def train_lines(steps: int, every: int, eval_every: int, tokens_per_step: int, s_per_step: float, seed: float):
    """Trainer-shaped lines: step, tokens, elapsed_s, loss, lr, grad_norm, tokens_per_s, mfu; on evaluations
    also val_loss, val_ppl and val_bpb (val_loss / ln 2 / bytes per token, 3.7 bytes per token here)."""
    out = []
    for step in sorted({1, *range(every, steps + 1, every)}):
        loss = 1.6 + 4.0 * math.exp(-step / 25) + 0.15 * math.sin(step * seed)
        m = {"step": step, "tokens": step * tokens_per_step, "elapsed_s": round(step * s_per_step, 3), "loss": loss,
             "lr": 1e-3 * min(1.0, step / 10) * (0.1 + 0.9 * math.cos(math.pi * step / (2 * steps))),
             "grad_norm": 1.0, "tokens_per_s": 40000 + 5000 * math.sin(step / 7 + seed), "mfu": 0.01}
        if step % eval_every == 0:
            val = loss + 0.2 + 0.05 * math.cos(step)
            m.update(val_loss=val, val_ppl=math.exp(val), val_bpb=val / math.log(2) / 3.7)
        out.append(m)
    return out


def sp_lines(iterations: int):
    """Text self-play's lines: no tokens, its wall time as wall_s."""
    return [{"step": i, "reward": 0.3 + 0.02 * i + 0.03 * math.sin(i), "reward_std": 0.1, "kl": 0.002 * i * i,
             "loss": 0.1, "length": 20.0, "wall_s": round(1.7 * i, 2)} for i in range(1, iterations + 1)]


def write_runs(ws: Path, train: list[tuple], iterations: int) -> Database:
    """A new workspace `ws` whose database holds completed training runs (train_lines of each tuple of
    arguments) and then one completed text self-play run of `iterations`; returned open."""
    ws.mkdir()
    db = Database(Workspace(ws).sqlite_url())
    for args in train:
        lines = train_lines(*args)
        run = db.add_run("tiny", ["tales.txt"], {}, False, lines[-1]["step"])
        db.add_metrics(run["id"], lines)
        db.update_run(run["id"], status="completed", finished_at=lines[-1]["elapsed_s"])
    run = db.add_run("tiny", ["tales.txt"], {"new_model": "tiny-sp", "reward": "repetition"}, True, iterations,
                     kind="selfplay")
    db.add_metrics(run["id"], sp_lines(iterations))
    db.update_run(run["id"], status="completed")
    return db


@pytest.fixture()
def server(tmp_path):
    ws = tmp_path / "ws"
    write_runs(ws, [(60, 1, 10, 512, 0.37, 1.3), (44, 2, 8, 1024, 0.61, 2.9)], 12).close()
    server = ServerProcess(ws, token=TOKEN).start()
    yield server
    server.stop()


def ema(values, weight):
    """TensorBoard's debiased exponential moving average, written out here as the reference."""
    acc, out = 0.0, []
    for n, v in enumerate(values, 1):
        acc = acc * weight + (1 - weight) * v
        out.append(acc / (1 - weight ** n))
    return out


def expected_series(metrics, chart, xk, smooth=0.0, log=False):
    """label -> [(x, shown y, raw y)] of each line the chart draws, from the API's metrics."""
    out = {}
    for run_id, ms in metrics.items():
        keys = (SP_KEYS if "reward" in ms[0] else TRAIN_KEYS).get(chart)
        for key in keys or []:
            x_of = (lambda m: m.get("elapsed_s", m.get("wall_s"))) if xk == "elapsed_s" else (lambda m: m.get(xk))
            pts = [(x_of(m), m[key]) for m in ms if m.get(key) is not None and (not log or m[key] > 0)]
            role = {"loss": " train", "val_loss": " val", "val_bpb": " val"}.get(key, "")
            ys = [y for _, y in pts]
            shown = ema(ys, smooth) if smooth else ys
            out[f"#{run_id}{role}"] = [(x, s, y) for (x, y), s in zip(pts, shown)]
    return out


READOUT = re.compile(r"^(#\d+(?: \w+)?) (\S+)(?: \((\S+)\))? @(\S+)$")


def check_hover(page, chart, series, fractions=(0.04, 0.31, 0.5, 0.77, 0.96), x_range=None, point=None):
    """Move the mouse over `chart` to points of its first line and compare the readout with `series`.
    point(x, y): how to get there instead of the mouse (a finger: touch_at)."""
    xs = sorted({x for pts in series.values() for x, _, _ in pts})
    lo, hi = x_range or (xs[0], xs[-1])
    page.locator(f"#chart-{chart}").scroll_into_view_if_needed()
    box = page.locator(f"#chart-{chart} .u-over").bounding_box()
    first = next(iter(series.values()))
    checked = 0
    for f in fractions:
        target = min((x for x, _, _ in first if lo <= x <= hi), key=lambda x: abs(x - (lo + f * (hi - lo))))
        px = (target - lo) / (hi - lo) * box["width"]  # kept half a pixel inside: the edge may hit-test outside
        (point or page.mouse.move)(box["x"] + min(max(px, 0.5), box["width"] - 0.5), box["y"] + box["height"] / 2)
        try:  # waited for (a loaded machine may take seconds to deliver the event); a wrong one fails below
            page.wait_for_function(f"() => document.querySelector('#chart-{chart} .chart-readout .ro')?.dataset.x"
                                   f" == {target}", timeout=15_000)
        except playwright_api.TimeoutError:
            pass  # compared below, with the numbers in the message
        shown = page.eval_on_selector_all(f"#chart-{chart} .chart-readout .ro",
                                          "els => els.map(e => [e.textContent, e.dataset.x, e.dataset.y])")
        assert len(shown) == len(series), (chart, shown)
        for (text, data_x, data_y), (label, pts) in zip(shown, series.items()):
            assert READOUT.match(text), (chart, text)
            label_shown, value, raw, x_text = READOUT.match(text).groups()
            near = min(abs(x - target) for x, _, _ in pts)
            candidates = [(x, s, y) for x, s, y in pts if abs(x - target) == near]  # nearest logged point(s)
            match = [p for p in candidates if data_x is not None and p[0] == float(data_x)]
            assert match, f"{chart}: mouse at x={target}, {label} shows {text!r}; the nearest point is {candidates}"
            x, s, y = match[0]
            assert label_shown == label and float(data_y) == pytest.approx(s, rel=1e-12, abs=1e-15), (chart, text, x, s)
            assert float(value) == pytest.approx(s, rel=1e-4) and float(x_text) == pytest.approx(x, rel=1e-4), text
            if raw is not None:
                assert float(raw) == pytest.approx(y, rel=1e-4), text
            checked += 1
    return checked


COUNTS = {"loss": 60 + 6 + 23 + 5, "bpb": 6 + 5, "lr": 60 + 23, "tps": 60 + 23, "reward": 12, "kl": 12}


def open_runs(page, server, width: int) -> None:
    """The runs view at `width` px with the three runs overlaid and every chart drawn with all its points."""
    page.set_viewport_size({"width": width, "height": 900})
    page.goto(f"{server.url}/?token={TOKEN}#runs")
    page.wait_for_selector("body[data-ready]")
    page.evaluate("localStorage.removeItem('lmlab.charts')")
    for run_id in (1, 2, 3):
        box = page.locator(f'#runs-table tr[data-run="{run_id}"] input[type=checkbox]')
        if not box.is_checked():
            box.check()
    for chart, n in COUNTS.items():
        page.wait_for_function(f"() => document.querySelector('#chart-{chart}').dataset.points === '{n}'")


def drag_zoom(page, chart: str, x0: float, x1: float) -> list[float]:
    """Drag the mouse across `chart` from x0 to x1 (fractions of its plot's width) -> the x scale's [min, max]."""
    page.locator(f"#chart-{chart}").scroll_into_view_if_needed()
    box = page.locator(f"#chart-{chart} .u-over").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * x0, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * x1, y, steps=5)
    page.mouse.up()
    return page.evaluate(f"() => {{ const s = document.querySelector('#chart-{chart}').uplot.scales.x; "
                         "return [s.min, s.max]; }")


def test_every_chart_reads_out_the_point_under_the_mouse_and_its_toggles_export(server, browser):  # noqa: F811
    with server.client() as c:
        metrics = {i: c.get(f"/api/v1/runs/{i}/metrics").json()["metrics"] for i in (1, 2, 3)}
    with ui_page(browser, SHOTS) as (page, shot):
        open_runs(page, server, 1400)
        # the legend tells train from validation: a dashed line with a marker for val, solid for train
        assert page.eval_on_selector_all("#chart-loss .lg", "els => els.map(e => [e.dataset.label, "
                                         "e.querySelector('line').getAttribute('stroke-dasharray'), "
                                         "!!e.querySelector('circle')])") == [
            ["#1 train", None, False], ["#1 val", "5 3", True], ["#2 train", None, False], ["#2 val", "5 3", True]]
        shot("runs-1400")

        # 1. every chart, mouse at several x: the readout is the nearest logged point of each line
        for chart in ("loss", "bpb", "lr", "tps", "reward", "kl"):
            assert check_hover(page, chart, expected_series(metrics, chart, "step")) >= 5

        # 2. x by tokens and by wall time: the readout follows the other x
        for x in ("tokens", "time"):
            page.select_option("#chart-x", x)
            page.wait_for_function(f"() => document.querySelector('#chart-loss').uplot?.data[0].length === "
                                   f"{len({m[X_KEYS[x]] for i in (1, 2) for m in metrics[i]})}")
            for chart in ("loss", "bpb", "reward") if x == "time" else ("loss", "bpb"):
                check_hover(page, chart, expected_series(metrics, chart, X_KEYS[x]))
            if x == "tokens":  # self-play logs no tokens: said so, not "no data yet"
                assert page.inner_text("#chart-reward .chart-empty").startswith("nothing to draw on this x axis")
        page.select_option("#chart-x", "step")

        # 3. log y: positions follow log10(y) between the scale's ends; the readout is still the data
        page.check("#chart-log")
        page.wait_for_function("() => document.querySelector('#chart-loss').uplot?.scales.y.distr === 3")
        frac = page.evaluate("""() => { const u = document.querySelector('#chart-loss').uplot, s = u.scales.y;
            return [s.min, s.max, 1 - u.valToPos(3, 'y') / u.bbox.height * devicePixelRatio]; }""")
        lo, hi, at3 = frac
        assert at3 == pytest.approx((math.log10(3) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)), abs=1e-6)
        assert abs(at3 - (3 - lo) / (hi - lo)) > 0.01  # not where a linear axis puts it
        check_hover(page, "loss", expected_series(metrics, "loss", "step", log=True))
        page.uncheck("#chart-log")

        # 4. smoothing: the bold line and its readout are TensorBoard's EMA; the raw value is shown beside it
        page.evaluate("() => { const r = document.querySelector('#chart-smooth'); r.value = '0.6';"
                      " r.dispatchEvent(new Event('input', {bubbles: true})); }")
        page.wait_for_function("() => document.querySelector('#chart-loss').uplot?.series.length === 9")
        for chart in ("loss", "reward"):
            check_hover(page, chart, expected_series(metrics, chart, "step", smooth=0.6))
        shot("runs-smoothed-1400")
        page.evaluate("() => { const r = document.querySelector('#chart-smooth'); r.value = '0';"
                      " r.dispatchEvent(new Event('input', {bubbles: true})); }")
        page.wait_for_function("() => document.querySelector('#chart-loss').uplot?.series.length === 5")

        # 5. zoom: a drag over steps ~15..30 shows only them, and the readout maps the mouse within them;
        # a double-click and the reset button show everything again
        zoom = drag_zoom(page, "loss", 14 / 59, 30 / 59)
        assert zoom == pytest.approx([15, 31], abs=0.3)
        check_hover(page, "loss", expected_series(metrics, "loss", "step"), (0.1, 0.5, 0.9), x_range=zoom)
        page.dblclick("#chart-loss .u-over")
        page.wait_for_function("() => document.querySelector('#chart-loss').uplot.scales.x.max === 60")
        drag_zoom(page, "loss", 0.2, 0.4)
        page.wait_for_function("() => document.querySelector('#chart-loss').uplot.scales.x.max < 60")
        page.click("#chart-reset")
        page.wait_for_function("() => { const s = document.querySelector('#chart-loss').uplot.scales.x; "
                               "return s.min === 1 && s.max === 60; }")

        # 6. CSV of a chart: one row per logged point, equal to the API's metrics
        with page.expect_download() as info:
            page.click("figure:has(#chart-loss) button.csv")
        assert info.value.suggested_filename == "lmlab-loss-runs-1-2.csv"
        rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
        want = [(str(i), key, str(m["step"]), str(m["tokens"]), m["elapsed_s"], m[key])
                for i in (1, 2) for key in ("loss", "val_loss") for m in metrics[i] if m.get(key) is not None]
        assert [(r["run"], r["metric"], r["step"], r["tokens"], float(r["elapsed_s"]), float(r["value"]))
                for r in rows] == want

        # 7. PNG of a chart: the plot's canvas under a title and legend strip
        with page.expect_download() as info:
            page.click("figure:has(#chart-bpb) button.png")
        png = Path(info.value.path()).read_bytes()
        width, height = struct.unpack(">II", png[16:24])
        canvas = page.evaluate("() => { const c = document.querySelector('#chart-bpb canvas'); "
                               "return [c.width, c.height]; }")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and [width, height] == [canvas[0], canvas[1] + 44]

        # 8. in Russian: the controls, the legend and the axis names follow the language
        page.select_option("#lang", "ru")
        page.wait_for_function("() => document.querySelector('#chart-reset').textContent === 'Сбросить масштаб'")
        assert page.eval_on_selector_all("#chart-loss .lg", "els => els.map(e => e.dataset.label)") == [
            "#1 обучение", "#1 валидация", "#2 обучение", "#2 валидация"]
        shot("runs-ru-1400")
        page.select_option("#lang", "en")

        # 9. at phone width each chart is redrawn to its box's width
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_function("() => [...document.querySelectorAll('.chart')].every(e => !e.uplot || "
                               "e.uplot.width === e.clientWidth)")
        assert page.evaluate("() => document.querySelector('#chart-loss').uplot.width") < 390
        shot("runs-390")


FIRST_ONE_POINT = """async (lines) => {
  const { drawChartInto } = await import("/static/charts.js");
  const el = document.createElement("div");
  el.style.width = "600px";
  document.body.append(el);
  for (const n of [1, lines.length]) {  // each drawn in a frame of its own, as the metrics stream's lines are
    drawChartInto(el, "reward", [{ id: 9, color: "#000", kind: "selfplay", metrics: lines.slice(0, n) }], (k) => k);
    await new Promise(requestAnimationFrame);
  }
  const s = el.uplot.scales.x;
  el.remove();
  return [s.min, s.max];
}"""


def test_a_zoomed_chart_keeps_its_x_range_when_the_window_is_resized(server, browser):  # noqa: F811
    """Zoomed in, then the window narrowed (a phone turned, a side panel opened): the chart is drawn at the new
    width over the same steps; a chart not zoomed still shows all of them."""
    with ui_page(browser, SHOTS / "zoom") as (page, shot):
        open_runs(page, server, 1400)
        zoom = drag_zoom(page, "loss", 14 / 59, 30 / 59)
        assert zoom == pytest.approx([15, 31], abs=0.3)
        for width in (1000, 390):
            page.set_viewport_size({"width": width, "height": 900})
            page.wait_for_function("() => [...document.querySelectorAll('.chart')].every(e => !e.uplot || "
                                   "e.uplot.width === e.clientWidth)")
            got = page.evaluate("() => ['loss', 'lr'].map(id => { const u = document.querySelector('#chart-' + id)"
                                ".uplot; return [u.width, u.scales.x.min, u.scales.x.max]; })")
            assert got[0][0] < {1000: 1000, 390: 390}[width] and got[0][1:] == zoom, (width, got)
            assert got[1][1:] == [1, 60], (width, got)
            shot(f"zoomed-{width}")
        # a chart first drawn with one point (a run's first metrics line) was taken for zoomed: it kept that
        # point's range (0..2) while the rest arrived
        assert page.evaluate(FIRST_ONE_POINT, sp_lines(12)) == [1, 12]


FRAMES = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"  # two frames drawn


def test_a_finger_on_a_chart_reads_out_the_point_under_it_at_phone_width(server, browser):  # noqa: F811
    """At 390 px on a touch screen: a finger put on a chart and drawn along it shows, at each place, the
    logged points there (uPlot follows the mouse only), on every chart; lifted, the readout stays."""
    with server.client() as c:
        metrics = {i: c.get(f"/api/v1/runs/{i}/metrics").json()["metrics"] for i in (1, 2, 3)}
    with ui_page(browser, SHOTS / "touch", has_touch=True, is_mobile=True) as (page, shot):
        open_runs(page, server, 390)
        cdp = page.context.new_cdp_session(page)
        down = []

        def touch_at(x, y):  # the finger goes down at the first place, then moves (Chromium's touch events)
            kind = "touchMove" if down else "touchStart"
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
            down.append((x, y))

        for chart in ("loss", "bpb", "lr", "tps", "reward", "kl"):
            assert check_hover(page, chart, expected_series(metrics, chart, "step"), point=touch_at) >= 5, chart
            shown = page.inner_text(f"#chart-{chart} .chart-readout")
            cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
            down.clear()
            page.evaluate(FRAMES)  # what the page does after the finger is lifted (a tap's mouse events)
            assert page.inner_text(f"#chart-{chart} .chart-readout") == shown, chart
        shot("touch-390")
