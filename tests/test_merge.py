"""Model merging (lmlab.models.merge, `lmlab merge`): SLERP against the geometric formula and exact at its ends,
a linear merge of a model with itself, TIES by hand and against task arithmetic, DARE's expected delta, the CLI's
refusals, and a merged directory that loads and generates."""

import json
import math

import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.models import ModelConfig, Transformer, generate_ids
from lmlab.models.io import save_pretrained
from lmlab.models.merge import merge_dirs, merge_tensors, slerp
from lmlab.tokenizers import Tokenizer
from lmlab.tune.lora import LoRAConfig, apply_lora, save_adapter

TEXT = "the cat sat on the mat. the dog sat on the log. a bird flew over the tree and sang a song. " * 20


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def state(path):
    return lmlab.load(path)[0].state_dict()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A parent and two siblings (the parent plus different small deltas), one tokenizer."""
    tmp = tmp_path_factory.mktemp("merge")
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=280)
    config = ModelConfig.preset("gpt2-tiny", vocab_size=tok.vocab_size + 3, block_size=64)
    torch.manual_seed(0)
    parent = Transformer(config).eval()
    save_pretrained(tmp / "parent", parent, tok)
    for seed in (1, 2):
        torch.manual_seed(seed)
        child = Transformer(config).eval()
        child.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in parent.state_dict().items()})
        save_pretrained(tmp / f"child{seed}", child, tok)
    return tmp


def test_slerp_of_two_tensors_follows_the_great_circle():
    """For unit vectors a, b at angle W the point at t is cos(tW) a + sin(tW) u, u the unit vector of b's part
    orthogonal to a (the geometric definition, not the sine-ratio formula the code uses)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    angle = math.acos(float(a @ b))
    u = (b - (a @ b) * a) / (b - (a @ b) * a).norm()
    for t in (0.25, 0.5, 0.8):
        torch.testing.assert_close(slerp(a, b, t), math.cos(t * angle) * a + math.sin(t * angle) * u)
    # a quarter turn by hand: halfway between x and y is (1, 1)/sqrt(2)
    half = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    torch.testing.assert_close(half, torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_slerp_ends_are_the_parents_and_linear_with_itself_is_the_model(capsys, family):
    a, b = family / "child1", family / "child2"
    for t, parent in (("0", a), ("1", b)):
        out = family / f"slerp{t}"
        code, printed, err = run(capsys, "merge", a, b, "--method", "slerp", "--t", t, "--out", out)
        assert code == 0, err
        merged, expected = state(out), state(parent)
        assert all(torch.equal(merged[k], expected[k]) for k in expected)
    code, _, err = run(capsys, "merge", a, a, "--method", "linear", "--out", family / "self")
    assert code == 0, err
    merged, expected = state(family / "self"), state(a)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    record = json.loads((family / "self" / "merge.json").read_text())
    assert (record["method"], record["parents"]) == ("linear", [str(a.resolve())] * 2)


def test_ties_with_one_model_and_density_1_is_task_arithmetic(family):
    kw = dict(base=family / "parent", lam=0.7)
    merge_dirs([family / "child1"], family / "ties1", "ties", density=1.0, **kw)
    merge_dirs([family / "child1"], family / "ta1", "task-arithmetic", **kw)
    ties, ta, child = state(family / "ties1"), state(family / "ta1"), state(family / "child1")
    assert all(torch.equal(ties[k], ta[k]) for k in ta)
    assert not torch.equal(ta["blocks.0.mlp.fc.weight"], child["blocks.0.mlp.fc.weight"])  # lambda 0.7 applied


def test_ties_by_hand():
    """density 0.6 keeps 3 of 5 entries per task vector:
    t1 = [3, -1, 2, 0.5, -0.1] -> [3, -1, 2, 0, 0];  t2 = [-1, -4, 1.5, 0.2, 0.3] -> [-1, -4, 1.5, 0, 0]
    summed mass [2, -5, 3.5, 0, 0] -> signs [+, -, +, +, +]
    disjoint mean: [3 (t2's -1 disagrees), (-1-4)/2, (2+1.5)/2, 0, 0] = [3, -2.5, 1.75, 0, 0]
    base 1 + lambda 2 * that = [7, -4, 4.5, 1, 1]."""
    base = torch.ones(5)
    t1, t2 = torch.tensor([3, -1, 2, 0.5, -0.1]), torch.tensor([-1, -4, 1.5, 0.2, 0.3])
    merged = merge_tensors([base + t1, base + t2], "ties", base=base, density=0.6, lam=2.0)
    assert torch.equal(merged, torch.tensor([7, -4, 4.5, 1, 1.0]))


def test_ties_with_a_negative_weight_by_hand():
    """mergekit's TIES with weights 1 and -1 (density 1): weighted task vectors w1 t1 = [2, 1, -1, 0.5] and
    w2 t2 = [-1, -3, -2, -0.5]; summed mass [1, -2, -3, 0] -> signs [+, -, -, +]
    entry 0: only 2 agrees, divisor 1 -> 2;  entry 1: only -3 agrees, divisor -1 -> 3;
    entry 2: both agree, -3 over the weights' sum 0 (mergekit divides by 1 there) -> -3;  entry 3: 0.5 over 1.
    Entries whose agreeing weights did not sum above 0 were set to 0 ([2, 0, 0, 0.5])."""
    base = torch.zeros(4)
    t1, t2 = torch.tensor([2, 1, -1, 0.5]), torch.tensor([1, 3, 2, 0.5])
    merged = merge_tensors([base + t1, base + t2], "ties", base=base, weights=[1.0, -1.0], density=1.0)
    assert torch.equal(merged, torch.tensor([2, 3, -3, 0.5]))


def test_dare_preserves_the_expected_delta():
    g = torch.Generator().manual_seed(0)
    base, delta = torch.randn(1000, generator=g), torch.rand(1000, generator=g) + 0.5
    deltas = torch.stack([merge_tensors([base + delta], "dare", base=base, density=0.3,
                                        generator=torch.Generator().manual_seed(s)) - base for s in range(200)])
    assert abs(deltas.mean(0).sum() / delta.sum() - 1) < 0.01       # rescaled by 1/density: unbiased
    assert abs((deltas.abs() < 1e-6).float().mean() - 0.7) < 0.01   # p = 1 - density of the entries dropped


def test_a_merged_model_loads_and_generates(capsys, family):
    out = family / "dare"
    code, _, err = run(capsys, "merge", family / "child1", family / "child2", "--method", "dare", "--base",
                       family / "parent", "--density", "0.5", "--weights", "0.5,0.5", "--seed", "3", "--out", out)
    assert code == 0, err
    merged_again = merge_dirs([family / "child1", family / "child2"], family / "dare-again", "dare",
                              base=family / "parent", density=0.5, weights=[0.5, 0.5], seed=3)
    model, tok = lmlab.load(out)
    expected, parent = state(merged_again), state(family / "parent")
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())  # the seed fixes the drops
    assert not torch.equal(expected["blocks.0.mlp.fc.weight"], parent["blocks.0.mlp.fc.weight"])
    assert model.lm_head.weight is model.tok_emb.weight  # gpt2's tied head stays tied
    prompt = tok.encode("the cat")
    ids = generate_ids(model, [prompt], max_new_tokens=12, do_sample=False, eos_token_id=None)[0]
    code, printed, err = run(capsys, "generate", out, "--prompt", "the cat", "--greedy", "--max-new-tokens", "12",
                             "--ignore-eos", "--no-stream")
    assert code == 0 and printed.strip() == "the cat" + tok.decode(ids), (printed, err)
    assert (out / "tokenizer.json").read_bytes() == (family / "parent" / "tokenizer.json").read_bytes()


def test_bad_input_is_refused_in_one_line(capsys, family):
    a, b = family / "child1", family / "child2"

    def fails(message, *argv, out=family / "x"):
        code, printed, err = run(capsys, "merge", *argv, "--out", out)
        assert code == 2, (printed, err)
        assert err == f"lmlab: error: {message}\n", err
        assert not (family / "x").exists()

    fails("--method ties needs --base BASE (the model the parents were fine-tuned from)", a, b, "--method", "ties")
    fails("--method slerp merges exactly two models, not 3", a, b, a, "--method", "slerp")
    fails("--method 'avg' is not a method; choose one of linear, slerp, task-arithmetic, ties, dare",
          a, b, "--method", "avg")
    fails("--weights has 1 numbers for 2 models; give one per model", a, b, "--method", "linear", "--weights", "1")
    # a setting the method does not read was ignored without a word
    fails("--t is used by slerp only, not by --method linear", a, b, "--method", "linear", "--t", "0.3")
    fails("--density is used by ties, dare only, not by --method task-arithmetic", a, "--method", "task-arithmetic",
          "--base", b, "--density", "0.5")
    fails("--seed is used by dare only, not by --method ties", a, "--method", "ties", "--base", b, "--seed", "2")
    fails("--weights is not used by --method slerp; its setting is --t (0: the first model, 1: the second)",
          a, b, "--method", "slerp", "--weights", "0.9,0.1")  # ignored, and merge.json recorded them
    # a density so small that 1/density overflows fp32 was blamed on --weights and --lambda alone
    code, _, err = run(capsys, "merge", a, "--method", "dare", "--base", b, "--density", "1e-46", "--out",
                       family / "x")
    assert code == 2 and "--density 1e-46 so small that DARE's rescale 1/density overflows it" in err, err
    assert not (family / "x").exists()
    # linear normalises the weights before it sums: 1e308 twice is an equal mean, not an overflow
    assert run(capsys, "merge", a, b, "--method", "linear", "--weights", "1e308,1e308", "--out", family / "big")[0] == 0
    assert run(capsys, "merge", a, b, "--method", "linear", "--out", family / "even")[0] == 0
    for k, v in state(family / "even").items():
        torch.testing.assert_close(state(family / "big")[k], v, rtol=0, atol=0)
    # a negative first weight: argparse takes "-1,1" after a space for a flag; --weights=-1,1 is the form
    assert run(capsys, "merge", a, "--method", "task-arithmetic", "--base", b, "--weights=-1", "--out",
               family / "negated")[0] == 0
    with pytest.raises(ValueError, match="parents must be a list of model directories, not the single path"):
        merge_dirs(str(a), family / "x", "linear")  # its characters were read as model paths
    # NaN or inf wrote a model of NaN without complaint
    fails("--weights must be finite numbers, not 1.0,nan", a, b, "--method", "linear", "--weights", "1,nan")
    fails("--lambda must be a finite number, not inf", a, "--method", "task-arithmetic", "--base", b, "--lambda", "inf")
    fails("--lambda must be a finite number, not nan", a, b, "--method", "ties", "--base", a, "--lambda", "nan")
    tok2 = Tokenizer.train([TEXT.upper()], kind="bpe", vocab_size=280)
    config = lmlab.load(a)[0].config
    save_pretrained(family / "othertok", Transformer(config).eval(), tok2)
    fails(f"{a} and {family / 'othertok'} have different tokenizers (tokenizer.json differs); merging needs one "
          "vocabulary", a, family / "othertok", "--method", "linear")
    wide = ModelConfig.preset("gpt2-tiny", vocab_size=config.vocab_size, block_size=64, n_embd=96, n_head=4)
    save_pretrained(family / "wide", Transformer(wide).eval(), lmlab.load(a)[1])
    fails(f"{a} and {family / 'wide'} have different architectures (config.json: "
          f"intermediate_size {config.intermediate_size} vs 384, n_embd {config.n_embd} vs 96)",
          a, family / "wide", "--method", "linear")
    assert run(capsys, "quantize", a, "--to", "int8", "--out", family / "q8")[0] == 0
    fails(f"{family / 'q8'} is an int8/int4 model; merge the models it was quantized from",
          a, family / "q8", "--method", "linear")
    lora = apply_lora(lmlab.load(a)[0], LoRAConfig(rank=2))
    save_adapter(lora, family / "adapter")
    fails(f"{family / 'adapter'} is a LoRA adapter, not a model; merge it into its base first (lmlab lora merge)",
          a, family / "adapter", "--method", "linear")
    (family / "taken").mkdir()
    (family / "taken" / "mine.txt").write_text("keep me")
    fails(f"{family / 'taken'} exists and is not empty; choose a new folder for the merged model",
          a, b, "--method", "linear", out=family / "taken")
    assert [p.name for p in (family / "taken").iterdir()] == ["mine.txt"]
    assert not list(family.glob(".*.tmp"))
