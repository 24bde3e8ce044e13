"""The web app's HTTP API, in process: the AZR Model Trainer app's endpoints with exactly their shapes, every
/api/v1 endpoint, validation and limits, auth, the job queue, and a graceful restart. Training runs are real
`lmlab train` processes on a tiny model."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from test_server_support import (
    BOOK,
    FAST,
    TINY_MODEL,
    client,
    run_status,
    settings,
    sse_events,
    upload,
    wait_for,
    wait_run,
)

from lmlab.data.documents import normalize_text
from lmlab.models import GenerationConfig, ModelConfig, Transformer, generate, stream
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.server import Settings
from lmlab.server.db import MIGRATIONS, Database, migrate, schema_drift, schema_version


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A server with one book and one model trained for 12 steps (checkpoints every 4)."""
    ws = tmp_path_factory.mktemp("ws")
    s = settings(ws, max_jobs=2, max_upload_bytes=256 * 1024, memory_budget_bytes=2 * 2**30)
    with client(s) as c:
        assert upload(c).status_code == 201
        assert c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL}).status_code == 201
        assert c.post("/api/v1/models", json={"name": "blank", **TINY_MODEL}).status_code == 201  # never trained
        r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 12, "save_every": 4,
                                         "eval_every": 6, "log_every": 1, **FAST})
        assert r.status_code == 201, r.text
        run = wait_run(c, r.json()["id"], lambda r: r["status"] not in ("queued", "running"), "the first run")
        assert run["status"] == "completed", run
        c.workspace = ws
        c.run_id = run["id"]
        yield c


# ---- the AZR Model Trainer app's endpoints -----------------------------------------------------------

SEED_MODEL = {"name": "seed-model", "vocab_size": 300, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64,
              "max_seq_len": 32}


def test_seed_root_serves_the_ui(lab):
    r = lab.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in r.text
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    for asset in ("app.js", "charts.js", "i18n.js", "app.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):
        assert lab.get(f"/static/{asset}").status_code == 200


def test_every_static_file_ships_with_the_package():
    """The UI's files, vendored libraries in static/vendor/ among them, are in the wheel: pyproject's
    package-data globs (as setuptools reads them, relative to the package) match every file under static/."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lmlab"]
    package = root / "src" / "lmlab"
    shipped = {p for g in globs for p in package.glob(g) if p.is_file()}
    files = {p for p in (package / "server" / "static").rglob("*") if p.is_file()}
    assert files - shipped == set() and (package / "server/static/vendor/uPlot.iife.min.js") in files


def test_seed_create_model_shape_and_parameter_count(lab):
    r = lab.post("/create_model", json=SEED_MODEL)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"status", "message", "parameters", "config"}
    assert body["status"] == "success" and "seed-model" in body["message"]
    assert body["config"] == SEED_MODEL
    # the count is the real model's: build the app's architecture (the gpt family) and count
    cfg = ModelConfig.from_dict({k: v for k, v in SEED_MODEL.items() if k != "name"} | {"family": "gpt"})
    assert body["parameters"] == sum(p.numel() for p in Transformer(cfg).parameters())
    assert lab.post("/create_model", json=SEED_MODEL).status_code == 409
    assert lab.post("/create_model", json={**SEED_MODEL, "name": "SEED-model"}).status_code == 409  # case twin
    defaults = lab.post("/create_model", json={"name": "seed-defaults"}).json()
    assert defaults["config"] == {"name": "seed-defaults", "vocab_size": 8000, "d_model": 256, "num_layers": 6,
                                  "num_heads": 8, "d_ff": 1024, "max_seq_len": 256}
    bad = lab.post("/create_model", json={**SEED_MODEL, "name": "odd", "num_heads": 3})
    assert bad.status_code == 422 and "divisible" in bad.text


@pytest.mark.parametrize("path", ["/api/v1/models", "/create_model"])
def test_a_new_model_never_takes_a_folder_it_did_not_make(lab, path):
    """A model folder the index does not know (copied in while the server runs: the next start indexes it)
    is the user's: creating that name, through the API or the seed's endpoint (one service makes both), is
    refused and the folder kept (its weights were deleted); once it is gone, the name starts from a fresh one."""
    name = "left" + path.replace("/", "-")
    folder = lab.workspace / "models" / name
    shutil.copytree(lab.workspace / "models" / "tiny", folder)  # a whole trained model's files
    files = sorted(p.name for p in folder.iterdir())
    body = {"name": name, **TINY_MODEL} if path.startswith("/api") else {**SEED_MODEL, "name": name}
    r = lab.post(path, json=body)
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (f"models/{name}/ exists in the workspace though no model of that name is indexed "
                                  "(a server started again indexes it); remove it")
    assert sorted(p.name for p in folder.iterdir()) == files and "model.safetensors" in files
    assert lab.get(f"/api/v1/models/{name}").status_code == 404
    shutil.rmtree(folder)
    r = lab.post(path, json=body)
    assert r.status_code == (201 if path.startswith("/api") else 200), r.text
    model = lab.get(f"/api/v1/models/{name}").json()
    assert model["trained"] is False and model["trained_run_id"] is None
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert ModelConfig.load(folder / "config.json").to_dict() == model["config"]


def test_seed_upload_books_models(lab):
    r = lab.post("/upload_book", files={"file": ("seed book.txt", BOOK.encode(), "text/plain")})
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "success", "filename": "seed book.txt", "path": "books/seed book.txt"}
    books = lab.get("/books").json()
    assert set(books) == {"books"} and {"tales.txt", "seed book.txt"} <= set(books["books"])
    models = lab.get("/models").json()
    assert set(models) == {"models"}
    seed = next(m for m in models["models"] if m["name"] == "seed-model")
    assert seed == {"name": "seed-model", "config": SEED_MODEL}
    tiny = next(m for m in models["models"] if m["name"] == "tiny")
    assert tiny["config"] == {"name": "tiny", "vocab_size": 300, "d_model": 64, "num_layers": 2, "num_heads": 4,
                              "d_ff": 256, "max_seq_len": 32}


def test_seed_train_status_generate_download(lab):
    req = {"model_name": "seed-model", "book_file": "seed book.txt", "max_iterations": 6, "batch_size": 4,
           "learning_rate": 0.001, "save_every": 3}
    r = lab.post("/train", json=req)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"status", "message", "config"} and r.json()["status"] == "success"
    assert r.json()["config"] == req
    assert lab.post("/train", json=req).status_code == 400  # that model is already training
    assert lab.post("/train", json={**req, "model_name": "nope"}).status_code == 404
    assert lab.post("/train", json={**req, "model_name": "tiny", "book_file": "nope.txt"}).status_code == 404
    keys = {"is_training", "current_iteration", "max_iterations", "current_loss", "current_reward", "model_name",
            "history"}
    status = lab.get("/training_status").json()
    assert keys <= set(status) and status["model_name"] == "seed-model" and status["max_iterations"] == 6

    status = wait_for(lambda: (lambda s: s if not s["is_training"] else None)(lab.get("/training_status").json()),
                      what="the seed run")
    assert set(status) == keys, status
    assert status["current_iteration"] == 6 and status["current_reward"] == 0.0
    assert status["current_loss"] == status["history"][-1]["loss"] > 0
    assert [h["iteration"] for h in status["history"]] == list(range(1, 7))
    assert set(status["history"][0]) == {"iteration", "loss", "reward", "lr", "timestamp"}

    g = lab.post("/generate", json={"model_name": "seed-model", "prompt": "Once upon", "max_length": 10})
    assert g.status_code == 200, g.text
    assert set(g.json()) == {"status", "prompt", "generated_text"}
    assert g.json()["generated_text"].startswith("Once upon")  # the seed returned prompt + continuation
    assert lab.post("/generate", json={"model_name": "blank", "prompt": "x"}).status_code == 409
    assert lab.post("/generate", json={"model_name": "nope", "prompt": "x"}).status_code == 404

    d = lab.get("/download_model/seed-model")
    assert d.status_code == 200 and d.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(d.content)).namelist()
    assert {"seed-model/config.json", "seed-model/model.safetensors", "seed-model/tokenizer.json"} <= set(names)
    assert lab.get("/download_model/blank").status_code == 409  # nothing trained to download
    assert lab.get("/download_model/nope").status_code == 404


# ---- /api/v1: books ---------------------------------------------------------------------------------

def test_books_upload_list_detail_preview_delete(lab):
    assert upload(lab).status_code == 409  # exists
    r = lab.post("/api/v1/books?overwrite=true", files={"file": ("tales.txt", BOOK.encode(), "text/plain")})
    assert r.status_code == 201
    cp = "Жили-были старик со старухой. " * 40
    r = upload(lab, "ru.txt", cp.encode("cp1251"))
    assert r.status_code == 201, r.text
    assert r.json()["encoding"] == "cp1251" and r.json()["chars"] == len(normalize_text(cp))
    assert upload(lab, "koi.txt", cp.encode("koi8_r")).json()["encoding"] == "koi8_r"
    assert upload(lab, "bom.md", "\ufeffhello world".encode()).json()["encoding"] == "utf-8-sig"
    names = [b["name"] for b in lab.get("/api/v1/books").json()]
    assert {"tales.txt", "ru.txt", "koi.txt", "bom.md"} <= set(names)
    d = lab.get("/api/v1/books/ru.txt").json()
    assert d["words"] == len(cp.split()) and d["unique_chars"] == len(set(normalize_text(cp)))
    p = lab.get("/api/v1/books/ru.txt/preview?chars=10").json()
    assert p == {"name": "ru.txt", "text": cp[:10], "truncated": True}
    assert lab.delete("/api/v1/books/koi.txt").status_code == 204
    assert lab.get("/api/v1/books/koi.txt").status_code == 404
    assert lab.delete("/api/v1/books/koi.txt").status_code == 404


@pytest.mark.parametrize("name, data, status", [
    ("empty.txt", b"", 400),
    ("noise.txt", bytes(range(256)) * 64, 422),            # not text in any supported encoding
    ("book.exe", b"hello", 400),                            # not a book suffix
    ("../evil.txt", b"hello", 400),                         # traversal
    ("..\\evil.txt", b"hello", 400),
    ("/etc/passwd.txt", b"hello", 400),
    (".hidden.txt", b"hello", 400),
    ("", b"hello", 422),                                    # no file name at all
])
def test_book_upload_is_validated(lab, name, data, status):
    r = lab.post("/api/v1/books", files={"file": (name, data, "text/plain")})
    assert r.status_code == status, (name, r.text)
    assert not (lab.workspace.parent / "evil.txt").exists()


def test_oversized_upload_is_refused_before_it_is_stored(lab):
    big = b"a" * (256 * 1024 + 1)  # the module's limit is 256 KiB
    r = lab.post("/api/v1/books", files={"file": ("big.txt", big, "text/plain")})
    assert r.status_code == 413
    assert r.json()["detail"] == "big.txt is larger than this server's upload limit of 0.25 MiB"  # no CLI flag
    r = lab.post("/upload_book", files={"file": ("big.txt", b"a" * (3 * 2**20), "text/plain")})
    assert r.status_code == 413  # refused by Content-Length, before the body is read
    assert "big.txt" not in lab.get("/books").json()["books"]
    assert not list((lab.workspace / "tmp").iterdir())  # no partial upload left behind
    # a JSON body is limited too
    assert lab.post("/api/v1/models/estimate", content=b"{" + b" " * (2 << 20) + b"}",
                    headers={"content-type": "application/json"}).status_code == 413


DOTS = "must not start with '.', '-' or a space, nor end with '.' or a space"


@pytest.mark.parametrize("path, status, detail", [
    # an encoded slash or a bare `..` never reaches a handler: no route has that shape
    ("/api/v1/books/..%2F..%2Fetc%2Fpasswd", 404, "Not Found"), ("/api/v1/books/..", 404, "Not Found"),
    ("/api/v1/models/..%2F..%2Flmlab.db/download", 404, "Not Found"),
    # what does reach one is refused by the name check, saying why
    ("/api/v1/books/%2e%2e", 400, f"book file name '..' {DOTS}"),
    ("/download_model/%2e%2e", 400, f"model name '..' {DOTS}"),
    ("/api/v1/books/a%00b.txt", 400, "book file name 'a\\x00b.txt' must not contain a NUL character"),
    ("/api/v1/models/.hidden", 400, f"model name '.hidden' {DOTS}"),
])
def test_path_traversal_is_refused(lab, path, status, detail):
    r = lab.get(path)
    assert (r.status_code, r.json()["detail"]) == (status, detail), path


def test_traversal_in_bodies_is_refused(lab):
    assert lab.post("/api/v1/models", json={"name": "../x", **TINY_MODEL}).status_code == 400
    assert lab.post("/create_model", json={**SEED_MODEL, "name": "../../x"}).status_code == 400
    r = lab.post("/api/v1/runs", json={"model": "tiny", "books": ["../../lmlab.db"], "max_steps": 1})
    assert r.status_code == 400
    r = lab.post("/train", json={"model_name": "tiny", "book_file": "../lmlab.db"})
    assert r.status_code == 400


# ---- /api/v1: models --------------------------------------------------------------------------------

def test_presets_and_estimate_match_the_config(lab):
    presets = lab.get("/api/v1/presets").json()
    assert {p["name"] for p in presets} >= {"gpt2-tiny", "llama-small", "gpt-medium"}
    for p in presets:
        assert p["parameters"] == ModelConfig.preset(p["name"]).num_parameters()
    e = lab.post("/api/v1/models/estimate", json={"preset": "llama-tiny", "vocab_size": 512, "batch_size": 8}).json()
    cfg = ModelConfig.preset("llama-tiny", vocab_size=512)
    assert e["parameters"] == cfg.num_parameters() == sum(p.numel() for p in Transformer(cfg).parameters())
    assert e["training_bytes"] == cfg.memory_estimate(8, cfg.block_size)["total"]
    assert e["fits"] is True and e["reason"] is None
    custom = lab.post("/api/v1/models/estimate", json={"family": "llama", "n_layer": 3, "n_head": 4, "n_kv_head": 2,
                                                       "n_embd": 64, "block_size": 64, "vocab_size": 400}).json()
    assert custom["config"]["n_kv_head"] == 2 and custom["config"]["mlp"] == "swiglu"


def test_model_create_get_list_delete_and_refusals(lab):
    r = lab.post("/api/v1/models", json={"name": "Модель-1", "family": "llama", "n_layer": 2, "n_head": 2,
                                         "n_embd": 32, "block_size": 32, "vocab_size": 64, "tokenizer_kind": "char"})
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["name"] == "Модель-1" and m["tokenizer_kind"] == "char" and m["trained"] is False
    assert m["parameters"] == ModelConfig.from_dict(m["config"]).num_parameters()
    assert lab.get("/api/v1/models/Модель-1").json()["config"] == m["config"]
    assert "Модель-1" in [x["name"] for x in lab.get("/api/v1/models").json()]
    assert lab.post("/api/v1/models", json={"name": "Модель-1", **TINY_MODEL}).status_code == 409
    # a name that differs only in case would share the folder on macOS and Windows
    r = lab.post("/api/v1/models", json={"name": "мОДЕЛЬ-1", **TINY_MODEL})
    assert r.status_code == 409 and "only in letter case" in r.json()["detail"], r.text
    assert lab.get("/api/v1/models/Модель-1/download").status_code == 409
    assert lab.delete("/api/v1/models/Модель-1").status_code == 204
    assert lab.get("/api/v1/models/Модель-1").status_code == 404
    # invalid configurations: the config's own message
    r = lab.post("/api/v1/models", json={"name": "x", "family": "gpt2", "n_embd": 30, "n_head": 4})
    assert r.status_code == 422 and "divisible" in r.json()["detail"]
    r = lab.post("/api/v1/models", json={"name": "x", "preset": "gpt2-tiny", "vocab_size": 100})
    assert r.status_code == 422 and "260" in r.json()["detail"]
    assert lab.post("/api/v1/models", json={"name": "x", "preset": "nope-tiny"}).status_code == 422
    assert lab.post("/api/v1/models", json={"name": "x", "preset": "gpt2-tiny", "bogus": 1}).status_code == 422


def test_models_over_the_memory_budget_are_refused_with_a_reason(lab):
    huge = {"family": "gpt2", "n_layer": 48, "n_head": 16, "n_embd": 2048, "block_size": 2048, "vocab_size": 50000}
    e = lab.post("/api/v1/models/estimate", json=huge).json()
    assert e["fits"] is False and "memory budget" in e["reason"] and "GiB" in e["reason"]
    r = lab.post("/api/v1/models", json={"name": "huge", **huge})
    assert r.status_code == 422 and "memory budget" in r.json()["detail"]
    r = lab.post("/create_model", json={"name": "huge", "d_model": 2048, "num_layers": 48, "num_heads": 16,
                                        "d_ff": 8192, "max_seq_len": 2048, "vocab_size": 50000})
    assert r.status_code == 422 and "memory budget" in r.json()["detail"]
    # a model that fits can still be refused for a batch that does not
    assert lab.post("/api/v1/models", json={"name": "wide", "preset": "gpt2-small"}).status_code == 201
    r = lab.post("/api/v1/runs", json={"model": "wide", "books": ["tales.txt"], "max_steps": 1, "batch_size": 4096})
    assert r.status_code == 422 and "batch 4096" in r.json()["detail"]


# ---- /api/v1: runs ----------------------------------------------------------------------------------

def test_run_detail_metrics_log_and_events_agree_with_the_run_directory(lab):
    run = run_status(lab, lab.run_id)
    assert run["status"] == "completed" and run["stop_reason"] == "max_steps" and run["exit_code"] == 0
    assert run["current_step"] == 12 and run["progress"] == 1.0 and run["checkpoint_step"] == 12
    assert run["params"]["save_every"] == 4 and run["can_resume"] is False
    lines = [json.loads(x) for x in (lab.workspace / "runs" / f"run-{lab.run_id}" / "metrics.jsonl").read_text()
             .splitlines()]
    page = lab.get(f"/api/v1/runs/{lab.run_id}/metrics").json()
    got = page["metrics"]
    assert [m["step"] for m in got] == [m["step"] for m in lines] == list(range(1, 13))
    for a, b in zip(got, lines):
        assert a["loss"] == pytest.approx(b["loss"]) and a["lr"] == pytest.approx(b["lr"])
    assert [m["step"] for m in got if "val_loss" in m] == [6, 12]
    assert run["last_loss"] == pytest.approx(lines[-1]["loss"])
    assert run["best_val_loss"] == pytest.approx(min(m["val_loss"] for m in lines if "val_loss" in m))
    assert lab.get(f"/api/v1/runs/{lab.run_id}/metrics?after_id={got[-2]['id']}").json()["metrics"] == got[-1:]
    log = lab.get(f"/api/v1/runs/{lab.run_id}/log").json()["lines"]
    assert any("lmlab train" in ln for ln in log) and any("stopped after 12 steps" in ln for ln in log)
    # SSE: the history, the status, then the end
    events = sse_events(lab, f"/api/v1/runs/{lab.run_id}/events")
    assert [d["step"] for e, d in events if e == "metric"] == list(range(1, 13))
    assert [e for e, _ in events][-2:] == ["status", "end"] and events[-2][1]["status"] == "completed"
    # the model directory now holds the final weights
    m = lab.get("/api/v1/models/tiny").json()
    assert m["trained"] is True and m["trained_run_id"] == lab.run_id and m["trained_steps"] == 12
    assert lab.post(f"/api/v1/runs/{lab.run_id}/cancel").status_code == 409
    assert lab.post(f"/api/v1/runs/{lab.run_id}/resume").status_code == 409
    assert lab.get("/api/v1/runs/999999").status_code == 404
    assert lab.get("/api/v1/runs/999999/events").status_code == 404
    assert lab.get("/api/v1/runs?model=tiny").json()[-1]["id"] == lab.run_id


def test_run_requests_are_validated(lab):
    base = {"model": "tiny", "books": ["tales.txt"], "max_steps": 5}
    assert lab.post("/api/v1/runs", json={**base, "model": "nope"}).status_code == 404
    assert lab.post("/api/v1/runs", json={**base, "books": ["nope.txt"]}).status_code == 404
    assert lab.post("/api/v1/runs", json={**base, "books": []}).status_code == 422
    assert lab.post("/api/v1/runs", json={**base, "books": ["tales.txt", "tales.txt"]}).status_code == 422
    r = lab.post("/api/v1/runs", json={**base, "seq_len": 64})
    assert r.status_code == 422 and "context" in r.json()["detail"]
    r = lab.post("/api/v1/runs", json={**base, "min_lr": 1.0, "lr": 0.1})
    assert r.status_code == 422 and "min_lr" in r.json()["detail"]
    assert lab.post("/api/v1/runs", json={**base, "nonsense": 1}).status_code == 422
    assert lab.post("/api/v1/runs", json={**base, "init_from_trained": True, "model": "blank"}).status_code == 409


def test_queue_cancel_and_resume(tmp_path):
    """One job at a time: the second run waits in the queue; cancelling it never starts it; cancelling the
    first stops it at a checkpoint; resuming continues from that checkpoint to the new max_steps."""
    with client(settings(tmp_path, max_jobs=1)) as c:
        upload(c)
        c.post("/api/v1/models", json={"name": "a", **TINY_MODEL})
        c.post("/api/v1/models", json={"name": "b", **TINY_MODEL})
        long = {"books": ["tales.txt"], "max_steps": 100000, "save_every": 2, "log_every": 1, "eval_every": 0, **FAST}
        a = c.post("/api/v1/runs", json={"model": "a", **long}).json()
        b = c.post("/api/v1/runs", json={"model": "b", **long}).json()
        assert b["status"] == "queued"
        wait_run(c, a["id"], lambda r: r["status"] == "running" and r["current_step"] >= 3, "run a to train")
        b = run_status(c, b["id"])
        assert b["status"] == "queued" and b["queue_position"] == 0 and b["launches"] == 0
        assert c.post(f"/api/v1/runs/{b['id']}/cancel").json()["status"] == "cancelled"
        assert c.post(f"/api/v1/runs/{b['id']}/resume").status_code == 409  # no checkpoint: never ran
        assert c.post(f"/api/v1/runs/{a['id']}/cancel").json()["cancel_requested"] is True
        a = wait_run(c, a["id"], lambda r: r["status"] == "cancelled", "run a to stop")
        assert a["can_resume"] and a["checkpoint_step"] >= 2 and a["exit_code"] == 130
        assert run_status(c, b["id"])["launches"] == 0
        step = a["checkpoint_step"]
        assert c.post(f"/api/v1/runs/{a['id']}/resume", json={"max_steps": step}).status_code == 409
        r = c.post(f"/api/v1/runs/{a['id']}/resume", json={"max_steps": step + 3})
        assert r.status_code == 200 and r.json()["status"] == "queued"
        a = wait_run(c, a["id"], lambda r: r["status"] not in ("queued", "running"), "the resumed run")
        assert a["status"] == "completed" and a["resumed_from_step"] == step and a["launches"] == 2
        steps = [m["step"] for m in c.get(f"/api/v1/runs/{a['id']}/metrics?limit=100000").json()["metrics"]]
        assert steps == list(range(1, step + 4))  # one line per step: nothing lost, nothing twice
        assert c.delete(f"/api/v1/runs/{b['id']}").status_code == 204
        assert not (tmp_path / "runs" / f"run-{b['id']}").exists()
        assert c.delete("/api/v1/models/a").status_code == 204
        assert not (tmp_path / "runs" / f"run-{a['id']}").exists()


def test_stopping_the_server_interrupts_runs_and_a_new_server_resumes_them(tmp_path):
    s = settings(tmp_path)
    with client(s) as c:
        upload(c)
        c.post("/api/v1/models", json={"name": "m", **TINY_MODEL})
        # wsd and a val_fraction: the resume command carries the schedule and leaves the data flags out
        run = c.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 100000, "save_every": 2,
                                           "log_every": 1, "eval_every": 0, "schedule": "wsd", "val_fraction": 0.1,
                                           **FAST}).json()
        wait_run(c, run["id"], lambda r: r["current_step"] >= 3, "training to start")
    # leaving the block shut the app down: the child was asked to checkpoint and exit
    with client(s) as c:
        r = run_status(c, run["id"])
        assert r["status"] == "interrupted" and "server was stopped" in r["error"] and r["can_resume"]
        step = r["checkpoint_step"]
        assert step >= 2
        c.post(f"/api/v1/runs/{run['id']}/resume", json={"max_steps": step + 2})
        r = wait_run(c, run["id"], lambda r: r["status"] not in ("queued", "running"), "the resumed run")
        assert r["status"] == "completed" and r["resumed_from_step"] == step and r["current_step"] == step + 2


# ---- /api/v1: generation ----------------------------------------------------------------------------

def test_generation_matches_the_library(lab):
    model, tok = load_pretrained(lab.workspace / "models" / "tiny")
    req = {"model": "tiny", "prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0.9, "top_k": 20,
           "top_p": 0.95, "repetition_penalty": 1.1, "seed": 7}
    a = lab.post("/api/v1/generate", json=req).json()
    b = lab.post("/api/v1/generate", json=req).json()
    assert a["text"] == b["text"]  # seeded: reproducible
    want = generate(model, tok, req["prompt"], GenerationConfig(max_new_tokens=24, temperature=0.9, top_k=20,
                                                                 top_p=0.95, repetition_penalty=1.1, seed=7))
    assert a["text"] == want and a["prompt"] == req["prompt"] and 0 < a["new_tokens"] <= 24
    greedy = lab.post("/api/v1/generate", json={**req, "do_sample": False, "seed": None}).json()["text"]
    assert greedy == generate(model, tok, req["prompt"], GenerationConfig(max_new_tokens=24, do_sample=False,
                                                                          repetition_penalty=1.1))
    beams = lab.post("/api/v1/generate", json={**req, "num_beams": 3, "max_new_tokens": 8}).json()["text"]
    assert beams == generate(model, tok, req["prompt"], GenerationConfig(max_new_tokens=8, num_beams=3,
                                                                         temperature=0.9, top_k=20, top_p=0.95,
                                                                         repetition_penalty=1.1, seed=7))
    # streaming: the pieces add up to the same text as the library's stream
    events = sse_events(lab, "/api/v1/generate/stream", "POST", until="done", json=req)
    pieces = [d["text"] for e, d in events if e == "token"]
    assert events[-1][0] == "done", events[-1]
    done = events[-1][1]
    expected = list(stream(model, tok, req["prompt"], GenerationConfig(max_new_tokens=24, temperature=0.9, top_k=20,
                                                                       top_p=0.95, repetition_penalty=1.1, seed=7)))
    assert pieces == expected and done["text"] == "".join(expected) == a["text"]
    assert done["new_tokens"] == a["new_tokens"]
    exact = lab.post("/api/v1/generate", json={**req, "stop_at_eos": False, "max_new_tokens": 16}).json()
    assert exact["new_tokens"] == 16
    stop = lab.post("/api/v1/generate", json={**req, "stop_strings": ["e"]}).json()["text"]
    assert "e" not in stop


@pytest.mark.parametrize("change, status", [
    ({"model": "nope"}, 404), ({"model": "blank"}, 409), ({"top_p": 0}, 422), ({"temperature": -1}, 422),
    ({"max_new_tokens": 0}, 422), ({"max_new_tokens": 100000}, 422), ({"stop_strings": [""]}, 422),
    ({"model": "../tiny"}, 400),
])
def test_generation_refusals(lab, change, status):
    r = lab.post("/api/v1/generate", json={"model": "tiny", "prompt": "x", **change})
    assert r.status_code == status, r.text


def test_streaming_refuses_beams(lab):
    r = lab.post("/api/v1/generate/stream", json={"model": "tiny", "prompt": "x", "num_beams": 2})
    assert r.status_code == 422 and "num_beams" in r.json()["detail"]


def test_model_download_is_a_loadable_model_directory(lab, tmp_path):
    r = lab.get("/api/v1/models/tiny/download")
    assert r.status_code == 200 and "tiny.zip" in r.headers["content-disposition"]
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    model, tok = load_pretrained(tmp_path / "tiny")
    ref, _ = load_pretrained(lab.workspace / "models" / "tiny")
    x = torch.tensor([tok.encode("Once upon a time")])
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)


def test_model_export_for_other_tools(lab, tmp_path):
    transformers = pytest.importorskip("transformers")
    r = lab.get("/api/v1/models/tiny/export/hf")
    assert r.status_code == 200, r.text
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-hf").eval()
    ours, tok = load_pretrained(lab.workspace / "models" / "tiny")
    x = torch.tensor([tok.encode("Once upon a time")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-4, atol=1e-4)
    g = lab.get("/api/v1/models/tiny/export/gguf?dtype=f16")
    try:
        import gguf  # noqa: F401
        assert g.status_code == 200 and g.content[:4] == b"GGUF"
    except ImportError:
        assert g.status_code == 409 and "gguf" in g.json()["detail"]
    assert lab.get("/api/v1/models/blank/export/hf").status_code == 409  # untrained
    assert lab.get("/api/v1/models/tiny/export/onnx").status_code == 422
    assert not list((lab.workspace / "tmp").iterdir())  # temporary exports are removed


def foreign_vocabulary_model(path: Path) -> Path:
    """What `lmlab import hf` makes of a GPT-2-like checkpoint whose ids 0..3 are ordinary bytes: config.json and
    the weights, the checkpoint's own tokenizer files kept in hf_tokenizer/ (no tokenizer.json beside them)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([BOOK], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>"])
    (path / "hf_tokenizer").mkdir(parents=True)
    tok.save(str(path / "hf_tokenizer" / "tokenizer.json"))
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (path / "hf_tokenizer" / "tokenizer_config.json").write_text(json.dumps(specials))
    torch.manual_seed(0)
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=tok.get_vocab_size(), block_size=32, pad_token_id=None)
    return save_pretrained(path, Transformer(cfg))


def test_a_model_with_its_own_tokenizer_exports_and_downloads_as_the_cli_exports_it(tmp_path):
    """A model imported with a vocabulary that is not lmlab's keeps its tokenizer in hf_tokenizer/: the server's
    exports are the CLI's, byte for byte, and its download carries that folder; a model with no tokenizer at all
    is a 409 that names the model (not the server's temporary folder)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from lmlab.interop import export_gguf, export_hf
    ws = tmp_path / "ws"
    imported = foreign_vocabulary_model(ws / "models" / "imp")
    save_pretrained(ws / "models" / "bare", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=300)))
    export_gguf(imported, tmp_path / "cli.gguf")
    export_hf(imported, tmp_path / "cli-hf")
    with client(settings(ws)) as c:
        g = c.get("/api/v1/models/imp/export/gguf")
        assert g.status_code == 200, g.text
        assert g.content == (tmp_path / "cli.gguf").read_bytes()
        h = c.get("/api/v1/models/imp/export/hf")
        assert h.status_code == 200, h.text
        zipfile.ZipFile(io.BytesIO(h.content)).extractall(tmp_path / "web")
        cli_files = sorted(p.name for p in (tmp_path / "cli-hf").iterdir())
        assert sorted(p.name for p in (tmp_path / "web" / "imp-hf").iterdir()) == cli_files
        for name in cli_files:
            assert (tmp_path / "web" / "imp-hf" / name).read_bytes() == (tmp_path / "cli-hf" / name).read_bytes()
        d = c.get("/api/v1/models/imp/download")
        assert d.status_code == 200, d.text
        assert sorted(zipfile.ZipFile(io.BytesIO(d.content)).namelist()) == [
            "imp/config.json", "imp/hf_tokenizer/tokenizer.json", "imp/hf_tokenizer/tokenizer_config.json",
            "imp/model.safetensors"]
        zipfile.ZipFile(io.BytesIO(d.content)).extractall(tmp_path / "downloaded")
        export_gguf(tmp_path / "downloaded" / "imp", tmp_path / "downloaded.gguf")
        assert (tmp_path / "downloaded.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()
        for fmt in ("gguf", "hf"):
            r = c.get(f"/api/v1/models/bare/export/{fmt}")
            assert r.status_code == 409 and r.json()["detail"] == ("model 'bare' has no tokenizer.json: a model "
                                                                   "without a tokenizer cannot be exported")
    assert not list((ws / "tmp").iterdir())


def test_info(lab):
    info = lab.get("/api/v1/info").json()
    assert info["max_upload_bytes"] == 256 * 1024 and info["memory_budget_bytes"] == 2 * 2**30
    assert info["schema_version"] == MIGRATIONS[-1][0] and ".txt" in info["book_suffixes"]
    assert "gpt2-tiny" in info["presets"] and info["auth"] is False
    assert lab.get("/docs").status_code == 200 and "swagger" in lab.get("/docs").text.lower()
    paths = lab.get("/openapi.json").json()["paths"]
    assert "/api/v1/runs/{run_id}/resume" in paths and "/create_model" in paths


# ---- auth and hosts ---------------------------------------------------------------------------------

TOKEN = "s3cret-token-for-tests"


def test_api_token_is_checked_on_every_endpoint(tmp_path):
    with client(settings(tmp_path, api_token=TOKEN)) as c:
        for path in ("/", "/api/v1/info", "/books", "/training_status", "/static/app.js", "/docs", "/openapi.json",
                     "/api/v1/models/x/download", "/api/v1/runs/1/events"):
            r = c.get(path)
            assert r.status_code == 401, path
        assert c.post("/upload_book", files={"file": ("a.txt", b"hello", "text/plain")}).status_code == 401
        assert c.get("/api/v1/info", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert c.get("/api/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get(f"/api/v1/info?token={TOKEN}").status_code == 200
        # opening the UI with ?token= sets an HttpOnly cookie that EventSource and downloads then carry
        r = c.get(f"/?token={TOKEN}")
        assert r.status_code == 200 and "HttpOnly" in r.headers["set-cookie"]
        assert c.get("/static/app.js").status_code == 200 and c.get("/books").status_code == 200
        c.cookies.clear()
        assert c.get("/books").status_code == 401
        # with a token, any Host may be used (the token is the guard)
        assert c.get("/api/v1/info", headers={"Authorization": f"Bearer {TOKEN}", "Host": "lab.example"}
                     ).status_code == 200


def test_without_a_token_only_loopback_host_names_are_served(tmp_path):
    with client(settings(tmp_path)) as c:
        assert c.get("/api/v1/info").status_code == 200
        assert c.get("/api/v1/info", headers={"Host": "localhost:8000"}).status_code == 200
        assert c.get("/api/v1/info", headers={"Host": "[::1]:8000"}).status_code == 200
        r = c.get("/api/v1/info", headers={"Host": "attacker.example"})  # DNS rebinding
        assert r.status_code == 400 and "not allowed" in r.json()["detail"]


def test_files_put_into_the_workspace_are_indexed(tmp_path):
    """A book copied into books/ and a model directory from `lmlab train` appear after a restart."""
    from lmlab.models.io import save_pretrained
    from lmlab.tokenizers import Tokenizer
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "копия.txt").write_text(BOOK, encoding="utf-8")
    (tmp_path / "books" / ".DS_Store").write_bytes(b"\0\1")
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=100)
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=100, n_layer=1)
    save_pretrained(tmp_path / "models" / "from-cli", Transformer(cfg), tok)
    with client(settings(tmp_path)) as c:
        assert [b["name"] for b in c.get("/api/v1/books").json()] == ["копия.txt"]
        m = c.get("/api/v1/models/from-cli").json()
        assert m["trained"] and m["tokenizer_kind"] == "char" and m["config"] == cfg.to_dict()
        assert c.post("/api/v1/generate", json={"model": "from-cli", "prompt": "a", "max_new_tokens": 3}
                      ).status_code == 200
    (tmp_path / "books" / "копия.txt").unlink()
    with client(settings(tmp_path)) as c:
        assert c.get("/api/v1/books").json() == []


def test_names_copied_in_another_unicode_form_are_indexed_in_nfc(tmp_path):
    """macOS writes "é" decomposed (NFD): such a book or model was listed but could be neither opened nor
    deleted (the API looks names up in NFC), and one odd dataset name failed the whole dataset listing."""
    import unicodedata

    from lmlab.models.io import save_pretrained
    from lmlab.tokenizers import Tokenizer
    nfd = lambda s: unicodedata.normalize("NFD", s)  # noqa: E731
    for folder in ("books", "datasets"):
        (tmp_path / folder).mkdir()
    (tmp_path / "books" / nfd("café.txt")).write_text(BOOK, encoding="utf-8")
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=100)
    save_pretrained(tmp_path / "models" / nfd("modèle"), Transformer(ModelConfig.preset(
        "gpt2-tiny", vocab_size=100, n_layer=1)), tok)
    line = '{"prompt": "2+3=", "chosen": "5.", "rejected": "6."}\n'
    for name in (nfd("données.jsonl"), "my data?.jsonl"):
        (tmp_path / "datasets" / name).write_text(line, encoding="utf-8")
    with client(settings(tmp_path)) as c:
        assert [b["name"] for b in c.get("/api/v1/books").json()] == ["café.txt"]
        assert c.get("/api/v1/books/café.txt").status_code == 200
        assert c.get("/api/v1/models/modèle").json()["trained"] is True
        r = c.get("/api/v1/datasets")
        assert r.status_code == 200 and [d["name"] for d in r.json()] == ["données.jsonl"]
        # the names typed decomposed (a copied name, a Mac's input) are the same book and model: they were 404s
        assert c.get("/api/v1/books/" + nfd("café.txt")).json()["name"] == "café.txt"
        assert c.get("/api/v1/models/" + nfd("modèle")).json()["trained"] is True
        assert c.delete("/api/v1/books/café.txt").status_code == 204
        assert c.delete("/api/v1/models/modèle").status_code == 204
    assert sorted(p.name for p in (tmp_path / "books").iterdir()) == []
    assert not (tmp_path / "models" / "modèle").exists() and not (tmp_path / "models" / nfd("modèle")).exists()


def test_one_server_per_workspace(tmp_path):
    with client(settings(tmp_path)):
        with pytest.raises(ValueError, match="another lmlab serve"):
            with client(settings(tmp_path)):
                pass
    with client(settings(tmp_path)) as c:  # released on shutdown
        assert c.get("/api/v1/info").status_code == 200


def test_binding_beyond_loopback_needs_a_token(tmp_path, capsys):
    with pytest.raises(ValueError, match="api-token"):
        Settings(workspace=tmp_path, host="0.0.0.0")
    Settings(workspace=tmp_path, host="0.0.0.0", api_token=TOKEN)
    with pytest.raises(ValueError, match="8 characters"):
        Settings(workspace=tmp_path, api_token="short")
    from lmlab.cli import main
    assert main(["serve", "--host", "0.0.0.0", "--workspace", str(tmp_path)]) == 2
    assert "api-token" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "port (99999) must be in [0, 65535]"),  # uvicorn said it listened there, and did not
    (["--max-upload-mb", "nan"], "--max-upload-mb (nan) must be a positive number"),
    (["--max-upload-mb", "inf"], "--max-upload-mb (inf) must be a positive number"),
    (["--memory-budget-gb", "nan"], "--memory-budget-gb (nan) must be a positive number"),
    (["--memory-budget-gb", "0"], "--memory-budget-gb (0.0) must be a positive number"),  # was 70% of RAM
    (["--torch-threads", "-1"], "torch_threads (-1) must be >= 1"),  # failed the start-up with a traceback
])
def test_serve_refuses_bad_settings_in_one_line(tmp_path, capsys, flags, message):
    from lmlab.cli import main
    assert main(["serve", "--workspace", str(tmp_path), *flags]) == 2
    assert capsys.readouterr().err == f"lmlab: error: {message}\n"


def test_security_headers(lab):
    r = lab.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


# ---- database migrations ----------------------------------------------------------------------------

def test_migrations_are_versioned_and_match_the_schema(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    assert db.version == schema_version(db.engine) == MIGRATIONS[-1][0]
    assert schema_drift(db.engine) == []
    db.close()
    Database(f"sqlite:///{tmp_path / 'a.db'}").close()  # re-opening applies nothing twice
    # a later migration runs once, in order, on an existing database
    calls = []
    extra = [*MIGRATIONS, (MIGRATIONS[-1][0] + 1, "test", lambda conn: calls.append(1))]
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    assert migrate(db.engine, extra) == MIGRATIONS[-1][0] + 1 and calls == [1]
    assert migrate(db.engine, extra) == MIGRATIONS[-1][0] + 1 and calls == [1]
    # a database from a newer lmlab is refused, not guessed at
    with pytest.raises(RuntimeError, match="newer"):
        migrate(db.engine)
    db.close()


# ---- runs that fail, and runs that continue (last: they change the trained model) ------------------

def test_a_failing_run_says_why(lab):
    assert upload(lab, "short.txt", b"Too short to train on.").status_code == 201
    r = lab.post("/api/v1/runs", json={"model": "blank", "books": ["short.txt"], "max_steps": 5, **FAST})
    assert r.status_code == 201
    run = wait_run(lab, r.json()["id"], lambda r: r["status"] not in ("queued", "running"), "the run to fail")
    assert run["status"] == "failed" and run["exit_code"] == 2 and run["can_resume"] is False
    assert run["error"] and "Traceback" not in run["error"]  # the trainer's own one-line reason
    assert lab.get("/api/v1/models/blank").json()["trained"] is False
    status = lab.get("/training_status").json()
    assert status["error"] == run["error"] and status["is_training"] is False


def test_continue_training_from_the_trained_weights(lab):
    first = lab.get(f"/api/v1/runs/{lab.run_id}/metrics").json()["metrics"]
    r = lab.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 4, "log_every": 1,
                                       "init_from_trained": True, **FAST})
    assert r.status_code == 201, r.text
    run = wait_run(lab, r.json()["id"], lambda r: r["status"] not in ("queued", "running"), "the second run")
    assert run["status"] == "completed", run
    again = lab.get(f"/api/v1/runs/{run['id']}/metrics").json()["metrics"]
    # it starts where the first run ended, not from a random initialisation
    assert again[0]["loss"] < first[0]["loss"] - 0.3
    m = lab.get("/api/v1/models/tiny").json()
    # the model's steps go on from the first run's 12; the run's own curve starts after them
    assert m["trained_run_id"] == run["id"] and m["trained_steps"] == 12 + 4
    assert (run["parent_run_id"], run["step_offset"]) == (lab.run_id, 12)


def test_validation_errors_carry_what_the_web_app_words_them_with(lab):
    """The 422 body names the field, the error type, its limits (ctx) and a short input: ux.js turns them into
    '<the field's label>: must be at least 5' in the page's language; a long input is not echoed."""
    r = lab.post("/api/v1/models/estimate", json={"preset": "gpt2-tiny", "vocab_size": 3})
    assert r.status_code == 422
    assert r.json()["detail"] == [{"loc": ["body", "vocab_size"], "msg": "Input should be greater than or equal to 5",
                                   "type": "greater_than_equal", "ctx": {"ge": 5}, "input": 3}]
    r = lab.post("/api/v1/runs/experiment", json={"lab": "azr", "seeds": ["x", "y" * 101]})
    assert [(e["loc"], e["type"], e.get("input")) for e in r.json()["detail"]] == [
        (["body", "seeds", 0], "int_parsing", "x"), (["body", "seeds", 1], "int_parsing", None)]


def test_over_budget_reason_names_no_command_line_flag(lab):
    spec = {"family": "gpt2", "n_layer": 48, "n_head": 32, "n_embd": 4096, "block_size": 2048, "vocab_size": 50000}
    reason = lab.post("/api/v1/models/estimate", json=spec).json()["reason"]
    assert reason.endswith("but the memory budget is 2.00 GiB; use fewer layers, a smaller width or context, or a "
                           "smaller batch (the budget is set where the server is started)"), reason
