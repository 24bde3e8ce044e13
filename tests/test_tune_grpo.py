"""`lmlab tune grpo`: advantages and each variant's loss against the formulas written out here, zero-spread
groups dropped and counted, scoring that agrees with sampling under dropout, exact resume, the tasks'
checkers on hand cases, and bad flags as one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_selfplay import _one_thread, start_model  # noqa: F401 (_one_thread: an autouse fixture)

from lmlab.models.io import load_pretrained
from lmlab.tune.grpo import (
    GRPO,
    GRPOConfig,
    PromptSource,
    group_advantages,
    has_spread,
    policy_loss,
    resume_grpo,
    run_grpo,
)
from lmlab.tune.rewards import TASKS, get_task

TIMINGS = ("elapsed_s", "tokens_per_s", "mfu")


def _start_model(path, seed=0, dropout=0.0):
    """A 1-layer model with a char tokenizer that knows the tasks' characters, saved at `path`."""
    return start_model(path, seed, dropout, "0123456789+= abcdefghijklmnopqrstuvwxyz[]:\n" * 5, block_size=48)


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


# ---- advantages and losses against the formulas ---------------------------------------------------------------


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0])
    # group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.577350; group 2 flat; group 3: mean 0.75, sample std
    # sqrt((3 * 0.5625 + 5.0625) / 3) = 1.5
    s1 = math.sqrt(1 / 3) + 1e-4
    want = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0, 0, 0, 0, -0.75 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001,
            2.25 / 1.5001]
    assert group_advantages(r, 4).tolist() == pytest.approx(want, abs=1e-6)
    assert group_advantages(r, 4, scale=False).tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25])  # Dr. GRPO: no std
    assert has_spread(r, 4).tolist() == [True, False, True]


def _fixed_batch():
    """Three completions of lengths 3, 1 and 2 (of 3 columns), with ratios on both sides of the clip range."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    old = torch.log(torch.tensor([[0.5, 0.4, 0.2], [0.3, 0.9, 0.9], [0.1, 0.25, 0.6]]))
    ratios = torch.tensor([[1.0, 1.25, 0.7], [1.5, 1.0, 1.0], [1.0, 0.9, 1.1]])
    logp = old + torch.log(ratios)
    ref = torch.log(torch.tensor([[0.4, 0.5, 0.2], [0.3, 0.5, 0.5], [0.5, 0.2, 0.5]]))
    adv = torch.tensor([1.0, -2.0, 0.5])
    return logp, old, ref, mask, adv, ratios


def _by_hand(variant, eps_low, eps_high, beta, max_new_tokens=5):
    logp, old, ref, mask, adv, ratios = _fixed_batch()
    per_row, lengths = [], []
    for i in range(3):
        terms = []
        for t in range(3):
            if not mask[i, t]:
                continue
            rho, a = ratios[i, t].item(), adv[i].item()
            surrogate = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            d = ref[i, t].item() - logp[i, t].item()
            terms.append(surrogate + beta * (math.exp(d) - d - 1))
        per_row.append(terms)
        lengths.append(len(terms))
    if variant == "grpo":   # each completion's token mean, then the mean over completions
        return sum(sum(t) / n for t, n in zip(per_row, lengths)) / 3
    if variant == "dr_grpo":  # token sum over completions x max_new_tokens
        return sum(map(sum, per_row)) / (3 * max_new_tokens)
    return sum(map(sum, per_row)) / sum(lengths)  # dapo: token sum over all completion tokens


@pytest.mark.parametrize("variant, eps_high", [("grpo", 0.2), ("dr_grpo", 0.2), ("dapo", 0.28)])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_each_variant_loss_on_a_fixed_batch(variant, eps_high, beta):
    logp, old, ref, mask, adv, ratios = _fixed_batch()
    loss, stats = policy_loss(logp, old, mask, adv, variant=variant, epsilon=0.2, epsilon_high=eps_high,
                              max_new_tokens=5, ref_logp=ref, kl_coef=beta)
    assert loss.item() == pytest.approx(_by_hand(variant, 0.2, eps_high, beta), abs=1e-6)
    # clipped where the clip binds: 1.25 at advantage 1 (above 1.2, not above 1.28). 0.7 at advantage 1 and 1.5
    # at -2 are outside the range on the side where the unclipped term is the smaller: their gradient stays (it
    # counted them, 3/6 and 2/6: a share that said nothing of what the clip took out)
    assert stats["clipped"].item() == pytest.approx((1 if eps_high == 0.2 else 0) / 6)
    assert stats["ratio"].item() == pytest.approx((1 + 1.25 + 0.7 + 1.5 + 0.9 + 1.1) / 6)


def test_the_gradient_is_the_policy_gradient_at_ratio_one():
    """At pi = pi_old the surrogate's gradient is -A * grad log pi per token, normalised by the variant."""
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.2, 0.4]])).requires_grad_()
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = policy_loss(logp, logp.detach(), mask, torch.tensor([2.0, -1.0]), variant="dapo", epsilon=0.2,
                          epsilon_high=0.28, max_new_tokens=2)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])


# ---- the rollout source -------------------------------------------------------------------------------------


def test_zero_spread_groups_are_dropped_and_counted(tmp_path):
    model, tok = _start_model(tmp_path / "m")
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=6)
    source = PromptSource(tok, 48, 6, prompts=["ab", "cd", "ef"])

    def reward(prompts, texts, ids):  # "cd" always 1, "ef" always 0: no signal; "ab" by length
        return [1.0 if p == "cd" else 0.0 if p == "ef" else float(len(i)) + i[0] for p, i in zip(prompts, ids)]
    grpo = GRPO(model, tok, cfg, source, reward)
    batch = grpo.sample_batch(12, 20, torch.Generator().manual_seed(0))
    assert batch["inputs"].shape[0] == 4 and batch["advantages"].shape == (4,)  # only the "ab" group
    assert grpo.stats["zero_spread_groups"].item() == 2
    assert batch["inputs"][:, :2].tolist() == [tok.encode("ab")] * 4
    loss, metrics = grpo.loss(model, batch)
    assert metrics["zero_spread_groups"].item() == 2 and loss.requires_grad
    assert grpo.trained_tokens(batch) == 4 * batch["inputs"].shape[1]  # tokens/s and MFU count these rows only

    flat = GRPO(model, tok, cfg, source, lambda p, t, i: [0.5] * len(p))  # nothing to learn: an empty batch
    batch = flat.sample_batch(12, 20, torch.Generator().manual_seed(0))
    assert batch["inputs"].shape[0] == 0 and flat.stats["zero_spread_groups"].item() == 3
    loss, _ = flat.loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


def _reward_ab_by_length(prompts, texts, ids):  # "cd" always 1, "ef" always 0: no signal; "ab" by length
    return [1.0 if p == "cd" else 0.0 if p == "ef" else float(len(i)) + i[0] for p, i in zip(prompts, ids)]


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_dropping_the_flat_groups_changes_no_gradient(tmp_path, monkeypatch, variant):
    """The step on the batch without its flat groups is the step on the whole batch (TRL's, whose normalisers
    count every completion): each variant normalises by the whole batch's completions or tokens. It normalised by
    the kept rows, a step 3x too large here (1 group of 3 kept)."""
    model, tok = _start_model(tmp_path / "m")
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=6, variant=variant)
    source = PromptSource(tok, 48, 6, prompts=["ab", "cd", "ef"])
    grads = []
    for keep_all in (False, True):
        if keep_all:  # every group kept, as TRL trains on the batch
            monkeypatch.setattr("lmlab.tune.grpo.has_spread", lambda r, g: torch.ones(r.numel() // g, dtype=torch.bool))
        grpo = GRPO(model, tok, cfg, source, _reward_ab_by_length)
        batch = grpo.sample_batch(12, 20, torch.Generator().manual_seed(0))
        assert batch["inputs"].shape[0] == (12 if keep_all else 4)
        model.zero_grad(set_to_none=True)
        grpo.loss(model, batch)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8), (grads[0] - grads[1]).abs().max()
    assert batch["batch_tokens"] == batch["mask"].sum().item() and batch["batch_rows"] == 12


def test_with_a_kl_term_the_flat_groups_stay_for_their_kl(tmp_path):
    """kl_coef > 0: the KL penalises every completion (DeepSeekMath eq. 3, TRL), so no group is dropped; the
    flat ones are counted and have advantage 0."""
    model, tok = _start_model(tmp_path / "m")
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=6, kl_coef=0.1)
    grpo = GRPO(model, tok, cfg, PromptSource(tok, 48, 6, prompts=["ab", "cd", "ef"]), _reward_ab_by_length,
                reference=load_pretrained(tmp_path / "m")[0])
    batch = grpo.sample_batch(12, 20, torch.Generator().manual_seed(0))
    assert batch["inputs"].shape[0] == 12 and grpo.stats["zero_spread_groups"].item() == 2
    assert batch["advantages"][4:].tolist() == [0.0] * 8 and batch["ref_logp"].shape[0] == 12


def test_tokens_per_s_and_mfu_count_only_the_rows_trained_on(tmp_path):
    """A reward that is the same for every completion: every group is dropped, no row is trained on, and the
    logged tokens/s and MFU are 0. They counted the whole batch, trained or not (the arena's last GRPO steps,
    every group solved, showed an MFU of 140%)."""
    _start_model(tmp_path / "start")
    (tmp_path / "flat.py").write_text("def reward(prompt, text):\n    return 0.5\n", encoding="utf-8")
    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4, save_every=0)
    rows = run_grpo(tmp_path / "start", tmp_path / "run", cfg, reward="file", prompts=["ab", "c"],
                    reward_file=f"{tmp_path / 'flat.py'}:reward", log=None).history
    assert [(r["zero_spread_groups"], r["tokens_per_s"], r["mfu"]) for r in rows] == [(2.0, 0.0, 0.0)] * 2


def test_a_resume_refuses_an_edited_reward_file(tmp_path):
    """Only the reward file's path was recorded: a resume after the file was edited scored the rest of the run
    with other code (reward 3 -> -100) and reported it as the same run. Its hash is recorded now, and a resume
    with other code is refused; the same code resumes."""
    _start_model(tmp_path / "start")
    reward = tmp_path / "rew.py"
    reward.write_text("def r(prompt, text):\n    return float(len(text) % 3)\n", encoding="utf-8")
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, save_every=1)
    run_grpo(tmp_path / "start", tmp_path / "run", cfg, reward="file", prompts=["ab", "c"],
             reward_file=f"{reward}:r", log=None)
    kept = reward.read_text()
    reward.write_text("def r(prompt, text):\n    return -100.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="the reward file's code differs from the code the run started with"):
        resume_grpo(tmp_path / "run", {"steps": 2}, log=None)
    reward.write_text(kept, encoding="utf-8")
    assert len(resume_grpo(tmp_path / "run", {"steps": 2}, log=None).history) == 2


def test_scoring_agrees_with_sampling_under_dropout(tmp_path):
    """A model whose config carries dropout 0.1 (as imported GPT-2 models do): the first step's importance
    ratio is exactly 1 and its KL to the (identical) starting model exactly 0, since both are taken with dropout
    off as the samples were drawn. Scored in train mode, as self-play did, neither holds."""
    _start_model(tmp_path / "start", dropout=0.1)
    cfg = GRPOConfig(steps=2, prompts_per_step=3, group_size=8, max_new_tokens=12, kl_coef=0.1, lr=1e-2,
                     save_every=0)
    rows = run_grpo(tmp_path / "start", tmp_path / "run", cfg, reward="seed", prompts=["ab", "c", "de"],
                    log=None).history
    assert rows[0]["zero_spread_groups"] < 3  # some completions were trained on
    assert rows[0]["ratio"] == 1.0 and rows[0]["kl"] == 0.0
    assert rows[1]["kl"] > 0  # the policy moved after the first update


# ---- runs -----------------------------------------------------------------------------------------------------


def test_a_grpo_run_resumes_exactly(tmp_path):
    """Stopped at step 3 and resumed to 6: the same metric rows (within 1e-6, timings aside) and the same final
    weights as 6 steps at once; the prompts and sampling seeds come from the Trainer's generator, the prompts'
    turn from the objective's state in the checkpoint."""
    _start_model(tmp_path / "start", dropout=0.1)
    cfg = GRPOConfig(steps=6, prompts_per_step=2, group_size=4, max_new_tokens=8, kl_coef=0.05, lr=5e-3,
                     variant="dr_grpo", save_every=2)
    prompts = ["ab", "c", "de"]
    run_grpo(tmp_path / "start", tmp_path / "full", cfg, reward="seed", prompts=prompts, log=None)
    run = tmp_path / "run"
    run_grpo(tmp_path / "start", run, GRPOConfig(**{**cfg.__dict__, "steps": 3}), reward="seed", prompts=prompts,
             log=None)
    rows = resume_grpo(run, {"steps": 6}, log=None).history
    full = _metrics(tmp_path / "full")
    assert [r["step"] for r in rows] == list(range(1, 7)) and any(r["reward_std"] > 0 for r in full)
    for a, b in zip(_metrics(run), full, strict=True):
        assert a.keys() == b.keys()
        for k in a.keys() - set(TIMINGS):
            assert a[k] == (pytest.approx(b[k], abs=1e-6) if isinstance(b[k], float) else b[k]), k
    x, _ = load_pretrained(tmp_path / "full" / "final")
    y, _ = load_pretrained(run / "final")
    moved = load_pretrained(tmp_path / "start")[0]
    assert max((p - q).abs().max().item() for p, q in zip(x.parameters(), moved.parameters())) > 1e-3
    for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    with pytest.raises(ValueError, match=r"kl_coef 0\.05 -> 0\.2.*only steps"):
        resume_grpo(run, {"steps": 7, "kl_coef": 0.2}, log=None)


def test_a_lora_grpo_run_keeps_the_base_as_its_reference_and_resumes_exactly(tmp_path, capsys):
    """--lora-rank: only the adapters train (the base's weights bit for bit the same after the run); the KL is to
    the base, the policy with its adapters off (0 at step 1, then not: were the adapters left on, the policy
    would be its own reference and the KL 0 throughout); stopped at 3 and resumed to 6, the same rows as 6 at
    once; `peft` reads RUN/adapter on the HF export with lmlab's logits."""
    from test_lora import as_before_role_heads, assert_peft_agrees

    from lmlab.cli import main
    from lmlab.tune.lora import LoRAConfig, load_adapter
    _start_model(tmp_path / "start", dropout=0.1)
    cfg = GRPOConfig(steps=6, prompts_per_step=2, group_size=4, max_new_tokens=8, kl_coef=0.05, lr=3e-2,
                     save_every=3)
    run = dict(reward="seed", prompts=["ab", "c", "de"], log=None, lora=LoRAConfig(rank=4))
    run_grpo(tmp_path / "start", tmp_path / "full", cfg, **run)
    run_grpo(tmp_path / "start", tmp_path / "run", GRPOConfig(**{**cfg.__dict__, "steps": 3}), **run)
    as_before_role_heads(tmp_path / "run")  # a run started before those LoRAConfig fields resumes too
    assert resume_grpo(tmp_path / "run", {"steps": 6}, log=None).steps == 6
    full = _metrics(tmp_path / "full")
    assert full[0]["kl"] == 0.0 and full[-1]["kl"] > 1e-4
    for a, b in zip(_metrics(tmp_path / "run"), full, strict=True):
        assert a.keys() == b.keys()
        for k in a.keys() - set(TIMINGS):
            assert a[k] == (pytest.approx(b[k], abs=1e-6) if isinstance(b[k], float) else b[k]), k
    base = load_file(tmp_path / "start" / "model.safetensors")
    saved = load_file(tmp_path / "full" / "checkpoints" / "step-6" / "model.safetensors")
    assert {k for k in saved if "lora_" not in k} == set(base)
    for name, weight in base.items():
        assert torch.equal(saved[name], weight), name
    adapted = load_adapter(load_pretrained(tmp_path / "start")[0], tmp_path / "full" / "adapter")
    x = torch.randint(0, adapted.config.vocab_size, (2, 24))
    with torch.no_grad():
        for run_dir in ("full", "run"):  # final/: the base with the adapter merged, the resumed run's too
            torch.testing.assert_close(load_pretrained(tmp_path / run_dir / "final")[0].eval()(x).logits,
                                       adapted.eval()(x).logits, atol=1e-5, rtol=0)
    assert_peft_agrees(tmp_path / "start", tmp_path / "full" / "adapter", adapted, tmp_path / "hf")
    # a resumed run keeps its own adapters' settings
    assert main(["tune", "grpo", "--out", str(tmp_path / "run"), "--resume", "--lora-rank", "8"]) == 2
    assert "drop --lora-rank" in capsys.readouterr().err


def test_cli_tune_grpo_on_a_task(tmp_path, capsys):
    from lmlab.cli import main

    _start_model(tmp_path / "start")
    out = tmp_path / "run"
    assert main(["tune", "grpo", "--model", str(tmp_path / "start"), "--task", "format", "--out", str(out),
                 "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6",
                 "--eval-prompts", "8"]) == 0
    assert "held-out pass@1 0.000" in capsys.readouterr().out  # an untrained model wraps nothing
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["heldout_pass1"] == 0.0
    assert all(r["sample"] is not None and "reward" in r for r in rows)
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"] == "format" and saved["grpo"]["steps"] == 2
    assert main(["tune", "grpo", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    assert json.loads((out / "final" / "training.json").read_text())["steps"] == 3


@pytest.mark.parametrize("flags, words", [
    (["--task", "format", "--variant", "ppo"], "variant ('ppo') must be one of grpo, dr_grpo, dapo"),
    (["--task", "nope"], "task ('nope') must be one of addition, count, sort, format"),
    (["--task", "format", "--reward", "seed"], "give --task NAME"),
    ([], "give --task NAME"),
    (["--task", "format", "--group-size", "1"], "group_size"),
    # drew held-out prompts for minutes, wrote the run's files, then refused the task without naming the setting
    (["--task", "addition", "--eval-prompts", "1000000"], "eval_prompts (1000000) must be <= 100000"),
    (["--task", "format", "--prompt", "x"], "drop --prompt"),
    (["--reward", "file"], "--reward-file"),
    (["--reward", "seed", "--max-new-tokens", "60"], "exceeds the model's context (48)"),
    (["--reward", "seed", "--prompt", "a\udcff"],  # argv's bytes that are not UTF-8
     "the text is not valid Unicode: a lone surrogate at character 2"),
    (["--resume"], "drop --model"),
    (["--task", "format", "--lora-rank", "4", "--lora-dropout", "0.1"], "--lora-dropout does not apply"),
    (["--task", "format", "--lora-targets", "c_attn"], "--lora-targets needs --lora-rank"),
    (["--task", "format", "--lora-rank", "4", "--lora-targets", "q_proj"], "unknown LoRA target 'q_proj' for a "
                                                                           "gpt2 model"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, words):
    from lmlab.cli import main

    _start_model(tmp_path / "start")
    argv = ["tune", "grpo", "--model", str(tmp_path / "start"), "--out", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error:") and words in err[0], err
    assert not (tmp_path / "run" / "final").exists()


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    from lmlab.cli import main

    assert main(["tune", "grpo", "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err
    # a folder that is no run (a typo in --out) is not to be deleted: it is said to be no run
    assert "no checkpoint to resume from" in err and "is not a run folder (no config.json)" in err
    assert "delete" not in err
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text("{}")  # a run stopped before its first checkpoint
    assert main(["tune", "grpo", "--out", str(tmp_path / "started"), "--resume"]) == 2
    assert "the run stopped before its first checkpoint" in capsys.readouterr().err


# ---- the tasks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, prompt, answer, right, wrong", [
    ("addition", "37+485=", "522", ["522", " 522 \n1+1=2", "522\n"], ["523", "5 22", "0522", "522x", ""]),
    ("addition", "999+1=", "1000", ["1000"], ["100"]),
    ("count", "count a in banaka:", "3", ["3", "3\nmore"], ["2", "three", "3 a"]),
    ("count", "count z in kotime:", "0", ["0"], ["1"]),
    ("sort", "sort 7 2 9 4:", "2 4 7 9", ["2 4 7 9", "2 4 7 9\n"], ["2 4 9 7", "2479", "9 7 4 2"]),
    ("sort", "sort 3 3 1:", "1 3 3", ["1 3 3"], ["1 3"]),
    ("format", "wrap kotime:", "[kotime]", ["[kotime]", "[kotime]\nok"], ["kotime", "[kotime", "[kotime] x",
                                                                          "[kotim]"]),
])
def test_task_checkers_on_hand_cases(task, prompt, answer, right, wrong):
    t = get_task(task)
    assert t.answer(prompt) == answer
    for text in right:
        assert t.check(prompt, text), text
    for text in wrong:
        assert not t.check(prompt, text), text
    assert t.reward([prompt, prompt], [right[0], wrong[0]], [[], []]) == [1.0, 0.0]


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_heldout_prompts_are_apart(name):
    import random

    task = get_task(name)
    heldout = task.heldout(50)
    assert heldout == task.heldout(50) and len(set(heldout)) == 50  # fixed and distinct
    train = task.train_prompts(random.Random(7), 300, set(heldout))
    assert not set(train) & set(heldout)
    assert train == task.train_prompts(random.Random(7), 300, set(heldout))  # by the seed
    for p in train[:20]:
        assert task.check(p, task.answer(p))


def test_a_grpo_run_resumes_from_another_folder(tmp_path, monkeypatch):
    """The run recorded its starting model and reward file as typed (relative), and --resume, which takes
    neither, looked them up from wherever the user stood: "model directory not found: start". Both are
    recorded resolved now; a run recorded the old way still resumes from its own folder."""
    _start_model(tmp_path / "start")
    (tmp_path / "rw.py").write_text("def score(prompt, completion):\n    return float(len(completion) % 3)\n")
    monkeypatch.chdir(tmp_path)
    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=3, max_new_tokens=4, save_every=1)
    run_grpo("start", "run", cfg, reward="file", reward_file="rw.py:score", prompts=["ab"], log=None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["init"] == str(tmp_path / "start") and saved["reward_file"] == f"{tmp_path / 'rw.py'}:score"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert resume_grpo("../run", {"steps": 3}, log=None).steps == 3
    # recorded as typed by an earlier lmlab: resumed from the folder it was started in, as before
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "init": "start", "reward_file": "rw.py:score"}))
    assert resume_grpo("run", {"steps": 4}, log=None).steps == 4
