"""Test-time compute (lmlab.models.ttc): best-of-N against samples recomputed with generate, majority vote on
planted answers, step-wise beam search of width 1 against greedy decoding, and the CLI's flags."""

import dataclasses
from collections import Counter

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


def tiny(tok, family="llama"):
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=len(tok), block_size=64,
                             n_kv_head=2 if family == "llama" else None)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # peaked predictions, so samples and beams differ from one another
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    return model


def a_count(prompt, text):
    return float(text.count("a"))


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
    # tokens: each sample's ids, plus its EOS where it stopped before max_new_tokens
    rows = [generate_ids(model, [tok.encode("count a in ")], cfg, seed=7 + i, eos_token_id=tok.eos_id)[0]
            for i in range(6)]
    assert res.tokens == sum(min(len(r) + 1, 12) for r in rows)


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
    assert res.tokens == min(len(greedy) + 1, 20)


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
    assert main([*base, "--beam", "2", "--step-tokens", "2"]) == 0
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
])
def test_cli_bad_flags_are_one_line_exit_2(model_dir, capsys, flags, message):
    assert main(["generate", str(model_dir), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err and "\n" not in err


def test_lab_ttc_bookkeeping(tmp_path, monkeypatch):
    """`lmlab lab ttc` at a toy scale: with one try every sampling strategy is the one sample, a width-1 beam is
    greedy decoding, an exact verifier over more tries never loses, and the report is written."""
    import json

    from lmlab.lab import ttc as lab

    monkeypatch.setattr(lab.Scale, "default", classmethod(lambda cls, quick: cls(
        task="count", steps=80, prompts=4, small=(1, 32), large=(1, 48), max_new_tokens=6, step_tokens=2)))
    assert main(["lab", "ttc", "--out", str(tmp_path / "ttc"), "--quick"]) == 0
    res = json.loads((tmp_path / "ttc" / "results.json").read_text())
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
    assert {p.name for p in (tmp_path / "ttc").glob("*.png")} == {"accuracy_tokens_small.png",
                                                                  "accuracy_tokens_large.png", "small_vs_large.png"}
    assert main(["lab", "ttc", "--out", str(tmp_path / "ttc")]) == 2               # never over earlier results
