"""The server's errors that the web app says in Russian (app.py's Problem): the answer keeps FastAPI's `detail`
(the English sentence clients read) and adds error.key and its params; every key raised anywhere in the server
has its English and Russian strings in i18n.js (problem.KEY), with the same placeholders as the params it sends."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from test_server_support import BOOK, TINY_MODEL, client, settings, upload

import lmlab.server
from lmlab.data.documents import SUFFIXES
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.models.quant import quantize_dir
from lmlab.server.jobs import Supervisor
from lmlab.server.services import human_bytes, selfplay_memory
from lmlab.tokenizers import Tokenizer

SERVER = Path(lmlab.server.__file__).parent


def strings() -> dict[str, tuple[str, str]]:
    text = (SERVER / "static" / "i18n.js").read_text(encoding="utf-8")
    return {k: (en, ru) for k, en, ru in re.findall(r'"(problem\.\w+)": \["([^"]*)", "([^"]*)"\]', text)}


def test_every_named_error_has_both_languages_with_its_params():
    from lmlab.server.app import PROBLEMS
    known = strings()
    assert set(known) == {f"problem.{key}" for key in PROBLEMS}
    for key, params in PROBLEMS.items():
        for text in known[f"problem.{key}"]:
            assert set(re.findall(r"\{(\w+)\}", text)) <= set(params), (key, text, params)
    assert all("{name}" in known[f"problem.{k}"][1] for k, p in PROBLEMS.items() if "name" in p)  # Russian names it


@pytest.fixture()
def api(tmp_path, monkeypatch):
    monkeypatch.setattr(Supervisor, "tick", lambda self: None)  # queued runs stay queued
    with client(settings(tmp_path, max_upload_bytes=100_000, memory_budget_bytes=2**30)) as c:
        yield c


def test_the_answer_names_the_error_beside_its_sentence(api):
    assert upload(api).status_code == 201
    assert api.post("/api/v1/models", json={"name": "m", **TINY_MODEL}).status_code == 201
    run = api.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 5}).json()
    big = ModelConfig.preset("gpt2-tiny", vocab_size=300, block_size=32, n_layer=24, n_embd=2048).memory_estimate(
        1, 32, training=True)["total"]
    cases = [
        (api.get("/api/v1/models/nope"), 404, "model_not_found", {"name": "nope"}, "model 'nope' not found"),
        (api.post("/api/v1/models", json={"name": "m", **TINY_MODEL}), 409, "model_name_taken", {"name": "m"},
         "a model named 'm' already exists"),
        (api.get("/api/v1/runs/999"), 404, "run_not_found", {"id": 999}, "run 999 not found"),
        (api.delete(f"/api/v1/runs/{run['id']}"), 409, "run_active", {"id": run["id"]},
         f"run {run['id']} is queued; cancel it first"),
        (api.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 5}), 409,
         "model_training", {"name": "m", "run": run["id"]}, f"model 'm' is already training (run {run['id']})"),
        (api.delete("/api/v1/books/tales.txt"), 409, "book_in_use", {"name": "tales.txt", "runs": str(run["id"])},
         f"book 'tales.txt' is in use by run(s) [{run['id']}]"),
        (upload(api), 409, "book_exists", {"name": "tales.txt"}, "a book named 'tales.txt' already exists"),
        (api.post("/api/v1/models", json={"name": "M", **TINY_MODEL}), 409, "name_case_twin",
         {"name": "M", "twin": "m"}, "'m' is taken, and names that differ only in letter case"),
        (upload(api, "empty.txt", b""), 400, "file_empty", {"name": "empty.txt"}, "empty.txt is empty"),
        (upload(api, "big.txt", b"a" * 100_001), 413, "upload_too_large", {"name": "big.txt", "limit": "0.0953674"},
         "big.txt is larger than this server's upload limit of 0.0953674 MiB"),
        (api.post("/api/v1/models", json={"name": "big", **TINY_MODEL, "n_layer": 24, "n_embd": 2048}), 422,
         "memory_over_budget", {"batch": 1, "tokens": 32, "need": f"{big / 2**30:.2f} GiB", "budget": "1.00 GiB"},
         f"training this model with batch 1 x 32 tokens needs ~{big / 2**30:.2f} GiB"),
    ]
    for r, status, key, params, text in cases:
        body = r.json()
        assert (r.status_code, body["error"]) == (status, {"key": key, "params": params}), body
        assert body["detail"].startswith(text), body
    api.post(f"/api/v1/runs/{run['id']}/cancel")
    r = api.post(f"/api/v1/runs/{run['id']}/cancel")
    assert r.json()["error"] == {"key": "run_not_active", "params": {"id": run["id"]}}
    assert "error" not in api.get("/api/v1/nothing-here").json()  # FastAPI's own 404: detail alone


def _keys(node: ast.AST) -> list[str]:
    """The error keys an argument can be: a string, or either string of a conditional."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _keys(node.body) + _keys(node.orelse)
    return []


def test_every_key_raised_in_the_server_is_a_problem_with_its_params_and_every_problem_is_raised():
    """Read from the source, not from requests: a refusal no test reaches still names a key of PROBLEMS with
    exactly its params (Problem checks that only when it is raised), and no key of PROBLEMS is left unused."""
    from lmlab.server.app import PROBLEMS
    where = {"Problem": 1, "BadName": 1, "_refusal": 2}  # the key's place among each one's arguments
    raised = set()
    for path in SERVER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):  # {"key": ..., "params": ...} sent as it is (app.too_large)
                raised |= {v.value for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)
                           and k.value == "key" and isinstance(v, ast.Constant)}
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name not in where or len(node.args) <= where[name]:
                continue
            keys = _keys(node.args[where[name]])
            params = [k.arg for k in node.keywords]
            for key in keys:
                assert key in PROBLEMS, (path.name, node.lineno, key)
                if None not in params:  # no **params: the names are all here
                    assert sorted(params) == sorted(PROBLEMS[key]), (path.name, node.lineno, key, params)
            raised |= set(keys)
    assert raised == set(PROBLEMS), set(PROBLEMS) ^ raised


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A server (runs stay queued, a memory budget of 1 GiB) with tales.txt, models saved by hand: `m` and `m2`
    (one architecture, other weights), `wide` (another width), `q` (m quantized to int8), `broken` (its
    weights are not a safetensors file), `blank` (untrained); a conversations dataset chats.jsonl and a task file
    that does not load."""
    ws = tmp_path_factory.mktemp("ws")
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=120)
    for seed, (name, width) in enumerate((("m", 64), ("m2", 64), ("wide", 128), ("broken", 64))):
        torch.manual_seed(seed)
        save_pretrained(ws / "models" / name, Transformer(ModelConfig.preset(
            "gpt2-tiny", vocab_size=len(tok), n_layer=1, n_embd=width, n_head=2, block_size=128)), tok)
    (ws / "models" / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    quantize_dir(ws / "models" / "m", ws / "models" / "q", bits=8)
    (ws / "tasks").mkdir()
    (ws / "tasks" / "broken.yaml").write_text("name: broken\nkind: no-such-kind\n", encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setattr(Supervisor, "tick", lambda self: None)
    with client(settings(ws, max_upload_bytes=100_000, memory_budget_bytes=2**30)) as c:
        assert upload(c).status_code == 201
        assert c.post("/api/v1/models", json={"name": "blank", **TINY_MODEL}).status_code == 201
        chats = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        assert c.post("/api/v1/datasets", files={"file": ("chats.jsonl", chats)},
                      data={"kind": "conversations"}).status_code == 201
        c.workspace = ws
        yield c
    mp.undo()


def problem(r, status: int, key: str, params: dict | None = None) -> dict:
    """The answer's error, checked: its status, key, and params (all of them, where given); the English
    sentence is still the detail, and the Russian string fills every placeholder from the params."""
    body = r.json()
    assert (r.status_code, body.get("error", {}).get("key")) == (status, key), body
    if params is not None:
        assert body["error"]["params"] == params, body
    assert isinstance(body["detail"], str) and body["detail"], body
    ru = strings()[f"problem.{key}"][1]
    assert set(re.findall(r"\{(\w+)\}", ru)) <= set(body["error"]["params"]), (ru, body)
    return body["error"]["params"]


def test_names_the_ui_sends_are_refused_by_their_rule(made):
    c = made
    problem(c.post("/api/v1/models", json={"name": "a/b", **TINY_MODEL}), 400, "name_separator", {"name": "a/b"})
    problem(c.post("/api/v1/models", json={"name": "my model?", **TINY_MODEL}), 400, "name_characters",
            {"name": "my model?", "chars": " ?"})
    problem(c.post("/api/v1/models", json={"name": ".hidden", **TINY_MODEL}), 400, "name_edges", {"name": ".hidden"})
    problem(upload(c, "a" * 197 + ".txt", b"hi"), 400, "name_too_long", {"limit": 200})
    problem(c.post("/api/v1/runs/quantize", json={"model": "m", "new_model": "con", "to": "int8"}), 400,
            "name_reserved", {"name": "con"})
    problem(upload(c, "notes.docx", b"hi"), 400, "book_suffix", {"name": "notes.docx", "suffixes": " ".join(SUFFIXES)})
    problem(upload(c, "книга" * 30 + ".txt", b"hi"), 400, "name_too_many_bytes", {"bytes": 304, "limit": 249})
    problem(c.post("/api/v1/datasets", files={"file": ("d.json", b"{}\n")}, data={"kind": "conversations"}), 400,
            "dataset_suffix", {"name": "d.json", "suffix": ".jsonl"})
    # the OpenAI-compatible API keeps OpenAI's shape, and the AZR app's endpoints their own
    r = c.post("/v1/chat/completions", json={"model": "a/b", "messages": [{"role": "user", "content": "hi"}]})
    assert "error" in r.json() and "key" not in r.json()["error"], r.json()


def test_uploads_that_cannot_be_taken_say_why(made):
    c = made
    problem(upload(c, "blank.txt", b"  \n\t "), 422, "book_no_text", {"name": "blank.txt"})
    r = upload(c, "junk.epub", b"not a zip")
    assert r.json()["detail"] == "junk.epub: not a readable EPUB (BadZipFile: File is not a zip file)"
    problem(r, 422, "book_unreadable", {"name": "junk.epub", "reason": "not a readable EPUB (BadZipFile: File is not a "
                                                                       "zip file)"})
    params = problem(c.post("/api/v1/datasets", files={"file": ("bad.jsonl", b'{"nope": 1}\n')},
                            data={"kind": "conversations"}), 422, "dataset_invalid")
    assert params["name"] == "bad.jsonl" and "bad.jsonl:1" in params["reason"], params
    # refused by its Content-Length, before the server reads it; the limit said is the one set (--max-upload-mb),
    # not that plus the multipart allowance the guard grants on top
    r = c.post("/api/v1/books", content=b"x" * (100_000 + 2**20 + 1), headers={"content-type": "text/plain"})
    problem(r, 413, "body_too_large", {"limit": "0.1"})
    assert r.json()["detail"] == "the request body (1.1 MiB) is larger than the limit of 0.1 MiB"
    r = c.post("/api/v1/books", content=iter([b"x" * 2**20] * 2),  # no Content-Length: counted as it arrives
               headers={"content-type": "multipart/form-data; boundary=b"})
    problem(r, 413, "body_too_large", {"limit": "0.1"})
    assert r.json()["detail"] == "the request body is larger than the limit of 0.1 MiB"
    problem(c.get("/api/v1/datasets/gone.jsonl/preview", params={"model": "m"}), 404, "dataset_not_found",
            {"name": "gone.jsonl"})


def test_forms_that_a_run_would_refuse_are_refused_by_their_rule(made):
    c = made
    r = c.post("/api/v1/models", json={"name": "odd", **TINY_MODEL, "n_head": 3})
    assert problem(r, 422, "model_config_invalid")["reason"] == r.json()["detail"]
    problem(c.post("/api/v1/runs", json={"model": "blank", "books": ["tales.txt"], "seq_len": 64}), 422,
            "seq_len_over_context", {"seq_len": 64, "block": 32})
    if not torch.cuda.is_available():  # a run asking for cuda on a server without: refused up front, not offered
        r = c.post("/api/v1/runs", json={"model": "blank", "books": ["tales.txt"], "device": "cuda"})
        problem(r, 422, "device_unavailable", {"device": "cuda"})
        assert r.json()["detail"] == ("device 'cuda' is not available on this server (torch finds no CUDA GPU); "
                                      "choose auto or cpu")
        assert c.get("/api/v1/info").json()["devices"] == ["auto", "cpu"]
    r = c.post("/api/v1/runs/selfplay", json={"model": "m", "new_model": "m-sp", "reward": "repetition",
                                              "group_size": 256, "prompts_per_iteration": 256, "max_new_tokens": 100})
    params = problem(r, 422, "selfplay_over_budget")
    cfg = ModelConfig.load(c.workspace / "models" / "m" / "config.json")
    assert params["batch"] == 256 * 256 and params["budget"] == "1.00 GiB", params
    assert params["need"] == human_bytes(selfplay_memory(cfg, params["batch"], params["tokens"])["total"]), params
    tune = {"model": "m", "new_model": "m-t", "max_steps": 2}
    problem(c.post("/api/v1/runs/tune", json={**tune, "method": "sft", "dataset": "chats.jsonl", "lora_alpha": 8}),
            422, "lora_needs_rank", {"settings": "lora_alpha"})
    problem(c.post("/api/v1/runs/tune", json={**tune, "method": "grpo", "task": "addition", "lora_rank": 2,
                                              "lora_dropout": 0.1}), 422, "lora_dropout_grpo", {})
    problem(c.post("/api/v1/runs/tune", json={**tune, "model": "q", "method": "sft", "dataset": "chats.jsonl"}), 422,
            "quantized_cannot_train", {"name": "q"})
    problem(c.post("/api/v1/runs/quantize", json={"model": "m", "new_model": "m-q", "to": "int8", "method": "gptq"}),
            422, "gptq_needs_calibration", {})
    merge = {"model": "m", "new_model": "m-x", "method": "linear"}
    r = c.post("/api/v1/runs/merge", json={**merge, "others": ["m2"], "weights": [1, 1, 1]})
    assert problem(r, 422, "settings_invalid")["reason"] == "weights has 3 numbers for 2 models; give one per model"
    assert "different architectures" in problem(c.post("/api/v1/runs/merge", json={**merge, "others": ["wide"]}),
                                                422, "merge_refused")["reason"]
    params = problem(c.post("/api/v1/runs/eval", json={"models": ["m"], "tasks": ["tasks/broken.yaml"]}), 422,
                     "task_invalid")
    assert params["name"] == "tasks/broken.yaml", params


def test_views_say_why_they_cannot_show(made):
    c = made
    problem(c.get("/api/v1/books/tales.txt/data/overview", params={"planned_tokens": 1000}), 422,
            "advisor_needs_model", {})
    r = c.get("/api/v1/books/tales.txt/data/filters", params={"spec": "nosuch"})
    assert "unknown filter 'nosuch'" in problem(r, 422, "settings_invalid")["reason"]
    problem(c.get("/api/v1/books/tales.txt/data/contamination", params={"task": "tasks/broken.yaml"}), 422,
            "task_invalid")
    problem(c.post("/api/v1/models/m/interp", json={"view": "lens", "prompt": "a" * 100}), 422, "prompt_too_long",
            {"tokens": 100, "limit": 64})
    assert "same number of tokens" in problem(c.post("/api/v1/models/m/interp", json={
        "view": "patch", "prompt": "ab", "corrupt": "abc"}), 422, "prompt_invalid")["reason"]
    problem(c.post("/api/v1/generate", json={"model": "m", "prompt": "a", "stop_strings": ["x" * 201]}), 422,
            "stop_string_length", {})
    assert problem(c.post("/api/v1/generate", json={"model": "broken", "prompt": "a"}), 409,
                   "model_unloadable")["name"] == "broken"
