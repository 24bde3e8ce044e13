"""lmlab tune sft: data validation (one-line errors naming the line), truncation, the masked loss against a
hand computation, packing, and resume exactly like pre-training."""

import json

import numpy as np
import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.models.io import save_pretrained
from lmlab.train import TrainConfig, latest_checkpoint
from lmlab.tune.chat import END, MARKERS, TEMPLATE, add_chat_tokens, render
from lmlab.tune.chats import SHIPPED, make_chats
from lmlab.tune.data import read_sft
from lmlab.tune.sft import SFTDataset, encode_examples, resume_sft, run_sft, split

CHATS = make_chats(60, seed=1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random-weights model with a bpe tokenizer trained on the chats (no chat tokens yet)."""
    text = "\n".join(m["content"] for c in make_chats(300, seed=5) for m in c["messages"])
    tok = lmlab.Tokenizer.train([text], kind="bpe", vocab_size=320)
    torch.manual_seed(0)
    cfg = lmlab.ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=96, dropout=0.1)
    out = tmp_path_factory.mktemp("base")
    save_pretrained(out, lmlab.Transformer(cfg), tok)
    return out


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Answer: hi."}]}


@pytest.mark.parametrize("bad, why", [
    ('{"messages": [', "not JSON"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "message 1: no 'role'"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "message 1: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "message 2: empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "message 1: 'content' must be a string, not int"),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"prompt": "a", "completion": "b"}, "a prompt–completion pair in a file of conversations"),
    ({"text": "a"}, "expected a conversation"),
    # JSON may hold these, and they reached the tokenizer (a TypeError, exit 1) or the stack (RecursionError)
    ('{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "x"}]}',
     "a \\u escape that is half of a character (a lone surrogate), not text"),
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
])
def test_a_bad_line_is_a_one_line_error_naming_it(tmp_path, base_dir, capsys, bad, why):
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])  # a blank line still counts
    with pytest.raises(ValueError) as err:
        read_sft(data)
    assert str(err.value).startswith(f"{data}:3: {why}")
    code = main(["tune", "sft", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"lmlab: error: {err.value}"]
    assert not (tmp_path / "run").exists()  # nothing written for bad data


def test_prompt_completion_pairs_are_read_and_checked(tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}])
    with pytest.raises(ValueError, match=f"^{tmp_path / 'pc.jsonl'}:2: empty completion$"):
        read_sft(data)
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "d"}])
    assert read_sft(data) == ("prompt", [(1, {"prompt": "a", "completion": "b"}),
                                         (2, {"prompt": "", "completion": "d"})])


def test_zero_trained_tokens_after_truncation_is_an_error_naming_the_example(tmp_path, base_dir, capsys):
    model, tok = lmlab.load(base_dir)
    model, tok, _ = add_chat_tokens(model, tok)
    long_question = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    data = write_jsonl(tmp_path / "long.jsonl", [GOOD, long_question])
    kind, rows = read_sft(data)
    with pytest.raises(ValueError, match=rf"^{data}:2: no token to train on within the context of 97 tokens"):
        encode_examples(kind, rows, tok, 96, path=data)
    assert main(["tune", "sft", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert f"{data}:2: no token to train on" in capsys.readouterr().err
    # a long answer is cut and counted, and what is left of it trains
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    examples, truncated = encode_examples("messages", [(1, GOOD["messages"]), (2, long_answer["messages"])], tok, 96)
    assert truncated == 1 and len(examples[1].ids) == 97 and examples[1].mask[-1]


def test_masked_loss_equals_a_hand_computed_loss_over_the_assistant_tokens(base_dir):
    model, tok = lmlab.load(base_dir)
    model, tok, _ = add_chat_tokens(model, tok)
    rows = [(i + 1, c["messages"]) for i, c in enumerate(CHATS[:8])]
    examples, _ = encode_examples("messages", rows, tok, 96)
    ds = SFTDataset(examples, examples, tok, 96)
    x, y = next(ds.eval_batches(8, 96))
    with torch.no_grad():
        loss = model(x, y).loss
        total, count = 0.0, 0
        for _, messages in rows:  # each conversation alone, unpadded; its mask from the renderer
            ids, mask = render(messages, tok)
            assert 0 < sum(mask) < len(mask)  # neither nothing nor everything is trained
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                if mask[t]:
                    total -= float(logp[t - 1, ids[t]])
                    count += 1
    assert count == int((y != -100).sum())
    torch.testing.assert_close(loss.double(), torch.tensor(total / count, dtype=torch.float64), atol=1e-5, rtol=0)


def test_prompt_completion_masks(base_dir):
    _, tok = lmlab.load(base_dir)
    rows = [(1, {"prompt": "What is 2 plus 2?", "completion": " Answer: 4."})]
    prompt, completion = tok.encode("What is 2 plus 2?"), tok.encode(" Answer: 4.") + [tok.eos_id]
    (only,), _ = encode_examples("prompt", rows, tok, 96, completion_only=True)
    (full,), _ = encode_examples("prompt", rows, tok, 96)
    assert only.ids.tolist() == full.ids.tolist() == prompt + completion
    assert only.mask.tolist() == [False] * len(prompt) + [True] * len(completion)
    assert full.mask.tolist() == [False] + [True] * (len(prompt) + len(completion) - 1)


def test_packing_fills_rows_and_never_trains_across_a_seam(base_dir):
    _, tok = lmlab.load(base_dir)
    _, tok, _ = add_chat_tokens(lmlab.load(base_dir)[0], tok)
    examples, _ = encode_examples("messages", [(i, c["messages"]) for i, c in enumerate(CHATS)], tok, 96)
    packed = SFTDataset(examples, [], tok, 96, packing=True)
    x, y = packed.sample_batch(4, 96, torch.Generator().manual_seed(0))
    assert (x != tok.pad_id).all()  # no padding when packed
    starts = {tok.token_to_id(MARKERS["user"]), tok.token_to_id(MARKERS["system"])}
    targets = set(y[y != -100].tolist())
    # a turn's end is learned, a new example's start never
    assert not targets & starts and tok.token_to_id(END) in targets
    single = SFTDataset(examples, [], tok, 96)
    assert single.train_tokens == 60 * 96 and packed.train_tokens == sum(len(e.ids) for e in examples)
    x1, y1 = single.sample_batch(4, 96, torch.Generator().manual_seed(0))
    assert (x1 == tok.pad_id).any() and int((y1 != -100).sum()) < int((y != -100).sum())


def test_split_holds_out_a_share(base_dir):
    _, tok = lmlab.load(base_dir)
    _, tok, _ = add_chat_tokens(lmlab.load(base_dir)[0], tok)
    examples, _ = encode_examples("messages", [(i, c["messages"]) for i, c in enumerate(CHATS)], tok, 96)
    train, val = split(examples, 0.1, seed=3)
    assert len(val) == 6 and len(train) == 54
    assert {e.line for e in train}.isdisjoint({e.line for e in val})
    assert [e.line for e in split(examples, 0.1, seed=3)[1]] == [e.line for e in val]


def _rows(run):
    drop = {"elapsed_s", "tokens_per_s", "mfu"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _config(**kw):
    return TrainConfig(**{**dict(max_steps=8, batch_size=4, grad_accum_steps=2, warmup_steps=2, lr=3e-3,
                                 log_every=1, eval_every=3, eval_batches=2, save_every=0, seed=7), **kw})


class StopAt(lmlab.train.Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, metrics):
        if trainer.step == self.step:
            trainer.should_stop = True


def test_sft_resumes_exactly_like_pretraining(tmp_path, base_dir):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    full = run_sft(base_dir, data, tmp_path / "full", _config(), packing=True, echo=lambda s: None)
    assert full.steps == 8
    first = run_sft(base_dir, data, tmp_path / "cut", _config(), packing=True, callbacks=[StopAt(4)],
                    echo=lambda s: None)
    assert first.stop_reason == "stopped" and latest_checkpoint(tmp_path / "cut").name == "step-4"
    data.write_text("not json\n")  # the run resumes from its own copy of the data
    assert resume_sft(tmp_path / "cut", echo=lambda s: None).steps == 8
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert [r["step"] for r in b if "val_loss" in r] == [3, 6, 8]  # held-out evaluations
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)
    m1, t1 = lmlab.load(tmp_path / "full" / "final")
    m2, t2 = lmlab.load(tmp_path / "cut" / "final")
    for (name, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    assert t1.fingerprint() == t2.fingerprint() and t1.token_to_id(END) is not None
    assert (tmp_path / "cut" / "final" / "chat_template.jinja").read_text() == TEMPLATE


def test_a_lora_sft_run_trains_the_adapters_only_and_resumes_exactly(tmp_path, base_dir, capsys):
    """--lora-rank on conversations: the base (with the chat tokens' rows as add_chat_tokens makes them) bit for
    bit the same after the run, a run stopped at 4 and resumed gives the same rows and adapter as 8 at once, and
    `peft` reads RUN/adapter on the HF export of that base with lmlab's logits."""
    from safetensors.torch import load_file
    from test_lora import assert_peft_agrees

    from lmlab.tune.lora import LoRAConfig, load_adapter
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    lora = LoRAConfig(rank=4, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    run_sft(base_dir, data, tmp_path / "full", _config(save_every=4), packing=True, echo=lambda s: None, lora=lora)
    run_sft(base_dir, data, tmp_path / "cut", _config(), packing=True, callbacks=[StopAt(4)], echo=lambda s: None,
            lora=lora)
    assert resume_sft(tmp_path / "cut", echo=lambda s: None).steps == 8
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 9)) and a[-1]["val_loss"] < a[2]["val_loss"]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)
    base, tok, _ = add_chat_tokens(*lmlab.load(base_dir))
    saved = load_file(tmp_path / "full" / "checkpoints" / "step-8" / "model.safetensors")
    assert {k for k in saved if "lora_" not in k} == set(base.state_dict())
    for name, weight in base.state_dict().items():
        assert torch.equal(saved[name], weight), name
    base_with_tokens = save_pretrained(tmp_path / "base", base, tok)
    adapted = load_adapter(lmlab.load(base_with_tokens)[0], tmp_path / "full" / "adapter")
    x = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        for run in ("full", "cut"):  # final/: the base with the adapter merged, the resumed run's too
            torch.testing.assert_close(lmlab.load(tmp_path / run / "final")[0].eval()(x).logits,
                                       adapted.eval()(x).logits, atol=1e-5, rtol=0)
    assert_peft_agrees(base_with_tokens, tmp_path / "full" / "adapter", adapted, tmp_path / "hf")
    assert main(["tune", "sft", "--out", str(tmp_path / "cut"), "--resume", "--lora-rank", "8"]) == 2
    assert "drop --lora-rank" in capsys.readouterr().err


def test_lora_new_tokens_trains_the_chat_tokens_rows_and_no_other(tmp_path, base_dir, capsys):
    """`tune sft --lora-rank 4 --lora-new-tokens`: the embedding rows of the 4 chat tokens (added at the mean row)
    train with the adapters, and of the untied head's rows only <|end|>'s (the role markers are never a target),
    every other row stays the base's bit for bit, RUN/adapter names the 4 as PEFT's trainable_token_indices for
    both (the head's role rows as the base has them), and `peft` reads it on the HF export with lmlab's logits."""
    from safetensors.torch import load_file
    from test_lora import assert_peft_agrees

    from lmlab.tune.chat import chat_token_ids
    from lmlab.tune.lora import load_adapter
    out = tmp_path / "run"
    assert main(["tune", "sft", "--model", str(base_dir), "--data", str(write_jsonl(tmp_path / "c.jsonl", CHATS)),
                 "--out", str(out), "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--eval-every", "0",
                 "--lora-rank", "4", "--lora-new-tokens"]) == 0
    # no warm-up unless asked (TrainConfig's 100 steps were the whole run): the rows below move at lr
    assert json.loads((out / "config.json").read_text())["train"]["warmup_steps"] == 0
    base, tok, _ = add_chat_tokens(*lmlab.load(base_dir))
    ids = sorted(chat_token_ids(tok).values())
    end = [chat_token_ids(tok)["end"]]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": ids, "lm_head": ids}
    final = load_file(out / "final" / "model.safetensors")
    for name, trained in (("tok_emb.weight", ids), ("lm_head.weight", end)):
        before = base.state_dict()[name]
        others = [i for i in range(len(tok)) if i not in trained]
        assert torch.equal(final[name][others], before[others]), name
        assert ((final[name][trained] - before[trained]).abs().amax(1) > 1e-4).all(), name
    base_with_tokens = save_pretrained(tmp_path / "base", base, tok)
    adapted = load_adapter(lmlab.load(base_with_tokens)[0], out / "adapter")
    assert_peft_agrees(base_with_tokens, out / "adapter", adapted, tmp_path / "hf")
    # its last checkpoint, the adapters and the chat tokens' rows put on as the run had them, is final/'s model
    from lmlab.train.checkpoint import checkpoint_model, checkpoints
    from lmlab.tune.lora import checkpoint_adapters
    x = torch.tensor([[*ids, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(checkpoint_model(checkpoints(out)[-1], checkpoint_adapters)(x).logits,
                                   lmlab.load(out / "final")[0].eval()(x).logits, atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["tune", "sft", "--model", str(base_dir), "--data", str(tmp_path / "c.jsonl"), "--out",
                 str(tmp_path / "r2"), "--lora-new-tokens"]) == 2
    assert "--lora-new-tokens needs --lora-rank" in capsys.readouterr().err


def test_peft_loads_a_new_tokens_adapter_as_the_readme_says(tmp_path, base_dir, monkeypatch):
    """README's Python for `peft` on a `--lora-new-tokens` adapter, run as written (in a folder holding RUN and
    base-hf): the export of the starting model resized to the run's vocabulary takes the adapter, with the logits
    of the run's final/ model; without the resize PEFT cannot index the chat tokens' rows."""
    import re
    from pathlib import Path

    pytest.importorskip("peft")
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "PeftModel.from_pretrained" in b]
    assert main(["tune", "sft", "--model", str(base_dir), "--data", str(write_jsonl(tmp_path / "c.jsonl", CHATS)),
                 "--out", str(tmp_path / "RUN"), "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2",
                 "--eval-every", "0", "--lora-rank", "4", "--lora-new-tokens"]) == 0
    assert main(["export", "hf", str(base_dir), str(tmp_path / "base-hf")]) == 0
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IndexError):
        exec(re.sub(r"\nbase.resize_token_embeddings.*", "", code), {})
    scope = {}
    exec(code, scope)
    from lmlab.tune.chat import chat_token_ids
    final, tok = lmlab.load(tmp_path / "RUN" / "final")
    x = torch.tensor([[*chat_token_ids(tok).values(), 5, 6, 7, 40, 100]])  # the trained rows are read too
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(input_ids=x).logits, final.eval()(x).logits, atol=1e-4,
                                   rtol=0)


def test_lora_hard_tokens_are_those_of_largest_summed_loss_on_the_training_split(tmp_path, base_dir, capsys):
    """`--lora-hard-tokens 3`: LoRA also trains the rows of the 3 tokens with the largest summed loss under the
    starting model over the training split's trained tokens (summed here example by example), the chat tokens
    aside; the run records them as its LoRA tokens, trains their rows, and resumes on them."""
    from safetensors.torch import load_file

    from lmlab.tune.chat import chat_token_ids
    from lmlab.tune.sft import build_dataset, hardest_tokens
    data, out = write_jsonl(tmp_path / "c.jsonl", CHATS), tmp_path / "run"
    args = ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--eval-every", "0"]
    assert main(["tune", "sft", "--model", str(base_dir), "--data", str(data), "--out", str(out), *args,
                 "--lora-rank", "4", "--lora-new-tokens", "--lora-hard-tokens", "3"]) == 0
    saved = json.loads((out / "config.json").read_text())
    base, tok, _ = add_chat_tokens(*lmlab.load(base_dir))
    chat = set(chat_token_ids(tok).values())
    ds, _ = build_dataset(data, tok, 96, completion_only=False, val_fraction=0.1, seed=saved["train"]["seed"],
                          packing=False)
    summed: dict[int, float] = {}
    base.eval()
    with torch.no_grad():
        for e in ds.train:
            ids = torch.as_tensor(e.ids)
            loss = torch.nn.functional.cross_entropy(base(ids[None, :-1]).logits[0], ids[1:], reduction="none")
            for t, v in zip(ids[1:][torch.as_tensor(e.mask[1:])].tolist(), loss[torch.as_tensor(e.mask[1:])].tolist()):
                summed[t] = summed.get(t, 0.0) + v
    want = sorted((t for t in summed if t not in chat), key=lambda t: (-summed[t], t))[:3]
    assert saved["lora"]["tokens"] == want and saved["lora"]["chat_tokens"]
    assert "hardest for the model on the training split" in capsys.readouterr().out
    final = load_file(out / "final" / "model.safetensors")
    assert ((final["tok_emb.weight"][want] - base.state_dict()["tok_emb.weight"][want]).abs().amax(1) > 1e-4).all()
    assert main(["tune", "sft", "--out", str(out), "--resume", "--max-steps", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["lora"]["tokens"] == want
    # chunks of any size sum the same losses
    assert hardest_tokens(base, ds, 96, 3, exclude=chat, max_logits=1) == want
    # without --lora-new-tokens the chat tokens (added at the mean row, the "hardest" of all) are left out still
    assert main(["tune", "sft", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r3"), *args,
                 "--lora-rank", "4", "--lora-hard-tokens", "3"]) == 0
    assert json.loads((tmp_path / "r3" / "config.json").read_text())["lora"]["tokens"] == want
    assert main(["tune", "sft", "--out", str(out), "--resume", "--lora-hard-tokens", "2"]) == 2
    assert main(["tune", "sft", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r2"),
                 "--lora-hard-tokens", "2"]) == 2
    assert "--lora-hard-tokens needs --lora-rank" in capsys.readouterr().err


def test_cli_sft_then_chat(tmp_path, base_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["tune", "sft", "--model", str(base_dir), "--data", str(SHIPPED), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--eval-every", "0", "--eval-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "added 4 chat tokens" in printed and "1800 conversations for training, 200 held out" in printed
    assert "cut to the context of 97 tokens" in printed
    assert json.loads((out / "config.json").read_text())["sft"]["kind"] == "messages"
    # final/ is a model directory like any other: generate and the exports take it, the template goes along
    assert main(["generate", str(out / "final"), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert main(["export", "hf", str(out / "final"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    capsys.readouterr()
    code = main(["tune", "sft", "--out", str(out), "--resume", "--data", str(SHIPPED)])
    assert code == 2 and "drop --data" in capsys.readouterr().err
    # the fine-tuned model chats: greedy replies equal the library's, streamed to stdout
    from lmlab.tune.chat import fit_history, generate_reply
    # a line that was not UTF-8 (stdin keeps its bytes as lone surrogates) is asked again, not a traceback
    lines = "What is 2 plus 3?\n\udcff\udcfe\nПовтори слово лиса.\n"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(lines))
    assert main(["chat", str(out), "--greedy", "--max-new-tokens", "8"]) == 0
    said = capsys.readouterr()
    printed_chat = said.out
    assert said.err == "lmlab: that line is not UTF-8 text; type it again\n"
    model, tok = lmlab.load(out / "final")
    first = generate_reply(model, tok, [{"role": "user", "content": "What is 2 plus 3?"}], do_sample=False,
                           max_new_tokens=8)
    history = fit_history([{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "Повтори слово лиса."}], tok, 96 - 8)
    second = generate_reply(model, tok, history, do_sample=False, max_new_tokens=8)
    assert printed_chat == f"{first}\n{second}\n"


def test_chat_refuses_a_model_without_a_template(base_dir, capsys):
    assert main(["chat", str(base_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmlab: error: {base_dir} has no chat template")


def test_truncated_count_is_reported_and_an_epoch_counts_examples(tmp_path, base_dir):
    said = []
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 5 + [long_answer] * 3)
    result = run_sft(base_dir, data, tmp_path / "r", _config(max_steps=None, epochs=2, batch_size=2, grad_accum_steps=1,
                                                             eval_every=0), echo=said.append)
    assert result.steps == 7  # an epoch is one row per training example: 2 epochs of 7 in rows of 2
    assert said[1].startswith("7 conversations for training, 1 held out; 3 cut to the context of 97 tokens; ")
    assert np.isfinite(json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])["loss"])


@pytest.mark.parametrize("where", ["lmlab.tune.lora.save_pretrained", "lmlab.tune.chat.write_template"],
                         ids=["merging the adapters", "writing the template"])
def test_final_appears_whole_or_not_at_all(tmp_path, base_dir, monkeypatch, where):
    """A LoRA SFT run killed while final/ was completed (its adapters merged, its chat template written) left a
    final/ that looked whole: unmerged lora_A/lora_B tensors that do not load, or no template (`lmlab chat`
    refused it). final/ is now staged and renamed into place after both; --resume then writes it."""
    from lmlab.tune.lora import LoRAConfig
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8)
    out = tmp_path / "run"
    real = __import__("importlib").import_module(where.rsplit(".", 1)[0])
    name = where.rsplit(".", 1)[1]
    original = getattr(real, name)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill at this moment: nothing after it runs
    monkeypatch.setattr(where, killed)
    with pytest.raises(KeyboardInterrupt):
        run_sft(base_dir, data, out, _config(max_steps=2, save_every=1), lora=LoRAConfig(rank=2), echo=print)
    assert not (out / "final").exists() and latest_checkpoint(out) is not None
    monkeypatch.setattr(where, original)
    (out / ".final.k1ll3d.tmp").mkdir()  # what a SIGKILL (no cleanup) leaves: the resume removes it
    resume_sft(out, echo=print)
    assert not list(out.glob(".final.*"))
    model, tok = lmlab.load(out / "final")  # a plain model with the adapters merged, and the template
    assert (out / "final" / "chat_template.jinja").read_text() == TEMPLATE and (out / "adapter").is_dir()
    assert not any("lora_" in k for k in model.state_dict())


def test_bytes_per_token_counts_an_unk_as_one_byte():
    """decode writes <UNK> as its five letters since it stopped dropping it: SFT's bits per byte counted each
    unseen character as 5 bytes (a review of the change). It counts the least such a character takes, one byte;
    left out, a held-out part of <UNK>s had no bytes (bpb NaN)."""
    tok = lmlab.Tokenizer.train(["ab cd"], kind="char")
    _, tok, _ = add_chat_tokens(lmlab.Transformer(lmlab.ModelConfig.preset("llama-tiny", vocab_size=len(tok))), tok)
    record = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ab ЖЖZ"}]
    examples, _ = encode_examples("messages", [(1, record)], tok, 64)
    assert examples[0].ids[examples[0].mask].tolist().count(tok.unk_id) == 3
    ds = SFTDataset(examples, examples, tok, 64)
    assert ds.bytes_per_token() == (3 + 3) / 7  # "ab " and three <UNK>s a byte each, over 6 tokens and <|end|>
