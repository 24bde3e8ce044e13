"""A finished run replaces its model's directory while the model is read: downloads, exports and generation
racing the swap each see one whole version of the model (never a 500, a partial or a mixed zip), and the copy
of a large final/ into the workspace holds up no request. In process, with a real training run."""

from __future__ import annotations

import io
import shutil
import threading
import zipfile

import torch
from test_server_support import BOOK, FAST, TINY_MODEL, client, settings, upload, wait_run

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.server.workspace import stage_dir, swap_dir
from lmlab.tokenizers import Tokenizer


def replace_dir(src, dst):
    """What the supervisor does when a training run finishes: copy final/ beside the model, then swap it in."""
    swap_dir(stage_dir(src, dst, src.parent), dst)


def _unzip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name.split("/", 1)[1]: zf.read(name) for name in zf.namelist()}


def test_readers_see_one_whole_version_while_the_model_is_swapped(tmp_path):
    """Two versions of model `m` (1 and 2 layers, other weights, other training.json) swapped in turn as fast as
    the supervisor can, while 4 threads download, export and generate: every answer is 200 and
    is exactly version 1's or version 2's."""
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=128)
    sources = []
    for n_layer in (1, 2):
        torch.manual_seed(n_layer)
        cfg = ModelConfig.preset("gpt2-tiny", vocab_size=128, block_size=32, n_layer=n_layer, init_std=1.0)
        sources.append(save_pretrained(tmp_path / f"v{n_layer}", Transformer(cfg), tok, training={"n_layer": n_layer}))
    files = [{f.name: f.read_bytes() for f in src.iterdir()} for src in sources]
    gen = {"model": "m", "prompt": "Once upon", "max_new_tokens": 6, "do_sample": False}
    with client(settings(tmp_path / "ws")) as c:
        state = c.app.app.state.lmlab
        state.db.add_model("m", cfg.to_dict(), "gpt2-tiny", "char", 128)
        target = state.ws.model_path("m")
        expected: dict[str, list] = {"download": files, "export": [], "generate": []}
        for src in sources:  # what each version answers when nothing moves
            replace_dir(src, target)
            assert _unzip(c.get("/api/v1/models/m/download").content) == {**files[sources.index(src)]}
            expected["export"].append(_unzip(c.get("/api/v1/models/m/export/hf").content))
            expected["generate"].append(c.post("/api/v1/generate", json=gen).json()["text"])
        assert expected["export"][0] != expected["export"][1]
        assert expected["generate"][0] != expected["generate"][1]

        done, swaps, seen, wrong = threading.Event(), [0], [], []

        def swapper():
            while not done.is_set():
                replace_dir(sources[swaps[0] % 2], target)
                swaps[0] += 1

        def reader(k):
            for i in range(24):
                what = ("download", "generate", "download", "export")[(i + k) % 4] if i % 6 else "export"
                if what == "generate":
                    r = c.post("/api/v1/generate", json=gen)
                    got = r.json().get("text") if r.status_code == 200 else None
                else:
                    r = c.get(f"/api/v1/models/m/{'download' if what == 'download' else 'export/hf'}")
                    got = _unzip(r.content) if r.status_code == 200 else None
                if got in expected[what]:
                    seen.append((what, expected[what].index(got)))
                else:
                    wrong.append((what, r.status_code, r.text[:200] if r.status_code != 200 else sorted(got)))
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        swap = threading.Thread(target=swapper)
        swap.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        swap.join()
        assert wrong == [], (len(wrong), sorted({(w[0], w[1]) for w in wrong}), wrong[:3])
        assert len(seen) == 96 and swaps[0] > 10, swaps
        assert {v for what, v in seen if what == "download"} == {0, 1}  # the swaps happened between reads
        assert not list(state.ws.tmp.iterdir())  # the readers' snapshots are removed


def test_a_request_is_not_held_up_by_the_copy_of_a_finished_model(tmp_path, monkeypatch):
    """The supervisor copies a finished run's final/ into models/ before swapping it in. Held in that copy (as
    a large model on a slow disk would hold it), it blocks no request: a model is created meanwhile, and the
    copy ends after that request was answered."""
    copying, answered, order = threading.Event(), threading.Event(), []
    real = shutil.copytree

    def held_copy(src, dst, *args, **kwargs):
        if str(dst).endswith(".incoming"):  # the supervisor's copy of final/ beside models/m
            copying.set()
            answered.wait(60)  # the request below answers first, unless the copy holds it up
        out = real(src, dst, *args, **kwargs)
        order.append("copy")
        return out
    monkeypatch.setattr(shutil, "copytree", held_copy)
    with client(settings(tmp_path)) as c:
        upload(c)
        assert c.post("/api/v1/models", json={"name": "m", **TINY_MODEL}).status_code == 201
        r = c.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 3, **FAST})
        assert r.status_code == 201, r.text
        assert copying.wait(180), "the run did not finish"
        assert c.post("/api/v1/models", json={"name": "other", **TINY_MODEL}).status_code == 201
        order.append("request")
        answered.set()
        run = wait_run(c, r.json()["id"], lambda r: r["status"] not in ("queued", "running"), "the run")
        assert run["status"] == "completed" and run["error"] is None, run
        assert c.get("/api/v1/models/m").json()["trained_steps"] == 3
    assert order == ["request", "copy"]
