"""Self-play lab: the DSL interpreter and validator, rewards and advantages against hand-computed numbers,
the sign of the policy gradient, and short end-to-end runs of both modes."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from lmlab.lab.selfplay import azr, dsl
from lmlab.lab.selfplay.azr import AZRConfig, Sample, Task
from lmlab.lab.selfplay.dsl import DSLError
from lmlab.lab.selfplay.text import (
    TextSelfPlayConfig,
    build_reward,
    kl_k3,
    repetition_reward,
    resume_text_selfplay,
    run_text_selfplay,
    seed_reward,
)
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.models.scoring import make_batch, token_logprobs
from lmlab.tokenizers import Tokenizer
from lmlab.train import latest_checkpoint
from lmlab.tune.rl import grouped_advantages, learnability, normalize


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from more threads, and on a shared 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- interpreter -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program, inp, out", [
    ("SORT REV", (3, 1, 4), (4, 3, 1)),
    ("CUMSUM", (1, 2, 3), (1, 3, 6)),
    ("EVENS SUM", (1, 2, 3, 4), 6),
    ("SUM INC", (1, 2), 4),            # elementwise ops also apply to ints
    ("TAKE2 DBL", (5, 6, 7), (10, 12)),
    ("DROP1 HEAD", (5, 6, 7), 6),
    ("HALF MIN", (9, 4), 2),
    ("LEN", (1, 1, 1), 3),
    ("DEC MAX", (3, 8, 1), 7),
    ("ID", (1, 2, 3), (1, 2, 3)),
    ("EVENS", (1, 3), ()),             # an empty list is a value
])
def test_interpreter_on_hand_written_programs(program, inp, out):
    assert dsl.run(program.split(), inp) == out


@pytest.mark.parametrize("program, inp, why", [
    ("SUM SORT", (1, 2), "needs a list"),          # type error: SORT after an int
    ("LEN MAX", (1,), "needs a list"),
    ("FOO", (1,), "unknown op"),
    ("", (1,), "1..6 ops"),
    ("REV " * 7, (1,), "1..6 ops"),
    ("DEC", (0, 1), "outside"),                     # would leave [0, 99]
    ("CUMSUM DBL", (9,) * 6, "outside"),            # 54 * 2 = 108 > 99
    ("EVENS MAX", (1, 3), "empty"),
    ("REV", (1,) * 9, "longer than"),               # size cap on the input
])
def test_validator_rejects(program, inp, why):
    with pytest.raises(DSLError, match=why):
        dsl.validate(program.split(), inp)


def test_step_cap(monkeypatch):
    assert dsl.run(("REV", "REV"), (1, 2, 3)) == (1, 2, 3)  # 2 ops x (1 + 3) = 8 steps
    monkeypatch.setattr(dsl, "STEP_CAP", 7)
    with pytest.raises(DSLError, match="steps"):
        dsl.run(("REV", "REV"), (1, 2, 3))


def test_proposal_parsing():
    t = dsl.parse_proposal("SORT REV I: [ 3 1 ]")
    assert (t.program, t.input, t.output) == (("SORT", "REV"), (3, 1), (3, 1))
    for bad in ("SORT REV", "SORT I: 3", "SUM SORT I: [ 1 ]", "I: [ 1 ]", "SORT I: [ 1 100 ]", "SORT I: [ 1",
                "SORT I: [ 1 ] I: [ 2 ]", "<UNK> I: [ 1 ]"):
        with pytest.raises(DSLError):
            dsl.parse_proposal(bad)
    assert dsl.parse_inputs("[ 1 ] I: [ 2 3 ]", ("SUM",), 2) == [(1,), (2, 3)]
    for bad in ("[ 1 ] I: [ 1 ]", "[ 1 ]", "[ 1 ] I: [ 0 ]"):  # duplicate, too few, DEC of 0 fails
        with pytest.raises(DSLError):
            dsl.parse_inputs(bad, ("DEC",), 2)


def test_no_exec_or_eval_in_the_interpreter():
    source = Path(dsl.__file__).read_text()
    assert "exec(" not in source and "eval(" not in source


def test_grading_runs_the_program():
    ded = Task("ded", ("SORT", "REV"), (((3, 1, 4), (4, 3, 1)),))
    assert azr.grade(ded, "[ 4 3 1 ]") == (True, True)
    assert azr.grade(ded, "[ 4 1 3 ]") == (True, False)
    assert azr.grade(ded, "[ 4 3") == (False, False)
    abd = Task("abd", ("SORT",), (((2, 1), (1, 2)),))
    assert azr.grade(abd, "[ 1 2 ]") == (True, True)  # any input with p(i) = o is right
    assert azr.grade(abd, "[ 1 3 ]") == (True, False)
    ind = Task("ind", ("SORT",), (((2, 1), (1, 2)), ((5,), (5,)), ((3, 2), (2, 3)), ((0, 9), (0, 9))))
    assert [p for p, _ in ind.visible] == [(2, 1), (5,)]
    assert azr.grade(ind, "REV REV SORT") == (True, True)  # checked on the hidden pairs only
    assert azr.grade(ind, "REV") == (True, False)
    assert azr.grade(ind, "SUM SORT") == (False, False)
    assert azr.solver_prompt(ded) == "<SOLVE_DED> P: SORT REV I: [ 3 1 4 ] O:"
    assert azr.solver_prompt(ind) == "<SOLVE_IND> I: [ 2 1 ] O: [ 1 2 ] I: [ 5 ] O: [ 5 ] P:"


def test_heldout_set_is_fixed_and_stratified():
    cfg = AZRConfig.quick(heldout_per_stratum=4)
    a, b = azr.heldout_tasks(cfg), azr.heldout_tasks(cfg)
    assert a == b
    counts = {}
    for t in a:
        counts[(t.kind, len(t.program))] = counts.get((t.kind, len(t.program)), 0) + 1
    assert counts == {(k, n): 4 for k in azr.KINDS for n in range(1, cfg.heldout_max_ops + 1)}
    assert all(len(t.pairs) == cfg.ind_inputs for t in a if t.kind == "ind")


# ---- rewards and advantages, by hand ------------------------------------------------------------------


def test_learnability_reward():
    assert learnability([1, 0, 0, 0]) == 0.75
    assert learnability([1, 0, 0, 0, 0, 0, 0, 0]) == 0.875  # the largest with G = 8: 1 - 1/8
    assert learnability([1, 1, 0, 0]) == 0.5
    assert learnability([1, 1, 1, 1]) == 0.0 and learnability([0, 0, 0, 0]) == 0.0
    cfg = AZRConfig.quick()
    assert azr.proposer_reward(None, cfg) == -1.0
    assert azr.proposer_reward([0.0, 0.0], cfg) == 0.0
    assert azr.proposer_reward([1.0, 0.0, 0.0, 0.0], cfg) == 0.75
    assert azr.proposer_reward([1.0, 1.0], AZRConfig.quick(trivial_reward=-0.5)) == -0.5


def test_normalisation_by_hand():
    assert normalize([1, 0, 0, 1]) == [1.0, -1.0, -1.0, 1.0]  # mean 0.5, population std 0.5
    assert normalize([3, 3, 3]) == [0.0, 0.0, 0.0]
    # [0.75, 0, -1]: mean -1/12; deviations 10/12, 1/12, -11/12; var = 222/432; std = 0.716860
    got = normalize([0.75, 0.0, -1.0])
    assert got == pytest.approx([1.162476, 0.116248, -1.278724], abs=1e-5)


def test_trr_normalises_per_task_type_and_role():
    rewards = [1.0, 0.0, 0.75, -1.0, 0.0, 1.0, 1.0]
    groups = [("ded", "solve"), ("ded", "solve"), ("ded", "propose"), ("ded", "propose"),
              ("ind", "solve"), ("ind", "solve"), ("abd", "solve")]
    adv = grouped_advantages(rewards, groups)
    # (ded, propose): mean -0.125, std 0.875 -> +1, -1; (abd, solve) alone -> 0. One pooled baseline
    # over all seven (mean 0.25) would instead give the 0.75 proposal a smaller advantage than a solve.
    assert adv == pytest.approx([1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 0.0])


def test_text_rewards_by_hand():
    # the AZR Model Trainer app's reward: 3 unique of 4 tokens -> 0.75 * 0.5; length 4/100 -> 0.04 * 0.5
    assert seed_reward([5, 5, 6, 7]) == pytest.approx(0.375 + 0.02)
    assert seed_reward([]) == 0.0
    assert repetition_reward([1, 2, 3, 1, 2, 3]) == 0.75  # 3-grams 123 231 312 123: 3 distinct of 4
    assert repetition_reward([1, 2]) == 0.0
    # k3 with log pi = log 0.25, log pi_ref = log 0.5: d = ln 2, e^d - d - 1 = 2 - 0.693147 - 1
    kl = kl_k3(torch.log(torch.tensor([0.25, 0.5])), torch.log(torch.tensor([0.5, 0.5])))
    assert kl.tolist() == pytest.approx([0.306853, 0.0], abs=1e-6)


def test_reward_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def score(prompt, completion):\n    return completion.count('a') / max(len(completion), 1)\n"
                 "def bad(prompt, completion):\n    return float('nan')\n")
    reward = build_reward("file", reward_file=f"{f}:score")
    assert reward(["x", "y"], ["aab", ""], [[1], []]) == pytest.approx([2 / 3, 0.0])
    with pytest.raises(ValueError, match="finite"):
        build_reward("file", reward_file=f"{f}:bad")(["x"], ["a"], [[1]])
    for spec in (str(f), f"{f}:missing", f"{tmp_path / 'no.py'}:score"):
        with pytest.raises(ValueError):
            build_reward("file", reward_file=spec)
    with pytest.raises(ValueError, match="judge"):
        build_reward("perplexity")
    # the user's function or module raising is their error, said in one line: it was "a bug in lmlab", exit 1
    f.write_text(f.read_text() + "def broken(prompt, completion):\n    return 1 / 0\n")
    with pytest.raises(ValueError, match=r"my_reward.py:broken raised ZeroDivisionError: division by zero \(scoring"):
        build_reward("file", reward_file=f"{f}:broken")(["x"], ["a"], [[1]])
    (tmp_path / "wrong.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ValueError, match="wrong.py raised ModuleNotFoundError"):
        build_reward("file", reward_file=f"{tmp_path / 'wrong.py'}:score")


# ---- the sign of the policy gradient --------------------------------------------------------------------


def _prob(model, prompt, token):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)[token].item()


def test_rewarded_token_gains_probability_after_one_step():
    cfg = AZRConfig.quick(entropy_coef=0.0, lr=1e-2)
    model = azr.new_model(cfg, 0)
    prompt = "<SOLVE_DED> P: REV I: [ 1 ] O:"
    ids = [dsl.BOS_ID, *dsl.VOCABULARY.encode(prompt)]
    good, bad = dsl.VOCABULARY.encode("7")[0], dsl.VOCABULARY.encode("8")[0]
    before = _prob(model, ids, good), _prob(model, ids, bad)
    samples = [Sample(prompt, [good], 1.0, "ded", "solve"), Sample(prompt, [bad], 0.0, "ded", "solve")]
    azr.update(model, torch.optim.Adam(model.parameters(), lr=cfg.lr), samples, cfg)
    after = _prob(model, ids, good), _prob(model, ids, bad)
    assert after[0] > before[0] * 1.5 and after[1] < before[1] / 1.5  # advantages +1 / -1


def test_an_update_that_leaves_weights_not_finite_is_refused_naming_the_lr():
    """It went on silently: every later sample came from a model of NaNs, scored as a solve rate of 0."""
    cfg = AZRConfig.quick(entropy_coef=0.0, lr=1e-2)
    model = azr.new_model(cfg, 0)
    prompt = "<SOLVE_DED> P: REV I: [ 1 ] O:"
    samples = [Sample(prompt, [5], 1.0, "ded", "solve"), Sample(prompt, [6], 0.0, "ded", "solve")]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    opt.step = lambda: next(model.parameters()).data.fill_(float("inf"))  # the step that overflowed
    with pytest.raises(ValueError, match=r"the RL update diverged \(loss .*; weights no longer finite\): lower --lr "
                                         r"\(0.01\)"):
        azr.update(model, opt, samples, cfg)


def test_a_warm_up_too_slow_to_move_the_loss_is_not_called_diverged():
    """--warmup-lr 1e-7 left the loss where it began, a little above it by batch noise (4.8846 -> 4.8861), and the
    check said "diverged: lower --warmup-lr"."""
    cfg = AZRConfig.quick(warmup_lr=1e-7)
    losses = azr.warmup(azr.new_model(cfg, 0), cfg, 0, set())
    assert abs(losses[-1] - losses[0]) < 0.05


def test_log_probs_match_a_direct_forward():
    model = azr.new_model(AZRConfig.quick(), 1)
    batch = make_batch([[2, 5, 6], [2, 7]], [[8, 3], [9, 10, 3]])
    logp, _ = token_logprobs(model, batch)
    with torch.no_grad():
        direct = torch.log_softmax(model(torch.tensor([[2, 7, 9, 10]])).logits[0].float(), -1)
    assert batch.mask[1].tolist() == [False, True, True, True]
    torch.testing.assert_close(logp[1, 1:].detach(), direct[[1, 2, 3], [9, 10, 3]])
    # samples drawn at temperature T are scored under softmax(z / T), the policy that drew them
    hot, _ = token_logprobs(model, batch, temperature=0.5)
    with torch.no_grad():
        logits = model(torch.tensor([[2, 7, 9, 10]])).logits[0].float()
    torch.testing.assert_close(hot[1, 1:].detach(), torch.log_softmax(logits / 0.5, -1)[[1, 2, 3], [9, 10, 3]])


# ---- end to end -------------------------------------------------------------------------------------------


def test_azr_arms_run_and_report(tmp_path):
    from lmlab.lab.selfplay.report import summarize, write_report

    cfg = AZRConfig.quick(warmup_steps=20, iterations=2, eval_every=1, heldout_per_stratum=1, seed_rounds=1)
    heldout = azr.heldout_tasks(cfg)
    model = azr.new_model(cfg, 0)
    losses = azr.warmup(model, cfg, 0, set())
    assert losses[-1] < losses[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    arms = []
    for arm in azr.ARMS:
        model.load_state_dict(state)
        arms.append(azr.run_arm(arm, model, cfg, 0, heldout))
    by = {a["arm"]: a for a in arms}
    assert [r["iteration"] for r in by["azr"]["history"]] == [0, 1, 2]
    assert by["azr"]["history"][1]["trained_sequences"] == 2 * 3 * 4  # proposals + solver answers
    assert by["azr_frozen_proposer"]["history"][1]["trained_sequences"] == 3 * 4
    assert by["solver_rl_random"]["history"][1]["trained_sequences"] == 2 * 3 * 4  # matched to full AZR
    assert by["warmup_only"]["history"][2]["solve_rate"] == by["warmup_only"]["history"][0]["solve_rate"]
    results = {"claim": "c", "warmup_note": "w", "config": cfg.__dict__, "seeds": [0], "heldout_size": 15,
               "wall_s": 1.0, "per_seed": [{"seed": 0, "arms": arms}]}
    results["summary"] = summarize(results)
    write_report(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["summary"]["arms"]) == set(azr.ARMS)
    assert (tmp_path / "solve_rate.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64" in (tmp_path / "report.html").read_text()


def start_model(path, seed=0, dropout=0.0, text="abcdefgh " * 20, block_size=32):
    """A 1-layer model with a char tokenizer of `text`'s characters, saved as a model directory at `path` ->
    (model, tokenizer). (tests/test_tune_grpo.py uses it too.)"""
    tok = Tokenizer.train([text], kind="char", vocab_size=64)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32,
                                    block_size=block_size, dropout=dropout))
    save_pretrained(path, model, tok)
    return model, tok


def test_text_selfplay_raises_a_user_reward(tmp_path):
    model, _ = start_model(tmp_path / "start")
    (tmp_path / "r.py").write_text("def share_of_a(prompt, completion):\n"
                                   "    return completion.count('a') / max(len(completion), 1)\n")
    cfg = TextSelfPlayConfig(iterations=12, prompts_per_iteration=2, group_size=8, max_new_tokens=12, lr=3e-3,
                             kl_coef=0.05, reward="file")
    rows = run_text_selfplay(tmp_path / "start", tmp_path / "run", cfg, ["ab", ""],
                             reward_file=f"{tmp_path / 'r.py'}:share_of_a", log=None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 0.1
    assert max(r["kl"] for r in rows) < 2.0
    trained, _ = load_pretrained(tmp_path / "run" / "final")
    assert not torch.equal(trained.lm_head.weight, model.lm_head.weight)


def test_text_selfplay_scores_as_it_samples_under_dropout(tmp_path):
    """A model whose config carries dropout 0.1 (imported GPT-2 models do): completions are sampled with dropout
    off, and scored so too, so the first iteration's KL to the identical starting model is exactly 0. Scored
    with dropout on (as self-play did), it was not, and the update was off-policy."""
    start_model(tmp_path / "start", dropout=0.1)
    cfg = TextSelfPlayConfig(iterations=1, prompts_per_iteration=2, group_size=4, max_new_tokens=8, save_every=0)
    rows = run_text_selfplay(tmp_path / "start", tmp_path / "run", cfg, ["ab", ""], log=None)
    assert rows[0]["reward_std"] > 0 and rows[0]["kl"] == 0.0


def test_a_run_of_the_earlier_loop_is_refused_in_one_line(tmp_path):
    """A run directory made before self-play ran on the Trainer (its config.json has no "train", its checkpoints
    another layout) is refused with the reason, not a traceback from inside the Trainer."""
    start_model(tmp_path / "start")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    cfg = TextSelfPlayConfig(iterations=3, group_size=2, max_new_tokens=4)
    (run / "config.json").write_text(json.dumps({"selfplay_text": dataclasses.asdict(cfg),
                                                 "model": str(tmp_path / "start")}))
    with pytest.raises(ValueError, match="a self-play run of an earlier lmlab"):
        run_text_selfplay(tmp_path / "start", run, cfg, log=None, resume=True)


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _calls(action, at):
    """The seed reward, doing `action()` on its `at`-th call (inside that iteration, before its update)."""
    seed, calls = build_reward("seed"), []

    def reward(prompts, texts, ids):
        calls.append(1)
        if len(calls) == at:
            action()
        return seed(prompts, texts, ids)
    return reward


def test_text_selfplay_resumes_exactly(tmp_path):
    """6 iterations uninterrupted == Ctrl-C in iteration 3 (it finishes, checkpoints and stops), resumed, a crash in
    iteration 6 (after the checkpoint of 4 and the metrics line of 5), resumed again: the same metrics lines but
    for the timings, and the same final weights. The prompts and sampling seeds come from the Trainer's data
    generator, which the checkpoint brings back; the model's dropout (0.1) is off in sampling and scoring."""
    start_model(tmp_path / "start", dropout=0.1)
    cfg = TextSelfPlayConfig(iterations=6, prompts_per_iteration=2, group_size=4, max_new_tokens=10, lr=3e-3,
                             save_every=2)
    prompts = ["ab", ""]
    full = run_text_selfplay(tmp_path / "start", tmp_path / "full", cfg, prompts, reward=build_reward("seed"),
                             log=None)
    start, moved = load_pretrained(tmp_path / "start")[0], load_pretrained(tmp_path / "full" / "final")[0]
    change = max((a - b).abs().max().item() for a, b in zip(start.parameters(), moved.parameters()))
    assert change > 1e-3 and any(r["reward_std"] > 0 for r in full)  # the policy moved (and had a signal)

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_text_selfplay(tmp_path / "start", run, cfg, prompts, log=None,
                          reward=_calls(lambda: os.kill(os.getpid(), signal.SIGINT), at=3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert latest_checkpoint(run).name == "step-3" and not (run / "final").exists()
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]

    def boom():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        run_text_selfplay(tmp_path / "start", run, cfg, prompts, log=None, reward=_calls(boom, at=3), resume=True)
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4"]  # the last two

    rows = run_text_selfplay(tmp_path / "start", run, cfg, prompts, log=None, reward=build_reward("seed"),
                             resume=True)
    timings = ("elapsed_s", "tokens_per_s", "mfu")
    drop_wall = lambda rows: [{k: v for k, v in r.items() if k not in timings} for r in rows]  # noqa: E731
    assert drop_wall(_metrics(run)) == drop_wall(rows) == drop_wall(_metrics(tmp_path / "full")) == drop_wall(full)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]
    a, _ = load_pretrained(tmp_path / "full" / "final")
    b, _ = load_pretrained(run / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_text_selfplay_resume_keeps_its_run(tmp_path):
    """Resume needs a checkpoint; keeps the run's settings, prompts and starting weights (it may only go further
    or checkpoint at another pace); and a new run does not start over another run's checkpoints."""
    start = tmp_path / "start"
    start_model(start)
    cfg = TextSelfPlayConfig(iterations=2, prompts_per_iteration=1, group_size=2, max_new_tokens=4, save_every=0)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        run_text_selfplay(start, run, cfg, log=None, resume=True)
    run_text_selfplay(start, run, cfg, log=None)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-2"]  # save_every 0: at the end only
    with pytest.raises(ValueError, match="holds the checkpoints of an earlier run"):
        run_text_selfplay(start, run, cfg, log=None)
    with pytest.raises(ValueError, match=r"lr 5e-05 -> 0\.1.*only iterations and save_every may change"):
        run_text_selfplay(start, run, dataclasses.replace(cfg, lr=0.1), log=None, resume=True)
    with pytest.raises(ValueError, match="other prompts"):
        run_text_selfplay(start, run, cfg, ["ab"], log=None, resume=True)
    with pytest.raises(ValueError, match="at iteration 2, past iterations \\(1\\)"):
        resume_text_selfplay(run, {"iterations": 1}, log=None)
    rows = resume_text_selfplay(run, {"iterations": 3, "save_every": 1}, log=None)  # further, from saved settings
    assert [r["step"] for r in rows] == [1, 2, 3]
    saved = json.loads((run / "config.json").read_text())["selfplay_text"]
    assert (saved["iterations"], saved["save_every"], saved["lr"]) == (3, 1, cfg.lr)
    start_model(start, seed=1)  # the starting model trained meanwhile: the KL anchor would not be the run's
    changed = rf"^cannot resume {re.escape(str(run))}: the weights of the starting model differ"
    with pytest.raises(ValueError, match=changed):
        resume_text_selfplay(run, {"iterations": 4}, log=None)
    start_model(start)
    config = json.loads((run / "config.json").read_text())
    config["selfplay_text"]["lr"] = "fast"  # a config.json edited by hand: a refusal naming it, not a TypeError
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: .*lr"):
        resume_text_selfplay(run, {"iterations": 4}, log=None)
    with pytest.raises(ValueError, match="save_every"):
        TextSelfPlayConfig(save_every=-1)


def test_cli_resume_continues_the_run(tmp_path, capsys):
    """`--resume` takes the run's settings from OUT/config.json, goes further with --iterations, and refuses a
    setting that differs from the run's in one line."""
    from lmlab.cli import main

    start_model(tmp_path / "start")
    run = tmp_path / "run"
    text = ["selfplay", "text", "--out", str(run)]
    assert main([*text, "--model", str(tmp_path / "start"), "--reward", "repetition", "--prompt", "ab",
                 "--iterations", "2", "--group-size", "2", "--prompts-per-iteration", "1",
                 "--max-new-tokens", "4"]) == 0
    assert main([*text, "--resume", "--iterations", "3"]) == 0
    assert f"resumed from {run / 'checkpoints' / 'step-2'} (step 2)" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    assert json.loads((run / "final" / "training.json").read_text())["steps"] == 3
    assert main([*text, "--resume", "--reward", "seed", "--iterations", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reward 'repetition' -> 'seed'" in err[0], err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from lmlab.cli import main

    assert main(["selfplay", "azr", "--out", str(tmp_path), "--seeds", "x"]) == 2
    assert main(["selfplay", "azr", "--out", str(tmp_path), "--quick", "--arms", "nope"]) == 2
    assert main(["selfplay", "text", "--model", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("lmlab: error: ") for e in err)
    text = ["selfplay", "text", "--out", str(tmp_path / "run")]
    for args, words in ((["--resume"], "no checkpoint to resume from"), ([], "--model is required"),
                        (["--resume", "--quick"], "--quick sets up a new run"),
                        (["--model", str(tmp_path), "--save-every", "-1"], "save_every (-1)")):
        assert main([*text, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmlab: error: ") and words in err[0], (args, err)
    with pytest.raises(ValueError, match="ind_inputs"):
        AZRConfig(ind_inputs=3)


def test_prompts_file(tmp_path, capsys):
    """`--prompts-file`: a JSON list of strings, read verbatim; anything else is one line, exit 2, before the
    model is even looked at."""
    from lmlab.cli import main
    from lmlab.lab.selfplay.text import read_prompts_file

    good = tmp_path / "prompts.json"
    good.write_text(json.dumps(["Once upon", "-starts with a dash", "Жил-был\x00"]), encoding="utf-8")
    assert read_prompts_file(good) == ["Once upon", "-starts with a dash", "Жил-был\x00"]
    bad = {"missing.json": None, "not-json.json": "[oops", "object.json": '{"a": 1}', "empty.json": "[]",
           "numbers.json": '["a", 2]', "latin1.json": b'["\xe9"]'}
    args = ["selfplay", "text", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    for name, content in bad.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            (tmp_path / name).write_text(content, encoding="utf-8")
        assert main([*args, "--prompts-file", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmlab: error: ") and "prompts file" in err[0], (name, err)
    assert main([*args, "--prompts-file", str(good), "--prompt", "x"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_short_azr_run_has_proposer_rewards_and_beats_warmup():
    """Must-show: proposer rewards are non-zero and the held-out solve rate rises above warm-up only.

    The short run of docs/LOG.md (2026-12-01): 600 warm-up steps, 40 AZR iterations at the defaults, seeds
    0 and 1 of `lmlab selfplay azr --seeds 4 --warmup-steps 600 --iterations 40`, which measured
    0.158 -> 0.161 and 0.128 -> 0.150. Over 4 seeds the paired gain is +0.013 +/- 0.009 (positive on all
    four), inside the unpaired seed spread; the 200-iteration default run reverses it (AZR below warm-up)."""
    cfg = AZRConfig(warmup_steps=600, iterations=40, eval_every=40)
    torch.set_num_threads(1)
    heldout = azr.heldout_tasks(cfg)
    exclude = {(t.kind, t.program, t.pairs) for t in heldout}
    gains = []
    for seed in (0, 1):
        model = azr.new_model(cfg, seed)
        azr.warmup(model, cfg, seed, exclude)
        start = azr.evaluate(model, heldout, cfg)["solve_rate"]
        run = azr.run_arm("azr", model, cfg, seed, heldout)
        assert max(r.get("proposer_reward_nonzero", 0) for r in run["history"]) > 0
        gains.append(run["history"][-1]["solve_rate"] - start)
    assert sum(gains) / len(gains) > 0, f"AZR minus warm-up only per seed: {gains}"


@pytest.mark.parametrize("damage", ["optimizer.pt", "state.json", "model.safetensors"])
def test_cli_resume_from_a_damaged_checkpoint_is_one_line(damage, tmp_path, capsys):
    """A checkpoint cut short on disk (written whole, then damaged) is one line naming it and the way on (the
    one before it is kept), exit 2, not a traceback."""
    from lmlab.cli import main

    start_model(tmp_path / "start")
    run = tmp_path / "run"
    text = ["selfplay", "text", "--out", str(run)]
    assert main([*text, "--model", str(tmp_path / "start"), "--iterations", "2", "--group-size", "2",
                 "--prompts-per-iteration", "1", "--max-new-tokens", "4", "--save-every", "1"]) == 0
    capsys.readouterr()
    (run / "checkpoints" / "step-2" / damage).write_bytes(b"{")
    assert main([*text, "--resume", "--iterations", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot read the checkpoint {run / 'checkpoints' / 'step-2'}" in err[0], err


@pytest.mark.slow
def test_default_text_selfplay_learns_on_the_demo_model(tmp_path):
    """The defaults on the model `lmlab demo` makes (300 steps): the seed reward starts well below what it can
    reach at the default completion length (0.5 for all-distinct tokens + 0.5 * min(max_new_tokens / 100, 1)),
    and a default run raises it. Measured over seeds 0-2: 0.600 +- 0.003 at the first iteration, 0.634 +- 0.002
    over the last five (KL 0.028)."""
    from lmlab.train import run_demo
    run_demo(tmp_path / "demo", max_steps=300, echo=lambda *a: None)
    cfg = TextSelfPlayConfig()
    rows = run_text_selfplay(tmp_path / "demo" / "final", tmp_path / "sp", cfg, log=None)
    ceiling = 0.5 + 0.5 * min(cfg.max_new_tokens / 100, 1.0)
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-5:]) / 5
    assert first <= ceiling - 0.1, (first, ceiling)
    assert last - first >= 0.02, (first, last)


def test_a_refusal_in_a_worker_process_stays_a_refusal():
    """A ValueError that lmlab raises in a parallel worker is bad input, as in the parent (one line, exit 2);
    one from int() is still a bug: the worker judges it, since its traceback does not cross."""
    from lmlab.cli import is_user_error
    from lmlab.configs import parse_seeds
    from lmlab.lab.parallel import process_map

    with pytest.raises(ValueError, match="must look like 0,1,2") as refused:
        process_map(parse_seeds, ["0,1", "x"], 2)
    assert is_user_error(refused.value)
    with pytest.raises(ValueError, match="invalid literal") as bug:
        process_map(int, ["1", "x"], 2)
    assert not is_user_error(bug.value)


def test_azr_refuses_a_folder_with_an_earlier_run_and_a_failed_run_leaves_none(tmp_path, monkeypatch):
    out = tmp_path / "azr"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "log.txt").write_text("a server's log")  # a server's run folder: not a run's results
    with pytest.raises(ValueError, match=r"azr holds results.json, which this run would overwrite; choose a new"):
        azr.run_experiment(AZRConfig.quick(), [0], out, workers=1)
    assert (out / "results.json").read_text() == "{}" and not (out / "progress.jsonl").exists()
    fresh = tmp_path / "fresh"

    def fails(*args, **kwargs):
        raise ValueError("refused in the run")
    monkeypatch.setattr(azr, "warmup", fails)
    with pytest.raises(ValueError, match="refused in the run"):  # after progress.jsonl
        azr.run_experiment(AZRConfig.quick(warmup_steps=2, iterations=1), [0], fresh, workers=1)
    assert not fresh.exists()


def test_azr_refuses_a_block_size_its_prompts_outgrow_before_it_runs():
    """--references 6 (AZR's K) makes proposer prompts of up to 184 tokens; with the default block_size of 128
    the run failed only when the first long prompt came, after the warm-up. The bound is the longest text the
    formats allow, counted from the prompts themselves."""
    assert azr.longest_sequence(AZRConfig()) == 82  # BOS + 63-token proposer prompt (2 refs) + 18 new tokens
    with pytest.raises(ValueError, match=r"block_size \(128\) must be at least 202"):
        AZRConfig(references=6)
    with pytest.raises(ValueError, match=r"block_size \(81\) must be at least 82"):
        AZRConfig(block_size=81)
    AZRConfig(block_size=82)
    worst = azr.Task("ded", ("REV",) * 6, (((99,) * 8, (99,) * 8),))
    prompt = azr.proposer_prompt("ded", [worst, worst], ())
    assert 1 + len(azr.VOCABULARY.encode(prompt)) + azr.max_new("ded", "propose", AZRConfig()) == 82


def test_azr_measures_huge_reference_and_input_counts_without_writing_them_out():
    """--references 2**63 (or --ind-inputs) was multiplied out into a list to count the prompt's tokens: an
    OverflowError ("internal error"). Each widest reference (induction pair) adds the same tokens, so the length is
    counted on two and extrapolated: equal to the prompts themselves, and a huge count is refused by its length."""
    widest = ((99,) * 8, (99,) * 8)
    for references, ind_inputs in ((0, 2), (1, 4), (2, 6), (3, 8), (7, 14)):
        cfg = dataclasses.replace(AZRConfig(block_size=10_000), references=references, ind_inputs=ind_inputs)
        built = [azr.proposer_prompt(k, [azr.Task(k, ("REV",) * 6, (widest,))] * references, ("REV",) * 6)
                 for k in ("ded", "abd")]
        shown = azr.solver_prompt(azr.Task("ind", ("REV",) * 6, (widest,) * ind_inputs))
        want = max([len(azr.VOCABULARY.encode(p)) + azr.max_new("ded", "propose", cfg) for p in built]
                   + [len(azr.VOCABULARY.encode(shown)) + azr.max_new("ind", "solve", cfg),
                      azr.max_new("ind", "propose", cfg) + len(azr.VOCABULARY.encode(
                          azr.proposer_prompt("ind", [], ("REV",) * 6)))]) + 1
        assert azr.longest_sequence(cfg) == want, (references, ind_inputs)
    big = 2**63  # BOS, 3 tokens of the proposer prompt and 30 a widest reference, 18 new tokens
    with pytest.raises(ValueError, match=rf"^block_size \(128\) must be at least {1 + 3 + 30 * big + 18}: .* "
                                         rf"\(references {big}, ind_inputs 4\)$"):
        AZRConfig(references=big)
    with pytest.raises(ValueError, match=rf"ind_inputs {big}\)$"):
        AZRConfig(ind_inputs=big)


def _arm_result(arm, seed, final):
    return {"arm": arm, "seed": seed, "wall_s": 1.0,
            "history": [{"iteration": 0, "solve_rate": 0.1}, {"iteration": 1, "solve_rate": final}]}


def test_azr_gives_no_verdict_from_one_seed(tmp_path):
    """With one seed both stds are 0, and "beats by more than the sum of the stds" would be any difference."""
    from lmlab.lab.selfplay.report import reproduces, summarize, write_report

    cfg = dataclasses.asdict(AZRConfig.quick())
    one = {"claim": "c", "warmup_note": "w", "config": cfg, "seeds": [0], "heldout_size": 360, "wall_s": 1.0,
           "per_seed": [{"seed": 0, "arms": [_arm_result("warmup_only", 0, 0.2),
                                             _arm_result("azr", 0, 0.2 + 1 / 360)]}]}
    one["summary"] = summarize(one)
    verdict = one["summary"]["verdict"]
    assert verdict["reproduces"] is None and verdict["azr_beats_warmup_only"] is None
    assert verdict["azr_minus_warmup_only"] == 0.0028 and verdict["paired_azr_minus_warmup_only"]["std"] is None
    assert reproduces(verdict) == "inconclusive: needs at least 2 seeds (one seed has no spread to judge a " \
                                  "difference by)"
    write_report(one, tmp_path)
    assert "claim here:</b> inconclusive: needs at least 2 seeds" in (tmp_path / "report.html").read_text()
    two = {**one, "seeds": [0, 1], "per_seed": one["per_seed"] + [
        {"seed": 1, "arms": [_arm_result("warmup_only", 1, 0.2), _arm_result("azr", 1, 0.3)]}]}
    verdict = summarize(two)["verdict"]
    assert verdict["reproduces"] is False and "inconclusive" not in verdict and reproduces(verdict) == "False"


def test_the_random_task_baseline_never_trains_on_held_out_tasks(monkeypatch):
    """As the warm-up: of the 76,800 tasks of the default run's seed 0, 84 were held-out ones (22 distinct)."""
    cfg = AZRConfig()
    keys = {(t.kind, t.program, t.pairs) for t in azr.heldout_tasks(cfg)}
    trained = []

    def solver_samples(model, tasks, cfg, rng):
        for _ in azr.KINDS:
            rng.randrange(2**31)  # what sample() draws per task type
        trained.extend(tasks)
        return [Sample("", [], 0.0, t.kind, "solve") for t in tasks]
    monkeypatch.setattr(azr, "solver_samples", solver_samples)
    monkeypatch.setattr(azr, "update", lambda *a, **k: 0.0)
    rng = random.Random(0 * 1000 + azr.ARMS.index("solver_rl_random"))
    for _ in range(cfg.iterations):
        azr.random_iteration(None, None, cfg, rng, keys)
    assert len(trained) == 76_800 and not [t for t in trained if (t.kind, t.program, t.pairs) in keys]


def test_the_report_counts_the_program_lengths_the_solver_trained_on(tmp_path, monkeypatch):
    """AZR's solver trains on proposals of up to dsl.MAX_OPS ops: the report no longer says lengths above
    train_max_ops never appear in training; it counts them."""
    from lmlab.lab.selfplay.report import summarize, write_report

    cfg = AZRConfig.quick(warmup_steps=20, iterations=2, eval_every=2, heldout_per_stratum=1, seed_rounds=1)
    seen, solver_samples = [], azr.solver_samples

    def recorded(model, tasks, cfg, rng):
        seen.extend(len(t.program) for t in tasks)
        return solver_samples(model, tasks, cfg, rng)
    monkeypatch.setattr(azr, "solver_samples", recorded)
    heldout = azr.heldout_tasks(cfg)
    arms = []
    for arm in ("azr", "solver_rl_random"):
        seen.clear()
        model = azr.new_model(cfg, 0)
        arms.append(azr.run_arm(arm, model, cfg, 0, heldout))
        assert len(seen) == (2 * 3 * 8 if arm == "solver_rl_random" else 2 * 3 * 4)
        assert arms[-1]["solver_lengths"] == {str(n): seen.count(n) for n in sorted(set(seen))}
    results = {"claim": "c", "warmup_note": "w", "config": dataclasses.asdict(cfg), "seeds": [0], "heldout_size": 15,
               "wall_s": 1.0, "per_seed": [{"seed": 0, "arms": arms}]}
    results["summary"] = summarize(results)
    assert results["summary"]["arms"]["azr"]["solver_lengths"] == arms[0]["solver_lengths"]
    write_report(results, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "never appear in training" not in page
    assert (f"by program length (all\nseeds): solver_rl_random {html.escape(json.dumps(arms[1]['solver_lengths']))}; "
            f"azr {html.escape(json.dumps(arms[0]['solver_lengths']))}.") in page


def test_text_selfplay_resume_refuses_an_edited_reward_file(tmp_path):
    """As `tune grpo`: the reward is the file's code, and an edited file would score the rest of the run."""
    start_model(tmp_path / "start")
    reward = tmp_path / "r.py"
    reward.write_text("def score(prompt, completion):\n    return completion.count('a') / max(len(completion), 1)\n")
    cfg = TextSelfPlayConfig(iterations=1, prompts_per_iteration=1, group_size=2, max_new_tokens=4, reward="file")
    run = tmp_path / "run"
    run_text_selfplay(tmp_path / "start", run, cfg, reward_file=f"{reward}:score", log=None)
    reward.write_text("def score(prompt, completion):\n    return 1.0\n")
    with pytest.raises(ValueError, match=rf"^cannot resume {re.escape(str(run))}: the reward file's code differs "
                                         "from the code the run started with"):
        resume_text_selfplay(run, {"iterations": 2}, log=None)


def test_text_selfplay_names_its_own_command_over_an_earlier_run(tmp_path):
    """A folder that holds a finished run (its checkpoints removed) is refused with selfplay text's own resume
    command, before anything is loaded, not `lmlab train`'s from inside the Trainer."""
    start_model(tmp_path / "start")
    cfg = TextSelfPlayConfig(iterations=1, prompts_per_iteration=1, group_size=2, max_new_tokens=4)
    run = tmp_path / "run"
    run_text_selfplay(tmp_path / "start", run, cfg, log=None)
    with pytest.raises(ValueError, match="continue it with --resume, or start over in another folder$"):
        run_text_selfplay(tmp_path / "start", run, cfg, log=None)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run))} already holds a run; resume it \(lmlab selfplay "
                                         rf"text --out {re.escape(str(run))} --resume\) or choose another folder$"):
        run_text_selfplay(tmp_path / "start", run, cfg, reward=lambda *a: pytest.fail("it trained"), log=None)


def test_a_reward_file_may_return_any_finite_real_number(tmp_path):
    """numpy's numbers are accepted (as floats); an int too large for a float is refused in one line, not an
    OverflowError from float() (an "internal error"); a string or a bool is no number."""
    f = tmp_path / "r.py"
    f.write_text("import numpy as np\n"
                 "def f32(p, c):\n    return np.float32(0.75)\n"
                 "def i64(p, c):\n    return np.int64(3)\n"
                 "def huge(p, c):\n    return 10 ** 400\n"
                 "def text(p, c):\n    return '0.5'\n"
                 "def npbool(p, c):\n    return np.bool_(True)\n")
    got = [build_reward("file", reward_file=f"{f}:{name}")(["x"], ["a"], [[1]]) for name in ("f32", "i64")]
    assert got == [[0.75], [3.0]] and all(type(v[0]) is float for v in got)
    with pytest.raises(ValueError, match=r"r.py:huge returned an integer too large for a float; a reward must be a "
                                         r"finite number$"):
        build_reward("file", reward_file=f"{f}:huge")(["x"], ["a"], [[1]])
    for name, shown in (("text", "'0.5'"), ("npbool", "np.True_")):
        with pytest.raises(ValueError, match=rf"r.py:{name} returned {re.escape(shown)}; a reward must be a finite"):
            build_reward("file", reward_file=f"{f}:{name}")(["x"], ["a"], [[1]])
