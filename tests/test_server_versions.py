"""Versions of a model that nothing overwrites: training a trained model from scratch is refused until the
request says which (continue, or a new version); every run keeps its final model and checkpoints, and any of
them can be listed, downloaded, exported and generated from; a continued run records its parent and goes on
from its parent's step count. Real `lmlab train` processes on a tiny model."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest
import torch
from safetensors.torch import load_model
from test_server_support import FAST, TINY_MODEL, client, settings, upload, wait_run

from lmlab.lab.interp.steer import Direction
from lmlab.models import GenerationConfig, generate
from lmlab.models.io import load_pretrained

DONE = lambda r: r["status"] not in ("queued", "running")  # noqa: E731


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zipped_weights(r) -> tuple[str, bytes]:
    """(the folder name, model.safetensors) of a downloaded model zip."""
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    name = next(n for n in zf.namelist() if n.endswith("/model.safetensors"))
    return name.split("/")[0], zf.read(name)


def train(c, **req) -> dict:
    r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "log_every": 1, **FAST, **req})
    assert r.status_code == 201, r.text
    run = wait_run(c, r.json()["id"], DONE, f"run {r.json()['id']}")
    assert run["status"] == "completed", run
    return run


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Model tiny trained three times: run a (8 steps from scratch, checkpoints at 4 and 8), run b (6 steps,
    a new version from scratch), run c (4 steps continued from b)."""
    ws = tmp_path_factory.mktemp("ws")
    with client(settings(ws, memory_budget_bytes=2 * 2**30)) as c:
        assert upload(c).status_code == 201
        assert c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL}).status_code == 201
        assert c.post("/api/v1/models", json={"name": "other", **TINY_MODEL}).status_code == 201
        c.workspace = ws
        c.a = train(c, max_steps=8, save_every=4, seed=1)
        c.a_weights = (ws / "models" / "tiny" / "model.safetensors").read_bytes()
        # what a user saves beside the model stays through new weights; a speed measured for the old ones does not
        Direction(torch.ones(64), 1, {"method": "manual"}).save(ws / "models" / "tiny" / "steering" / "happy")
        (ws / "models" / "tiny" / "speed.json").write_text("{}")
        # from scratch on trained weights: refused, saying how to choose; nothing was queued
        r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 6, **FAST})
        c.refusal = (r.status_code, r.json().get("detail"), len(c.get("/api/v1/runs").json()))
        c.b = train(c, max_steps=6, save_every=3, seed=2, new_version=True)
        c.b_model = c.get("/api/v1/models/tiny").json()
        c.c = train(c, max_steps=4, save_every=0, init_from_trained=True)
        yield c


def test_training_a_trained_model_from_scratch_asks_first(lab):
    assert lab.refusal == (409, f"model 'tiny' already has trained weights (run {lab.a['id']}, 8 steps); continue "
                                "from them (init_from_trained) or train a new version from scratch (new_version): "
                                "either way the earlier version stays downloadable", 1)
    # an untrained model needs neither; a new version is a run from scratch, with no parent
    assert lab.b["init_from_trained"] is False and (lab.b["parent_run_id"], lab.b["step_offset"]) == (None, 0)
    assert (lab.b_model["trained_run_id"], lab.b_model["trained_steps"], lab.b_model["lineage"]) == (
        lab.b["id"], 6, [lab.b["id"]])


def test_new_weights_keep_what_was_saved_beside_the_model(lab):
    assert [d["name"] for d in lab.get("/api/v1/models/tiny/steering").json()] == ["happy"]
    folder = lab.workspace / "models" / "tiny"
    assert Direction.load(folder / "steering" / "happy").vector.tolist() == [1.0] * 64
    assert not (folder / "speed.json").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "steering",
                                                        "tokenizer.json", "training.json"]


def test_a_continued_run_goes_on_from_its_parents_steps(lab):
    a, b, c = lab.a["id"], lab.b["id"], lab.c["id"]
    assert (lab.c["parent_run_id"], lab.c["step_offset"]) == (b, 6)
    assert (lab.a["parent_run_id"], lab.a["step_offset"]) == (None, 0)
    page = lab.get(f"/api/v1/runs/{c}/metrics").json()
    assert page["step_offset"] == 6 and [m["step"] for m in page["metrics"]] == [1, 2, 3, 4]
    assert lab.get(f"/api/v1/runs/{a}/metrics").json()["step_offset"] == 0
    m = lab.get("/api/v1/models/tiny").json()
    assert (m["trained_run_id"], m["trained_steps"], m["lineage"]) == (c, 10, [c, b])


def test_every_run_keeps_its_versions(lab):
    a, b, c = lab.a["id"], lab.b["id"], lab.c["id"]
    got = [(v["run"], v["kind"], v["step"], v["steps"], v["current"])
           for v in lab.get("/api/v1/models/tiny/versions").json()]
    assert got == [(a, "train", 4, 4, False), (a, "train", 8, 8, False), (a, "train", None, 8, False),
                   (b, "train", 3, 3, False), (b, "train", 6, 6, False), (b, "train", None, 6, False),
                   (c, "train", 4, 10, False), (c, "train", None, 10, True)]
    assert lab.get("/api/v1/models/other/versions").json() == []
    assert lab.get("/api/v1/models/nope/versions").status_code == 404


def test_an_earlier_version_downloads_with_its_own_weights(lab, tmp_path):
    ws, a = lab.workspace, lab.a["id"]
    r = lab.get(f"/api/v1/models/tiny/download?run={a}")
    assert r.status_code == 200 and f"tiny-run{a}.zip" in r.headers["content-disposition"]
    folder, weights = zipped_weights(r)
    assert folder == f"tiny-run{a}" and sha(weights) == sha(lab.a_weights)
    assert sha(weights) != sha((ws / "models" / "tiny" / "model.safetensors").read_bytes())  # c's, now
    # a checkpoint is a whole model directory too: its weights, the run's tokenizer, the model's config
    r = lab.get(f"/api/v1/models/tiny/download?run={a}&step=4")
    assert r.status_code == 200 and f"tiny-run{a}-step4.zip" in r.headers["content-disposition"]
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    model, tok = load_pretrained(tmp_path / f"tiny-run{a}-step4")
    ckpt = ws / "runs" / f"run-{a}" / "checkpoints" / "step-4" / "model.safetensors"
    assert sha((tmp_path / f"tiny-run{a}-step4" / "model.safetensors").read_bytes()) == sha(ckpt.read_bytes())
    assert tok is not None and model.config.n_embd == load_pretrained(ws / "models" / "tiny")[0].config.n_embd
    # the current version is still the default
    _, weights = zipped_weights(lab.get("/api/v1/models/tiny/download"))
    assert sha(weights) == sha((ws / "models" / "tiny" / "model.safetensors").read_bytes())


def test_deleting_a_run_leaves_the_model_its_weights(lab, tmp_path):
    """The model's directory holds its own links to the final run's files (workspace.stage_dir)."""
    current = lab.workspace / "models" / "tiny" / "model.safetensors"
    final = lab.workspace / "runs" / f"run-{lab.c['id']}" / "final" / "model.safetensors"
    assert current.stat().st_ino == final.stat().st_ino and current.stat().st_nlink == 2


@pytest.mark.parametrize("query, status, detail", [
    ("run=999", 404, "run 999 not found"),
    ("run={other}", 404, "run {other} did not train model 'tiny'"),
    ("run={a}&step=5", 404, "run {a} has no checkpoint at step 5; it has 4, 8"),
    ("step=4", 422, "step needs run: the run whose checkpoint it is"),
])
def test_unknown_versions_are_refused(lab, query, status, detail):
    ids = {"a": lab.a["id"], "other": lab.c["id"]}
    model = "other" if "{other}" in query else "tiny"
    query, detail = query.format(**ids), detail.format(**ids).replace("'tiny'", f"'{model}'")
    for path in (f"/api/v1/models/{model}/download?{query}", f"/api/v1/models/{model}/export/hf?{query}"):
        r = lab.get(path)
        assert (r.status_code, r.json()["detail"]) == (status, detail), path
    body = {"model": model, "prompt": "x", **{k: int(v) for k, v in (kv.split("=") for kv in query.split("&"))}}
    r = lab.post("/api/v1/generate", json=body)
    assert (r.status_code, r.json()["detail"]) == (status, detail)


def test_generation_and_export_from_an_earlier_version(lab):
    ws, a = lab.workspace, lab.a["id"]
    # sampled with a seed: the text depends on the exact weights, so the three versions' texts differ
    cfg = {"max_new_tokens": 24, "temperature": 0.8, "top_k": 40, "seed": 5}
    texts = []
    for step in (4, None):  # a checkpoint: its weights under the run's model config and tokenizer
        r = lab.post("/api/v1/generate", json={"model": "tiny", "prompt": "Once upon", "run": a, "step": step, **cfg})
        assert r.status_code == 200, r.text
        model, tok = load_pretrained(ws / "runs" / f"run-{a}" / "final")
        if step is not None:
            load_model(model, str(ws / "runs" / f"run-{a}" / "checkpoints" / "step-4" / "model.safetensors"))
        texts.append(r.json()["text"])
        assert texts[-1] == generate(model, tok, "Once upon", GenerationConfig(**cfg))
    texts.append(lab.post("/api/v1/generate", json={"model": "tiny", "prompt": "Once upon", **cfg}).json()["text"])
    model, tok = load_pretrained(ws / "models" / "tiny")
    assert texts[-1] == generate(model, tok, "Once upon", GenerationConfig(**cfg))
    assert len(set(texts)) == 3, texts
    transformers = pytest.importorskip("transformers")
    r = lab.get(f"/api/v1/models/tiny/export/hf?run={a}")
    assert r.status_code == 200 and f"tiny-run{a}-hf.zip" in r.headers["content-disposition"]
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    zf.extractall(ws / "tmp-export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ws / "tmp-export" / f"tiny-run{a}-hf").eval()
    ours, tok = load_pretrained(ws / "runs" / f"run-{a}" / "final")
    x = torch.tensor([tok.encode("Once upon a time")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-4, atol=1e-4)
