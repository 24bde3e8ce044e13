"""Continuous batching: generation requests that arrive together are decoded together, one step over every
active sequence, with sequences joining and leaving between steps (iteration-level scheduling: Orca, Yu et al.
OSDI 2022; vLLM's and Hugging Face TGI's schedulers work this way).

    engine = BatchEngine(model, tokenizer)
    handle = engine.submit([(prompt_ids, GenerationConfig(max_new_tokens=64, seed=1))])
    for event in handle: ...        # Token per new token of each sequence, Finish when one ends

Each sequence keeps what it would have alone: its GenerationConfig (temperature, top-k, top-p, stop strings,
EOS, length), its own torch.Generator seeded with its seed, its positions. That makes it produce what
`generate` produces for it alone: the prompts that join between two steps are prefilled together, left-padded
as generate_ids prefills a batch (a lone prompt takes the very forward generation alone takes), and each step
samples its row with process_logits and the multinomial draw of iter_tokens from its own generator
only, so neighbours never consume its random numbers. After the prefill its keys and values join the batch's
cache right-aligned, rows left-padded as in generate_ids: the attention mask hides the padding and positions
count from each row's first real token, so a row sees exactly its own context. The batch's rows differ from
a lone row only in float rounding (a matmul over B rows may sum in another order), which can flip a greedy
choice only in a near-tie, as with generate_ids on a batch.

One thread per engine runs the steps; callers block on their handle's queue, or await it (`submit(...,
loop=)`, then `async for event in handle`: a server's coroutine waits without holding a thread). A step costs
about one read of the weights whatever the number of rows, which is where the throughput comes from on a
memory-bound CPU.
Joining prompts are prefilled whole between two steps, so a long one delays the rows for that time (vLLM's
chunked prefill would interleave it with decoding; not done here). Prefilling them in one forward rather than
one by one matters on a CPU: twenty short prompts cost a few of those forwards' time, not twenty.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .fast import decoder
from .generation import (
    EOS_ID,
    GenerationConfig,
    StopText,
    _choose,
    _Context,
    process_logits,
    sampling_generator,
)
from .model import KVCache, Transformer, available_memory


@dataclass
class Token:
    index: int                    # the caller's number for the sequence (the choice)
    id: int
    text: str = ""                # the text this token releases (text that may begin a stop string is held)
    offset: int = 0               # where the token's own text starts in the completion
    logprob: float | None = None  # log-softmax of the model's logits (before temperature and top-k/p)
    top: list[tuple[int, float]] = field(default_factory=list)  # the `logprobs` most likely ids
    after: list[int] = field(default_factory=list)  # the id before it (the prompt's last for the first token)


@dataclass
class Finish:
    index: int
    reason: str                   # "stop" (EOS or a stop string), "length" (max_new_tokens)
    tokens: int                   # tokens sampled, a final EOS included
    ids: list[int]                # the new ids, EOS not included
    text: str = ""                # the text still held back when it ended (the completion: Tokens' text + this)


class _Sequence:
    def __init__(self, prompt: Sequence[int], cfg: GenerationConfig, index: int, logprobs: int | None,
                 out: queue.Queue | _LoopQueue, device: torch.device, text: StopText, ends: frozenset[int]) -> None:
        self.prompt, self.cfg, self.index, self.logprobs, self.out = list(prompt), cfg, index, logprobs, out
        self.text, self.ends = text, ends  # its text as shown (stop strings cut); the ids that end it (EOS)
        seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
        self.generator = sampling_generator(seed, device)  # iter_tokens' generator, alone
        self.ids: list[int] = []
        self.count = 0
        self.cancelled = False


class _LoopQueue:
    """A handle's queue read by a coroutine: the engine's thread hands each event to the event loop (an
    asyncio.Queue is not thread-safe); once the loop is closed nobody reads, and the event is dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass


class _Rows(KVCache):
    """The first B rows of the engine's storage, as the KVCache the model and fast.Decoder write into."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        self.k, self.v, self.max_len, self.length = k, v, k.size(3), length


class Handle:
    """The events of one submit: a Token per new token of each of its sequences and a Finish per sequence.
    Iterating ends after the last Finish; an engine error is raised here."""

    def __init__(self, engine: BatchEngine, seqs: list[_Sequence], out: queue.Queue | _LoopQueue) -> None:
        self._engine, self._seqs, self._out = engine, seqs, out

    def __iter__(self) -> Iterator[Token | Finish]:
        left = len(self._seqs)
        while left:
            event = self._out.get()
            if isinstance(event, BaseException):
                raise event
            left -= isinstance(event, Finish)
            yield event

    async def __aiter__(self) -> AsyncIterator[Token | Finish]:
        """The events, awaited (a handle submitted with `loop=`, iterated on that loop)."""
        if not isinstance(self._out, _LoopQueue):
            raise TypeError("async iteration needs a handle submitted with loop=")
        left = len(self._seqs)
        while left:
            event = await self._out.queue.get()
            if isinstance(event, BaseException):
                raise event
            left -= isinstance(event, Finish)
            yield event

    def cancel(self) -> None:
        """Stop decoding these sequences (a client went away): their rows leave before the next step."""
        for seq in self._seqs:
            seq.cancelled = True


class NonFiniteLogits(RuntimeError):
    """A sequence's next-token logits hold a NaN or an infinity: no token can be chosen from them."""


class EngineClosed(RuntimeError):
    """submit() on a closed engine: the caller may get the model's engine again and submit there."""


def rows_that_fit(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Rows of a full-context cache that a third of the free memory holds (at least 1): growing the cache keeps
    the old one beside the new (twice the size at most) and moving its columns copies them, so a step could
    otherwise run out of memory mid-decode and end every row's request. A huge number where memory is not told."""
    have = available_memory(device)
    if have is None:
        return 1 << 30
    per_row = (2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * dtype.itemsize + 1) * cfg.block_size  # k, v, mask
    return max(1, have // (3 * per_row))


class BatchEngine:
    """Decodes every submitted sequence of one model in shared steps, up to `max_rows` at a time (the rest
    wait their turn). `max_rows_seen` is the most rows one step has decoded, `steps` the steps taken. The
    model's weights must not change while the engine lives (the server makes a new engine for new weights)."""

    def __init__(self, model: Transformer, tokenizer: object, *, max_rows: int = 32,
                 eos_token_id: int | None = None, start: bool = True) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_id", EOS_ID)
        params = next(model.parameters())
        self.device, self.dtype = params.device, params.dtype
        self.max_rows = min(max_rows, rows_that_fit(model.config, self.device, self.dtype))
        self.step_fn = decoder(model)
        self.rows: list[_Sequence] = []       # row r of the cache is rows[r]
        self.k = self.v = self.mask = None    # (n_layer, capacity, K, width, D) and (capacity, width)
        self.length = 0                       # columns in use; every row ends at the last of them
        self.waiting: list[_Sequence] = []
        self.cv = threading.Condition()
        self.closed = False
        self.max_rows_seen = self.steps = 0
        self.thread = threading.Thread(target=self._run, name="lmlab-batching", daemon=True)
        if start:
            self.thread.start()

    def submit(self, requests: Sequence[tuple[Sequence[int], GenerationConfig]], *,
               logprobs: int | None = None, end_ids: Sequence[int] = (),
               loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue sequences (prompt ids, settings), numbered 0.. in order; `logprobs`: report each new token's
        log-probability and that many alternatives (None: none); `end_ids`: ids that end a sequence as EOS does
        (a chat model's end of turn); `loop`: the handle is read with `async for` on that event loop. Each
        prompt plus its max_new_tokens must fit the model's context (the caller checks: a lone generation
        would crop it, a batch row cannot)."""
        out = queue.Queue() if loop is None else _LoopQueue(loop)
        ends = frozenset({self.eos, *end_ids})
        seqs = [_Sequence(p, cfg, i, logprobs, out, self.device, StopText(self.tokenizer, cfg.stop_strings, p), ends)
                for i, (p, cfg) in enumerate(requests)]
        block = self.model.config.block_size
        for seq in seqs:
            if not seq.prompt or len(seq.prompt) + seq.cfg.max_new_tokens > block or seq.cfg.num_beams > 1:
                raise ValueError(f"a sequence needs 1 to {block} prompt and new tokens together, and no beams")
        with self.cv:
            if self.closed:
                raise EngineClosed("this engine is closed")
            self.waiting += seqs
            self.cv.notify()
        return Handle(self, seqs, out)

    def close(self) -> None:
        """Finish what was submitted, then end the thread."""
        with self.cv:
            self.closed = True
            self.cv.notify()

    # ---- the scheduler thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.rows and not self.closed:
                    self.cv.wait()
                if self.closed and not self.waiting and not self.rows:
                    return
            self.step()

    def step(self) -> None:
        """One round of the scheduler: admit waiting sequences (as many as there is room for), drop cancelled
        rows, decode one token for every row. The engine's thread calls it; with start=False, the caller."""
        with self.cv:
            joining = self._take(self.max_rows - len(self.rows))
        with torch.inference_mode():
            self._admit(joining)  # a failure there ends the joining sequences only
            try:
                self._leave([s for s in self.rows if s.cancelled])
                if self.rows:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - the callers get the error; the engine starts afresh
                for seq in self.rows:
                    seq.out.put(exc)
                self.rows, self.k, self.v, self.mask, self.length = [], None, None, None, 0

    def _take(self, room: int) -> list[_Sequence]:
        """Up to `room` waiting sequences, taken from the requests in turn: the one holding the fewest rows
        (then the earliest) gives its next sequence. So a request of many sequences (n = 128) shares the rows
        that free up with the requests that came after it instead of keeping them out until all of its own have
        started; with room for every waiting sequence, this is arrival order."""
        if room >= len(self.waiting):
            joining, self.waiting = self.waiting, []
            return joining
        held = Counter(id(s.out) for s in self.rows)
        queues: dict[int, deque[_Sequence]] = {}  # per request (its handle's queue), in order of arrival
        for seq in self.waiting:
            queues.setdefault(id(seq.out), deque()).append(seq)
        joining = []
        while len(joining) < room:
            turn = min(queues, key=held.__getitem__)  # the first of the least served: min keeps the earliest
            joining.append(queues[turn].popleft())
            held[turn] += 1
            if not queues[turn]:
                del queues[turn]
        chosen = set(map(id, joining))
        self.waiting = [s for s in self.waiting if id(s) not in chosen]
        return joining

    def _admit(self, seqs: list[_Sequence]) -> None:
        """Prefill the joining prompts together (one forward over the left-padded prompts, as generate_ids
        prefills a batch; a lone prompt, or prompts of one length, take the plain causal forward generation
        alone takes), sample each one's first token, and give each row that did not end there a place in the
        batch. A prompt that several sequences share (a request's n samples) is prefilled once and its keys
        and values copied to each of their rows: n copies of a 7k-token prompt froze every other stream of
        the model n times as long (26.6 s for n = 32), for the same numbers.

        An error here (the joining prompts' prefill ran out of memory) ends the joining sequences with it; the
        rows already decoding are untouched and decode on."""
        seqs = [s for s in seqs if not s.cancelled]
        if not seqs:
            return
        unique: dict[tuple[int, ...], int] = {}  # prompt -> its row in the prefill
        rows = [unique.setdefault(tuple(s.prompt), len(unique)) for s in seqs]
        try:
            prompts = _Context(self.model, list(unique), 0, pad_id=0)  # generate_ids' left padding
            logits = prompts.next_logits()
            finite = torch.isfinite(logits).all(-1).tolist()
        except Exception as exc:  # noqa: BLE001 - their callers get it
            for seq in seqs:
                seq.out.put(exc)
            return
        P, cache, pmask = prompts.length, prompts.cache, prompts.mask
        alive = [i for i, (seq, r) in enumerate(zip(seqs, rows))
                 if not self._sample_or_fail(seq, logits[r:r + 1], finite[r])]
        if not alive:
            return
        B, L, n = len(self.rows), max(self.length, P), len(alive)
        index = torch.tensor([rows[i] for i in alive], device=self.device)
        try:  # _reserve and _shift change the rows' storage whole or not at all
            self._reserve(B + n, L + 1)
            if L > self.length:  # a longer prompt than any row so far: shift the rows right
                self._shift(self.length, L)
            self.k[:, B:B + n, :, L - P:L] = cache.k[:, index, :, :P]
            self.v[:, B:B + n, :, L - P:L] = cache.v[:, index, :, :P]
            self.mask[B:B + n].zero_()
            self.mask[B:B + n, L - P:L] = pmask[index]
        except Exception as exc:  # noqa: BLE001 - rows B.. are not in self.rows yet: nothing else sees them
            for i in alive:
                seqs[i].out.put(exc)
            return
        self.rows += [seqs[i] for i in alive]

    def _step(self) -> None:
        B, L = len(self.rows), self.length
        try:
            self._reserve(B, L + 1)
        except Exception as exc:  # noqa: BLE001 - the storage cannot grow by its next column (out of memory)
            # Only the widest rows (their context begins at column 0) need that column: they end with the error,
            # the columns shrink to the others' contexts, which fit. A 6800-token request admitted beside four
            # short streams ended them all here when the storage doubled its width.
            widest = [s for r, s in enumerate(self.rows) if self.mask[r, 0]] or list(self.rows)
            for seq in widest:
                seq.out.put(exc)
            self._leave(widest)
            if not self.rows:
                return
            B, L = len(self.rows), self.length
            self._reserve(B, L + 1)
        self.mask[:B, L] = True
        mask = self.mask[:B, :L + 1]
        positions = mask.sum(1, keepdim=True) - 1                            # (B, 1): each row's own position
        idx = torch.tensor([[s.ids[-1]] for s in self.rows], device=self.device)
        cache = _Rows(self.k[:, :B], self.v[:, :B], L)
        if self.step_fn is not None:
            logits = self.step_fn(idx, cache, mask, positions)
        else:
            logits = self.model(idx, attention_mask=mask, position_ids=positions, cache=cache,
                                last_only=True).logits[:, -1]
        self.length += 1
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, B)
        finite = torch.isfinite(logits).all(-1).tolist()
        self._leave([s for r, s in enumerate(self.rows) if self._sample_or_fail(s, logits[r:r + 1], finite[r])])

    def _sample_or_fail(self, seq: _Sequence, logits: torch.Tensor, finite: bool = True) -> bool:
        """_sample; an error there (the row's own settings) ends that row alone, with the error as its answer: the
        other rows decode on. Logits with a NaN or an infinity (broken weights, an overflow) end it too: greedy
        took the NaN's id as the top token and logprobs held NaN, which JSON cannot carry to the API's clients."""
        try:
            if not finite:
                raise NonFiniteLogits("the model's logits are not finite (NaN or infinity): its weights or "
                                      "activations are broken")
            return self._sample(seq, logits)
        except Exception as exc:  # noqa: BLE001 - its caller gets it
            seq.out.put(exc)
            return True

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> bool:
        """Choose the row's next token from its (1, V) logits as iter_tokens would alone; True when the
        sequence has ended (its Finish is sent)."""
        cfg = seq.cfg
        penalty = cfg.repetition_penalty != 1.0
        context = torch.tensor([seq.prompt + seq.ids], device=self.device) if penalty else None
        token = int(_choose(process_logits(logits, cfg, context), cfg, seq.generator)[0])
        seq.count += 1
        if cfg.stop_at_eos and token in seq.ends:
            return self._finish(seq, "stop")
        after = seq.ids[-1:] or seq.prompt[-1:]  # (no list copy per token)
        seq.ids.append(token)
        event = Token(seq.index, token, seq.text.push(token), seq.text.offset, after=after)
        if seq.logprobs is not None:
            logp = logits[0].float().log_softmax(-1)
            event.logprob = float(logp[token])
            if seq.logprobs:
                top = logp.topk(min(seq.logprobs, logp.numel()))
                event.top = list(zip(top.indices.tolist(), top.values.tolist()))
        seq.out.put(event)
        if seq.text.stopped:  # a stop string appeared: its text and what follows are cut
            return self._finish(seq, "stop")
        return self._finish(seq, "length") if seq.count >= cfg.max_new_tokens else False

    def _finish(self, seq: _Sequence, reason: str) -> bool:
        seq.out.put(Finish(seq.index, reason, seq.count, seq.ids, seq.text.flush()))
        return True

    # ---- the cache: rows right-aligned at column `length`, padding on the left -------------------------

    def _reserve(self, rows: int, width: int) -> None:
        """Storage for `rows` rows of `width` columns, grown by doubling (capped by max_rows and the context)."""
        cap, have = (0, 0) if self.k is None else (self.k.size(1), self.k.size(3))
        if rows <= cap and width <= have:
            return
        cfg = self.model.config
        cap = max(rows, min(2 * cap, self.max_rows))
        have = min(cfg.block_size, max(width, 2 * have))
        shape = (cfg.n_layer, cap, cfg.n_kv_head, have, cfg.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros_like(k)
        mask = torch.zeros(cap, have, dtype=torch.bool, device=self.device)
        if self.k is not None:
            B, L = len(self.rows), self.length
            k[:, :B, :, :L], v[:, :B, :, :L], mask[:B, :L] = self.k[:, :B, :, :L], self.v[:, :B, :, :L], \
                self.mask[:B, :L]
        self.k, self.v, self.mask = k, v, mask

    def _shift(self, old: int, new: int) -> None:
        """Move the rows' last min(old, new) columns to end at column `new` (padding added or dropped left)."""
        B, w = len(self.rows), min(old, new)
        # every copy made before any is written back: an allocation that fails leaves the rows as they were
        k, v = (t[:, :B, :, old - w:old].clone() for t in (self.k, self.v))
        mask = self.mask[:B, old - w:old].clone()
        self.k[:, :B, :, new - w:new], self.v[:, :B, :, new - w:new], self.mask[:B, new - w:new] = k, v, mask
        self.mask[:B, :new - w] = False
        self.length = new

    def _leave(self, done: list[_Sequence]) -> None:
        """Drop ended rows (the others move up), then the columns that are padding in every row left."""
        if not done:
            return
        keep = [s for s in self.rows if s not in done]
        index = torch.tensor([self.rows.index(s) for s in keep], dtype=torch.long, device=self.device)
        B = len(keep)
        self.k[:, :B], self.v[:, :B] = self.k[:, index], self.v[:, index]
        self.mask[:B] = self.mask[index]
        self.rows = keep
        if not B:  # an idle engine holds no cache (it grew to the busiest batch's size)
            self.k = self.v = self.mask = None
            self.length = 0
            return
        real = self.mask[:B, :self.length].any(0).nonzero()
        self._shift(self.length, self.length - int(real[0]))
