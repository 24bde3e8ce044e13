"""Knowledge lab: generator invariants, metrics against hand-computed numbers, a short run to the baseline."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from lmlab.lab.facts import (
    ATTRIBUTES,
    AttentionPatch,
    BioConfig,
    Biographies,
    EvalSet,
    RunConfig,
    attribute_metrics,
    plateau_times,
)
from lmlab.lab.facts.data import Pools, default_tokenizer
from lmlab.lab.facts.experiments import loglog_fit
from lmlab.models import ModelConfig, Transformer
from lmlab.models.model import ModelOutput


@pytest.fixture(scope="module")
def shared():
    pools = Pools.build("cpu")
    return pools, default_tokenizer(pools)


def make(shared, **kw) -> Biographies:
    pools, tok = shared
    return Biographies(BioConfig(**{"n_individuals": 300, "n_unseen": 50, "n_eval": 40, **kw}), tok, pools)


def templates_used(bio: Biographies, person: int, ids: list[int], name_pos: list[list[int]],
                   value_pos: list[list[int]]) -> list[set[int]]:
    """Per attribute, the templates whose (pre, mid, post) token pieces match the sentence around the name
    and value positions of a generated biography. A sentence starts after <BOS> or a "." (every template
    ends with one), which tells "X was born on V ." from "records show X was born on V ."."""
    starts = {bio.tokenizer.bos_id, bio.tokenizer.token_to_id(".")}
    used = []
    for j, a in enumerate(ATTRIBUTES):
        ns, ne = name_pos[j][0], name_pos[j][-1] + 1
        vs, ve = value_pos[j][0], value_pos[j][-1] + 1
        hits = set()
        for t, (pre, mid, post) in enumerate(bio.template_ids[a]):
            if ids[ns - len(pre):ns] == pre and ids[ne:vs] == mid and ids[ve:ve + len(post)] == post and \
                    ns - len(pre) >= 1 and ids[ns - len(pre) - 1] in starts and vs - ne == len(mid):
                hits.add(t)
        assert len(hits) == 1, f"attribute {a}: templates {hits} match"
        used.append(hits)
    return used


def test_template_split_is_per_individual_and_respected(shared):
    bio = make(shared)
    order = bio.template_order
    for person in range(5):
        for j in range(6):
            train, held = set(order[person, j, :20]), set(order[person, j, 20:])
            assert len(train) == 20 and len(held) == 5 and not train & held and train | held == set(range(25))
    # the split differs between individuals (it is drawn per individual, not once for all)
    assert len({tuple(sorted(order[p, 0, 20:])) for p in range(50)}) > 40
    rng = np.random.default_rng(0)
    for person in range(20):
        for held_out in (False, True):
            ids, vpos, npos = bio.biography(person, rng, held_out=held_out)
            allowed = order[person, :, 20:] if held_out else order[person, :, :20]
            for j, hits in enumerate(templates_used(bio, person, ids, npos, vpos)):
                assert hits <= set(allowed[j].tolist()), (person, j, hits)


def test_value_positions_and_names(shared):
    bio = make(shared)
    for name in ("seen_eval", "seen_train", "unseen"):
        es = bio.eval_set(name)
        for i in range(len(es.x)):
            person = es.individuals[i]
            f, m, la = bio.names[person]
            name_ids = bio.first_ids[f] + bio.middle_ids[m] + bio.last_ids[la]
            for j, a in enumerate(ATTRIBUTES):
                got = es.y[i, es.pos[i, j][es.mask[i, j]]].tolist()
                assert got == bio.value_ids[a][bio.values[person, j]]
                assert es.x[i, es.name_pos[i, j][es.name_mask[i, j]]].tolist() == name_ids
    # the dates are "month year": a two-token value; the others single pseudo-words
    assert bio.eval_set("seen_eval").mask[0, 0].sum() == 2 and bio.eval_set("seen_eval").mask[0, 1].sum() == 1
    assert set(bio.eval_set("unseen").individuals) <= set(bio.unseen)


def test_sentences_shuffled_names_unique_and_deterministic(shared):
    bio = make(shared)
    assert len({tuple(n) for n in bio.names}) == len(bio.names)
    rng = np.random.default_rng(0)
    orders = {tuple(np.argsort([v[0] for v in bio.biography(0, rng)[1]])) for _ in range(30)}
    assert len(orders) > 10
    fixed = make(shared, shuffle=False)
    assert {tuple(np.argsort([v[0] for v in fixed.biography(0, rng)[1]])) for _ in range(5)} == {tuple(range(6))}
    a = make(shared).sample_batch(8, bio.seq_len, torch.Generator().manual_seed(3))
    b = make(shared).sample_batch(8, bio.seq_len, torch.Generator().manual_seed(3))
    c = make(shared, seed=1).sample_batch(8, bio.seq_len, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # y is x shifted by one


def test_unseen_never_sampled_and_distributions(shared):
    bio = make(shared, warmup_individuals=10, warmup_steps=5)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    drawn = [bio._draw(64, rng) for _ in range(5)]
    bio.batches_drawn = 5
    assert set(np.concatenate(drawn)) <= set(range(10))  # warm-up: the subset only
    later = np.concatenate([bio._draw(64, rng) for _ in range(300)])
    assert set(later) <= set(bio.seen) and not set(later) & set(bio.unseen) and len(set(later)) > 290
    bio.sample_batch(4, bio.seq_len, g)
    pl = make(shared, sampling="power_law", alpha=0.7)
    assert pl.weights[0] / pl.weights[1] == pytest.approx(2 ** 0.7)
    assert pl.weights.sum() == pytest.approx(1.0)
    cel = make(shared, sampling="celebrities", n_celebrities=10, celebrity_weight=8.0)
    assert cel.weights[0] / cel.weights[-1] == pytest.approx(8.0)
    rep = make(shared, replay_individuals=200, replay_weight=0.0)
    assert rep.weights[:200].sum() == 0 and rep.weights[200:].sum() == pytest.approx(1.0)
    # a population's first rows do not depend on its size (fine-tuning views share one population)
    big = make(shared, n_individuals=400)
    assert np.array_equal(big.values[:300], bio.values[:300]) and np.array_equal(big.names[:300], bio.names[:300])
    assert np.array_equal(big.template_order[:300], bio.template_order[:300])


def test_baseline_is_the_value_entropy(shared):
    bio = make(shared, n_individuals=4, n_unseen=0, n_eval=4)
    bio.values[:4] = np.array([[0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0], [1, 2, 0, 2, 1, 0], [1, 3, 0, 3, 2, 0]])
    # attribute entropies: ln 2, ln 4, 0, ln 4, -(1/4 ln 1/4 + 1/2 ln 1/2 + 1/4 ln 1/4), 0
    expected = (math.log(2) + 2 * math.log(4) + 1.5 * math.log(2)) / 6
    assert bio.baseline() == pytest.approx(expected, abs=1e-12)
    default = make(shared)  # and on a real population: near ln V per attribute (V = 48, 48, 32, 32, 40, 48)
    upper = np.mean(np.log([48, 48, 32, 32, 40, 48]))
    assert upper - 0.15 < default.baseline() < upper


def test_bad_config_is_a_value_error():
    for kw in ({"n_individuals": 0}, {"n_train_templates": 30}, {"sampling": "zipf"}, {"alpha": -1.0},
               {"warmup_individuals": 5}, {"scale": "huge"}, {"n_individuals": 10**6}):
        with pytest.raises(ValueError):
            BioConfig(**kw)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.logits = logits

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(self.logits.expand(len(x), -1, -1))


def test_attribute_metrics_hand_computed():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125], [0.1, 0.6, 0.2, 0.1],
                          [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    y = torch.tensor([[3, 0, 1, 2, 3]])
    # attribute 0: value of two tokens at y[1], y[2] (targets 0, 1: both argmax); attribute 1: one token at y[3]
    # (target 2, argmax 0: wrong)
    es = EvalSet("hand", torch.zeros(1, 5, dtype=torch.long), y, torch.tensor([[[1, 2], [3, 0]]]),
                 torch.tensor([[[True, True], [True, False]]]), torch.zeros(1, 2, 1, dtype=torch.long),
                 torch.ones(1, 2, 1, dtype=torch.bool), np.array([0]))
    m = attribute_metrics(FixedLogits(probs.log()[None]), es, baseline=1.0)
    loss0, loss1 = -math.log(0.5) - math.log(0.6), -math.log(0.2)
    assert m["loss"] == pytest.approx((loss0 + loss1) / 2, abs=1e-6)
    assert m["acc"] == pytest.approx(0.5)
    assert m["max_prob"] == pytest.approx(((0.5 + 0.6) / 2 + 0.4) / 2, abs=1e-6)

    def h(p):
        return -sum(q * math.log(q) for q in p)
    ent = ((h([0.5, 0.25, 0.125, 0.125]) + h([0.1, 0.6, 0.2, 0.1])) / 2 + h([0.4, 0.3, 0.2, 0.1])) / 2
    assert m["entropy"] == pytest.approx(ent, abs=1e-6)
    assert m["above_baseline"] == pytest.approx(m["loss"] - 1.0)


def test_plateau_times_and_fit():
    steps = [0, 10, 20, 30, 40, 50, 60]
    loss = [6.0, 4.2, 4.03, 4.0, 3.85, 3.95, 3.5]  # baseline 4.0: reached at 20; 40 is a blip; 60 the last one
    assert plateau_times(steps, loss, 4.0) == {"t1": 20, "t_star": 60, "plateau_len": 40}
    assert plateau_times(steps, [6.0] * 7, 4.0) == {"t1": None, "t_star": None, "plateau_len": None}
    fit = loglog_fit([100, 200, 400], [0.5 * 100**0.8, 0.5 * 200**0.8, 0.5 * 400**0.8])
    assert fit["b"] == pytest.approx(0.8) and fit["a"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0)


def test_attention_patch_with_own_patterns_is_exact():
    cfg = ModelConfig(family="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16)
    model = Transformer(cfg).eval()
    x = torch.randint(4, 50, (3, 16))
    want = model(x).logits
    patched = copy.deepcopy(model)
    AttentionPatch(patched, copy.deepcopy(model))
    torch.testing.assert_close(patched(x).logits, want, rtol=1e-5, atol=1e-5)
    other = Transformer(cfg).eval()
    patched_other = copy.deepcopy(model)
    AttentionPatch(patched_other, other)
    assert (patched_other(x).logits - want).abs().max() > 1e-3  # someone else's patterns change the output


def test_a_quiet_run_shows_nothing_on_the_console_and_a_loud_one_its_progress(tmp_path, capsys):
    """A lab's runs are quiet through the trainer's logger, not by taking over sys.stdout: under the `lmlab`
    command's console (console_progress) a quiet run shows nothing and quiet=False shows the progress lines."""
    from lmlab.lab.facts.runner import RunConfig, run_one
    from lmlab.train.console import console_progress
    cfg = RunConfig(bio=BioConfig(n_individuals=40, n_unseen=0, n_eval=8, seed=0, n_templates=5, n_train_templates=4),
                    n_layer=1, n_head=2, n_embd=16, batch_size=4, steps=4, eval_every=2, probes=False)
    with console_progress():
        run_one(cfg, tmp_path / "quiet")
        assert capsys.readouterr().out == ""
        run_one(cfg, tmp_path / "loud", quiet=False)
        out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines()] == ["1/4", "2/4", "4/4"]  # log_every is off: evaluations


def test_short_run_reaches_the_baseline(tmp_path):
    """Phase 1 through the real Trainer: within 300 steps the held-out attribute loss falls from ~7.5 nats
    (ln vocab per value token) to the no-knowledge baseline, with no individual knowledge yet. Five templates
    per attribute (4 train / 1 held out) so the template structure, and with it phase 1, is learned fast
    enough for the default test run; with 25 the same budget ends ~0.25 nats above the baseline."""
    from lmlab.lab.facts.runner import RunConfig, run_one
    cfg = RunConfig(bio=BioConfig(n_individuals=400, n_unseen=64, n_eval=64, seed=0, n_templates=5,
                                  n_train_templates=4), n_layer=2, n_embd=48, steps=300, eval_every=50, lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a d=48 model gains nothing from a second thread, and a busy machine punishes it
    try:
        r = run_one(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    base = r["baseline"]
    losses = [row["seen_eval/loss"] for row in r["history"]]
    assert losses[0] > base + 3.0
    assert losses[-1] <= base + 0.1, (losses, base)
    assert r["history"][-1]["seen_eval/acc"] < 0.2  # on the plateau: the marginals, not the individuals
    assert "att_value_name_L1" in r["history"][-1] and "drift_value" in r["history"][-1]
    assert r["steps"] == 300


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from lmlab.cli import main
    assert main(["lab", "facts", "phases", "--out", str(tmp_path), "--seeds", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: --seeds") and err.count("\n") == 1
    assert main(["lab", "facts", "phases", "--out", str(tmp_path), "--workers", "0"]) == 2
    with pytest.raises(SystemExit) as exc:  # an unknown experiment: argparse's own exit 2
        main(["lab", "facts", "nonsense", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_celebrity_split_groups_are_slices_of_one_population(shared):
    """Fig. P's metrics by group: after celebrity pre-training the old individuals are evaluated as
    celebrities [0, c) and others [c, old), both uniform slices of the fine-tuning population (the same names
    and values), disjoint and covering the old rows, with the training-time weights stripped."""
    from lmlab.lab.facts.runner import RunConfig, split_groups
    pools, tok = shared
    bio = BioConfig(n_individuals=120, n_unseen=0, n_eval=40, sampling="celebrities", n_celebrities=6,
                    celebrity_weight=8.0)
    full = Biographies(bio, tok, pools)
    groups = split_groups(RunConfig(bio=bio, split_old=100, split_celebrities=6))
    assert set(groups) == {"old", "new", "old_celeb", "old_rest"}
    rows = {}
    for g, b in groups.items():
        view = Biographies(b, tok, pools)
        assert b.sampling == "uniform" and (view.weights == view.weights[0]).all()
        np.testing.assert_array_equal(view.names[view.seen], full.names[view.seen])
        np.testing.assert_array_equal(view.values[view.seen], full.values[view.seen])
        rows[g] = set(view.seen.tolist())
    assert rows["old_celeb"] == set(range(6)) and rows["old_rest"] == set(range(6, 100))
    assert rows["old"] == rows["old_celeb"] | rows["old_rest"] and rows["new"] == set(range(100, 120))
    with pytest.raises(ValueError, match="split_celebrities"):
        RunConfig(bio=bio, split_old=100, split_celebrities=100)
    # Fig. P proper: fine-tuning on the rare seen ones (celebrities not drawn) has no new individuals
    rare = dataclasses.replace(bio, sampling="uniform", replay_individuals=6, replay_weight=0.0)
    assert Biographies(rare, tok, pools).weights[:6].sum() == 0
    groups = split_groups(RunConfig(bio=rare, split_old=120, split_celebrities=6))
    assert set(groups) == {"old", "old_celeb", "old_rest"}
    assert groups["old_rest"].first_individual == 6 and groups["old_rest"].n_individuals == 114
    with pytest.raises(ValueError, match="split_old"):
        RunConfig(bio=rare, split_old=121)


def test_report_tables_fold_std_over_seeds_into_mean():
    """Several seeds: every aggregated column is printed as mean ± std, the sample std (ddof=1: 0.5, 0.7, 0.9
    -> 0.2, where the population std would be 0.163), and the *_std column itself is not a separate one; with
    one seed, or one seed with a value, there is no std."""
    from lmlab.lab.facts.experiments import _agg
    from lmlab.lab.facts.report import html_table
    row = _agg([{"acc": 0.5, "t": 100, "t_none": None}, {"acc": 0.7, "t": None, "t_none": None},
                {"acc": 0.9, "t": None, "t_none": None}])
    assert row["acc"] == pytest.approx(0.7) and row["acc_std"] == pytest.approx(0.2)
    assert row["t"] == 100 and row["t_std"] is None and row["t_none"] is None  # seeds without a value are left out
    assert set(_agg([{"acc": 0.5}])) == {"acc"}
    page = html_table([{"variant": "a", **row}], "caption")
    assert "<th>acc</th>" in page and "acc_std" not in page and "<td>0.7 ± 0.2</td>" in page
    assert "<td>—</td>" in page and "<caption>caption</caption>" in page


def test_verdict_grade_from_sub_claims():
    from lmlab.lab.facts.report import grade
    assert grade({"a": True, "b": True}) == "holds"
    assert grade({"a": True, "b": False}) == "partly"
    assert grade({"a": False, "b": False, "c": None}) == "does not hold"
    assert grade({"a": True, "c": None}) == "holds"  # a sub-claim not measurable here does not count
    assert grade({"c": None}) == "inconclusive"


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_a_parallel_experiment_at_once(tmp_path, workers):
    """SIGINT to `lmlab lab facts` (a terminal's Ctrl-C, the web app's cancel) ends the whole experiment with exit
    130 and no worker left: not after every run it had started has finished (~2 minutes for this one)."""
    import glob
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "phases"
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "lab", "facts", "phases", "--seeds", "0,1",
                             "--workers", str(workers), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not any(os.path.getsize(f) for f in glob.glob(str(out / "runs" / "*" / "metrics.jsonl"))):
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        children = [int(p) for p in subprocess.run(["ps", "--ppid", str(proc.pid), "-o", "pid="],
                                                   capture_output=True, text=True).stdout.split()]
        assert workers == 1 or len(children) >= workers, children  # the workers (and a resource tracker)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    log = proc.stdout.read().decode()
    assert "lmlab: interrupted" in log and "Traceback" not in log, log
    assert not (out / "report.html").exists()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                return "State:\tZ" not in f.read()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(c) for c in children):
        assert time.monotonic() < deadline, "a worker outlived the experiment"
        time.sleep(0.2)


def test_a_resumed_warmup_run_equals_the_uninterrupted_one(shared, tmp_path):
    """The warm-up clock (batches drawn) is the dataset's own state, which the Trainer does not checkpoint:
    DataState saves it into every checkpoint and puts it back, so a run stopped inside the warm-up (after 4 of
    its 6 warm-up batches) and resumed draws the same individuals and ends with the same weights as the
    uninterrupted run (without it, the resumed run restarted the warm-up: 6 more batches on 4 individuals)."""
    from lmlab.lab.facts.runner import DataState, model_config
    from lmlab.train import Callback, TrainConfig, train
    pools, tok = shared

    class Recording(Biographies):
        def _draw(self, batch_size, rng):
            rows = super()._draw(batch_size, rng)
            self.drawn.append(rows.tolist())
            return rows

    class StopAt(Callback):
        def on_step(self, trainer, metrics):
            trainer.should_stop = trainer.step == 4

    def run(out, resume=False, stop=False):
        data = Recording(BioConfig(n_individuals=200, n_unseen=0, n_eval=8, warmup_individuals=4,
                                   warmup_steps=6), tok, pools)
        data.drawn = []
        state = DataState(data)
        if resume:
            state.restore(out)
        torch.manual_seed(0)
        model = Transformer(model_config(RunConfig(n_layer=1, n_embd=16, n_head=2), data))
        tc = TrainConfig(batch_size=4, seq_len=data.seq_len, lr=1e-2, warmup_steps=0, max_steps=10, eval_every=0,
                         save_every=0, log_every=10**9, device="cpu", seed=0, peak_flops=1e12)
        train(model, tok, data, tc, out, [state] + ([StopAt()] if stop else []), resume=resume)
        return data, model

    whole, whole_model = run(tmp_path / "whole")
    first, _ = run(tmp_path / "split", stop=True)
    assert first.batches_drawn == 4 and first.drawn == whole.drawn[:4]
    resumed, resumed_model = run(tmp_path / "split", resume=True)
    assert resumed.drawn == whole.drawn[4:]  # two more warm-up batches on individuals 0-3, then everyone
    assert resumed.batches_drawn == 10
    assert all(set(b) <= set(range(4)) for b in whole.drawn[:6]) and len(set(sum(whole.drawn[6:], []))) > 4
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="batches_drawn"):
        resumed.load_state_dict({"batches_drawn": -1})


def synthetic_run(baseline: float, losses: list[float], unseen: list[float], every: int = 100) -> dict:
    """A run's summary as run_one returns it, from hand-written loss curves (one value per evaluation)."""
    steps = [k * every for k in range(len(losses))]
    history = [{"step": st, "baseline": baseline, "seen_eval/loss": lo, "seen_eval/acc": 0.0 if lo >= baseline
                else 0.5, "seen_train/acc": 0.0, "unseen/loss": u, "seen_eval/max_prob": 0.5, "unseen/max_prob": 0.3,
                "seen_eval/entropy": 1.0, "unseen/entropy": 2.0} for st, lo, u in zip(steps, losses, unseen)]
    return {"history": history, "plateau": plateau_times(steps, losses, baseline), "baseline": baseline,
            "steps": steps[-1], "steps_per_s": 1.0}


def phase_runs() -> list[dict]:
    """Three seeds, each with its own population and so its own baseline (3.0, 3.5, 3.25), every plateau exactly
    at that baseline from step 200 (t1); seeds 0 and 1 leave it at t* = 700, seed 2 never does in its 1000 steps.
    Unseen individuals sit exactly at the baseline through t* and 1 nat above it from the next evaluation on."""
    runs = []
    for base, leaves in ((3.0, True), (3.5, True), (3.25, False)):
        seen = [base + 4, base + 2] + [base] * 5 + ([base - 0.5, base - 1, base - 1.5, base - 2] if leaves
                                                     else [base] * 4)
        unseen = [base + 4, base + 2] + [base] * 6 + ([base + 1] * 3 if leaves else [base] * 3)
        runs.append(synthetic_run(base, seen, unseen))
    return runs


def test_phases_measure_each_seed_against_its_own_baseline(tmp_path):
    """Each seed has its own population, so its own baseline: seed 1's plateau sits exactly at its 3.5 nats, not
    0.5 nats above seed 0's 3.0, for the seen and the unseen loss."""
    from lmlab.lab.facts.experiments import Scale, hallucination, phases
    scale = Scale(eval_every=100, n_layer=1)
    res = phases([0, 1], tmp_path / "p", scale=scale, runs=phase_runs()[:2], wall=1.0)
    assert [x["plateau_mean_gap"] for x in res["per_seed"]] == [0.0, 0.0]
    assert [x["steps_within_0.1_of_baseline"] for x in res["per_seed"]] == [500, 500]
    assert res["baseline"] == [3.0, 3.5]
    res = hallucination([0, 1], tmp_path / "h", scale=scale, runs=phase_runs()[:2], wall=1.0)
    assert [x["unseen_plateau_above_baseline"] for x in res["per_seed"]] == [0.0, 0.0]
    assert [x["unseen_final_above_baseline"] for x in res["per_seed"]] == [1.0, 1.0]


def test_a_gap_of_exactly_zero_is_at_the_baseline(tmp_path):
    """A plateau exactly at the baseline (mean gap 0.0) passes the at-the-baseline checks; `gap or 1.0` read it
    as 1 nat away and failed them."""
    from lmlab.lab.facts.experiments import Scale, hallucination, phases
    scale = Scale(eval_every=100, n_layer=1)
    res = phases([0], tmp_path / "p", scale=scale, runs=phase_runs()[:1], wall=1.0)
    assert res["per_seed"][0]["plateau_mean_gap"] == 0.0
    assert res["checks"]["plateau_at_baseline"] is True and res["verdict"] == "holds"
    res = hallucination([0], tmp_path / "h", scale=scale, runs=phase_runs()[:1], wall=1.0)
    assert res["per_seed"][0]["unseen_plateau_above_baseline"] == 0.0
    assert res["checks"]["unseen_at_baseline_on_plateau"] is True


def test_a_seed_that_never_leaves_the_plateau_is_censored_not_dropped(tmp_path):
    """Seed 2 is still on the plateau when its run ends at step 1000: it counts at 1000, so t* = (700 + 700 +
    1000) / 3 = 800 ± sqrt((100² + 100² + 200²) / 2) = 173.2, a lower bound with 1 censored seed (dropping it gave
    700 ± 0). Its unseen loss is measured over the whole plateau, to the end of the run (it had no plateau window,
    and failed the check)."""
    from lmlab.lab.facts.experiments import Scale, hallucination, phases
    scale = Scale(eval_every=100, n_layer=1)
    res = phases([0, 1, 2], tmp_path / "p", scale=scale, runs=phase_runs(), wall=1.0)
    s = res["summary"]
    assert s["t_star"] == pytest.approx(800) and s["t_star_std"] == pytest.approx(math.sqrt(30000))
    assert s["t_star_censored"] == 1 and s["plateau_len_censored"] == 1
    assert s["plateau_len"] == pytest.approx((500 + 500 + 800) / 3)
    assert "t* = ≥ 800 ± 173 (1 censored)" in res["measured"]
    assert res["checks"]["plateau_at_baseline"] is False  # seed 2 never leaves it
    res = hallucination([0, 1, 2], tmp_path / "h", scale=scale, runs=phase_runs(), wall=1.0)
    assert [x["unseen_plateau_above_baseline"] for x in res["per_seed"]] == [0.0, 0.0, 0.0]
    assert res["summary"]["onset"] == pytest.approx((800 + 800 + 1000) / 3) and res["summary"]["onset_censored"] == 1
    assert res["checks"]["unseen_at_baseline_on_plateau"] is True
    # which of two times comes first, when a mean may be a lower bound
    from lmlab.lab.facts.experiments import _earlier
    row = {"a": 300, "a_censored": 0, "b": 1000, "b_censored": 2}
    assert _earlier(row, "a", "b") is True and _earlier(row, "b", "a") is False
    assert _earlier({**row, "a": 1200}, "a", "b") is None and _earlier({**row, "a_censored": 1}, "a", "b") is None


def test_plateau_fit_leaves_out_sizes_with_censored_seeds(tmp_path, monkeypatch):
    """t* = 2·N^0.8 (seed 0 at 0.9×, seed 1 at 1.1×: the mean is exact) at N = 250 and 500; at N = 1000 seed 0
    leaves early (0.5 × 2·1000^0.8) and seed 1 is still on the plateau when its 3000 steps end. Averaging the seed
    that left (as before) put 251 steps at N = 1000 and flattened the fit; now N = 1000 has the lower bound
    (251.2 + 3000) / 2 with 1 censored seed and is left out of the fits: exactly a = 2, b = 0.8."""
    from lmlab.lab.facts import experiments
    factor = {(250, 0): 0.9, (250, 1): 1.1, (500, 0): 0.9, (500, 1): 1.1, (1000, 0): 0.5, (1000, 1): None}

    def fake_run_many(jobs, workers=None):
        out = []
        for cfg, _ in jobs:
            n, f = cfg.bio.n_individuals, factor[cfg.bio.n_individuals, cfg.seed]
            t_star = None if f is None else f * 2 * n**0.8
            t1 = 100 if t_star is None else t_star / 2
            out.append({"plateau": {"t1": t1, "t_star": t_star, "plateau_len": None if t_star is None else t_star - t1},
                        "history": [{"step": 0}, {"step": cfg.steps}], "steps": cfg.steps, "steps_per_s": 1.0})
        return out

    monkeypatch.setattr(experiments, "run_many", fake_run_many)
    res = experiments.plateau([0, 1], tmp_path, scale=experiments.Scale(steps=2000), sizes=(250, 500, 1000))
    assert res["fit_t_star"]["b"] == pytest.approx(0.8) and res["fit_t_star"]["a"] == pytest.approx(2.0)
    assert [f["b"] for f in res["fit_t_star_per_seed"].values()] == [pytest.approx(0.8)] * 2
    assert res["fit_sizes"] == [250, 500]
    last = res["table"][2]
    assert last["t_star"] == pytest.approx((0.5 * 2 * 1000**0.8 + 3000) / 2) and last["t_star_censored"] == 1
    assert "N = 1000 left out of the fits" in res["measured"] and res["verdict"] == "holds"


def test_the_cli_offers_every_experiment_and_all():
    from lmlab.cli import _FACTS_VERBS
    from lmlab.lab.facts.experiments import EXPERIMENTS

    assert _FACTS_VERBS == (*EXPERIMENTS, "all")


def test_an_experiment_refuses_a_folder_with_an_earlier_run(tmp_path):
    """Nothing is trained or written: results.json and the runs of an earlier run stay as they were."""
    from lmlab.lab.facts.experiments import run_experiment

    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="fm holds results.json, which this run would overwrite; choose a new"):
        run_experiment("memory", [1], tmp_path / "fm", quick=True, workers=1)
    assert [p.name for p in (tmp_path / "fm").iterdir()] == ["results.json"]
    (tmp_path / "fx" / "runs" / "seed-0" / "final").mkdir(parents=True)
    with pytest.raises(ValueError, match="fx holds runs, which"):
        run_experiment("phases", [0, 1], tmp_path / "fx", quick=True)
    (tmp_path / "all" / "memory").mkdir(parents=True)
    with pytest.raises(ValueError, match="all holds memory, which"):
        run_experiment("all", [0], tmp_path / "all", quick=True)
