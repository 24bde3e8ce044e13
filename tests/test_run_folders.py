"""A new run never writes over what a folder holds: `lmlab train`, `tune sft|dpo|grpo|distill` refuse an --out that
holds a file they would write (a model directory's config.json, a user's metrics.jsonl or data.jsonl) in one line,
exit 2, and leave every file as it was. They wrote into such a folder and exited 0: `tune sft --out MODEL` replaced
the model's config.json and tokenizer.json, and the model no longer loaded."""

from __future__ import annotations

import pytest
import torch

from lmlab.cli import main
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.tune import preference_task
from lmlab.tune.chats import SHIPPED

BOOK = "Once upon a time a small fox lived by the river. " * 40


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    (root / "book.txt").write_text(BOOK, encoding="utf-8")
    tok = Tokenizer.train([BOOK, SHIPPED.read_text(encoding="utf-8")], kind="bpe", vocab_size=320)
    torch.manual_seed(0)
    save_pretrained(root / "model", Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok),
                                                                   block_size=128)), tok)
    return root


def commands(root, out):
    model, book, few = str(root / "model"), str(root / "book.txt"), ["--max-steps", "1", "--batch-size", "2"]
    return {
        "train": ["train", book, "--preset", "llama-tiny", "--out", out, *few],
        "sft": ["tune", "sft", "--model", model, "--data", str(SHIPPED), "--out", out, *few],
        "dpo": ["tune", "dpo", "--model", model, "--data", str(preference_task.shipped() / "pairs.jsonl"),
                "--out", out, *few],
        "grpo": ["tune", "grpo", "--model", model, "--task", "format", "--out", out, "--steps", "1",
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-prompts", "2"],
        "distill": ["tune", "distill", "--teacher", model, "--preset", "llama-tiny", "--data", book, "--out", out,
                    *few],
    }


@pytest.mark.parametrize("command", ["train", "sft", "dpo", "grpo", "distill"])
@pytest.mark.parametrize("held", ["config.json", "metrics.jsonl", "a model"])
def test_a_new_run_refuses_a_folder_holding_what_it_would_write(tmp_path, start, capsys, command, held):
    out = tmp_path / "out"
    if held == "a model":  # --out is a model directory (the one being fine-tuned, say)
        save_pretrained(out, Transformer(ModelConfig.preset("llama-tiny", vocab_size=320, block_size=128)),
                        Tokenizer.load(start / "model" / "tokenizer.json"))
        held = "config.json"
    else:
        out.mkdir()
        (out / held).write_text("the user's own\n")
    (out / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(commands(start, str(out))[command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmlab: error: {out} holds {held}, which a new run would overwrite; choose a new folder for "
                   "the run (if it is what a run stopped before its first checkpoint left, delete the folder)"], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("command", ["train", "sft", "distill"])
def test_files_the_command_writes_before_training_are_guarded_too(tmp_path, start, capsys, command):
    """tokenizer.json (all three) and the copy of the data (sft's data.jsonl, train's and distill's data/)."""
    names = {"train": ["tokenizer.json", "data"], "sft": ["tokenizer.json", "data.jsonl", "chat_template.jinja"],
             "distill": ["tokenizer.json", "data"]}[command]
    for name in names:
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("the user's own\n") if "." in name else (out / name).mkdir()
        assert main(commands(start, str(out))[command]) == 2
        assert f"{out} holds {name}, which a new run would overwrite" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [name]


def test_a_folder_of_other_files_still_takes_a_run(tmp_path, start, capsys):
    """Files no run writes stay, and the run goes in beside them (the server puts a run's log and its copy of
    the data there first)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text("the server's\n")
    assert main(commands(start, str(out))["sft"]) == 0
    assert (out / "log.txt").read_text() == "the server's\n" and (out / "final" / "config.json").is_file()


def test_only_the_first_ddp_rank_checks_the_files(tmp_path, monkeypatch):
    """Every rank checks a new run's folder before training, but rank 0 writes config.json and metrics.jsonl
    as soon as its own check passes: a later rank found them and refused its own run (CI: a DDP run's rank 1
    exited, rank 0 lost its peer in backward). Other runs' checkpoints are still refused on every rank."""
    from lmlab.train.checkpoint import refuse_existing_run
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("RANK", "1")
    refuse_existing_run(tmp_path)
    (tmp_path / "final").mkdir()
    with pytest.raises(ValueError, match="already holds a run"):
        refuse_existing_run(tmp_path)
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "final").rmdir()
    with pytest.raises(ValueError, match="holds config.json, which a new run would overwrite"):
        refuse_existing_run(tmp_path)



def test_a_run_killed_in_its_first_save_is_not_offered_a_resume(tmp_path):
    """A kill while the first checkpoint was written leaves only its temporary folder: the rerun said "resume
    it", and the resume "no checkpoint to resume from"; now both say to start again (a kill -9 review)."""
    from lmlab.train.checkpoint import refuse_existing_run
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-step-25").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds config.json, which a new run would overwrite; choose a new folder"):
        refuse_existing_run(tmp_path)
    (tmp_path / "checkpoints" / "step-25").mkdir()
    with pytest.raises(ValueError, match="already holds a run; resume it"):
        refuse_existing_run(tmp_path)

def test_a_lora_checkpoint_or_a_foreign_one_is_a_one_line_error(tmp_path):
    """load_model gives the names it missed as sets: `missing[:3]` raised TypeError ('set' object is not
    subscriptable), so `lmlab eval RUN --all-checkpoints` on a LoRA run ended in "internal error"."""
    import json

    import pytest
    import torch
    from safetensors.torch import save_file

    from lmlab.models import ModelConfig, Transformer
    from lmlab.train.checkpoint import checkpoint_model

    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=64, n_layer=1, block_size=16)
    tensors = {k: v.contiguous() for k, v in Transformer(cfg).state_dict().items() if k != "lm_head.weight"}
    for name, extra in (("lora", "blocks.0.attn.proj.lora_A"), ("foreign", "blocks.0.attn.proj.other")):
        step = tmp_path / name / "step-1"
        step.mkdir(parents=True)
        (step / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
        save_file({**tensors, extra: torch.zeros(2, 2)}, str(step / "model.safetensors"))
        message = ("is a checkpoint of a LoRA run" if name == "lora" else
                   f"does not match its config: missing \\[\\], unexpected \\['{extra}'\\]")
        with pytest.raises(ValueError, match=message):
            checkpoint_model(step)


def test_a_run_without_final_or_a_checkpoint_given_as_a_model_says_what_it_is(tmp_path, capsys):
    """What a killed run leaves (its folder without final/, its checkpoints) given to info / eval / generate: the
    run's config.json was read as a model's ("unknown ModelConfig field(s): train, model, ...") or the folder was
    "not a model directory: model.safetensors is missing" (a kill -9 review)."""
    import shutil
    (tmp_path / "book.txt").write_text("Жили-были дед да баба, и была у них курочка Ряба. " * 40)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "book.txt"), "--out", str(run), "--preset", "llama-tiny",
                 "--tokenizer-kind", "char", "--max-steps", "2", "--save-every", "1", "--keep-last", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Жили"]) == 2  # a finished run: generate takes its final/
    assert capsys.readouterr().err.strip() == (f"lmlab: error: {run} is a training run's folder, not a model "
                                               f"directory: its model is {run / 'final'}")
    shutil.rmtree(run / "final")
    step = run / "checkpoints" / "step-2"
    for argv in (["info", run], ["eval", run, tmp_path / "book.txt"], ["generate", run, "--prompt", "Жили"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"lmlab: error: {run} is a training run without a final/ model (it stopped before the end): "
                       "resume it with its command's --resume, or give a model directory"), err
    assert main(["info", str(step)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lmlab: error: {step} is a checkpoint of the training run {run}, not a model directory: score its "
        f"checkpoints with `lmlab eval {run} --all-checkpoints`, or resume the run to its final/ model")
