"""Steering through the API (routers/generate.py, services.steered): the model's directions listed, a steered
generation equal to the library's with the same direction (JSON and streamed), the shared cached model left
unsteered, and bad directions refused with the reason."""

from __future__ import annotations

import pytest
import torch
from test_server_support import client, settings, sse_events

from lmlab.lab.interp.steer import Direction, Steering
from lmlab.models import ModelConfig, Transformer, generate
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus

GREEDY = {"model": "steered", "prompt": "Once upon", "max_new_tokens": 12, "do_sample": False, "stop_at_eos": False}


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    """A server with `steered` (weights saved by hand) and two directions beside it: `ru` (fits) and `wide`
    (made for a wider model)."""
    ws = tmp_path_factory.mktemp("ws")
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=120, block_size=64, n_kv_head=2))
    folder = save_pretrained(ws / "models" / "steered", model, tok)
    torch.manual_seed(1)
    Direction(torch.randn(64) * 4, 1, {"method": "difference of means"}).save(folder / "steering" / "ru")
    Direction(torch.ones(7), 1).save(folder / "steering" / "wide")
    (folder / "steering" / "notes").mkdir()  # not a direction: not listed
    with client(settings(ws, max_jobs=1)) as c:
        c.folder = folder
        yield c


def library(c, **kw):
    model, tok = load_pretrained(c.folder)
    with Steering(model, Direction.load(c.folder / "steering" / "ru") if kw else None, **kw):
        return generate(model, tok, GREEDY["prompt"], max_new_tokens=12, do_sample=False, stop_at_eos=False)


def test_directions_are_listed(sc):
    r = sc.get("/api/v1/models/steered/steering")
    assert r.status_code == 200, r.text
    ru = Direction.load(sc.folder / "steering" / "ru")
    assert r.json() == [{"name": "ru", "layer": 1, "n_embd": 64, "norm": round(ru.norm, 6),
                         "method": "difference of means"},
                        {"name": "wide", "layer": 1, "n_embd": 7, "norm": round(7 ** 0.5, 6), "method": None}]
    assert sc.get("/api/v1/models/nobody/steering").status_code == 404


def test_steered_generation_equals_the_library(sc):
    plain = sc.post("/api/v1/generate", json=GREEDY).json()["text"]
    assert plain == library(sc)
    for kw, req in (({"coef": 4.0}, {"steer": "ru", "steer_coef": 4}), ({"ablate": True}, {"steer": "ru",
                                                                                           "steer_ablate": True})):
        want = library(sc, **kw)
        assert want != plain  # the direction changes this model's greedy text
        r = sc.post("/api/v1/generate", json={**GREEDY, **req})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == want
        events = sse_events(sc, "/api/v1/generate/stream", "POST", until="done", json={**GREEDY, **req})
        assert events[-1][0] == "done" and events[-1][1]["text"] == want
    assert sc.post("/api/v1/generate", json={**GREEDY, "steer": "ru", "steer_coef": 0}).json()["text"] == plain
    # the cached model the next request gets carries no hooks
    assert sc.post("/api/v1/generate", json=GREEDY).json()["text"] == plain


@pytest.mark.parametrize("req, code, message", [
    ({"steer": "wide"}, 422, "steering direction 'wide': the direction has width 7, the model's residual stream 64"),
    ({"steer": "notes"}, 422, "is not a steering direction"),
    ({"steer": "gone"}, 404, "model 'steered' has no steering direction 'gone'"),
    ({"steer": "../steered"}, 422, "direction name"),
    ({"steer_coef": 2}, 422, "steer_coef and steer_ablate need steer"),
    ({"steer": "ru", "steer_coef": 2, "steer_ablate": True}, 422, "not both"),
])
def test_bad_steering_is_refused_with_the_reason(sc, req, code, message):
    for path in ("/api/v1/generate", "/api/v1/generate/stream"):
        r = sc.post(path, json={**GREEDY, **req})
        assert r.status_code == code, r.text
        assert message in r.json()["detail"]
