"""Comparing models on the same task items: per-metric deltas against the first model with paired-bootstrap
95% intervals (none below metrics.min_items() items), the items that flipped, and a self-contained report.html
(inline SVG, no scripts, no network)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from .metrics import min_items, paired_bootstrap
from .tasks import METRICS


def compare(results: Sequence[dict[str, Any]], *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """`results`: one {"model": name, "tasks": [run_task(...) ...]} per model, the same tasks in the same order.
    Returns {"models", "rows": [{task, metric, model, base, value, delta, low, high}], "flips": [...]}; low and
    high are None for a task of fewer than metrics.min_items() items (no interval: not significant)."""
    if len(results) < 2:
        raise ValueError("compare needs at least two models")
    base = results[0]
    names = [t["task"] for t in base["tasks"]]
    for other in results[1:]:
        got = [t["task"] for t in other["tasks"]]
        if got != names:
            raise ValueError(f"{other['model']} was scored on the tasks [{', '.join(got)}], {base['model']} on "
                             f"[{', '.join(names)}]: compare needs the same tasks in the same order")
    rows, flips = [], []
    for t, task in enumerate(base["tasks"]):
        for other in results[1:]:
            theirs = other["tasks"][t]
            if theirs["task"] != task["task"] or theirs["n"] != task["n"]:
                raise ValueError(f"{other['model']} was scored on other items of {task['task']}")
            for metric in METRICS[task["kind"]]:
                a = [it[metric] for it in task["items"]]
                b = [it[metric] for it in theirs["items"]]
                ci = paired_bootstrap(a, b, resamples=resamples, seed=seed)
                rows.append({"task": task["task"], "metric": metric, "model": other["model"],
                             "base": task["metrics"][metric], "value": theirs["metrics"][metric], **ci})
            if task["kind"] != "generate":  # right/wrong metrics (acc and acc_norm each): which items changed side
                for key in METRICS[task["kind"]]:
                    for i, (x, y) in enumerate(zip(task["items"], theirs["items"])):
                        if x[key] != y[key]:
                            flips.append({"task": task["task"], "item": i, "model": other["model"], "metric": key,
                                          "from": x[key], "to": y[key]})
    return {"base": base["model"], "models": [r["model"] for r in results], "rows": rows, "flips": flips}


def _svg(rows: list[dict[str, Any]]) -> str:
    """Deltas with their intervals as horizontal bars around zero."""
    width, left, h = 640, 260, 22
    span = max([abs(r[k]) for r in rows for k in ("low", "high", "delta") if r[k] is not None] + [1e-9])
    x = lambda v: left + (width - left - 20) * (0.5 + 0.5 * v / span)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h * len(rows) + 30}" '
             'font-family="sans-serif" font-size="12">',
             f'<line x1="{x(0):.1f}" y1="0" x2="{x(0):.1f}" y2="{h * len(rows)}" stroke="#888"/>']
    for i, r in enumerate(rows):
        y = i * h + h / 2
        label = html.escape(f"{r['task']} {r['metric']} · {r['model']}")
        if r["low"] is None:  # too few items for an interval: the delta alone, grey
            parts += [f'<text x="4" y="{y + 4:.1f}">{label}</text>',
                      f'<circle cx="{x(r["delta"]):.1f}" cy="{y:.1f}" r="4" fill="#777"/>']
            continue
        colour = "#2a7" if r["low"] > 0 else "#c33" if r["high"] < 0 else "#777"
        parts += [f'<text x="4" y="{y + 4:.1f}">{label}</text>',
                  f'<line x1="{x(r["low"]):.1f}" y1="{y:.1f}" x2="{x(r["high"]):.1f}" y2="{y:.1f}" '
                  f'stroke="{colour}" stroke-width="3"/>',
                  f'<circle cx="{x(r["delta"]):.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>']
    parts.append(f'<text x="{left}" y="{h * len(rows) + 20}">−{span:.3g}</text>'
                 f'<text x="{width - 60}" y="{h * len(rows) + 20}">+{span:.3g}</text></svg>')
    return "".join(parts)


def interval(row: dict[str, Any]) -> str:
    """A row's interval as the table and the command line show it."""
    if row["low"] is None:
        return f"none (under {min_items()} items)"
    return f"[{row['low']:+.4f}, {row['high']:+.4f}]"


def report_html(comparison: dict[str, Any]) -> str:
    e = lambda v: html.escape(str(v))
    rows = comparison["rows"]
    table = "".join(f"<tr><td>{e(r['task'])}</td><td>{e(r['metric'])}</td><td>{e(r['model'])}</td>"
                    f"<td>{r['base']:.4f}</td><td>{r['value']:.4f}</td><td>{r['delta']:+.4f}</td>"
                    f"<td>{interval(r)}</td></tr>" for r in rows)
    flips = "".join(f"<tr><td>{e(f['task'])}</td><td>{f['item']}</td><td>{e(f['model'])}</td>"
                    f"<td>{e(f['metric'])}</td><td>{f['from']:g} → {f['to']:g}</td></tr>" for f in comparison["flips"])
    return ("<!doctype html><html><head><meta charset='utf-8'><title>lmlab compare</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 8px;text-align:right}</style></head><body>"
            f"<h1>Comparison against {e(comparison['base'])}</h1>"
            "<p>Delta = model − base over the same items; 95% paired-bootstrap interval (items resampled with "
            f"replacement; none below {min_items()} items, too few for any difference to be significant). Green: "
            "the interval is above 0; red: below.</p>"
            f"{_svg(rows)}<table><tr><th>task</th><th>metric</th><th>model</th><th>base</th><th>value</th>"
            f"<th>delta</th><th>95% interval</th></tr>{table}</table>"
            f"<h2>Items that flipped ({len(comparison['flips'])})</h2><table><tr><th>task</th><th>item</th>"
            f"<th>model</th><th>metric</th><th>score</th></tr>{flips}</table></body></html>\n")
