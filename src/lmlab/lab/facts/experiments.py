"""The experiments of Zucchet et al. 2025 at CPU scale, each writing results.json, PNGs and report.html.

    lmlab lab facts phases --seeds 0,1,2 --out runs/facts/phases     # ~5 min on 2 cores
    lmlab lab facts all --quick --out runs/facts                      # every experiment, reduced sizes

Sizes are this lab's CPU scale (its README), calibrated on the 2-core machine: a gpt2-family model with
3 layers, d=64, 4 heads (~150k non-embedding parameters), batch 32, a word tokenizer (~600 tokens), N=1000
individuals. Budgets are counted in steps; exposures per individual are steps * batch / N.

Each experiment is an `Experiment`: its verb, its report's title, the paper's claim it tests, and one function,
its specific part, which trains its runs (`Setup.train`: parallel processes, timed), folds the seeds into
mean ± sample std with censored times (`_agg`, `_table`), checks the claim, plots, and returns its `Findings`.
Calling the Experiment does the rest (the default scale, results.json, report.html). A new experiment is such a
function, its `Experiment(...)` and its entry in `BY_NAME`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...configs import knob, validate
from ..parallel import process_map
from .data import BioConfig
from .memory import MemoryConfig, run_memory
from .metrics import curves
from .report import line_plot, pm, write_report
from .runner import RunConfig, run_many


@dataclass
class Scale:
    """The CPU-scale sizes shared by the experiments; `quick` shrinks the budgets (minutes, not tens)."""

    n_individuals: int = knob(1000, "individuals in the population", gt=0)
    steps: int = knob(2000, "optimizer steps of a run", gt=0)
    eval_every: int = knob(50, "evaluate every N steps", gt=0)
    # calibrated: N=1000 reaches 93% held-out in 3000 steps; 1e-2 and 2e-3 learn far less
    lr: float = knob(5e-3, "peak learning rate", gt=0)
    batch_size: int = knob(32, "biographies per step", gt=0)
    n_layer: int = knob(3, "transformer blocks", gt=0)
    n_embd: int = knob(64, "model width", gt=0)
    n_head: int = knob(4, "attention heads", gt=0)
    workers: int | None = knob(None, "processes (default: one per CPU core, and all seeds of a small job at once)",
                               gt=0)

    def __post_init__(self) -> None:
        validate(self)

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


# ---- the shared part: train, fold seeds, check, plot, report -----------------------------------------------

@dataclass
class Findings:
    """What an experiment makes of its runs: what it measured, its sub-claims of the paper's claim (None where not
    measurable), its table (means over seeds: `_agg`, `_table`), plots, its own results.json keys, and (caption,
    rows) tables to show after the main one."""

    measured: str
    checks: dict[str, bool | None]
    table: Sequence[dict[str, Any]]
    plots: Sequence[Path]
    results: dict[str, Any]
    extra_tables: Sequence[tuple[str, Sequence[dict[str, Any]]]] = ()


@dataclass
class Setup:
    """An experiment as asked for (seeds, folder, --quick, sizes, its own options) and the time its training took."""

    seeds: list[int]
    out: Path
    quick: bool
    scale: Scale
    options: dict[str, Any] = field(default_factory=dict)
    wall: float = 0.0

    def train(self, jobs: Sequence[Any], workers: int | None = None,
              worker: Callable[[Any], Any] | None = None) -> list[Any]:
        """The jobs' results in job order, from parallel processes: the Trainer's runs (`run_many`; `workers`
        defaults to --workers, then one per core), or `worker(job)` (`process_map`). The time adds to `wall`."""
        t0 = time.perf_counter()
        runs = run_many(jobs, workers or self.scale.workers) if worker is None else process_map(worker, jobs, workers)
        self.wall += time.perf_counter() - t0
        return runs

    def groups(self, runs: Sequence[Any]) -> list[list[Any]]:
        """Runs trained variant by variant, a run per seed, split back per variant."""
        return _groups(runs, len(self.seeds))


@dataclass(frozen=True)
class Experiment:
    """One experiment: the title of its report, the paper's claim it tests, and `conduct`, its specific part (its
    runs, through `Setup.train`; their statistics, through `_agg` or `_table`; checks; plots). Calling it does the
    rest: the default scale, results.json and report.html. `options` are the keyword arguments it takes besides
    seeds, out, quick and scale (plateau's `sizes`, say); `conduct` reads them from `setup.options`."""

    name: str
    title: str
    claim: str
    conduct: Callable[[Setup], Findings]
    options: tuple[str, ...] = ()

    def __call__(self, seeds: Sequence[int], out: Path, quick: bool = False, scale: Scale | None = None,
                 **options: Any) -> dict[str, Any]:
        """The results as in results.json: the experiment's own keys, and holds, verdict, checks and measured."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"{self.name}() got unexpected keyword arguments {unknown}")
        setup = Setup(list(seeds), Path(out), quick, scale or Scale.default(quick), options)
        f = self.conduct(setup)
        write_report(setup.out, self.title, self.claim, f.measured, f.checks, f.table, f.plots, f.results,
                     _cmd(self.name, setup.seeds, setup.out, quick), f.extra_tables)
        return f.results


def _table(heads: Sequence[dict[str, Any]], groups: Sequence[Sequence[dict[str, Any]]],
           row: Callable[[dict[str, Any]], dict[str, Any]], censor: Sequence[str] = (),
           history: str = "history") -> list[dict[str, Any]]:
    """A table row per variant: its `head` (label columns), then `_agg` of `row(run)` over its seeds; the keys in
    `censor` are times, censored at each run's last evaluated step (of `history`)."""
    return [{**head, **_agg([row(r) for r in rs], {k: [_last_step(r[history]) for r in rs] for k in censor})}
            for head, rs in zip(heads, groups)]


def _plateau_bounds(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The censoring bounds (`_agg`) of t* and of the plateau length t* - t1 (none where t1 is missing)."""
    ends = [_last_step(r["history"]) for r in runs]
    return {"t_star": ends, "plateau_len": [None if x["t1"] is None else e - x["t1"] for x, e in zip(rows, ends)]}


def _curves(runs: Sequence[dict[str, Any]], key: str, history: str = "history") -> list[tuple[np.ndarray, np.ndarray]]:
    """A plot series' per-seed curves: each run's `key` over its evaluations."""
    return [curves(r[history], key) for r in runs]


def _variant_runs(setup: Setup, variants: Sequence[tuple[str, dict[str, Any]]], **common: Any
                  ) -> list[dict[str, Any]]:
    """Each (label, RunConfig settings) variant trained with every seed, variant by variant, without probes."""
    return setup.train([(setup.scale.run(s, probes=False, **common, **kw), setup.out / "runs" / f"v{i}-seed-{s}")
                        for i, (_, kw) in enumerate(variants) for s in setup.seeds])


# ---- three phases + hallucination (one set of runs) -------------------------------------------------------

def _phase_runs(setup: Setup) -> list[dict[str, Any]]:
    """Trained here, or given with the time they took (options `runs`, `wall`: `all` trains them once for both)."""
    if setup.options.get("runs") is not None:
        setup.wall = setup.options.get("wall") or 0.0
        return setup.options["runs"]
    # 3 seeds on 2 cores: all at once packs best
    return setup.train([(setup.scale.run(s), setup.out / "runs" / f"seed-{s}") for s in setup.seeds],
                       setup.scale.workers or len(setup.seeds))


def _phases(setup: Setup) -> Findings:
    runs, out, interval = _phase_runs(setup), setup.out, setup.scale.eval_every
    per_seed = []
    for s, r in zip(setup.seeds, runs):
        h, p, base = r["history"], r["plateau"], r["baseline"]
        at = {row["step"]: row for row in h}
        acc_t1 = at[p["t1"]]["seen_eval/acc"] if p["t1"] is not None else None
        plateau_rows = [row for row in h if p["t1"] is not None and p["t1"] <= row["step"] < (p["t_star"] or 1e18)]
        # A plateau, not a crossing: steps spent within 0.1 nats of the baseline, and the mean gap over [t1, t*)
        dwell = sum(abs(row["seen_eval/loss"] - base) <= 0.1 for row in h[1:]) * interval
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
                                         and x["t_star"] - x["t1"] >= 4 * interval
                                         and x["plateau_mean_gap"] is not None and abs(x["plateau_mean_gap"]) <= 0.1
                                         and x["plateau_mean_acc"] is not None and x["plateau_mean_acc"] < 0.1
                                         for x in per_seed),
              "knowledge_emerges": all(x["final_acc_heldout"] > 0.3 for x in per_seed)}
    plots = [
        line_plot(out / "loss.png", "attribute loss (Fig. 2 left)", "step", "nats per attribute",
                  [(k, _curves(runs, f"{k}/loss")) for k in ("seen_eval", "seen_train", "unseen")],
                  hlines=_baseline_line(runs)),
        line_plot(out / "accuracy.png", "attribute accuracy (Fig. 2 middle)", "step", "accuracy",
                  [(k, _curves(runs, f"{k}/acc")) for k in ("seen_eval", "seen_train")]),
        line_plot(out / "probes.png", "attention from value position to name tokens", "step", "attention mass",
                  [(f"layer {i}", _curves(runs, f"att_value_name_L{i}")) for i in range(setup.scale.n_layer)]),
        line_plot(out / "drift.png", "token embedding drift between evaluations", "step", "relative change",
                  [(g, _curves(runs, f"drift_{g}")) for g in ("name", "value", "template")], logy=True),
    ]
    agg = _agg(per_seed, _plateau_bounds(per_seed, runs))
    base = _baselines(runs)
    measured = (f"baseline {_n(float(np.mean(base)))} nats (each seed's own: {[round(b, 3) for b in base]}); mean "
                f"gap to it on the plateau {_pm(agg, 'plateau_mean_gap')} nats; "
                f"steps within 0.1 nats of it {[x['steps_within_0.1_of_baseline'] for x in per_seed]}; t1 = "
                f"{_pm(agg, 't1', 0)}, t* = {_pm(agg, 't_star', 0)} steps; plateau accuracy "
                f"{_pm(agg, 'plateau_mean_acc')}; final held-out accuracy {_pm(agg, 'final_acc_heldout')}")
    return Findings(measured, checks, per_seed, plots,
                    {"scale": dataclasses.asdict(setup.scale), "baseline": base, "per_seed": per_seed, "summary": agg,
                     "speed": _speed(runs, setup.wall), "runs": [_lean(r) for r in runs]})


def _hallucination(setup: Setup) -> Findings:
    runs, out, interval = _phase_runs(setup), setup.out, setup.scale.eval_every
    per_seed = []
    for s, r in zip(setup.seeds, runs):
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
                  [("unseen", _curves(runs, "unseen/loss")),
                   ("seen (held-out templates)", _curves(runs, "seen_eval/loss"))],
                  hlines=_baseline_line(runs)),
        line_plot(out / "confidence.png", "max probability at value tokens (Fig. M)", "step", "max prob",
                  [("unseen", _curves(runs, "unseen/max_prob")), ("seen", _curves(runs, "seen_eval/max_prob"))]),
        line_plot(out / "entropy.png", "predictive entropy at value tokens (Fig. M)", "step", "nats",
                  [("unseen", _curves(runs, "unseen/entropy")), ("seen", _curves(runs, "seen_eval/entropy"))]),
    ]
    agg = _agg(per_seed, {k: [_last_step(r["history"]) for r in runs] for k in ("t_star", "onset")})
    measured = (f"t* {_pm(agg, 't_star', 0)}; unseen loss − baseline on the plateau "
                f"{_pm(agg, 'unseen_plateau_above_baseline')}, at the end {_pm(agg, 'unseen_final_above_baseline')} "
                f"nats; onset − t* = {_pm(agg, 'onset_minus_t_star', 0)} (per seed "
                f"{[x['onset_minus_t_star'] for x in per_seed]}) steps (eval interval {interval}); final max prob "
                f"unseen {_pm(agg, 'max_prob_unseen')} vs seen {_pm(agg, 'max_prob_seen')}; entropy unseen "
                f"{_pm(agg, 'entropy_unseen')} vs seen {_pm(agg, 'entropy_seen')}")
    return Findings(measured, checks, per_seed, plots, {"baseline": _baselines(runs), "per_seed": per_seed,
                                                        "summary": agg, "speed": _speed(runs, setup.wall)})


# ---- plateau length against N ----------------------------------------------------------------------------

def loglog_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """y = a * x^b by least squares on logs; returns a, b and R²."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    b, la = np.polyfit(lx, ly, 1)
    pred = la + b * lx
    r2 = 1 - ((ly - pred) ** 2).sum() / max(((ly - ly.mean()) ** 2).sum(), 1e-300)
    return {"a": float(math.exp(la)), "b": float(b), "r2": float(r2)}


def _plateau(setup: Setup) -> Findings:
    scale, batch = setup.scale, setup.scale.batch_size
    sizes = list(setup.options.get("sizes") or ((250, 500, 1000) if setup.quick else (250, 500, 1000, 2000)))
    jobs = []
    for n in sizes:
        for s in setup.seeds:
            # enough budget to pass the plateau (≈ 8 exposures per individual at t* in calibration, plus
            # phase 1); stop once held-out accuracy passes 30% (protocol E2)
            steps = max(scale.steps // 2, int(1.5 * scale.steps * n / scale.n_individuals))
            jobs.append((scale.run(s, steps=steps, n=n, stop_at_acc=0.3, probes=False,
                                   eval_every=max(10, min(50, n // (4 * scale.batch_size) * 10 or 10))),
                         setup.out / "runs" / f"n{n}-seed-{s}"))
    runs = setup.train(jobs)
    groups = setup.groups(runs)
    table = []
    for n, rs in zip(sizes, groups):
        rows = [{"t_star": p["t_star"], "t1": p["t1"], "plateau_len": p["plateau_len"],
                 "exposures_at_t_star": None if p["t_star"] is None else p["t_star"] * batch / n}
                for p in (r["plateau"] for r in rs)]
        bounds = _plateau_bounds(rows, rs)
        bounds["exposures_at_t_star"] = [e * batch / n for e in bounds["t_star"]]
        table.append({"N": n, **_agg(rows, bounds)})
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
    for i, seed in enumerate(setup.seeds):
        pts = [(n, rs[i]["plateau"]["t_star"]) for n, rs in zip(sizes, groups) if n in {row["N"] for row in good}]
        if len(pts) >= 2:
            per_seed[seed] = loglog_fit(*zip(*pts))
    slopes = [f["b"] for f in per_seed.values()]
    checks = {"slope_in_0.6_1.0": None if fit is None else bool(0.6 <= fit["b"] <= 1.0),
              "t_star_rises_with_N": None if fit is None else bool(rising)}
    plots = [line_plot(setup.out / "plateau_vs_n.png", "plateau end against N (Fig. 2 right)", "N individuals", "steps",
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
                          f"{len(setup.seeds)} seeds still on the plateau at the end of the run" for r in censored))
    grid = [(n, s) for n in sizes for s in setup.seeds]
    return Findings(measured, checks, table, plots, {
        "fit_t_star": fit, "fit_t_star_per_seed": {str(k): v for k, v in per_seed.items()}, "fit_plateau_len": fit_len,
        "fit_sizes": [r["N"] for r in good], "table": table, "speed": _speed(runs, setup.wall),
        "runs": [{"N": n, "seed": s, "plateau": r["plateau"], "steps": r["steps"], "history": r["history"]}
                 for (n, s), r in zip(grid, runs)]})


# ---- data distribution: alpha sweep and warm-up ------------------------------------------------------------

def _alpha(setup: Setup) -> Findings:
    alphas = list(setup.options.get("alphas") or ((0.0, 0.4, 0.8, 1.0) if setup.quick
                                                  else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)))
    runs = setup.train([(setup.scale.run(s, sampling="power_law", alpha=a, probes=False),
                         setup.out / "runs" / f"alpha{a}-seed-{s}") for a in alphas for s in setup.seeds])
    groups, out = setup.groups(runs), setup.out
    table = _table([{"alpha": a} for a in alphas], groups, lambda r: {
        "t_star": r["plateau"]["t_star"], "final_loss": _final(r, "seen_eval/loss"),
        "final_acc": _final(r, "seen_eval/acc")}, censor=("t_star",))
    for row, rs in zip(table, groups):
        row["top_individual_share"] = rs[0]["data"]["top_individual_share"]
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
                f"(N = {setup.scale.n_individuals}, {setup.scale.steps} steps)")
    return Findings(measured, checks, table, plots, {
        "best_alpha_plateau": best_plateau, "best_alpha_final_loss": best_loss, "table": table,
        "speed": _speed(runs, setup.wall), "runs": [_lean(r) for r in runs]})


def _warmup(setup: Setup) -> Findings:
    scale, best_alpha = setup.scale, setup.options.get("best_alpha", 0.6)
    # A short budget is where curricula matter (the paper's gain is largest when the budget is tight).
    steps = int(scale.steps * (0.5 if setup.quick else 0.7))
    n = scale.n_individuals
    epoch = n // scale.batch_size  # the paper's epoch: N_total / batch steps
    variants: list[tuple[str, dict[str, Any]]] = [("uniform", {}), (f"power law α={best_alpha}",
                                                                   {"sampling": "power_law", "alpha": best_alpha})]
    grid = [(n // 8, 4), (n // 4, 4)] if setup.quick else [(n // 8, 2), (n // 8, 4), (n // 4, 4), (n // 4, 8)]
    for k, e in grid:
        variants.append((f"warm-up {k} for {e} epochs", {"warmup_individuals": k, "warmup_steps": e * epoch}))
    runs = _variant_runs(setup, variants, steps=steps)
    groups = setup.groups(runs)
    table = _table([{"variant": label} for label, _ in variants], groups, lambda r: {
        "final_acc_all_N": _final(r, "seen_eval/acc"), "final_loss": _final(r, "seen_eval/loss"),
        "t_star": r["plateau"]["t_star"]}, censor=("t_star",))
    uni, pl = table[0]["final_acc_all_N"], table[1]["final_acc_all_N"]
    best_w = max(table[2:], key=lambda r: r["final_acc_all_N"])
    checks = {"power_law_beats_uniform": bool(pl > uni),
              "warmup_beats_power_law": bool(best_w["final_acc_all_N"] > pl)}
    plots = [line_plot(setup.out / "warmup_acc.png", "held-out accuracy over all N (Fig. 4 right)", "step", "accuracy",
                       [(label, _curves(rs, "seen_eval/acc")) for (label, _), rs in zip(variants, groups)])]
    measured = (f"final accuracy over all {setup.scale.n_individuals}: uniform {_pm(table[0], 'final_acc_all_N')}, "
                f"power law {_pm(table[1], 'final_acc_all_N')}, best warm-up ({best_w['variant']}) "
                f"{_pm(best_w, 'final_acc_all_N')} after {steps} steps")
    return Findings(measured, checks, table, plots, {"table": table, "steps": steps, "speed": _speed(runs, setup.wall),
                                                     "runs": [_lean(r) for r in runs]})


# ---- fine-tuning on new individuals ------------------------------------------------------------------------

def _forgetting(r: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuning run's old and new individuals: how fast the old are forgotten, how fast the new learned."""
    old, new = r["history_old"], r["history_new"]
    start, base = old[0]["seen_eval/loss"], old[0]["baseline"]  # this seed's population's baseline
    half = start + 0.5 * (base - start)  # forgetting: half-way from the pre-trained loss to the baseline
    return {"t_forget": next((row["step"] for row in old if row["seen_eval/loss"] >= half), None),
            "old_acc_start": old[0]["seen_eval/acc"], "old_loss_start": start, "old_acc_end": old[-1]["seen_eval/acc"],
            "old_loss_peak_100": max(row["seen_eval/loss"] for row in old if row["step"] <= 100),
            "old_loss_end": old[-1]["seen_eval/loss"], "new_acc_end": new[-1]["seen_eval/acc"],
            "new_acc_at_100": next((row["seen_eval/acc"] for row in new if row["step"] >= 100),
                                   new[-1]["seen_eval/acc"])}


def _celebrity_groups(r: dict[str, Any]) -> dict[str, Any]:
    """Fig. P: per group, how much of its pre-trained accuracy it keeps and how far its loss rises (at the end,
    and at most in the first 100 steps)."""
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


def _finetune(setup: Setup) -> Findings:
    scale, seeds, out = setup.scale, setup.seeds, setup.out
    n = scale.n_individuals
    pre_steps = scale.steps if setup.quick else scale.steps * 3 // 2
    ft_steps = scale.steps // (4 if setup.quick else 2)
    # Fig. P: the same pre-training with the first n/16 individuals ("celebrities") drawn 8 times more often (the
    # paper's 8k of 128k at weight 8), so the other 15/16 are seen but rare; then fine-tuning on those rare seen
    # individuals (the paper's Fig. P: ~50% -> ~70%), and, as our control, the same fine-tuning on new
    # individuals as below, without replay
    n_celeb, celeb_w = n // 16, 8.0
    pre_jobs = [(scale.run(s, steps=pre_steps, probes=False, n_unseen=0), out / "pretrain" / f"seed-{s}")
                for s in seeds]
    pre_jobs += [(scale.run(s, steps=pre_steps, probes=False, n_unseen=0, sampling="celebrities",
                            n_celebrities=n_celeb, celebrity_weight=celeb_w), out / "pretrain" / f"celeb-seed-{s}")
                 for s in seeds]
    pre_all = setup.train(pre_jobs, scale.workers or len(pre_jobs))
    pre, pre_celeb = pre_all[: len(seeds)], pre_all[len(seeds):]
    n_news = [n // 16, n // 4] if setup.quick else [n // 64, n // 16, n // 4]
    replay_n = n // 16
    replays = [0.0, 0.125, 1.0] if setup.quick else [0.0, 1 / 32, 0.125, 0.5, 2.0]
    variants: list[tuple[str, int, float]] = [(f"new={k}", k, 0.0) for k in n_news]
    variants += [(f"new={replay_n} replay w={w:g}", replay_n, w) for w in replays if w > 0]
    # shared by every fine-tuning run: the first rows of the population are drawn with weight w each (0: not
    # drawn), the others with 1; the old rows [0, n) are evaluated as "old", any rows past them as "new"
    ft_kw: dict[str, Any] = dict(probes=False, n_unseen=0, lr=scale.lr / 13, schedule="constant", eval_every=10,
                                 split_old=n, n_eval=128)
    jobs = [(scale.run(s, steps=ft_steps, n=n + k, replay_individuals=n, replay_weight=w, init_from=p["final_weights"],
                       **ft_kw), out / "runs" / f"{label.replace(' ', '_')}-seed-{s}")
            for label, k, w in variants for s, p in zip(seeds, pre)]
    # after celebrity pre-training, old celebrities [0, c) and old others [c, n) are evaluated apart. (label,
    # population, rows not drawn): n/16 new individuals, old rows not drawn (the new=n/16 run above, pre-trained
    # differently); or no new individuals, celebrities not drawn: fine-tuning on the rare seen ones
    celeb_variants = [(f"{replay_n} new", n + replay_n, n), (f"{n - n_celeb} rare seen", n, n_celeb)]
    jobs += [(scale.run(s, steps=ft_steps, n=total, replay_individuals=skip, replay_weight=0.0,
                        init_from=p["final_weights"], split_celebrities=n_celeb, **ft_kw),
              out / "runs" / f"celebrities-{label.replace(' ', '_')}-seed-{s}")
             for label, total, skip in celeb_variants for s, p in zip(seeds, pre_celeb)]
    all_runs, split = setup.train(jobs), len(variants) * len(seeds)
    runs, groups = all_runs[:split], setup.groups(all_runs[:split])
    celeb_runs, rare_runs = setup.groups(all_runs[split:])
    table = _table([{"variant": label, "replay_share": 0.0 if w == 0 else w * n / (w * n + k)}
                    for label, k, w in variants], groups, _forgetting, ("t_forget",), history="history_old")
    base_rows = table[: len(n_news)]
    rep_rows = [table[n_news.index(replay_n)]] + table[len(n_news):]
    forget_fast = all(not r["t_forget_censored"] and r["t_forget"] <= 150 for r in base_rows)
    # more new individuals, more forgetting: lower final old accuracy (by > 0.01) or higher old loss (> 0.05)
    grows = all(a["old_acc_end"] > b["old_acc_end"] + 0.01 or b["old_loss_end"] > a["old_loss_end"] + 0.05
                for a, b in zip(base_rows, base_rows[1:]))
    # more replay, better final old accuracy: no step up in replay costs more than 0.02 (noise), and the most
    # replay ends above none by > 0.01 (as drop_grows_with_new): equal accuracies are no improvement
    final_better = bool(all(a["old_acc_end"] <= b["old_acc_end"] + 0.02 for a, b in zip(rep_rows, rep_rows[1:]))
                        and rep_rows[-1]["old_acc_end"] > rep_rows[0]["old_acc_end"] + 0.01) \
        if len(rep_rows) > 1 else None
    # replay leaves the initial drop: the rise of the old loss in the first 100 steps under the most replay is
    # at least half the rise without replay
    def rise(r: dict[str, Any]) -> float:
        return r["old_loss_peak_100"] - r["old_loss_start"]
    spike_same = bool(rise(rep_rows[-1]) >= 0.5 * rise(rep_rows[0])) if len(rep_rows) > 1 else None
    celeb_rows, rare_rows = ([{"seed": s, **_celebrity_groups(r)} for s, r in zip(seeds, rs)]
                             for rs in (celeb_runs, rare_runs))
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

    def by_variant(history: str, key: str) -> list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]]:
        return [(label, _curves(rs, key, history)) for (label, _, _), rs in zip(variants, groups)]
    plots = [line_plot(out / "old_loss.png", "old individuals during fine-tuning (Fig. 5 middle)", "fine-tuning step",
                       "nats", by_variant("history_old", "seen_eval/loss"), hlines=_baseline_line(pre)),
             line_plot(out / "new_acc.png", "new individuals during fine-tuning", "fine-tuning step", "accuracy",
                       by_variant("history_new", "seen_eval/acc")),
             line_plot(out / "old_acc.png", "old accuracy with replay (Fig. 5 right)", "fine-tuning step", "accuracy",
                       by_variant("history_old", "seen_eval/acc")),
             line_plot(out / "celebrities.png", f"{replay_n} new after {n_celeb} celebrities at weight "
                       f"{celeb_w:g}", "fine-tuning step", "accuracy",
                       [(lbl, _curves(celeb_runs, "seen_eval/acc", f"history_{g}"))
                        for lbl, g in (("old celebrities", "old_celeb"), ("old others", "old_rest"), ("new", "new"))]),
             line_plot(out / "rare_seen.png", f"fine-tuning on the {n - n_celeb} rare seen (Fig. P)",
                       "fine-tuning step", "accuracy",
                       [(lbl, _curves(rs, "seen_eval/acc", f"history_{g}"))
                        for lbl, g, rs in (("rare seen (fine-tuned on)", "old_rest", rare_runs),
                                           ("celebrities (not drawn)", "old_celeb", rare_runs),
                                           (f"rare seen, fine-tuning on {replay_n} new", "old_rest", celeb_runs))])]
    measured = (f"old-knowledge loss reached half-way to the baseline after "
                f"{[_pm(r, 't_forget', 0) for r in base_rows]} fine-tuning steps for new = {n_news}; new accuracy "
                f"at step 100: "
                f"{[_pm(r, 'new_acc_at_100') for r in base_rows]}; final old accuracy with replay "
                f"w = {[0.0] + [w for w in replays if w > 0]}: {[_pm(r, 'old_acc_end') for r in rep_rows]}; peak "
                f"old loss in the first 100 steps {[_pm(r, 'old_loss_peak_100', 2) for r in rep_rows]}; after "
                f"celebrity pre-training ({n_celeb} at weight {celeb_w:g}), fine-tuning on the {n - n_celeb} "
                f"rare seen: their accuracy {_pm(rare, 'old_rest_acc_start')} → {_pm(rare, 'old_rest_acc_end')} (loss "
                f"rise in the first 100 steps {_pm(rare, 'old_rest_loss_rise_100', 2)}, against "
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
           "speed": _speed(list(pre_all) + list(all_runs), setup.wall),
           "runs": [{"variant": label, "history_old": r["history_old"], "history_new": r["history_new"]}
                    for (label, _, _), r in zip([v for v in variants for _ in seeds], runs)]}
    return Findings(measured, checks, table, plots, res, [(f"after celebrity pre-training ({n_celeb} at weight "
                                                           f"{celeb_w:g}): old celebrities and old others during "
                                                           "fine-tuning", celeb_table)])


# ---- the toy associative memory ----------------------------------------------------------------------------

def _memory_worker(cfg: MemoryConfig) -> dict[str, Any]:
    import torch
    torch.set_num_threads(1)
    return run_memory(cfg)


def _finetuning(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [h for h in r["history"] if h["phase"] == "finetune"]


def _memory_row(r: dict[str, Any]) -> dict[str, Any]:
    ft = _finetuning(r)
    start = ft[0]["old_acc"]
    return {"old_acc_pre": start, "old_acc_end": ft[-1]["old_acc"], "new_acc_end": ft[-1]["new_acc"],
            "t_old_half": next((h["step"] for h in ft if h["old_acc"] <= start / 2), None),
            "t_new_half": next((h["step"] for h in ft if h["new_acc"] >= 0.5), None),
            "old_acc_at_100": next((h["old_acc"] for h in ft if h["step"] >= 100), ft[-1]["old_acc"])}


def _memory(setup: Setup) -> Findings:
    replays = [0.0, 0.125, 1.0]
    kw = dict(pretrain_steps=4000, finetune_steps=1000) if setup.quick else {}
    cfgs = [MemoryConfig(seed=s, replay_weight=w, **kw) for w in replays for s in setup.seeds]
    runs = setup.train(cfgs, max(1, min(setup.scale.workers or 2, len(cfgs))), _memory_worker)
    groups = setup.groups(runs)
    # the times are censored at the end of fine-tuning, the history's last evaluation
    table = _table([{"replay_w": w} for w in replays], groups, _memory_row, ("t_old_half", "t_new_half"))
    t0r = table[0]
    checks = {"old_forgotten_before_new_learned": _earlier(t0r, "t_old_half", "t_new_half"),
              "replay_keeps_more_old": bool(table[-1]["old_acc_end"] > t0r["old_acc_end"])}

    def ft(r: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = _finetuning(r)
        return np.array([h["step"] for h in rows], float), np.array([h[key] for h in rows])
    series = [(f"{what}, replay w={w:g}", [ft(r, f"{what}_acc") for r in rs])
              for w, rs in zip(replays, groups) for what in ("old", "new")]
    plots = [line_plot(setup.out / "memory_finetune.png", "toy MLP memory during fine-tuning (Figs. Q–R)",
                       "fine-tuning step", "accuracy", series)]
    measured = (f"without replay, old accuracy {_pm(t0r, 'old_acc_pre')} → {_pm(t0r, 'old_acc_at_100')} at step 100, "
                f"half of it after {_pm(t0r, 't_old_half', 0)} steps, new pairs reach 50% after "
                f"{_pm(t0r, 't_new_half', 0)} steps; final old accuracy with replay w = {replays}: "
                f"{[_pm(r, 'old_acc_end') for r in table]}")
    return Findings(measured, checks, table, plots, {"table": table, "speed": {"wall_s": setup.wall}, "runs": runs})


# ---- attention patching ------------------------------------------------------------------------------------

def _patching(setup: Setup) -> Findings:
    scale, seeds, out = setup.scale, setup.seeds, setup.out
    # reference checkpoints: init, phase 1, around t1, the plateau, around t*, the end (calibrated run: t1 ≈ 35%,
    # t* ≈ 55% of a 2000-step budget)
    fractions = (0, 0.05, 0.5, 1.0) if setup.quick else (0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0)
    grid = sorted({int(scale.steps * f) for f in fractions})
    # Per seed, one reference run; its patched runs share its initialisation and data order (the paper patches
    # one seed; several seeds here give mean ± std, and every sub-claim must hold in each seed)
    refs = setup.train([(scale.run(s, snapshot_steps=tuple(grid)), out / "reference" / f"seed-{s}") for s in seeds])
    runs = setup.train([(scale.run(s, patch_from=ref["snapshots"][str(g)], probes=False),
                         out / "runs" / f"seed-{s}-ref-{g}") for s, ref in zip(seeds, refs) for g in grid])
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
    by_step = [runs[i::len(grid)] for i in range(len(grid))]  # reference step grid[i], one run per seed
    table = _table([{"reference_step": "none (plain run)"}] + [{"reference_step": g} for g in grid], [refs] + by_step,
                   lambda r: {"t_star": r["plateau"]["t_star"], "t1": r["plateau"]["t1"],
                              "final_loss": _final(r, "seen_eval/loss"), "final_acc": _final(r, "seen_eval/acc")},
                   censor=("t_star",))
    removed = [x["removed"] for x in per_seed if x["removed"] is not None]
    monotone = [x["monotone_after_t1"] for x in per_seed if x["monotone_after_t1"] is not None]
    worse = [w for x in per_seed for w in x["phase1_worse"]]
    checks = {"post_plateau_reference_removes_plateau": all(removed) if removed else None,
              "later_references_never_slower": all(monotone) if monotone else None,
              "phase1_references_worse_than_init": all(worse) if worse else None}
    t1s, tss = [x["t1"] for x in per_seed], [x["t_star"] for x in per_seed]
    plots = [line_plot(out / "patching_loss.png", "training with a reference's attention (Fig. 3)", "step", "nats",
                       [("plain", _curves(refs, "seen_eval/loss"))] +
                       [(f"ref step {g}", _curves(rs, "seen_eval/loss")) for g, rs in zip(grid, by_step)],
                       hlines=_baseline_line(refs)),
             line_plot(out / "value_name_attention.png", "value→name attention of the reference runs", "step", "mass",
                       [(f"layer {i}", _curves(refs, f"att_value_name_L{i}")) for i in range(setup.scale.n_layer)],
                       vlines=[("t1 (mean)", _mean(t1s) or 0), ("t* (mean)", _mean(tss) or 0)])]
    by_ref = ", ".join(f"{row['reference_step']}: {_pm(row, 't_star', 0)}" for row in table[1:])
    measured = (f"reference runs: t1 {_pm(table[0], 't1', 0)}, t* {_pm(table[0], 't_star', 0)}; t* of patched runs "
                f"by reference step: {by_ref}"
                f" (seeds {seeds}; per seed {[x['t_star_patched'] for x in per_seed]}); post-plateau references "
                f"remove the plateau: {[x['removed'] for x in per_seed]}; phase-1 references worse than step 0: "
                f"{[x['phase1_worse'] for x in per_seed]}; later references (after t1) never slower: "
                f"{[x['monotone_after_t1'] for x in per_seed]}")
    return Findings(measured, checks, table, plots, {
        "per_seed": per_seed, "table": table, "speed": _speed(list(refs) + list(runs), setup.wall),
        "references": [{"seed": s, "plateau": r["plateau"], "history": r["history"]} for s, r in zip(seeds, refs)],
        "runs": [{"seed": s, "reference_step": g, "history": r["history"]}
                 for (s, g), r in zip([(s, g) for s in seeds for g in grid], runs)]})


# ---- ablation: fixed order, single template -----------------------------------------------------------------

def _ablation(setup: Setup) -> Findings:
    variants = [("shuffled, 20 templates", {}), ("fixed order", {"shuffle": False}),
                ("single template", {"n_train_templates": 1})]
    runs = _variant_runs(setup, variants)
    groups = setup.groups(runs)
    table = _table([{"variant": label} for label, _ in variants], groups, lambda r: {
        "acc_train_templates": _final(r, "seen_train/acc"), "acc_heldout_templates": _final(r, "seen_eval/acc"),
        "loss_heldout": _final(r, "seen_eval/loss")})
    gap = [row["acc_train_templates"] - row["acc_heldout_templates"] for row in table]
    checks = {"fixed_order_opens_gap": bool(gap[1] > gap[0] + 0.1),
              "single_template_opens_gap": bool(gap[2] > gap[0] + 0.1)}
    labels = [label for label, _ in variants]
    series = [(label, _curves(rs, "seen_eval/acc")) for label, rs in zip(labels, groups)]
    series += [(f"{label} (train templates)", _curves(rs, "seen_train/acc"))
               for label, rs in zip(labels[1:], groups[1:])]
    plots = [line_plot(setup.out / "ablation.png", "held-out template accuracy (Fig. A)", "step", "accuracy", series)]
    measured = "; ".join(f"{row['variant']}: train-template acc {_pm(row, 'acc_train_templates')}, held-out "
                         f"{_pm(row, 'acc_heldout_templates')}" for row in table)
    return Findings(measured, checks, table, plots, {"table": table, "speed": _speed(runs, setup.wall),
                                                     "runs": [_lean(r) for r in runs]})


# ---- the experiments by name (verb, report title, the paper's claim tested, the function that conducts it) ---

phases = Experiment(
    "phases", "three phases", "Knowledge is acquired in three phases: the loss first fits the value marginals and "
    "drops to the no-knowledge baseline, stays on a plateau at the baseline with near-zero accuracy, then falls below "
    "it as individual knowledge emerges (Fig. 2 left/middle).", _phases, options=("runs", "wall"))
hallucination = Experiment(
    "hallucination", "hallucination", "On individuals never seen in training the loss sits at the baseline during "
    "the plateau and rises above it (confident wrong answers) as knowledge emerges, at the end of the plateau; "
    "predictions on unseen individuals are less confident than on seen ones (Fig. 5 left, Fig. M).",
    _hallucination, options=("runs", "wall"))
plateau = Experiment(
    "plateau", "plateau length against N", "The plateau ends after a number of steps that grows almost linearly "
    "with the number of individuals: plateau end ≈ 0.43·N^0.81 (R² 0.998, Fig. 2 right). Holds here if the log-log "
    "slope of t* is in [0.6, 1.0] and t* increases with N, over the sizes where every seed left the plateau.",
    _plateau, options=("sizes",))
alpha = Experiment(
    "alpha", "alpha sweep", "With power-law sampling p_i ∝ i^−α, the plateau is shortest for α ≈ 0.6–0.8 (for every "
    "N); more imbalance overfits. Checked here: the shortest plateau is at an α strictly between 0.4 and 1, and the "
    "lowest final loss is not at α = 0 (Fig. 4 left/middle).", _alpha, options=("alphas",))
warmup = Experiment(
    "warmup", "warm-up curriculum", "Uniform < best power law α < warm-up (a subset first, then everyone), in final "
    "accuracy over the whole population (Fig. 4 right).", _warmup, options=("best_alpha",))
finetune = Experiment(
    "finetune", "fine-tuning on new individuals", "Fine-tuning on new individuals makes the loss on pre-training "
    "knowledge jump toward the baseline within about 100 steps, long before new knowledge is learned; the drop grows "
    "with the number of new individuals; replaying old individuals improves the final level but not the initial drop "
    "(Fig. 5 middle/right, Fig. N). Fine-tuning on individuals seen in pre-training but rarely (the non-celebrities "
    "of a celebrity pre-training) instead raises their accuracy, about 50% → 70%, without the collapse (Fig. P). Our "
    "control: after the same pre-training, celebrities keep their knowledge better than the others when fine-tuning "
    "on new individuals.", _finetune)
memory = Experiment(
    "memory", "toy associative memory", "A one-hidden-layer MLP storing random key→class pairs shows the same "
    "fine-tuning pattern as the language model: old pairs are forgotten fast, new ones learned slowly, replay keeps "
    "more old pairs (App. F.4, Figs. Q–R).", _memory)
patching = Experiment(
    "patching", "attention patching", "Training with attention patterns from later reference checkpoints shortens the "
    "plateau, and post-plateau patterns remove it; patterns from early phase-1 checkpoints are worse than untrained "
    "ones (Fig. 3). Checked in every seed.", _patching)
ablation = Experiment(
    "ablation", "order and template ablation", "Random sentence order and template diversity are essential: with a "
    "fixed order or a single template the model fits training templates but held-out-template accuracy stays near "
    "zero (Fig. A). Checked here: each ablation (separately) opens a train/held-out gap at least 0.1 wider than the "
    "default's.", _ablation)

BY_NAME = {e.name: e for e in (phases, plateau, alpha, warmup, hallucination, finetune, memory, patching, ablation)}
EXPERIMENTS = tuple(BY_NAME)


# what an experiment writes into its folder: reports, plots, the Trainer's runs; `all` writes one folder each
OUTPUTS = ("results.json", "report.html", "*.png", "runs", "pretrain", "reference", *EXPERIMENTS)


def run_experiment(name: str, seeds: Sequence[int], out: Path, quick: bool = False,
                   workers: int | None = None) -> dict[str, Any]:
    """One experiment by name ('all' runs each into out/<name>/, sharing the phase runs with hallucination)."""
    out = Path(out)
    if name not in EXPERIMENTS and name != "all":
        raise ValueError(f"experiment ({name!r}) must be one of {', '.join(EXPERIMENTS)}, all")
    held = [p.name for pattern in OUTPUTS for p in sorted(out.glob(pattern))] if out.is_dir() else []
    if held:  # an earlier run's (a server's run folder holds its log.txt, hence no "is not empty")
        raise ValueError(f"{out} holds {held[0]}, which this run would overwrite; choose a new folder")
    scale = Scale.default(quick, workers)
    if name != "all":
        return BY_NAME[name](seeds, out, quick, scale)
    t0 = time.perf_counter()
    shared = Setup(list(seeds), out / "phases", quick, scale)
    runs = _phase_runs(shared)
    results = {e.name: e(seeds, out / e.name, quick, scale, runs=runs, wall=shared.wall)
               for e in (phases, hallucination)}
    for exp in EXPERIMENTS:
        if exp not in results:
            results[exp] = BY_NAME[exp](seeds, out / exp, quick, scale)
    results["wall_s"] = time.perf_counter() - t0
    return results
