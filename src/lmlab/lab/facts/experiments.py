"""The experiments of Zucchet et al. 2025 at CPU scale, each writing results.json, PNGs and report.html.

    lmlab lab facts phases --seeds 0,1,2 --out runs/facts/phases     # ~5 min on 2 cores
    lmlab lab facts all --quick --out runs/facts                      # every experiment, reduced sizes

Sizes are this lab's CPU scale (its README), calibrated on the 2-core machine: a gpt2-family model with
3 layers, d=64, 4 heads (~150k non-embedding parameters), batch 32, a word tokenizer (~600 tokens), N=1000
individuals. Budgets are counted in steps; exposures per individual are steps * batch / N.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..parallel import process_map
from .data import BioConfig, check_ints
from .memory import MemoryConfig, run_memory
from .metrics import curves
from .report import line_plot, pm, write_report
from .runner import RunConfig, run_many

EXPERIMENTS = ("phases", "plateau", "alpha", "warmup", "hallucination", "finetune", "memory", "patching",
               "ablation")


@dataclass
class Scale:
    """The CPU-scale sizes shared by the experiments; `quick` shrinks the budgets (minutes, not tens)."""

    n_individuals: int = 1000
    steps: int = 2000
    eval_every: int = 50
    lr: float = 5e-3  # calibrated: N=1000 reaches 93% held-out in 3000 steps; 1e-2 and 2e-3 learn far less
    batch_size: int = 32
    n_layer: int = 3
    n_embd: int = 64
    n_head: int = 4
    workers: int | None = None   # processes (default: one per CPU core, and all seeds of a small job at once)

    def __post_init__(self) -> None:
        check_ints(self, ("n_individuals", "steps", "eval_every", "batch_size", "n_layer", "n_embd", "n_head"), 1)
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers ({self.workers}) must be >= 1")

    @classmethod
    def default(cls, quick: bool = False, workers: int | None = None) -> Scale:
        """The default CPU scale, or the --quick one: half the population and 60% of the steps (its plateau
        is shorter, and knowledge only starts to emerge by the end)."""
        return cls(n_individuals=500, steps=1200, eval_every=40, workers=workers) if quick else cls(workers=workers)

    def run(self, seed: int, steps: int | None = None, n: int | None = None, **bio: Any) -> RunConfig:
        extra = {k: bio.pop(k) for k in list(bio) if k in {f.name for f in dataclasses.fields(RunConfig)}}
        return RunConfig(bio=BioConfig(n_individuals=n or self.n_individuals, seed=seed, **bio),
                         n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, batch_size=self.batch_size,
                         lr=extra.pop("lr", self.lr), steps=steps or self.steps,
                         eval_every=extra.pop("eval_every", self.eval_every), seed=seed, **extra)


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' -> [0, 1, 2] / [0, 1, 2, 3, 4]."""
    try:
        if "-" in text and "," not in text:
            a, b = (int(v) for v in text.split("-"))
            seeds = list(range(a, b + 1))
        else:
            seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds ({text!r}) must look like 0,1,2 or 0-4") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds ({text!r}) must be distinct integers >= 0")
    return seeds


def _cmd(name: str, seeds: Sequence[int], out: Path, quick: bool) -> str:
    return f"lmlab lab facts {name} --seeds {','.join(map(str, seeds))} --out {out}" + (" --quick" if quick else "")


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _std(values: Sequence[float | None]) -> float | None:
    """The sample std (ddof=1): with 2-3 seeds the population std (ddof=0) understates the spread by a factor
    of up to sqrt(2). None below two values."""
    v = [x for x in values if x is not None]
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def _agg(rows: Sequence[dict[str, Any]], bounds: dict[str, Sequence[float | None]] | None = None
         ) -> dict[str, Any]:
    """Per-seed rows -> one row: the mean of each key over seeds (None where no seed has a value) and, with
    several seeds, its sample std as `key_std` (the report prints "mean ± std"). A `seed` key names the row
    and is not aggregated.

    Times to an event that a seed may never reach within its run (t*, say) are right-censored: `bounds[key]`
    gives each seed's bound, the last step its run evaluated. A seed without the event counts at its bound,
    so the mean (and std) is then a lower bound, flagged by `key_censored`, the number of such seeds (the
    report prints "≥ mean ± std (k censored)"). Dropping those seeds instead would bias the mean low exactly
    where the event comes latest. Other missing values are left out."""
    bounds = bounds or {}
    out: dict[str, Any] = {}
    for k in (k for k in rows[0] if k != "seed"):
        values = [r[k] for r in rows]
        censored = 0
        if k in bounds:
            censored = sum(v is None and b is not None for v, b in zip(values, bounds[k]))
            values = [b if v is None else v for v, b in zip(values, bounds[k])]
        out[k] = _mean(values)
        if len(rows) > 1:
            out[f"{k}_std"] = _std(values)
        if k in bounds:
            out[f"{k}_censored"] = censored
    return out


def _last_step(history: Sequence[dict[str, Any]]) -> int:
    """The censoring bound of a time measured on this evaluation history: its last step."""
    return history[-1]["step"]


def _earlier(row: dict[str, Any], a: str, b: str) -> bool | None:
    """Whether time `a` comes before time `b` in an aggregated row whose means may be lower bounds (`_agg`'s
    `key_censored`); None where the bounds cannot tell."""
    ta, tb = row[a], row[b]
    if ta is None or tb is None:
        return None
    ca, cb = row.get(f"{a}_censored", 0), row.get(f"{b}_censored", 0)
    if ca and cb:
        return None
    if ca:  # a >= ta
        return False if ta >= tb else None
    if cb:  # b >= tb
        return True if ta < tb else None
    return bool(ta < tb)


def _baselines(runs: Sequence[dict[str, Any]]) -> list[float]:
    """Each run's own no-knowledge baseline: every seed draws its own population, so its value entropy differs."""
    return [r["baseline"] for r in runs]


def _baseline_line(runs: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    """The plots' baseline line: the mean over the runs' own baselines."""
    b = _baselines(runs)
    return [("no-knowledge baseline" + (" (mean over seeds)" if len(set(b)) > 1 else ""), float(np.mean(b)))]


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """'mean ± std' of an aggregated row's key (the mean alone with one seed)."""
    return pm(row, key, lambda v: _n(v, digits))


def _n(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _speed(runs: Sequence[dict[str, Any]], wall: float) -> dict[str, float]:
    steps = sum(r["steps"] for r in runs)
    return {"wall_s": wall, "total_steps": steps, "steps_per_s_total": steps / wall,
            "steps_per_s_per_run": float(np.mean([r["steps_per_s"] for r in runs]))}


def _groups(runs: Sequence[Any], size: int) -> list[list[Any]]:
    """Jobs are submitted variant by variant, `size` seeds each: split the results back."""
    return [list(runs[i:i + size]) for i in range(0, len(runs), size)]


def _final(run: dict[str, Any], key: str) -> float:
    return run["history"][-1][key]


def _lean(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("config",)}


# ---- three phases + hallucination (one set of runs) -------------------------------------------------------

def _phase_runs(seeds: Sequence[int], out: Path, scale: Scale) -> tuple[list[dict[str, Any]], float]:
    jobs = [(scale.run(s), out / "runs" / f"seed-{s}") for s in seeds]
    t0 = time.perf_counter()
    runs = run_many(jobs, workers=scale.workers or len(jobs))  # 3 seeds on 2 cores: all at once packs best
    return runs, time.perf_counter() - t0


def phases(seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None,
           runs: list[dict[str, Any]] | None = None, wall: float | None = None) -> dict[str, Any]:
    scale = scale or Scale.default(quick)
    if runs is None:
        runs, wall = _phase_runs(seeds, out, scale)
    per_seed = []
    for s, r in zip(seeds, runs):
        h, p, base = r["history"], r["plateau"], r["baseline"]
        at = {row["step"]: row for row in h}
        acc_t1 = at[p["t1"]]["seen_eval/acc"] if p["t1"] is not None else None
        plateau_rows = [row for row in h if p["t1"] is not None and p["t1"] <= row["step"] < (p["t_star"] or 1e18)]
        # A plateau, not a crossing: steps spent within 0.1 nats of the baseline, and the mean gap over [t1, t*)
        dwell = sum(abs(row["seen_eval/loss"] - base) <= 0.1 for row in h[1:]) * scale.eval_every
        per_seed.append({"seed": s, "t1": p["t1"], "t_star": p["t_star"], "plateau_len": p["plateau_len"],
                         "steps_within_0.1_of_baseline": dwell, "acc_at_t1": acc_t1,
                         "plateau_mean_gap": _mean([row["seen_eval/loss"] - base for row in plateau_rows]),
                         "plateau_mean_acc": _mean([row["seen_eval/acc"] for row in plateau_rows]),
                         "final_acc_heldout": _final(r, "seen_eval/acc"),
                         "final_acc_train": _final(r, "seen_train/acc"),
                         "final_loss": _final(r, "seen_eval/loss")})
    # holds: the loss reaches the baseline, sits there for at least 4 evaluations with accuracy < 10%, then
    # leaves it downward and held-out accuracy passes 30%
    checks = {"reaches_baseline": all(x["t1"] is not None for x in per_seed),
              "plateau_at_baseline": all(x["t1"] is not None and x["t_star"] is not None
                                         and x["t_star"] - x["t1"] >= 4 * scale.eval_every
                                         and x["plateau_mean_gap"] is not None and abs(x["plateau_mean_gap"]) <= 0.1
                                         and x["plateau_mean_acc"] is not None and x["plateau_mean_acc"] < 0.1
                                         for x in per_seed),
              "knowledge_emerges": all(x["final_acc_heldout"] > 0.3 for x in per_seed)}
    plots = [
        line_plot(out / "loss.png", "attribute loss (Fig. 2 left)", "step", "nats per attribute",
                  [(k, [curves(r["history"], f"{k}/loss") for r in runs])
                   for k in ("seen_eval", "seen_train", "unseen")],
                  hlines=_baseline_line(runs)),
        line_plot(out / "accuracy.png", "attribute accuracy (Fig. 2 middle)", "step", "accuracy",
                  [(f"{k}", [curves(r["history"], f"{k}/acc") for r in runs]) for k in ("seen_eval", "seen_train")]),
        line_plot(out / "probes.png", "attention from value position to name tokens", "step", "attention mass",
                  [(f"layer {i}", [curves(r["history"], f"att_value_name_L{i}") for r in runs])
                   for i in range(scale.n_layer)]),
        line_plot(out / "drift.png", "token embedding drift between evaluations", "step", "relative change",
                  [(g, [curves(r["history"], f"drift_{g}") for r in runs]) for g in ("name", "value", "template")],
                  logy=True),
    ]
    agg = _agg(per_seed, {"t_star": [_last_step(r["history"]) for r in runs],
                          "plateau_len": [None if x["t1"] is None else _last_step(r["history"]) - x["t1"]
                                          for x, r in zip(per_seed, runs)]})
    base = _baselines(runs)
    measured = (f"baseline {_n(float(np.mean(base)))} nats (each seed's own: {[round(b, 3) for b in base]}); mean "
                f"gap to it on the plateau {_pm(agg, 'plateau_mean_gap')} nats; "
                f"steps within 0.1 nats of it {[x['steps_within_0.1_of_baseline'] for x in per_seed]}; t1 = "
                f"{_pm(agg, 't1', 0)}, t* = {_pm(agg, 't_star', 0)} steps; plateau accuracy "
                f"{_pm(agg, 'plateau_mean_acc')}; final held-out accuracy {_pm(agg, 'final_acc_heldout')}")
    res = {"scale": dataclasses.asdict(scale), "baseline": base, "per_seed": per_seed, "summary": agg,
           "speed": _speed(runs, wall or 0.0), "runs": [_lean(r) for r in runs]}
    write_report(out, "three phases", "Knowledge is acquired in three phases: the loss first fits the value "
                 "marginals and drops to the no-knowledge baseline, stays on a plateau at the baseline with "
                 "near-zero accuracy, then falls below it as individual knowledge emerges (Fig. 2 left/middle).",
                 measured, checks, per_seed, plots, res, _cmd("phases", seeds, out, quick))
    return res


def hallucination(seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None,
                  runs: list[dict[str, Any]] | None = None, wall: float | None = None) -> dict[str, Any]:
    scale = scale or Scale.default(quick)
    if runs is None:
        runs, wall = _phase_runs(seeds, out, scale)
    per_seed = []
    for s, r in zip(seeds, runs):
        h, p, base = r["history"], r["plateau"], r["baseline"]
        steps = [row["step"] for row in h]
        unseen = [row["unseen/loss"] for row in h]
        # onset: first evaluation after t1 with unseen loss > baseline + 0.1, confirmed by the next one
        onset = None
        for k in range(len(h)):
            if p["t1"] is not None and steps[k] >= p["t1"] and unseen[k] > base + 0.1 and \
                    (k + 1 == len(h) or unseen[k + 1] > base + 0.1):
                onset = steps[k]
                break
        # a seed that never leaves the plateau is on it until the end of its run
        end = steps[-1] if p["t_star"] is None else p["t_star"]
        plateau_unseen = [u for st, u in zip(steps, unseen) if p["t1"] is not None and p["t1"] <= st <= end]
        last = h[-1]
        per_seed.append({"seed": s, "t_star": p["t_star"], "onset": onset,
                         "onset_minus_t_star": None if onset is None or p["t_star"] is None else onset - p["t_star"],
                         "unseen_plateau_above_baseline": _mean([u - base for u in plateau_unseen]),
                         "unseen_final_above_baseline": last["unseen/loss"] - base,
                         "max_prob_seen": last["seen_eval/max_prob"], "max_prob_unseen": last["unseen/max_prob"],
                         "entropy_seen": last["seen_eval/entropy"], "entropy_unseen": last["unseen/entropy"]})
    interval = scale.eval_every
    # "at the baseline" on the plateau: within 0.1 nats, the tolerance `phases` uses for the seen loss
    checks = {"unseen_at_baseline_on_plateau": all(x["unseen_plateau_above_baseline"] is not None
                                                   and abs(x["unseen_plateau_above_baseline"]) <= 0.1
                                                   for x in per_seed),
              "onset_near_t_star": all(x["onset"] is not None and x["t_star"] is not None
                                       and abs(x["onset_minus_t_star"]) <= 4 * interval for x in per_seed),
              "unseen_ends_above_baseline": all(x["unseen_final_above_baseline"] > 0 for x in per_seed),
              "unseen_less_confident": all(x["max_prob_unseen"] < x["max_prob_seen"]
                                           and x["entropy_unseen"] > x["entropy_seen"] for x in per_seed)}
    plots = [
        line_plot(out / "hallucination_loss.png", "unseen individuals (Fig. 5 left)", "step", "nats per attribute",
                  [("unseen", [curves(r["history"], "unseen/loss") for r in runs]),
                   ("seen (held-out templates)", [curves(r["history"], "seen_eval/loss") for r in runs])],
                  hlines=_baseline_line(runs)),
        line_plot(out / "confidence.png", "max probability at value tokens (Fig. M)", "step", "max prob",
                  [("unseen", [curves(r["history"], "unseen/max_prob") for r in runs]),
                   ("seen", [curves(r["history"], "seen_eval/max_prob") for r in runs])]),
        line_plot(out / "entropy.png", "predictive entropy at value tokens (Fig. M)", "step", "nats",
                  [("unseen", [curves(r["history"], "unseen/entropy") for r in runs]),
                   ("seen", [curves(r["history"], "seen_eval/entropy") for r in runs])]),
    ]
    agg = _agg(per_seed, {k: [_last_step(r["history"]) for r in runs] for k in ("t_star", "onset")})
    measured = (f"t* {_pm(agg, 't_star', 0)}; unseen loss − baseline on the plateau "
                f"{_pm(agg, 'unseen_plateau_above_baseline')}, at the end {_pm(agg, 'unseen_final_above_baseline')} "
                f"nats; onset − t* = {_pm(agg, 'onset_minus_t_star', 0)} (per seed "
                f"{[x['onset_minus_t_star'] for x in per_seed]}) steps (eval interval {interval}); final max prob "
                f"unseen {_pm(agg, 'max_prob_unseen')} vs seen {_pm(agg, 'max_prob_seen')}; entropy unseen "
                f"{_pm(agg, 'entropy_unseen')} vs seen {_pm(agg, 'entropy_seen')}")
    res = {"baseline": _baselines(runs), "per_seed": per_seed, "summary": agg, "speed": _speed(runs, wall or 0.0)}
    write_report(out, "hallucination", "On individuals never seen in training the loss sits at the baseline "
                 "during the plateau and rises above it (confident wrong answers) as knowledge emerges, at the "
                 "end of the plateau; predictions on unseen individuals are less confident than on seen ones "
                 "(Fig. 5 left, Fig. M).", measured, checks, per_seed, plots, res,
                 _cmd("hallucination", seeds, out, quick))
    return res


# ---- plateau length against N ----------------------------------------------------------------------------

def loglog_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """y = a * x^b by least squares on logs; returns a, b and R²."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    b, la = np.polyfit(lx, ly, 1)
    pred = la + b * lx
    r2 = 1 - ((ly - pred) ** 2).sum() / max(((ly - ly.mean()) ** 2).sum(), 1e-300)
    return {"a": float(math.exp(la)), "b": float(b), "r2": float(r2)}


def plateau(seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None,
            sizes: Sequence[int] | None = None) -> dict[str, Any]:
    scale = scale or Scale.default(quick)
    sizes = list(sizes or ((250, 500, 1000) if quick else (250, 500, 1000, 2000)))
    jobs = []
    for n in sizes:
        for s in seeds:
            # enough budget to pass the plateau (≈ 8 exposures per individual at t* in calibration, plus
            # phase 1); stop once held-out accuracy passes 30% (protocol E2)
            steps = max(scale.steps // 2, int(1.5 * scale.steps * n / scale.n_individuals))
            jobs.append((scale.run(s, steps=steps, n=n, stop_at_acc=0.3, probes=False,
                                   eval_every=max(10, min(50, n // (4 * scale.batch_size) * 10 or 10))),
                         out / "runs" / f"n{n}-seed-{s}"))
    t0 = time.perf_counter()
    runs = run_many(jobs, workers=scale.workers)
    wall = time.perf_counter() - t0
    table = []
    by_n: dict[int, list[dict[str, Any]]] = {}
    for (cfg, _), r in zip(jobs, runs):
        by_n.setdefault(cfg.bio.n_individuals, []).append(r)
    for n in sizes:
        rs = by_n[n]
        rows = [{"t_star": p["t_star"], "t1": p["t1"], "plateau_len": p["plateau_len"],
                 "exposures_at_t_star": None if p["t_star"] is None else p["t_star"] * scale.batch_size / n}
                for p in (r["plateau"] for r in rs)]
        ends = [_last_step(r["history"]) for r in rs]
        table.append({"N": n, **_agg(rows, {"t_star": ends, "exposures_at_t_star": [e * scale.batch_size / n
                                                                                    for e in ends],
                                            "plateau_len": [None if x["t1"] is None else e - x["t1"]
                                                            for x, e in zip(rows, ends)]})})
    # Censoring: a size where some seed is still on the plateau at the end of its run has only a lower bound
    # on its mean t*; it is left out of the fits (and named in the report), which use only sizes where every
    # seed left the plateau. Fitting its lower bound, or the seeds that left early, would flatten the
    # exponent at the largest N, where plateaus are longest.
    good = [row for row in table if row["t_star"] is not None and not row["t_star_censored"]]
    censored = [row for row in table if row["t_star_censored"]]
    fit = loglog_fit([r["N"] for r in good], [r["t_star"] for r in good]) if len(good) >= 2 else None
    good_len = [row for row in good if row["plateau_len"] is not None and row["plateau_len"] > 0]
    fit_len = loglog_fit([r["N"] for r in good_len], [r["plateau_len"] for r in good_len]) \
        if len(good_len) >= 2 else None
    rising = all(a["t_star"] < b["t_star"] for a, b in zip(good, good[1:]))
    per_seed = {}  # the same fit within each seed, over the same sizes
    for seed in seeds:
        pts = [(c.bio.n_individuals, r["plateau"]["t_star"]) for (c, _), r in zip(jobs, runs)
               if c.seed == seed and c.bio.n_individuals in {row["N"] for row in good}]
        if len(pts) >= 2:
            per_seed[seed] = loglog_fit(*zip(*pts))
    slopes = [f["b"] for f in per_seed.values()]
    checks = {"slope_in_0.6_1.0": None if fit is None else bool(0.6 <= fit["b"] <= 1.0),
              "t_star_rises_with_N": None if fit is None else bool(rising)}
    plots = [line_plot(out / "plateau_vs_n.png", "plateau end against N (Fig. 2 right)", "N individuals", "steps",
                       [("t* (end of plateau)", [(np.array([r["N"] for r in good], float),
                                                  np.array([r["t_star"] for r in good]))]),
                        ("t* − t1 (plateau length)", [(np.array([r["N"] for r in good_len], float),
                                                       np.array([r["plateau_len"] for r in good_len], float))])],
                       logx=True, logy=True)]
    measured = ("fewer than two sizes where every seed left the plateau" if fit is None else
                f"t* ≈ {fit['a']:.3g}·N^{fit['b']:.2f} (R² {fit['r2']:.3f}) over N = {[r['N'] for r in good]}"
                + ("" if fit_len is None else
                   f"; t*−t1 ≈ {fit_len['a']:.3g}·N^{fit_len['b']:.2f} (R² {fit_len['r2']:.3f})")
                + ("" if not slopes else
                   "; per seed, the exponent of t*: " + _pm(_agg([{"b": b} for b in slopes]), "b", 2)
                   + " (" + ", ".join(f"seed {k}: {f['b']:.2f}" for k, f in per_seed.items()) + ")")
                + "".join(f"; N = {r['N']} left out of the fits: t* {_pm(r, 't_star', 0)}, {r['t_star_censored']} of "
                          f"{len(seeds)} seeds still on the plateau at the end of the run" for r in censored))
    res = {"fit_t_star": fit, "fit_t_star_per_seed": {str(k): v for k, v in per_seed.items()},
           "fit_plateau_len": fit_len, "fit_sizes": [r["N"] for r in good], "table": table, "speed": _speed(runs, wall),
           "runs": [{"N": c.bio.n_individuals, "seed": c.seed, "plateau": r["plateau"], "steps": r["steps"],
                     "history": r["history"]} for (c, _), r in zip(jobs, runs)]}
    write_report(out, "plateau length against N", "The plateau ends after a number of steps that grows almost "
                 "linearly with the number of individuals: plateau end ≈ 0.43·N^0.81 (R² 0.998, Fig. 2 right). "
                 "Holds here if the log-log slope of t* is in [0.6, 1.0] and t* increases with N, over the sizes "
                 "where every seed left the plateau.",
                 measured, checks, table, plots, res, _cmd("plateau", seeds, out, quick))
    return res


# ---- data distribution: alpha sweep and warm-up ------------------------------------------------------------

def alpha(seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None,
          alphas: Sequence[float] | None = None) -> dict[str, Any]:
    scale = scale or Scale.default(quick)
    alphas = list(alphas or ((0.0, 0.4, 0.8, 1.0) if quick else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)))
    jobs = [(scale.run(s, sampling="power_law", alpha=a, probes=False), out / "runs" / f"alpha{a}-seed-{s}")
            for a in alphas for s in seeds]
    t0 = time.perf_counter()
    runs = run_many(jobs, workers=scale.workers)
    wall = time.perf_counter() - t0
    table = []
    for a, rs in zip(alphas, _groups(runs, len(seeds))):
        rows = [{"t_star": r["plateau"]["t_star"], "final_loss": _final(r, "seen_eval/loss"),
                 "final_acc": _final(r, "seen_eval/acc")} for r in rs]
        table.append({"alpha": a, **_agg(rows, {"t_star": [_last_step(r["history"]) for r in rs]}),
                      "top_individual_share": rs[0]["data"]["top_individual_share"]})
    # the shortest plateau among the α where every seed left it (a censored mean is only a lower bound)
    reached = [r for r in table if not r["t_star_censored"]]
    best_plateau = min(reached, key=lambda r: r["t_star"])["alpha"] if reached else None
    best_loss = min(table, key=lambda r: r["final_loss"])["alpha"]
    # the paper's Fig. 4: the plateau is shortest at an intermediate α, and the final loss is lower there than
    # under uniform sampling (α = 0 is the first of the sweep)
    checks = {"shortest_plateau_at_0.4_to_1": None if best_plateau is None else bool(0.4 < best_plateau < 1.0),
              "power_law_beats_uniform_final_loss": bool(best_loss != alphas[0])}
    plots = [line_plot(out / "alpha_plateau.png", "plateau end against α (Fig. 4 left)", "α", "t* (steps)",
                       [("t*", [(np.array([r["alpha"] for r in reached]),
                                 np.array([r["t_star"] for r in reached], float))])]),
             line_plot(out / "alpha_final.png", "final held-out loss against α (Fig. 4 middle)", "α", "nats",
                       [("final loss", [(np.array([r["alpha"] for r in table]),
                                         np.array([r["final_loss"] for r in table]))])],
                       hlines=_baseline_line(runs))]
    measured = (f"shortest plateau at α = {best_plateau}; lowest final loss at α = {best_loss} "
                f"(N = {scale.n_individuals}, {scale.steps} steps)")
    res = {"best_alpha_plateau": best_plateau, "best_alpha_final_loss": best_loss, "table": table,
           "speed": _speed(runs, wall), "runs": [_lean(r) for r in runs]}
    write_report(out, "alpha sweep", "With power-law sampling p_i ∝ i^−α, the plateau is shortest for α ≈ 0.6–0.8 "
                 "(for every N); more imbalance overfits. Checked here: the shortest plateau is at an α strictly "
                 "between 0.4 and 1, and the lowest final loss is not at α = 0 (Fig. 4 left/middle).",
                 measured, checks, table, plots, res,
                 _cmd("alpha", seeds, out, quick))
    return res


def warmup(seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None,
           best_alpha: float = 0.6) -> dict[str, Any]:
    scale = scale or Scale.default(quick)
    # A short budget is where curricula matter (the paper's gain is largest when the budget is tight).
    steps = int(scale.steps * (0.5 if quick else 0.7))
    n = scale.n_individuals
    epoch = n // scale.batch_size  # the paper's epoch: N_total / batch steps
    variants: list[tuple[str, dict[str, Any]]] = [("uniform", {}), (f"power law α={best_alpha}",
                                                                   {"sampling": "power_law", "alpha": best_alpha})]
    grid = [(n // 8, 4), (n // 4, 4)] if quick else [(n // 8, 2), (n // 8, 4), (n // 4, 4), (n // 4, 8)]
    for k, e in grid:
        variants.append((f"warm-up {k} for {e} epochs", {"warmup_individuals": k, "warmup_steps": e * epoch}))
    jobs = [(scale.run(s, steps=steps, probes=False, **kw), out / "runs" / f"v{i}-seed-{s}")
            for i, (_, kw) in enumerate(variants) for s in seeds]
    t0 = time.perf_counter()
    runs = run_many(jobs, workers=scale.workers)
    wall = time.perf_counter() - t0
    table = []
    groups = _groups(runs, len(seeds))
    for (label, _), rs in zip(variants, groups):
        table.append({"variant": label, **_agg([{"final_acc_all_N": _final(r, "seen_eval/acc"),
                                                  "final_loss": _final(r, "seen_eval/loss"),
                                                  "t_star": r["plateau"]["t_star"]} for r in rs],
                                                {"t_star": [_last_step(r["history"]) for r in rs]})})
    uni, pl = table[0]["final_acc_all_N"], table[1]["final_acc_all_N"]
    best_w = max(table[2:], key=lambda r: r["final_acc_all_N"])
    checks = {"power_law_beats_uniform": bool(pl > uni),
              "warmup_beats_power_law": bool(best_w["final_acc_all_N"] >= pl)}
    plots = [line_plot(out / "warmup_acc.png", "held-out accuracy over all N (Fig. 4 right)", "step", "accuracy",
                       [(label, [curves(r["history"], "seen_eval/acc") for r in rs])
                        for (label, _), rs in zip(variants, groups)])]
    measured = (f"final accuracy over all {n}: uniform {_pm(table[0], 'final_acc_all_N')}, power law "
                f"{_pm(table[1], 'final_acc_all_N')}, best warm-up ({best_w['variant']}) "
                f"{_pm(best_w, 'final_acc_all_N')} after {steps} steps")
    res = {"table": table, "steps": steps, "speed": _speed(runs, wall), "runs": [_lean(r) for r in runs]}
    write_report(out, "warm-up curriculum", "Uniform < best power law α < warm-up (a subset first, then everyone), "
                 "in final accuracy over the whole population (Fig. 4 right).", measured, checks, table, plots, res,
                 _cmd("warmup", seeds, out, quick))
    return res


# ---- fine-tuning on new individuals ------------------------------------------------------------------------

def finetune(seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None) -> dict[str, Any]:
    scale = scale or Scale.default(quick)
    n = scale.n_individuals
    pre_steps = scale.steps if quick else scale.steps * 3 // 2
    ft_steps = scale.steps // (4 if quick else 2)
    # Fig. P: the same pre-training with the first n/16 individuals ("celebrities") drawn 8 times more often (the
    # paper's 8k of 128k at weight 8), so the other 15/16 are seen but rare; then fine-tuning on those rare seen
    # individuals (the paper's Fig. P: ~50% -> ~70%), and, as our control, the same fine-tuning on new
    # individuals as below, without replay
    n_celeb, celeb_w = n // 16, 8.0
    t0 = time.perf_counter()
    pre_jobs = [(scale.run(s, steps=pre_steps, probes=False, n_unseen=0), out / "pretrain" / f"seed-{s}")
                for s in seeds]
    pre_jobs += [(scale.run(s, steps=pre_steps, probes=False, n_unseen=0, sampling="celebrities",
                            n_celebrities=n_celeb, celebrity_weight=celeb_w), out / "pretrain" / f"celeb-seed-{s}")
                 for s in seeds]
    pre_all = run_many(pre_jobs, workers=scale.workers or len(pre_jobs))
    pre, pre_celeb = pre_all[: len(seeds)], pre_all[len(seeds):]
    n_news = [n // 16, n // 4] if quick else [n // 64, n // 16, n // 4]
    replay_n = n // 16
    replays = [0.0, 0.125, 1.0] if quick else [0.0, 1 / 32, 0.125, 0.5, 2.0]
    variants: list[tuple[str, int, float]] = [(f"new={k}", k, 0.0) for k in n_news]
    variants += [(f"new={replay_n} replay w={w:g}", replay_n, w) for w in replays if w > 0]
    # shared by every fine-tuning run: the first rows of the population are drawn with weight w each (0: not
    # drawn), the others with 1; the old rows [0, n) are evaluated as "old", any rows past them as "new"
    ft_kw: dict[str, Any] = dict(probes=False, n_unseen=0, lr=scale.lr / 13, schedule="constant", eval_every=10,
                                 split_old=n, n_eval=128)
    jobs = []
    for label, k, w in variants:
        for s, p in zip(seeds, pre):
            cfg = scale.run(s, steps=ft_steps, n=n + k, replay_individuals=n, replay_weight=w,
                            init_from=p["final_weights"], **ft_kw)
            jobs.append((cfg, out / "runs" / f"{label.replace(' ', '_')}-seed-{s}"))
    # after celebrity pre-training, old celebrities [0, c) and old others [c, n) are evaluated apart. (label,
    # population, rows not drawn): n/16 new individuals, old rows not drawn (the new=n/16 run above, pre-trained
    # differently); or no new individuals, celebrities not drawn: fine-tuning on the rare seen ones
    celeb_variants = [(f"{replay_n} new", n + replay_n, n), (f"{n - n_celeb} rare seen", n, n_celeb)]
    for label, total, skip in celeb_variants:
        for s, p in zip(seeds, pre_celeb):
            cfg = scale.run(s, steps=ft_steps, n=total, replay_individuals=skip, replay_weight=0.0,
                            init_from=p["final_weights"], split_celebrities=n_celeb, **ft_kw)
            jobs.append((cfg, out / "runs" / f"celebrities-{label.replace(' ', '_')}-seed-{s}"))
    all_runs = run_many(jobs, workers=scale.workers)
    runs = all_runs[: len(variants) * len(seeds)]
    celeb_runs, rare_runs = _groups(all_runs[len(variants) * len(seeds):], len(seeds))
    wall = time.perf_counter() - t0
    table = []
    for (label, k, w), rs in zip(variants, _groups(runs, len(seeds))):
        rows = []
        for r in rs:
            old = r["history_old"]
            new = r["history_new"]
            start, base = old[0]["seen_eval/loss"], old[0]["baseline"]  # this seed's population's baseline
            half = start + 0.5 * (base - start)  # forgetting: half-way from the pre-trained loss to the baseline
            t_forget = next((row["step"] for row in old if row["seen_eval/loss"] >= half), None)
            early = [row["seen_eval/loss"] for row in old if row["step"] <= 100]
            rows.append({"t_forget": t_forget, "old_acc_start": old[0]["seen_eval/acc"], "old_loss_start": start,
                         "old_acc_end": old[-1]["seen_eval/acc"], "old_loss_peak_100": max(early),
                         "old_loss_end": old[-1]["seen_eval/loss"], "new_acc_end": new[-1]["seen_eval/acc"],
                         "new_acc_at_100": next((row["seen_eval/acc"] for row in new if row["step"] >= 100),
                                                   new[-1]["seen_eval/acc"])})
        share = 0.0 if w == 0 else w * n / (w * n + k)
        table.append({"variant": label, "replay_share": share,
                      **_agg(rows, {"t_forget": [_last_step(r["history_old"]) for r in rs]})})
    base_rows = table[: len(n_news)]
    rep_rows = [table[n_news.index(replay_n)]] + table[len(n_news):]
    forget_fast = all(not r["t_forget_censored"] and r["t_forget"] <= 150 for r in base_rows)
    # more new individuals, more forgetting: lower final old accuracy (by > 0.01) or higher old loss (> 0.05)
    grows = all(a["old_acc_end"] > b["old_acc_end"] + 0.01 or b["old_loss_end"] > a["old_loss_end"] + 0.05
                for a, b in zip(base_rows, base_rows[1:]))
    final_better = all(a["old_acc_end"] <= b["old_acc_end"] + 0.02 for a, b in zip(rep_rows, rep_rows[1:]))
    # replay leaves the initial drop: the rise of the old loss in the first 100 steps under the most replay is
    # at least half the rise without replay
    def rise(r: dict[str, Any]) -> float:
        return r["old_loss_peak_100"] - r["old_loss_start"]
    spike_same = bool(rise(rep_rows[-1]) >= 0.5 * rise(rep_rows[0])) if len(rep_rows) > 1 else None
    # Fig. P: per group, how much of its pre-trained accuracy it keeps and how far its loss rises (at the end,
    # and at most in the first 100 steps)
    def group_row(r: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for g in ("old_celeb", "old_rest"):
            h = r[f"history_{g}"]
            a0, a1, l0 = h[0]["seen_eval/acc"], h[-1]["seen_eval/acc"], h[0]["seen_eval/loss"]
            row.update({f"{g}_acc_start": a0, f"{g}_acc_end": a1, f"{g}_acc_kept": a1 / a0 if a0 > 0 else None,
                        f"{g}_loss_rise": h[-1]["seen_eval/loss"] - l0,
                        f"{g}_loss_rise_100": max(x["seen_eval/loss"] for x in h if x["step"] <= 100) - l0})
        if "history_new" in r:
            row["new_acc_end"] = r["history_new"][-1]["seen_eval/acc"]
        return row
    celeb_rows, rare_rows = ([{"seed": s, **group_row(r)} for s, r in zip(seeds, rs)] for rs in (celeb_runs, rare_runs))
    celeb, rare = _agg(celeb_rows), _agg(rare_rows)
    kept_more = None if celeb["old_celeb_acc_kept"] is None or celeb["old_rest_acc_kept"] is None else \
        bool(celeb["old_celeb_acc_kept"] > celeb["old_rest_acc_kept"])
    checks = {"forgets_within_150_steps": forget_fast, "drop_grows_with_new": grows,
              "replay_improves_final": final_better, "replay_leaves_initial_spike": spike_same,
              # Fig. P: the rare seen individuals gain (the paper: ~50% -> ~70%; here: by more than 5 points) ...
              "rare_seen_finetuning_raises_their_accuracy": bool(rare["old_rest_acc_end"]
                                                                 > rare["old_rest_acc_start"] + 0.05),
              # ... without the collapse: their loss rises in the first 100 steps by less than half of what the
              # same individuals' loss rises when the same model is fine-tuned on new individuals instead
              "rare_seen_without_initial_collapse": bool(rare["old_rest_loss_rise_100"]
                                                         < 0.5 * celeb["old_rest_loss_rise_100"]),
              "celebrities_keep_more_accuracy": kept_more,
              "celebrity_loss_rises_less": bool(celeb["old_celeb_loss_rise"] < celeb["old_rest_loss_rise"])}
    groups = _groups(runs, len(seeds))
    labels = [label for label, _, _ in variants]

    def by_variant(history: str, key: str) -> list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]]:
        return [(label, [curves(r[history], key) for r in rs]) for label, rs in zip(labels, groups)]
    plots = [line_plot(out / "old_loss.png", "old individuals during fine-tuning (Fig. 5 middle)", "fine-tuning step",
                       "nats", by_variant("history_old", "seen_eval/loss"), hlines=_baseline_line(pre)),
             line_plot(out / "new_acc.png", "new individuals during fine-tuning", "fine-tuning step", "accuracy",
                       by_variant("history_new", "seen_eval/acc")),
             line_plot(out / "old_acc.png", "old accuracy with replay (Fig. 5 right)", "fine-tuning step", "accuracy",
                       by_variant("history_old", "seen_eval/acc")),
             line_plot(out / "celebrities.png", f"{replay_n} new after {n_celeb} celebrities at weight {celeb_w:g}",
                       "fine-tuning step", "accuracy",
                       [(lbl, [curves(r[f"history_{g}"], "seen_eval/acc") for r in celeb_runs])
                        for lbl, g in (("old celebrities", "old_celeb"), ("old others", "old_rest"),
                                       ("new", "new"))]),
             line_plot(out / "rare_seen.png", f"fine-tuning on the {n - n_celeb} rare seen (Fig. P)",
                       "fine-tuning step", "accuracy",
                       [(lbl, [curves(r[f"history_{g}"], "seen_eval/acc") for r in rs])
                        for lbl, g, rs in (("rare seen (fine-tuned on)", "old_rest", rare_runs),
                                           ("celebrities (not drawn)", "old_celeb", rare_runs),
                                           (f"rare seen, fine-tuning on {replay_n} new", "old_rest", celeb_runs))])]
    measured = (f"old-knowledge loss reached half-way to the baseline after "
                f"{[_pm(r, 't_forget', 0) for r in base_rows]} fine-tuning steps for new = {n_news}; new accuracy "
                f"at step 100: "
                f"{[_pm(r, 'new_acc_at_100') for r in base_rows]}; final old accuracy with replay "
                f"w = {[0.0] + [w for w in replays if w > 0]}: {[_pm(r, 'old_acc_end') for r in rep_rows]}; peak "
                f"old loss in the first 100 steps {[_pm(r, 'old_loss_peak_100', 2) for r in rep_rows]}; after "
                f"celebrity pre-training ({n_celeb} at weight {celeb_w:g}), fine-tuning on the {n - n_celeb} rare "
                f"seen: their accuracy {_pm(rare, 'old_rest_acc_start')} → {_pm(rare, 'old_rest_acc_end')} (loss rise "
                f"in the first 100 steps {_pm(rare, 'old_rest_loss_rise_100', 2)}, against "
                f"{_pm(celeb, 'old_rest_loss_rise_100', 2)} when fine-tuning on {replay_n} new), celebrities (not "
                f"drawn) {_pm(rare, 'old_celeb_acc_start')} → {_pm(rare, 'old_celeb_acc_end')}; fine-tuning on "
                f"{replay_n} new: celebrities {_pm(celeb, 'old_celeb_acc_start')} → {_pm(celeb, 'old_celeb_acc_end')} "
                f"(loss rise {_pm(celeb, 'old_celeb_loss_rise', 2)}), others {_pm(celeb, 'old_rest_acc_start')} → "
                f"{_pm(celeb, 'old_rest_acc_end')} (loss rise {_pm(celeb, 'old_rest_loss_rise', 2)})")
    celeb_table = [{"fine-tuning on": label, **row} for (label, _, _), row in zip(celeb_variants, (celeb, rare))]
    res = {"baseline": _baselines(pre), "table": table, "forget_fast": forget_fast, "drop_grows_with_new": grows,
           "replay_improves_final": final_better, "replay_leaves_initial_spike": spike_same,
           "celebrities": {"n_celebrities": n_celeb, "celebrity_weight": celeb_w, "n_new": replay_n,
                           "summary": celeb, "per_seed": celeb_rows,
                           "runs": [{"seed": s, **{f"history_{g}": r[f"history_{g}"]
                                                   for g in ("old_celeb", "old_rest", "new")}}
                                    for s, r in zip(seeds, celeb_runs)]},
           "rare_seen": {"n_celebrities": n_celeb, "celebrity_weight": celeb_w, "n_finetuned": n - n_celeb,
                         "summary": rare, "per_seed": rare_rows,
                         "runs": [{"seed": s, **{f"history_{g}": r[f"history_{g}"] for g in ("old_celeb", "old_rest")}}
                                  for s, r in zip(seeds, rare_runs)]},
           "speed": _speed(list(pre_all) + list(all_runs), wall),
           "runs": [{"variant": lbl, "history_old": r["history_old"], "history_new": r["history_new"]}
                    for (lbl, _, _), r in zip([v for v in variants for _ in seeds], runs)]}
    write_report(out, "fine-tuning on new individuals", "Fine-tuning on new individuals makes the loss on "
                 "pre-training knowledge jump toward the baseline within about 100 steps, long before new "
                 "knowledge is learned; the drop grows with the number of new individuals; replaying old "
                 "individuals improves the final level but not the initial drop (Fig. 5 middle/right, Fig. N). "
                 "Fine-tuning on individuals seen in pre-training but rarely (the non-celebrities of a celebrity "
                 "pre-training) instead raises their accuracy, about 50% → 70%, without the collapse (Fig. P). Our "
                 "control: after the same pre-training, celebrities keep their knowledge better than the others "
                 "when fine-tuning on new individuals.",
                 measured, checks, table, plots, res, _cmd("finetune", seeds, out, quick),
                 extra_tables=[(f"after celebrity pre-training ({n_celeb} at weight {celeb_w:g}): old celebrities "
                                "and old others during fine-tuning", celeb_table)])
    return res


# ---- the toy associative memory ----------------------------------------------------------------------------

def _memory_worker(cfg: MemoryConfig) -> dict[str, Any]:
    import torch
    torch.set_num_threads(1)
    return run_memory(cfg)


def memory(seeds: Sequence[int], out: Path, quick: bool = False, workers: int | None = None) -> dict[str, Any]:
    replays = [0.0, 0.125, 1.0]
    kw = dict(pretrain_steps=4000, finetune_steps=1000) if quick else {}
    cfgs = [MemoryConfig(seed=s, replay_weight=w, **kw) for w in replays for s in seeds]
    t0 = time.perf_counter()
    runs = process_map(_memory_worker, cfgs, max(1, min(workers or 2, len(cfgs))))
    wall = time.perf_counter() - t0
    table = []
    groups = _groups(runs, len(seeds))
    for w, rs in zip(replays, groups):
        rows = []
        for r in rs:
            ft = [h for h in r["history"] if h["phase"] == "finetune"]
            start = ft[0]["old_acc"]
            t_half = next((h["step"] for h in ft if h["old_acc"] <= start / 2), None)
            t_new = next((h["step"] for h in ft if h["new_acc"] >= 0.5), None)
            rows.append({"old_acc_pre": start, "old_acc_end": ft[-1]["old_acc"], "new_acc_end": ft[-1]["new_acc"],
                         "t_old_half": t_half, "t_new_half": t_new,
                         "old_acc_at_100": next((h["old_acc"] for h in ft if h["step"] >= 100), ft[-1]["old_acc"])})
        ends = [[h for h in r["history"] if h["phase"] == "finetune"][-1]["step"] for r in rs]
        table.append({"replay_w": w, **_agg(rows, {"t_old_half": ends, "t_new_half": ends})})
    t0r = table[0]
    checks = {"old_forgotten_before_new_learned": _earlier(t0r, "t_old_half", "t_new_half"),
              "replay_keeps_more_old": bool(table[-1]["old_acc_end"] > t0r["old_acc_end"])}
    hist_curves = []

    def ft(r: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [h for h in r["history"] if h["phase"] == "finetune"]
        return np.array([h["step"] for h in rows], float), np.array([h[key] for h in rows])
    for w, rs in zip(replays, groups):
        hist_curves.append((f"old, replay w={w:g}", [ft(r, "old_acc") for r in rs]))
        hist_curves.append((f"new, replay w={w:g}", [ft(r, "new_acc") for r in rs]))
    plots = [line_plot(out / "memory_finetune.png", "toy MLP memory during fine-tuning (Figs. Q–R)",
                       "fine-tuning step", "accuracy", hist_curves)]
    measured = (f"without replay, old accuracy {_pm(t0r, 'old_acc_pre')} → {_pm(t0r, 'old_acc_at_100')} at step 100, "
                f"half of it after {_pm(t0r, 't_old_half', 0)} steps, new pairs reach 50% after "
                f"{_pm(t0r, 't_new_half', 0)} steps; final old accuracy with replay w = {replays}: "
                f"{[_pm(r, 'old_acc_end') for r in table]}")
    res = {"table": table, "speed": {"wall_s": wall}, "runs": runs}
    write_report(out, "toy associative memory", "A one-hidden-layer MLP storing random key→class pairs shows the "
                 "same fine-tuning pattern as the language model: old pairs are forgotten fast, new ones learned "
                 "slowly, replay keeps more old pairs (App. F.4, Figs. Q–R).", measured, checks, table, plots, res,
                 _cmd("memory", seeds, out, quick))
    return res


# ---- attention patching ------------------------------------------------------------------------------------

def patching(seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None) -> dict[str, Any]:
    scale = scale or Scale.default(quick)
    # reference checkpoints: init, phase 1, around t1, the plateau, around t*, the end (calibrated run: t1 ≈ 35%,
    # t* ≈ 55% of a 2000-step budget)
    fractions = (0, 0.05, 0.5, 1.0) if quick else (0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0)
    grid = sorted({int(scale.steps * f) for f in fractions})
    t0 = time.perf_counter()
    # Per seed, one reference run; its patched runs share its initialisation and data order (the paper patches
    # one seed; several seeds here give mean ± std, and every sub-claim must hold in each seed)
    refs = run_many([(scale.run(s, snapshot_steps=tuple(grid)), out / "reference" / f"seed-{s}") for s in seeds],
                    workers=scale.workers)
    jobs = [(scale.run(s, patch_from=ref["snapshots"][str(g)], probes=False), out / "runs" / f"seed-{s}-ref-{g}")
            for s, ref in zip(seeds, refs) for g in grid]
    runs = run_many(jobs, workers=scale.workers)
    wall = time.perf_counter() - t0
    per_seed = []
    for s, ref, rs in zip(seeds, refs, _groups(runs, len(grid))):
        p = ref["plateau"]
        t_star = {g: r["plateau"]["t_star"] for g, r in zip(grid, rs)}
        late = [g for g in grid if p["t_star"] is not None and g > p["t_star"]]
        phase1 = [g for g in grid if 0 < g < (p["t1"] or 0)]
        after = [g for g in grid if p["t1"] is not None and g >= p["t1"]]
        key = {g: math.inf if t is None else t for g, t in t_star.items()}  # never left the plateau: last
        per_seed.append({"seed": s, "t1": p["t1"], "t_star": p["t_star"], "t_star_patched": t_star,
                         "removed": all(t_star[g] is not None and t_star[g] <= (p["t1"] or 0) for g in late)
                         if late else None,
                         "phase1_worse": [key[g] > key[0] for g in phase1],
                         "monotone_after_t1": all(key[a] >= key[b] for a, b in zip(after, after[1:]))
                         if len(after) > 1 else None})
    def summary_row(step: int | str, rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"reference_step": step,
                **_agg([{"t_star": r["plateau"]["t_star"], "t1": r["plateau"]["t1"],
                         "final_loss": _final(r, "seen_eval/loss"), "final_acc": _final(r, "seen_eval/acc")}
                        for r in rs], {"t_star": [_last_step(r["history"]) for r in rs]})}
    # runs[i::len(grid)]: reference step grid[i], one run per seed
    table = [summary_row("none (plain run)", refs)] + [summary_row(g, runs[i::len(grid)]) for i, g in enumerate(grid)]
    removed = [x["removed"] for x in per_seed if x["removed"] is not None]
    monotone = [x["monotone_after_t1"] for x in per_seed if x["monotone_after_t1"] is not None]
    worse = [w for x in per_seed for w in x["phase1_worse"]]
    checks = {"post_plateau_reference_removes_plateau": all(removed) if removed else None,
              "later_references_never_slower": all(monotone) if monotone else None,
              "phase1_references_worse_than_init": all(worse) if worse else None}
    t1s, tss = [x["t1"] for x in per_seed], [x["t_star"] for x in per_seed]
    plots = [line_plot(out / "patching_loss.png", "training with a reference's attention (Fig. 3)", "step", "nats",
                       [("plain", [curves(r["history"], "seen_eval/loss") for r in refs])] +
                       [(f"ref step {g}", [curves(r["history"], "seen_eval/loss") for r in runs[i::len(grid)]])
                        for i, g in enumerate(grid)],
                       hlines=_baseline_line(refs)),
             line_plot(out / "value_name_attention.png", "value→name attention of the reference runs", "step",
                       "mass", [(f"layer {i}", [curves(r["history"], f"att_value_name_L{i}") for r in refs])
                                for i in range(scale.n_layer)],
                       vlines=[("t1 (mean)", _mean(t1s) or 0), ("t* (mean)", _mean(tss) or 0)])]
    by_ref = ", ".join(f"{row['reference_step']}: {_pm(row, 't_star', 0)}" for row in table[1:])
    measured = (f"reference runs: t1 {_pm(table[0], 't1', 0)}, t* {_pm(table[0], 't_star', 0)}; t* of patched runs "
                f"by reference step: {by_ref}"
                f" (seeds {list(seeds)}; per seed {[x['t_star_patched'] for x in per_seed]}); post-plateau references "
                f"remove the plateau: {[x['removed'] for x in per_seed]}; phase-1 references worse than step 0: "
                f"{[x['phase1_worse'] for x in per_seed]}; later references (after t1) never slower: "
                f"{[x['monotone_after_t1'] for x in per_seed]}")
    res = {"per_seed": per_seed, "table": table, "speed": _speed(list(refs) + list(runs), wall),
           "references": [{"seed": s, "plateau": r["plateau"], "history": r["history"]} for s, r in zip(seeds, refs)],
           "runs": [{"seed": s, "reference_step": g, "history": r["history"]}
                    for (s, g), r in zip([(s, g) for s in seeds for g in grid], runs)]}
    write_report(out, "attention patching", "Training with attention patterns from later reference checkpoints "
                 "shortens the plateau, and post-plateau patterns remove it; patterns from early phase-1 "
                 "checkpoints are worse than untrained ones (Fig. 3). Checked in every seed.", measured, checks, table,
                 plots, res, _cmd("patching", seeds, out, quick))
    return res


# ---- ablation: fixed order, single template -----------------------------------------------------------------

def ablation(seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None) -> dict[str, Any]:
    scale = scale or Scale.default(quick)
    variants = [("shuffled, 20 templates", {}), ("fixed order", {"shuffle": False}),
                ("single template", {"n_train_templates": 1})]
    jobs = [(scale.run(s, probes=False, **kw), out / "runs" / f"v{i}-seed-{s}")
            for i, (_, kw) in enumerate(variants) for s in seeds]
    t0 = time.perf_counter()
    runs = run_many(jobs, workers=scale.workers)
    wall = time.perf_counter() - t0
    table = []
    groups = _groups(runs, len(seeds))
    for (label, _), rs in zip(variants, groups):
        table.append({"variant": label, **_agg([{"acc_train_templates": _final(r, "seen_train/acc"),
                                                  "acc_heldout_templates": _final(r, "seen_eval/acc"),
                                                  "loss_heldout": _final(r, "seen_eval/loss")} for r in rs])})
    gap = [row["acc_train_templates"] - row["acc_heldout_templates"] for row in table]
    checks = {"fixed_order_opens_gap": bool(gap[1] > gap[0] + 0.1),
              "single_template_opens_gap": bool(gap[2] > gap[0] + 0.1)}
    series = [(label, [curves(r["history"], "seen_eval/acc") for r in rs]) for (label, _), rs in zip(variants, groups)]
    series += [(f"{label} (train templates)", [curves(r["history"], "seen_train/acc") for r in rs])
               for (label, _), rs in list(zip(variants, groups))[1:]]
    plots = [line_plot(out / "ablation.png", "held-out template accuracy (Fig. A)", "step", "accuracy", series)]
    measured = "; ".join(f"{row['variant']}: train-template acc {_pm(row, 'acc_train_templates')}, held-out "
                         f"{_pm(row, 'acc_heldout_templates')}" for row in table)
    res = {"table": table, "speed": _speed(runs, wall), "runs": [_lean(r) for r in runs]}
    write_report(out, "order and template ablation", "Random sentence order and template diversity are essential: "
                 "with a fixed order or a single template the model fits training templates but held-out-template "
                 "accuracy stays near zero (Fig. A). Checked here: each ablation (separately) opens a train/held-out "
                 "gap at least 0.1 wider than the default's.", measured, checks, table, plots, res,
                 _cmd("ablation", seeds, out, quick))
    return res


# ---- everything --------------------------------------------------------------------------------------------

def run_experiment(name: str, seeds: Sequence[int], out: Path, quick: bool = False,
                   workers: int | None = None) -> dict[str, Any]:
    """One experiment by name ('all' runs each into out/<name>/, sharing the phase runs with hallucination)."""
    out = Path(out)
    if name not in EXPERIMENTS and name != "all":
        raise ValueError(f"experiment ({name!r}) must be one of {', '.join(EXPERIMENTS)}, all")
    scale = Scale.default(quick, workers)
    if name == "memory":
        return memory(seeds, out, quick, workers)
    single = {"phases": phases, "hallucination": hallucination, "plateau": plateau, "alpha": alpha,
              "warmup": warmup, "finetune": finetune, "patching": patching, "ablation": ablation}
    if name != "all":
        return single[name](seeds, out, quick, scale)
    results = {}
    t0 = time.perf_counter()
    runs, wall = _phase_runs(seeds, out / "phases", scale)
    results["phases"] = phases(seeds, out / "phases", quick, scale, runs, wall)
    results["hallucination"] = hallucination(seeds, out / "hallucination", quick, scale, runs, wall)
    for exp in EXPERIMENTS:
        if exp not in results:
            results[exp] = run_experiment(exp, seeds, out / exp, quick, workers)
    results["wall_s"] = time.perf_counter() - t0
    return results
