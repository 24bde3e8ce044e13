"""The OpenAI-compatible API of a real `lmlab serve` (with an API token), driven by the official `openai`
client: the text equals `lmlab generate` and the Python API with the same seed and settings, streaming and
not; usage counts, stop strings, n > 1 and logprobs against the model's own numbers; 20 concurrent requests
each get their text alone and were decoded in shared steps; bad requests get OpenAI-shaped 4xx errors."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from test_server_support import BOOK, CHILD_ENV, ServerProcess

from lmlab.models import GenerationConfig, ModelConfig, Transformer, generate, generate_ids
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.tune import chat

openai = pytest.importorskip("openai")

TOKEN = "openai-test-token"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`lmlab serve --api-token` over a workspace with one model: gpt2-tiny with a byte-level BPE tokenizer,
    weights scaled up from the init so its logits are far from uniform (no near-ties between batched and
    lone arithmetic), and the same model loaded here as the reference."""
    ws = tmp_path_factory.mktemp("ws")
    tok = Tokenizer.train([BOOK], kind="bpe", vocab_size=400)

    def scaled(seed, block_size):
        torch.manual_seed(seed)
        m = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=400, block_size=block_size)).eval()
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.mul_(4)
        return m

    model = scaled(0, 128)
    save_pretrained(ws / "models" / "tiny", model, tok)
    # a longer context: a wave of decoding that lasts (test_waiting_requests_hold_no_thread...)
    save_pretrained(ws / "models" / "long", scaled(1, 512), tok)
    # the same weights with lmlab's chat format (as `lmlab tune sft` leaves a model), and a copy that always says
    # <|end|>: its final norm outputs a constant vector (weight 0, bias 1) and only <|end|>'s head row meets it
    chatty, chat_tok, _ = chat.add_chat_tokens(model, tok)
    save_pretrained(ws / "models" / "chatty", chatty, chat_tok)
    chat.write_template(ws / "models" / "chatty")
    with torch.no_grad():
        chatty.norm_f.weight.zero_()
        chatty.norm_f.bias.fill_(1.0)
        chatty.lm_head.weight.zero_()
        chatty.lm_head.weight[chat.chat_token_ids(chat_tok)["end"]] = 1.0
    save_pretrained(ws / "models" / "ender", chatty, chat_tok)
    chat.write_template(ws / "models" / "ender")
    save_pretrained(ws / "models" / "foreign", model, tok)  # a chat template that is not lmlab's
    (ws / "models" / "foreign" / chat.TEMPLATE_FILE).write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    save_pretrained(ws / "models" / "nochat", model, tok)  # lmlab's template, but none of the tokens it names
    chat.write_template(ws / "models" / "nochat")
    save_pretrained(ws / "models" / "notok", model)  # weights but no tokenizer: it cannot be served
    save_pretrained(ws / "models" / "cold", model, tok)  # a model only test_a_bad_request_loads_no_model asks for
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("nan")
    save_pretrained(ws / "models" / "nanm", model, tok)  # NaN in one head row: NaN logits
    server = ServerProcess(ws, token=TOKEN).start()
    try:
        server.model, server.tok = load_pretrained(ws / "models" / "tiny")
        server.openai = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
        yield server
    finally:
        server.stop()


def alone(served, prompt: str, **settings) -> str:
    return generate(served.model, served.tok, prompt, GenerationConfig(**settings))


def new_ids(served, prompt: str, **settings) -> list[int]:
    """The tokens generation samples alone (EOS included when it ends there): usage's completion_tokens."""
    cfg = GenerationConfig(**settings)
    ids = generate_ids(served.model, [served.tok.encode(prompt)], cfg)[0]
    return ids + [served.tok.eos_id] * (len(ids) < cfg.max_new_tokens)


def test_models_lists_the_trained_model(served):
    assert sorted(m.id for m in served.openai.models.list().data) == ["chatty", "cold", "ender", "foreign", "long",
                                                                       "nanm", "nochat", "tiny"]
    assert served.openai.models.retrieve("tiny").owned_by == "lmlab"


def test_a_model_that_cannot_be_served_is_neither_listed_nor_found(served):
    """A model folder without tokenizer.json was listed and GET /v1/models/NAME answered it (they looked for the
    weights only), then every completion was a 404: now the three agree, and say why."""
    with pytest.raises(openai.NotFoundError) as e:
        served.openai.models.retrieve("notok")
    assert (e.value.body["message"], e.value.body["code"]) == ("model 'notok' has no tokenizer.json", "model_not_found")
    with pytest.raises(openai.NotFoundError) as e:
        served.openai.completions.create(model="notok", prompt="x", max_tokens=2)
    assert e.value.body["message"] == "model 'notok' has no tokenizer.json"


def test_completions_equal_lmlab_generate_with_the_same_seed_streaming_and_not(served):
    settings = {"max_tokens": 40, "temperature": 0.8, "top_p": 0.9, "seed": 5}
    out = subprocess.run([sys.executable, "-m", "lmlab.cli", "generate", str(served.workspace / "models" / "tiny"),
                          "--prompt", PROMPT, "--max-new-tokens", "40", "--temperature", "0.8", "--top-p", "0.9",
                          "--seed", "5", "--no-stream"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **CHILD_ENV})
    assert out.returncode == 0, out.stderr
    cli = out.stdout.removeprefix(PROMPT).removesuffix("\n")
    assert cli == alone(served, PROMPT, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=5)

    r = served.openai.completions.create(model="tiny", prompt=PROMPT, **settings)
    assert r.object == "text_completion" and r.choices[0].text == cli
    ids = new_ids(served, PROMPT, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=5)
    assert r.choices[0].finish_reason == ("length" if len(ids) == 40 and ids[-1] != 3 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(served.tok.encode(PROMPT)), len(ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(served.openai.completions.create(model="tiny", prompt=PROMPT, stream=True,
                                                   stream_options={"include_usage": True}, **settings))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cli
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_chat_without_a_template_continues_the_messages_text(served):
    """The fallback of a model without a chat template: the contents joined by newlines, completed."""
    messages = [{"role": "system", "content": "Once"}, {"role": "user", "content": "upon a time"}]
    settings = {"max_new_tokens": 30, "temperature": 0.7, "seed": 9}
    want = alone(served, "Once\nupon a time", **settings)
    r = served.openai.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0.7, seed=9)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(served.tok.encode("Once\nupon a time"))
    assert r.usage.completion_tokens == len(new_ids(served, "Once\nupon a time", **settings))
    stream = served.openai.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0.7,
                                                   seed=9, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_n_samples_take_seed_plus_i_and_stop_strings_cut_the_text(served):
    r = served.openai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                              max_completion_tokens=24, seed=40, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    want = [alone(served, PROMPT, max_new_tokens=24, seed=40 + i) for i in range(3)]
    assert [c.message.content for c in r.choices] == want and len(set(want)) == 3
    assert r.usage.completion_tokens == sum(len(new_ids(served, PROMPT, max_new_tokens=24, seed=40 + i))
                                            for i in range(3))

    # a stop string that is one whole token: its log-probability is not shown either (it was, with no text)
    ids = generate_ids(served.model, [served.tok.encode(PROMPT)], do_sample=False, max_new_tokens=30,
                       stop_at_eos=False)[0]
    texts = [served.tok.decode(ids[:k]) for k in range(31)]
    k = next(k for k in range(5, 30) if texts[k + 1].startswith(texts[k]) and len(texts[k + 1]) > len(texts[k])
             and texts[k + 1][len(texts[k]):] not in texts[k])
    for stream in (False, True):
        r = served.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, logprobs=0,
                                             stop=texts[k + 1][len(texts[k]):], stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(c.choices[0].text for c in chunks) == texts[k]
        assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices[0].logprobs) == k

    free = alone(served, PROMPT, max_new_tokens=30, do_sample=False)
    stop = free[12:15]
    assert len(stop) == 3 and stop not in free[:14]
    for stream in (False, True):
        r = served.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                             stop=[stop, "\x00never"], stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(c.choices[0].text for c in chunks) == free[:12]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(served):
    r = served.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    c = served.openai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    prompt = served.tok.encode(PROMPT)
    ids = generate_ids(served.model, [prompt], do_sample=False, max_new_tokens=10, stop_at_eos=False)[0]
    with torch.no_grad():
        logp = served.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    chosen = logp[torch.arange(10), ids]
    lp = r.choices[0].logprobs
    assert lp.tokens == [completion_name(served.tok, i) for i in ids]
    assert any(t.startswith("bytes:") for t in lp.tokens)  # a token here is part of a character
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), chosen, atol=1e-4, rtol=1e-4)
    top = logp.topk(3)
    for row, values, indices in zip(lp.top_logprobs, top.values.tolist(), top.indices.tolist()):
        want = {completion_name(served.tok, i): v for i, v in zip(indices, values)}
        assert row == pytest.approx(want, abs=1e-4)  # keyed by text (or bytes), as OpenAI's are
    # each token's offset in the text of prompt + completion, as OpenAI's and llama-cpp-python's count it (they
    # counted from the completion's start), the same in a stream's chunks (they once counted from each chunk)
    stream, starts, decoded = served.tok.stream_decoder(), [], len(PROMPT)
    for i in ids:
        starts.append(decoded)
        decoded += len(stream.push(i))
    assert lp.text_offset == starts
    chunks = served.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3,
                                              stream=True)
    assert [o for ch in chunks if ch.choices and ch.choices[0].logprobs
            for o in ch.choices[0].logprobs.text_offset] == starts
    content = c.choices[0].logprobs.content
    assert [e.token for e in content] == [served.tok.decode([i], skip_special_tokens=False) for i in ids]
    raw = b"".join(bytes(e.bytes) for e in content)  # the bytes of the text, also where a token splits a char
    assert raw.decode("utf-8", "replace") == served.tok.decode(ids) and raw != served.tok.decode(ids).encode()
    torch.testing.assert_close(torch.tensor([e.logprob for e in content]), chosen, atol=1e-4, rtol=1e-4)
    top = logp.topk(2)
    assert [[t.token for t in e.top_logprobs] for e in content] == [
        [served.tok.decode([i], skip_special_tokens=False) for i in row] for row in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([[t.logprob for t in e.top_logprobs] for e in content]), top.values,
                               atol=1e-4, rtol=1e-4)


def completion_name(tok, token_id: int) -> str:
    """The Completions API's name of a token: its text, or `bytes:\\xNN...` when its bytes are part of a UTF-8
    character (they are found here with transformers' GPT-2 byte alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    raw = bytes({c: b for b, c in bytes_to_unicode().items()}[ch] for ch in tok.id_to_token(token_id))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_top_logprobs_keep_tokens_that_are_parts_of_one_character_apart(served):
    """Tokens that each hold part of a UTF-8 character all decode to U+FFFD alone: keyed by that text they
    collided, and a row lost entries (the chosen token's own among them)."""
    r = served.openai.completions.create(model="tiny", prompt="Жил-был", max_tokens=10, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    for token, logprob, row in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(row) == 5 and row[token] == pytest.approx(logprob) == pytest.approx(max(row.values())), row
    assert any(len([k for k in row if k.startswith("bytes:")]) > 1 for row in lp.top_logprobs)


def test_a_tiny_temperature_samples_the_top_token_and_fails_no_one(served):
    """temperature 1e-40 is in [0, 2]: the logits divided by it overflowed, sampling met NaN and failed every
    request of the batch with a plain 500. It now samples as greedy does (the top token has all the mass)."""
    tiny = served.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1e-40, seed=3)
    assert tiny.choices[0].text == alone(served, PROMPT, max_new_tokens=12, do_sample=False)


def test_twenty_concurrent_requests_each_get_their_text_alone_decoded_together(served):
    prompts = [PROMPT[:3 + i] + " " * (i % 3) + "x" * (i % 5) for i in range(20)]
    lengths = [16 + 3 * i for i in range(20)]

    def ask(i):
        return served.openai.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                                temperature=0).choices[0].text

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(ask, range(20)))
    assert got == [alone(served, p, max_new_tokens=n, do_sample=False) for p, n in zip(prompts, lengths)]
    with served.client() as c:
        stats = {e["model"]: e for e in c.get("/v1/batching").json()["data"]}
    assert stats["tiny"]["max_rows"] > 1


def _steps(served) -> int:
    """Decoding steps the tiny model's engine has taken, once it has stopped taking them."""
    def now():
        with served.client() as c:
            return {e["model"]: e["steps"] for e in c.get("/v1/batching").json()["data"]}.get("tiny", 0)
    last = now()
    while True:
        time.sleep(0.5)
        if (step := now()) == last:
            return step
        last = step


def test_a_request_whose_client_has_gone_leaves_the_batch(served):
    """Neither a stream whose client closed the connection before its first chunk nor a request whose client
    timed out was decoded to its end (the stream's cancel ran only once its generator had started; nothing
    watched a waiting non-streaming request): a client that retries on timeouts (the openai client tries 3
    times) cost the server 3 full decodes."""
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 100, "n": 128, "seed": 1}
    start, t = _steps(served), time.time()
    with served.client() as c:
        assert c.post("/v1/completions", json=body).status_code == 200
    took, full = time.time() - t, _steps(served) - start
    assert full >= 300  # 128 sequences in waves of 32 rows, up to 100 steps each

    data = json.dumps({**body, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    start = _steps(served)
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(head + data)
    assert _steps(served) - start < full / 4

    start = _steps(served)
    quick = openai.OpenAI(base_url=served.url + "/v1", api_key=TOKEN, max_retries=0, timeout=took / 5)
    with pytest.raises(openai.APITimeoutError):
        quick.completions.create(**body)
    assert _steps(served) - start < full / 2


def test_waiting_requests_hold_no_thread_the_other_endpoints_need(served):
    """Each waiting non-streaming request held one of the server's worker threads (anyio's 40) until its
    decode ended, so with 40 waiting, /v1/models and the rest of the API answered only once one had ended."""
    # one request of 32 greedy sequences fills the engine's 32 rows for 480 steps (a wave of several seconds: the
    # window in which 45 short requests are sent and must all be waiting, with no thread each, behind it)
    long = {"model": "long", "prompt": "Once", "max_tokens": 480, "n": 32, "temperature": 0}
    short = {"model": "long", "prompt": "Once", "max_tokens": 4, "seed": 3}
    done, usage = [], []

    def ask(body):
        with served.client() as c:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200
        if body is long:
            usage.append(r.json()["usage"]["completion_tokens"])
        done.append(body is short)

    with ThreadPoolExecutor(46) as pool:
        futures = [pool.submit(ask, long)]
        with served.client() as c:
            def until(queued):  # sequences in the engine, or a request done (a failure), or a minute
                deadline = time.time() + 60
                while not done and time.time() < deadline and sum(
                        e["active"] + e["waiting"] for e in c.get("/v1/batching").json()["data"]) < queued:
                    time.sleep(0.02)
            until(32)
            futures += [pool.submit(ask, short) for _ in range(45)]
            until(32 + 40)  # (with the old threads, 39 short ones could be waiting, no more)
            assert c.get("/v1/models").status_code == 200
            assert not done  # answered while the long wave still decodes, every short one waiting behind it
        for f in futures:
            f.result()
    assert usage == [32 * 480]  # no sequence ended early: the wave lasted its 480 steps


def test_best_of_returns_the_samples_of_highest_mean_logprob_per_token(served):
    many = served.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=4, seed=7, logprobs=0)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in many.choices]
    order = sorted(range(4), key=lambda i: (-means[i], i))
    assert order[:2] != [0, 1]  # the best are not simply the first samples: the ranking is seen
    best = served.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=2, best_of=4, seed=7)
    assert [c.text for c in best.choices] == [many.choices[i].text for i in order[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None  # not asked for
    assert best.usage.completion_tokens == many.usage.completion_tokens  # every sample's tokens count


def test_bad_requests_get_openai_shaped_errors_naming_the_parameter(served):
    with served.client() as c:
        cases = [({"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
                 ({"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature", "less_than_equal"),
                 ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n", "greater_than_equal"),
                 ({"model": "tiny", "prompt": "x", "best_of": 1, "n": 2}, 400, "best_of", None),
                 ({"model": "tiny", "prompt": "x", "best_of": 2, "stream": True}, 400, "best_of", None),
                 ({"model": "tiny", "prompt": "x", "max_tokens": 200}, 400, "max_tokens", "context_length_exceeded"),
                 ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
                 ({"model": "tiny", "prompt": [5, 400]}, 400, "prompt", None),
                 ({"model": "tiny", "prompt": "x", "tools": []}, 400, "tools", "extra_forbidden"),
                 ({"model": "tiny", "messages": []}, 400, "messages", "too_short"),
                 ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
                  "top_logprobs", None),
                 ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
                  "literal_error"),
                 ({"model": "tiny", "prompt": ["x"] * 200}, 400, "prompt", None),
                 ({"model": "tiny", "prompt": ["x"] * 100, "n": 2}, 400, "n", None),
                 ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 500}, 400,
                  "max_completion_tokens", "context_length_exceeded"),
                 # wrong JSON types are refused, as OpenAI does, not coerced ("yes" streamed, true was 1 token)
                 ({"model": "tiny", "prompt": "x", "max_tokens": "3"}, 400, "max_tokens", "int_type"),
                 ({"model": "tiny", "prompt": "x", "max_tokens": True}, 400, "max_tokens", "int_type"),
                 ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream", "bool_type"),
                 ({"model": "tiny", "prompt": "x", "seed": "7"}, 400, "seed", "int_type"),
                 ({"model": "tiny", "prompt": "x", "temperature": "0.5"}, 400, "temperature", "float_type"),
                 ({"model": "tiny", "prompt": [True, False]}, 400, "prompt", "string_type"),
                 ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
                  None),
                 ({"model": "foreign", "messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
                 # lmlab's template without its tokens: a plain-text 500 with a traceback (the tokens' ValueError)
                 ({"model": "nochat", "messages": [{"role": "user", "content": "x"}]}, 400, "model", None)]
        # NaN (Python's JSON reads it): not a finite number, not "less than or equal to 2"
        with served.client() as c2:
            r = c2.post("/v1/completions", content='{"model": "tiny", "prompt": "x", "temperature": NaN}',
                        headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]["param"], r.json()["error"]["code"]) == (400, "temperature",
                                                                                        "finite_number")
        # a lone surrogate: JSON may hold one, UTF-8 may not (pydantic let it through these union fields: 500)
        raw = [('{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
               ('{"model": "tiny", "prompt": ["a", "\\ud800"]}', "prompt"),
               ('{"model": "tiny", "prompt": "a", "stop": ["\\ud800"]}', "stop"),
               ('{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}', "messages[0].content"),
               ('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
                "messages[0].content[0].text"),
               ('{"model": "tiny", "prompt": ', None)]  # not JSON at all: no parameter (it named "[27]")
        for body, status, param, code in [*cases, *((text, 400, param, None) for text, param in raw)]:
            chat = "messages" in body
            path = "/v1/chat/completions" if chat else "/v1/completions"
            r = c.post(path, json=body) if isinstance(body, dict) else \
                c.post(path, content=body.encode(), headers={"content-type": "application/json"})
            error = r.json()["error"]
            if isinstance(body, str) and param is None:
                code = "json_invalid"
            assert (r.status_code, error["param"], error["code"]) == (status, param, code), (body, r.text)
            assert error["type"] == "invalid_request_error" and error["message"]
        # a chat prompt that fills the context, no max_tokens: the message counts 1 token for the completion (it
        # said "-16 for the completion")
        long = [{"role": "user", "content": "x " * 200}]
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": long})
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert "1 for the completion" in r.json()["error"]["message"]
        # an integer where a float is asked is a number all the same
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 0,
                                               "max_tokens": 2}).status_code == 200
        # an unknown path or method under /v1: OpenAI's shape as well
        for r, status in ((c.get("/v1/nope"), 404), (c.get("/v1/completions"), 405)):
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}

    anonymous = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        anonymous.models.list()
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    # `curl -d '{...}'` with the token: curl labels the body form data, which FastAPI did not read (a 400)
    r = httpx.post(served.url + "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}",
                                                             "Content-Type": "application/x-www-form-urlencoded"},
                   content=json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone(served, PROMPT, max_new_tokens=3,
                                                                            do_sample=False), r.text
    r = httpx.post(served.url + "/v1", json={})  # /v1 itself was given the web app's shape
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    elsewhere = openai.OpenAI(base_url=served.url + "/v1", api_key=TOKEN, max_retries=0,
                              default_headers={"Origin": "https://evil.example"})
    with pytest.raises(openai.PermissionDeniedError) as e:
        elsewhere.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert e.value.status_code == 403 and "another site" in e.value.body["message"]


def test_a_chat_model_is_prompted_with_its_template_and_its_reply_ends_at_end_of_turn(served):
    """A model with lmlab's chat template: the prompt is tune.chat's rendering (as `lmlab chat` sends it), the
    reply equals the terminal chat's greedy reply, and <|end|> ends it (finish_reason stop) as EOS would."""
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    model, tok = chat.load_chat_model(served.workspace / "models" / "chatty")
    r = served.openai.chat.completions.create(model="chatty", messages=messages, max_tokens=20, temperature=0)
    assert r.usage.prompt_tokens == len(chat.render(turns, tok, add_generation_prompt=True)[0])
    assert r.choices[0].message.content == chat.generate_reply(model, tok, turns, do_sample=False, max_new_tokens=20)
    r = served.openai.chat.completions.create(model="ender", messages=messages, max_tokens=20, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)


def test_a_conversation_goes_on_with_the_servers_own_reply_and_null_for_what_is_not_implemented(served):
    """The usual client loop: the reply's message (with its "refusal": null) appended to the history and sent back;
    parameters the caller passed as None (the client sends null: tools=None, response_format=None) and an empty
    logit_bias are the defaults. A 400 refused both (the message's refusal, and every such parameter); a value
    for them is still refused, naming it."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    first = served.openai.chat.completions.create(model="chatty", messages=messages, max_tokens=8, temperature=0)
    messages += [first.choices[0].message, {"role": "user", "content": "and then?"}]
    model, tok = chat.load_chat_model(served.workspace / "models" / "chatty")
    turns = [*messages[:2], {"role": "assistant", "content": first.choices[0].message.content}, messages[3]]
    again = served.openai.chat.completions.create(model="chatty", messages=messages, max_tokens=8, temperature=0,
                                                  tools=None, tool_choice=None, response_format=None, logit_bias={})
    assert again.choices[0].message.content == chat.generate_reply(model, tok, turns, do_sample=False,
                                                                   max_new_tokens=8)
    # the message as a dict (model_dump() has "annotations": null), the default response format, and a stream
    # option of today's client: a 400 refused each of them
    messages[2] = first.choices[0].message.model_dump()
    assert "annotations" in messages[2]
    streamed = served.openai.chat.completions.create(
        model="chatty", messages=messages, max_tokens=8, temperature=0, response_format={"type": "text"},
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == again.choices[0].message.content
    with served.client() as c:
        for extra, param in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                             ({"logit_bias": {"5": 10}}, "logit_bias"),
                             ({"response_format": {"type": "json_object"}}, "response_format"),
                             ({"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]},
                              "messages[0].refusal")):
            r = c.post("/v1/chat/completions", json={"model": "chatty", "messages": messages[:2], **extra})
            err = r.json()["error"]
            assert (r.status_code, err["param"]) == (400, param)
            assert err["message"] == f"Invalid value for '{param}': Value error, not supported by this server: leave " \
                                     "it out or send null"


def test_a_request_whose_engine_closed_before_it_submitted_gets_the_new_one():
    """engine_for closes the oldest engine when a fifth model's starts (and a reloaded model's): a request that
    got that engine just before submitted to a closed engine and answered 500. It now asks once more; a second
    closed engine is a 503 in OpenAI's shape."""
    from lmlab.models.batching import BatchEngine, EngineClosed
    from lmlab.server.routers.openai import OpenAIError, _Plan, _serve

    model = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=400, block_size=32)).eval()
    tok = Tokenizer.train([BOOK], kind="bpe", vocab_size=400)
    engines = [BatchEngine(model, tok, start=False) for _ in range(3)]
    engines[0].close()
    calls = []

    def plan():  # what _completions builds, on the engine engine_for would give at this call (streamed: no wait)
        engine = engines[len(calls)]
        calls.append(engine)
        return _Plan(engine=engine, requests=[([5, 6], GenerationConfig(max_new_tokens=2, do_sample=False))],
                     prompts=[[5, 6]], offsets=[0], n=1, best=1, scored=None, shown=False, chat=False, end_ids=(),
                     stream=True, usage=False, meta={})

    assert asyncio.run(_serve(None, plan)) is not None and calls == engines[:2]
    assert len(engines[1].waiting) == 1 and not engines[0].waiting
    calls.clear()
    engines[1] = engines[0]  # closed again
    with pytest.raises(OpenAIError) as e:
        asyncio.run(_serve(None, plan))
    assert e.value.status == 503 and len(calls) == 2
    with pytest.raises(EngineClosed):
        engines[0].submit([([5], GenerationConfig(max_new_tokens=1))])


def test_a_whole_answer_is_built_off_the_event_loop(monkeypatch):
    """A non-streamed answer (n x tokens x top_logprobs entries: tens of MB for n 128) is built and encoded in a
    worker thread: on the event loop it held every other request and stream for seconds."""
    import threading

    from lmlab.models.batching import BatchEngine
    from lmlab.server.routers import openai as api

    model = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=400, block_size=32)).eval()
    tok = Tokenizer.train([BOOK], kind="bpe", vocab_size=400)
    engine, threads, built = BatchEngine(model, tok), [], api._response

    def spy(p, events):
        threads.append(threading.get_ident())
        return built(p, events)
    monkeypatch.setattr(api, "_response", spy)
    cfg = GenerationConfig(max_new_tokens=3, do_sample=False)

    def plan():
        return api._Plan(engine=engine, requests=[([5, 6], cfg)], prompts=[[5, 6]], offsets=[0], n=1, best=1,
                         scored=None, shown=False, chat=False, end_ids=(), stream=False, usage=False, meta={})

    class Connected:  # a client that stays
        async def receive(self):
            await asyncio.sleep(3600)

    async def serve():
        return threading.get_ident(), await api._serve(Connected(), plan)
    try:
        loop_thread, response = asyncio.run(serve())
    finally:
        engine.close()
    assert threads and threads[0] != loop_thread
    body = json.loads(response.body)
    assert body["choices"][0]["text"] == tok.decode(generate_ids(model, [[5, 6]], cfg)[0])


def test_a_failed_sequence_cancels_the_rest_of_its_request():
    """One of a request's sequences fails in the engine: the request is a 500 in OpenAI's shape, and its other
    sequences leave the batch (they decoded on for nobody)."""
    from lmlab.server.routers import openai as api

    class Failing:  # the engine's handle: one event, then the failure
        cancelled = False

        def __aiter__(self):
            return self._events()

        async def _events(self):
            yield api.Token(0, 5, "x", 0)
            raise RuntimeError("sequence 1 failed")

        def cancel(self):
            Failing.cancelled = True

    class Engine:
        def submit(self, *args, **kwargs):
            return Failing()

    def plan():
        return api._Plan(engine=Engine(), requests=[], prompts=[[5]], offsets=[0], n=2, best=2, scored=None,
                         shown=False, chat=False, end_ids=(), stream=False, usage=False, meta={})

    class Connected:
        async def receive(self):
            await asyncio.sleep(3600)

    with pytest.raises(api.OpenAIError) as e:
        asyncio.run(api._serve(Connected(), plan))
    assert (e.value.status, e.value.message) == (500, "generation failed: sequence 1 failed") and Failing.cancelled


def test_a_chat_template_without_its_tokens_is_a_400_saying_so(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.openai.chat.completions.create(model="nochat", messages=[{"role": "user", "content": PROMPT}])
    assert e.value.body["message"] == "model 'nochat' has lmlab's chat template but the tokenizer has no chat tokens " \
        "(<|system|>, <|user|>, <|assistant|>, <|end|>); fine-tune the model on conversations first (lmlab tune sft)"
    r = served.openai.completions.create(model="nochat", prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].text == alone(served, PROMPT, max_new_tokens=5, do_sample=False)  # it completes text


def test_non_finite_logits_are_an_openai_shaped_error_and_never_nan_in_json(served):
    """A model whose logits hold NaN: with logprobs the answer failed in the JSON encoder (a plain-text 500), a stream
    sent `"token_logprobs": [NaN]` (not JSON: the browser's JSON.parse fails), and greedy answered the NaN's token.
    Now each is an OpenAI-shaped error that says why, in-band for a stream."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))

    message = "the model's logits are not finite (NaN or infinity): its weights or activations are broken"
    with served.client() as c:
        for body in ({"logprobs": 2, "temperature": 0}, {"temperature": 0}, {"seed": 1}):
            r = c.post("/v1/completions", json={"model": "nanm", "prompt": PROMPT, "max_tokens": 4, **body})
            assert (r.status_code, strict(r.text)["error"]["message"]) == (500, f"generation failed: {message}"), r.text
        for chat in (False, True):
            path, ask = ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "logprobs": True,
                                                  "top_logprobs": 2}) if chat else ("/v1/completions",
                                                                                    {"prompt": PROMPT, "logprobs": 2})
            r = c.post(path, json={"model": "nanm", "max_tokens": 4, "temperature": 0, "stream": True, **ask})
            events = [strict(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            assert events[-1] == {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
            assert "data: [DONE]" not in r.text


def test_a_bad_request_loads_no_model(served):
    """The model was loaded and its engine started (closing the oldest of four) before the request's own settings
    were checked: every bad request cost a load and could evict another model's engine."""
    def engines():
        with served.client() as c:
            return {e["model"] for e in c.get("/v1/batching").json()["data"]}

    assert "cold" not in engines()
    with served.client() as c:
        for body, param in (({"prompt": "x", "n": 2, "best_of": 1}, "best_of"),
                            ({"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
                            ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
                            ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
                            ({"prompt": ["x"] * 100, "n": 2}, "n"),
                            ({"messages": [{"role": "user", "content": "x"}], "stop": ""}, "stop"),
                            ({"messages": [{"role": "user", "content": "x"}], "n": 200}, "n")):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = c.post(path, json={"model": "cold", **body})
            assert (r.status_code, r.json()["error"]["param"]) == (400, param), (body, r.text)
        assert "cold" not in engines()
        assert c.post("/v1/completions", json={"model": "cold", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert "cold" in engines()


def test_a_stream_never_sends_a_number_json_cannot_hold():
    """A NaN log-probability went out as `NaN` inside a chunk (json.dumps writes it; JSON.parse refuses it). Whatever
    reaches a chunk, the stream is JSON: such a value ends it with an error event in OpenAI's shape."""
    from lmlab.server.routers import openai as api

    class Handle:
        async def __aiter__(self):
            yield api.Token(0, 5, "x", 0, logprob=float("nan"))
            yield api.Finish(0, "length", 1, [5])

        def cancel(self):
            pass

    class Tok:
        def decode_continuation(self, after, ids, skip_special_tokens=False):
            return "x"

    class Engine:
        tokenizer = Tok()

    p = api._Plan(engine=Engine(), requests=[], prompts=[[4]], offsets=[0], n=1, best=1, scored=0, shown=True,
                  chat=False, end_ids=(), stream=True, usage=False, meta={})

    async def collect():
        return [chunk async for chunk in api._chunks(p, Handle())]
    chunks = asyncio.run(collect())
    events = [json.loads(c.removeprefix("data: "), parse_constant=lambda c: pytest.fail(c)) for c in chunks]
    assert events == [{"error": {"message": "Out of range float values are not JSON compliant", "type": "server_error",
                                 "param": None, "code": None}}]
