"""Continuous batching (models/batching.py) against generation alone: sequences that join a batch mid-flight
(with prompts longer and shorter than its rows), leave it at EOS, a stop string or their length, and sample
with their own seeds produce what generate_ids produces for each alone."""

import pytest
import torch
from test_generation import FAMILIES, tiny

from lmlab.models import GenerationConfig, generate_ids
from lmlab.models.batching import BatchEngine, Finish, Token


class Digits:
    """A tokenizer for ids: each id is its text, space-separated."""
    eos_id = 3

    def decode(self, ids):
        return " ".join(map(str, ids))

    def stream_decoder(self):
        return DigitsStream()


class DigitsStream:
    def __init__(self):
        self.first = True

    def push(self, token_id):
        piece, self.first = ("" if self.first else " ") + str(token_id), False
        return piece

    def flush(self):
        return ""


def events(handle):
    return list(handle)  # the engine ran to the end: every event is queued


@pytest.mark.parametrize("fast_step", [True, False], ids=["decoder", "modules"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sequences_joining_and_leaving_between_steps_get_what_they_get_alone(family, fast_step):
    """With fast.Decoder's step, and with model.py's forward (other devices and dtypes take it)."""
    model = tiny(family)
    engine = BatchEngine(model, Digits(), start=False)
    if not fast_step:
        engine.step_fn = None
    greedy = GenerationConfig(max_new_tokens=14, do_sample=False, stop_at_eos=False)
    sampled = GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11, stop_at_eos=False)
    first = [([5, 9, 11], greedy), ([40], sampled)]
    later = [([7] * 20, greedy), ([12, 13], sampled), ([30, 31, 32, 33, 34], GenerationConfig(max_new_tokens=6, seed=2,
                                                                                             stop_at_eos=False,
                                                                                             repetition_penalty=1.5))]
    h1 = engine.submit(first)
    for _ in range(4):
        engine.step()
    assert len(engine.rows) == 2 and engine.length == 3 + 4
    h2 = engine.submit(later)  # a 20-token prompt: the rows shift right to make room
    engine.step()
    assert engine.max_rows_seen == 5 and engine.length == 21
    while engine.rows or engine.waiting:
        engine.step()
    assert engine.length == 0
    got = {}
    for base, handle in ((0, h1), (2, h2)):
        for ev in events(handle):
            if isinstance(ev, Finish):
                got[base + ev.index] = ev.ids
    alone = [generate_ids(model, [p], cfg)[0] for p, cfg in first + later]
    assert [got[i] for i in range(5)] == alone


def test_eos_stop_strings_length_and_logprobs():
    model = tiny("gpt2")
    engine = BatchEngine(model, Digits(), start=False)
    prompt = [5, 9, 11]
    free = generate_ids(model, [prompt], do_sample=False, max_new_tokens=12, stop_at_eos=False)[0]
    stop = f" {free[4]} {free[5]} "                                  # appears once token 7 is out
    j = next(j for j in range(2, 12) if free[j] not in free[:j])
    eos = free[j]                                                     # pretend this id is the EOS
    assert stop not in Digits().decode(free[:6])
    engine.eos = eos
    cases = [GenerationConfig(max_new_tokens=12, do_sample=False, stop_at_eos=False, stop_strings=[stop]),
             GenerationConfig(max_new_tokens=12, do_sample=False),
             GenerationConfig(max_new_tokens=5, do_sample=False, stop_at_eos=False)]
    handle = engine.submit([(prompt, cfg) for cfg in cases], logprobs=2)
    while engine.rows or engine.waiting:
        engine.step()
    evs = events(handle)
    finish = {ev.index: ev for ev in evs if isinstance(ev, Finish)}
    assert [(f.reason, f.tokens, f.ids) for f in (finish[0], finish[1], finish[2])] == [
        ("stop", 7, free[:7]), ("stop", j + 1, free[:j]), ("length", 5, free[:5])]
    tokens = [ev for ev in evs if isinstance(ev, Token) and ev.index == 0]
    with torch.no_grad():
        logp = model(torch.tensor([prompt + free[:7]])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    torch.testing.assert_close(torch.tensor([t.logprob for t in tokens]), logp[torch.arange(7), free[:7]],
                               atol=1e-4, rtol=1e-4)
    top = logp.topk(2)
    assert [[i for i, _ in t.top] for t in tokens] == top.indices.tolist()


def test_a_thread_serves_concurrent_submits_and_a_cancelled_sequence_leaves():
    model = tiny("llama")
    engine = BatchEngine(model, Digits())
    cfg = GenerationConfig(max_new_tokens=20, do_sample=False, stop_at_eos=False)
    gone = engine.submit([([4, 5], GenerationConfig(max_new_tokens=40, do_sample=False, stop_at_eos=False))])
    gone.cancel()
    handles = [engine.submit([([10 + i] * (1 + i), cfg)]) for i in range(6)]
    got = [[ev for ev in events(h) if isinstance(ev, Finish)][0].ids for h in handles]
    assert got == [generate_ids(model, [[10 + i] * (1 + i)], cfg)[0] for i in range(6)]
    engine.close()
    engine.thread.join(10)
    assert not engine.thread.is_alive() and engine.rows == []


@pytest.mark.parametrize("fails_at", [1, 3], ids=["at-admission", "mid-batch"])
def test_a_sequence_whose_sampling_fails_ends_alone(fails_at):
    """An error in one sequence's sampling (its own settings: a NaN from a temperature the logits overflowed at,
    before process_logits shifted them) went to every row of the batch, which was dropped. Now that sequence
    ends with its error and the others decode on to what they get alone."""
    model = tiny("llama")
    engine = BatchEngine(model, Digits(), start=False)
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False, stop_at_eos=False)
    bad = GenerationConfig(max_new_tokens=8, seed=99, stop_at_eos=False)
    sample = engine._sample

    def failing(seq, logits):
        if seq.cfg is bad and seq.count + 1 >= fails_at:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample(seq, logits)

    engine._sample = failing
    good = engine.submit([([5, 9, 11], greedy)])
    engine.step()
    doomed = engine.submit([([40, 41], bad)])
    others = engine.submit([([7, 7], greedy)])
    while engine.rows or engine.waiting:
        engine.step()
    with pytest.raises(RuntimeError, match="inf, nan"):
        events(doomed)
    got = [ev.ids for h in (good, others) for ev in events(h) if isinstance(ev, Finish)]
    assert got == [generate_ids(model, [p], greedy)[0] for p in ([5, 9, 11], [7, 7])]


def test_prompts_joining_together_are_prefilled_in_one_forward():
    """Prompts that join between two steps were prefilled one forward each (twenty short prompts cost twenty
    forwards, most of the concurrent run's time beyond the steps on a CPU); now the joiners share one
    left-padded forward, and a row that ends on its first token (EOS) still leaves the others their place."""
    model = tiny("gpt2")
    engine = BatchEngine(model, Digits(), start=False)
    greedy = GenerationConfig(max_new_tokens=6, do_sample=False, stop_at_eos=False)
    prompts = [[5, 9, 11], [40], [7] * 9, [12, 13]]
    first = generate_ids(model, [prompts[1]], max_new_tokens=1, do_sample=False, stop_at_eos=False)[0][0]
    engine.eos = first  # the second prompt's first token ends it at admission
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k)
    handle = engine.submit([(p, greedy if i != 1 else GenerationConfig(max_new_tokens=6, do_sample=False))
                            for i, p in enumerate(prompts)])
    engine.step()
    assert calls == [(4, 9)] and len(engine.rows) == 3
    while engine.rows or engine.waiting:
        engine.step()
    finish = {ev.index: ev for ev in events(handle) if isinstance(ev, Finish)}
    assert finish[1].reason == "stop" and finish[1].ids == []
    del model.forward
    assert [finish[i].ids for i in (0, 2, 3)] == [generate_ids(model, [prompts[i]], greedy)[0] for i in (0, 2, 3)]


def test_a_request_of_many_sequences_shares_the_rows_that_free_up():
    """Rows were given in strict arrival order: a request with n = 128 on 32 rows kept every later request out
    until all of its sequences had started (a 5-token request waited 1.13 s instead of 0.01 s). Now the
    requests take turns, the one holding fewest rows first; each sequence still gets what it gets alone."""
    model = tiny("llama")
    engine = BatchEngine(model, Digits(), max_rows=4, start=False)
    long = GenerationConfig(max_new_tokens=8, do_sample=False, stop_at_eos=False)
    short = GenerationConfig(max_new_tokens=4, do_sample=False, stop_at_eos=False)
    many = engine.submit([([3 + i, 4], long) for i in range(8)])
    engine.step()
    assert [s.out for s in engine.rows] == [many._out] * 4
    few = engine.submit([([20], short), ([21, 22], short)])
    late = engine.submit([([30], short)])
    order = []
    while engine.rows or engine.waiting:
        engine.step()
        order.append({s.prompt[0] for s in engine.rows})
    # the rows that free up go to `many`, `few` and `late` in turn (the old order: `many`'s 7, 8, 9, 10)
    assert {20, 30, 7, 8} in order and {7, 8, 9, 10} not in order, order
    got = {(id(h), ev.index): ev.ids for h in (many, few, late) for ev in events(h) if isinstance(ev, Finish)}
    for h, reqs in ((many, [([3 + i, 4], long) for i in range(8)]), (few, [([20], short), ([21, 22], short)]),
                    (late, [([30], short)])):
        for i, (p, cfg) in enumerate(reqs):
            assert got[id(h), i] == generate_ids(model, [p], cfg)[0]


@pytest.mark.parametrize("where", ["prefill", "placement"])
def test_a_failed_admission_ends_the_joining_sequences_alone(where):
    """A joining request whose prefill failed (out of memory: a 6800-token prompt with n = 32) sent its error to
    every row of the batch, whose cache was dropped: four streams decoding there ended with the other request's
    "can't allocate memory". Now the joining sequences end with it, and the rows decode on to what they get
    alone; so they do when the failure comes while their keys and values are given a place (the storage grows
    and the rows shift right for the longer prompt)."""
    model = tiny("llama")
    engine = BatchEngine(model, Digits(), start=False)
    greedy = GenerationConfig(max_new_tokens=12, do_sample=False, stop_at_eos=False)
    sampled = GenerationConfig(max_new_tokens=12, temperature=0.9, seed=5, stop_at_eos=False)
    first = [([5, 9, 11], greedy), ([40, 41], sampled)]
    running = engine.submit(first)
    for _ in range(3):
        engine.step()
    big = [7] * 20
    failed = []
    if where == "prefill":
        forward = model.forward

        def failing(idx, *args, **kwargs):
            if idx.shape[1] == len(big):
                failed.append(idx.shape)
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
            return forward(idx, *args, **kwargs)
        model.forward = failing
    else:
        reserve = engine._reserve

        def failing(rows, width):
            if rows > len(engine.rows):  # storage for joining rows (a step asks for its own rows only)
                failed.append((rows, width))
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
            return reserve(rows, width)
        engine._reserve = failing
    doomed = engine.submit([(big, GenerationConfig(max_new_tokens=4, seed=s)) for s in range(2)])
    engine.step()
    assert failed and len(engine.rows) == 2
    if where == "prefill":
        del model.forward
    else:
        del engine._reserve
    later = engine.submit([([12, 13], greedy)])
    while engine.rows or engine.waiting:
        engine.step()
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        events(doomed)
    got = [ev.ids for h in (running, later) for ev in sorted((e for e in events(h) if isinstance(e, Finish)),
                                                              key=lambda e: e.index)]
    assert got == [generate_ids(model, [p], cfg)[0] for p, cfg in [*first, ([12, 13], greedy)]]


def test_a_prompt_shared_by_samples_is_prefilled_once():
    """A request's n samples of one prompt were prefilled once each (n rows of one forward): the other streams
    of the model waited n times as long (27 s for n = 32 on a 6800-token prompt). Now each distinct prompt is
    prefilled once and its keys and values copied to its samples' rows; every sample still gets what it gets
    alone."""
    model = tiny("llama")
    engine = BatchEngine(model, Digits(), start=False)
    prompt = [5, 9, 11, 12, 30]
    reqs = [(prompt, GenerationConfig(max_new_tokens=10, temperature=0.9, seed=20 + i, stop_at_eos=False))
            for i in range(4)] + [([40, 41], GenerationConfig(max_new_tokens=10, do_sample=False, stop_at_eos=False))]
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(tuple(a[0].shape)) or forward(*a, **k)
    handle = engine.submit(reqs[:4])
    other = engine.submit(reqs[4:])
    engine.step()
    assert calls[0] == (2, len(prompt)) and len(engine.rows) == 5
    while engine.rows or engine.waiting:
        engine.step()
    del model.forward
    got = {ev.index: ev.ids for ev in events(handle) if isinstance(ev, Finish)}
    got[4] = [ev.ids for ev in events(other) if isinstance(ev, Finish)][0]
    want = [generate_ids(model, [p], cfg)[0] for p, cfg in reqs]
    assert [got[i] for i in range(5)] == want and len({tuple(w) for w in want[:4]}) == 4


def test_non_finite_logits_end_that_sequence_with_an_error():
    """Logits that hold a NaN (a model with one NaN weight in its head): greedy answered the NaN's id as the top
    token, with NaN log-probabilities (not JSON: the API's stream sent them, its JSON answer was a plain 500). Now
    such logits end the sequence with an error that says why, mid-way and at admission; the other rows decode on."""
    model = tiny("llama")
    engine = BatchEngine(model, Digits(), start=False)
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False, stop_at_eos=False)
    good = engine.submit([([5, 9, 11], greedy)])
    bad = engine.submit([([40, 41], greedy)])
    decode = engine.step_fn
    assert decode is not None

    def poisoned(idx, cache, mask, positions):  # the bad row's logits hold a NaN from its third token on
        logits = decode(idx, cache, mask, positions).clone()
        for r, seq in enumerate(engine.rows):
            if seq.out is bad._out and seq.count >= 2:
                logits[r, 7] = float("nan")
        return logits
    engine.step_fn = poisoned
    while engine.rows or engine.waiting:
        engine.step()
    with pytest.raises(RuntimeError, match="logits are not finite"):
        events(bad)
    assert [ev.ids for ev in events(good) if isinstance(ev, Finish)] == generate_ids(model, [[5, 9, 11]], greedy)
    engine.step_fn = decode
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("nan")
    nan_head = engine.submit([([12, 13], greedy)], logprobs=1)
    while engine.rows or engine.waiting:
        engine.step()
    with pytest.raises(RuntimeError, match="logits are not finite"):
        events(nan_head)


def test_storage_that_cannot_grow_ends_the_widest_rows_alone():
    """The rows' storage grows (doubling its width) when the widest row needs one more column; that allocation
    failing (a 6800-token request beside four short streams, memory capped) ended every row. Now the rows that
    need the column end with the error, and the others, whose contexts fit, decode on to what they get alone."""
    model = tiny("llama")
    engine = BatchEngine(model, Digits(), start=False)
    greedy = GenerationConfig(max_new_tokens=12, do_sample=False, stop_at_eos=False)
    short = engine.submit([([5, 9, 11], greedy), ([40, 41], greedy)])
    wide = engine.submit([([7] * 20, greedy)])
    reserve, failed = engine._reserve, []

    def failing(rows, width):
        if not failed and engine.k is not None and width > engine.k.size(3):
            failed.append(width)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return reserve(rows, width)
    engine._reserve = failing
    while engine.rows or engine.waiting:
        engine.step()
    assert failed
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        events(wide)
    got = {ev.index: ev.ids for ev in events(short) if isinstance(ev, Finish)}
    assert [got[0], got[1]] == [generate_ids(model, [p], greedy)[0] for p in ([5, 9, 11], [40, 41])]


def test_the_rows_are_as_many_as_a_third_of_the_free_memory_holds_at_full_context(monkeypatch):
    """The engine took 32 rows whatever the memory: a large model's cache grew mid-decode until a step ran out of
    memory, and that ended every row's request. Its rows are now what a third of the free memory holds with each
    row at the full context (k and v in the model's dtype, and the mask), at least 1."""
    import lmlab.models.batching as B
    model = tiny("llama")
    c = model.config
    per_row = (2 * c.n_layer * c.n_kv_head * c.head_dim * 4 + 1) * c.block_size
    monkeypatch.setattr(B, "available_memory", lambda device: 3 * 5 * per_row + 7)
    engine = BatchEngine(model, Digits(), start=False)
    assert engine.max_rows == 5
    monkeypatch.setattr(B, "available_memory", lambda device: 10)
    assert BatchEngine(model, Digits(), start=False).max_rows == 1
    monkeypatch.setattr(B, "available_memory", lambda device: None)
    assert BatchEngine(model, Digits(), max_rows=9, start=False).max_rows == 9
    greedy = GenerationConfig(max_new_tokens=6, do_sample=False, stop_at_eos=False)
    prompts = [[5 + i, 9] for i in range(8)]
    h = engine.submit([(p, greedy) for p in prompts])
    while engine.rows or engine.waiting:
        engine.step()
        assert len(engine.rows) <= 5
    got = {ev.index: ev.ids for ev in events(h) if isinstance(ev, Finish)}
    assert [got[i] for i in range(8)] == [generate_ids(model, [p], greedy)[0] for p in prompts]
