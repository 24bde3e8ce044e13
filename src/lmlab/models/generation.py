"""Text generation with the KV cache: greedy, sampling (temperature, top-k, top-p, repetition penalty),
beam search, EOS and stop strings, batched prompts of different lengths, and streaming.

The token loop works on ids; `generate` and `stream` add the tokenizer. A tokenizer here is anything
with `encode(text) -> list[int]`, `decode(ids) -> str` and `stream_decoder()` (lmlab.tokenizers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .config import GenerationConfig
from .fast import Decoder, decoder
from .model import KVCache, Transformer, available_memory

EOS_ID = 3  # lmlab.tokenizers.EOS_ID; models imported from elsewhere pass their own


def _resolve(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    return dataclasses.replace(config or GenerationConfig(), **overrides)


# ---- logits processing ----------------------------------------------------------------------------

TINY_TEMPERATURE = 1e-3  # below it the logits are shifted before they are divided (process_logits)

def process_logits(logits: torch.Tensor, cfg: GenerationConfig, context: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) raw logits -> (B, V) logits to sample from, in HF's order: repetition penalty, temperature,
    top-k, top-p. `context` (B, L) ids already in each row, for the repetition penalty."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and context is not None and context.numel():
        seen = logits.gather(1, context)
        seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
        logits = logits.scatter(1, context, seen)
    if cfg.greedy:
        return logits
    if cfg.temperature < TINY_TEMPERATURE:  # l / T overflows to inf for a small enough T, and softmax gives NaN:
        logits = logits - logits.amax(-1, keepdim=True)  # the largest at 0 first (softmax is unchanged by it)
    # a T below float32's smallest normal number (1e-50) is 0 there, and the largest logit 0 / 0 = NaN
    logits = logits / max(cfg.temperature, torch.finfo(logits.dtype).tiny)
    if 0 < cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:  # nucleus (Holtzman et al. 2019): smallest set whose mass reaches top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # the tokens before this one already reach p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


def _choose(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- the token loop -------------------------------------------------------------------------------

FIRST_COLUMNS = 256  # new tokens the id buffers hold before they first grow


class _Context:
    """Left-padded ids of every row plus the KV cache over (a window of) them. When a row's context outgrows
    the model's window, the cache is rebuilt with that row cut to the last 3/4 of the window (cropping, not a
    crash); every row is cut when and as it would be alone, its older tokens hidden like padding (`visible`),
    since the columns are shared."""

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 pad_id: int, step: Decoder | None = None) -> None:
        self.model, self.step = model, step  # step: fast.py's one-token decoding step, where it applies
        params = next(model.parameters())
        self.device, self.dtype = params.device, params.dtype
        width = max(len(p) for p in prompts)
        self.pad_id, self.capacity = pad_id, width + max_new_tokens  # capacity: the columns there can ever be
        # grown as tokens come (room): a max_new_tokens of 10**9 allocated 8 GB per row up front
        self.ids = torch.full((len(prompts), width + min(max_new_tokens, FIRST_COLUMNS)), pad_id, dtype=torch.long,
                              device=self.device)
        self.mask = torch.zeros_like(self.ids, dtype=torch.bool)  # the row's tokens (not padding)
        for row, prompt in enumerate(prompts):
            if prompt:
                self.ids[row, width - len(prompt):width] = torch.as_tensor(list(prompt), device=self.device)
                self.mask[row, width - len(prompt):width] = True
        self.visible = self.mask.clone()  # those in the row's window: its tokens but the ones cropped away
        # Padding exists only in prompt columns; with none, every window is plain causal attention and
        # next_logits need not scan the mask each step.
        self.padded = any(len(p) != width for p in prompts)
        self.length = width          # filled columns of ids
        self.start = 0               # first column the cache covers
        self.cache: KVCache | None = None
        self.pending = width         # columns not yet fed to the model

    def room(self, n: int) -> None:
        """Columns for `n` more tokens: the buffers at least double when they grow, up to the capacity."""
        if self.length + n <= self.ids.size(1):
            return
        more = min(max(self.length + n, 2 * self.ids.size(1)), self.capacity) - self.ids.size(1)
        self.ids = torch.cat([self.ids, self.ids.new_full((self.ids.size(0), more), self.pad_id)], 1)
        self.mask, self.visible = (torch.cat([m, m.new_zeros((m.size(0), more))], 1) for m in (self.mask, self.visible))

    def append(self, tokens: torch.Tensor) -> None:
        self.room(1)
        self.ids[:, self.length] = tokens
        self.mask[:, self.length] = self.visible[:, self.length] = True
        self.length += 1
        self.pending = 1

    def reorder(self, index: torch.Tensor) -> None:
        self.ids, self.mask = self.ids.index_select(0, index), self.mask.index_select(0, index)
        self.visible = self.visible.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    @torch.inference_mode()
    def next_logits(self, last: int = 0) -> torch.Tensor:
        """Feed what is pending; return (B, V) logits for the next token, or (B, last, V) logits after each
        of the last `last` positions."""
        block = self.model.config.block_size
        if self.cache is None or self.cache.length + self.pending > block:
            # A row's tokens in view end at the last column; one longer than the window keeps its last `keep`
            # (all that fit, at the start; 3/4 of the window when it outgrew the cache, as alone), the others
            # all of theirs. The window starts where the longest kept row does.
            seen = self.visible[:, self.start:self.length].sum(1)
            keep = block if self.cache is None else block - block // 4
            seen = torch.where(seen > block, keep, seen)
            cols = torch.arange(self.length, device=self.device)
            self.visible[:, :self.length] &= cols >= self.length - seen[:, None]
            self.start = self.length - int(seen.max())
            # as long as what can still come (the ids' columns from start), not the whole window: a cache of
            # block_size positions is zero-filled on every call (75 MB for gpt2-124m, ~5% of a 64-token decode)
            self.cache = KVCache(self.model.config, self.ids.size(0), min(block, self.capacity - self.start),
                                 device=self.device, dtype=self.dtype)
            self.pending = self.length - self.start
        cols = slice(self.length - self.pending, self.length)
        window = self.visible[:, self.start:self.length]
        if not self.padded or bool(window.all()):  # no padding in view: causal attention, default positions
            attention_mask = position_ids = None
        else:
            attention_mask = window
            position_ids = Transformer.positions_from_mask(window)[:, -self.pending:]
        if self.pending == 1 and self.step is not None:
            logits = self.step(self.ids[:, cols], self.cache, attention_mask, position_ids).unsqueeze(1)
        else:
            logits = self.model(self.ids[:, cols], attention_mask=attention_mask, position_ids=position_ids,
                                cache=self.cache, last_only=not last).logits
        self.pending = 0
        return logits[:, -last:] if last else logits[:, -1]

    def penalty_ids(self, cfg: GenerationConfig) -> torch.Tensor | None:
        """context_ids for a repetition penalty; None without one (no copy per token on the plain path)."""
        return self.context_ids() if cfg.repetition_penalty != 1.0 else None

    def context_ids(self) -> torch.Tensor:
        """(B, length) every row's tokens so far, cropped ones too; a padding column holds the row's last token
        (a repetition penalty then sees each row's own tokens only, as alone)."""
        ids = self.ids[:, :self.length]
        return ids if not self.padded else torch.where(self.mask[:, :self.length], ids, ids[:, -1:])

    def extend(self, tokens: list[int]) -> torch.Tensor:
        """Batch of one: append `tokens`, feed them in one forward, return the (T, V) logits after each."""
        T = len(tokens)
        self.room(T)
        self.ids[0, self.length:self.length + T] = torch.tensor(tokens, device=self.device)
        self.mask[0, self.length:self.length + T] = self.visible[0, self.length:self.length + T] = True
        self.length += T
        self.pending = T
        return self.next_logits(last=T)[0]

    def drop_last(self, n: int) -> None:
        """Forget the last n tokens (rejected drafts): they leave the ids and the cache."""
        if n:
            self.length -= n
            self.mask[:, self.length:self.length + n] = self.visible[:, self.length:self.length + n] = False
            self.cache.length -= n


_U64 = 2**64 - 1


def sampling_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator sampling draws from for `seed`. PyTorch's CPU generator keeps only a seed's low 32 bits (5
    and 5 + 2**32, or -1 and 2**63 - 1, sample alike), so there a seed outside [0, 2**32) is first mixed into 32
    bits by splitmix64's finaliser (Steele et al. 2014, "Fast splittable pseudorandom number generators"); a seed
    in that range, and any seed on CUDA (whose Philox generator keeps 64 bits), is used as it is."""
    if torch.device(device).type == "cpu" and not 0 <= seed < 2**32:
        z = seed & _U64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        z ^= z >> 31
        seed = (z ^ (z >> 32)) & 0xFFFFFFFF
    return torch.Generator(device=device).manual_seed(seed)


def check_prompts(model: Transformer, prompts: Sequence[Sequence[int]]) -> None:
    """ValueError for a prompt row the model cannot read: one with no token (nothing to predict from) or with an
    id outside its vocabulary (an IndexError deep in the embedding otherwise)."""
    V = model.config.vocab_size
    for row, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"prompt row {row} has no token ids; start it with one (a text prompt starts from <BOS>)")
        bad = next((i for i in prompt if not 0 <= i < V), None)
        if bad is not None:
            raise ValueError(f"prompt row {row} holds the id {bad}, outside the model's vocabulary (0..{V - 1})")


def iter_tokens(model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, *,
                eos_token_id: int | None = EOS_ID, pad_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) once per step. A row is finished after it emits EOS; the
    caller may also set `finished[row] = True` (stop strings) and the loop honours it. Not beam search.
    No prompts: no steps."""
    if cfg.num_beams > 1:
        raise ValueError("iter_tokens samples or decodes greedily; use generate_ids for beam search")
    check_prompts(model, prompts)
    if not prompts:
        return
    ctx = _Context(model, prompts, cfg.max_new_tokens, pad_id, decoder(model, keep=not model.training))
    generator = None
    if cfg.seed is not None:
        generator = sampling_generator(cfg.seed, ctx.device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=ctx.device)
    was_training = model.training
    model.eval()
    lookup = cfg.prompt_lookup if cfg.greedy and len(prompts) == 1 and cfg.repetition_penalty == 1.0 else 0
    try:
        if lookup:
            yield from _lookup_steps(ctx, cfg.max_new_tokens, lookup, eos_token_id if cfg.stop_at_eos else None,
                                     finished)
            return
        for _ in range(cfg.max_new_tokens):
            logits = process_logits(ctx.next_logits(), cfg, ctx.penalty_ids(cfg))
            tokens = _choose(logits, cfg, generator).masked_fill(finished, pad_id)
            ctx.append(tokens)
            if cfg.stop_at_eos and eos_token_id is not None:
                finished |= tokens == eos_token_id
            yield tokens, finished
            if bool(finished.all()):
                break
    finally:
        model.train(was_training)


def _draft(ids: torch.Tensor, k: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup (Saxena 2023, transformers' `prompt_lookup_num_tokens`): k tokens predicted from the
    latest earlier occurrence of the context's last n-gram, longest n first: what followed it, and when that
    runs into the end of the context, the same again (the text since that occurrence is taken to repeat, as
    in a loop shorter than k, where a plain copy would draft one period only)."""
    L = ids.numel()
    for n in range(min(max_ngram, L - 1), 0, -1):
        windows = ids[: L - 1].unfold(0, n, 1)                   # (L - n, n): every earlier n-gram
        hits = (windows == ids[L - n:]).all(-1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n                            # the continuation begins here
            draft = ids[start:start + k].tolist()
            return (draft * -(-k // len(draft)))[:k]             # repeated if it ran into the end
    return []


def _lookup_steps(ctx: _Context, max_new_tokens: int, k: int, eos_token_id: int | None,
                  finished: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy decoding of one row that drafts tokens by prompt lookup and verifies them in one forward: a
    draft token is kept while it is the argmax after its predecessor, so the text is greedy's (up to float
    rounding between a 1-token and a k-token forward in a near-tie), and every kept draft token saves one
    pass over the weights. Repetitive text (names, refrains, code) gains most."""
    logits = ctx.next_logits()[0]                                # (V,) after the prompt
    block = ctx.model.config.block_size
    produced = 0
    while produced < max_new_tokens:
        token = int(logits.argmax())
        # The token and its draft fit in what is left of the window: the full cache is then rebuilt with one
        # token pending, where one-token decoding rebuilds it, so the cropped context and the text stay
        # greedy's. (A draft longer than the rebuilt 3/4 window misaligned the logits and drove the cache
        # length negative.)
        room = max(0, min(k, max_new_tokens - produced - 1, block - ctx.cache.length - 1))
        draft = _draft(torch.cat([ctx.context_ids()[0], ctx.ids.new_tensor([token])]), room) if room else []
        seq = [token, *draft]
        out = ctx.extend(seq)                                    # (len(seq), V)
        predicted = out.argmax(-1).tolist()
        kept = 1
        while kept < len(seq) and seq[kept] == predicted[kept - 1]:
            kept += 1
        ctx.drop_last(len(seq) - kept)
        logits = out[kept - 1]
        for t in seq[:kept]:
            produced += 1
            tokens = torch.tensor([t], device=ctx.device)
            if eos_token_id is not None and t == eos_token_id:
                finished[0] = True
            yield tokens, finished
            if bool(finished.all()):
                return


def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None, *,
                 eos_token_id: int | None = EOS_ID, pad_id: int = 0, **overrides: Any) -> list[list[int]]:
    """New token ids for each prompt (EOS not included)."""
    cfg = _resolve(config, overrides)
    check_prompts(model, prompts)
    if not prompts or cfg.max_new_tokens == 0:
        return [[] for _ in prompts]
    if cfg.num_beams > 1:
        return _beam_search(model, prompts, cfg, eos_token_id, pad_id)
    return _collect(iter_tokens(model, prompts, cfg, eos_token_id=eos_token_id, pad_id=pad_id), len(prompts),
                    eos_token_id)[0]


def _collect(steps: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int, eos_token_id: int | None,
             stop: Any = None) -> tuple[list[list[int]], list[bool]]:
    """Gather each row's tokens up to (not including) EOS; `stop(row_ids) -> bool` ends a row early.
    -> (rows, whether each row ended on EOS)."""
    rows: list[list[int]] = [[] for _ in range(n)]
    done, eos = [False] * n, [False] * n
    for tokens, finished in steps:
        ended = finished.tolist()  # one conversion per step, not one tensor index per row
        for r, tok in enumerate(tokens.tolist()):
            if done[r]:
                continue
            if ended[r] and tok == eos_token_id:
                done[r] = eos[r] = True
                continue
            rows[r].append(tok)
            if stop is not None and stop(rows[r]):
                finished[r] = done[r] = True
    return rows, eos


@torch.inference_mode()
def _beam_search(model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                 eos_token_id: int | None, pad_id: int) -> list[list[int]]:
    """Standard beam search: keep the num_beams best partial hypotheses by summed log-probability; a
    hypothesis ending in EOS is finished and scored sum / length ** length_penalty. Stops for a prompt when
    it has num_beams finished hypotheses and no live beam can still beat the worst of them."""
    _check_beam_rows(model, prompts, cfg)
    was_training = model.training
    model.eval()
    try:
        return _beam_loop(model, prompts, cfg, eos_token_id, pad_id, decoder(model, keep=not was_training))
    finally:
        model.train(was_training)


def _check_beam_rows(model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> None:
    """ValueError when the beams' rows would not fit the free memory: every beam of every prompt is a row of the
    KV cache and of the (rows, vocab) logits (2**40 beams failed in the allocator, an internal error)."""
    mc, params = model.config, next(model.parameters())
    rows = len(prompts) * cfg.num_beams
    columns = min(mc.block_size, max(len(p) for p in prompts) + cfg.max_new_tokens)
    # the logits, their log-probabilities and the candidates' scores: three (rows, vocab) float32 tensors a step
    need = (mc.memory_estimate(rows, columns, training=False, bytes_per_param=params.element_size())["kv_cache"]
            + 3 * 4 * rows * mc.vocab_size)
    have = available_memory(params.device)
    if have is not None and need > have:
        raise ValueError(f"num_beams ({cfg.num_beams}) keeps {rows:,} rows of the KV cache, ~{need / 2**30:,.1f} GiB, "
                         f"but {have / 2**30:.1f} GiB is free on {params.device}; lower --num-beams")


def _beam_loop(model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
               eos_token_id: int | None, pad_id: int, step: Decoder | None) -> list[list[int]]:
    nb, B = cfg.num_beams, len(prompts)
    ctx = _Context(model, prompts, cfg.max_new_tokens, pad_id, step)
    first = True
    scores = torch.zeros(B, nb, device=ctx.device)
    scores[:, 1:] = float("-inf")  # all beams start identical; only the first may expand at step 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    prompt_len = ctx.length
    for step in range(cfg.max_new_tokens):
        logits = ctx.next_logits()
        if first:  # expand each prompt's cache to nb rows after the shared prefill
            ctx.reorder(torch.arange(B, device=ctx.device).repeat_interleave(nb))
            logits = logits.repeat_interleave(nb, dim=0)
            first = False
        logp = process_logits(logits, dataclasses.replace(cfg, do_sample=False), ctx.penalty_ids(cfg)).log_softmax(-1)
        V = logp.size(-1)
        cand = (scores.view(-1, 1) + logp).view(B, nb * V)
        top_scores, top_idx = cand.topk(2 * nb, dim=-1)
        new_scores = torch.full((B, nb), float("-inf"), device=ctx.device)
        src = torch.zeros(B, nb, dtype=torch.long, device=ctx.device)
        tok = torch.full((B, nb), pad_id, dtype=torch.long, device=ctx.device)
        for b in range(B):
            if done[b]:
                src[b] = b * nb  # keep a placeholder row; it is never returned
                continue
            live = 0
            for s, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, token = divmod(idx, V)
                if cfg.stop_at_eos and token == eos_token_id:
                    hyp = ctx.ids[b * nb + beam, prompt_len:ctx.length].tolist()
                    finished[b].append((s / max(len(hyp) + 1, 1) ** cfg.length_penalty, hyp))
                    continue
                new_scores[b, live], src[b, live], tok[b, live] = s, b * nb + beam, token
                live += 1
                if live == nb:
                    break
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:nb]
            if len(finished[b]) == nb:
                best_live = new_scores[b, 0].item() / (step + 1) ** cfg.length_penalty
                done[b] = best_live <= finished[b][-1][0]
        scores = new_scores
        ctx.reorder(src.view(-1))
        ctx.append(tok.view(-1))
        if all(done):
            break
    results = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:
            for beam in range(nb):
                if scores[b, beam] > float("-inf"):
                    hyp = ctx.ids[b * nb + beam, prompt_len:ctx.length].tolist()
                    hyps.append((scores[b, beam].item() / max(len(hyp), 1) ** cfg.length_penalty, hyp))
        results.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
    return results


# ---- text level -----------------------------------------------------------------------------------

def encode_prompt(tokenizer: Any, prompt: str, bos: bool = False) -> list[int]:
    """A prompt's ids, as every caller that generates from text encodes it (the CLI, the API, the server, tuning)."""
    ids = tokenizer.encode(prompt)
    # <BOS> first where asked, where the tokenizer's own rule puts it (an imported Llama's: Tokenizer.adds_bos), and
    # before an empty prompt (something to start from)
    return [tokenizer.bos_id, *ids] if bos or not ids or getattr(tokenizer, "adds_bos", False) else ids


def generate(model: Transformer, tokenizer: Any, prompt: str | Sequence[str], config: GenerationConfig | None = None,
             *, add_bos: bool = False, **overrides: Any) -> str | list[str]:
    """Generate a continuation for one prompt (returns str) or a batch (returns list[str]); the prompt
    itself is not repeated. Stops at EOS, at any stop string (excluded), or after max_new_tokens."""
    cfg = _resolve(config, overrides)
    texts = generate_rows(model, tokenizer, [prompt] if isinstance(prompt, str) else list(prompt), cfg,
                          add_bos=add_bos)[0]
    return texts[0] if isinstance(prompt, str) else texts


def generate_rows(model: Transformer, tokenizer: Any, prompts: Sequence[str], cfg: GenerationConfig, *,
                  add_bos: bool = False) -> tuple[list[str], list[list[int]], list[bool]]:
    """generate's texts, the token ids each row produced (EOS not included; up to where a stop string ended
    the row) and whether each row ended on EOS (which also cost a token), for callers that count tokens or
    score the ending (test-time compute, models/ttc.py)."""
    ids = [encode_prompt(tokenizer, p, add_bos) for p in prompts]
    eos = getattr(tokenizer, "eos_id", EOS_ID)
    pad = getattr(tokenizer, "pad_id", 0)
    if cfg.num_beams > 1:  # beam search ignores stop strings: a hypothesis cut short ended on EOS
        rows = generate_ids(model, ids, cfg, eos_token_id=eos, pad_id=pad)
        ended = [len(r) < cfg.max_new_tokens for r in rows]
    else:
        tail = 4 * max((len(s) for s in cfg.stop_strings), default=0) + 1  # a char is at most 4 byte-level tokens

        def stop(row: list[int]) -> bool:
            return any(s in tokenizer.decode(row[-tail:]) for s in cfg.stop_strings)
        rows, ended = _collect(iter_tokens(model, ids, cfg, eos_token_id=eos, pad_id=pad), len(ids), eos,
                               stop if cfg.stop_strings else None)
    return [_cut_at_stop(continuation(tokenizer, p, row), cfg.stop_strings) for p, row in zip(ids, rows)], rows, ended


def continuation(tokenizer: Any, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after the prompt `context` (a word-level model's first word keeps the space before it):
    the tokenizer's decode_continuation, or decode for a tokenizer without one."""
    if hasattr(tokenizer, "decode_continuation"):
        return tokenizer.decode_continuation(context, ids)
    return tokenizer.decode(ids)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def stream(model: Transformer, tokenizer: Any, prompt: str, config: GenerationConfig | None = None, *,
           add_bos: bool = False, **overrides: Any) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece as tokens are produced. Text that might be the
    start of a stop string is held back until it is known not to be one; the concatenation of all
    pieces equals `generate(...)` with the same settings and seed."""
    cfg = _resolve(config, overrides)
    if cfg.num_beams > 1:
        raise ValueError("streaming needs num_beams=1 (beam search only knows the winner at the end)")
    ids = encode_prompt(tokenizer, prompt, add_bos)
    eos = getattr(tokenizer, "eos_id", EOS_ID)
    text = StopText(tokenizer, cfg.stop_strings, context=ids)
    for tokens, finished in iter_tokens(model, [ids], cfg, eos_token_id=eos, pad_id=getattr(tokenizer, "pad_id", 0)):
        if finished[0] and tokens[0].item() == eos:
            break
        piece = text.push(tokens[0].item())
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.flush()
    if piece:
        yield piece


class StopText:
    """The text of token ids pushed one at a time, as it may be shown: a stop string and what follows it are
    cut, and text that might be the start of a stop string is held back until it is known not to be one.
    The pieces push and flush return add up to generate's text of the same ids after the prompt `context`."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], context: Sequence[int] = ()) -> None:
        self.decoder = (tokenizer.stream_decoder(context=context) if hasattr(tokenizer, "decode_continuation")
                        else tokenizer.stream_decoder())
        self.stops = list(stops)
        self.held, self.stopped = "", False
        self.decoded = 0  # characters decoded so far (held or not)
        self.offset = 0   # where the latest token's text starts (OpenAI's text_offset)

    def push(self, token_id: int) -> str:
        """The text that can be shown now; after a stop string, `stopped` is True and nothing more comes."""
        if self.stopped:
            return ""
        text = self.decoder.push(token_id)
        self.offset, self.decoded = self.decoded, self.decoded + len(text)
        self.held += text
        cut = _cut_at_stop(self.held, self.stops)
        if len(cut) < len(self.held):  # a stop string appeared
            self.stopped, self.held = True, ""
            return cut
        # hold back the longest suffix that is a prefix of some stop string
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.held)) + 1)
                    if self.held.endswith(s[:k])), default=0)
        piece, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return piece

    def flush(self) -> str:
        """What is still held, once no more tokens come."""
        if self.stopped:
            return ""
        piece, self.held = _cut_at_stop(self.held + self.decoder.flush(), self.stops), ""
        return piece
