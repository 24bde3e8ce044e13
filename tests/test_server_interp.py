"""POST /api/v1/models/NAME/interp: the model page's views (logit lens, attention, activation patching) equal the
library's (lab/interp/views.py) on the same model and prompt, number for number; they run on a private copy of
the served model (the views hook its modules while generation may use the cached one); bad requests get the
reason."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_server_support import TINY_MODEL, client, settings, upload

from lmlab.lab.interp import views
from lmlab.lab.interp.sae import SAEConfig, save_sae, stream_activations, train_sae
from lmlab.lab.interp.saelab import feature_browser
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.server.routers import interp
from lmlab.tokenizers import Tokenizer

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog. 0123456789"


@pytest.fixture(scope="module")
def ip(tmp_path_factory):
    """A server with `m`: a two-layer model with random weights (seeded) and a character tokenizer; `blank`
    has no weights."""
    ws = tmp_path_factory.mktemp("ws")
    tok = Tokenizer.train([TEXT], kind="char", vocab_size=60)
    torch.manual_seed(0)
    save_pretrained(ws / "models" / "m", Transformer(ModelConfig.preset(
        "gpt2-tiny", vocab_size=len(tok), n_layer=2, block_size=128)), tok)
    with client(settings(ws)) as c:
        assert c.post("/api/v1/models", json={"name": "blank", **TINY_MODEL}).status_code == 201
        c.model, c.tok = load_pretrained(ws / "models" / "m")
        yield c


def same(a, b, atol=1e-7):
    """Equal structures, floats within 1e-5 relative (or `atol`): the server's worker thread may run on another
    number of threads than the test's (another summation order)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], atol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and math.isclose(a, b, rel_tol=1e-5, abs_tol=atol)
    return a == b


def post(c, **body):
    return c.post("/api/v1/models/m/interp", json=body)


def test_the_lens_is_the_librarys(ip):
    r = post(ip, view="lens", prompt="the cat sat", target=" ", top_k=3)
    assert r.status_code == 200, r.text
    ids = ip.tok.encode("the cat sat")
    want = views.lens_view(ip.model, ip.tok, ids, ip.tok.encode(" ")[0], 3)
    assert same(r.json(), {"model": "m", "view": "lens", **want})
    assert len(want["top"]) == 3 and len(want["top"][0]) == len(ids) and len(want["top"][0][0]) == 3


def test_attention_is_the_librarys_rounded(ip):
    got = post(ip, view="attention", prompt="a dog").json()
    want = views.attention_view(ip.model, ip.tok, ip.tok.encode("a dog"))
    assert got["tokens"] == want["tokens"] == ["a", " ", "d", "o", "g"]
    assert same(got["attention"], want["attention"].numpy().round(4).tolist())
    assert got["max_future_weight"] == 0.0 and got["max_row_sum_error"] == want["max_row_sum_error"]


def test_patching_is_the_librarys(ip):
    got = post(ip, view="patch", prompt="the cat sat", corrupt="the dog sat", foil="m").json()
    clean, bad = ip.tok.encode("the cat sat"), ip.tok.encode("the dog sat")
    want = views.patch_view(ip.model, ip.tok, clean, bad, None, ip.tok.encode("m")[0])
    # restored fractions: float32 logit differences over their range, batched (1e-5 apart between runs)
    assert same(got["restored"], want["restored"].tolist(), atol=1e-4) and got["tokens"][4] == "c/d"
    assert same({k: got[k] for k in ("target", "foil", "logit_diff_clean", "logit_diff_corrupt")},
                {k: want[k] for k in ("target", "foil", "logit_diff_clean", "logit_diff_corrupt")})
    assert abs(got["restored_all_positions_stream0"] - 1) < 1e-5 and abs(got["restored_nothing"]) < 1e-6


def test_the_views_hook_a_copy_not_the_served_model(ip, monkeypatch):
    seen = []
    monkeypatch.setattr(interp, "patch_view", lambda model, *a: seen.append(model) or views.patch_view(model, *a))
    greedy = {"model": "m", "prompt": "the", "max_new_tokens": 8, "do_sample": False}
    before = ip.post("/api/v1/generate", json=greedy).json()["text"]
    assert post(ip, view="patch", prompt="the cat", corrupt="the dog").status_code == 200
    state = ip.app.app.state.lmlab
    served, _ = state.cache.get(state.ws.model_path("m"))
    assert seen and seen[0] is not served
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in served.modules())
    after = ip.post("/api/v1/generate", json=greedy).json()["text"]
    assert after == before


@pytest.mark.parametrize("body, status, detail", [
    ({"view": "patch", "prompt": "the cat"}, 422, "corrupt is needed by patch and only by patch"),
    ({"view": "lens", "prompt": "the cat", "corrupt": "the dog"}, 422, "corrupt is needed by patch and only by patch"),
    ({"view": "attention", "prompt": "the cat", "target": "a"}, 422, "target is for lens and patch"),
    ({"view": "lens", "prompt": "the cat", "foil": "a"}, 422, "foil is for patch only"),
    ({"view": "patch", "prompt": "the cat", "corrupt": "a dog"}, 422,
     "prompt and corrupt must have the same number of tokens (7 vs 5)"),
    ({"view": "patch", "prompt": "the cat", "corrupt": "the dog", "target": "a", "foil": "a"}, 422,
     "foil must be a different token from target"),
    ({"view": "lens", "prompt": "a" * 65}, 422, "prompt is 65 tokens; the page shows at most 64"),
    ({"view": "lens", "prompt": "a" * 129}, 422, "prompt is 129 tokens, more than the model's context (128)"),
    ({"view": "lens", "prompt": "the cat", "target": "x"}, 422, "target 'x' starts with a character the tokenizer "
                                                                "does not know (it reads as <UNK>)"),
])
def test_bad_requests_are_refused_with_the_reason(ip, body, status, detail):
    r = post(ip, **body)
    assert (r.status_code, r.json()["detail"]) == (status, detail)


def test_untrained_and_unknown_models(ip):
    r = ip.post("/api/v1/models/blank/interp", json={"view": "lens", "prompt": "a"})
    assert (r.status_code, r.json()["detail"]) == (409, "model 'blank' has not been trained yet: a model to look "
                                                        "inside must be a trained model")
    assert ip.post("/api/v1/models/nope/interp", json={"view": "lens", "prompt": "a"}).status_code == 404


@pytest.fixture(scope="module")
def with_sae(ip):
    """`m` with an SAE on stream 1 (trained a few steps on its own activations) saved as m/sae/s1, and a book of
    TEXT."""
    state = ip.app.app.state.lmlab
    ids = torch.tensor([ip.tok.encode(TEXT * 8)[:128 * 3]]).view(3, 128)
    acts = stream_activations(ip.model, ids, 1)
    sae, _ = train_sae(acts.flatten(0, 1), SAEConfig(d_in=64, n_features=32, kind="topk", k=4, stream=1, steps=20,
                                                     batch_size=64))
    folder = state.ws.model_path("m") / "sae"
    save_sae(sae, folder / "s1", {"metrics": {"l0": 4.0}})
    assert upload(ip, "story.txt", (TEXT + "\n") * 12).status_code == 201
    return sae


def test_the_sae_browser_is_the_reports(ip, with_sae):
    assert ip.get("/api/v1/models/m/saes").json() == [
        {"name": "s1", "kind": "topk", "stream": 1, "n_features": 32, "d_in": 64, "k": 4, "metrics": {"l0": 4.0}}]
    r = ip.post("/api/v1/models/m/saes/s1/browse", json={"book": "story.txt", "features": [0, 5], "tokens": 300})
    assert r.status_code == 200, r.text
    got = r.json()
    ids = ip.tok.encode((TEXT + "\n") * 12)[:300]
    x = torch.tensor([ids[i:i + 128] for i in range(0, len(ids) - 127, 128)])  # two whole windows
    want = feature_browser(with_sae, ip.model, ip.tok, x, stream_activations(ip.model, x, 1), [0, 5])
    assert got["tokens"] == 256 and same(got["features"], want)
    default = ip.post("/api/v1/models/m/saes/s1/browse", json={"book": "story.txt", "count": 3}).json()
    assert len(default["features"]) == min(3, default["alive"]) and default["alive"] > 0


def test_the_sae_browser_encodes_only_the_text_its_tokens_need(ip, with_sae, monkeypatch):
    """A long book: the first `tokens` ids as encoding it whole gives them, from a prefix of its text (the whole
    of a 20 MiB book took 6.7 GB in the server)."""
    book = (TEXT + "\n") * 200
    assert upload(ip, "long.txt", book).status_code == 201
    seen = []
    real = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, **k: seen.append(len(text)) or real(self, text, **k))
    got = ip.post("/api/v1/models/m/saes/s1/browse", json={"book": "long.txt", "features": [0, 5], "tokens": 300})
    assert got.status_code == 200, got.text
    monkeypatch.setattr(Tokenizer, "encode", real)
    ids = ip.tok.encode(book)[:300]
    x = torch.tensor([ids[i:i + 128] for i in range(0, len(ids) - 127, 128)])
    want = feature_browser(with_sae, ip.model, ip.tok, x, stream_activations(ip.model, x, 1), [0, 5])
    assert got.json()["tokens"] == 256 and same(got.json()["features"], want)
    assert seen and max(seen) <= 4 * 300 < len(book)


@pytest.mark.parametrize("text, n", [("a b c d e f g h", 3), ("ab" * 50, 5), ("x y", 10), ("", 4)])
def test_first_ids_are_the_whole_texts_first(ip, text, n):
    assert interp.first_ids(ip.tok, text, n) == ip.tok.encode(text)[:n]


@pytest.mark.parametrize("path, body, status, detail", [
    ("/saes/s2/browse", {"book": "story.txt"}, 404, "model 'm' has no sparse autoencoder 's2'"),
    ("/saes/s1/browse", {"book": "story.txt", "features": [32]}, 422,
     "feature 32 out of range: the SAE has features 0..31"),
    ("/saes/s1/browse", {"book": "story.txt", "tokens": 50}, 422,
     "book 'story.txt' gives 50 tokens, fewer than one window of 128"),
    ("/saes/s1/browse", {"book": "nope.txt"}, 404, "book 'nope.txt' not found"),
])
def test_sae_refusals(ip, with_sae, path, body, status, detail):
    r = ip.post("/api/v1/models/m" + path, json=body)
    assert (r.status_code, r.json()["detail"]) == (status, detail)


def test_an_unreadable_sae_is_not_listed_and_browsing_it_is_a_409(ip, with_sae):
    folder = ip.app.app.state.lmlab.ws.models / "m" / "sae" / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"sae": {"kind": "topk", "stream": 1, "n_features": 16,
                                                            "d_in": 64, "k": 4}}))
    (folder / "sae.safetensors").write_bytes(bytes(range(100)))  # no safetensors header
    try:
        assert [x["name"] for x in ip.get("/api/v1/models/m/saes").json()] == ["s1"]
        r = ip.post("/api/v1/models/m/saes/bad/browse", json={"book": "story.txt"})
        assert r.status_code == 409 and r.json()["detail"].startswith(
            "sparse autoencoder 'bad' cannot be loaded: "), r.text
    finally:
        shutil.rmtree(folder)


def test_a_symbolic_link_beside_the_model_is_never_followed(ip, with_sae):
    """models/m/sae/linked -> /tmp-anything: the workspace refuses the model's folder while it holds a link
    (409 naming it), for the SAEs and the steering directions alike; removed, all is served again."""
    link = ip.app.app.state.lmlab.ws.models / "m" / "sae" / "linked"
    link.symlink_to(link.parent / "s1", target_is_directory=True)
    try:
        for path in ("/api/v1/models/m/saes", "/api/v1/models/m/steering"):
            r = ip.get(path)
            assert r.status_code == 409 and "link" in r.json()["detail"], r.text
    finally:
        link.unlink()
    assert [x["name"] for x in ip.get("/api/v1/models/m/saes").json()] == ["s1"]
