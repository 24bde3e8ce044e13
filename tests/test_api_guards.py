"""Guards the Python API lacked where the CLI had them, or both lacked (a review of the Python API): one path
given where a list of sources is taken, files and folders replaced without overwrite=True, settings of the wrong
type or out of range that crashed later (or wrote a report of nothing), docstring examples that did not run.
Each test fails without its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.data import documents
from lmlab.tokenizers import Tokenizer

TEXT = "Once upon a time a small fox ran to the river. Жил-был кот у синего моря. " * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], kind="bpe", vocab_size=300)


@pytest.fixture
def books(tmp_path, monkeypatch):
    """A folder of two books, the current folder; a walk of any folder outside tmp_path fails the test (the old
    code walked "/" for "./books")."""
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT, encoding="utf-8")
    (folder / "b.txt").write_text("A different book about the sea and its fish. " * 30, encoding="utf-8")
    walk = documents._walk

    def only_here(path):
        assert Path(path).resolve().is_relative_to(tmp_path), f"walked {path}"
        return walk(path)

    monkeypatch.setattr(documents, "_walk", only_here)
    monkeypatch.chdir(tmp_path)
    return folder


def test_one_path_as_a_string_is_one_source_not_its_characters(books, tok, tmp_path):
    from lmlab.data import prepare
    from lmlab.data.dedup import dedup
    from lmlab.data.inspect import inspect

    for one in ("./books", str(books), books, "books/a.txt"):
        assert documents.find_documents(one) == documents.find_documents([one])
    one = prepare("books/a.txt", tok, tmp_path / "one")  # FileNotFoundError: no such file or folder: b
    listed = prepare(["books/a.txt"], tok, tmp_path / "listed")
    assert (one.path / "tokens.bin").read_bytes() == (listed.path / "tokens.bin").read_bytes()
    report = inspect("./books", tok)
    assert [s["source"] for s in report["sources"]] == ["./books"] and report["total"]["documents"] == 2
    assert dedup(str(books), tmp_path / "dd").stats["documents"] == 2
    with pytest.raises(ValueError, match="^a source is empty; name a file, folder or glob$"):
        documents.find_documents(["books", ""])  # "" was the current folder, all of it
    from lmlab.lab.mix import MixLabConfig, run_mix_lab
    with pytest.raises(ValueError, match="^a mixture needs at least two sources, got 1$"):  # 5 sources: b o o k s
        run_mix_lab(tmp_path / "mix", "books", "books/a.txt", [0], MixLabConfig.quick())
    assert not (tmp_path / "mix").exists()


def test_a_tokenizer_replaces_a_file_only_when_asked(tok, tmp_path, capsys):
    from lmlab.cli import main
    from lmlab.models import ModelConfig, Transformer
    from lmlab.models.io import save_pretrained

    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    model = save_pretrained(tmp_path / "model", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=len(tok))), tok)
    before = (model / "tokenizer.json").read_bytes()
    for out, file in ((book, book), (model, model / "tokenizer.json")):
        sentence = f"{file} exists; replace it with --force (overwrite=True in Python), or choose another name"
        assert main(["tokenizer", "train", str(book), "--kind", "char", "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"lmlab: error: {sentence}\n"
        with pytest.raises(FileExistsError) as refused:
            Tokenizer.train([TEXT], kind="char").save(out)
        assert str(refused.value) == sentence
    assert book.read_text(encoding="utf-8") == TEXT and (model / "tokenizer.json").read_bytes() == before
    assert main(["tokenizer", "train", str(book), "--kind", "char", "--out", str(book), "--force"]) == 0
    assert Tokenizer.load(book).kind == "char"
    assert Tokenizer.train([TEXT], kind="char").save(model, overwrite=True) == model / "tokenizer.json"
    assert Tokenizer.load(model).kind == "char"


def test_lmlab_save_and_save_adapter_replace_a_folder_only_when_asked(tok, tmp_path, monkeypatch):
    import lmlab
    from lmlab.models import ModelConfig, Transformer
    from lmlab.tune.lora import LoRAConfig, apply_lora, save_adapter

    torch = pytest.importorskip("torch")
    cfg = ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=32)
    trained, fresh = Transformer(cfg), Transformer(cfg)
    model = lmlab.save(tmp_path / "model", trained, tok)
    weights = (model / "model.safetensors").read_bytes()
    sentence = (f"{model} exists and is not empty; replace what it holds with --force (overwrite=True in Python), "
                "or choose another folder")
    with pytest.raises(FileExistsError) as refused:
        lmlab.save(model, fresh)  # replaced the trained weights and removed the tokenizer, without a word
    assert str(refused.value) == sentence and (model / "model.safetensors").read_bytes() == weights
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="notes exists and is not empty"):
        lmlab.save(tmp_path / "notes", fresh)
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(ValueError, match="^the model folder \\(path\\) is empty; name the folder to save the model"):
        lmlab.save("", fresh, overwrite=True)  # wrote a model among the files of the current folder
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["mine.txt"]
    lmlab.save(model, fresh, overwrite=True)
    again, again_tok = lmlab.load(model)
    assert again_tok is None and all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                                       fresh.state_dict().values()))

    adapter = save_adapter(apply_lora(Transformer(cfg), LoRAConfig(rank=2)), tmp_path / "adapter")
    files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    other = apply_lora(Transformer(cfg), LoRAConfig(rank=4))
    with pytest.raises(FileExistsError, match=f"^{adapter} exists and is not empty"):
        save_adapter(other, adapter)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == files
    with pytest.raises(ValueError, match="^the adapter folder \\(out_dir\\) is empty"):
        save_adapter(other, "", overwrite=True)
    save_adapter(other, adapter, overwrite=True)
    assert (adapter / "adapter_config.json").read_bytes() != files["adapter_config.json"]


@pytest.mark.parametrize("name", ["corpus.txt", "demo.json"])
def test_the_demo_does_not_replace_a_users_file_of_a_name_it_writes(tmp_path, capsys, name):
    from lmlab.cli import main
    from lmlab.train.recipes import run_demo

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / name).write_text("my own corpus, months of work")
    sentence = (f"{mine} holds {name}, which a new run would overwrite; choose a new folder for the run (if it is "
                "what a run stopped before its first checkpoint left, delete the folder)")
    assert main(["demo", "--out", str(mine), "--max-steps", "1"]) == 2
    assert capsys.readouterr().err == f"lmlab: error: {sentence}\n"
    with pytest.raises(ValueError) as refused:
        run_demo(mine, max_steps=1, echo=lambda *_: None)
    assert str(refused.value) == sentence
    assert [p.name for p in mine.iterdir()] == [name] and (mine / name).read_text() == "my own corpus, months of work"


def test_prepare_texts_replaces_a_dataset_only_when_asked(tok, tmp_path):
    from lmlab.data import prepare, prepare_texts

    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    ds = prepare([book], tok, tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in ds.path.iterdir()}
    sentence = (f"{tmp_path / 'ds'} already holds a dataset; replace it with --force (overwrite=True in Python), or "
                "choose another folder")
    for call in (lambda: prepare([book], tok, tmp_path / "ds"),
                 lambda: prepare_texts(["a tiny other text, nothing like the book " * 20], tok, tmp_path / "ds")):
        with pytest.raises(FileExistsError) as refused:
            call()
        assert str(refused.value) == sentence
    assert {p.name: p.read_bytes() for p in ds.path.iterdir()} == before
    small = prepare_texts(["a tiny other text, nothing like the book " * 20], tok, tmp_path / "ds", overwrite=True)
    assert small.num_tokens < ds.num_tokens


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    from lmlab.models import ModelConfig, Transformer
    from lmlab.models.io import save_pretrained

    return save_pretrained(tmp_path_factory.mktemp("guards") / "model",
                           Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=32)), tok)


def test_the_interp_reports_check_out_and_their_settings_in_the_library(model_dir, tmp_path, monkeypatch, capsys):
    from lmlab.cli import main
    from lmlab.lab import ttc
    from lmlab.lab.facts import runner
    from lmlab.lab.interp.report import run_attention, run_lens, run_patch, run_steer
    from lmlab.lab.interp.saelab import run_sae, run_sae_facts

    def trained(*_, **__):
        raise AssertionError("trained models for a folder it should have refused")

    monkeypatch.setattr(runner, "run_one", trained)
    monkeypatch.setattr(ttc, "pretrain", trained)
    done = tmp_path / "done"  # a user's own files, with the names a report writes (no results.json)
    done.mkdir()
    (done / "report.html").write_text("my notes")
    (done / "lens.png").write_bytes(b"my plot")
    for name in ("positive", "negative", "neutral"):
        (tmp_path / f"{name}.txt").write_text(f"{name} line one\n{name} line two\n")
    steer = {k: tmp_path / f"{k}.txt" for k in ("positive", "negative", "neutral")}
    sentence = f"{done} exists and is not an empty folder; choose another --out (nothing is overwritten)"
    for call in (lambda: run_lens(model_dir, "Once upon", done), lambda: run_attention(model_dir, "Once upon", done),
                 lambda: run_patch(model_dir, "Once upon", "Once a fox", done),
                 lambda: run_steer(model_dir, steer["positive"], steer["negative"], 1, done, neutral=steer["neutral"]),
                 lambda: run_sae(model_dir, [str(steer["neutral"])], done, {"kind": "topk", "k": 2, "steps": 1}, 64),
                 lambda: run_sae_facts(done, [0], quick=True), lambda: ttc.run(done, quick=True)):
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == sentence
    assert sorted(p.name for p in done.iterdir()) == ["lens.png", "report.html"]
    assert (done / "report.html").read_text() == "my notes" and (done / "lens.png").read_bytes() == b"my plot"

    for k in (0, -1):  # IndexError; a torch RuntimeError
        with pytest.raises(ValueError, match=f"^--top-k \\({k}\\) must be >= 1$"):
            run_lens(model_dir, "Once upon", tmp_path / "lens", k=k)
    direction = tmp_path / "direction"  # a direction of the user's, without a report
    direction.mkdir()
    (direction / "direction.safetensors").write_bytes(b"mine")
    with pytest.raises(ValueError, match=f"^{direction} exists and is not an empty folder; choose another --out "):
        run_steer(model_dir, steer["positive"], steer["negative"], 1, direction, neutral=steer["neutral"])
    assert (direction / "direction.safetensors").read_bytes() == b"mine"
    for coefs, n, message in (([0, float("nan")], 4, "--coefs must be finite numbers"),
                              ([0, 1], 0, "--samples and --max-new-tokens must be >= 1")):
        with pytest.raises(ValueError) as refused:  # nan: after direction.json and .safetensors were written
            run_steer(model_dir, steer["positive"], steer["negative"], 1, tmp_path / "steer", neutral=steer["neutral"],
                      coefs=coefs, n_prompts=n, max_new_tokens=2)
        assert str(refused.value) == message and not (tmp_path / "steer").exists()
    assert main(["lab", "interp", "steer", "--model", str(model_dir), "--positive", str(steer["positive"]),
                 "--negative", str(steer["negative"]), "--neutral", str(steer["neutral"]), "--layer", "1",
                 "--coefs", "0,nan", "--out", str(tmp_path / "steer")]) == 2
    assert capsys.readouterr().err == "lmlab: error: --coefs must be finite numbers\n"
    assert main(["lab", "interp", "lens", "--model", str(model_dir), "--prompt", "Once", "--out", str(done)]) == 2
    assert capsys.readouterr().err == f"lmlab: error: {sentence}\n"
    assert main(["lab", "ttc", "--quick", "--out", str(done)]) == 2
    assert capsys.readouterr().err == f"lmlab: error: {sentence}\n"
    assert (done / "report.html").read_text() == "my notes"
    assert not (tmp_path / "steer").exists() and not (tmp_path / "lens").exists()


def test_an_sae_name_is_one_folder_name_under_the_model(model_dir, tmp_path, capsys):
    import shutil

    from lmlab.cli import main
    from lmlab.lab.interp.saelab import run_sae

    model_dir = shutil.copytree(model_dir, tmp_path / "models" / "model")
    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    settings = {"kind": "topk", "k": 2, "steps": 1, "n_features": 16}
    cases = [("../../escaped", "--name '../../escaped' must be one folder name, without a path separator or NUL"),
             ("a\\b", "--name 'a\\\\b' must be one folder name, without a path separator or NUL"),
             ("a\x00b", "--name 'a\\x00b' must be one folder name, without a path separator or NUL"),
             ("..", "--name '..' must not start with '.'"), (".hidden", "--name '.hidden' must not start with '.'"),
             ("", "--name must not be empty"),
             ("я" * 121, "--name is 242 bytes in UTF-8, longer than the limit of 241 (a file name holds 255, less "
                         "the temporary name's)")]
    for name, message in cases:
        with pytest.raises(ValueError) as refused:
            run_sae(model_dir, [str(book)], tmp_path / "sae", settings, 256, name=name)
        assert str(refused.value) == message
    assert main(["lab", "interp", "sae", "--model", str(model_dir), "--books", str(book), "--tokens", "256",
                 "--steps", "1", "--features", "16", "--k", "2", "--name", "../../escaped",
                 "--out", str(tmp_path / "sae")]) == 2
    assert capsys.readouterr().err == f"lmlab: error: {cases[0][1]}\n"
    assert not (tmp_path / "sae").exists() and not (model_dir.parent / "escaped").exists()
    assert not (model_dir / "sae").exists()
    run_sae(model_dir, [str(book)], tmp_path / "sae", settings, 256, name="я" * 120)  # 240 bytes: a name that fits
    assert (model_dir / "sae" / ("я" * 120) / "sae.safetensors").is_file()


def test_dedup_seed_out_of_numpys_range_is_a_one_line_error(books, capsys):
    from lmlab.cli import main
    from lmlab.data.dedup import DedupConfig

    assert main(["data", "dedup", "books", "--out", "dd", "--seed", "-1"]) == 2  # "internal error" from numpy
    assert capsys.readouterr().err == "lmlab: error: seed (-1) must be >= 0\n"
    assert not Path("dd").exists()
    for settings, message in (({"seed": 2**32}, "seed (4294967296) must be < 4294967296"),
                              ({"ngram": 2.5}, "ngram (2.5) must be an integer"),  # a TypeError while shingling
                              ({"bands": float("nan")}, "bands (nan) must be an integer")):
        with pytest.raises(ValueError) as refused:
            DedupConfig(**settings)
        assert str(refused.value) == message
    assert DedupConfig(seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("where, name, settings, message", [
    ("lmlab.tune.distill", "DistillConfig", {"temperature": "3"}, "temperature ('3') must be a number"),
    ("lmlab.tune.distill", "DistillConfig", {"teacher_samples": float("nan")},
     "teacher_samples (nan) must be an integer"),
    ("lmlab.lab.mix", "MixLabConfig", {"proxies": "3"}, "proxies ('3') must be an integer"),
    ("lmlab.lab.mix", "MixLabConfig", {"lr": -1}, "lr (-1) must be > 0"),
    ("lmlab.lab.mix", "MixLabConfig", {"proxy_embd": float("nan")}, "proxy_embd (nan) must be an integer"),
    ("lmlab.lab.design", "DesignLabConfig", {"steps": "3"}, "steps ('3') must be an integer"),
    ("lmlab.lab.design", "DesignLabConfig", {"vocab_size": -1}, "vocab_size (-1) must be >= 260"),
    ("lmlab.lab.merge", "MergeLabConfig", {"block_size": "3"}, "block_size ('3') must be an integer"),
    ("lmlab.lab.merge", "MergeLabConfig", {"lr": float("nan")}, "lr (nan) must be a finite number"),
    ("lmlab.lab.influence", "InfluenceLabConfig", {"documents": "3"}, "documents ('3') must be an integer"),
    ("lmlab.lab.influence", "InfluenceLabConfig", {"lr": float("nan")}, "lr (nan) must be a finite number"),
    ("lmlab.lab.ttc", "Scale", {"steps": "3"}, "steps ('3') must be an integer"),
    ("lmlab.lab.ttc", "Scale", {"prompts": -1}, "prompts (-1) must be >= 1"),
    ("lmlab.lab.ttc", "Scale", {"temperature": float("nan")}, "temperature (nan) must be a finite number"),
    ("lmlab.lab.ttc", "Scale", {"small": (2,)}, "small ((2,)) must be (n_layer, n_embd), both >= 1"),
    ("lmlab.lab.ttc", "Scale", {"seed": 2**31}, "seed (2147483648) must be < 2147483648"),
])
def test_lab_configs_refuse_strings_nan_and_out_of_range_values_when_made(where, name, settings, message):
    """A TypeError at the first comparison, or a run that started (nan steps, a negative lr) before failing."""
    import importlib

    with pytest.raises(ValueError) as refused:
        getattr(importlib.import_module(where), name)(**settings)
    assert str(refused.value) == message


@pytest.mark.parametrize("where, name, settings, message", [
    ("lmlab.models", "GenerationConfig", {"num_beams": 2**63}, f"num_beams ({2**63}) must be <= 1099511627776"),
    ("lmlab.models", "GenerationConfig", {"length_penalty": 1000}, "length_penalty (1000) must be <= 10"),
    ("lmlab.models", "GenerationConfig", {"length_penalty": -11}, "length_penalty (-11) must be >= -10"),
    ("lmlab.lab.selfplay.azr", "AZRConfig", {"lr": 1e30}, "lr (1e+30) must be <= 10"),
    ("lmlab.lab.selfplay.azr", "AZRConfig", {"warmup_lr": 1e30}, "warmup_lr (1e+30) must be <= 10"),
    ("lmlab.tune.distill", "DistillConfig", {"teacher_samples": 2**63},
     f"teacher_samples ({2**63}) must be <= 1000000"),
    ("lmlab.tune.distill", "DistillConfig", {"temperature": 1e30}, "temperature (1e+30) must be <= 100"),
    ("lmlab.train", "TrainConfig", {"max_steps": 1, "weight_decay": 1e30}, "weight_decay (1e+30) must be <= 10"),
    ("lmlab.tune.lora", "LoRAConfig", {"alpha": 2.0**63}, "LoRA alpha (9.22337e+18) must be at most 1e+06"),
    ("lmlab.server.app", "Settings", {"torch_threads": 2**32}, "torch_threads (4294967296) must be at most the "),
])
def test_configs_refuse_values_the_code_cannot_use_when_made(where, name, settings, message):
    """A CLI fuzz found these ending in "lmlab: internal error" (an OverflowError in beam scores, a TypeError in
    torch.zeros or torch.randint, NaN sampling probabilities, a failed server start) or in a divergence blamed on
    --lr; the library took them as the command line did."""
    import importlib

    with pytest.raises(ValueError) as refused:
        getattr(importlib.import_module(where), name)(**settings)
    assert str(refused.value).startswith(message)


def _example(doc: str) -> str:
    """The indented code block of a module docstring."""
    import textwrap

    lines = doc.split("\n\n")
    return textwrap.dedent(next(block for block in lines if block.startswith("    ")))


def test_the_docstring_examples_run(tmp_path, monkeypatch, capsys):
    """lmlab's used `tok` before it was made; the scorer's called bits_per_byte(model, ...) (it takes nats and
    bytes) and a task that is not shipped."""
    import lmlab
    from lmlab.eval import scorer

    monkeypatch.chdir(tmp_path)
    exec(_example(lmlab.__doc__), {})
    printed = capsys.readouterr().out  # 50 characters at most of a char tokenizer's random model
    assert printed.endswith("\n") and 0 < len(printed) <= 51 and (tmp_path / "my-model" / "config.json").is_file()
    model, tokenizer = lmlab.load("my-model")
    scope = {"model": model, "tokenizer": tokenizer}
    *setup, bpb, task = _example(scorer.__doc__).strip().splitlines()
    exec("\n".join(setup), scope)
    assert eval(bpb, scope) > 0 and eval(task, scope)["task"] == "fables-mc"


def test_bounds_the_cli_checked_are_checked_by_the_library(model_dir, tok, tmp_path, capsys):
    from lmlab.cli import main
    from lmlab.data.inspect import inspect
    from lmlab.eval import load_task, paired_bootstrap, run_task
    from lmlab.lab.drift import run_drift
    from lmlab.lab.influence import run_influence
    from lmlab.models.io import load_pretrained

    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    tok.save(tmp_path / "tok.json")
    model, _ = load_pretrained(model_dir)
    run, out = tmp_path / "run", tmp_path / "out"  # the checks come first: no run is read, nothing is written
    passages = "--max-passages and --top must be >= 1, --proj-dim >= 0"  # 0: a report listing no passages
    cases = [(lambda: inspect([book], tok, planned_tokens=-5), "--planned-tokens (-5) must be > 0"),  # "fine"
             (lambda: paired_bootstrap([0, 1, 1], [1, 1, 1], resamples=0), "--resamples (0) must be >= 1"),
             (lambda: run_task(model, tok, load_task("fables-mc"), batch_size=0), "--batch-size must be >= 1"),
             (lambda: run_drift(run, out, top=0), "--top (0) must be >= 1"),  # a report listing no tokens
             (lambda: run_influence(run, out, "a target", top=0), passages),
             (lambda: run_influence(run, out, "a target", max_passages=0), passages)]
    for call, message in cases:
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == message
    for argv, message in (
            (["data", "inspect", str(book), "--tokenizer", str(tmp_path / "tok.json"), "--planned-tokens", "-5"],
             "--planned-tokens (-5) must be > 0"),
            (["lab", "data", "drift", "--run", str(run), "--out", str(out), "--top", "0"], "--top (0) must be >= 1"),
            (["lab", "data", "influence", "--run", str(run), "--target", "a target", "--out", str(out), "--top", "0"],
             passages)):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"lmlab: error: {message}\n"
    assert not out.exists()


def test_a_sampling_seed_past_64_bits_is_refused_not_read_as_another(model_dir, capsys):
    """2**64 and 2**70 sampled what seed 0 samples (a seed's low 64 bits were kept)."""
    import lmlab
    from lmlab.cli import main

    model, tok = lmlab.load(model_dir)
    for seed, message in ((2**64, f"seed ({2**64}) must be < {2**64}"), (2**70, f"seed ({2**70}) must be < {2**64}"),
                          (-2**63 - 1, f"seed ({-2**63 - 1}) must be >= {-2**63}")):
        with pytest.raises(ValueError) as refused:
            lmlab.generate(model, tok, "Once", max_new_tokens=4, seed=seed)
        assert str(refused.value) == message
    assert main(["generate", str(model_dir), "--prompt", "Once", "--max-new-tokens", "4", "--seed", str(2**64)]) == 2
    assert capsys.readouterr().err == f"lmlab: error: seed ({2**64}) must be < {2**64}\n"
    ends = [lmlab.generate(model, tok, "Once", max_new_tokens=8, seed=s) for s in (2**64 - 1, -2**63, 0)]
    assert ends[0] == lmlab.generate(model, tok, "Once", max_new_tokens=8, seed=2**64 - 1) and len(set(ends)) == 3


@pytest.mark.parametrize("settings, message", [({"steps": "3"}, "steps ('3') must be an integer"),
                                               ({"lr": -1}, "lr (-1) must be > 0"),
                                               ({"sft_lr": float("nan")}, "sft_lr (nan) must be a finite number"),
                                               ({"warmup_steps": -1}, "warmup_steps (-1) must be >= 0")])
def test_the_arena_config_is_checked_as_the_others(settings, message):
    from lmlab.lab.arena import ArenaConfig

    with pytest.raises(ValueError) as refused:
        ArenaConfig(**settings)
    assert str(refused.value) == message
