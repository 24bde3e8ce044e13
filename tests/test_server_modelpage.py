"""A model's page in the web app: quantization started through the API runs `lmlab quantize` under the supervisor
and the new model's logits are exactly those of the command run by hand with the same settings; cancel stops it
and nothing is registered; the model cards' bits per weight equal a hand count of the tensors; tokens/s exist
only after a measurement of these weights; bad requests are refused with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_server_support import (
    CHILD_ENV,
    client,
    finished,
    held_once_started,
    settings,
    tiny_workspace,
    wait_for,
)

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.models.quant import QuantConfig, quantize_dir
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus
from lmlab.tune.chat import add_chat_tokens, write_template


@pytest.fixture(scope="module")
def mp(tmp_path_factory):
    """A server with `tiny` trained for 4 steps, `blank` (never trained), `chatty` (weights saved by hand,
    with lmlab's chat tokens and template, and the provenance `lmlab tune sft` writes) and `halfchat` (lmlab's
    template written beside a model whose tokenizer has no chat tokens)."""
    ws = tmp_path_factory.mktemp("ws")
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    chat_model, chat_tok, _ = add_chat_tokens(Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=1,
                                                                             block_size=64)), tok)
    save_pretrained(ws / "models" / "chatty", chat_model, chat_tok,
                    training={"sft": {"base": "/somewhere/runs/base/final"}, "steps": 7})
    write_template(ws / "models" / "chatty")
    save_pretrained(ws / "models" / "halfchat", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=1,
                                                                               block_size=64)), tok)
    write_template(ws / "models" / "halfchat")
    with tiny_workspace(ws, steps=4, save_every=0) as c:
        yield c


def logits(path: Path) -> torch.Tensor:
    model, _ = load_pretrained(path)
    with torch.no_grad():
        return model(torch.arange(20).view(1, 20) % model.config.vocab_size)[0]


def hand_bits(cfg: ModelConfig, qc: QuantConfig | None) -> tuple[float, float | None]:
    """Bits per parameter of the whole file and of the quantized linears, counted from the shapes: a quantized
    linear (out, in) stores out*in integers of qc.bits and bf16 scales (int8: one per row; int4: a scale and a
    zero per group of qc.group_size columns); everything else is fp32; a tied embedding is the head."""
    model, n = Transformer(cfg), cfg.num_parameters()
    if qc is None:
        return 32.0, None
    q = bits = 0
    for name in qc.modules:
        out, inp = model.get_submodule(name).weight.shape
        q += out * inp
        bits += out * inp * qc.bits + (out * 16 if qc.bits == 8 else 2 * 16 * out * inp // qc.group_size)
    return ((n - q) * 32 + bits) / n, bits / q


@pytest.fixture(scope="module")
def quantized(mp) -> dict[str, dict]:
    """`tiny` quantized by the server: int4 g32 with GPTQ on the book, and int8 with the head kept -> the runs."""
    cases = {"tiny-int4": {"to": "int4", "group_size": 32, "method": "gptq", "calibration": ["tales.txt"]},
             "tiny-int8": {"to": "int8", "keep_head": True}}
    runs = {}
    for name, body in cases.items():
        r = mp.post("/api/v1/runs/quantize", json={"model": "tiny", "new_model": name, **body})
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "quantize" and r.json()["model"] == "tiny"
        runs[name] = finished(mp, r.json()["id"])
    return runs


def test_quantizing_from_the_api_gives_exactly_the_models_of_lmlab_quantize(mp, quantized, tmp_path):
    ws = mp.workspace
    flags = {"tiny-int4": ["--to", "int4", "--group-size", "32", "--method", "gptq", "--calibration",
                           "books/tales.txt"],
             "tiny-int8": ["--to", "int8", "--method", "rtn", "--keep-head"]}
    for name, run in quantized.items():
        assert run["status"] == "completed", run
        assert not run["can_resume"]
        by_hand = tmp_path / name
        subprocess.run([sys.executable, "-m", "lmlab.cli", "quantize", "models/tiny", *flags[name], "--out",
                        str(by_hand)], cwd=ws, env={**os.environ, **CHILD_ENV}, check=True, capture_output=True)
        assert torch.equal(logits(ws / "models" / name), logits(by_hand))
        # the run page's command is the one the job ran, into another folder
        assert mp.get(f"/api/v1/runs/{run['id']}/overview").json()["command"] == (
            f"lmlab quantize models/tiny {' '.join(flags[name])} --out run-{run['id']}-again")
        m = mp.get(f"/api/v1/models/{name}").json()
        assert m["trained"] and m["origin"]["kind"] == "quantize" and m["origin"]["parent"] == "tiny"
        assert mp.get(f"/api/v1/models/{name}/card").json()["made"] == {"how": "quantized", "from": "tiny",
                                                                        "run": run["id"]}
    # the model it was made from is as it was, and the new one generates through the same API
    assert mp.get("/api/v1/models/tiny/card").json()["made"] == {"how": "trained", "steps": 4, "run": mp.train_run}
    r = mp.post("/api/v1/generate", json={"model": "tiny-int4", "prompt": "Once", "max_new_tokens": 5,
                                          "do_sample": False})
    assert r.status_code == 200 and r.json()["new_tokens"] == 5


def test_cards_count_bits_per_weight_as_by_hand(mp, quantized):
    cards = {c["name"]: c for c in mp.get("/api/v1/cards").json()}
    ws, cfg = mp.workspace, ModelConfig.from_dict(mp.get("/api/v1/models/tiny").json()["config"])
    assert (cards["tiny"]["weights"], cards["tiny"]["bits_per_weight"], cards["tiny"]["quantized_bits_per_weight"]) \
        == ("fp32", 32.0, None)
    for name, weights in (("tiny-int4", "int4 g32 gptq"), ("tiny-int8", "int8 rtn")):
        qc = QuantConfig.load(ws / "models" / name / "quantization.json")
        assert cards[name]["weights"] == weights
        assert (cards[name]["bits_per_weight"], cards[name]["quantized_bits_per_weight"]) == hand_bits(cfg, qc)
        assert cards[name]["parameters"] == cfg.num_parameters() == cards["tiny"]["parameters"]
        assert cards[name]["size_bytes"] == sum(f.stat().st_size for f in (ws / "models" / name).iterdir())
    assert cards["tiny-int4"]["quantized_bits_per_weight"] == 5.0  # 4 bits + a bf16 scale and zero per 32
    assert cards["blank"] == {**cards["blank"], "trained": False, "bits_per_weight": None, "speed": None,
                              "made": {"how": "untrained"}}
    # halfchat's template names tokens its tokenizer lacks: the chat route answers every message with a 400
    assert [n for n, c in cards.items() if c["chat"]] == ["chatty"] and cards["halfchat"]["trained"]
    assert cards["chatty"]["made"] == {"how": "tuned", "mode": "sft", "from": "/somewhere/runs/base/final",
                                       "steps": 7, "run": None}


def test_a_tuned_model_quantized_by_hand_is_quantized_not_tuned(tmp_path):
    """lmlab quantize copies the tuned model's training.json beside the integer weights: the card says how these
    weights were made, quantized from the tuned model."""
    ws = tmp_path / "ws"
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    save_pretrained(ws / "models" / "chatty", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=1)),
                    tok, training={"sft": {"base": "/somewhere/runs/base/final"}, "steps": 7})
    quantize_dir(ws / "models" / "chatty", ws / "models" / "chatty-int8", bits=8)
    assert (ws / "models" / "chatty-int8" / "training.json").is_file()
    with client(settings(ws)) as c:
        assert c.get("/api/v1/models/chatty-int8/card").json()["made"] == {"how": "quantized", "from": "chatty",
                                                                             "run": None}
        assert c.get("/api/v1/models/chatty/card").json()["made"] == {
            "how": "tuned", "mode": "sft", "from": "/somewhere/runs/base/final", "steps": 7, "run": None}


def test_tokens_per_second_exist_only_once_measured_and_for_those_weights(mp):
    card = mp.get("/api/v1/models/tiny/card").json()
    assert card["speed"] is None
    r = mp.post("/api/v1/models/tiny/speed")
    assert r.status_code == 200, r.text
    # the size on disk is the model's files: the stored measurement does not change it
    assert mp.get("/api/v1/models/tiny/card").json()["size_bytes"] == card["size_bytes"]
    speed = r.json()["speed"]
    # 32 tokens, but the model's context is 32 with <BOS>; the server's own threads (Settings.torch_threads), not
    # whatever the worker thread or the test's thread was left with
    assert (speed["new_tokens"], speed["threads"]) == (31, 1)
    assert speed["tokens_per_s"] == pytest.approx(31 / speed["elapsed_s"], rel=1e-2)  # (both rounded)
    assert mp.get("/api/v1/models/tiny/card").json()["speed"] == speed  # stored with the model
    assert mp.get("/api/v1/models/chatty/card").json()["speed"] is None  # measured per model
    weights = mp.workspace / "models" / "tiny" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # other weights now
    assert mp.get("/api/v1/models/tiny/card").json()["speed"] is None
    r = mp.post("/api/v1/models/blank/speed")
    assert (r.status_code, r.json()["detail"]) == (409, "model 'blank' has not been trained yet: a model to measure "
                                                        "must be a trained model")


def test_a_cancelled_quantization_makes_no_model_and_holds_its_names_until_then(mp):
    r = mp.post("/api/v1/runs/quantize", json={"model": "tiny", "new_model": "never", "to": "int8"})
    run_id = r.json()["id"]
    with held_once_started(mp, run_id):  # held until the cancel is sent: it cannot finish first
        r = mp.post("/api/v1/runs/quantize", json={"model": "tiny", "new_model": "never", "to": "int8"})
        assert (r.status_code, r.json()["detail"]) == (409, f"model 'never' is the name of the model being made of "
                                                            f"quantization run {run_id}; cancel that run or wait for "
                                                            "it")
        r = mp.delete("/api/v1/models/tiny")
        assert (r.status_code, r.json()["detail"]) == (409, f"model 'tiny' is the starting point of quantization "
                                                            f"run {run_id}; cancel that run or wait for it")
        assert mp.post(f"/api/v1/runs/{run_id}/cancel").json()["cancel_requested"] is True
        wait_for(lambda: (mp.workspace / "runs" / f"run-{run_id}" / "stop-requested").exists(), 60, 0.05,
                 "the supervisor to ask it to stop")
    run = finished(mp, run_id)
    assert run["status"] == "cancelled" and not run["can_resume"]
    assert mp.get("/api/v1/models/never").status_code == 404 and not (mp.workspace / "models" / "never").exists()
    assert mp.post(f"/api/v1/runs/{run_id}/resume").json()["detail"] == (
        f"run {run_id}: this quantization keeps no checkpoints and cannot be resumed; start it again")


@pytest.mark.parametrize("body, status, detail", [
    ({"to": "int3"}, 422, "to ('int3') must be int8 or int4"),
    ({"to": "int8", "method": "awq"}, 422, "method ('awq') must be rtn or gptq"),
    ({"to": "int8", "group_size": 32}, 422, "group_size is for int4; int8 has one scale per output row"),
    ({"to": "int4", "group_size": 48}, 422, "group_size (48) must be one of 32, 64, 128"),
    ({"to": "int4", "method": "gptq"}, 422, "method gptq needs calibration: books to measure the layers' inputs on"),
    ({"to": "int4", "calibration": ["tales.txt"]}, 422, "calibration is used by method gptq only"),
    ({"to": "int4", "method": "gptq", "calibration": ["tales.txt", "tales.txt"]}, 422,
     "a calibration book is listed twice"),
    ({"to": "int4", "method": "gptq", "calibration": ["nope.txt"]}, 404, "book 'nope.txt' not found"),
    ({"to": "int8", "model": "nope"}, 404, "model 'nope' not found"),
    ({"to": "int8", "model": "blank"}, 409,
     "model 'blank' has not been trained yet: the model to quantize must be a trained model"),
    ({"to": "int8", "new_model": "blank"}, 409,
     "a model named 'blank' already exists; choose another name for the new model"),
    ({"to": "int8", "new_model": "Blank"}, 409, "'blank' is taken, and names that differ only in letter case would "
                                                "share one folder on some systems; choose another name for the new "
                                                "model"),
    ({"to": "int8", "new_model": "../up"}, 400, "new model name '../up' must not contain a path separator"),
])
def test_bad_requests_are_refused_with_the_reason(mp, body, status, detail):
    r = mp.post("/api/v1/runs/quantize", json={"model": "tiny", "new_model": "fresh", **body})
    assert (r.status_code, r.json()["detail"]) == (status, detail)


def test_a_quantized_model_is_not_quantized_again(mp, quantized):
    r = mp.post("/api/v1/runs/quantize", json={"model": "tiny-int8", "new_model": "fresh", "to": "int4"})
    assert (r.status_code, r.json()["detail"]) == (409, "model 'tiny-int8' is already quantized; quantize the "
                                                        "model it was made from")


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_a_quantized_model_is_not_exported_and_the_refusal_names_it(mp, quantized, fmt):
    """Named by the model (not by the server's temporary folder), with advice the web app can follow."""
    r = mp.get(f"/api/v1/models/tiny-int4/export/{fmt}")
    assert (r.status_code, r.json()["detail"]) == (422, "model 'tiny-int4' is an int8/int4 model, which cannot be "
                                                        "exported; export the model it was quantized from (its card "
                                                        "names it)")
    assert not list((mp.workspace / "tmp").iterdir())
