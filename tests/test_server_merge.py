"""Merging from a model's page: a merge started through the API runs `lmlab merge` under the supervisor and the
new model's weights are exactly those of the command run by hand with the same settings; parents that cannot be
merged and bad parameters are refused in one line with the reason."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_server_support import CHILD_ENV, client, settings, wait_run

import lmlab
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus


@pytest.fixture(scope="module")
def ws_client(tmp_path_factory):
    """A server with `base`, its children `a` and `b` (base plus small deltas), `other` (another tokenizer)."""
    ws = tmp_path_factory.mktemp("ws")
    text = demo_corpus(n_stories=10, seed=1)
    tok = Tokenizer.train([text], kind="char", vocab_size=120)
    config = ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=1, block_size=64)
    torch.manual_seed(0)
    base = Transformer(config).eval()
    save_pretrained(ws / "models" / "base", base, tok)
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        child = Transformer(config).eval()
        child.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        save_pretrained(ws / "models" / name, child, tok)
    save_pretrained(ws / "models" / "other", base, Tokenizer.train([text.upper()], kind="char", vocab_size=120))
    with client(settings(ws, max_jobs=1)) as c:
        c.workspace = ws
        yield c


@pytest.mark.parametrize("body, flags", [
    ({"others": ["b"], "method": "slerp", "t": 0.3}, ["models/b", "--method", "slerp", "--t", "0.3"]),
    ({"others": ["b"], "method": "dare", "base": "base", "density": 0.5, "weights": [0.7, 0.3], "seed": 5},
     ["models/b", "--method", "dare", "--base", "models/base", "--density", "0.5", "--weights", "0.7,0.3",
      "--seed", "5"]),
])
def test_merging_from_the_api_gives_exactly_the_model_of_lmlab_merge(ws_client, body, flags, tmp_path):
    c, ws, name = ws_client, ws_client.workspace, f"ab-{body['method']}"
    r = c.post("/api/v1/runs/merge", json={"model": "a", "new_model": name, **body})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"], lambda r: r["status"] not in ("queued", "running"), "the merge")
    assert run["status"] == "completed" and run["kind"] == "merge", run
    by_hand = tmp_path / name
    subprocess.run([sys.executable, "-m", "lmlab.cli", "merge", "models/a", *flags, "--out", str(by_hand)], cwd=ws,
                   env={**os.environ, **CHILD_ENV}, check=True, capture_output=True)
    served, expected = lmlab.load(ws / "models" / name)[0].state_dict(), lmlab.load(by_hand)[0].state_dict()
    assert served.keys() == expected.keys() and all(torch.equal(served[k], expected[k]) for k in expected)
    assert c.get(f"/api/v1/models/{name}/card").json()["made"] == {"how": "merged", "from": ["a", "b"],
                                                                  "method": body["method"], "run": run["id"]}
    r = c.post("/api/v1/generate", json={"model": name, "prompt": "Once", "max_new_tokens": 5, "do_sample": False})
    assert r.status_code == 200 and r.json()["new_tokens"] == 5


@pytest.mark.parametrize("body, status, detail", [
    ({"others": ["other"], "method": "linear"}, 422,
     "model a and model other have different tokenizers (tokenizer.json differs); merging needs one vocabulary"),
    ({"others": ["b"], "method": "ties"}, 422,
     "method ties needs base (the model the parents were fine-tuned from)"),
    ({"others": ["b"], "method": "avg"}, 422,
     "method 'avg' is not a method; choose one of linear, slerp, task-arithmetic, ties, dare"),
    ({"others": ["b", "base"], "method": "slerp"}, 422, "method slerp merges exactly two models, not 3"),
    ({"others": ["nope"], "method": "linear"}, 404, "model 'nope' not found"),
    ({"others": ["b"], "method": "linear", "new_model": "base"}, 409,
     "a model named 'base' already exists; choose another name for the new model"),
])
def test_bad_merges_are_refused_with_the_reason(ws_client, body, status, detail):
    r = ws_client.post("/api/v1/runs/merge", json={"model": "a", "new_model": "fresh", **body})
    assert (r.status_code, r.json()["detail"]) == (status, detail)
