"""The lm-evaluation-harness bridge against the native scorer, and lm-eval's own `hf` model on the HF export of
the same weights against both, on local task YAMLs (offline)."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmlab.eval import load_task, run_task, text_nll  # noqa: E402
from lmlab.eval.harness import LmlabLM  # noqa: E402
from lmlab.models import ModelConfig, Transformer  # noqa: E402
from lmlab.models.io import load_pretrained, save_pretrained  # noqa: E402
from lmlab.tokenizers import Tokenizer  # noqa: E402

TEXT = ("The fox saw the grapes hanging high on the vine and could not reach them. " * 3
        + "Жили-были дед да баба, и была у них курочка Ряба. ")
MC = [{"context": "The fox saw the", "choices": ["grapes", "vine high", "курочка"], "answer": 0},
      {"context": "Жили-были дед", "choices": ["да баба", "the fox", "and"], "answer": 1},
      {"context": "could not reach", "choices": ["them.", "Ряба", "saw the grapes"], "answer": 0},
      {"context": "hanging high on", "choices": ["the vine", "the", "баба"], "answer": 2}]
DOCS = [TEXT * 2, "Колобок катился по дорожке.", TEXT[:120]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tok = Tokenizer.train([TEXT * 4], kind="bpe", vocab_size=300)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=300, block_size=32, n_kv_head=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    save_pretrained(root / "model", model, tok)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in MC))
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS))
    common = "dataset_path: json\ntest_split: train\n"
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files: {{train: {tasks / 'mc.jsonl'}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "tiny_rolling.yaml").write_text(
        f"task: tiny_rolling\n{common}dataset_kwargs:\n  data_files: {{train: {tasks / 'docs.jsonl'}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    (tasks / "native.yaml").write_text("name: tiny_mc\nkind: multiple_choice\ndata: mc.jsonl\n")
    return root, tasks


def _harness(model, tasks, **kw):
    out = simple_evaluate(model=model, tasks=["tiny_mc", "tiny_rolling"], task_manager=TaskManager(
        include_path=str(tasks), include_defaults=False), log_samples=True, bootstrap_iters=0, **kw)
    lls = [[float(r[0][0]) for r in s["resps"]] for s in sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    return out["results"], np.array(lls)


def test_bridge_and_lm_evals_hf_model_equal_the_native_scorer(setup):
    root, tasks = setup
    model, tok = load_pretrained(root / "model")
    native = run_task(model, tok, load_task(tasks / "native.yaml"))
    native_lls = np.array([it["loglikelihoods"] for it in native["items"]])
    native_bpb = text_nll(model, tok, DOCS)["bits_per_byte"]
    assert len(tok.encode(DOCS[0])) > 2 * 32  # rolling windows really roll

    results, lls = _harness(LmlabLM(path=str(root / "model"), batch_size=4), tasks)
    np.testing.assert_allclose(lls, native_lls, atol=1e-4, rtol=0)
    assert results["tiny_mc"]["acc,none"] == native["metrics"]["acc"]
    assert results["tiny_mc"]["acc_norm,none"] == native["metrics"]["acc_norm"]
    assert abs(results["tiny_rolling"]["bits_per_byte,none"] - native_bpb) < 1e-4

    from lmlab.interop import export_hf
    export_hf(root / "model", root / "hf")
    results, lls = _harness("hf", tasks, model_args=dict(pretrained=str(root / "hf"), dtype="float32",
                                                         prefix_token_id=tok.eos_id), device="cpu", batch_size=4)
    np.testing.assert_allclose(lls, native_lls, atol=1e-4, rtol=0)
    assert results["tiny_mc"]["acc,none"] == native["metrics"]["acc"]
    assert abs(results["tiny_rolling"]["bits_per_byte,none"] - native_bpb) < 1e-4


def test_the_command_line_runs_lmlab_models_on_local_tasks(setup, tmp_path):
    import subprocess
    import sys
    root, tasks = setup
    model, tok = load_pretrained(root / "model")
    native = run_task(model, tok, load_task(tasks / "native.yaml"))
    proc = subprocess.run([sys.executable, "-m", "lmlab.eval.harness", "run", "--model", "lmlab", "--model_args",
                           f"path={root / 'model'}", "--tasks", "tiny_mc", "--include_path", str(tasks),
                           "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("out/**/results_*.json")
    assert json.loads(result.read_text())["results"]["tiny_mc"]["acc,none"] == native["metrics"]["acc"]


def test_generate_until_follows_the_tasks_generation_kwargs(setup):
    """generate_until read only until and max_gen_toks: a task asking do_sample with a temperature got greedy
    text. It now reads them as lm-eval's hf model does (do_sample False: greedy, whatever the temperature)."""
    from types import SimpleNamespace

    from lmlab.models import GenerationConfig, generate
    root, _ = setup
    lm = LmlabLM(path=str(root / "model"))
    ask = lambda **kw: lm.generate_until([SimpleNamespace(args=("The fox", kw))])[0]  # noqa: E731
    greedy = generate(lm.model, lm.tokenizer, "The fox", GenerationConfig(max_new_tokens=12, do_sample=False))
    sampled = generate(lm.model, lm.tokenizer, "The fox", GenerationConfig(max_new_tokens=12, temperature=1.5,
                                                                           top_k=50, seed=7))
    assert sampled != greedy
    assert ask(max_gen_toks=12) == ask(max_gen_toks=12, temperature=1.5) == greedy
    assert ask(max_gen_toks=12, do_sample=True, temperature=1.5, top_k=50, seed=7) == sampled
    assert ask(max_gen_toks=12, until=["the"]) == greedy.split("the")[0]
    with pytest.raises(ValueError, match="generation_kwargs min_p are not known to lmlab"):
        ask(min_p=0.1)


def test_apply_chat_template_scores_the_chat_formats_own_ids(setup):
    """lm-eval's --apply_chat_template on a chat model: the bridge renders each question as the chat format and
    scores it on tune.chat.render's ids (the role tokens as tokens, not as text); the same choices scored natively
    on those ids give the same log-likelihoods. A model without the template is one line."""
    from lmlab.eval.scorer import loglikelihood
    from lmlab.tune.chat import add_chat_tokens, render, write_template

    root, tasks = setup
    model, tok = load_pretrained(root / "model")
    with pytest.raises(ValueError, match="has no lmlab chat template"):
        LmlabLM(path=str(root / "model")).apply_chat_template([{"role": "user", "content": "hi"}])
    model, tok, _ = add_chat_tokens(model, tok)
    save_pretrained(root / "chat", model, tok)
    write_template(root / "chat")
    out = simple_evaluate(model=LmlabLM(path=str(root / "chat"), batch_size=4), tasks=["tiny_mc"],
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          log_samples=True, bootstrap_iters=0, apply_chat_template=True)
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    for sample, item in zip(samples, MC):
        context = [arg[0] for arg in sample["arguments"]]
        assert context[0] == f"<|user|>{item['context']}<|end|><|assistant|>"
        ids = render([{"role": "user", "content": item["context"]}], tok, add_generation_prompt=True)[0]
        pairs = [(ids, tok.encode(arg[1])) for arg in sample["arguments"]]
        expected = [ll for ll, _ in loglikelihood(model.eval(), pairs)]
        np.testing.assert_allclose([float(r[0][0]) for r in sample["resps"]], expected, atol=1e-5, rtol=0)
