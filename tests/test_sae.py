"""Sparse autoencoders (lmlab.lab.interp.sae): TopK's sparsity, loss recovered against its definition (identity
SAE 1, zero SAE 0), splice hooks removed after an exception, a bit-exact save/load, recovery of planted sparse
features, purity and attribute labels against hand-made and generated ground truth, and the CLI."""

import json

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.lab.facts.data import ATTRIBUTES, BioConfig, Biographies
from lmlab.lab.interp.sae import (
    SAEConfig,
    SparseAutoencoder,
    Splice,
    evaluate,
    labelled_share,
    lm_loss,
    load_sae,
    loss_recovered,
    purity,
    save_sae,
    superiority,
    train_sae,
)
from lmlab.lab.interp.saelab import attribute_labels, trace_sites
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer


def tiny_model():
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=40, block_size=16)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so the stream matters to the loss
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model


def windows(n=6, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (n, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_topk_keeps_exactly_k_features():
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_features=64, kind="topk", k=5))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: ReLU removes none of the top k
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    f = sae.encode(x)
    assert ((f > 0).sum(-1) == 5).all()
    # the kept ones are the k largest pre-activations
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    assert torch.equal((f > 0), torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(5).indices, True))


def identity_sae(d):
    """relu(x) - relu(-x) = x: an L1-kind SAE with features [I; -I] reconstructs every input exactly."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_features=2 * d, kind="l1", stream=1))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=1))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_loss_recovered_is_its_definition():
    assert loss_recovered(2.0, 2.5, 4.0) == 0.75
    with pytest.raises(ValueError, match="undefined"):
        loss_recovered(3.0, 3.0, 3.0)
    model = tiny_model()
    x, y = windows()
    ident = evaluate(identity_sae(model.config.n_embd), model, x, y)
    assert ident["mse"] == 0.0 and ident["fvu"] == 0.0
    assert ident["loss_sae"] == pytest.approx(ident["loss_clean"], abs=1e-6)
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    zero = identity_sae(model.config.n_embd)
    with torch.no_grad():
        zero.W_dec.zero_()
    res = evaluate(zero, model, x, y)
    assert res["loss_sae"] == res["loss_zero_ablated"] and res["loss_recovered"] == 0.0
    assert abs(res["loss_zero_ablated"] - res["loss_clean"]) > 0.1  # the ablation must matter for the test to mean much


def test_splice_hooks_are_removed_after_an_exception():
    model = tiny_model()
    x, y = windows()

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    for stream in (0, model.config.n_layer):
        with pytest.raises(RuntimeError, match="boom"):
            with Splice(model, stream, torch.zeros_like):
                assert hooks() == 1
                raise RuntimeError("boom")
        assert hooks() == 0
    with pytest.raises(ValueError, match="out of range"):
        Splice(model, 9, torch.zeros_like)
    # a splice changes the loss only inside its block
    clean = lm_loss(model, x, y)
    assert lm_loss(model, x, y, 1, torch.zeros_like) != clean and lm_loss(model, x, y) == clean


def test_saved_sae_round_trips_bit_exactly(tmp_path):
    sae, _ = train_sae(torch.randn(256, 8), SAEConfig(d_in=8, n_features=16, kind="topk", k=3, steps=5,
                                                       batch_size=32))
    save_sae(sae, tmp_path / "sae", {"note": "x"})
    back = load_sae(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for (k, a), (_, b) in zip(sae.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert json.loads((tmp_path / "sae" / "config.json").read_text())["note"] == "x"
    with pytest.raises(ValueError, match="already exists"):
        save_sae(sae, tmp_path / "sae")


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread than on contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_topk_sae_recovers_planted_sparse_features(one_thread):
    """Data made of k of n_true unit directions with random magnitudes: the learned decoder should contain each
    true direction (Sharkey et al. 2022's toy check of dictionary learning)."""
    g = torch.Generator().manual_seed(0)
    d, n_true, k, N = 12, 16, 3, 8000
    D = torch.randn(n_true, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(N, n_true, generator=g).argsort(1)[:, :k]
    x = torch.zeros(N, n_true).scatter(1, idx, torch.rand(N, k, generator=g) + 0.5) @ D
    sae, _ = train_sae(x, SAEConfig(d_in=d, n_features=32, kind="topk", k=k, steps=600, batch_size=256, lr=1e-2))
    best = (D @ sae.W_dec.detach()).max(1).values                            # best cosine per true feature
    assert (best > 0.9).float().mean() >= 0.9


def test_purity_on_a_hand_made_fixture():
    feats = torch.tensor([[1.0, 1, 0, 1], [2, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 5], [0, 0, 3, 0], [0, 0, 0, 1]])
    labels = torch.tensor([0, 0, 1, -1, 1, 1])
    p = purity(feats, labels, 2, min_count=2)
    # f0: 3 of 3 on class 0; f1: 1 on class 0, 1 on class 1 (its 2 on an unlabelled token do not count) -> 1/2;
    # f2: one labelled firing only; f3: 1 on each class, 5 unlabelled -> 1/2, not 1/7
    assert p[0] == 1.0 and p[1] == 0.5 and np.isnan(p[2]) and p[3] == 0.5
    np.testing.assert_array_equal(labelled_share(feats, labels), [1.0, 0.5, 1.0, 2 / 7])
    # the default asks for 20 labelled firings: a feature seen 19 times is not scored
    assert np.isnan(purity(torch.ones(19, 1), torch.zeros(19, dtype=torch.long), 2)[0])
    assert purity(torch.ones(20, 1), torch.zeros(20, dtype=torch.long), 2)[0] == 1.0


def test_superiority_is_vargha_delaney_a_and_mann_whitney():
    assert superiority([3, 4], [1, 2])[0] == 1.0 and superiority([1, 2], [3, 4])[0] == 0.0
    assert superiority([1, 2], [1, 2])[0] == 0.5 and superiority([1], [1]) == (0.5, 0.5)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 10, 40) / 10, rng.integers(0, 12, 55) / 12       # ties within and across
    A, p = superiority(a, b)
    ref = stats.mannwhitneyu(a, b, alternative="greater", method="asymptotic", use_continuity=True)
    assert A == pytest.approx(ref.statistic / (40 * 55), abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)


def test_attribute_labels_mark_the_value_tokens():
    data = Biographies(BioConfig(n_individuals=20, n_unseen=0, n_eval=8))
    es = data.eval_set("seen_eval")
    value, cue = attribute_labels(es, len(ATTRIBUTES))
    for i, person in enumerate(es.individuals):
        for j, a in enumerate(ATTRIBUTES):
            ids = data.value_ids[a][data.values[person, j]]
            at = (value[i] == j).nonzero().flatten()
            assert es.x[i, at].tolist() == ids                               # exactly the value's tokens
            c = (cue[i] == j).nonzero().flatten()
            assert c.tolist() == [int(at[0]) - 1] and es.y[i, c].tolist() == ids[:1]


def test_trace_sites_group_positions_as_rome():
    # subject at 2, 3, 4 (the last one alone), the prediction at the last position, the rest "other"
    assert trace_sites(8, [2, 3, 4]) == [3, 3, 0, 0, 1, 3, 3, 2]


@pytest.fixture
def model_dir(tmp_path):
    text = "the cat sat on the mat. the dog sat on the log. " * 40
    (tmp_path / "book.txt").write_text(text)
    tok = Tokenizer.train([text], kind="char", vocab_size=40)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=32, n_kv_head=2)
    torch.manual_seed(0)
    return save_pretrained(tmp_path / "model", Transformer(cfg), tok)


def test_cli_trains_saves_and_browses(model_dir, tmp_path, capsys):
    out = tmp_path / "sae"
    argv = ["lab", "interp", "sae", "--model", str(model_dir), "--books", str(tmp_path / "book.txt"), "--layer", "1",
            "--features", "32", "--k", "4", "--steps", "30", "--tokens", "1000", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["saved"] == str(model_dir / "sae" / "layer1-topk")
    assert 0 < res["metrics"]["l0"] <= 4 and res["sae"]["n_features"] == 32
    back = load_sae(model_dir / "sae" / "layer1-topk")
    assert back.cfg.stream == 1 and back.cfg.k == 4
    page = (out / "report.html").read_text()
    assert "Feature browser" in page and "<mark" in page and "http" not in page.split("Feature browser")[1]
    card = res["features"][0]
    assert len(card["promotes"]) == 5 and card["contexts"][0]["activation"] == pytest.approx(
        max(c["activation"] for c in card["contexts"]))
    capsys.readouterr()
    assert main(argv[:-1] + [str(tmp_path / "again")]) == 2  # the saved SAE is never overwritten
    assert "already exists" in capsys.readouterr().err
    assert main(argv) == 2  # nor a report
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_the_training_plot_is_in_the_reports_unit(model_dir, tmp_path, monkeypatch):
    """The plot's "MSE" was the SAE's normalised units (15-70) beside a report's MSE of 0.006 (the model's)."""
    from lmlab.lab.interp import saelab
    drawn = []
    save = saelab.save_figure
    monkeypatch.setattr(saelab, "save_figure", lambda fig, path: drawn.append(fig.axes[0]) or save(fig, path))
    res = saelab.run_sae(model_dir, [str(tmp_path / "book.txt")], tmp_path / "sae",
                         {"kind": "topk", "k": 4, "steps": 30, "stream": 1, "n_features": 32}, 1000)
    ax, scale = drawn[0], float(load_sae(res["saved"]).scale)
    assert ax.get_ylabel() == "MSE: squared error per token"
    line = ax.get_lines()[0]
    assert line.get_label() == "MSE (training batches)"
    want = [r["mse_normalised"] / scale ** 2 for r in res["training"]["history"]]
    assert line.get_ydata().tolist() == pytest.approx(want, rel=1e-12)
    assert 1 / 3 < want[-1] / res["metrics"]["mse"] < 3  # the last batches' error beside the held-out one
    assert scale ** 2 > 10  # the units differ here: the old curve sat scale^2 times above the report's MSE


@pytest.mark.parametrize("argv, message", [
    (["sae"], "sae needs --books"),
    (["sae", "--books", "BOOK", "--kind", "dense"], "--kind 'dense' is not an SAE kind"),
    (["sae", "--books", "BOOK", "--layer", "7"], "--layer 7 out of range"),
    (["sae", "--books", "BOOK", "--steps", "0"], "--steps (0) must be >= 1"),
    (["sae", "--books", "BOOK", "--features", str(10**10)],  # was an allocation traceback
     "n_features (10000000000) must be at most 256 x d_in = 16384, the largest dictionary per input dimension"),
    (["sae", "--books", "BOOK", "--features", "16385"], "n_features (16385) must be at most 256 x d_in = 16384"),
    (["sae", "--books", "BOOK", "--prompt", "hi"], "--prompt is for lens, attention and patch"),
    (["sae-facts"], "leave out --model"),
])
def test_cli_bad_input_is_one_line_exit_2(model_dir, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "book.txt") if a == "BOOK" else a for a in argv]
    assert main(["lab", "interp", argv[0], "--model", str(model_dir), *argv[1:], "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists() and not (model_dir / "sae").exists()
