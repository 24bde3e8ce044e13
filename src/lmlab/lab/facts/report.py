"""results.json, PNG plots and a self-contained report.html for every experiment (ARCHITECTURE "Reports")."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...files import atomic_write_text

NOTE = ("Mean ± sample std (ddof=1) over seeds where there are several. A time that some seed never reached within "
        "its run (still on the plateau, say) counts at the run's last evaluated step: the mean is then a lower bound, "
        "shown as ≥ with the number of such (censored) seeds. Numbers in results.json.")


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'lmlab[lab]'") from None
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    return plt


def mean_std(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1; zero for one seed) over seeds on the steps every seed has (runs that
    stopped early are cut)."""
    n = min(len(s) for s, _ in curves)
    steps = curves[0][0][:n]
    values = np.stack([v[:n] for _, v in curves])
    return steps, values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(n)


def line_plot(path: Path, title: str, xlabel: str, ylabel: str,
              series: Sequence[tuple[str, Sequence[tuple[np.ndarray, np.ndarray]]]],
              hlines: Sequence[tuple[str, float]] = (), vlines: Sequence[tuple[str, float]] = (),
              logx: bool = False, logy: bool = False) -> Path:
    """One PNG: each series is (label, per-seed (x, y) curves) drawn as mean ± std."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    drawn: list[np.ndarray] = []
    for label, curves in series:
        curves = [(x, y) for x, y in curves if len(x)]
        if not curves:
            continue
        x, m, s = mean_std(curves)
        drawn.append(m)
        ax.plot(x, m, label=label, marker="o" if len(x) < 12 else None, ms=4)
        if len(curves) > 1:
            ax.fill_between(x, m - s, m + s, alpha=0.2)
    for label, y in hlines:
        ax.axhline(y, ls="--", color="grey", lw=1, label=label)
    for label, x in vlines:
        ax.axvline(x, ls=":", color="k", lw=1, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if not drawn:
        ax.text(0.5, 0.5, "no data (nothing reached this point)", ha="center", transform=ax.transAxes)
    # a log axis needs positive data (a run that never left the plateau has none)
    if logx and drawn:
        ax.set_xscale("log")
    if logy and drawn and all((m > 0).all() for m in drawn):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if drawn or hlines or vlines:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """The figure as a PNG, written to a temporary name and renamed; the figure is closed."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    _plt().close(fig)
    tmp.replace(path)
    return path


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def grade(checks: dict[str, bool | None]) -> str:
    """The verdict from an experiment's sub-claims: "holds" if every decided one holds, "does not hold" if
    none does, "partly" in between; "inconclusive" if none could be decided (None: not measurable here)."""
    decided = [bool(v) for v in checks.values() if v is not None]
    if not decided:
        return "inconclusive"
    return "holds" if all(decided) else "does not hold" if not any(decided) else "partly"


def pm(row: dict[str, Any], key: str, fmt: Callable[[Any], str] | None = None) -> str:
    """row[key] as "mean ± std" when the row has a `key_std` beside it, else the value alone; "≥ mean ± std
    (k censored)" when `key_censored` says k seeds counted at their censoring bound (a lower bound)."""
    fmt = fmt or _fmt
    v, sd, cens = row.get(key), row.get(f"{key}_std"), row.get(f"{key}_censored")
    text = fmt(v) + ("" if v is None or sd is None else f" ± {fmt(sd)}")
    return f"≥ {text} ({cens} censored)" if cens and v is not None else text


def html_table(table: Sequence[dict[str, Any]], caption: str = "") -> str:
    """An HTML table of rows (dicts); columns `k_std` and `k_censored` next to `k` are folded into it as
    "mean ± std" and "≥ mean ± std (k censored)" (`pm`)."""
    if not table:
        return ""
    keys = list(table[0])
    cols = [c for c in keys if not any(c.endswith(x) and c[:-len(x)] in keys for x in ("_std", "_censored"))]
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    rows = f"<table>{cap}<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    for r in table:
        rows += "<tr>" + "".join(f"<td>{html.escape(pm(r, c))}</td>" for c in cols) + "</tr>"
    return rows + "</table>"


def new_report(out: str | Path) -> Path:
    """`out` for a new report, checked before anything is loaded or written: "" (the current folder to Path) and
    anything there but an empty folder are refused (a report's files have common names: a user's own report.html
    or lens.png in it was replaced; an earlier report's numbers too); `lmlab lab interp` and `lmlab lab ttc` say
    the same."""
    if not str(out).strip():
        raise ValueError("the report folder (out) is empty; name the folder to write the report to")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose another --out (nothing is overwritten)")
    return path


def write_report(out: Path, name: str, claim: str, measured: str, checks: dict[str, bool | None],
                 table: Sequence[dict[str, Any]], plots: Sequence[Path], results: dict[str, Any],
                 command: str, extra_tables: Sequence[tuple[str, Sequence[dict[str, Any]]]] = (), *,
                 title: str = "lmlab lab facts", claim_label: str = "<b>Paper's claim</b> (Zucchet et al. 2025)",
                 extra_html: str = "", note: str = NOTE) -> Path:
    """Write out/results.json and out/report.html (plots inlined as base64, so the file stands alone).

    `checks` are the experiment's sub-claims (name -> holds, None where not measurable); the verdict is
    graded from them (`grade`), and `holds` is True only when every decided one holds. Tables hold means
    over seeds with `k_std` columns beside them where there are several seeds; `extra_tables` are
    (caption, rows) shown after the main one and stored in results.json under `extra_tables`. Other reports
    than lab facts' (tune arena) give their own `title`, `claim_label` (HTML), `note` and `extra_html` (after the
    plots)."""
    out.mkdir(parents=True, exist_ok=True)
    verdict = grade(checks)
    holds = {"holds": True, "inconclusive": None}.get(verdict, False)
    checks = {k: None if v is None else bool(v) for k, v in checks.items()}
    results.update(holds=holds, verdict=verdict, checks=checks, measured=measured)  # carried back to the caller
    payload = {"experiment": name, "claim": claim, "measured": measured, "holds": holds, "verdict": verdict,
               "checks": checks, "command": command, "table": list(table), "plots": [p.name for p in plots],
               "extra_tables": [{"caption": c, "rows": list(t)} for c, t in extra_tables], **results}
    atomic_write_text(out / "results.json", json.dumps(_clean(payload), indent=1) + "\n")
    rows = html_table(table) + "".join(html_table(t, c) for c, t in extra_tables)
    imgs = "".join(f'<figure><img alt="{html.escape(p.name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.name)}</figcaption>'
                   f"</figure>" for p in plots)
    color = {"holds": "#1a7f37", "does not hold": "#cf222e"}.get(verdict, "#9a6700")
    mark = {True: "✓ holds", False: "✗ does not hold", None: "— not measurable"}
    subs = "<ul>" + "".join(f"<li><code>{html.escape(k)}</code>: {mark[v]}</li>" for k, v in checks.items()) + "</ul>"
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}
table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #ccc;padding:.25rem .5rem;font-size:.9rem}}
img{{max-width:100%}}code{{background:#f3f3f3;padding:.1rem .3rem}}.v{{font-weight:bold;color:{color}}}</style>
</head><body><h1>{html.escape(title)} — {html.escape(name)}</h1>
<p>{claim_label}: {html.escape(claim)}</p>
<p><b>Measured here</b>: {html.escape(measured)}</p>
<p><b>Verdict</b>: <span class="v">{verdict}</span> (sub-claims below)</p>{subs}
<p>Reproduce: <code>{html.escape(command)}</code></p>{rows}{imgs}{extra_html}
<p><small>{html.escape(note)}</small></p></body></html>
"""
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "—"
    return "—" if v is None else str(v)
