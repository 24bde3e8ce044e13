"""KV cache against full recompute, batched left-padded generation against one-by-one, sampling rules."""

import pytest
import torch

from lmlab.models import GenerationConfig, KVCache, ModelConfig, Transformer, fast, generate_ids, process_logits
from lmlab.models import generation as generation_module
from lmlab.models.generation import sampling_generator

FAMILIES = ["gpt", "gpt2", "llama"]


def tiny(family, **kw):
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=61, block_size=48,
                             n_kv_head=2 if family == "llama" else None, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so logits are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


@pytest.mark.parametrize("fast_step", [False, True], ids=["modules", "decoder"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_recompute(family, fast_step):
    """Also with fast.Decoder taking the one-token steps, as generation does on CPU."""
    model = tiny(family)
    step = fast.decoder(model, keep=False) if fast_step else None
    idx = torch.randint(4, 61, (2, 30))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(model.config, batch_size=2)
        steps = [model(idx[:, :10], cache=cache).logits]         # prefill 10, then chunks of 1 and 5
        for t in range(10, 20):
            one = idx[:, t:t + 1]
            steps.append(step(one, cache)[:, None] if step else model(one, cache=cache).logits)
        steps.append(model(idx[:, 20:25], cache=cache).logits)  # a multi-token chunk after a prefix
        steps.append(model(idx[:, 25:30], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def greedy_reference(model, prompt, n):
    """No cache, no batching: argmax of the full recompute, token by token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-model.config.block_size:]])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_greedy_equals_one_by_one(family):
    model = tiny(family)
    prompts = [[5, 9, 11, 30, 2, 7, 8], [40], [12, 13, 14]]
    cfg = GenerationConfig(max_new_tokens=12, do_sample=False, stop_at_eos=False)
    batched = generate_ids(model, prompts, cfg)
    singles = [generate_ids(model, [p], cfg)[0] for p in prompts]
    assert batched == singles
    assert singles == [greedy_reference(model, p, 12) for p in prompts]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_rows_are_cropped_as_each_would_be_alone(family):
    """Past the window each row keeps its own context: a short prompt beside a long one lost its oldest
    tokens when the long row's window was cut (the columns are shared), though alone it still fit."""
    model = tiny(family)  # block_size 48
    prompts = [list(torch.randint(4, 61, (40,)).tolist()), [7, 8, 9], list(torch.randint(4, 61, (20,)).tolist())]
    cfg = GenerationConfig(max_new_tokens=60, do_sample=False, stop_at_eos=False)
    batched = generate_ids(model, prompts, cfg)
    singles = [generate_ids(model, [p], cfg)[0] for p in prompts]
    assert batched == singles
    # alone, the short row never needs more than 48 tokens before its 45th new one: a full recompute
    assert singles[1][:45] == greedy_reference(model, prompts[1], 45)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_repetition_penalty_does_not_count_the_padding(family):
    model = tiny(family)
    prompts = [[5, 9, 11, 30, 2, 7, 8, 12, 13], [40, 41]]
    cfg = GenerationConfig(max_new_tokens=15, do_sample=False, stop_at_eos=False, repetition_penalty=1.6)
    for pad_id in (0, 3):
        batched = generate_ids(model, prompts, cfg, pad_id=pad_id)
        assert batched == [generate_ids(model, [p], cfg)[0] for p in prompts]


@pytest.mark.parametrize("family", FAMILIES)
def test_context_longer_than_window_is_cropped(family):
    model = tiny(family)  # block_size 48
    prompt = list(torch.randint(4, 61, (70,)).tolist())
    out = generate_ids(model, [prompt], do_sample=False, max_new_tokens=40, stop_at_eos=False)[0]
    assert len(out) == 40
    # the first token is predicted from the last 48 prompt tokens, exactly as a cropped recompute would
    assert out[0] == greedy_reference(model, prompt[-48:], 1)[0]


def test_the_id_buffers_grow_as_tokens_come_and_give_the_same_tokens(monkeypatch):
    """Buffers grown a few columns at a time (through the window's crops, beams' reorders, prompt lookup's
    drafts) give the tokens of buffers made whole at the start; a max_new_tokens of 10**12 allocates nothing
    up front (it took 8 TB per row and failed)."""
    model = tiny("llama")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    runs = [dict(do_sample=False), dict(temperature=0.9, seed=1, repetition_penalty=1.3), dict(num_beams=3)]
    whole = [generate_ids(model, prompts, max_new_tokens=90, stop_at_eos=False, **kw) for kw in runs]
    first = whole[0][0][0]
    assert generate_ids(model, prompts[:1], do_sample=False, max_new_tokens=10**12, eos_token_id=first) == [[]]
    assert generate_ids(model, prompts[:1], num_beams=2, max_new_tokens=10**12, eos_token_id=first) == [[]]
    lookup = generate_ids(model, [prompts[0] * 8], do_sample=False, prompt_lookup=5, max_new_tokens=90)
    monkeypatch.setattr(generation_module, "FIRST_COLUMNS", 2)
    assert [generate_ids(model, prompts, max_new_tokens=90, stop_at_eos=False, **kw) for kw in runs] == whole
    assert generate_ids(model, [prompts[0] * 8], do_sample=False, prompt_lookup=5, max_new_tokens=90) == lookup


@pytest.mark.parametrize("num_beams", [1, 2])
def test_no_prompts_no_tokens_and_prompts_the_model_cannot_read(num_beams):
    """No prompts gave [] with beams and "max() arg is an empty sequence" without; max_new_tokens=0 with beams and
    two prompts, an empty row or an id outside the vocabulary raised IndexErrors."""
    model = tiny("gpt2")  # vocab_size 61
    kw = dict(num_beams=num_beams, do_sample=False)
    assert generate_ids(model, [], **kw) == []
    assert list(generation_module.iter_tokens(model, [], GenerationConfig())) == []
    assert generate_ids(model, [[5, 6], [7]], max_new_tokens=0, **kw) == [[], []]
    with pytest.raises(ValueError, match=r"^prompt row 1 has no token ids; start it with one"):
        generate_ids(model, [[5], []], **kw)
    with pytest.raises(ValueError, match=r"^prompt row 0 holds the id 61, outside the model's vocabulary \(0\.\.60\)$"):
        generate_ids(model, [[5, 61]], **kw)
    with pytest.raises(ValueError, match="holds the id -1"):
        generate_ids(model, [[-1]], **kw)


def test_num_beams_1_and_top_k_1_equal_greedy():
    model = tiny("gpt2")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    greedy = generate_ids(model, prompts, do_sample=False, max_new_tokens=15, stop_at_eos=False)
    assert generate_ids(model, prompts, num_beams=1, do_sample=False, max_new_tokens=15, stop_at_eos=False) == greedy
    assert generate_ids(model, prompts, top_k=1, temperature=1.3, seed=3, max_new_tokens=15,
                        stop_at_eos=False) == greedy


@pytest.mark.parametrize("temperature", [1e-50, 1e-40])
def test_a_temperature_too_small_for_float32_samples_the_greedy_tokens(temperature):
    model = tiny("gpt2")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    greedy = generate_ids(model, prompts, do_sample=False, max_new_tokens=15, stop_at_eos=False)
    assert generate_ids(model, prompts, temperature=temperature, seed=3, max_new_tokens=15,
                        stop_at_eos=False) == greedy
    out = process_logits(torch.tensor([[2.0, 1.0, 3.0]]), GenerationConfig(temperature=temperature))
    assert out.softmax(-1).tolist() == [[0.0, 0.0, 1.0]]


def test_seeded_sampling_is_reproducible_and_seed_matters():
    model = tiny("llama")
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95, stop_at_eos=False)
    a = generate_ids(model, [[5, 6]], seed=7, **kw)
    assert a == generate_ids(model, [[5, 6]], seed=7, **kw)
    assert any(generate_ids(model, [[5, 6]], seed=s, **kw) != a for s in range(8, 12))


def test_seeds_that_differ_only_above_32_bits_sample_differently():
    """PyTorch's CPU generator keeps a seed's low 32 bits: 7 and 7 + 2**32 (and -1 and 2**63 - 1) sampled the
    same text. Seeds in [0, 2**32) sample as they always did (torch.Generator().manual_seed(seed))."""
    model = tiny("llama")
    kw = dict(max_new_tokens=20, temperature=1.0, stop_at_eos=False)
    runs = {s: generate_ids(model, [[5, 6]], seed=s, **kw)[0] for s in (7, 7 + 2**32, -1, 2**63 - 1)}
    assert runs[7] != runs[7 + 2**32] and runs[-1] != runs[2**63 - 1]
    assert sampling_generator(7).initial_seed() == 7 and sampling_generator(2**32 - 1).initial_seed() == 2**32 - 1
    assert runs[7 + 2**32] == generate_ids(model, [[5, 6]], seed=7 + 2**32, **kw)[0]  # still reproducible


def test_eos_stops_a_row_and_is_not_returned():
    model = tiny("gpt2")
    free = generate_ids(model, [[5, 6, 7]], do_sample=False, max_new_tokens=10, stop_at_eos=False)[0]
    eos = free[4]  # pretend the 5th greedy token is EOS
    out = generate_ids(model, [[5, 6, 7]], do_sample=False, max_new_tokens=10, eos_token_id=eos)[0]
    assert out == free[:free.index(eos)]


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy():
    model = tiny("gpt")
    prompt = [5, 17, 33]

    def logprob(new):
        ids = torch.tensor([prompt + new])
        with torch.no_grad():
            lp = model(ids).logits.log_softmax(-1)[0, len(prompt) - 1:-1]
        return lp.gather(1, torch.tensor(new)[:, None]).sum().item()

    greedy = generate_ids(model, [prompt], do_sample=False, max_new_tokens=8, stop_at_eos=False)[0]
    beam = generate_ids(model, [prompt], num_beams=4, max_new_tokens=8, stop_at_eos=False)[0]
    assert len(beam) == 8
    assert logprob(beam) >= logprob(greedy) - 1e-5
    # exhaustive check of the beam's claim on a 2-token horizon: beam width >= vocab finds the true argmax
    best2 = generate_ids(model, [prompt], num_beams=61, max_new_tokens=2, stop_at_eos=False)[0]
    with torch.no_grad():
        lp1 = model(torch.tensor([prompt])).logits.log_softmax(-1)[0, -1]
        seqs = torch.tensor([prompt] * 61)
        seqs = torch.cat([seqs, torch.arange(61)[:, None]], dim=1)
        lp2 = model(seqs).logits.log_softmax(-1)[:, -1]
    total = lp1[:, None] + lp2
    flat = int(total.argmax())
    assert best2 == [flat // 61, flat % 61]


def test_a_beam_width_the_memory_cannot_hold_is_refused_before_decoding(monkeypatch):
    """--num-beams 2**63 was a TypeError inside torch.zeros and 2**40 an allocator's RuntimeError (both "internal
    error"): every beam is a row of the KV cache and of the logits. Here llama-tiny (2 layers, 2 KV heads of 16) on
    a 3-token prompt and 5 new tokens: a row is k and v over 8 positions plus three float32 rows of 61 logits."""
    model, prompt = tiny("llama"), [5, 17, 33]
    row = 2 * 2 * 2 * 16 * 4 * 8 + 3 * 4 * 61
    monkeypatch.setattr(generation_module, "available_memory", lambda device: 4 * row)
    assert len(generate_ids(model, [prompt], num_beams=4, max_new_tokens=5, stop_at_eos=False)[0]) == 5
    with pytest.raises(ValueError, match=r"^num_beams \(5\) keeps 5 rows of the KV cache, .* lower --num-beams$"):
        generate_ids(model, [prompt], num_beams=5, max_new_tokens=5, stop_at_eos=False)
    with pytest.raises(ValueError, match=r"^num_beams \(2\) keeps 6 rows"):  # three prompts, two beams each
        generate_ids(model, [prompt] * 3, num_beams=2, max_new_tokens=5, stop_at_eos=False)
    with pytest.raises(ValueError, match=r"^num_beams \(9223372036854775808\) must be <= 1099511627776$"):
        generate_ids(model, [prompt], num_beams=2**63, max_new_tokens=5)


def test_length_penalty_is_bounded_where_the_beam_score_stays_finite():
    """length ** 1000 overflowed a float at 4 tokens (OverflowError, "internal error"); at the bounds, +-10, the
    search runs."""
    model, prompt = tiny("gpt"), [5, 17, 33]
    for penalty in (-10, 10):
        assert len(generate_ids(model, [prompt], num_beams=3, max_new_tokens=8, length_penalty=penalty,
                                stop_at_eos=False)[0]) == 8
    for penalty in (1000, -1000, 10.5):
        with pytest.raises(ValueError, match=r"^length_penalty \(.*\) must be [<>]= -?10$"):
            GenerationConfig(length_penalty=penalty)


def test_top_p_keeps_the_smallest_set_that_reaches_p_as_transformers_does():
    """A set whose mass reached top_p exactly kept one token more ([.5, .25, .125, .125] at 0.5 kept two): the
    kept tokens equal transformers' TopPLogitsWarper's, on those ties and on random logits."""
    warper = pytest.importorskip("transformers").TopPLogitsWarper
    torch.manual_seed(0)
    cases = [(torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log(), 0.5), (torch.zeros(1, 4), 0.5),
             (torch.zeros(1, 4), 0.25)] + [(torch.randn(1, 50) * 2, p) for p in (0.1, 0.5, 0.9, 0.99)]
    for logits, p in cases:
        ours = torch.isfinite(process_logits(logits, GenerationConfig(top_p=p)))
        theirs = torch.isfinite(warper(top_p=p)(None, logits.clone()))
        assert ours.sum() == theirs.sum(), (logits, p, ours, theirs)  # tied tokens: either may be kept
        assert torch.equal(ours, theirs) or len(set(logits[0].tolist())) < logits.size(1)
    assert torch.isfinite(process_logits(cases[0][0], GenerationConfig(top_p=0.5))).sum() == 1


def test_process_logits_top_k_top_p_and_repetition_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    out = process_logits(logits, GenerationConfig(top_k=2))
    assert torch.isinf(out[0, [1, 2, 3]]).all() and torch.isfinite(out[0, [0, 4]]).all()
    probs = logits.softmax(-1)[0]  # sorted: 4 (0.61), 0 (0.22), 1 (0.08), ...
    out = process_logits(logits, GenerationConfig(top_p=0.7))
    assert torch.isfinite(out[0, [4, 0]]).all() and torch.isinf(out[0, [1, 2, 3]]).all(), probs
    out = process_logits(logits, GenerationConfig(top_p=0.5))
    assert torch.isfinite(out[0, 4]) and torch.isinf(out[0, :4]).all()
    out = process_logits(logits, GenerationConfig(repetition_penalty=2.0, do_sample=False),
                         context=torch.tensor([[0, 3]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.5, -2.0, 3.0]]))
    out = process_logits(logits, GenerationConfig(temperature=0.5))
    torch.testing.assert_close(out, logits * 2)


def test_generation_config_validation_names_the_field():
    for kw, field in [(dict(top_p=0), "top_p"), (dict(temperature=-1), "temperature"),
                      (dict(num_beams=0), "num_beams"), (dict(top_k=-2), "top_k")]:
        with pytest.raises(ValueError, match=field):
            GenerationConfig(**kw)


def test_configure_optimizer_decays_only_matrices():
    model = tiny("llama")
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_word_level_models_completion_keeps_the_space_before_its_first_word():
    """A word-level tokenizer decodes words joined by spaces, and the completion was decoded alone: "once upon a"
    + "time , there" read "once upon atime , there" in generate, stream, the batching engine and the OpenAI API's
    tokens. Now the completion is decoded after the prompt's last token: prompt + completion is the whole text."""
    from lmlab.models import generate, stream
    from lmlab.models.batching import BatchEngine, Token
    from lmlab.server.routers.openai import _logprobs
    from lmlab.tokenizers import Tokenizer
    tok = Tokenizer.train(["once upon a time , there was a fox and a hare . the fox ran to the river ."] * 3,
                          kind="word")
    torch.manual_seed(9)  # six words, none of them <EOS> or <PAD>
    model = Transformer(ModelConfig(family="llama", vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32,
                                    block_size=32)).eval()
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False)
    prompt = "once upon a"
    ids = generate_ids(model, [tok.encode(prompt)], cfg)[0]
    whole = tok.decode(tok.encode(prompt) + ids)
    text = generate(model, tok, prompt, cfg)
    assert prompt + text == whole and text.startswith(" ") and len(ids) >= 2, (whole, ids)
    assert "".join(stream(model, tok, prompt, cfg)) == text
    engine = BatchEngine(model, tok, start=False)
    handle = engine.submit([(tok.encode(prompt), cfg)], logprobs=2)
    while engine.rows or engine.waiting:
        engine.step()
    tokens = [ev for ev in handle if isinstance(ev, Token)]
    assert "".join(t.text for t in tokens) == text
    assert "".join(_logprobs(tok, tokens, chat=False)["tokens"]) == text
    assert "".join(c["token"] for c in _logprobs(tok, tokens, chat=True)["content"]) == text
    # after a special token (a chat turn's role) and for byte-level BPE, the continuation is decoded as before
    assert tok.decode_continuation([tok.bos_id], ids) == tok.decode(ids)
    bpe = Tokenizer.train(["once upon a time, жила-была лиса"] * 3, kind="bpe", vocab_size=300)
    p, new = bpe.encode("once upon"), bpe.encode(" a time, жила")
    assert bpe.decode_continuation(p, new) == bpe.decode(new) == " a time, жила"
