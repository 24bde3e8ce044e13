"""Test-time compute (lmlab.models.ttc): best-of-N against samples recomputed with generate, majority vote on
planted answers, step-wise beam search of width 1 against greedy decoding, and the CLI's flags."""

import dataclasses
import re
from collections import Counter

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.models import GenerationConfig, ModelConfig, Transformer, generate, generate_ids, ttc
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer

TEXT = "count a in banaka: 3\nwrap kotime: [kotime]\nsort 7 2 9 4: 2 4 7 9\n" * 5


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], kind="char", vocab_size=60)


def tiny(tok, family="llama", **overrides):
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=len(tok), block_size=64,
                             n_kv_head=2 if family == "llama" else None, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # peaked predictions, so samples and beams differ from one another
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    return model


def a_count(prompt, text):
    return float(text.count("a"))


def by_hand(tok, ids, max_new_tokens, stop=None):
    """What a sample costs, walked token by token over the same draw without EOS or stop strings: (tokens
    generated, ended on EOS). An EOS is a generated token; a stop string ends the sample at its last token."""
    for j, t in enumerate(ids):
        if t == tok.eos_id:
            return j + 1, True
        if stop is not None and stop in tok.decode(ids[:j + 1]):
            return j + 1, False
    return max_new_tokens, False


def mean_logp(model, prompt, ids):
    """Mean log-probability per token of ids after prompt, one plain forward in eval mode."""
    was = model.training
    model.eval()
    with torch.no_grad():
        logp = model(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
    model.train(was)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)) / len(ids)


def test_best_of_n_picks_the_best_of_generates_own_samples(tok):
    model = tiny(tok)
    cfg = GenerationConfig(max_new_tokens=12, seed=7, temperature=1.0)
    res = ttc.best_of_n(model, tok, "count a in ", cfg, 6, a_count)
    samples = [generate(model, tok, "count a in ", cfg, seed=7 + i) for i in range(6)]
    rewards = [a_count("", s) for s in samples]
    assert res.candidates == samples and res.scores == rewards
    assert len(set(rewards)) > 1                                  # a real choice
    assert res.text == samples[rewards.index(max(rewards))]      # the first of the best
    # best-of-1 is plain sampling with the same seed
    assert ttc.best_of_n(model, tok, "count a in ", cfg, 1, a_count).text == generate(model, tok, "count a in ", cfg)
    # tokens: counted by hand on the draws without EOS (an EOS costs one token)
    raw = [generate_ids(model, [tok.encode("count a in ")], cfg, seed=7 + i, eos_token_id=None)[0] for i in range(6)]
    assert res.tokens == sum(by_hand(tok, r, 12)[0] for r in raw)


def test_a_stop_string_costs_its_tokens_and_no_eos(tok):
    """A sample that a stop string ends generated no EOS: it is neither counted nor scored with one. Counted and
    scored by hand, token by token, on draws of the same seeds without EOS or stop strings."""
    model = tiny(tok)
    cfg = GenerationConfig(max_new_tokens=12, seed=7, temperature=1.0, stop_strings=["["])
    prompt = tok.encode("count a in ")
    raw = [generate_ids(model, [prompt], cfg, seed=7 + i, eos_token_id=None, stop_strings=[])[0] for i in range(6)]
    cost = [by_hand(tok, r, 12, "[") for r in raw]
    assert {e for _, e in cost} == {True, False} and any(n < 12 for n, e in cost if not e)  # both endings occur
    res = ttc.best_of_n(model, tok, "count a in ", cfg, 6)
    assert res.tokens == sum(n for n, _ in cost)
    # each sample scored over what it generated: its ids up to the stop string, or up to and with its EOS
    want = [mean_logp(model, prompt, r[:n]) for r, (n, _) in zip(raw, cost)]
    assert res.scores == pytest.approx(want, abs=1e-5)
    assert ttc.self_consistency(model, tok, "count a in ", cfg, 6, lambda t: t).tokens == res.tokens


def test_best_of_n_logprob_scores_in_eval_mode(tok):
    """With dropout in training mode the scores (and so the winner) would be random: they are the eval-mode
    ones, the same on every call, and the model is left in the mode it was in."""
    model = tiny(tok, "gpt2", dropout=0.5).train()
    cfg = GenerationConfig(max_new_tokens=8, seed=3, stop_at_eos=False)
    prompt = tok.encode("wrap ")
    want = [mean_logp(model, prompt, generate_ids(model, [prompt], cfg, seed=3 + i, eos_token_id=tok.eos_id)[0])
            for i in range(4)]
    assert ttc.best_of_n(model, tok, "wrap ", cfg, 4).scores == pytest.approx(want, abs=1e-5)
    assert model.training


def test_best_of_n_without_a_reward_takes_the_likeliest_sample(tok):
    model = tiny(tok)
    cfg = GenerationConfig(max_new_tokens=8, seed=3, stop_at_eos=False)
    res = ttc.best_of_n(model, tok, "wrap ", cfg, 4)
    prompt = tok.encode("wrap ")
    means = []
    for i in range(4):
        ids = generate_ids(model, [prompt], cfg, seed=3 + i, eos_token_id=tok.eos_id)[0]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
        means.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)) / len(ids))
    assert res.scores == pytest.approx(means, abs=1e-5)
    assert res.text == res.candidates[max(range(4), key=lambda i: (means[i], -i))]


def test_majority_vote_on_planted_answers():
    assert ttc.majority_vote(["3", "5", "3", "7"]) == ("3", {"3": 2, "5": 1, "7": 1})
    assert ttc.majority_vote(["5", "3", "3", "5", "7"])[0] == "5"      # a tie: the answer seen first
    assert ttc.majority_vote(["3", "5", "5", "3", "7"])[0] == "3"
    assert ttc.majority_vote(["", "", "4"]) == ("4", {"4": 1})          # no answer is no vote
    assert ttc.majority_vote(["", ""]) == (None, {})


def test_self_consistency_votes_over_extracted_answers(tok):
    model = tiny(tok)
    cfg = GenerationConfig(max_new_tokens=6, seed=0)
    extract = lambda t: t[:1]  # noqa: E731  (an answer with few values, so votes collide)
    res = ttc.self_consistency(model, tok, "sort ", cfg, 9, extract)
    samples = [generate(model, tok, "sort ", cfg, seed=i) for i in range(9)]
    answers = [extract(s) for s in samples]
    counts = Counter(a for a in answers if a)
    best = max(counts.values())
    assert best > 1 and res.answer == next(a for a in answers if counts[a] == best)
    assert res.text == samples[answers.index(res.answer)] and res.votes == dict(counts)
    # identical samples (greedy): the vote returns that sample
    same = ttc.self_consistency(model, tok, "sort ", dataclasses.replace(cfg, do_sample=False), 4, extract)
    assert same.candidates == [same.text] * 4 and same.votes == {extract(same.text): 4}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scorer", [None, a_count])
def test_beam_width_one_is_greedy(tok, family, scorer):
    model = tiny(tok, family)
    greedy = generate_ids(model, [tok.encode("wrap ")], max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_id)[0]
    res = ttc.step_beam_search(model, tok, "wrap ", 1, step_tokens=3, max_new_tokens=20, reward=scorer)
    assert res.text == tok.decode(greedy) and len(greedy) > 3
    raw = generate_ids(model, [tok.encode("wrap ")], max_new_tokens=20, do_sample=False, eos_token_id=None)[0]
    assert res.tokens == by_hand(tok, raw, 20)[0]


def test_beam_follows_its_scorer(tok):
    """A reward for starting with the model's second choice: width 2 keeps that branch and returns it."""
    model = tiny(tok)
    with torch.no_grad():
        second = int(model(torch.tensor([tok.encode("wrap ")])).logits[0, -1].topk(2).indices[1])
    want = tok.decode([second])
    res = ttc.step_beam_search(model, tok, "wrap ", 2, step_tokens=2, max_new_tokens=8,
                               reward=lambda p, t: float(t.startswith(want)))
    assert res.text.startswith(want) and res.scores[0] == 1.0


def test_exhaustive_beam_finds_the_likeliest_sequence(tok):
    """Wide enough to keep every sequence of two tokens, the search must return the one with the highest mean
    log-probability per token, found here by brute force (a first-token EOS ends a sequence of one)."""
    model = tiny(tok)
    prompt, V = tok.encode("sort "), len(tok)
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        second = model(torch.tensor([prompt + [t] for t in range(V)])).logits[:, -1].log_softmax(-1)
    seqs = {(t,): float(first[t]) for t in range(V) if t == tok.eos_id}
    seqs.update({(a, b): (float(first[a]) + float(second[a, b])) / 2 for a in range(V) if a != tok.eos_id
                 for b in range(V)})
    best = max(seqs, key=seqs.get)
    res = ttc.step_beam_search(model, tok, "sort ", V * V, step_tokens=1, max_new_tokens=2)
    assert res.text == tok.decode([t for t in best if t != tok.eos_id])
    assert res.scores[0] == pytest.approx(seqs[best], abs=1e-5)
    assert best[0] != int(first.argmax()) or best[1] != int(second[best[0]].argmax())  # not simply greedy


@pytest.fixture
def model_dir(tmp_path, tok):
    return save_pretrained(tmp_path / "model", tiny(tok), tok)


def test_cli_best_of_vote_and_beam(model_dir, capsys):
    base = ["generate", str(model_dir), "--prompt", "count a in banaka:", "--max-new-tokens", "6", "--seed", "1"]
    assert main([*base, "--best-of", "3", "--verifier", "count"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("count a in banaka:") and "best of 3 by count: score" in err
    assert main([*base, "--vote", "3", "--task", "count"]) == 0
    assert "vote of 3: answer" in capsys.readouterr().err
    assert main([*base[:-2], "--beam", "2", "--step-tokens", "2"]) == 0
    assert "beam 2 by logprob" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--best-of", "0", "--verifier", "count"], "--best-of (0) must be >= 1"),
    (["--vote", "4"], "--vote needs --verifier TASK"),
    (["--vote", "4", "--task", "logprob"], "--vote needs a task"),
    (["--best-of", "2"], "--best-of needs --verifier TASK or logprob"),
    (["--best-of", "2", "--vote", "2", "--task", "count"], "give one of --best-of, --vote and --beam"),
    (["--best-of", "2", "--verifier", "nope"], "task ('nope') must be one of"),
    (["--verifier", "count"], "--verifier is for --best-of, --vote or --beam"),
    (["--vote", "2", "--task", "count", "--step-tokens", "2"], "--step-tokens (a number >= 1) is for --beam"),
    (["--best-of", "2", "--verifier", "count", "--num-samples", "2"], "leave out --num-samples"),
    (["--beam", "2", "--num-beams", "2"], "leave out --num-beams"),
    # a prompt the task cannot check: refused before the model loads, not after all the sampling
    (["--best-of", "2", "--verifier", "addition", "--prompt", "the"], "not an addition prompt"),
    (["--best-of", "2", "--verifier", "sort", "--prompt", "sort 1 x:"], "not a sort prompt"),
    (["--best-of", "3", "--verifier", "sort", "--prompt", "the"], "not a sort prompt"),
    (["--vote", "3", "--task", "format", "--prompt", "the"], "not a format prompt"),
    # scoring prompt + sample + EOS in one forward must fit the context (64)
    (["--best-of", "2", "--verifier", "logprob", "--max-new-tokens", "200", "--ignore-eos"],
     "exceeds the model's context (64): lower --max-new-tokens"),
    # step-wise beam search is deterministic and stops at EOS: sampling flags would be silently ignored
    (["--beam", "2", "--temperature", "0.5"], "leave out --temperature"),
    (["--beam", "2", "--seed", "1", "--stop", "x", "--ignore-eos", "--top-k", "3"],
     "leave out --top-k, --stop, --stop-at-eos/--ignore-eos, --seed"),
    # so is HF-style beam search (--num-beams): it took them and printed one text num-samples times
    (["--num-beams", "2", "--num-samples", "2", "--seed", "1", "--temperature", "0.5"],
     "--num-beams is deterministic and ignores stop strings: leave out --temperature, --seed, --num-samples"),
])
def test_cli_bad_flags_are_one_line_exit_2(model_dir, capsys, flags, message):
    assert main(["generate", str(model_dir), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err and "\n" not in err


def test_prompt_is_checked_before_the_model_loads(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no-model"), "--prompt", "the", "--best-of", "2",
                 "--verifier", "addition"]) == 2
    assert "not an addition prompt (like 37+485=): 'the'" in capsys.readouterr().err


@pytest.mark.parametrize("task, prompt", [("addition", "37+x="), ("addition", "the"), ("count", "count ab in x:"),
                                          ("sort", "sort :"), ("sort", "sort 1 x:"), ("format", "wrap a b:")])
def test_task_answer_refuses_a_prompt_of_another_shape(task, prompt):
    from lmlab.tune.rewards import get_task
    with pytest.raises(ValueError, match=f"^not an? {task} prompt .*: {re.escape(repr(prompt))}$"):
        get_task(task).answer(prompt)


def test_lab_scores_groups_of_samples_as_counted_by_hand():
    """16 samples of one prompt whose right answer is A, scored at N = 1, 2, 4, 8, 16 over disjoint groups."""
    from lmlab.lab.ttc import score_samples

    answers = ["A", "B", "B", "", "A", "A", "B", "C"] + ["B"] * 4 + ["A"] * 4
    logp = [-1.0] * 16
    logp[1], logp[5], logp[9] = -0.5, -0.2, -0.1          # the likeliest: 1 (wrong), 5 (right), 9 (wrong)
    spent = [3] * 8 + [5] * 8
    got = score_samples([a == "A" for a in answers], answers, "A", logp, spent)
    acc = {k: [a for a, _ in v] for k, v in got.items()}
    assert acc["sample"] == [7 / 16] * 5                                  # 7 of 16 right
    # vote: pairs A|B (tie: A, seen first), B|-, A|A, B|C, B|B, B|B, A|A, A|A; quads BB-A, AABC, BBBB, AAAA;
    # eights A3:B3 (A first), B4:A4 (B first); all sixteen A7:B7 (A first)
    assert acc["vote"] == [7 / 16, 4 / 8, 2 / 4, 1 / 2, 1.0]
    assert acc["best-of (verifier)"] == [7 / 16, 4 / 8, 3 / 4, 1.0, 1.0]  # any right in the group
    # log-prob: pairs pick 1, 2 (a tie: the earlier), 5, 6, 9, 10, 12, 14 -> 5, 12, 14 right; quads 1, 5, 9, 12;
    # eights 5, 9; all sixteen 9
    assert acc["best-of (log-prob)"] == [7 / 16, 3 / 8, 2 / 4, 1 / 2, 0.0]
    assert [t for _, t in got["vote"]] == [4, 8, 16, 32, 64]              # mean tokens of N samples


def small_large(vote, l1, small_tokens, large_tokens, verifier=(0.3, 0.5, 0.7, 0.9, 1.0)):
    curves = lambda acc, t: {"acc": list(acc), "tokens": [t * n for n in (1, 2, 4, 8, 16)]}  # noqa: E731
    small = {"inference_flops_per_token": 1000.0, "strategies": {
        "sample": curves([vote[0]] * 5, small_tokens), "vote": curves(vote, small_tokens),
        "best-of (verifier)": curves(verifier, small_tokens), "best-of (log-prob)": curves(vote, small_tokens)}}
    large = {"inference_flops_per_token": 4000.0, "strategies": {"sample": curves([l1] * 5, large_tokens)}}
    return small, large


def test_lab_checks_rest_on_the_vote_at_measured_equal_compute():
    from lmlab.lab.ttc import compare

    # the vote gains 0.1 at N=8, the exact checker (the ceiling) 0.6: the check is the vote's, and fails
    cmp = compare(*small_large([0.3, 0.33, 0.36, 0.4, 0.45], 0.2, 4, 8))
    gain, beats = cmp["checks"].values()
    assert not gain and cmp["gain_at_8"]["vote"] == pytest.approx(0.1)
    assert cmp["gain_at_8"]["best-of (verifier)"] == pytest.approx(0.6)
    # compute = tokens x FLOPs per token: the large model's one try (8 x 4000) equals 8 small tries (8 x 4 x 1000),
    # not the 4 the FLOPs-per-token ratio alone would give
    small, large = small_large([0.1, 0.2, 0.3, 0.4, 0.5], 0.35, 4, 8)
    cmp = compare(small, large)
    assert cmp["n"] == 8 and cmp["where"] == "N = 8, measured" and cmp["small"]["vote"] == pytest.approx(0.4)
    assert cmp["flops_ratio"] == 4 and list(cmp["checks"].values()) == [True, True]  # gain 0.3; 0.4 > 0.35
    # between measured Ns the accuracy is interpolated in log2 N, and labelled so
    cmp = compare(*small_large([0.1, 0.2, 0.3, 0.4, 0.5], 0.35, 4, 6))
    assert cmp["n"] == 6 and cmp["where"] == "N = 6.00, interpolated between N = 4 and 8"
    assert cmp["small"]["vote"] == pytest.approx(0.3 + 0.1 * (np.log2(6) - 2))


def test_the_lab_check_is_best_of_n_or_voting_without_a_verifier():
    """The issue's "best-of-N or voting with N = 8 raises accuracy by >= 15 points over N = 1": either strategy
    that needs no verifier may carry it; the exact checker's best-of (pass@N, the ceiling) never does."""
    from lmlab.lab.ttc import compare

    def gain_held(vote8, logprob8):
        small, large = small_large([0.2, 0.2, 0.2, vote8, vote8], 0.9, 4, 8)
        small["strategies"]["best-of (log-prob)"]["acc"] = [0.2, 0.2, 0.2, logprob8, logprob8]
        return list(compare(small, large)["checks"].values())[0]
    assert gain_held(0.36, 0.2) and gain_held(0.2, 0.36)                  # +16 points by either
    assert not gain_held(0.34, 0.34)                                       # +14: below, whatever pass@N says


def test_lab_models_are_the_same_for_the_same_seed_whatever_the_global_generator(tmp_path):
    """`lab ttc --seed S` reproduces its models: the initialisation is seeded too, not only the data order."""
    from safetensors.torch import load_file

    from lmlab.lab.ttc import pretrain
    made = []
    for run, state in enumerate((1, 2)):
        torch.manual_seed(state)
        made.append(load_file(pretrain("count", (1, 16), 2, tmp_path / str(run), seed=3, scored=4)
                              / "model.safetensors"))
    assert made[0].keys() == made[1].keys() and all(torch.equal(made[0][k], made[1][k]) for k in made[0])


def test_lab_training_prompts_leave_out_every_prompt_scored():
    from lmlab.lab.ttc import training_prompts
    from lmlab.tune.rewards import get_task

    scored = get_task("sort").heldout(1500)                # sort has ~10^5 prompts: 20000 draws would hit some
    assert len(scored) == 1500 and not set(training_prompts("sort", 1500)) & set(scored)


def test_lab_ttc_reproduce_line_is_quoted_for_a_shell(tmp_path, monkeypatch):
    import shlex

    from lmlab.lab import ttc as lab
    seen = []
    monkeypatch.setattr(lab, "run", lambda out, quick, scale, command: seen.append(command) or
                        {"verdict": "holds", "measured": "", "speed": {"wall_s": 0}})
    out = str(tmp_path / "my ttc")  # a space: "--out /tmp/my ttc" read back as two arguments
    assert main(["lab", "ttc", "--out", out, "--quick", "--task", "count", "--steps", "3"]) == 0
    assert seen == [f"lmlab lab ttc --out '{out}' --quick --task count --steps 3"]
    assert shlex.split(seen[0])[4] == out


@pytest.mark.slow
def test_lab_ttc_bookkeeping(tmp_path, monkeypatch):
    """`lmlab lab ttc` at a toy scale: with one try every sampling strategy is the one sample, a width-1 beam is
    greedy decoding, an exact verifier over more tries never loses, and the report is written."""
    import json

    from lmlab.lab import ttc as lab

    monkeypatch.setattr(lab.Scale, "default", classmethod(lambda cls, quick: cls(
        task="count", steps=80, prompts=4, small=(1, 32), large=(1, 48), max_new_tokens=6, step_tokens=2)))
    out = tmp_path / "my ttc"  # a space: the report's Reproduce line was not quoted
    assert main(["lab", "ttc", "--out", str(out), "--quick"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == f"lmlab lab ttc --out '{out}' --quick"
    small = res["models"]["small"]
    one = {k: v["acc"][0] for k, v in small["strategies"].items()}
    assert 0 < one["sample"] < 1                            # the toy model is right sometimes: the checks bite
    assert one["vote"] == one["best-of (verifier)"] == one["best-of (log-prob)"] == one["sample"]
    assert one["beam (log-prob)"] == one["beam (verifier)"] == small["greedy"]["acc"]
    assert small["strategies"]["beam (log-prob)"]["tokens"][0] == small["greedy"]["tokens"]
    oracle = small["strategies"]["best-of (verifier)"]["acc"]
    assert oracle == sorted(oracle) and oracle[-1] > oracle[0]
    tokens = small["strategies"]["vote"]["tokens"]
    assert tokens == pytest.approx([tokens[0] * n for n in (1, 2, 4, 8, 16)])  # N tries cost N times one try
    assert "beam (verifier)" not in res["models"]["large"]["strategies"]
    assert res["flops_ratio"] == pytest.approx(res["models"]["large"]["inference_flops_per_token"]
                                               / small["inference_flops_per_token"])
    assert {p.name for p in out.glob("*.png")} == {"accuracy_tokens_small.png", "accuracy_tokens_large.png",
                                                   "small_vs_large.png"}
    assert main(["lab", "ttc", "--out", str(out)]) == 2                             # never over earlier results


def test_api_generate_best_of_vote_and_beam_are_the_librarys(tmp_path, tok):
    from test_server_support import client, settings

    from lmlab.models.io import load_pretrained
    from lmlab.server.schemas import GenerateRequest
    from lmlab.server.services import generation_config
    from lmlab.tune.rewards import TASKS

    ws = tmp_path / "ws"
    save_pretrained(ws / "models" / "m", tiny(tok), tok)
    model, _ = load_pretrained(ws / "models" / "m")
    prompt, count = "count a in banaka:", TASKS["count"]
    base = {"model": "m", "prompt": prompt, "max_new_tokens": 6, "seed": 1}
    cfg = generation_config(GenerateRequest(**base))
    check = lambda p, t: float(count.check(p, t))  # noqa: E731
    with client(settings(ws)) as c:
        got = c.post("/api/v1/generate", json={**base, "best_of": 3, "verifier": "count"}).json()
        want = ttc.best_of_n(model, tok, prompt, cfg, 3, check, add_bos=True)
        assert (got["text"], got["candidates"], got["scores"], got["new_tokens"], got["strategy"]) == \
            (want.text, want.candidates, want.scores, want.tokens, "best-of")
        got = c.post("/api/v1/generate", json={**base, "best_of": 3}).json()  # the model's own log-prob
        want = ttc.best_of_n(model, tok, prompt, cfg, 3)
        assert got["text"] == want.text and got["scores"] == pytest.approx(want.scores, abs=1e-6)
        got = c.post("/api/v1/generate", json={**base, "vote": 4, "verifier": "count"}).json()
        want = ttc.self_consistency(model, tok, prompt, cfg, 4, count.extract, add_bos=True)
        assert (got["text"], got["answer"], got["votes"]) == (want.text, want.answer, want.votes or None)
        got = c.post("/api/v1/generate", json={"model": "m", "prompt": "sort ", "max_new_tokens": 6, "beam": 2,
                                               "step_tokens": 2}).json()
        want = ttc.step_beam_search(model, tok, "sort ", 2, step_tokens=2, max_new_tokens=6)
        assert (got["text"], got["candidates"], got["new_tokens"]) == (want.text, want.candidates, want.tokens)
        for body, status, detail in [
            ({"best_of": 2, "vote": 2, "verifier": "count"}, 422, "give one of best_of, vote and beam"),
            ({"vote": 2}, 422, "vote needs a task as verifier"),
            ({"best_of": 2, "verifier": "nope"}, 422, "verifier must be logprob or one of addition"),
            ({"verifier": "count"}, 422, "verifier and step_tokens are for best_of, vote or beam"),
            ({"beam": 2, "temperature": 0.5}, 422, "beam is deterministic and stops at EOS: leave out seed, "
                                                   "temperature"),
            ({"best_of": 2, "verifier": "addition"}, 422, "the addition task cannot read this prompt"),
            ({"best_of": 2, "num_beams": 2}, 422, "best_of searches on its own: leave num_beams at 1"),
            ({"best_of": 2, "max_new_tokens": 200, "stop_at_eos": False}, 422,
             "prompt + max_new_tokens (18 + 200 tokens) exceeds the model's context (64)"),
        ]:
            r = c.post("/api/v1/generate", json={**base, **body})
            assert r.status_code == status and r.json()["detail"].startswith(detail), (body, r.text)
        r = c.post("/api/v1/generate/stream", json={**base, "best_of": 2})
        assert r.status_code == 422 and "use POST /api/v1/generate" in r.json()["detail"]


def test_lab_ttc_refuses_more_prompts_than_it_can_hold_out(tmp_path, capsys, monkeypatch):
    # this ran for minutes (4 million draws for sort's 111,000 prompts, then 20 million for training ones) and failed
    assert main(["lab", "ttc", "--quick", "--prompts", "200000", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("lmlab: error: prompts (200000) must be at most 10,000: the scored prompts are "
                                       "held out of training, and on sort (111,000 prompts, drawn unevenly) that many "
                                       "already cover about half of all draws\n")
    assert not (tmp_path / "o").exists()
    # a task of fewer prompts than asked is refused too (heldout gives what it has), before anything trains
    from lmlab.lab import ttc as lab
    from lmlab.tune import rewards
    tiny = rewards.Task("tiny", lambda rng: f"sort {rng.randrange(3)}:", rewards._sort_answer)
    monkeypatch.setitem(rewards.TASKS, "tiny", tiny)
    with pytest.raises(ValueError, match="^task tiny gives 3 distinct prompts, fewer than the 5 asked; ask for fewer$"):
        lab.run(tmp_path / "t", scale=lab.Scale(task="tiny", prompts=5))
    assert not (tmp_path / "t").exists()
