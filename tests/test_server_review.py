"""Defects an adversarial review of the web API found (each test fails without its fix): models and books a queued
job reads that could be deleted under it, uploads and names the server took to a 500 or never listed, and checks
left to a job that the API promises up front."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from test_server_support import API_HEADERS, client, finished, settings, upload
from test_server_tune import CHATS, SFT, TEXT, put

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.server.db import Database
from lmlab.server.workspace import Workspace
from lmlab.tokenizers import Tokenizer


def make_ws(ws, names=("base",)):
    """Models of one tiny shape (width 64) with a character tokenizer, as test_server_tune's."""
    tok = Tokenizer.train([TEXT], kind="char", vocab_size=120)
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=len(tok) + 8, n_layer=1, block_size=48)
    for n in names:
        torch.manual_seed(len(n))
        save_pretrained(Workspace(ws).model_path(n), Transformer(cfg), tok)
    return ws


def test_a_queued_merge_or_quantization_keeps_what_it_reads(tmp_path):
    """A merge's other parents and its base, and a gptq quantization's calibration books, could be deleted (204)
    or trained anew while the job waited; the job then failed on a missing model or book."""
    with client(settings(make_ws(tmp_path, ("base", "b2", "b3", "b4")), max_jobs=1)) as c:
        assert put(c, "chats.jsonl", "conversations", CHATS).status_code == 201
        assert upload(c, "calib.txt", (TEXT * 20).encode()).status_code == 201
        busy = c.post("/api/v1/runs/tune", json={**SFT, "new_model": "occ", "max_steps": 100000}).json()["id"]
        merge = c.post("/api/v1/runs/merge", json={"model": "base", "others": ["b2"], "new_model": "merged",
                                                   "method": "task-arithmetic", "base": "b3"}).json()["id"]
        quant = c.post("/api/v1/runs/quantize", json={"model": "b4", "new_model": "b4q", "to": "int8",
                                                      "method": "gptq", "calibration": ["calib.txt"]}).json()["id"]
        r = c.delete("/api/v1/models/b2")
        assert (r.status_code, r.json()["detail"]) == (409, f"model 'b2' is a parent of merge run {merge}; cancel "
                                                            "that run or wait for it")
        r = c.delete("/api/v1/models/b3")
        assert r.status_code == 409 and f"'b3' is the base of merge run {merge}" in r.json()["detail"]
        r = c.post("/api/v1/runs", json={"model": "b2", "books": ["calib.txt"], "max_steps": 2, "new_version": True,
                                         "batch_size": 2, "seq_len": 16})
        assert r.status_code == 409
        r = c.delete("/api/v1/books/calib.txt")
        assert (r.status_code, r.json()["detail"]) == (409, f"book 'calib.txt' is in use by run(s) [{quant}]")
        assert c.post(f"/api/v1/runs/{busy}/cancel").status_code == 200
        assert finished(c, merge)["status"] == "completed" and finished(c, quant)["status"] == "completed"


def test_datasets_take_the_upload_limit_any_case_and_no_folder_in_their_place(tmp_path):
    with client(settings(make_ws(tmp_path))) as c:
        big = [CHATS[0]] * 16000  # 1.5 MiB: the JSON body limit (1 MiB) refused it with 413
        r = put(c, "big.jsonl", "conversations", big)
        assert r.status_code == 201 and r.json()["size"] > 1 << 20
        assert put(c, "A.JSONL", "conversations", CHATS).status_code == 201  # accepted, but never listed
        assert sorted(d["name"] for d in c.get("/api/v1/datasets").json()) == ["A.JSONL", "big.jsonl"]
        (tmp_path / "datasets" / "d.jsonl").mkdir()  # a folder where the file goes: os.replace failed, a 500
        r = put(c, "d.jsonl", "conversations", CHATS, overwrite="true")
        assert (r.status_code, r.json()["detail"]) == (409, "datasets/d.jsonl is not a file; remove it, or choose "
                                                            "another name")
        (tmp_path / "datasets" / ".m.jsonl.json").mkdir()  # ... or where its record goes
        assert put(c, "m.jsonl", "conversations", CHATS).status_code == 409


def test_what_a_job_would_refuse_is_refused_before_it_is_queued(tmp_path):
    with client(settings(make_ws(tmp_path))) as c:
        assert put(c, "chats.jsonl", "conversations", CHATS).status_code == 201
        r = c.post("/api/v1/runs/quantize", json={"model": "base", "new_model": "q4", "to": "int4",
                                                  "group_size": 128})
        assert (r.status_code, r.json()["detail"]) == (422, "group_size 128 does not divide blocks.0.attn.qkv's 64 "
                                                            "input columns")
        r = c.post("/api/v1/runs/merge", json={"model": "base", "others": ["base"], "new_model": "m",
                                               "method": "dare", "base": "base", "seed": 2**64})
        assert r.status_code == 422  # the job died on it: "internal error ... a bug in lmlab"
        r = c.post("/api/v1/runs/merge", json={"model": "base", "others": ["base"], "new_model": "m",
                                               "method": "linear", "t": 0.3})  # a setting linear does not read
        assert (r.status_code, r.json()["detail"]) == (422, "t is used by slerp only, not by method linear")
        r = c.post("/api/v1/runs/tune", json={**SFT, "new_model": "wide", "lora_rank": 100})
        assert r.status_code == 422 and "choose a rank of at most 64" in r.json()["detail"]
        q8 = c.post("/api/v1/runs/quantize", json={"model": "base", "new_model": "q8", "to": "int8"}).json()["id"]
        assert finished(c, q8)["status"] == "completed"
        r = c.post("/api/v1/runs/tune", json={**SFT, "model": "q8", "new_model": "t"})
        assert (r.status_code, r.json()["detail"]) == (422, "model 'q8' is an int8/int4 model, which cannot train; "
                                                            "fine-tune the model it was quantized from")


def test_a_chat_models_downloads_keep_its_template(tmp_path):
    """A tuned chat model's download (current or a run's version) left chat_template.jinja out: a copy put back in
    a workspace was no chat model."""
    with client(settings(make_ws(tmp_path))) as c:
        assert put(c, "chats.jsonl", "conversations", CHATS).status_code == 201
        run = c.post("/api/v1/runs/tune", json={**SFT, "new_model": "chat", "max_steps": 4, "save_every": 2}).json()
        assert finished(c, run["id"])["status"] == "completed"
        for query in ("", f"?run={run['id']}&step=2"):
            d = c.get(f"/api/v1/models/chat/download{query}")
            assert d.status_code == 200
            assert any(n.endswith("/chat_template.jinja") for n in zipfile.ZipFile(io.BytesIO(d.content)).namelist())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_link_in_a_model_folder_is_refused_in_openais_shape(tmp_path, path):
    ws = make_ws(tmp_path)
    (tmp_path / "outside.json").write_text("{}")
    with client(settings(ws)) as c:  # planted once the model is indexed (a link found at start: not indexed)
        (Workspace(ws).model_path("base") / "generation.json").symlink_to(tmp_path / "outside.json")
        body = {"model": "base", "max_tokens": 2, **({"messages": [{"role": "user", "content": "1+2?"}]}
                                                    if "chat" in path else {"prompt": "1+2?"})}
        r = c.post(path, json=body, headers=API_HEADERS)
        assert r.status_code == 409 and "symbolic link" in r.json()["error"]["message"]  # it was {"detail": ...}


def test_deleting_a_model_keeps_the_runs_that_made_other_models(tmp_path):
    """Deleting `base` deleted every run that started from it, the finished fine-tuning that made `chat` and the
    quantization that made `base-q` too: their records, metrics and checkpoints (chat's versions), unasked."""
    with client(settings(make_ws(tmp_path), max_jobs=1)) as c:
        assert put(c, "chats.jsonl", "conversations", CHATS).status_code == 201
        tune = c.post("/api/v1/runs/tune", json={**SFT, "new_model": "chat", "max_steps": 4, "save_every": 2}).json()
        assert finished(c, tune["id"])["status"] == "completed"
        quant = c.post("/api/v1/runs/quantize", json={"model": "base", "new_model": "base-q", "to": "int8"}).json()
        assert finished(c, quant["id"])["status"] == "completed"
        before = c.get("/api/v1/models/chat/versions").json()
        assert c.delete("/api/v1/models/base").status_code == 204
        assert c.get(f"/api/v1/runs/{tune['id']}").status_code == 200
        assert c.get(f"/api/v1/runs/{quant['id']}").status_code == 200
        assert c.get("/api/v1/models/chat/versions").json() == before and len(before) == 3
        assert c.get("/api/v1/models/chat/download", params={"run": tune["id"], "step": 2}).status_code == 200
        assert c.delete("/api/v1/models/chat").status_code == 204  # its history goes with it now
        assert c.get(f"/api/v1/runs/{tune['id']}").status_code == 404
        assert not Workspace(tmp_path).run_path(tune["id"]).exists()
        assert c.get(f"/api/v1/runs/{quant['id']}").status_code == 200  # base-q's, still there


def test_a_fine_tuning_whose_model_could_not_be_saved_saves_it_when_resumed_as_it_was(tmp_path):
    """A finished fine-tuning run whose model could not be registered (a folder of that name in the way) could not
    be resumed to register it: 'max_steps (6) must be larger', and training further makes another model. Resumed
    as it was (no max_steps), it saves its final model now, as self-play does."""
    with client(settings(make_ws(tmp_path), max_jobs=1)) as c:
        assert put(c, "chats.jsonl", "conversations", CHATS).status_code == 201
        rid = c.post("/api/v1/runs/tune", json={**SFT, "new_model": "x", "max_steps": 6, "save_every": 3}).json()["id"]
        (tmp_path / "models" / "x").mkdir()  # put there by hand while the run trains
        run = finished(c, rid)
        assert run["status"] == "failed" and "its model was not saved" in run["error"] and run["can_resume"]
        final = load_file(Workspace(tmp_path).run_path(rid) / "final" / "model.safetensors")
        (tmp_path / "models" / "x").rmdir()
        r = c.post(f"/api/v1/runs/{rid}/resume", json={})
        assert r.status_code == 200, r.text
        run = finished(c, rid)
        assert run["status"] == "completed", run["error"]
        saved = load_file(Workspace(tmp_path).model_path("x") / "model.safetensors")
        assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in final)
        assert c.post(f"/api/v1/runs/{rid}/resume", json={"max_steps": 6}).status_code == 409  # nothing to train


def test_what_the_ui_review_found_in_the_api(tmp_path):
    """A GRPO model's card said it was tuned from "?" (GRPO keeps its parent under `init`); a preview's error named
    the file "data"; dataset names with a space were refused (book names take one)."""
    ws = make_ws(tmp_path)
    model, tok = load_pretrained(Workspace(ws).model_path("base"))
    save_pretrained(Workspace(ws).model_path("rl"), model, tok,
                    training={"grpo": {"steps": 3}, "init": str(Workspace(ws).model_path("base")), "steps": 3})
    with client(settings(ws)) as c:
        made = c.get("/api/v1/models/rl/card").json()["made"]
        assert (made["how"], made["mode"], made["from"]) == ("tuned", "grpo", "base")
        assert put(c, "my chats.jsonl", "conversations", CHATS).status_code == 201
        long = [{"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "y"}]}]
        assert put(c, "long.jsonl", "conversations", long).status_code == 201
        r = c.get("/api/v1/datasets/long.jsonl/preview", params={"model": "base"})
        assert r.status_code == 422 and r.json()["detail"].startswith("long.jsonl:1: no token to train on"), r.text


def test_the_chat_view_asks_which_oldest_rounds_no_longer_fit(tmp_path):
    """POST /api/v1/chat/fit: the rounds `lmlab chat` would leave out (tune.chat.fit_history), counted by the
    server; the Chat view sent the whole history, and every message failed once it outgrew the context."""
    from lmlab.tune.chat import add_chat_tokens, fit_history, write_template
    ws = make_ws(tmp_path)
    model, tok, _ = add_chat_tokens(*load_pretrained(Workspace(ws).model_path("base")))
    save_pretrained(Workspace(ws).model_path("chatty"), model, tok)
    write_template(Workspace(ws).model_path("chatty"))
    rounds = [m for i in range(6) for m in ({"role": "user", "content": f"q{i}?"},
                                            {"role": "assistant", "content": f"a{i}."})]
    messages = [{"role": "system", "content": "Be brief."}, *rounds, {"role": "user", "content": "and now?"}]
    with client(settings(ws)) as c:
        r = c.post("/api/v1/chat/fit", json={"model": "chatty", "messages": messages, "max_tokens": 4})
        kept = fit_history(messages, tok, 48 - 4)
        assert r.json() == {"drop": len(messages) - len(kept)} and 0 < r.json()["drop"] < len(rounds)
        assert r.json()["drop"] % 2 == 0 and kept[0]["role"] == "system"  # whole rounds; the system prompt stays
        r = c.post("/api/v1/chat/fit", json={"model": "chatty", "messages": messages[-1:], "max_tokens": 8})
        assert r.json() == {"drop": 0}
        r = c.post("/api/v1/chat/fit", json={"model": "chatty", "messages": [{"role": "user", "content": "x" * 60}]})
        assert r.status_code == 422 and "too long for the model's context" in r.json()["detail"]
        assert r.json()["error"] == {"key": "chat_too_long", "params": {"room": 36}}  # said in Russian too
        r = c.post("/api/v1/chat/fit", json={"model": "chatty", "messages": messages[-1:], "max_tokens": 48})
        assert (r.status_code, r.json()["detail"]) == (422, "max_tokens (48) leaves no room for the conversation in "
                                                            "the model's context of 48 tokens; ask for fewer")
        assert r.json()["error"] == {"key": "chat_no_room", "params": {"max_tokens": 48, "block": 48}}
        r = c.post("/api/v1/chat/fit", json={"model": "base", "messages": messages})
        assert (r.status_code, r.json()["detail"]) == (409, "model 'base' has no lmlab chat template")


def test_the_seed_training_status_reports_the_training_not_a_later_evaluation(tmp_path):
    """The AZR Model Trainer app's /training_status took the newest run of any kind: an evaluation queued after a
    training run made it report zeros while the training went on."""
    ws = make_ws(tmp_path)
    db = Database(Workspace(ws).sqlite_url())
    train = db.add_run("base", [], {"max_steps": 40}, False, 40)["id"]
    db.update_run(train, status="interrupted", current_step=12, last_loss=2.5)
    db.update_run(db.add_run("", [], {"models": ["base"]}, False, None, kind="eval")["id"], status="cancelled")
    db.engine.dispose()
    with client(settings(ws)) as c:
        s = c.get("/training_status").json()
    assert (s["current_iteration"], s["max_iterations"], s["current_loss"], s["model_name"]) == (12, 40, 2.5, "base")


def test_the_demo_takes_the_next_name_every_rule_leaves_free(tmp_path):
    """A model "DEMO" (a case twin of "demo") made the demo refuse to start, after it had stored its book; so did
    a models/demo-2/ folder on disk that no model indexes."""
    ws = make_ws(tmp_path)
    (ws / "models" / "demo-2").mkdir()
    with client(settings(ws)) as c:
        assert c.post("/api/v1/models", json={"name": "DEMO", "preset": "gpt-tiny"}).status_code == 201
        r = c.post("/api/v1/demo", json={"max_steps": 1})
        assert r.status_code == 201, r.text
        c.post(f"/api/v1/runs/{r.json()['id']}/cancel")
        assert r.json()["model"] == "demo-3"
        assert sorted(m["name"] for m in c.get("/api/v1/models").json()) == ["DEMO", "base", "demo-3"]
        finished(c, r.json()["id"])


def test_a_run_a_terminal_trains_is_not_deleted_under_it(tmp_path):
    """A stopped run resumed from a terminal (`lmlab train --out W/runs/run-N --resume`) holds RUN/.lock, which the
    database does not know: DELETE /runs/N and DELETE /models/M answered 204 and removed the folder, checkpoints
    and all, mid-training (the terminal's run then died on its missing metrics.jsonl). Now 409 until it ends."""
    import threading

    from lmlab.train.checkpoint import lock_run, unlock_run

    with client(settings(make_ws(tmp_path), max_jobs=1)) as c:
        assert put(c, "chats.jsonl", "conversations", CHATS).status_code == 201
        rid = c.post("/api/v1/runs/tune", json={**SFT, "new_model": "chat", "max_steps": 2}).json()["id"]
        assert finished(c, rid)["status"] == "completed"
        folder = Workspace(tmp_path).run_path(rid)
        held = []
        thread = threading.Thread(target=lambda: held.append(lock_run(folder)))  # as another process holds it
        thread.start()
        thread.join()
        try:
            assert c.delete("/api/v1/models/chat").status_code == 204  # the run stays: base's history
            for path in (f"/api/v1/runs/{rid}", "/api/v1/models/base"):  # the run, or the model it started from
                r = c.delete(path)
                assert r.status_code == 409, (path, r.status_code, r.text)
                assert r.json()["error"] == {"key": "run_training_elsewhere", "params": {"id": rid}}
            assert (folder / "final" / "model.safetensors").is_file()
            assert c.get("/api/v1/models/base").status_code == 200
        finally:
            unlock_run(held[0])
        outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
        (folder / ".lock").unlink()
        (folder / ".lock").symlink_to(outside)  # the delete takes the lock: never through a link
        assert c.delete(f"/api/v1/runs/{rid}").status_code == 204
        assert not folder.exists() and not outside.exists()
