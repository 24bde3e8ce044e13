"""`lmlab tune arena`: its --quick run's results.json against numbers recomputed here from the models it saved
(samples, win-rates, the exact KL, the per-token changes), the equal budget read back from each method's run,
the pairwise table on hand-made answers, and bad arguments."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_selfplay import _one_thread  # noqa: F401 (an autouse fixture)

from lmlab.cli import main
from lmlab.lab.arena import METHODS, PREFERENCE, pairwise, wilson, win_rate
from lmlab.models import generate_ids
from lmlab.models.io import load_pretrained
from lmlab.tune import preference_task as task


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    out = tmp_path_factory.mktemp("arena") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture: the autouse one is not in effect yet
    try:
        assert main(["tune", "arena", "--out", str(out), "--quick", "--steps", "2", "--seed", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def model(out, name):
    return load_pretrained(out / name / "final")


def test_samples_win_rates_and_kl_recomputed(arena):
    out, res = arena
    cfg, prompts = res["config"], res["prompts"]
    assert len(prompts) == cfg["heldout"] == 16 and cfg["seed"] == 3
    sft, tok = model(out, "sft")
    rows = {r["method"]: r for r in res["table"]}
    assert list(rows) == ["sft", *METHODS]
    for name in rows:
        m = model(out, name)[0]
        ids = [tok.encode(p) for p in prompts]
        outs = generate_ids(m, ids, max_new_tokens=cfg["max_new_tokens"], temperature=1.0, seed=cfg["seed"],
                            eos_token_id=tok.eos_id)
        assert [tok.decode(o) for o in outs] == res["samples"][name]
        assert rows[name]["win_rate_sampled"] == sum(task.follows_rule(p, t) for p, t in
                                                     zip(prompts, res["samples"][name])) / len(prompts)
        assert rows[name]["sampled_95ci"] == wilson(rows[name]["win_rate_sampled"], len(prompts))
        # greedy, recomputed without the KV cache: argmax of a full forward, token by token
        greedy = []
        with torch.no_grad():
            for p in ids:
                seq = list(p)
                while len(seq) - len(p) < cfg["max_new_tokens"]:
                    nxt = int(m(torch.tensor([seq])).logits[0, -1].argmax())
                    if nxt == tok.eos_id:
                        break
                    seq.append(nxt)
                greedy.append(tok.decode(seq[len(p):]))
        assert greedy == res["greedy"][name]
        assert rows[name]["win_rate_greedy"] == sum(map(task.follows_rule, prompts, greedy)) / len(prompts)
        # the exact KL one sequence at a time, the EOS scored where the completion ended with one
        kl, n = 0.0, 0
        with torch.no_grad():
            for p, o in zip(ids, outs):
                full = p + o + [tok.eos_id] * (len(o) < cfg["max_new_tokens"])
                x = torch.tensor([full])
                lp = F.log_softmax(m(x).logits[0, len(p) - 1:len(full) - 1], -1)
                lq = F.log_softmax(sft(x).logits[0, len(p) - 1:len(full) - 1], -1)
                kl += float((lp.exp() * (lp - lq)).sum())
                n += len(full) - len(p)
        assert rows[name]["kl_to_sft"] == pytest.approx(kl / n, rel=1e-4, abs=1e-7)
    assert rows["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-7)
    assert rows["dpo"]["kl_to_sft"] > 1e-5  # two steps moved it: the recomputation compared something
    assert res["pairwise"] == pairwise(prompts, res["samples"])


def test_token_changes_sum_to_the_sequence_change(arena):
    out, res = arena
    sft, tok = model(out, "sft")
    assert set(res["token_changes"]) == set(PREFERENCE)

    def seq_logp(m, prompt_ids, ids):
        x = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            lp = F.log_softmax(m(x).logits[0, :-1].float(), -1)
        return lp[torch.arange(len(prompt_ids) - 1, x.shape[1] - 1), torch.tensor(ids)]

    for method, rows in res["token_changes"].items():
        m = model(out, method)[0]
        assert [(r["side"], r["prompt"]) for r in rows] == [(s, p) for p in res["prompts"][:2]
                                                            for s in ("chosen", "rejected")]
        for r in rows:
            words = task.words_of(r["prompt"])
            assert r["completion"] == (task.preferred if r["side"] == "chosen" else task.rejected)(words)
            assert tok.decode(r["prompt_ids"] + r["ids"][:-1]) == r["prompt"] + r["completion"]
            assert r["ids"][-1] == tok.eos_id and len(r["delta"]) == len(r["ids"]) == len(r["tokens"])
            change = seq_logp(m, r["prompt_ids"], r["ids"]) - seq_logp(sft, r["prompt_ids"], r["ids"])
            torch.testing.assert_close(torch.tensor(r["delta"]), change, atol=1e-5, rtol=1e-4)
            assert r["sum"] == pytest.approx(float(change.sum()), abs=1e-5)
            assert sum(r["delta"]) == pytest.approx(r["sum"], abs=1e-6)
    html = (out / "report.html").read_text(encoding="utf-8")
    first = res["token_changes"]["dpo"][0]
    assert f'title="{first["delta"][0]:+.3f}"' in html and "frontier.png" in html


def test_the_budget_is_the_same_for_every_method(arena):
    out, res = arena
    steps, seqs = res["config"]["steps"], res["config"]["sequences"]
    assert steps == 2 and seqs == 8
    assert {(b["optimizer_steps"], b["sequences_per_step"]) for b in res["budget"]["methods"].values()} == {(2, 8)}
    assert set(res["budget"]["methods"]) == set(METHODS) and "optimizer steps" in res["budget"]["definition"]
    for method in METHODS:
        run = json.loads((out / method / "config.json").read_text())
        lines = [json.loads(x) for x in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert run["train"]["max_steps"] == steps and max(x.get("step", 0) for x in lines) == steps
        assert {k: run["train"][k] for k in ("lr", "warmup_steps", "schedule", "seed")} == {
            "lr": res["config"]["lr"], "warmup_steps": res["config"]["warmup_steps"], "schedule": "cosine", "seed": 3}
        if method == "grpo":
            g = run["grpo"]
            assert g["prompts_per_step"] * g["group_size"] == seqs and g["steps"] == steps
        else:
            assert run["train"]["batch_size"] * (1 if method == "kto" else 2) == seqs
        # GRPO's completions that carried a gradient, read back (a group whose samples all scored the same has
        # none; logged every step here)
        if method == "grpo":
            flat = sum(x["zero_spread_groups"] for x in lines if "zero_spread_groups" in x)
            assert len([x for x in lines if "zero_spread_groups" in x]) == steps
            made = res["budget"]["methods"]["grpo"]
            assert made["completions_with_gradient"] == steps * seqs - flat * g["group_size"]
            assert made["completions_sampled"] == steps * seqs


@pytest.mark.parametrize("k, n", [(191, 200), (99, 200), (200, 200), (0, 200), (3, 16)])
def test_win_rate_intervals_are_wilsons(k, n):
    from scipy.stats import binomtest
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k / n, n) == pytest.approx([ci.low, ci.high], abs=1e-4)


def test_held_out_prompts_are_not_training_prompts():
    trained = {json.loads(x)["prompt"] for name in ("pairs.jsonl", "sft.jsonl")
               for x in (task.shipped() / name).read_text(encoding="utf-8").splitlines()}
    heldout = [json.loads(x)["prompt"]
               for x in (task.shipped() / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(heldout) == 200 and not trained & set(heldout)  # 24 of them were, drawn apart


def test_pairwise_and_win_rate_on_hand_made_answers():
    prompts = ["words: cat dog ->", "words: sun moon ->", "слова: кот дом ->"]
    good = [" cat, dog.", " sun, moon.", " кот, дом."]
    samples = {"a": good, "b": [" cat dog", " sun, moon.", " кот дом"], "c": [" cat, dog", " x", " кот, дом."]}
    assert [win_rate(prompts, s) for s in samples.values()] == [1.0, pytest.approx(1 / 3), pytest.approx(1 / 3)]
    table = {r["method"]: r for r in pairwise(prompts, samples)}
    # a vs b: wins on 1 and 3, ties on 2 -> (2 + 0.5) / 3; b vs c: wins on 2, loses on 3, ties on 1 -> 1.5 / 3
    assert table["a"]["vs b"] == pytest.approx(2.5 / 3) and table["b"]["vs a"] == pytest.approx(0.5 / 3)
    assert table["b"]["vs c"] == pytest.approx(0.5) and table["c"]["vs a"] == pytest.approx(0.5 / 3)
    assert all(table[m][f"vs {m}"] == 0.5 for m in samples)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps must be positive, got 0"),
    (["--model", "{tmp}/nowhere"], "is not a model directory"),
    (["--out", "{tmp}"], "is not empty"),
    # these were numpy's traceback, then TrainConfig's refusal, each after --out was half-made
    (["--seed", "-1"], f"seed must be a whole number in [0, {2**62}] (the trainer's bound), not -1"),
    (["--seed", str(2**64)], f"seed must be a whole number in [0, {2**62}]"),
    (["--seed", str(2**63 - 1)], f"in [0, {2**62}] (the trainer's bound), not {2**63 - 1}"),
    (["--model", "{tmp}/run"], "run is a training run without a final/ model"),  # a run, no final/
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "mine.txt").write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {"max_steps": 5}, "model": {}}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "new")]
    assert main(["tune", "arena", *out, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err and "\n" not in err
    assert (tmp_path / "mine.txt").read_text() == "keep me" and not (tmp_path / "new").exists()


def test_the_reproduce_line_is_quoted_for_a_shell(tmp_path, monkeypatch):
    """The report's command was pasted together: an --out with a space gave a line the shell split in two."""
    import shlex

    import lmlab.lab.arena as arena_module
    seen = {}
    monkeypatch.setattr(arena_module, "run_arena", lambda out, cfg, model_dir=None, command="": seen.update(c=command))
    out = str(tmp_path / "my arena")
    assert main(["tune", "arena", "--out", out, "--quick", "--seed", "3"]) == 0
    assert shlex.split(seen["c"]) == ["lmlab", "tune", "arena", "--out", out, "--seed", "3", "--quick"]
