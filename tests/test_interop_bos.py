"""A checkpoint whose tokenizer puts <BOS> before a text (Llama's post-processor): lmlab encodes prompts, eval
contexts, fine-tuning prompts and token-file documents as transformers' tokenizer(text).input_ids does, so the
same weights generate the same text in both; lmlab's own tokenizers (no such rule) give the ids they always did."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_interop_hf import trained  # noqa: E402

from lmlab.data.dataset import prepare_texts  # noqa: E402
from lmlab.eval.scorer import encode_pair, nll_many, text_nll  # noqa: E402
from lmlab.interop import export_hf, import_hf  # noqa: E402
from lmlab.models import GenerationConfig, generate  # noqa: E402
from lmlab.models.io import load_pretrained  # noqa: E402
from lmlab.server.routers.openai import _encode  # noqa: E402
from lmlab.tune.sft import encode_examples  # noqa: E402

PROMPTS = ["the cat", "a bird flew", "the fox ran into", "the dog sat on the log. the"]
BOS_FIRST = {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<BOS>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<BOS>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<BOS>": {"id": "<BOS>", "ids": [2], "tokens": ["<BOS>"]}}}


@pytest.fixture(scope="module")
def bos_checkpoint(tmp_path_factory):
    """(lmlab model dir imported from a BOS-adding checkpoint, its transformers tokenizer and model, the lmlab
    model it was made from and that model's own tokenizer)."""
    tmp = tmp_path_factory.mktemp("bos")
    # untrained: its greedy text turns on every prompt id (a model trained on the repeated TEXT ignores a <BOS> it
    # never saw, where a real Llama depends on it), so a missing <BOS> shows in the text
    src, model, own = trained("llama", tmp, steps=0)
    hf_dir = export_hf(src, tmp / "hf")
    file = hf_dir / "tokenizer.json"
    data = json.loads(file.read_text())
    data["post_processor"] = BOS_FIRST
    file.write_text(json.dumps(data))
    imported = import_hf(hf_dir, tmp / "imported")
    fast = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    return imported, fast, hf_model, model, own


def test_prompt_ids_and_greedy_text_equal_transformers(bos_checkpoint):
    imported, fast, hf_model, _, _ = bos_checkpoint
    model, tok = load_pretrained(imported)
    assert tok.adds_bos
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False)
    differs = 0
    for prompt in PROMPTS:
        ids = fast(prompt).input_ids
        assert ids[0] == 2 and tok.encode(prompt, add_bos=tok.adds_bos) == ids
        assert _encode(tok, prompt) == ids  # the OpenAI API's prompts
        theirs, without_bos = (greedy(hf_model, fast, row) for row in (ids, ids[1:]))
        assert generate(model, tok, prompt, cfg) == theirs
        differs += without_bos != theirs
    assert differs  # without its <BOS> the model says something else: the check above can fail


def greedy(hf_model, fast, ids: list[int]) -> str:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    return fast.decode(out[0, len(ids):], skip_special_tokens=True)


def test_eval_and_fine_tuning_see_the_bos(bos_checkpoint, tmp_path):
    imported, fast, _, _, _ = bos_checkpoint
    model, tok = load_pretrained(imported)
    ctx, cont = encode_pair(tok, "the cat sat", " on the mat")
    assert ctx == fast("the cat sat").input_ids and ctx + cont == fast("the cat sat on the mat").input_ids
    assert encode_pair(tok, "", "the cat")[0] == [2]  # lm-eval's prefix token: the BOS where there is one
    text = "the fox ran into the wood"
    total = nll_many(model, [fast(text).input_ids])[0][0]
    assert text_nll(model, tok, [text])["nats"] == pytest.approx(total, rel=1e-6)

    (example,), _ = encode_examples("prompt", [(1, {"prompt": "the cat", "completion": " sat"})], tok, 32,
                                    completion_only=True)
    prompt = fast("the cat").input_ids
    assert example.ids.tolist()[:len(prompt)] == prompt

    texts = ["the cat sat on the mat. " * 8, "a bird flew over the tree. " * 8]
    data = prepare_texts(texts, tok, tmp_path / "data", val_fraction=0.0)
    expected = []
    for t in texts:  # as run_clm tokenizes each text (with its <BOS>), lmlab's <EOS> after each document
        expected += fast(t).input_ids + [3]
    assert np.asarray(data.tokens).tolist() == expected


def test_lmlab_own_tokenizer_ids_are_unchanged(bos_checkpoint, tmp_path):
    _, _, _, model, own = bos_checkpoint
    assert not own.adds_bos
    for prompt in PROMPTS:
        assert _encode(own, prompt) == own.encode(prompt) and own.encode(prompt)[0] != 2
    assert encode_pair(own, "", "the cat")[0] == [3]
    assert encode_pair(own, "the cat sat", " on")[0] == own.encode("the cat sat")
    texts = ["the cat sat on the mat. " * 8, "a bird flew over the tree. " * 8]
    data = prepare_texts(texts, own, tmp_path / "data", val_fraction=0.0)
    assert np.asarray(data.tokens).tolist() == own.encode(texts[0]) + [3] + own.encode(texts[1]) + [3]
