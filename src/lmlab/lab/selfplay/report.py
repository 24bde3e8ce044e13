"""The AZR miniature's report: results.json (numbers, the claim, whether it reproduces), PNG plots and a
self-contained report.html (the PNGs inlined as base64)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from ...files import atomic_path, atomic_write_text
from .azr import ARM_HELP, ARMS, KINDS
from .dsl import MAX_OPS

INCONCLUSIVE = "inconclusive: needs at least 2 seeds (one seed has no spread to judge a difference by)"
DIAGNOSTICS = ("validity", "informative", "proposer_reward", "program_length", "diversity")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1; 0 for a single seed)."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def _runs(results: dict[str, Any], arm: str) -> list[dict[str, Any]]:
    return [a for s in results["per_seed"] for a in s["arms"] if a["arm"] == arm]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm in ARMS:
        runs = _runs(results, arm)
        if not runs:
            continue
        evals = [[r for r in run["history"] if "solve_rate" in r] for run in runs]
        iters = [r["iteration"] for r in evals[0]]
        curve = [mean_std([ev[i]["solve_rate"] for ev in evals]) for i in range(len(iters))]
        final = {key: mean_std([ev[-1][key] for ev in evals])
                 for key in ("solve_rate", "solve_ood", *(f"solve_{k}" for k in KINDS)) if evals[0][-1].get(key)
                 is not None}
        diag = {}
        for key in DIAGNOSTICS:
            rows = [[r.get(key) for r in run["history"][1:]] for run in runs]
            if any(v is not None for row in rows for v in row):
                per_it = []
                for i in range(len(rows[0])):
                    vals = [row[i] for row in rows if row[i] is not None]
                    per_it.append(sum(vals) / len(vals) if vals else None)
                diag[key] = per_it
        arms[arm] = {
            "label": ARM_HELP[arm], "eval_iterations": iters,
            "solve_rate_mean": [c[0] for c in curve], "solve_rate_std": [c[1] for c in curve],
            "final": {k: {"mean": round(m, 4), "std": round(s, 4)} for k, (m, s) in final.items()},
            "start_solve_rate": mean_std([ev[0]["solve_rate"] for ev in evals])[0],
            "trained_sequences": sum(r.get("trained_sequences", 0) for r in runs[0]["history"]),
            "rollouts": sum(r.get("rollouts", 0) for r in runs[0]["history"]),
            "wall_s_mean": round(sum(r["wall_s"] for r in runs) / len(runs), 1),
            # AZR's solver trains on its proposer's programs, up to dsl.MAX_OPS ops: longer than train_max_ops too
            "solver_lengths": {n: sum(r.get("solver_lengths", {}).get(n, 0) for r in runs)
                               for n in sorted({n for r in runs for n in r.get("solver_lengths", {})}, key=int)},
            "diagnostics": diag,
        }
    verdict: dict[str, Any] = {}
    one = len(results["seeds"]) < 2  # no spread to judge by: any difference would beat a std of 0
    if "azr" in arms:
        azr = arms["azr"]["final"]["solve_rate"]
        final = {(run["arm"], run["seed"]): [r for r in run["history"] if "solve_rate" in r][-1]["solve_rate"]
                 for s in results["per_seed"] for run in s["arms"]}
        for other in ("warmup_only", "solver_rl_random", "azr_frozen_proposer"):
            if other in arms:
                o = arms[other]["final"]["solve_rate"]
                diff = azr["mean"] - o["mean"]
                verdict[f"azr_minus_{other}"] = round(diff, 4)
                verdict[f"azr_beats_{other}"] = None if one else bool(diff > azr["std"] + o["std"])
                # paired by seed: both arms start from the same warm-up, so the per-seed difference removes
                # the warm-up's seed-to-seed spread
                paired = [final[("azr", s)] - final[(other, s)] for s in results["seeds"]]
                m, sd = mean_std(paired)
                verdict[f"paired_azr_minus_{other}"] = {"per_seed": [round(x, 4) for x in paired],
                                                        "mean": round(m, 4), "std": None if one else round(sd, 4)}
        needed = [k for k in verdict if k.startswith("azr_beats_")]
        verdict["reproduces"] = None if one else bool(needed) and all(verdict[k] for k in needed)
        if one:
            verdict["inconclusive"] = INCONCLUSIVE
        verdict["rule"] = ("AZR's final held-out solve rate must exceed each baseline's by more than the sum of "
                           "their seed standard deviations")
    return {"arms": arms, "verdict": verdict}


def _save(fig: Any, path: Path) -> None:
    """savefig to a temporary name, then rename (atomic, like every other file a report writes)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    arms = results["summary"]["arms"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for a in arms.values():
        m, s = a["solve_rate_mean"], a["solve_rate_std"]
        ax.plot(a["eval_iterations"], m, marker="o", label=a["label"])
        ax.fill_between(a["eval_iterations"], [x - y for x, y in zip(m, s)], [x + y for x, y in zip(m, s)],
                        alpha=0.15)
    ax.set_xlabel("iteration (one gradient step each)")
    ax.set_ylabel("held-out solve rate (greedy)")
    ax.set_title(f"AZR miniature: mean ± std over {len(results['seeds'])} seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "solve_rate.png")
    _save(fig, paths[-1])
    plt.close(fig)

    azr_arms = {k: v for k, v in arms.items() if v["diagnostics"].get("validity")}
    if azr_arms:
        fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(3.2 * len(DIAGNOSTICS), 3.2))
        for ax, key in zip(axes, DIAGNOSTICS):
            for arm, a in azr_arms.items():
                ys = a["diagnostics"].get(key, [])
                ax.plot(range(1, len(ys) + 1), [float("nan") if y is None else y for y in ys], label=arm)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "proposer.png")
        _save(fig, paths[-1])
        plt.close(fig)
    return paths


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [["arm", "held-out solve rate", "out-of-distribution (longer)", "deduction", "abduction", "induction",
             "trained seqs", "wall s/seed"]]
    for arm, a in results["summary"]["arms"].items():
        f = a["final"]

        def cell(key: str, f=f) -> str:
            return f"{f[key]['mean']:.3f} ± {f[key]['std']:.3f}" if key in f else "-"
        rows.append([arm, cell("solve_rate"), cell("solve_ood"), cell("solve_ded"), cell("solve_abd"),
                     cell("solve_ind"), str(a["trained_sequences"]), f"{a['wall_s_mean']:.0f}"])
    return rows


def reproduces(verdict: dict[str, Any]) -> str:
    """The verdict as said in the report and by the CLI: True, False, or why there is none."""
    return verdict.get("inconclusive") or str(verdict.get("reproduces"))


def write_report(results: dict[str, Any], out: str | Path) -> None:
    out = Path(out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    pngs = _plot(results, out)
    rows = table(results)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    imgs = "".join(f'<p><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   f"</p>" for p in pngs)
    verdict = results["summary"]["verdict"]
    cfg = results["config"]
    paired = {k: v for k, v in verdict.items() if k.startswith("paired")}
    lengths = "; ".join(f"{arm} {json.dumps(a.get('solver_lengths', {}))}"
                        for arm, a in results["summary"]["arms"].items() if arm != "warmup_only")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lmlab selfplay azr</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto}}td,th{{padding:.2rem .6rem;
border-bottom:1px solid #ddd;text-align:left}}code{{background:#f4f4f4}}
.scroll{{overflow-x:auto}}img{{max-width:100%}}p{{overflow-wrap:anywhere}}</style></head><body>
<h1>Absolute Zero miniature</h1>
<p>{html.escape(results['claim'])}</p>
<p><b>Warm-up:</b> {html.escape(results['warmup_note'])} ({cfg['warmup_steps']} steps of {cfg['warmup_batch']}
sequences.)</p>
<p>Seeds: {results['seeds']}; held-out tasks: {results['heldout_size']} (stratified by task type and program
length 1–{cfg['heldout_max_ops']}); {cfg['iterations']} iterations, one gradient step each; total wall time
{results['wall_s']:.0f} s.</p>
<p>The out-of-distribution column scores held-out programs longer than {cfg['train_max_ops']} ops, a length the
warm-up and the random-task baseline never train on. The AZR arms' solver trains on whatever its proposer writes,
up to {MAX_OPS} ops, so these lengths can reach it there. Tasks the solver trained on, by program length (all
seeds): {html.escape(lengths)}.</p>
<div class="scroll"><table><tr>{head}</tr>{body}</table></div>
<p><b>Reproduces the paper's claim here:</b> {html.escape(reproduces(verdict))} —
{html.escape(str(verdict.get('rule', '')))}.
Differences of means: {html.escape(json.dumps({k: v for k, v in verdict.items() if k.startswith('azr_minus')}))}.
Paired by seed (same warm-up): {html.escape(json.dumps(paired))}</p>
{imgs}
<p>Full numbers: results.json.</p></body></html>
"""
    atomic_write_text(out / "report.html", page)
