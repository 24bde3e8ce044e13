"""`lmlab export` / `lmlab import`, and every way the input can be wrong: one clear line, exit code 2."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from lmlab.cli import main  # noqa: E402
from lmlab.interop import export_hf, import_hf  # noqa: E402
from lmlab.models import ModelConfig, Transformer  # noqa: E402
from lmlab.models.io import load_pretrained, save_pretrained  # noqa: E402
from lmlab.tokenizers import Tokenizer  # noqa: E402

TEXT = "the cat sat on the mat. the dog sat on the log. " * 20


@pytest.fixture
def model_dir(tmp_path):
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, block_size=64)).eval()
    return save_pretrained(tmp_path / "model", model, tok)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fails(capsys, match, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("lmlab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def test_export_import_round_trip_through_the_cli(capsys, model_dir, tmp_path):
    code, out, _ = run(capsys, "export", "hf", model_dir, tmp_path / "hf")
    assert code == 0 and "AutoModelForCausalLM" in out
    code, out, _ = run(capsys, "import", "hf", tmp_path / "hf", tmp_path / "back")
    assert code == 0 and "--init" in out
    original, _ = load_pretrained(model_dir)
    back, _ = load_pretrained(tmp_path / "back")
    idx = torch.randint(0, original.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, original(idx).logits, atol=1e-5, rtol=1e-5)
    pytest.importorskip("gguf")
    code, out, _ = run(capsys, "export", "gguf", model_dir, tmp_path / "m.gguf", "--dtype", "q8_0")
    assert code == 0 and (tmp_path / "m.gguf").stat().st_size > 0 and "q8_0" in out


def test_export_errors(capsys, model_dir, tmp_path):
    fails(capsys, "model directory not found", "export", "hf", tmp_path / "nope", tmp_path / "out")
    (tmp_path / "model" / "tokenizer.json").rename(tmp_path / "tok.json")
    fails(capsys, "has no tokenizer.json", "export", "hf", model_dir, tmp_path / "out")
    (tmp_path / "tok.json").rename(tmp_path / "model" / "tokenizer.json")
    fails(capsys, "must differ from the input folder", "export", "hf", model_dir, model_dir)
    # a switch transformers' LlamaForCausalLM cannot express
    tok = Tokenizer.load(model_dir)
    odd = save_pretrained(tmp_path / "odd", Transformer(ModelConfig.preset("llama-tiny", vocab_size=300,
                                                                          bias=True)), tok)
    fails(capsys, "has no LlamaForCausalLM equivalent", "export", "hf", odd, tmp_path / "out")
    # a tokenizer larger than the model's vocabulary
    big = Tokenizer.train([TEXT * 3 + "xyzzy plugh quux"], kind="char", vocab_size=300)
    small = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=10))
    save_pretrained(tmp_path / "small", small)
    big.save(tmp_path / "small" / "tokenizer.json")
    fails(capsys, "tokens but vocab_size is 10", "export", "hf", tmp_path / "small", tmp_path / "out")
    fails(capsys, "llama.cpp has no architecture for the gpt family", "export", "gguf",
          save_pretrained(tmp_path / "gpt", Transformer(ModelConfig.preset("gpt-tiny", vocab_size=300)), tok),
          tmp_path / "x.gguf")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse rejects an unknown dtype itself (exit code 2)
        main(["export", "gguf", str(model_dir), str(tmp_path / "x.gguf"), "--dtype", "q4_k"])


def test_export_gguf_never_replaces_the_models_own_files_nor_a_folder(capsys, model_dir, tmp_path, monkeypatch):
    """--force replaces an earlier GGUF, in the model's folder too, but never the model's weights (the model was
    lost) nor a folder; both are refused before the model is read."""
    pytest.importorskip("gguf")
    weights = (model_dir / "model.safetensors").read_bytes()
    assert run(capsys, "export", "gguf", model_dir, model_dir / "m.gguf")[0] == 0
    assert run(capsys, "export", "gguf", model_dir, model_dir / "m.gguf", "--force", "--dtype", "f16")[0] == 0
    monkeypatch.setattr("lmlab.interop.gguf_export.load_model_dir", lambda path: pytest.fail("the model was read"))
    err = fails(capsys, "", "export", "gguf", model_dir, model_dir / "model.safetensors", "--force")
    assert err == (f"lmlab: error: {model_dir / 'model.safetensors'} is a file of the model directory being "
                   f"exported ({model_dir}), not an earlier GGUF export; write the GGUF elsewhere\n")
    assert (model_dir / "model.safetensors").read_bytes() == weights
    err = fails(capsys, "", "export", "gguf", model_dir, tmp_path, "--force")
    assert err == f"lmlab: error: {tmp_path} is a folder; name the .gguf file to write in it\n"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "m.gguf", "model.safetensors",
                                                           "tokenizer.json"]


def test_import_errors(capsys, model_dir, tmp_path):
    hf = export_hf(model_dir, tmp_path / "hf")
    fails(capsys, "checkpoint folder not found", "import", "hf", tmp_path / "nope", tmp_path / "m")

    def variant(name, edit_config=None, drop=(), weights=None, tokenizer=None):
        folder = tmp_path / name
        folder.mkdir()
        for f in hf.iterdir():
            if f.name not in drop:
                (folder / f.name).write_bytes(f.read_bytes())
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        if weights is not None:
            save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(folder / "tokenizer.json", overwrite=True)  # replaces the export's own
        return folder

    fails(capsys, "config.json is missing", "import", "hf", variant("noconfig", drop=("config.json",)), tmp_path / "m")
    fails(capsys, "has no model.safetensors", "import", "hf", variant("noweights", drop=("model.safetensors",)),
          tmp_path / "m")
    pickled = variant("pickled", drop=("model.safetensors",))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    fails(capsys, "never unpickles", "import", "hf", pickled, tmp_path / "m")
    fails(capsys, "has no tokenizer.json", "import", "hf", variant("notok", drop=("tokenizer.json",)), tmp_path / "m")
    fails(capsys, "unsupported architecture 'bert'", "import", "hf",
          variant("bert", lambda c: c.update(model_type="bert")), tmp_path / "m")
    fails(capsys, "holds a LlamaForSequenceClassification", "import", "hf",
          variant("cls", lambda c: c.update(architectures=["LlamaForSequenceClassification"])), tmp_path / "m")
    fails(capsys, "weights do not match", "import", "hf",
          variant("shape", lambda c: c.update(intermediate_size=256)), tmp_path / "m")
    state = load_file(hf / "model.safetensors")
    fails(capsys, "lacks tensor model.norm.weight", "import", "hf",
          variant("missing", weights={k: v for k, v in state.items() if k != "model.norm.weight"}), tmp_path / "m")
    fails(capsys, "cannot hold: model.layers.0.self_attn.q_proj.bias", "import", "hf",
          variant("extra", weights={**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
          tmp_path / "m")
    big = Tokenizer.train([TEXT * 2 + "".join(chr(0x400 + i) for i in range(400))], kind="char", vocab_size=800)
    fails(capsys, "tokens but the model's vocab_size is", "import", "hf", variant("bigtok", tokenizer=big),
          tmp_path / "m")
    shuffled = json.loads((hf / "tokenizer.json").read_text())  # lmlab's specials, but not at ids 0..3
    vocab = shuffled["model"]["vocab"]
    vocab["<PAD>"], vocab["<EOS>"] = vocab["<EOS>"], vocab["<PAD>"]
    for t in shuffled["added_tokens"]:
        t["id"] = vocab[t["content"]]
    bad = variant("wrongspecials")
    (bad / "tokenizer.json").write_text(json.dumps(shuffled))
    fails(capsys, "special tokens at the wrong ids", "import", "hf", bad, tmp_path / "m")
    fails(capsys, "eos_token_id is 7", "import", "hf", variant("eos", lambda c: c.update(eos_token_id=7)),
          tmp_path / "m")
    # malformed files were "lmlab: internal error" (AttributeError, JSONDecodeError, UnicodeDecodeError), exit 1
    for name, index, message in (("list", "[1]", "must be a JSON object, not a list"),
                                 ("notjson", "{", "is not valid JSON"),
                                 ("wmstr", '{"weight_map": "x"}', "weight_map must be an object of tensor names to "
                                                                  "file names, not 'x'")):
        sharded = variant(f"index-{name}", drop=("model.safetensors",))
        (sharded / "model.safetensors.index.json").write_text(index)
        fails(capsys, f"{sharded / 'model.safetensors.index.json'}: {message}" if name == "wmstr" else
              f"{sharded / 'model.safetensors.index.json'} {message}", "import", "hf", sharded, tmp_path / "m")
    latin = variant("latin1")
    (latin / "config.json").write_bytes('{"model_type": "llama", "name": "caf\u00e9"}'.encode("latin-1"))
    fails(capsys, f"{latin / 'config.json'} is not UTF-8 text", "import", "hf", latin, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_an_output_folder_filled_meanwhile_is_not_replaced(model_dir, tmp_path, monkeypatch):
    """Without --force the emptiness check ran long before the write, which then replaced whatever another process
    had put in the folder meanwhile (staged_dir was told to replace it)."""
    import lmlab.interop.hf as hf

    hf_dir = export_hf(model_dir, tmp_path / "hf")
    out = tmp_path / "out"

    def meanwhile(real):
        def call(*args):
            out.mkdir(exist_ok=True)
            (out / "config.json").write_text("precious")
            return real(*args)
        return call

    monkeypatch.setattr(hf, "load_model_dir", meanwhile(hf.load_model_dir))
    with pytest.raises(FileExistsError, match="was made by another process meanwhile; nothing was replaced"):
        export_hf(model_dir, out)
    assert [f.name for f in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "precious"
    (out / "config.json").unlink()
    monkeypatch.setattr(hf, "_read_hf_weights", meanwhile(hf._read_hf_weights))
    with pytest.raises(FileExistsError, match="was made by another process meanwhile; nothing was replaced"):
        import_hf(hf_dir, out)
    assert [f.name for f in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "precious"


def test_empty_and_too_long_output_names_are_refused_before_any_work(capsys, model_dir, tmp_path, monkeypatch):
    """"" is the current folder to Path: `lmlab import hf SRC ""` replaced ./tokenizer.json. A name of 242-255 bytes
    (valid) failed after the whole export, naming the hidden temporary ([Errno 36] .../.NAME.XXXXXXXX.tmp)."""
    hf = export_hf(model_dir, tmp_path / "hf")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert fails(capsys, "", "import", "hf", hf, "") == "lmlab: error: MODEL_DIR is empty; name the folder\n"
    assert fails(capsys, "", "export", "hf", model_dir, " ") == "lmlab: error: OUT_DIR is empty; name the folder\n"
    assert fails(capsys, "", "export", "gguf", model_dir, "") == "lmlab: error: OUT_FILE is empty; name the file\n"
    assert list(cwd.iterdir()) == []
    folder, file = tmp_path / ("é" * 121), tmp_path / ("a" * 237 + ".gguf")  # 242 bytes each
    for argv, out, limit in ((("export", "hf", model_dir), folder, 241), (("import", "hf", hf), folder, 241),
                             (("export", "gguf", model_dir), file, 237)):
        err = fails(capsys, "", *argv, out)
        assert err == (f"lmlab: error: {out}: the name is 242 bytes, longer than the {limit} an output "
                       f"{'file' if limit == 237 else 'folder'} name may have (a file name holds 255 bytes, less the "
                       "temporary name's); choose a shorter one\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "hf", "model"]
    # the longest names that fit are written
    assert run(capsys, "export", "hf", model_dir, tmp_path / ("a" * 241))[0] == 0
    pytest.importorskip("gguf")
    assert run(capsys, "export", "gguf", model_dir, tmp_path / ("a" * 232 + ".gguf"))[0] == 0


def test_import_replaces_a_previous_model_completely(model_dir, tmp_path):
    """Importing into a folder that held another model must not leave its tokenizer or settings behind."""
    hf = export_hf(model_dir, tmp_path / "hf")
    target = tmp_path / "target"
    other = Tokenizer.train([TEXT], kind="word", vocab_size=50)
    save_pretrained(target, Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=50)), other,
                    training={"steps": 5})
    import_hf(hf, target, overwrite=True)
    model, tok = load_pretrained(target)
    assert tok.kind == "bpe" and model.config.family == "llama" and not (target / "training.json").exists()
