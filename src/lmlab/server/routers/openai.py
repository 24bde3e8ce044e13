"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, in the
shapes of the OpenAI API reference (https://platform.openai.com/docs/api-reference), so any OpenAI client
talks to the workspace's trained models:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN)   # any api_key without --api-token
    client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=64, seed=1)

Requests to one model are decoded together by its BatchEngine (models/batching.py), whatever their
settings. A request's sequence `i` of `n` samples with seed + i, as `lmlab generate --seed S --num-samples n`
does, and gets the same text as `lmlab generate` with those settings (the model's generation.json is not
applied here: a request's defaults are the API's, temperature 1 and top_p 1). Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}` with a 4xx status, the guards' (app.py) included.
`GET /v1/batching` (lmlab's own) tells how many rows the engines have decoded in one step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ...models import GenerationConfig
from ...models.batching import BatchEngine, EngineClosed, Finish, Token
from ...models.generation import encode_prompt
from ...tune import chat as chat_format
from ..app import StateDep, openai_error
from ..inference import NotTrained, unservable
from ..services import event_stream, need_model, version_source
from ..workspace import BadName

MAX_SEQUENCES = 128   # prompts x n of one request (OpenAI's limit on n)
MAX_ENGINES = 4       # models with a scheduler thread at once (the model cache holds 4)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI names a parameter (`messages[0].content`); a union's member
    names in the location (`str`, `list[int]`) end it."""
    out = ""
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in ("str", "int", "float", "bool"):
            out += f".{part}" if out else part
        else:
            break
    return out or None


class OpenAIRoute(APIRoute):
    """Answers this router's errors in OpenAI's shape: validation errors as 400 naming the parameter, the
    services' HTTPExceptions with their status (404 for an unknown model: model_not_found)."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def route(request: Request) -> Any:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                e = exc.errors()[0]
                param = None if e["type"] == "json_invalid" else _param(tuple(e["loc"]))  # its loc: a character
                if e["type"] == "extra_forbidden":
                    message = f"Unrecognized request argument supplied: {param}"
                else:
                    message = f"Invalid value for '{param}': {e['msg']}" if param else e["msg"]
                return JSONResponse(openai_error(400, message, param, e["type"]), status_code=400)
            except OpenAIError as exc:
                return JSONResponse(openai_error(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)
            except BadName as exc:  # a name no model can have
                return JSONResponse(openai_error(404, str(exc), "model", "model_not_found"), status_code=404)
            except HTTPException as exc:
                code, param = ("model_not_found", "model") if exc.status_code == 404 else (None, None)
                return JSONResponse(openai_error(exc.status_code, str(exc.detail), param, code),
                                    status_code=exc.status_code, headers=exc.headers)
        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


# ---- requests --------------------------------------------------------------------------------------

def _unset(empty: Any = None) -> Any:
    """A parameter this server does not implement, taken only as null (or `empty`): OpenAI's clients send null
    for what the caller passed as None (`tools=tools or None`), and an assistant message sent back as the server
    returned it carries `"refusal": null`. A value is refused with a 400 naming it."""
    def check(v: Any) -> None:
        if v is not None and v != empty:
            raise ValueError("not supported by this server: leave it out or send null")
    return Annotated[None, BeforeValidator(check), Field(None, description="null only (not implemented)")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # OpenAI refuses "3" or true for 3
    include_usage: bool | None = None
    include_obfuscation: bool | None = Field(None, description="accepted and ignored: chunks carry no padding")


class Sampling(BaseModel):
    """The settings both endpoints share; null means the default, as in OpenAI's API."""
    model_config = ConfigDict(extra="forbid", strict=True)  # OpenAI refuses "3" or true for 3
    model: str = Field(..., min_length=1, max_length=100)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=MAX_SEQUENCES)
    stop: str | list[str] | None = Field(None, description="up to 4 strings; generation stops before them")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=1000, description="accepted and ignored")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="0 only (not implemented)")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="0 only (not implemented)")
    logit_bias: _unset({}) = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field("", description="text, texts, or token ids")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities of each token and this many "
                                                                "alternatives")
    echo: Literal[False] | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_SEQUENCES, description="sample this many per prompt and return "
                                "the n with the highest mean log-probability per token (not with stream)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # OpenAI refuses "3" or true for 3
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # OpenAI refuses "3" or true for 3
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=100)
    refusal: _unset() = None          # what the server's own replies carry (null), sent back with the history
    tool_calls: _unset() = None
    function_call: _unset() = None
    audio: _unset() = None
    annotations: _unset([]) = None  # the openai client's message.model_dump() has "annotations": null


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: _unset() = None
    tool_choice: _unset() = None
    parallel_tool_calls: _unset() = None
    functions: _unset() = None
    function_call: _unset() = None
    response_format: _unset({"type": "text"}) = None  # text, the default, is what this server answers


# ---- the engines ------------------------------------------------------------------------------------

_ENGINES = threading.Lock()


def engine_for(state: Any, name: str) -> tuple[BatchEngine, Path]:
    """The batching engine of the model `name` as the model cache holds it now (a model retrained since gets
    a new engine; the old one finishes its sequences and ends), and the model's directory."""
    src, snapshot, _ = version_source(state, name, None, None)
    try:
        model, tokenizer = state.cache.get(src, snapshot)
    except NotTrained as exc:
        raise OpenAIError(404, str(exc), "model", "model_not_found") from None
    except (ValueError, FileNotFoundError) as exc:
        raise OpenAIError(409, f"model {name!r} cannot be loaded: {exc}", "model") from None
    with _ENGINES:
        engine = state.engines.pop(src, None)
        if engine is None or engine.model is not model:
            if engine is not None:
                engine.close()
            engine = BatchEngine(model, tokenizer)
        state.engines[src] = engine
        while len(state.engines) > MAX_ENGINES:
            state.engines.popitem(last=False)[1].close()
    return engine, src


def render_chat(model_dir: Path, tokenizer: Any, messages: list[ChatMessage]) -> tuple[list[int], list[int]]:
    """The prompt ids of a conversation, ending where the assistant's reply begins, and the ids that end the
    reply besides EOS.

    A model fine-tuned with lmlab's chat template (`lmlab tune sft`: chat_template.jinja in its directory) gets
    the conversation rendered by it (tune.chat.render; a developer message counts as a system one) and its reply
    ends at <|end|>; another template is a 400 (it is not rendered by guesswork, as `lmlab chat` refuses it). A model
    without one continues the text of the conversation: the messages' contents (a list
    of text parts joined), joined with one newline, roles left out, encoded as /v1/completions encodes a prompt
    (an empty text starts from <BOS>). A single user message is thus exactly that prompt."""
    texts = [m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
             for m in messages]
    template = model_dir / chat_format.TEMPLATE_FILE
    if template.is_symlink() or template.exists():
        if template.is_symlink() or not template.is_file() \
                or template.read_text(encoding="utf-8", errors="replace") != chat_format.TEMPLATE:
            raise OpenAIError(400, f"model {model_dir.name!r} has a chat template that is not lmlab's "
                              "(<|user|>...<|end|>), the only one this server renders: send the conversation as a "
                              "prompt to /v1/completions", "model")
        try:  # the template without the tokens it names (written by hand beside a pre-trained model)
            end = chat_format.chat_token_ids(tokenizer)["end"]
        except ValueError as exc:
            raise OpenAIError(400, f"model {model_dir.name!r} has lmlab's chat template but {exc}", "model") from None
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": t}
                 for m, t in zip(messages, texts, strict=True)]
        ids, _ = chat_format.render(turns, tokenizer, add_generation_prompt=True)
        return ids, [end]
    return _encode(tokenizer, "\n".join(texts)), []


def _encode(tokenizer: Any, text: str) -> list[int]:
    return encode_prompt(tokenizer, text)  # generation.generate's rules


def _text(text: str, param: str) -> str:
    """`text` if it is Unicode text that UTF-8 can hold; a lone surrogate (JSON's "\\ud800", which pydantic lets
    through a union field) is a 400 naming the parameter."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError(400, f"Invalid value for '{param}': not valid Unicode text (a lone surrogate)",
                          param) from None
    return text


# ---- the endpoints ----------------------------------------------------------------------------------

def _model_card(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["name"], "object": "model", "created": int(row["created_at"]), "owned_by": "lmlab"}


@router.get("/models", summary="The workspace's models that can be served (weights, config and tokenizer)")
def list_models(state: StateDep) -> dict[str, Any]:
    rows = [r for r in state.db.list_models() if unservable(state.ws.model_path(r["name"]), r["name"]) is None]
    return {"object": "list", "data": [_model_card(r) for r in rows]}


@router.get("/models/{model}", summary="One model")
def get_model(state: StateDep, model: str) -> dict[str, Any]:
    row = need_model(state, model)
    if (why := unservable(state.ws.model_path(model), model)) is not None:
        raise OpenAIError(404, why, "model", "model_not_found")
    return _model_card(row)


@router.get("/batching", summary="lmlab's own: each loaded model's batching engine (the most rows it decoded "
                                 "in one step, its steps, its rows now, the sequences waiting for a row)")
def batching(state: StateDep) -> dict[str, Any]:
    with _ENGINES:
        engines = list(state.engines.items())
    return {"object": "list", "data": [{"model": path.name, "max_rows": e.max_rows_seen, "steps": e.steps,
                                        "active": len(e.rows), "waiting": len(e.waiting)} for path, e in engines]}


@dataclass
class _Plan:
    """A validated request, ready to submit: its sequences (prompt x samples, in choice order), what to report."""
    engine: BatchEngine
    requests: list[tuple[list[int], GenerationConfig]]
    prompts: list[list[int]]
    offsets: list[int]          # per prompt: where the completion starts in prompt + completion (text_offset)
    n: int
    best: int
    scored: int | None          # log-probabilities the engine reports (best_of ranks by them)
    shown: bool                 # ... and whether the answer shows them
    chat: bool
    end_ids: Sequence[int]
    stream: bool
    usage: bool                 # a stream's usage chunk was asked for
    meta: dict[str, Any]

    def usage_of(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(x) for x in self.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _serve(request: Request, plan: Callable[[], _Plan]) -> Any:
    """Build the plan in a worker thread (loading the model, encoding), submit it to the engine, and await the
    answer on the event loop: a waiting request holds no thread, so the other endpoints are answered while
    generations run. The sequences leave the batch when the client goes away, streaming or not.

    The plan is built and submitted once more if the engine it got was closed before its sequences reached it
    (engine_for closes the oldest when a fifth model's engine starts, and a reloaded model's); a second time is
    a 503."""
    loop = asyncio.get_running_loop()
    for _ in range(2):
        p = await run_in_threadpool(plan)
        try:
            handle = p.engine.submit(p.requests, logprobs=p.scored, end_ids=p.end_ids, loop=loop)
            break
        except EngineClosed:
            continue
    else:
        raise OpenAIError(503, "the model's engine was replaced twice while this request waited; send it again",
                          "model")
    if p.stream:
        return event_stream(_chunks(p, handle), on_close=handle.cancel)
    try:
        events = await _collect(handle, request)
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it (nginx's code for a client that closed the request)
    except Exception as exc:  # noqa: BLE001 - the engine's error (the others' requests decode on): OpenAI's shape
        handle.cancel()  # this request's other sequences, which would decode on for nobody
        raise OpenAIError(500, f"generation failed: {exc}") from None
    # built and encoded in a worker thread: n x tokens x top_logprobs entries (tens of MB) held the event loop,
    # and with it every other request and stream, for seconds
    return await run_in_threadpool(lambda: JSONResponse(_response(p, events)))


async def _collect(handle: Any, request: Request) -> list[Token | Finish]:
    """Every event of the handle; _ClientGone (the sequences cancelled) as soon as the client has gone. The body
    has been read, so the server's next message is the disconnect: awaited, not polled (a poll every 0.1 s of each
    waiting request cost 8% of the concurrent throughput in GIL hand-overs with the engine's thread)."""
    async def drain() -> list[Token | Finish]:
        return [event async for event in handle]

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    events, leaving = asyncio.ensure_future(drain()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({events, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if events.done():
            return events.result()
        raise _ClientGone
    finally:
        leaving.cancel()
        if not events.done():
            events.cancel()
            handle.cancel()


@router.post("/completions", summary="Text completion (OpenAI's legacy Completions API)")
async def completions(state: StateDep, req: CompletionRequest, request: Request) -> Any:
    return await _serve(request, lambda: _completions(state, req))


def _completions(state: Any, req: CompletionRequest) -> _Plan:
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    for p in prompt:
        if isinstance(p, str):
            _text(p, "prompt")
    checked = _check(req, len(prompt) or 1, "prompt")
    engine, _ = engine_for(state, req.model)
    tok = engine.tokenizer
    prompts = [_encode(tok, p) if isinstance(p, str) else list(p) for p in prompt] or [[tok.bos_id]]
    vocab = engine.model.config.vocab_size
    if any(not p or not all(0 <= t < vocab for t in p) for p in prompts):
        raise OpenAIError(400, f"a prompt of token ids needs 1 or more ids in [0, {vocab})", "prompt")
    # text_offset counts from the start of the prompt's text, as OpenAI's (and llama.cpp's server's) do
    offsets = [len(p) if isinstance(p, str) else len(tok.decode(ids)) for p, ids in zip(prompt or [""], prompts)]
    return _plan(engine, req, checked, prompts, req.max_tokens or 16, "prompt", req.logprobs, chat=False,
                 offsets=offsets)


@router.post("/chat/completions", summary="Chat completion (OpenAI's Chat Completions API)")
async def chat_completions(state: StateDep, req: ChatRequest, request: Request) -> Any:
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    for i, m in enumerate(req.messages):
        for j, part in enumerate([m.content] if isinstance(m.content, str) else [p.text for p in m.content or []]):
            _text(part, f"messages[{i}].content" + ("" if isinstance(m.content, str) else f"[{j}].text"))
    return await _serve(request, lambda: _chat(state, req))


def _chat(state: Any, req: ChatRequest) -> _Plan:
    checked = _check(req, 1, "messages")
    engine, model_dir = engine_for(state, req.model)
    prompt, ends = render_chat(model_dir, engine.tokenizer, req.messages)
    room = max(engine.model.config.block_size - len(prompt), 1)  # a full context: 1, which the check refuses
    max_new = req.max_completion_tokens or req.max_tokens or room
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return _plan(engine, req, checked, [prompt], max_new, "messages", logprobs, chat=True, end_ids=ends,
                 max_param="max_tokens" if req.max_completion_tokens is None else "max_completion_tokens")


def _check(req: Sampling, count: int, prompt_param: str) -> tuple[int, int, list[str]]:
    """(n, best_of, stop strings) of a request of `count` prompts, checked before its model is loaded: a request
    that is bad in itself loaded the model, and could close another model's engine, before its 400."""
    n = req.n or 1
    best = getattr(req, "best_of", None) or n  # the Completions API's best_of: samples drawn per prompt
    if best < n:
        raise OpenAIError(400, f"best_of ({best}) must be at least n ({n})", "best_of")
    if best > n and req.stream:
        raise OpenAIError(400, "best_of > n cannot be streamed: the best are known only at the end", "best_of")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          "stream_options")
    if count * best > MAX_SEQUENCES:  # the setting that multiplies the prompts, or the prompts themselves
        name, param = ("best_of", "best_of") if best > n else ("n", "n") if n > 1 else ("", prompt_param)
        raise OpenAIError(400, f"{count} prompts" + (f" x {name}={best}" if name else "")
                          + f" is more than {MAX_SEQUENCES} sequences", param)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not 1 <= len(_text(s, "stop")) <= 200 for s in stops):
        raise OpenAIError(400, "stop takes up to 4 strings of 1 to 200 characters", "stop")
    return n, best, stops


def _plan(engine: BatchEngine, req: Sampling, checked: tuple[int, int, list[str]], prompts: list[list[int]],
          max_new: int, prompt_param: str, logprobs: int | None, *, chat: bool, end_ids: Sequence[int] = (),
          max_param: str = "max_tokens", offsets: list[int] | None = None) -> _Plan:
    n, best, stops = checked
    block = engine.model.config.block_size
    for p in prompts:
        if len(p) + max_new > block:
            raise OpenAIError(400, f"This model's maximum context length is {block} tokens. However, you requested "
                              f"{len(p) + max_new} tokens ({len(p)} in the {prompt_param}, {max_new} for the "
                              "completion). Please reduce the length of the prompt or the completion.",
                              max_param if len(p) < block else prompt_param, "context_length_exceeded")
    top_p = 1.0 if req.top_p is None else req.top_p
    temperature = 1.0 if req.temperature is None else req.temperature

    def settings(i: int) -> GenerationConfig:  # sample i of a prompt: seed + i, as `lmlab generate --num-samples`
        seed = None if req.seed is None else req.seed + i
        return GenerationConfig(max_new_tokens=max_new, do_sample=top_p > 0, temperature=temperature,
                                top_p=top_p or 1.0, stop_strings=stops, seed=seed)

    return _Plan(engine=engine, requests=[(p, settings(i)) for p in prompts for i in range(best)], prompts=prompts,
                 offsets=offsets or [0] * len(prompts), n=n, best=best,
                 # best_of ranks the samples by their tokens' log-probabilities: reported for every token
                 scored=logprobs if logprobs is not None or best == n else 0, shown=logprobs is not None,
                 chat=chat, end_ids=end_ids, stream=bool(req.stream),
                 usage=bool(req.stream_options and req.stream_options.include_usage),
                 meta={"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                       "model": req.model})


def _returned(tokens: list[Token], length: int) -> list[Token]:
    """The tokens whose text is in the returned completion of `length` characters: a token that only held a
    stop string (cut from the text) is not shown in the log-probabilities either."""
    return [t for t in tokens if t.offset < length]


def _response(p: _Plan, events: list[Token | Finish]) -> dict[str, Any]:
    tok = p.engine.tokenizer
    choices: dict[int, dict[str, Any]] = {}
    tokens: dict[int, list[Token]] = {i: [] for i in range(len(p.prompts) * p.best)}
    completion_tokens = 0
    for event in events:
        if isinstance(event, Token):
            tokens[event.index].append(event)
            continue
        completion_tokens += event.tokens
        content = "".join(t.text for t in tokens[event.index]) + event.text
        tokens[event.index] = _returned(tokens[event.index], len(content))
        choice: dict[str, Any] = {"index": event.index}
        if p.chat:
            choice["message"] = {"role": "assistant", "content": content, "refusal": None}
        else:
            choice["text"] = content
        offset = p.offsets[event.index // p.best]
        choice["logprobs"] = _logprobs(tok, tokens[event.index], p.chat, offset) if p.shown else None
        choice["finish_reason"] = event.reason
        choices[event.index] = choice
    ranked = [choices[i] for i in sorted(choices)]
    if p.best > p.n:  # per prompt, the n samples of highest mean log-prob per token (the earliest among equals)
        def mean(i: int) -> float:
            lp = [t.logprob for t in tokens[i] if t.logprob is not None]
            return sum(lp) / len(lp) if lp else float("-inf")
        ranked = []
        for k in range(len(p.prompts)):
            ids = sorted(range(k * p.best, (k + 1) * p.best), key=lambda i: (-mean(i), i))[:p.n]
            ranked += [{**choices[i], "index": k * p.n + j} for j, i in enumerate(ids)]
    return {**p.meta, "object": "chat.completion" if p.chat else "text_completion", "choices": ranked,
            "usage": p.usage_of(completion_tokens)}


async def _chunks(p: _Plan, handle: Any) -> AsyncIterator[str]:
    """OpenAI's stream: a chunk per piece of text of each choice as it is decoded (text that may begin a stop
    string held back), a last chunk per choice with its finish_reason, the usage chunk if asked, [DONE]."""
    kind = "chat.completion.chunk" if p.chat else "text_completion"
    started: set[int] = set()
    pending: dict[int, list[Token]] = {}
    sent: dict[int, int] = {}  # characters of each choice sent so far
    completion_tokens = 0

    def chunk(index: int, piece: str | None, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": index}
        if p.chat:
            choice["delta"] = {} if piece is None else {"content": piece}
        else:
            choice["text"] = piece or ""
        tokens = pending.pop(index, [])
        sent[index] = sent.get(index, 0) + len(piece or "")
        offset = p.offsets[index // p.best]
        choice["logprobs"] = _logprobs(p.engine.tokenizer, tokens, p.chat, offset) if p.shown and tokens else None
        choice["finish_reason"] = finish
        body = {**p.meta, "object": kind, "choices": [choice]}
        if p.usage:
            body["usage"] = None
        # allow_nan=False: a NaN would reach the client as invalid JSON; raised, it ends the stream with an error
        return f"data: {json.dumps(body, ensure_ascii=False, allow_nan=False)}\n\n"

    try:
        async for event in handle:
            i = event.index
            if i not in started:
                started.add(i)
                if p.chat:  # the first chunk of a choice names the role
                    body = {**p.meta, "object": kind, "choices": [{"index": i, "delta": {"role": "assistant",
                            "content": ""}, "logprobs": None, "finish_reason": None}]}
                    yield f"data: {json.dumps({**body, **({'usage': None} if p.usage else {})})}\n\n"
            if isinstance(event, Token):
                pending.setdefault(i, []).append(event)
                if event.text:
                    yield chunk(i, event.text, None)
                continue
            completion_tokens += event.tokens
            pending[i] = _returned(pending.get(i, []), sent.get(i, 0) + len(event.text))
            if event.text or pending[i]:
                yield chunk(i, event.text, None)
            yield chunk(i, None, event.reason)
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in-band
        yield f"data: {json.dumps(openai_error(500, str(exc)))}\n\n"
        return
    finally:
        handle.cancel()  # a client that went away leaves the batch at the next step (and event_stream's on_close)
    if p.usage:
        body = {**p.meta, "object": kind, "choices": [], "usage": p.usage_of(completion_tokens)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


# ---- log-probabilities ------------------------------------------------------------------------------

def _token_text(tokenizer: Any, token_id: int, after: list[int]) -> str:
    """A token's text as the completion has it after the id `after` (a word-level token's leading space)."""
    return tokenizer.decode_continuation(after, [token_id], skip_special_tokens=False)


def _token_bytes(tokenizer: Any, token_id: int, after: list[int]) -> tuple[str, list[int]]:
    """A token as OpenAI shows it: its text (what it adds after the id before it) and its UTF-8 bytes, which for a
    byte-level BPE token may be part of a character."""
    text = _token_text(tokenizer, token_id, after)
    raw = tokenizer.token_bytes(token_id) if hasattr(tokenizer, "token_bytes") else None  # (lmlab's Tokenizer's)
    return text, list(raw if raw is not None else text.encode("utf-8", "replace"))


def _logprobs(tokenizer: Any, tokens: list[Token], chat: bool, offset: int = 0) -> dict[str, Any]:
    if chat:
        def entry(token_id: int, logprob: float, after: list[int]) -> dict[str, Any]:
            text, raw = _token_bytes(tokenizer, token_id, after)
            return {"token": text, "logprob": logprob, "bytes": raw}
        return {"content": [{**entry(t.id, t.logprob, t.after),
                             "top_logprobs": [entry(i, lp, t.after) for i, lp in t.top]} for t in tokens],
                "refusal": None}
    def top(pairs: list[tuple[int, float]], after: list[int]) -> dict[str, float]:  # highest first: a text shown
        out: dict[str, float] = {}                                                   # twice keeps its best
        for i, lp in pairs:
            out.setdefault(_completion_token(tokenizer, i, after), lp)
        return out
    return {"tokens": [_completion_token(tokenizer, t.id, t.after) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [top(t.top, t.after) for t in tokens],
            "text_offset": [offset + t.offset for t in tokens]}  # from the prompt's start, in every chunk


def _completion_token(tokenizer: Any, token_id: int, after: list[int]) -> str:
    """A token as the Completions API names it: its text, or, for a token whose bytes are part of a UTF-8
    character (alone it decodes to U+FFFD), those bytes as OpenAI writes them (`bytes:` and `\\xNN` each), so
    that such tokens stay apart in top_logprobs."""
    text, raw = _token_bytes(tokenizer, token_id, after)
    try:
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text
