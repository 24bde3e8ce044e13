"""The scorer against references: batched = one by one = KV-cached, the strided bits per byte against a
brute-force loop, the metrics against sacrebleu / rouge-score called directly, probes, the bootstrap, tasks."""

import json
import math
import re

import numpy as np
import pytest
import torch

from lmlab.eval import (
    corpus_scores,
    encode_pair,
    load_task,
    loglikelihood,
    paired_bootstrap,
    probes,
    run_task,
    sentence_scores,
    sequence_nll,
    text_nll,
    token_logprobs,
    windows,
)
from lmlab.eval.metrics import WordTokenizer
from lmlab.models import ModelConfig, Transformer
from lmlab.tokenizers import Tokenizer

TEXT = ("The fox saw the grapes hanging high on the vine and could not reach them. " * 3
        + "Жили-были дед да баба, и была у них курочка Ряба. ")


def tiny(family="llama", block_size=24, seed=0):
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=300, block_size=block_size,
                             n_kv_head=2 if family == "llama" else None)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # far from uniform, so a wrong context shows in the numbers
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 4], kind="bpe", vocab_size=300)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bpb_is_the_same_batched_one_by_one_and_kv_cached(family, tok):
    model = tiny(family)
    texts = [TEXT, TEXT[:40], "Колобок."]  # windows of 25, 21 and 9 tokens share batches
    batched = text_nll(model, tok, texts, stride=8, batch_size=16)
    single = text_nll(model, tok, texts, stride=8, batch_size=1)
    cached = text_nll(model, tok, texts, stride=8, cache_chunk=5)
    assert batched["tokens"] > 3 * model.config.block_size  # long enough for many windows
    for r in (single, cached):
        assert r["tokens"] == batched["tokens"] and r["bytes"] == batched["bytes"]
        assert abs(r["bits_per_byte"] - batched["bits_per_byte"]) < 1e-6


def brute_force_nll(model, ids, L, S):
    """One forward per target: target i (predicted from ids[:i]) is read in the window that ends at the end of
    its chunk: the first L targets from the start, then chunks of S, each window the L tokens before its end."""
    total = 0.0
    n = len(ids) - 1
    for i in range(1, n + 1):
        end = i if i <= L else min(L + math.ceil((i - L) / S) * S, n)
        start = 0 if i <= L else end - L
        with torch.no_grad():
            logits = model(torch.tensor([ids[start:i]])).logits[0, -1].double()
        total -= float(logits.log_softmax(-1)[ids[i]])
    return total


@pytest.mark.parametrize("stride", [24, 10, 1])
def test_strided_nll_on_a_document_longer_than_the_context_equals_brute_force(stride, tok):
    model = tiny(block_size=24)
    ids = [tok.eos_id, *tok.encode(TEXT)][:90]
    assert len(ids) == 90 > 3 * 24
    total, n = sequence_nll(model, ids, stride=stride, batch_size=4)
    assert n == 89
    # float32 forwards of different lengths differ in the last bits: compared per token (a wrong context
    # moves a token's loss by ~1e-1 here)
    assert abs(total - brute_force_nll(model, ids, 24, stride)) / n < 1e-6


def test_windows_count_every_target_once_with_enough_context():
    for n, L, S in [(1, 4, 4), (10, 4, 4), (10, 4, 3), (37, 8, 1), (8, 8, 2)]:
        spans = windows(n, L, S)
        counted = [t for _, first, end in spans for t in range(first + 1, end + 1)]
        assert counted == list(range(1, n + 1))
        assert all(end - start <= L and (start == 0 or first - start >= L - S) for start, first, end in spans)
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def test_masked_targets_are_not_counted(tok):
    model = tiny()
    ids = [tok.eos_id, *tok.encode(TEXT)][:25]  # one window
    per = token_logprobs(model, [ids])[0][0]
    count = [i % 3 != 0 for i in range(24)]
    total, n = sequence_nll(model, ids, count=count)
    assert n == 16
    assert total == pytest.approx(-sum(per[i] for i in range(24) if count[i]), abs=1e-9)


def test_loglikelihood_and_greedy_flag_match_a_plain_forward(tok):
    model = tiny()
    ctx, cont = tok.encode("The fox saw"), tok.encode(" the grapes")
    (ll, greedy), = loglikelihood(model, [(ctx, cont)])
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
    ref = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
    assert ll == pytest.approx(ref, abs=1e-5)  # one token shorter forward: float32 last bits
    assert greedy == all(int(logp[len(ctx) - 1 + k].argmax()) == t for k, t in enumerate(cont))
    # the model's own greedy continuation is flagged as greedy
    ids = list(ctx)
    for _ in range(3):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert loglikelihood(model, [(ctx, ids[len(ctx):])])[0][1] is True


def test_a_continuation_longer_than_the_context_is_scored_whole(tok):
    """A continuation longer than the model's context was scored on its last `block_size` tokens only (and its
    greedy flag said True when an earlier token was not the argmax). Each token is now scored after the ids of its
    window (windows of the model's context, aligned to the end): here checked one forward per token."""
    model = tiny(block_size=4)
    ctx, cont = tok.encode("The fox"), tok.encode(" saw the grapes and the crow")
    assert len(cont) > 6
    (ll, greedy), = loglikelihood(model, [(ctx, cont)])
    ids, start, ref, ref_greedy = ctx + cont, len(ctx), 0.0, True
    ends = list(range(len(ids) - 1, start - 1, -4))[::-1]  # each window's last target, the last window at the end
    for t in range(start, len(ids)):
        end = next(e for e in ends if e >= t)  # target ids[t] is read in the window of ids[end - 4:end]
        window = ids[max(0, end - 4):t]
        with torch.no_grad():
            logp = model(torch.tensor([window])).logits[0, -1].double().log_softmax(-1)
        ref += float(logp[ids[t]])
        ref_greedy = ref_greedy and int(logp.argmax()) == ids[t]
    assert ll == pytest.approx(ref, abs=1e-5) and greedy == ref_greedy


@pytest.mark.parametrize("context", ["Question: the fox?\n", "Q:\t", "The fox  ", "Q:\n\n"])
def test_the_pair_splits_as_lm_evals_encode_pair(tok, context):
    """lm-eval moves all the context's trailing whitespace into the continuation; only spaces moved here, so
    after a newline lmlab and lm-eval scored different tokens (the adapter disagreed with lm-eval's hf model)."""
    template = pytest.importorskip("lm_eval.api.model").TemplateLM
    from types import SimpleNamespace
    lm = SimpleNamespace(backend="causal", tok_encode=lambda text, **_: tok.encode(text))
    assert encode_pair(tok, context, "Answer") == template._encode_pair(lm, context, "Answer")


def test_compare_lists_the_flips_of_every_right_wrong_metric():
    """Only the first metric's flips were listed (acc), so an item that flipped on acc_norm alone was missing."""
    from lmlab.eval.compare import compare
    items = [[{"acc": 1, "acc_norm": 0}, {"acc": 0, "acc_norm": 0}],
             [{"acc": 1, "acc_norm": 1}, {"acc": 1, "acc_norm": 0}]]
    results = [{"model": m, "tasks": [{"task": "t", "kind": "multiple_choice", "n": 2, "items": its,
                                       "metrics": {k: sum(i[k] for i in its) / 2 for k in ("acc", "acc_norm")}}]}
               for m, its in zip("ab", items)]
    flips = [(f["item"], f["metric"], f["from"], f["to"]) for f in compare(results, resamples=10)["flips"]]
    assert flips == [(1, "acc", 0, 1), (0, "acc_norm", 0, 1)]


def test_eval_texts_leave_out_empty_texts_and_score_every_first_token(tok):
    """An empty text added an <EOS> scored against no bytes (bits per byte 10.41 -> 15.98 in a helper's repro), and
    the first document's first token was never scored while its bytes were counted."""
    from lmlab.train.recipes import evaluate_texts
    model = tiny(block_size=64)
    texts = ["The fox saw the grapes.", "The crow sat on a branch."]
    r = evaluate_texts(model, tok, texts)
    assert evaluate_texts(model, tok, ["", texts[0], "", texts[1], ""]) == r
    assert r["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)  # every token and each text's <EOS>
    ids = [tok.eos_id] + tok.encode(texts[0]) + [tok.eos_id] + tok.encode(texts[1]) + [tok.eos_id]
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
    nats = -sum(float(logp[k, t]) for k, t in enumerate(ids[1:]))
    assert r["bits_per_byte"] == pytest.approx(nats / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-6)


def test_metrics_equal_sacrebleu_and_rouge_score_called_directly():
    import sacrebleu
    from rouge_score import rouge_scorer
    hyps = ["the cat sat on the mat", "a fox ate the grapes", "жили-были дед да баба"]
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["the fox ate sour grapes"],
            ["жили были дед и баба"]]
    ours = corpus_scores(hyps, refs)
    streams = [[r[0] for r in refs], ["there is a cat on the mat", None, None]]
    assert ours["bleu"] == sacrebleu.corpus_bleu(hyps, streams).score
    assert ours["chrf"] == sacrebleu.corpus_chrf(hyps, streams).score
    assert ours["signatures"]["bleu"].startswith("nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=WordTokenizer())
    for t in ("rouge1", "rouge2", "rougeL"):
        assert ours[t] == pytest.approx(100 * np.mean([scorer.score_multi(r, h)[t].fmeasure
                                                       for h, r in zip(hyps, refs)]), abs=1e-12)
    assert ours["rouge1"] > 0  # the Cyrillic item counts (rouge-score's default tokenizer would drop it)
    one = sentence_scores(hyps[0], refs[0])
    assert one["chrf"] == sacrebleu.sentence_chrf(hyps[0], refs[0]).score
    assert one["rougeL"] == pytest.approx(100 * scorer.score_multi(refs[0], hyps[0])["rougeL"].fmeasure)


def test_probes_separate_a_looping_model_from_a_healthy_one(tok):
    """A model whose head is its (large) embedding repeats its last token; a near-uniform one does not."""
    from lmlab.models import generate
    healthy, looping = [], []
    for seed in range(5):
        good = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=300, block_size=64)).eval()
        bad = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=300, block_size=64)).eval()
        with torch.no_grad():
            bad.tok_emb.weight.mul_(60)  # tied head: logits ~ e(last) . e(v), the largest at v = last
        for model, out in ((good, healthy), (bad, looping)):
            samples = generate(model, tok, ["The fox", "Жили-были", "Once", "A crow"], max_new_tokens=40,
                               seed=seed, stop_at_eos=False)
            out.append(probes(samples, tokenize=tok.encode))  # this text has no spaces: n-grams of tokens
    assert max(p["repetition_4"] for p in healthy) < min(p["repetition_4"] for p in looping)
    assert min(p["distinct_2"] for p in healthy) > max(p["distinct_2"] for p in looping)


def test_probe_values_on_known_strings():
    s = ["a b a b a b", "c d e"]
    p = probes(s, training_text="x c d y a b a z")
    # Li et al. 2016: distinct n-grams over generated tokens, (a b) (b a) (c d) (d e) of 6 + 3 words (the n-gram
    # ratio, 4 of 5 + 2 bigrams, was reported)
    assert p["distinct_1"] == 5 / 9 and p["distinct_2"] == 4 / 9
    assert p["repetition_4"] == pytest.approx((1 - 2 / 3) / 1)  # only the first sample has 4-grams
    assert p["longest_shared_ngram"] == 3  # "a b a"


def test_bootstrap_intervals_cover_the_true_difference_at_95_percent():
    """1000 simulated comparisons, 200 paired items each: the interval holds the true mean difference
    95% +- 3% of the time."""
    rng = np.random.default_rng(1)
    hits = 0
    for k in range(1000):
        skill = rng.normal(size=200)  # items differ in difficulty; the pairing removes it
        a = skill + rng.normal(0, 1, 200)
        b = skill + 0.3 + rng.normal(0, 1, 200)
        ci = paired_bootstrap(a, b, resamples=1000, seed=k)
        hits += ci["low"] <= 0.3 <= ci["high"]
    assert 0.92 <= hits / 1000 <= 0.98


def test_shipped_tasks_run(tok):
    model = tiny(block_size=64)
    mc = run_task(model, tok, load_task("fables-mc"))
    assert mc["n"] == 8 and set(mc["metrics"]) == {"acc", "acc_norm"}
    assert mc["metrics"]["acc"] == np.mean([r["acc"] for r in mc["items"]])
    lm = run_task(model, tok, load_task("fables-lm"))
    assert lm["n"] == 6
    gen = run_task(model, tok, load_task("fables-gen"))
    assert gen["signatures"]["chrf"].startswith("nrefs:var|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x"], "answer": 2}', "fx.jsonl:2: answer 2 is not an index of the 1 choices"),
    ('{"context": "a", "answer": 0}', "fx.jsonl:2: missing 'choices'"),
    ('{"context": "a", "choices": [], "answer": 0}', "fx.jsonl:2: choices must be a non-empty list"),
    ('{"context": "a", "choices": ["x"], "answer": true}', "fx.jsonl:2: 'answer' must be a int"),
    ("{oops", "fx.jsonl:2: not JSON"),
])
def test_bad_items_name_file_and_line(tmp_path, line, message):
    (tmp_path / "t.yaml").write_text("name: t\nkind: multiple_choice\ndata: fx.jsonl\n")
    (tmp_path / "fx.jsonl").write_text('{"context": "a", "choices": ["x", "y"], "answer": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_task(tmp_path / "t.yaml")


def test_bad_task_files(tmp_path):
    (tmp_path / "t.yaml").write_text("name: t\nkind: essay\ndata: x.jsonl\n")
    with pytest.raises(ValueError, match="kind must be one of multiple_choice, lm, generate, not 'essay'"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\nkind: lm\ndata: x.jsonl\nshots: 2\n")
    with pytest.raises(ValueError, match="unknown key 'shots'"):
        load_task(tmp_path / "t.yaml")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope")
    (tmp_path / "t.yaml").write_text("name: t\nkind: lm\ndata: x.jsonl\nseed: abc\n")
    with pytest.raises(ValueError, match="t.yaml: seed must be an integer >= 0"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\nkind: lm\ndata: x.jsonl\n")
    (tmp_path / "x.jsonl").write_bytes('{"context": "Жили", "continuation": "x"}\n'.encode("cp1251"))
    with pytest.raises(ValueError, match=r"x.jsonl:1: not UTF-8 \(byte 14\)"):  # the line, and its 1-based byte
        load_task(tmp_path / "t.yaml")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_context_through_the_kv_cache_equals_each_pair_alone(family, tok):
    """Choices of one question read their context once (left-padded into the cache, then copied per choice):
    the same log-likelihoods and greedy flags as each pair scored on its own."""
    model = tiny(family)
    questions = [("The fox saw", [" the grapes", " them", " Ряба and the vine"]),
                 ("Жили-были дед да баба, и была", [" у них", " курочка"]),
                 ("could", [" not reach them.", " reach"])]
    pairs = [(tok.encode(c), tok.encode(c + x)[len(tok.encode(c)):]) for c, xs in questions for x in xs]
    ids = [c + x for c, x in pairs]
    pairs.append((ids[0][:-1], ids[0][-1:]))  # the model's own greedy continuation, to see a True flag
    with torch.no_grad():
        pairs.append((ids[0], [int(model(torch.tensor([ids[0]])).logits[0, -1].argmax())]))
    pairs.append((ids[0], [5]))  # shares its context with the pair before
    # a short context with a long continuation and a long context with short ones: each fits the model's
    # context of 24, both in one cache would not
    long_ctx = tok.encode(TEXT)[:20]
    pairs += [(ids[0][:3], long_ctx[:15]), (ids[0][:3], long_ctx[:2]), (long_ctx, [7]), (long_ctx, [8, 9])]
    together = loglikelihood(model, pairs, batch_size=64)  # every context of different length in one forward
    alone = [loglikelihood(model, [p])[0] for p in pairs]
    assert [g for _, g in together] == [g for _, g in alone] and any(g for _, g in alone)
    np.testing.assert_allclose([ll for ll, _ in together], [ll for ll, _ in alone], atol=1e-5, rtol=0)


def test_fewshot_prompts_hold_k_solved_other_items_then_the_item(tmp_path):
    from lmlab.eval import prompts
    items = [{"context": f"Q{i}:", "choices": [f"a{i}", f"b{i}"], "answer": i % 2} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (tmp_path / "t.yaml").write_text("name: t\nkind: multiple_choice\ndata: d.jsonl\nfewshot: 2\n"
                                     "description: \"Answer.\\n\"\nfewshot_delimiter: ' | '\n")
    task = load_task(tmp_path / "t.yaml")
    solved = [f"Q{i}: {it['choices'][it['answer']]}" for i, it in enumerate(items)]
    out = prompts(task)
    for i, p in enumerate(out):
        assert p["choices"] == items[i]["choices"] and p["answer"] == items[i]["answer"]
        head, *shots, last = p["context"].split(" | ")
        shots = [head.removeprefix("Answer.\n")] + shots
        assert head.startswith("Answer.\n") and last == f"Q{i}:" and len(shots) == 2
        assert set(shots) <= set(solved) - {solved[i]} and len(set(shots)) == 2
    assert prompts(task) == out  # the same examples every time
    task.seed = 1
    assert prompts(task) != out


def test_made_items_keep_a_closing_quote_with_its_sentence():
    """A sentence ending inside quotes (…простое!») lost its » to the next one: the answer starting with » gave
    itself away among the choices."""
    from lmlab.eval.maketask import make_items
    text = ("Жили-были дед да баба, и была у них курочка Ряба. Курочка снесла яичко, не простое, а золотое. "
            "Дед плачет, баба плачет, а курочка кудахчет: «Не плачь, дед, не плачь, баба! Снесу вам яичко другое, "
            "не золотое — простое!» The fox saw the grapes on the vine. The grapes were high on the old vine. "
            "The fox could not reach the grapes at all. «Они зелёные», — сказала лиса (и ушла домой).")
    items = make_items([text], "next-sentence", n=50, seed=0)
    assert items and all(not c.startswith(("»", ")", ",")) for it in items for c in it["choices"])
    assert any(it["context"].endswith("простое!»") for it in items)
    assert all(f"{it['context']} {it['choices'][it['answer']]}" in text for it in items)


def test_unknown_tokens_are_scored_as_the_bytes_they_stand_for():
    """<unk> was left out of the nats while its bytes stayed in the count: a text with letters the tokenizer never
    saw scored 1.479 bits per byte against 4.528 for the known letters alone (a reviewer's repro). Now every
    target counts: the numbers of a plain forward over <EOS> + the text, which the lm-eval bridge's
    loglikelihood_rolling (nll_many without a mask) gives too."""
    from lmlab.eval.scorer import nll_many
    tok = Tokenizer.train(["the fox saw the grapes hanging high on the vine. " * 20], kind="char", vocab_size=60)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=tok.vocab_size, block_size=64)).eval()
    text = "the fox ЖИЛИ saw the grapes"
    ids = [tok.eos_id, *tok.encode(text)]
    assert ids.count(tok.unk_id) == 4
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
    nats = -sum(float(logp[k, t]) for k, t in enumerate(ids[1:]))
    r = text_nll(model, tok, [text])
    assert r["tokens"] == len(ids) - 1 and r["bytes"] == len(text.encode("utf-8"))
    assert r["nats"] == pytest.approx(nats, rel=1e-9)
    assert r["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-9)
    assert r["nats"] == pytest.approx(nll_many(model, [ids])[0][0], rel=1e-9)  # the bridge's number


def test_a_continuation_with_nothing_to_score_is_refused(tmp_path, tok):
    """An empty continuation had no target tokens: log-likelihood 0 and greedy "right", so the item counted as
    correct. So did one whose tokens BPE merged into the context's ("grape" + "s"), and a whitespace choice of a
    word tokenizer (0 beat every other choice)."""
    (tmp_path / "t.yaml").write_text("name: t\nkind: lm\ndata: fx.jsonl\ntarget_delimiter: ''\n")
    (tmp_path / "fx.jsonl").write_text('{"context": "The fox", "continuation": " saw"}\n'
                                       '{"context": "Once upon a", "continuation": ""}\n')
    with pytest.raises(ValueError, match="fx.jsonl:2: continuation must be a non-empty string$"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "fx.jsonl").write_text('{"context": "The fox", "continuation": " saw"}\n'
                                       '{"context": "The fox saw the grape", "continuation": "s"}\n')
    task = load_task(tmp_path / "t.yaml")
    model = tiny(block_size=64)
    with pytest.raises(ValueError, match=r"^item 2: the continuation 's' adds no token to its context, so there is "
                                         "nothing to score$"):
        run_task(model, tok, task)
    words = Tokenizer.train([TEXT * 4], kind="word", vocab_size=60)
    from lmlab.eval import score_choices
    with pytest.raises(ValueError, match=r"^item 1: the continuation '  ' adds no token"):
        score_choices(model, words, [{"context": "The fox saw", "choices": ["the", " "], "answer": 0}])
    with pytest.raises(ValueError, match="^pair 1: an empty continuation has no log-likelihood to score$"):
        loglikelihood(model, [([1, 2], [3]), ([1, 2], [])])


def test_task_data_stays_inside_the_tasks_folder(tmp_path):
    """data: was read through links and from absolute paths: the server listed (and its evaluations read) a
    workspace task whose mine.jsonl pointed at a file outside the workspace."""
    from types import SimpleNamespace

    from lmlab.server.routers.evals import list_tasks
    line = '{"context": "SECRET", "choices": ["a", "b"], "answer": 0}\n'
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "private.jsonl").write_text(line)
    tasks = tmp_path / "ws" / "tasks"
    (tasks / "sub").mkdir(parents=True)
    (tasks / "sub" / "ok.jsonl").write_text(line)
    (tasks / "mine.jsonl").symlink_to(tmp_path / "outside" / "private.jsonl")
    (tasks / "linked").symlink_to(tmp_path / "outside")
    cases = {"abs": (str(tmp_path / "outside" / "private.jsonl"), "must be a path relative to the task's folder"),
             "up": ("../../outside/private.jsonl", "must be a path relative to the task's folder"),
             "mine": ("mine.jsonl", f"goes through a symbolic link, {tasks / 'mine.jsonl'}"),
             "dir": ("linked/private.jsonl", f"goes through a symbolic link, {tasks / 'linked'}"),
             "ok": ("sub/ok.jsonl", None)}
    for name, (data, problem) in cases.items():
        (tasks / f"{name}.yaml").write_text(f"name: {name}\nkind: multiple_choice\ndata: {json.dumps(data)}\n")
        if problem:
            with pytest.raises(ValueError, match=re.escape(f"{tasks / name}.yaml: data ({data!r}) {problem}")):
                load_task(tasks / f"{name}.yaml")
        else:
            assert load_task(tasks / f"{name}.yaml").items == [json.loads(line)]
    listed = {t.id: t for t in list_tasks(SimpleNamespace(ws=SimpleNamespace(tasks=tasks)))}
    assert [k for k, t in listed.items() if t.source == "workspace" and not t.problem] == ["tasks/ok.yaml"]
    assert listed["tasks/mine.yaml"].items == 0 and "symbolic link" in listed["tasks/mine.yaml"].problem


def test_task_files_that_are_not_utf8_or_generate_forever_are_refused(tmp_path):
    """A YAML file of other bytes raised UnicodeDecodeError (an internal error on the command line); a
    max_new_tokens of 10**11 was taken and ran for hours."""
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bin.yaml'}: not UTF-8 (byte 1)")):
        load_task(tmp_path / "bin.yaml")
    (tmp_path / "g.jsonl").write_text('{"prompt": "a", "references": ["b"]}\n')
    (tmp_path / "g.yaml").write_text("name: g\nkind: generate\ndata: g.jsonl\n"
                                     "generation: {max_new_tokens: 100000000000}\n")
    with pytest.raises(ValueError, match=re.escape("g.yaml: generation: max_new_tokens (100000000000) must be <= "
                                                   "4096")):
        load_task(tmp_path / "g.yaml")
    (tmp_path / "g.yaml").write_text("name: g\nkind: generate\ndata: g.jsonl\ngeneration: {max_new_tokens: 4096}\n")
    assert load_task(tmp_path / "g.yaml").generation.max_new_tokens == 4096


def test_bootstrap_refuses_unpaired_scores_and_a_bad_level():
    """[1.0] against four scores broadcast silently; 3 against 4 and level=95 were numpy's errors."""
    with pytest.raises(ValueError, match="^need the same items for both: 1 scores against 4$"):
        paired_bootstrap([1.0], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="^need the same items for both: 3 scores against 4$"):
        paired_bootstrap([1.0, 0, 1], [0, 1, 0, 1])
    for level in (95, 0, 1.0, float("nan")):
        with pytest.raises(ValueError, match=re.escape(f"level ({level}) must be in (0, 1), e.g. 0.95")):
            paired_bootstrap([1.0] * 8, [0.0] * 8, level=level)


def test_bootstrap_in_blocks_gives_the_one_draw_numbers_in_little_memory():
    """The whole (resamples, items) index array was built at once: 610 MiB at 20,000 items and 2,000 resamples,
    on every GET of a server's evaluation. Drawn in blocks, the numbers are those of the one draw."""
    import tracemalloc
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 2, 5000).astype(float), rng.integers(0, 2, 5000).astype(float)
    d = b - a
    idx = np.random.default_rng(3).integers(0, len(d), size=(2000, len(d)))  # the reference: one draw
    lo, hi = np.quantile(d[idx].mean(1), [0.025, 0.975])
    del idx
    tracemalloc.start()
    try:
        ci = paired_bootstrap(a, b, seed=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ci == {"delta": d.mean(), "low": lo, "high": hi}
    assert peak < 40 * 2**20, peak  # the one draw: 2 x 76 MiB (indices, then the gathered differences)


def test_too_few_items_give_no_interval_and_are_not_called_significant():
    """One item flipped from wrong to right was a [+1, +1] interval, drawn green in report.html. Below six items
    no difference can be significant at 95% (a sign test of n agreeing items: p = 2 / 2**n)."""
    from lmlab.eval.compare import compare, report_html
    from lmlab.eval.metrics import min_items
    assert [min_items(level) for level in (0.5, 0.9, 0.95, 0.99)] == [3, 5, 6, 8]
    assert paired_bootstrap([0.0] * 5, [1.0] * 5) == {"delta": 1.0, "low": None, "high": None}
    assert paired_bootstrap([0.0] * 6, [1.0] * 6) == {"delta": 1.0, "low": 1.0, "high": 1.0}
    results = [{"model": m, "tasks": [{"task": "one", "kind": "multiple_choice", "n": 1,
                                       "metrics": {"acc": v, "acc_norm": v}, "items": [{"acc": v, "acc_norm": v}]}]}
               for m, v in (("a", 0.0), ("b", 1.0))]
    c = compare(results)
    assert [(r["metric"], r["delta"], r["low"], r["high"]) for r in c["rows"]] == [("acc", 1.0, None, None),
                                                                                   ("acc_norm", 1.0, None, None)]
    report = report_html(c)
    assert "#2a7" not in report and "<td>none (under 6 items)</td>" in report
    # the table's columns: the second score is the model's value (it was headed "model" twice)
    assert "<th>task</th><th>metric</th><th>model</th><th>base</th><th>value</th><th>delta</th>" in report


def test_compare_refuses_models_scored_on_other_tasks():
    from lmlab.eval.compare import compare
    task = {"task": "t", "kind": "lm", "n": 2, "metrics": {"exact": 0.5}, "items": [{"exact": 1.0}, {"exact": 0.0}]}
    with pytest.raises(ValueError, match=re.escape("b was scored on the tasks [], a on [t]: compare needs the same "
                                                   "tasks in the same order")):
        compare([{"model": "a", "tasks": [task]}, {"model": "b", "tasks": []}])
    with pytest.raises(ValueError, match=re.escape("b was scored on the tasks [u, t], a on [t, u]")):
        compare([{"model": "a", "tasks": [task, {**task, "task": "u"}]},
                 {"model": "b", "tasks": [{**task, "task": "u"}, task]}])


def test_made_items_have_distinct_choices_up_to_case():
    """A text that repeats a sentence gave next-sentence items with two identical choices (45 of 1916 in a
    reviewer's run), and a cloze item offered "Ёжик" beside the answer "ёжик"."""
    from lmlab.eval.maketask import make_items
    rng = np.random.default_rng(0)
    pool = ["Ёжик нашёл гриб в лесу.", "Ёжик ушёл домой к маме.", "Лиса увидела ёжика в траве.",
            "С тех пор они больше не ссорились.", "С тех пор они больше не ссорились.", "Медведь испугался ёжика.",
            "Ёжик и лиса стали друзьями.", "Под кустом сидел маленький ёжик."]
    text = " ".join(pool[i] for i in rng.integers(0, len(pool), 300))
    for kind in ("next-sentence", "cloze"):
        items = make_items([text], kind, n=200, seed=1)
        assert len(items) >= 50
        for it in items:
            assert len({c.casefold() for c in it["choices"]}) == len(it["choices"]) == 4, it


def test_make_items_needs_at_least_one():
    from lmlab.eval.maketask import make_items
    text = "The fox saw the grapes on the vine. The grapes were high on the old vine. " * 5
    for n in (0, -1):  # they took every item there is
        with pytest.raises(ValueError, match=re.escape(f"items ({n}) must be >= 1")):
            make_items([text], "cloze", n=n)


@pytest.mark.parametrize("name", ["del\x7fname", "nel\x85line", "c1\x9f", "ls\u2028ps\u2029", "bom\ufeff",
                                  'we"ird: name #x', "back\\slash", "tab\tx", "Ёжик 🦔"])
def test_a_made_task_reads_back_whatever_its_name(tmp_path, name):
    """json.dumps left DEL (and C1 controls) raw in the task file's name: not YAML, so the task written could
    not be read; NEL and U+2028 were read back as spaces."""
    from lmlab.eval.maketask import write_task
    items = [{"context": "The fox", "choices": ["saw", "ran"], "answer": 0}]
    path = write_task(tmp_path / f"{name}.yaml", name, items, source="a book")
    task = load_task(path)
    assert (task.name, task.items) == (name, items)
