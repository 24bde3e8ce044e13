"""LoRA (tune/lora.py): merge and unmerge, a frozen base under the Trainer, exact resume, PEFT's layout loaded by
`peft` on the HF export (and PEFT's adapters loaded by lmlab), `lmlab lora merge`, bad input."""

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from test_interop_cli import fails, run  # the CLI's one-line error check

from lmlab.models import KVCache, ModelConfig, Transformer, fast
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train import Callback, TrainConfig, resume_run
from lmlab.train.demo_corpus import demo_corpus
from lmlab.train.recipes import train_from_sources
from lmlab.train.trainer import read_run_config
from lmlab.tune.lora import (
    LoRAConfig,
    adapters_disabled,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    save_adapter,
    unmerge,
)

CONFIGS = {"gpt2": dict(family="gpt2"), "llama": dict(family="llama", n_kv_head=2), "gpt": dict(family="gpt")}


def tiny(family, vocab=96, **fields):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CONFIGS[family], vocab_size=vocab, n_layer=2, n_head=4, n_embd=32,
                                   block_size=32, dropout=0.0, **fields)).eval()


def randomise(model, seed=1):
    """Non-zero B (zero at initialisation), so that an adapter which is ignored changes nothing and fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("family,targets", [("gpt2", ("all-linear",)), ("llama", ("all-linear",)),
                                            ("llama", ("q_proj", "v_proj", "down_proj")), ("gpt", ("c_proj",))])
def test_merged_and_unmerged_logits_agree_and_unmerge_restores_the_weights(family, targets):
    model = tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        plain = model(x).logits
        randomise(apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets)))
        adapted = model(x).logits
        merge(model)
        merged = model(x).logits
        unmerge(model)
        unmerged = model(x).logits
    assert (adapted - plain).abs().max() > 0.01  # the adapter is applied
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, adapted, atol=1e-5, rtol=0)
    for name, weight in model.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(weight, before[name], atol=1e-6, rtol=0, msg=name)
    # the update is alpha / r * B_j A_j on each adapted segment's rows and zero on the others (test: the formula)
    for layer in lora_layers(model).values():
        want = [torch.zeros(rows, layer.in_features) if piece is None else 2.0 * piece[1] @ piece[0]
                for piece, (rows, _) in zip(layer.lora_pieces(), layer.segments)]
        assert [p is None for p in layer.lora_pieces()] == [not a for _, a in layer.segments]
        torch.testing.assert_close(layer.delta_weight(), torch.cat(want), atol=1e-6, rtol=0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count_parameters(model)[0]


def test_rank_8_counts_as_peft_counts_and_only_adapters_get_gradients():
    model = tiny("llama")
    apply_lora(model, LoRAConfig(rank=8))
    # PEFT's count on the HF Llama: per layer q, k, v, o, gate, up, down each r * (in + out)
    c, kv, h = 32, 16, model.config.intermediate_size
    per_layer = 8 * ((c + c) + 2 * (c + kv) + (c + c) + 2 * (c + h) + (h + c))
    assert count_parameters(model)[0] == 2 * per_layer
    randomise(model)
    model.train()
    x = torch.randint(0, 96, (2, 16))
    model(x, x).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if "lora_" in name)


@pytest.mark.parametrize("rows", [False, True])
def test_the_fast_decoder_applies_an_unmerged_adapter(rows):
    model = with_rows(tiny("llama")) if rows else randomise(apply_lora(tiny("llama"), LoRAConfig(rank=4)))
    x = torch.tensor([[5, 7, 11, 2, 40, 90]])  # the last token's trained row read, every head row scored
    with torch.no_grad():
        want = model(x).logits[:, -1]
        cache = KVCache(model.config, 1)
        model(x[:, :-1], cache=cache)
        got = fast.decoder(model, keep=False)(x[:, -1:], cache)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_disabled_adapters_give_the_base_s_logits_and_come_back():
    """The reference of a LoRA preference or GRPO run is the policy with its adapters off: the base's logits, in
    the forward and in a kept fast decoder (which held the adapters' weights before)."""
    plain = tiny("llama")
    model = randomise(apply_lora(tiny("llama"), LoRAConfig(rank=4)))
    x = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        base, adapted = plain(x).logits, model(x).logits
        assert (adapted - base).abs().max() > 0.01
        fast.decoder(model)  # kept, with W + scale * B A

        def last(m):
            cache = KVCache(m.config, 1)
            m(x[:, :-1], cache=cache)
            return fast.decoder(m)(x[:, -1:], cache)
        with adapters_disabled(model) as reference:
            assert reference is model
            torch.testing.assert_close(model(x).logits, base, atol=1e-6, rtol=0)
            torch.testing.assert_close(last(model), base[:, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x).logits, adapted, atol=0, rtol=0)
        torch.testing.assert_close(last(model), adapted[:, -1], atol=1e-5, rtol=0)
        merge(model)
        with pytest.raises(ValueError, match="merged adapters cannot be disabled"):
            with adapters_disabled(model):
                pass


ROWS = (7, 2, 90)  # out of order, as a PEFT user may list them: the saved rows follow the list
HF_EMBEDDING = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}


def with_rows(model, targets=("all-linear",)):
    """Rank-4 adapters and trained rows for ROWS on `model`, B and the rows random (so that any part ignored
    fails)."""
    randomise(apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets, tokens=ROWS)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in (model.tok_emb, model.lm_head):
            if "lora_rows" in m._parameters:
                m.lora_rows.copy_(torch.randn(m.lora_rows.shape, generator=g))
    return model


@pytest.mark.parametrize("family,tie", [("gpt2", True), ("llama", False), ("llama", True)])
def test_trained_token_rows_replace_those_rows_only_and_merge_exactly(family, tie):
    model = tiny(family, tie_embeddings=tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.tensor([[7, 2, 90, 5, 11, 7, 40, 2, 63]])
    with torch.no_grad():
        with_rows(model)
        adapted = model(x).logits
        # reference: the adapters merged into a plain copy, and the rows written into its weights by hand
        ref = merge_and_unload(randomise(apply_lora(tiny(family, tie_embeddings=tie), LoRAConfig(rank=4, alpha=8))))
        ref.tok_emb.weight[list(ROWS)] = model.tok_emb.lora_rows
        if not tie:
            ref.lm_head.weight[list(ROWS)] = model.lm_head.lora_rows
        torch.testing.assert_close(adapted, ref(x).logits, atol=1e-5, rtol=0)
        for m in (model.tok_emb, model.lm_head):  # every other row is the base's, bit for bit
            w, base = m.effective_weight(), before[("tok_emb" if m is model.tok_emb or tie else "lm_head") + ".weight"]
            others = [i for i in range(96) if i not in ROWS]
            assert torch.equal(w[others], base[others]) and not torch.equal(w[list(ROWS)], base[list(ROWS)])
        merge(model)
        merged = model(x).logits
        unmerge(model)
        unmerged = model(x).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, adapted, atol=1e-5, rtol=0)
    for name in ("tok_emb.weight", "lm_head.weight"):  # the originals written back exactly
        assert torch.equal(model.state_dict()[name], before[name]), name
    adapters = count_parameters(apply_lora(tiny(family, tie_embeddings=tie), LoRAConfig(rank=4)))[0]
    assert count_parameters(model)[0] == adapters + 3 * 32 * (1 if tie else 2)  # one set of rows for a tied head
    assert model.tok_emb.lora_rows.shape == (3, 32) and ("lora_rows" in model.lm_head._parameters) == (not tie)
    plain = merge_and_unload(model)
    assert "lora_rows" not in str(plain.state_dict().keys()) and type(plain.tok_emb) is torch.nn.Embedding
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, adapted, atol=1e-5, rtol=0)
        with adapters_disabled(with_rows(tiny(family, tie_embeddings=tie))) as off:  # the base again
            torch.testing.assert_close(off(x).logits, tiny(family, tie_embeddings=tie)(x).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family,tie", [("gpt2", True), ("llama", False), ("llama", True)])
def test_peft_loads_trained_token_rows_on_the_hf_export_and_lmlab_loads_peft_s(family, tie, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = tiny(family, tie_embeddings=tie)
    tok = Tokenizer.train(["the cat sat on the mat"], kind="char")
    base_dir = save_pretrained(tmp_path / "base", model, tok)
    with_rows(model, ("q_proj", "down_proj") if family == "llama" else ("all-linear",))
    save_adapter(model, tmp_path / "adapter")
    # PEFT's own layout (peft/tuners/trainable_tokens): a list for the embedding (and a head tied to it), a dict
    # naming an untied head too; the rows themselves under token_adapter.trainable_tokens_delta
    emb = HF_EMBEDDING[family]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    rows = {emb.split(".")[-1]: list(ROWS), "lm_head": list(ROWS)}
    assert config["trainable_token_indices"] == (list(ROWS) if tie else rows)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = ".token_adapter.trainable_tokens_delta"
    assert torch.equal(saved[f"base_model.model.{emb}{key}"], model.tok_emb.lora_rows)
    assert torch.equal(saved["base_model.model.lm_head" + key], model.lm_head.lora_rows) if not tie else (
        "base_model.model.lm_head" + key not in saved)
    assert_peft_agrees(base_dir, tmp_path / "adapter", model, tmp_path / "hf")
    x = torch.tensor([[7, 2, 90, 5, 11, 7, 40, 2, 63], [1, 90, 3, 2, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(tiny(family, tie_embeddings=tie), tmp_path / "adapter")(x).logits,
                                   model(x).logits, atol=1e-6, rtol=0)
    # the other way: PEFT trains the rows (a list: the embedding's only, which for an untied head leaves its rows)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    theirs = peft.get_peft_model(fresh, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["down_proj"] if
                                                        family == "llama" else ["c_fc"], trainable_token_indices=[
                                                        90, 7], fan_in_fan_out=family != "llama"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(tiny(family, tie_embeddings=tie), tmp_path / "theirs")
    assert loaded.lora_config.tokens == (90, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, theirs.eval()(input_ids=x).logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    path = tmp_path_factory.mktemp("books") / "tales.txt"
    path.write_text(demo_corpus(n_stories=60, seed=2), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_dir(book, tmp_path_factory):
    tok = Tokenizer.train([book.read_text(encoding="utf-8")], kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, block_size=32))
    return save_pretrained(tmp_path_factory.mktemp("base") / "model", model, tok)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, metrics):
        trainer.should_stop = trainer.step == self.step


def lora_run(out, base_dir, book, callbacks=()):
    config = TrainConfig(max_steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, log_every=1, eval_every=3,
                         eval_batches=1, save_every=3, seed=3, device="cpu")
    return train_from_sources(out, config, sources=[book], init=base_dir, callbacks=callbacks,
                              lora=LoRAConfig(rank=4, dropout=0.1))


def as_before_role_heads(run_dir):
    """The run's config.json as a run started before LoRAConfig had head_tokens and role_heads wrote it: those
    keys absent from its lora section (a resume must take the defaults of that time, not refuse)."""
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    for key in ("head_tokens", "role_heads"):
        saved["lora"].pop(key)
    path.write_text(json.dumps(saved))


def test_a_lora_run_trains_the_adapters_only_and_resumes_exactly(tmp_path, base_dir, book):
    lora_run(tmp_path / "whole", base_dir, book)
    base = load_file(base_dir / "model.safetensors")
    saved = load_file(tmp_path / "whole" / "checkpoints" / "step-6" / "model.safetensors")
    assert {k for k in saved if "lora_" not in k} == set(base)
    for name, weight in base.items():  # the frozen base, bit for bit, after 6 steps of AdamW with weight decay
        assert torch.equal(saved[name], weight), name
    adapter = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained (B starts at zero)
    # final/ is a plain model directory: the base with the adapter merged
    model, _ = load_pretrained(tmp_path / "whole" / "final")
    adapted = load_adapter(load_pretrained(base_dir)[0], tmp_path / "whole" / "adapter")
    x = torch.randint(4, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted(x).logits, atol=1e-5, rtol=0)
    # stopped at step 3 and resumed: the same adapters as the run that went through
    assert lora_run(tmp_path / "part", base_dir, book, [StopAt(3)]).stop_reason == "stopped"
    with pytest.raises(ValueError, match="LoRA settings"):  # without its adapters' settings: refused, not all weights
        resume_run(tmp_path / "part")
    as_before_role_heads(tmp_path / "part")  # and a run from before those fields resumes as well
    assert resume_run(tmp_path / "part", lora=LoRAConfig.from_section(read_run_config(tmp_path / "part")["lora"])
                      ).steps == 6
    again = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert again.keys() == adapter.keys()
    for key in adapter:
        torch.testing.assert_close(again[key], adapter[key], atol=1e-6, rtol=0, msg=key)


def test_a_lora_run_trains_the_chosen_token_rows_and_no_other(tmp_path, base_dir, book):
    """The rows of the tokens given train (PEFT's trainable_token_indices); every other row of the embedding and
    the untied head leaves the run bit for bit as it came, weight decay and all."""
    tok = Tokenizer.load(base_dir / "tokenizer.json")
    ids = tuple(i for i, _ in Counter(tok.encode(book.read_text(encoding="utf-8"))).most_common(3))
    config = TrainConfig(max_steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, log_every=1, eval_every=4,
                         eval_batches=1, save_every=0, seed=3, device="cpu")
    train_from_sources(tmp_path / "run", config, sources=[book], init=base_dir, lora=LoRAConfig(rank=4, tokens=ids))
    base = load_file(base_dir / "model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")  # the adapters and rows merged
    others = [i for i in range(len(tok)) if i not in ids]
    for name in ("tok_emb.weight", "lm_head.weight"):
        assert torch.equal(final[name][others], base[name][others]), name
        assert ((final[name][list(ids)] - base[name][list(ids)]).abs().amax(1) > 1e-3).all(), name
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": list(ids), "lm_head": list(ids)}


def assert_peft_agrees(base_dir, adapter_dir, ours, hf_dir):
    """`peft` loads the adapter in adapter_dir (PEFT's layout) onto the HF export of base_dir (written to hf_dir)
    and gives the logits of `ours`, lmlab's model with that adapter, within 1e-4 (tests/test_tune_*.py use it
    on the adapters of LoRA runs)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmlab.interop import export_hf
    export_hf(base_dir, hf_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == ours.lora_config.rank
    with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_dir),
                                                  adapter_dir).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    tokens = list(ours.lora_config.tokens)
    if tokens:  # their trained rows are read too
        x[:, :len(tokens)] = torch.tensor(tokens)
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=x).logits, ours.eval()(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt"])
def test_peft_loads_the_adapter_on_the_hf_export_and_lmlab_loads_peft_s(family, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = tiny(family)
    tok = Tokenizer.train(["the cat sat on the mat"], kind="char")
    base_dir = save_pretrained(tmp_path / "base", model, tok)
    targets = ("q_proj", "v_proj", "up_proj") if family == "llama" else ("all-linear",)
    randomise(apply_lora(model, LoRAConfig(rank=4, alpha=12, targets=targets)))
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "hf"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 12
    assert_peft_agrees(base_dir, tmp_path / "adapter", model, tmp_path / "hf")
    x = torch.randint(0, 96, (2, 20))
    # the other way: an adapter PEFT made (its own A per module) read by lmlab gives PEFT's logits
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft_targets = ["c_attn", "c_fc"] if family != "llama" else ["k_proj", "o_proj", "gate_proj"]
    theirs = peft.get_peft_model(fresh, peft.LoraConfig(r=3, lora_alpha=5, target_modules=peft_targets,
                                                        fan_in_fan_out=family != "llama"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(tiny(family), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, theirs.eval()(input_ids=x).logits, atol=1e-4, rtol=0)
        assert (loaded(x).logits - tiny(family)(x).logits).abs().max() > 0.01
    # a file without lora_alpha: PEFT's default (8), not lmlab's (2 r), so that both scale it alike (lmlab's
    # logits were 5.6 away from PEFT's)
    config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(config))
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                            tmp_path / "theirs").eval()
    loaded = load_adapter(tiny(family), tmp_path / "theirs")
    assert loaded.lora_config.alpha == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, theirs(input_ids=x).logits, atol=1e-4, rtol=0)


def test_lmlab_lora_merge_writes_a_new_model_and_never_overwrites(capsys, tmp_path, base_dir):
    model, _ = load_pretrained(base_dir)
    randomise(apply_lora(model, LoRAConfig(rank=2, targets=("o_proj", "down_proj"), tokens=(9, 5))))
    with torch.no_grad():  # trained rows, folded in too
        model.tok_emb.lora_rows.normal_()
        model.lm_head.lora_rows.normal_()
    save_adapter(model, tmp_path / "adapter")
    code, out, _ = run(capsys, "lora", "merge", base_dir, tmp_path / "adapter", "--out", tmp_path / "merged")
    assert code == 0 and "merged" in out
    merged, tok = load_pretrained(tmp_path / "merged")
    assert tok is not None and json.loads((tmp_path / "merged" / "training.json").read_text())["merged"]["lora"][
        "rank"] == 2
    x = torch.cat([torch.tensor([[5, 9, 5]]), torch.randint(4, 300, (1, 21))], 1)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, model(x).logits, atol=1e-5, rtol=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    fails(capsys, "exists; choose a new --out", "lora", "merge", base_dir, tmp_path / "adapter", "--out",
          tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    fails(capsys, "is not a LoRA adapter", "lora", "merge", base_dir, tmp_path, "--out", tmp_path / "m2")
    other = merge_and_unload(randomise(apply_lora(tiny("gpt2"), LoRAConfig(rank=2))))
    assert not lora_layers(other) and "lora_A" not in str(other.state_dict().keys())
    save_adapter(randomise(apply_lora(tiny("gpt2"), LoRAConfig(rank=2))), tmp_path / "gpt2-adapter")
    fails(capsys, "unknown LoRA target 'attn.c_attn' for a llama model", "lora", "merge", base_dir,
          tmp_path / "gpt2-adapter", "--out", tmp_path / "m3")
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


@pytest.mark.parametrize("chat", [False, True])
def test_lora_merge_into_an_int8_int4_model_is_one_line_naming_the_way(capsys, tmp_path, base_dir, chat):
    """A quantized model's weights are integers: a merge into it is refused before anything is read, also for a
    chat (SFT) adapter, whose chat tokens were added to the quantized embedding first (an AttributeError)."""
    from lmlab.models.quant import quantize_dir
    from lmlab.tune.chat import add_chat_tokens

    quantized = quantize_dir(base_dir, tmp_path / "q", bits=4, group_size=32)[0]
    model, tok = load_pretrained(base_dir)
    if chat:
        model, tok, _ = add_chat_tokens(model, tok)
    save_adapter(randomise(apply_lora(model, LoRAConfig(rank=2))), tmp_path / "adapter", tokenizer=tok)
    err = fails(capsys, "", "lora", "merge", quantized, tmp_path / "adapter", "--out", tmp_path / "merged")
    assert err == (f"lmlab: error: {quantized} is an int8/int4 model, which an adapter cannot be merged into; merge "
                   "it into the model it was quantized from (its quantization.json: source)\n")
    assert not (tmp_path / "merged").exists()


def test_bad_lora_settings_are_one_line_errors(capsys, tmp_path, base_dir, book):
    with pytest.raises(ValueError, match="the LoRA rank must be a positive integer, not 0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="LoRA dropout must be in"):
        LoRAConfig(rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        apply_lora(apply_lora(tiny("gpt2"), LoRAConfig()), LoRAConfig())
    train = ["train", book, "--out", tmp_path / "run", "--max-steps", "1"]
    fails(capsys, "the LoRA rank must be a positive integer, not 0", *train, "--init", base_dir, "--lora-rank", "0")
    fails(capsys, "unknown LoRA target 'qkv' for a llama model; choose from q_proj, k_proj, v_proj, o_proj, "
          "gate_proj, up_proj, down_proj or all-linear", *train, "--init", base_dir, "--lora-rank", "4",
          "--lora-targets", "q_proj,qkv")
    fails(capsys, "--lora-alpha needs --lora-rank", *train, "--init", base_dir, "--lora-alpha", "4")
    fails(capsys, "--lora-new-tokens: the tokenizer has no chat tokens", *train, "--init", base_dir, "--lora-rank", "4",
          "--lora-new-tokens")
    with pytest.raises(ValueError, match="LoRA token 300 is outside the model's vocabulary of 300"):
        apply_lora(load_pretrained(base_dir)[0], LoRAConfig(rank=2, tokens=(3, 300)))
    fails(capsys, "LoRA adapts a trained model: give it with --init", *train, "--preset", "llama-tiny",
          "--lora-rank", "4")
    assert not (tmp_path / "run").exists()


def test_head_rows_of_their_own_train_save_in_peft_s_dict_and_load_both_ways(tmp_path):
    """LoRAConfig.head_tokens: an untied head trains rows of other tokens than the embedding (PEFT's
    trainable_token_indices as a dict of two lists). The logits are those of the rows written in by hand; the
    file carries the head's rows for the embedding's tokens too, as the base has them (what `--lora-new-tokens`
    does for the chat role markers); peft reads it with lmlab's logits, lmlab reads it back, and lmlab reads a
    dict PEFT trained. A tied head refuses rows of its own."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = tiny("llama")
    tok = Tokenizer.train(["the cat sat on the mat"], kind="char")
    base_dir = save_pretrained(tmp_path / "base", model, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"), tokens=(7, 90), head_tokens=(90, 40, 63))
    randomise(apply_lora(model, config))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in (model.tok_emb, model.lm_head):
            m.lora_rows.copy_(torch.randn(m.lora_rows.shape, generator=g))
    assert model.tok_emb.lora_rows.shape == (2, 32) and model.lm_head.lora_rows.shape == (3, 32)
    adapters = count_parameters(apply_lora(tiny("llama"), LoRAConfig(rank=4, targets=("q_proj", "down_proj"))))[0]
    assert count_parameters(model)[0] == adapters + 5 * 32
    x = torch.tensor([[7, 2, 90, 5, 11, 7, 40, 2, 63], [1, 90, 3, 2, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        ref = merge_and_unload(randomise(apply_lora(tiny("llama"), LoRAConfig(rank=4, alpha=8, targets=(
            "q_proj", "down_proj")))))
        ref.tok_emb.weight[[7, 90]] = model.tok_emb.lora_rows
        ref.lm_head.weight[[90, 40, 63]] = model.lm_head.lora_rows
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path / "adapter")
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved_config["trainable_token_indices"] == {"embed_tokens": [7, 90], "lm_head": [7, 90, 40, 63]}
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    head = saved["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
    assert torch.equal(head[0], before["lm_head.weight"][7]) and torch.equal(head[1:], model.lm_head.lora_rows)
    assert_peft_agrees(base_dir, tmp_path / "adapter", model, tmp_path / "hf")
    loaded = load_adapter(tiny("llama"), tmp_path / "adapter")
    assert (loaded.lora_config.tokens, loaded.lora_config.head_tokens) == ((7, 90), (7, 90, 40, 63))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-6, rtol=0)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    theirs = peft.get_peft_model(fresh, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["down_proj"],
                                                        trainable_token_indices={"embed_tokens": [90],
                                                                                 "lm_head": [40, 7]}))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(tiny("llama"), tmp_path / "theirs")
    assert (loaded.lora_config.tokens, loaded.lora_config.head_tokens) == ((90,), (40, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, theirs.eval()(input_ids=x).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="untied output head"):
        apply_lora(tiny("llama", tie_embeddings=True), config)
    for bad in (dict(head_tokens=True), dict(head_tokens=5), dict(tokens=3), dict(role_heads="no"),
                dict(head_tokens=[4, 4])):
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**bad)


@pytest.mark.parametrize("family", ["gpt2", "gpt", "llama"])
def test_every_family_s_untied_rows_go_to_peft_s_file_and_back(family, tmp_path):
    """An untied head with rows of its own: lmlab reads back the adapter it wrote, whatever the family calls its
    embedding in PEFT's dict (wte, tokens_embed, embed_tokens)."""
    model = tiny(family, tie_embeddings=False)
    randomise(apply_lora(model, LoRAConfig(rank=4, tokens=(7, 90), head_tokens=(90, 3))))
    with torch.no_grad():
        for m in (model.tok_emb, model.lm_head):
            m.lora_rows.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    save_adapter(model, tmp_path / "adapter")
    x = torch.tensor([[7, 2, 90, 5, 3, 7, 40]])
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(tiny(family, tie_embeddings=False), tmp_path / "adapter")(x).logits,
                                   model(x).logits, atol=1e-6, rtol=0)


def test_chat_tokens_train_the_role_markers_head_rows_only_in_runs_from_before_role_heads():
    """--lora-new-tokens: the embedding rows of the 4 chat tokens train, and of an untied head only <|end|>'s (the
    role markers are never a target); a run's config.json from before `role_heads` (no such key) resumes with the
    4 head rows it trained, so its checkpoints fit."""
    from lmlab.tune.chat import add_chat_tokens, chat_token_ids
    tok = Tokenizer.train(["the cat sat on the mat"], kind="char")
    model, tok, _ = add_chat_tokens(tiny("llama", vocab=tok.vocab_size), tok)
    chat = chat_token_ids(tok)
    ids = sorted(chat.values())
    config = LoRAConfig(rank=4, chat_tokens=True)
    assert config.row_ids(tok) == (ids, [chat["end"]])
    assert LoRAConfig.from_section(config.to_dict()).row_ids(tok) == (ids, [chat["end"]])
    old = {k: v for k, v in config.to_dict().items() if k not in ("role_heads", "head_tokens")}
    assert LoRAConfig.from_section(old).row_ids(tok) == (ids, ids)
    apply_lora(model, config, tok)
    assert model.tok_emb.lora_rows.shape[0] == 4 and model.lm_head.lora_rows.shape[0] == 1
    assert model.lora_config.head_tokens == (chat["end"],) and not model.lora_config.chat_tokens
