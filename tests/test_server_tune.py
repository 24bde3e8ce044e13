"""Fine-tuning in the web app (routers/tune.py): datasets are checked by the readers the runs use (the one-line
error naming the line, nothing stored), the preview's mask is the chat renderer's, and SFT, preference and GRPO
runs are `lmlab tune ...` processes under the supervisor whose metrics equal the CLI's for the same settings,
whose final model joins the workspace, and which cancel and resume like training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_server_support import CHILD_ENV, client, finished, settings, upload, wait_run

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.server.commands import tune_command
from lmlab.server.routers import tune as tune_router
from lmlab.server.services import estimate
from lmlab.server.workspace import Workspace
from lmlab.tokenizers import Tokenizer
from lmlab.tune.chat import render, with_chat_tokens
from lmlab.tune.preference import render as render_completion

CHATS = [{"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
         for a, b in ((2, 3), (4, 1), (7, 2), (5, 5), (3, 6), (8, 1), (1, 1), (6, 2))]
CHATS[1]["messages"].insert(0, {"role": "system", "content": "Кратко."})
LONG = {"messages": [{"role": "user", "content": "7" * 40}, {"role": "assistant", "content": "seven " * 8}]}
PAIRS = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b}.", "rejected": f"{a + b + 1}."}
         for a, b in ((2, 3), (4, 1), (3, 3))]
KTO = [{"prompt": "2+3=", "completion": "5.", "label": True}, {"prompt": "4+1=", "completion": "6.", "label": False}]
TEXT = "".join(m["content"] for c in CHATS + [LONG] for m in c["messages"]) + "0123456789+=?.Кратко seven"
TIMING = ("elapsed_s", "tokens_per_s", "mfu")  # the clock's, not the run's
SFT = {"method": "sft", "model": "base", "dataset": "chats.jsonl", "max_steps": 3, "batch_size": 2, "lr": 1e-3,
       "save_every": 2}


def jsonl(records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records).encode()


def put(c, name, kind, records, **query):
    return c.post("/api/v1/datasets", params=query, data={"kind": kind},
                  files={"file": (name, jsonl(records), "application/jsonl")})


def metrics_file(path):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tn(tmp_path_factory):
    """A server with `base`: a one-layer model with random weights, a character tokenizer without chat tokens
    (room for them in its embedding) and a 48-token context; the conversations and pairs uploaded."""
    ws = tmp_path_factory.mktemp("ws")
    tok = Tokenizer.train([TEXT], kind="char", vocab_size=120)
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=len(tok) + 8, n_layer=1, block_size=48)
    save_pretrained(Workspace(ws).model_path("base"), Transformer(cfg), tok)
    with client(settings(ws, max_jobs=1)) as c:
        assert put(c, "chats.jsonl", "conversations", CHATS + [LONG]).status_code == 201
        assert put(c, "pairs.jsonl", "pairs", PAIRS).status_code == 201
        c.workspace, c.tok = ws, tok
        yield c


@pytest.mark.parametrize("kind, bad, why", [
    ("conversations", '{"messages": [}', "not JSON (Expecting value, column 15)"),
    ("conversations", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "message 1: no 'role'"),
    ("conversations", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "message 2: empty assistant turn"),
    ("pairs", {"prompt": "1+1=", "chosen": "2.", "rejected": "2."}, "chosen and rejected are the same text"),
    ("kto", {"prompt": "1+1=", "completion": "2.", "label": "yes"}, "'label' must be true or false"),
    ("prompt_completion", {"prompt": "1+1=", "completion": ""}, "empty completion"),
])
def test_a_bad_dataset_is_refused_with_its_line_and_nothing_is_stored(tn, kind, bad, why):
    good = {"conversations": CHATS[0], "pairs": PAIRS[0], "kto": KTO[0],
            "prompt_completion": {"prompt": "1+1=", "completion": "2."}}[kind]
    before = sorted(p.name for p in (tn.workspace / "datasets").iterdir())
    r = put(tn, "bad.jsonl", kind, [good, bad, good])
    assert (r.status_code, r.json()["detail"]) == (422, f"bad.jsonl:2: {why}")
    assert sorted(p.name for p in (tn.workspace / "datasets").iterdir()) == before
    assert list((tn.workspace / "tmp").iterdir()) == []
    assert "bad.jsonl" not in [d["name"] for d in tn.get("/api/v1/datasets").json()]


def test_datasets_are_listed_kept_apart_and_deleted(tn):
    listed = {d["name"]: (d["kind"], d["examples"]) for d in tn.get("/api/v1/datasets").json()}
    assert listed["chats.jsonl"] == ("conversations", 9) and listed["pairs.jsonl"] == ("pairs", 3)
    assert put(tn, "chats.jsonl", "conversations", CHATS).status_code == 409  # no overwrite without asking
    r = put(tn, "../x.jsonl", "conversations", CHATS)
    assert r.status_code == 400 and "path separator" in r.json()["detail"]
    assert put(tn, "k.jsonl", "kto", KTO).json()["examples"] == 2
    assert tn.delete("/api/v1/datasets/k.jsonl").status_code == 204
    assert not (tn.workspace / "datasets" / "k.jsonl").exists()
    assert not (tn.workspace / "datasets" / ".k.jsonl.json").exists()
    assert tn.delete("/api/v1/datasets/k.jsonl").status_code == 404


def test_an_overwrite_that_fails_keeps_the_old_dataset_and_its_kind(tn, monkeypatch):
    """overwrite=true replaced the kind record before the file: an error between the two left the old pairs
    under the new kind (kto), and the preview and runs refused them. The old record now comes back."""
    import os

    import lmlab.server.routers.tune as tune_router
    assert put(tn, "keep.jsonl", "pairs", PAIRS).status_code == 201
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith(os.sep + "keep.jsonl"):
            raise OSError(5, "Input/output error (simulated)")
        return real(src, dst)

    monkeypatch.setattr(tune_router.os, "replace", failing)
    with pytest.raises(OSError, match="simulated"):
        put(tn, "keep.jsonl", "kto", KTO, overwrite="true")
    monkeypatch.setattr(tune_router.os, "replace", real)
    listed = {d["name"]: d for d in tn.get("/api/v1/datasets").json()}
    assert (listed["keep.jsonl"]["kind"], listed["keep.jsonl"]["examples"]) == ("pairs", 3)
    assert tn.get("/api/v1/datasets/keep.jsonl/preview", params={"model": "base"}).status_code == 200
    assert tn.delete("/api/v1/datasets/keep.jsonl").status_code == 204


def test_an_upload_that_ends_second_does_not_replace_the_first(tn, monkeypatch):
    """Two uploads of one new name: both were checked before their (long) reading and both stored, the second
    over the first, kind record and file of different uploads. The check is made again when storing."""
    import lmlab.server.routers.tune as tune_router
    real = tune_router.read_dataset

    folder = tn.workspace / "datasets"
    assert put(tn, "first.jsonl", "pairs", PAIRS).status_code == 201

    def other_upload_ends_meanwhile(path, kind):  # what the other upload leaves once it has stored its files
        for name in ("first.jsonl", ".first.jsonl.json"):
            (folder / name.replace("first", "race")).write_bytes((folder / name).read_bytes())
        return real(path, kind)

    monkeypatch.setattr(tune_router, "read_dataset", other_upload_ends_meanwhile)
    r = put(tn, "race.jsonl", "kto", KTO)
    monkeypatch.setattr(tune_router, "read_dataset", real)
    assert (r.status_code, r.json()["error"]) == (409, {"key": "dataset_exists", "params": {"name": "race.jsonl"}})
    listed = {d["name"]: d for d in tn.get("/api/v1/datasets").json()}
    assert (listed["race.jsonl"]["kind"], listed["race.jsonl"]["examples"]) == ("pairs", 3)
    for name in ("race.jsonl", "first.jsonl"):
        assert tn.delete(f"/api/v1/datasets/{name}").status_code == 204


def test_the_preview_mask_is_the_renderers(tn):
    p = tn.get("/api/v1/datasets/chats.jsonl/preview", params={"model": "base", "rows": 9}).json()
    tok, added = with_chat_tokens(tn.tok)
    assert p["added_tokens"] == added == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert p["examples"] == 9 and p["context"] == 49
    for row, chat in zip(p["rows"], CHATS):
        ids, mask = render(chat["messages"], tok)
        assert (row["ids"], row["mask"], row["truncated"]) == (ids, mask, False)
        # the trained text: the assistant's reply and the <|end|> after it
        assert "".join(t["text"] for t in row["tokens"] if t["trained"]) == chat["messages"][-1]["content"] + "<|end|>"
    long = p["rows"][8]
    full_ids, full_mask = render(LONG["messages"], tok)
    assert long["truncated"] and (long["ids"], long["mask"]) == (full_ids[:49], full_mask[:49])
    assert p["truncated"] == 1
    assert p["supervised_tokens"] == sum(sum(render(c["messages"], tok)[1][:49]) for c in CHATS + [LONG])

    p = tn.get("/api/v1/datasets/pairs.jsonl/preview", params={"model": "base", "rows": 1}).json()
    assert [r["side"] for r in p["rows"]] == ["chosen", "rejected"]
    prompt, completion = render_completion(tn.tok, PAIRS[0]["prompt"], PAIRS[0]["chosen"])
    assert p["rows"][0]["ids"] == prompt + completion
    assert p["rows"][0]["mask"] == [0] * len(prompt) + [1] * len(completion)
    assert p["supervised_tokens"] == sum(len(render_completion(tn.tok, x["prompt"], x[s])[1])
                                         for x in PAIRS for s in ("chosen", "rejected"))


def test_the_preview_counts_a_bounded_number_of_examples(tn, monkeypatch):
    """A GET must not tokenise a whole dataset in the server (100 MiB of short examples): the counts cover the
    first PREVIEW_COUNTED examples, and say so."""
    monkeypatch.setattr(tune_router, "PREVIEW_COUNTED", 8)  # CHATS, not LONG (the one cut to the context)
    p = tn.get("/api/v1/datasets/chats.jsonl/preview", params={"model": "base", "rows": 9}).json()
    tok, _ = with_chat_tokens(tn.tok)
    assert (p["examples"], p["counted"], p["truncated"], len(p["rows"])) == (9, 8, 0, 8)
    assert p["supervised_tokens"] == sum(sum(render(c["messages"], tok)[1]) for c in CHATS)
    monkeypatch.setattr(tune_router, "PREVIEW_COUNTED", 9)
    p = tn.get("/api/v1/datasets/chats.jsonl/preview", params={"model": "base", "rows": 9}).json()
    assert (p["examples"], p["counted"], p["truncated"]) == (9, 9, 1)


def test_settings_of_another_method_and_data_of_another_kind_are_refused(tn):
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "x", "task": "addition", "group_size": 4})
    assert (r.status_code, r.json()["detail"]) == (422, "task, group_size are not settings of sft runs")
    r = tn.post("/api/v1/runs/tune", json={**SFT, "method": "dpo", "new_model": "x"})
    assert (r.status_code, r.json()["detail"]) == (422, "dataset 'chats.jsonl' holds conversations data; dpo trains "
                                                        "on pairs")
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "x", "lora_alpha": 8})
    assert (r.status_code, r.json()["detail"]) == (422, "lora_alpha needs lora_rank")
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "x", "lora_new_tokens": True})
    assert (r.status_code, r.json()["detail"]) == (422, "lora_new_tokens needs lora_rank")
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "x", "lora_dropout": 0})  # 0 == False: a 201 before
    assert (r.status_code, r.json()["detail"]) == (422, "lora_dropout needs lora_rank")
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "x", "lora_hard_tokens": 4})
    assert (r.status_code, r.json()["detail"]) == (422, "lora_hard_tokens needs lora_rank")
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "x", "sft_weight": 0.5})
    assert (r.status_code, r.json()["detail"]) == (422, "sft_weight is not a setting of sft runs")
    # what the run would refuse as it starts is refused here (a 201 and a failed run before)
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "x", "lora_rank": 2, "lora_targets": "q_proj"})
    assert (r.status_code, r.json()["detail"]) == (422, "unknown LoRA target 'q_proj' for a gpt2 model; choose from "
                                                        "c_attn, c_proj, c_fc or all-linear")
    r = tn.post("/api/v1/runs/tune", json={"method": "grpo", "model": "base", "new_model": "x", "task": "addition",
                                           "lora_rank": 2, "lora_dropout": 0.5})
    assert (r.status_code, r.json()["detail"]) == (422, "lora_dropout does not apply to grpo: it scores the policy "
                                                        "with dropout off, as it samples")
    r = put(tn, "pc.jsonl", "prompt_completion", [{"prompt": "1+1=", "completion": "2."},
                                                  {"prompt": "a", "completion": " b", "messages": "see prompt"}])
    assert (r.status_code, r.json()["detail"]) == (422, 'pc.jsonl:2: "messages" must be a non-empty list')
    r = tn.post("/api/v1/runs/tune", json={"method": "dpo", "model": "base", "new_model": "x", "dataset": "pairs.jsonl",
                                           "loss": "orpo", "sft_weight": 0.5})
    assert (r.status_code, r.json()["detail"]) == (422, "sft_weight is for the dpo, ipo and simpo losses, not orpo")
    r = tn.post("/api/v1/runs/tune", json={"method": "grpo", "model": "base", "new_model": "x", "task": "chess"})
    assert (r.status_code, r.json()["detail"]) == (422, "task ('chess') must be one of addition, count, sort, format")
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "base"})
    assert (r.status_code, r.json()["detail"]) == (409, "a model named 'base' already exists; choose another name "
                                                        "for the new model")


def test_data_and_settings_the_run_would_refuse_at_its_start_are_refused_at_once(tn):
    """A run was queued (201) and failed at once where the app could tell: an example with nothing to train on in
    the context (the preview said so: 422), prompts that fill the context under completion_only, a GRPO task's
    prompt + max_new_tokens longer than the context, and a pair whose prompt merges into its completion (the
    preview showed it trained). Each is a 422 naming the dataset's line now, and no run is made."""
    tail = {**CHATS[0], "messages": [{"role": "user", "content": "7" * 60}, {"role": "assistant", "content": "ok"}]}
    assert put(tn, "tail.jsonl", "conversations", CHATS[:4] + [tail]).status_code == 201
    assert put(tn, "full.jsonl", "prompt_completion", [{"prompt": "1" * 60, "completion": "ok"}] * 3).status_code == 201
    runs = len(tn.get("/api/v1/runs").json())
    for body, detail in (
            ({**SFT, "dataset": "tail.jsonl"},
             "tail.jsonl:5: no token to train on within the context of 49 tokens (the example is longer); shorten "
             "it: the model's context holds no more"),
            ({**SFT, "dataset": "full.jsonl", "completion_only": True}, "full.jsonl:1: no token to train on"),
            ({"method": "grpo", "model": "base", "task": "addition", "max_new_tokens": 100},
             "prompt + max_new_tokens (")):
        r = tn.post("/api/v1/runs/tune", json={**body, "new_model": "never"})
        assert r.status_code == 422 and r.json()["detail"].startswith(detail), r.text
        assert "/runs/" not in r.json()["detail"]  # the server's own path stays out of it
    preview = tn.get("/api/v1/datasets/tail.jsonl/preview", params={"model": "base"})
    assert (preview.status_code, preview.json()["detail"]) == (422, (
        "tail.jsonl:5: no token to train on within the context of 49 tokens (the example is longer); shorten it: "
        "the model's context holds no more"))
    assert len(tn.get("/api/v1/runs").json()) == runs


def test_the_preference_preview_refuses_what_the_run_refuses_and_counts_cut_examples(tmp_path):
    """A prompt merged by BPE into its completion ("hel" + "lo" -> "hello") was shown trained by the preview,
    and the run refused it; and `tune dpo` counted the examples cut as the larger of the chosen and rejected
    sides' counts (1 where one example was cut on each side), KTO's mismatched KL pairs among them."""
    from lmlab.server.routers.tune import preference_rows
    from lmlab.tune.preference import PreferenceData
    tok = Tokenizer.train(["hello world " * 200], kind="bpe", vocab_size=270)
    assert tok.encode("hello") == tok.encode("hel" + "lo") and len(tok.encode("hello")) == 1
    pair = {"line": 1, "prompt": "hel", "chosen": "lo", "rejected": " world"}
    with pytest.raises(ValueError, match="^p.jsonl:1: the prompt has no tokens of its own$"):
        preference_rows([(1, pair)], "pairs", tok, 48, 5, "p.jsonl")
    long, short = "hello " * 6, "world"
    pairs = [{"prompt": "hello world", "chosen": long, "rejected": short},   # cut on the chosen side only
             {"prompt": "hello world", "chosen": short, "rejected": long}]   # on the rejected side only
    kto = [{"prompt": "hello", "completion": long, "label": True},           # fits: 1 + 7 tokens of 9
           {"prompt": "hello world hello", "completion": "world", "label": False}]  # KL pair: 3 + 7, cut
    for kind, rows, cut in (("pairs", pairs, 2), ("kto", kto, 0)):
        (tmp_path / f"{kind}.jsonl").write_text(jsonl(rows).decode())
        data = PreferenceData(tmp_path / f"{kind}.jsonl", tok, kind, 9)
        preview = preference_rows([(i + 1, r) for i, r in enumerate(rows)], kind, tok, 9, 5, kind)
        assert data.truncated == preview["truncated"] == cut, (kind, data.truncated, preview["truncated"])


def test_lora_targets_take_what_the_cli_takes():
    """The API's pattern refused all-linear and dotted names (attn.c_attn), which --lora-targets takes; a name
    that would read as a flag stays refused."""
    from pydantic import ValidationError

    from lmlab.server.schemas import TuneCreate
    for targets in ("all-linear", "attn.c_attn,mlp.c_fc", "c_attn"):
        assert TuneCreate(method="sft", model="m", new_model="n", lora_rank=2, lora_targets=targets).lora_targets
    for targets in ("-x", "a,,b", "a b", ""):
        with pytest.raises(ValidationError):
            TuneCreate(method="sft", model="m", new_model="n", lora_rank=2, lora_targets=targets)


def test_lora_settings_reach_the_command_for_every_method(tmp_path):
    ws = Workspace(tmp_path)
    lora = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "lora_targets": "c_attn,c_fc",
            "lora_new_tokens": True}
    for method, extra in (("sft", {"dataset": "d.jsonl", "lora_hard_tokens": 3}),
                          ("dpo", {"dataset": "d.jsonl", "loss": "ipo", "sft_weight": 0.5}),
                          ("grpo", {"task": "addition"})):
        run = {"id": 7, "model_name": "base", "resume": False, "params": {"method": method, "max_steps": 3, **extra,
                                                                          **lora}}
        args = tune_command(run, ws).args
        assert args[:2] == ["tune", method]
        at = args.index("--lora-rank")
        assert args[at:at + 9] == ["--lora-rank", "4", "--lora-alpha", "8.0", "--lora-dropout", "0.1",
                                   "--lora-targets", "c_attn,c_fc", "--lora-new-tokens"]
        if method == "dpo":
            assert args[args.index("--sft-weight") + 1] == "0.5"
        else:
            assert "--sft-weight" not in args
        assert args[args.index("--lora-hard-tokens") + 1:][:1] == ["3"] if method == "sft" else \
            "--lora-hard-tokens" not in args
        # a run without the switch has no flag (the CLI's --lora-new-tokens is store_true: no --no- form)
        off = tune_command({**run, "params": {**run["params"], "lora_new_tokens": False}}, ws).args
        assert "--lora-new-tokens" not in off and "--no-lora-new-tokens" not in off
        assert args[args.index("--steps" if method == "grpo" else "--max-steps") + 1] == "3"
        resumed = tune_command({**run, "resume": True}, ws).args  # the run keeps its own model, data and adapters
        assert "--lora-rank" not in resumed and resumed[-3:] == ["--resume", "--steps" if method == "grpo" else
                                                                 "--max-steps", "3"]


def cli_metrics(tn, out, *args):
    """`lmlab tune ARGS... --out OUT` run by hand, as the supervisor runs its processes (in the workspace, with
    the same threads): its metrics without the clock's."""
    subprocess.run([sys.executable, "-m", "lmlab.cli", "tune", *args, "--out", str(out)], cwd=tn.workspace,
                   capture_output=True, check=True, env={**os.environ, **CHILD_ENV})
    return metrics_file(out / "metrics.jsonl")


def test_an_sft_run_equals_the_cli_and_makes_a_chat_model(tn, tmp_path):
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "base-chat"})
    assert r.status_code == 201, r.text
    run = finished(tn, r.json()["id"])
    assert (run["status"], run["kind"], run["current_step"], run["max_steps"]) == ("completed", "tune", 3, 3)
    run_dir = tn.workspace / "runs" / f"run-{run['id']}"
    got = [{k: v for k, v in m.items() if k not in (*TIMING, "id", "time")}
           for m in tn.get(f"/api/v1/runs/{run['id']}/metrics").json()["metrics"]]
    assert [m["step"] for m in got] == [1, 2, 3] and got == metrics_file(run_dir / "metrics.jsonl")
    # loss, lr, val_loss: the CLI's, row for row, with the request's settings and the tab's defaults for SFT
    cli = cli_metrics(tn, tmp_path / "cli", "sft", "--model", "models/base", "--data", "datasets/chats.jsonl",
                      "--max-steps", "3", "--batch-size", "2", "--lr", "0.001", "--save-every", "2", "--seed", "0",
                      "--warmup-steps", "0", "--log-every", "1", "--eval-every", "0")
    assert got == cli
    model = tn.get("/api/v1/models/base-chat").json()
    assert model["trained"] and model["origin"] == {"kind": "tune", "parent": "base", "run_id": run["id"],
                                                    "method": "sft", "dataset": "chats.jsonl", "steps": 3}
    assert (tn.workspace / "models" / "base-chat" / "chat_template.jinja").is_file()
    # the chat tokens joined its tokenizer (its embedding had room for them)
    assert len(Tokenizer.load(tn.workspace / "models" / "base-chat" / "tokenizer.json")) == len(tn.tok) + 4


def test_preference_and_grpo_runs_log_their_own_metrics(tn):
    runs = [tn.post("/api/v1/runs/tune", json={"method": "dpo", "model": "base", "new_model": "base-dpo",
                                               "dataset": "pairs.jsonl", "loss": "ipo", "max_steps": 2,
                                               "batch_size": 2, "sft_weight": 0.5}),
            tn.post("/api/v1/runs/tune", json={"method": "grpo", "model": "base", "new_model": "base-grpo",
                                               "task": "addition", "max_steps": 2, "group_size": 2,
                                               "prompts_per_step": 2, "max_new_tokens": 4, "kl_coef": 0.1,
                                               "eval_prompts": 2})]
    assert [r.status_code for r in runs] == [201, 201], [r.text for r in runs]
    keys = ({"rewards_chosen", "rewards_rejected", "margin", "accuracy", "kl"}, {"reward", "kl", "zero_spread_groups"})
    for r, want in zip(runs, keys):
        run = finished(tn, r.json()["id"])
        assert run["status"] == "completed", run
        rows = tn.get(f"/api/v1/runs/{run['id']}/metrics").json()["metrics"]
        assert [m["step"] for m in rows] == [1, 2] and all(want <= m.keys() for m in rows)
        made = tn.get(f"/api/v1/models/{run['params']['new_model']}").json()
        assert made["origin"]["method"] == run["params"]["method"]
    assert runs[0].json()["params"]["loss"] == "ipo"
    # DPO + NLL: the weight reaches the run's own settings and the new model's origin
    saved = json.loads((tn.workspace / "runs" / f"run-{runs[0].json()['id']}" / "config.json").read_text())
    assert saved["preference"]["config"]["sft_weight"] == 0.5
    assert tn.get("/api/v1/models/base-dpo").json()["origin"]["sft_weight"] == 0.5


def test_a_cancelled_run_resumes_and_continues_its_metrics(tn):
    r = tn.post("/api/v1/runs/tune", json={**SFT, "new_model": "base-long", "max_steps": 500, "save_every": 1})
    run_id = r.json()["id"]
    wait_run(tn, run_id, lambda x: x["current_step"] >= 3, "three steps")
    assert tn.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200
    run = finished(tn, run_id)
    assert run["status"] == "cancelled" and run["can_resume"] and tn.get("/api/v1/models/base-long").status_code == 404
    ckpt = run["checkpoint_step"]
    before = [m for m in tn.get(f"/api/v1/runs/{run_id}/metrics").json()["metrics"] if m["step"] <= ckpt]
    r = tn.post(f"/api/v1/runs/{run_id}/resume", json={"max_steps": ckpt + 2})
    assert r.status_code == 200, r.text
    run = finished(tn, run_id)
    assert (run["status"], run["resumed_from_step"], run["current_step"]) == ("completed", ckpt, ckpt + 2)
    after = tn.get(f"/api/v1/runs/{run_id}/metrics").json()["metrics"]
    assert [m["step"] for m in after] == list(range(1, ckpt + 3))
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("id", "time")} for m in ms]  # noqa: E731
    assert strip(after[:ckpt]) == strip(before)  # the steps before the checkpoint as they were
    command = [x for x in tn.get(f"/api/v1/runs/{run_id}/log").json()["lines"] if x.startswith("$ lmlab ")]
    assert command[-1].endswith(f"--resume --max-steps {ckpt + 2}")
    assert tn.get("/api/v1/models/base-long").json()["origin"]["steps"] == ckpt + 2


def test_the_distill_memory_check_is_the_students(tn):
    """The memory check of a distillation measured the teacher (base: tiny) and let through a student that
    could never train here (gpt2-gpt2-124m at batch 4096: ~400 GiB), which `lmlab tune distill` refuses."""
    state = tn.app.app.state.lmlab
    teacher = ModelConfig.load(Workspace(tn.workspace).model_path("base") / "config.json")
    student = ModelConfig.preset("gpt2-gpt2-124m", vocab_size=teacher.vocab_size)
    want = estimate(student, 4096, state.memory_budget, seq_len=48)
    assert estimate(teacher, 4096, state.memory_budget).fits and not want.fits and want.seq_len == 48
    assert upload(tn, "student.txt", TEXT.encode()).status_code == 201
    r = tn.post("/api/v1/runs/tune", json={"method": "distill", "model": "base", "new_model": "big-student",
                                           "books": ["student.txt"], "preset": "gpt2-gpt2-124m", "batch_size": 4096})
    assert (r.status_code, r.json()["detail"]) == (422, want.reason), r.text
    assert r.json()["error"]["key"] == "memory_over_budget"


def test_a_distill_run_equals_the_cli_and_makes_a_student(tn, tmp_path):
    """The tab's distillation: `base` teaches a new gpt2-tiny student on a book; the metrics equal the CLI's
    with the flags written out, and the student is registered with its teacher as parent and steps of its own."""
    assert upload(tn, "lessons.txt", ((TEXT + "\n") * 30).encode()).status_code == 201
    body = {"method": "distill", "model": "base", "new_model": "base-student", "books": ["lessons.txt"],
            "preset": "gpt2-tiny", "max_steps": 3, "batch_size": 2, "lr": 1e-3, "save_every": 2,
            "temperature": 1.5, "alpha": 0.7}
    r = tn.post("/api/v1/runs/tune", json=body)
    assert r.status_code == 201, r.text
    run = finished(tn, r.json()["id"])
    assert (run["status"], run["current_step"], run["books"]) == ("completed", 3, ["lessons.txt"]), run
    got = [{k: v for k, v in m.items() if k not in (*TIMING, "id", "time")}
           for m in tn.get(f"/api/v1/runs/{run['id']}/metrics").json()["metrics"]]
    assert [m["step"] for m in got if "loss" in m] == [1, 2, 3] and all("kd_loss" in m for m in got if "loss" in m)
    cli = cli_metrics(tn, tmp_path / "cli", "distill", "--teacher", "models/base", "--preset", "gpt2-tiny",
                      "--data", "books/lessons.txt", "--max-steps", "3", "--batch-size", "2", "--lr", "0.001",
                      "--save-every", "2", "--seed", "0", "--log-every", "1", "--eval-every", "0",
                      "--mode", "logits", "--temperature", "1.5", "--alpha", "0.7")
    assert got == cli
    model = tn.get("/api/v1/models/base-student").json()
    assert model["origin"] == {"kind": "tune", "parent": "base", "run_id": run["id"], "method": "distill",
                               "preset": "gpt2-tiny", "mode": "logits", "steps": 3}
    assert model["trained_steps"] == 3  # its own, not the teacher's
    for extra, code, why in (({"lora_rank": 4}, 422, "lora_rank is not a setting of distill runs"),
                             ({"preset": "gpt2-huge"}, 422, "preset ('gpt2-huge') is unknown; choose one of "),
                             ({"books": ["nope.txt"]}, 404, "book 'nope.txt' not found"),
                             ({"dataset": "chats.jsonl"}, 422, "dataset is not a setting of distill runs")):
        r = tn.post("/api/v1/runs/tune", json={**body, "new_model": "x", **extra})
        assert r.status_code == code and r.json()["detail"].startswith(why), r.text


def test_a_run_is_refused_where_a_link_would_take_its_copy_of_the_data_out_of_the_workspace(tmp_path):
    """runs/run-N (or its dataset.jsonl) made a symbolic link before the run starts: the copy of the dataset
    went through it, outside the workspace (a file there overwritten). Now a 409 naming the link, no run, and
    nothing written outside."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    outside.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own\n")
    tok = Tokenizer.train([TEXT], kind="char", vocab_size=120)
    save_pretrained(Workspace(ws).model_path("base"), Transformer(ModelConfig.preset(
        "gpt2-tiny", vocab_size=len(tok) + 8, n_layer=1, block_size=48)), tok)
    with client(settings(ws, max_jobs=1)) as c:
        assert put(c, "chats.jsonl", "conversations", CHATS).status_code == 201
        runs = ws / "runs"
        runs.mkdir(exist_ok=True)
        for i in range(1, 4):
            (runs / f"run-{i}").symlink_to(outside, target_is_directory=True)
        r = c.post("/api/v1/runs/tune", json={**SFT, "new_model": "linked"})
        assert r.status_code == 409 and "symbolic link" in r.json()["detail"], r.text
        for i in range(1, 4):
            (runs / f"run-{i}").unlink()
            (runs / f"run-{i}").mkdir()
            (runs / f"run-{i}" / "dataset.jsonl").symlink_to(victim)
        r = c.post("/api/v1/runs/tune", json={**SFT, "new_model": "linked"})
        assert r.status_code == 409 and "symbolic link" in r.json()["detail"], r.text
        assert c.get("/api/v1/runs").json() == []
    assert list(outside.iterdir()) == [] and victim.read_text() == "the user's own\n"
