"""The chat format: lmlab's renderer against the exported Jinja template (transformers' apply_chat_template with
the assistant mask), the template in GGUF, the added role tokens' rows, and the history kept within the context."""

import random

import pytest
import torch

import lmlab
from lmlab.interop import export_gguf, export_hf
from lmlab.models.io import save_pretrained
from lmlab.tune.chat import (
    CHAT_TOKENS,
    END,
    MARKERS,
    TEMPLATE,
    add_chat_tokens,
    fit_history,
    render,
    write_template,
)

transformers = pytest.importorskip("transformers")

_TEXTS = ["Hello there", "What is 2 plus 3?", "Answer: 5.", "Привет! Как дела?", "Ответ: лиса.", "🦊🐻 emoji 👍🏽",
          "  spaced  out  ", "line one\nline two", "naïve café", "Ёжик в тумане 🌫️", "tabs\tand\r\nCRLF", "x",
          "¿Qué? 日本語", "1+1=2; 2*3=6", "<not a token>", "a" * 40]


def random_conversation(rng):
    """Multi-turn, with system turns, empty user/system turns, Russian, emoji; assistant turns never empty."""
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(_TEXTS + [""])})
    for _ in range(rng.randint(1, 4)):
        user = "" if rng.random() < 0.15 else " ".join(rng.sample(_TEXTS, rng.randint(1, 2)))
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": " ".join(rng.sample(_TEXTS, rng.randint(1, 3)))}]
    if rng.random() < 0.2:  # a conversation may end on a user turn
        messages.append({"role": "user", "content": rng.choice(_TEXTS)})
    return messages


def chat_model(tmp_path, kind="bpe", family="llama", tie=True):
    tok = lmlab.Tokenizer.train(_TEXTS * 3, kind=kind, vocab_size=300 if kind == "bpe" else 120)
    cfg = lmlab.ModelConfig(family=family, n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=len(tok),
                            tie_embeddings=tie)
    torch.manual_seed(0)
    model, tok, added = add_chat_tokens(lmlab.Transformer(cfg), tok)
    assert added == 4
    save_pretrained(tmp_path / "model", model, tok)
    write_template(tmp_path / "model")
    return tmp_path / "model", model, tok


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_renderer_equals_the_exported_template_on_200_conversations(tmp_path, kind):
    model_dir, _, tok = chat_model(tmp_path, kind)
    fast = transformers.AutoTokenizer.from_pretrained(export_hf(model_dir, tmp_path / "hf"))
    assert fast.chat_template == TEMPLATE
    rng = random.Random(0)
    for i in range(200):
        messages = random_conversation(rng)
        ids, mask = render(messages, tok)
        theirs = fast.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ids, i
        assert theirs["assistant_masks"] == mask, i
        assert 0 < sum(mask) < len(mask)
        prompt, _ = render(messages, tok, add_generation_prompt=True)
        assert fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"] == prompt
        assert prompt[-1] == tok.token_to_id(MARKERS["assistant"])


def test_render_by_hand(tmp_path):
    _, _, tok = chat_model(tmp_path)
    s, u, a, e = (tok.token_to_id(t) for t in CHAT_TOKENS)
    ids, mask = render([{"role": "system", "content": ""}, {"role": "user", "content": "Hello there"},
                        {"role": "assistant", "content": "Answer: 5."}], tok)
    hello, answer = tok.encode("Hello there"), tok.encode("Answer: 5.")
    assert ids == [s, e, u, *hello, e, a, *answer, e]
    assert mask == [0, 0, 0] + [0] * len(hello) + [0, 0] + [1] * len(answer) + [1]
    # the role tokens are special: text spelling one stays text in lmlab, and decoding skips them
    assert tok.encode(END) != [e] and tok.decode(ids) == "Hello thereAnswer: 5."


def test_gguf_metadata_carries_the_template(tmp_path):
    gguf = pytest.importorskip("gguf")
    model_dir, _, tok = chat_model(tmp_path)
    reader = gguf.GGUFReader(export_gguf(model_dir, tmp_path / "chat.gguf").path)
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode("utf-8") == TEMPLATE
    eot = reader.fields["tokenizer.ggml.eot_token_id"]
    assert int(eot.parts[eot.data[0]][0]) == tok.token_to_id(END)
    types = reader.fields["tokenizer.ggml.token_type"]
    for t in CHAT_TOKENS:  # llama.cpp parses them in a rendered template only as control tokens
        assert int(types.parts[types.data[tok.token_to_id(t)]][0]) == gguf.TokenType.CONTROL


@pytest.mark.parametrize("tie", [True, False])
def test_new_rows_start_at_the_mean_and_the_old_ones_are_kept(tie):
    tok = lmlab.Tokenizer.train(_TEXTS, kind="char", vocab_size=60)
    cfg = lmlab.ModelConfig(family="gpt2", n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=len(tok),
                            tie_embeddings=tie)
    model = lmlab.Transformer(cfg).eval()
    old_emb, old_head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    grown, tok2, added = add_chat_tokens(model, tok)
    assert added == 4 and grown.config.vocab_size == len(tok2) == len(tok) + 4 and not grown.training
    new = [tok2.token_to_id(t) for t in CHAT_TOKENS]
    assert new == list(range(len(tok), len(tok) + 4))
    torch.testing.assert_close(grown.tok_emb.weight[:len(tok)], old_emb, atol=0, rtol=0)
    torch.testing.assert_close(grown.lm_head.weight[:len(tok)], old_head, atol=0, rtol=0)
    for row in new:
        torch.testing.assert_close(grown.tok_emb.weight[row], old_emb.mean(0))
        torch.testing.assert_close(grown.lm_head.weight[row], old_head.mean(0))
    x = torch.tensor([tok.encode("Hello there")])
    with torch.no_grad():  # the old tokens' logits are untouched
        torch.testing.assert_close(grown(x).logits[..., :len(tok)], model(x).logits)
    assert add_chat_tokens(grown, tok2)[2] == 0  # nothing to add twice


def test_history_drops_the_oldest_turns_and_keeps_the_system_turn(tmp_path):
    _, _, tok = chat_model(tmp_path)
    system = {"role": "system", "content": "x"}
    turns = [{"role": r, "content": f"{r} {i} " + "a" * 40} for i in range(4) for r in ("user", "assistant")]
    messages = [system, *turns, {"role": "user", "content": "last"}]
    whole = len(render(messages, tok, add_generation_prompt=True)[0])
    room = whole - 1
    kept = fit_history(messages, tok, room)
    assert kept == [system, *turns[2:], messages[-1]]  # the oldest round dropped, question and answer
    assert fit_history(messages, tok, whole) == messages
    assert fit_history(messages, tok, 12) == [system, messages[-1]]
    with pytest.raises(ValueError, match="too long for the model's context"):
        fit_history(messages, tok, 3)


def test_llama_cpp_renders_the_gguf_template_to_lmlab_ids(tmp_path):
    """llama-cpp-python's chat formatter on the GGUF's template, tokenised by llama.cpp (role tokens parsed):
    the prompt lmlab's renderer makes for the model's next turn."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    model_dir, _, tok = chat_model(tmp_path)
    llm = llama_cpp.Llama(model_path=str(export_gguf(model_dir, tmp_path / "chat.gguf").path), vocab_only=True,
                          verbose=False)
    try:
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<EOS>",
                                        bos_token="<BOS>")
        rng = random.Random(1)
        for _ in range(50):
            messages = random_conversation(rng)
            prompt = formatter(messages=messages).prompt
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == \
                render(messages, tok, add_generation_prompt=True)[0]
    finally:
        llm.close()
