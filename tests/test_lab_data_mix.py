"""lmlab lab data mix (lab/mix.py): the regression against planted coefficients, the proposal on a --quick run
(the target is held-out tales, so tales must get the largest share), and the CLI's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.data import TokenDataset
from lmlab.lab.mix import (
    choose_fit,
    features,
    fit_mixture,
    fit_quality,
    min_proxies,
    mixture_dataset,
    propose,
    spearman,
    target_loss,
)
from lmlab.models.io import load_pretrained


@pytest.mark.parametrize("fit", ["linear", "quadratic"])
def test_the_regression_recovers_planted_coefficients(fit):
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(4), 40)
    planted = rng.normal(3.0, 1.0, features(w[:1], fit).shape[1])
    y = features(w, fit) @ planted
    np.testing.assert_allclose(fit_mixture(w, y, fit), planted, atol=1e-9)
    q = fit_quality(w, y, fit)
    assert q["r2"] == pytest.approx(1.0, abs=1e-12) and q["loo_spearman"] == pytest.approx(1.0)
    # with noise of 0.001 nats the coefficients stay within a few hundredths
    noisy = y + rng.normal(0, 1e-3, len(y))
    np.testing.assert_allclose(fit_mixture(w, noisy, fit), planted, atol=0.05 if fit == "quadratic" else 0.005)


def test_features_and_spearman_by_hand():
    np.testing.assert_allclose(features([0.2, 0.3, 0.5], "quadratic"), [[0.2, 0.3, 0.5, 0.06, 0.1, 0.15]])
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 2, 3])) == pytest.approx(1.0)


def test_the_proposal_minimises_the_planted_response():
    # linear loss 3, 1, 2 per source: the best mixture is all of source 1
    np.testing.assert_allclose(propose(np.array([3.0, 1.0, 2.0]), 3, "linear", 1000, 1), [0, 1, 0])
    # a quadratic bowl with its minimum inside: loss = sum (w - m)^2 up to a constant on the simplex, m = (.5 .3 .2)
    m = np.array([0.5, 0.3, 0.2])
    w = np.random.default_rng(1).dirichlet(np.ones(3), 60)
    coef = fit_mixture(w, ((w - m) ** 2).sum(1), "quadratic")
    np.testing.assert_allclose(propose(coef, 3, "quadratic", 100_000, 50), m, atol=0.02)


def test_auto_takes_the_fit_that_ranks_held_out_mixtures_better():
    rng = np.random.default_rng(2)
    w = rng.dirichlet(np.ones(3), 30)
    # a bowl with its minimum inside: the linear model cannot rank it, the quadratic can
    fit, q = choose_fit(w, ((w - [0.5, 0.3, 0.2]) ** 2).sum(1), "auto")
    assert fit == "quadratic" and q["quadratic"]["loo_spearman"] > q["linear"]["loo_spearman"]
    # a planted linear response: both rank perfectly, and the tie goes to the linear model
    fit, q = choose_fit(w, w @ [3.0, 1.0, 2.0], "auto")
    assert fit == "linear" and q["linear"]["loo_spearman"] == pytest.approx(q["quadratic"]["loo_spearman"])
    # too few mixtures to judge the quadratic leave-one-out (6 coefficients: 8 mixtures): auto uses the linear one
    # alone; an explicit fit is used as asked
    assert choose_fit(w[:7], w[:7] @ [3.0, 1.0, 2.0], "auto")[1].keys() == {"linear"}
    assert choose_fit(w[:8], w[:8] @ [3.0, 1.0, 2.0], "auto")[1].keys() == {"linear", "quadratic"}
    w2 = np.random.default_rng(1).dirichlet(np.ones(2), 4)  # two sources: 3 quadratic coefficients, 4 mixtures
    assert choose_fit(w2, w2 @ [3.0, 1.0], "auto")[1].keys() == {"linear"}
    assert [min_proxies(k, f) for k in (2, 3) for f in ("linear", "quadratic")] == [4, 5, 5, 8]
    assert choose_fit(w, w @ [3.0, 1.0, 2.0], "quadratic")[0] == "quadratic"


def test_too_few_proxies_for_the_fit():
    with pytest.raises(ValueError, match="needs more mixtures"):
        fit_mixture(np.full((6, 3), 1 / 3), np.zeros(6), "quadratic")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "mix"
    torch.set_num_threads(1)
    assert main(["lab", "data", "mix", "--quick", "--seeds", "0", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_weights_up_the_source_the_target_came_from(quick):
    out, res = quick
    assert res["sources"] == ["tales", "sums", "logs"]
    share = dict(zip(res["sources"], res["proposal"]))
    assert share["tales"] == max(share.values()) and share["tales"] > 1 / 3
    assert sum(res["proposal"]) == pytest.approx(1.0)
    # the stored fit is the fit of the stored proxies, and the verdict's win is the two stored losses compared
    w = np.array([p["shares"] for p in res["proxies"]])
    y = np.array([p["target_loss"] for p in res["proxies"]])
    assert res["fit_used"] == choose_fit(w, y, "auto")[0]
    np.testing.assert_allclose(res["coefficients"], fit_mixture(w, y, res["fit_used"]), rtol=1e-9)
    np.testing.assert_allclose(res["fit"]["r2"], fit_quality(w, y, res["fit_used"])["r2"])
    row = res["per_seed"][0]
    assert row["win"] == (row["proposal"] < row["uniform"]) and res["win_share"] == float(row["win"])
    # the stored target loss is the saved model's loss on the saved target tokens
    ids = np.load(out / "target.npy")
    model = load_pretrained(out / "verify" / "seed0" / "proposal" / "final")[0]
    assert target_loss(model, ids, res["config"]["block_size"]) == pytest.approx(row["proposal"], abs=1e-6)
    # data prepare's weights: per document share / tokens of its source, the largest 1
    assert max(res["prepare_weights"].values()) == pytest.approx(1.0)
    assert "mix" in (out / "report.html").read_text() and (out / "fit.png").stat().st_size > 0


def test_mixture_dataset_samples_the_shares(quick):
    out, res = quick
    ds = TokenDataset.open(out / "data")
    source_of = np.array([res["sources"].index(d.name.split("/")[0]) for d in ds.documents])
    shares = np.array([0.6, 0.1, 0.3])
    cdf = mixture_dataset(ds, list(source_of), shares)._sampler(8)[2]
    p_doc = np.diff(np.concatenate([[0.0], cdf]))  # the chance that a training window starts in each document
    # not exact: a document's last window start is its EOS, and the region's last seq_len positions start none
    np.testing.assert_allclose(np.bincount(source_of, weights=p_doc, minlength=3), shares, atol=2e-3)


def test_a_small_last_source_gets_its_share_of_the_windows(tmp_path):
    """The weights came from train tokens, the sampler draws a document by its window starts: a last source of
    few tokens, most of whose starts fall past the region's last one, got [0.666, 0.334] of [0.5, 0.5] (a
    review's count over 200k windows). With seq_len they come from the same starts: exactly the shares."""
    from lmlab.data.dataset import prepare_texts
    from lmlab.tokenizers import Tokenizer
    texts = ["the fox ran into the wood and the cat ran after it. " * 80, "a small note at the end of it all. " * 4]
    tok = Tokenizer.train(texts, kind="char", vocab_size=60)
    ds = prepare_texts(texts, tok, tmp_path / "data", names=["a/a.txt", "b/b.txt"], val_fraction=0.0)
    for shares in ([0.5, 0.5], [0.2, 0.8]):
        cdf = mixture_dataset(ds, [0, 1], np.array(shares), 64)._sampler(64)[2]
        np.testing.assert_allclose(np.diff(np.concatenate([[0.0], cdf])), shares, rtol=1e-9)


@pytest.mark.parametrize("argv, message", [
    (["a.txt", "b.txt"], "give both SOURCES and --target"),
    (["--target", "t.txt"], "give both SOURCES and --target"),
    (["a.txt", "--target", "t.txt"], "at least two sources"),
    (["--proxies", "0"], "--proxies (0) must be >= 1"),
    # numpy's "Maximum allowed dimension exceeded", an internal error after the tokenizer and data were written
    (["--proxies", str(2**63)], f"proxies ({2**63}) must be <= 10000"),
    (["a.txt", "b.txt", "c.txt", "--target", "t.txt", "--proxies", "7", "--fit", "quadratic"],
     "a quadratic fit over 3 sources has 6 coefficients; judging it leave-one-out needs at least 8 mixtures, have 7 "
     "(raise --proxies or use --fit linear)"),
    (["a.txt", "b.txt", "c.txt", "--target", "t.txt", "--proxies", "4"],  # auto: the linear fit at least
     "a linear fit over 3 sources has 3 coefficients; judging it leave-one-out needs at least 5 mixtures, have 4 "
     "(raise --proxies)\n"),
    (["a.txt", "b.txt", "--target", "t.txt", "--proxies", "3", "--fit", "linear"], "needs at least 4 mixtures, have 3"),
])
def test_cli_refuses_bad_input(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    for name in ("a.txt", "b.txt", "c.txt", "t.txt"):
        (tmp_path / name).write_text(f"some text of {name}, long enough to tokenise. " * 40)
    for _ in range(2):  # a refusal leaves no --out behind (tokenizer, data, target were left: the retry was
        assert main(["lab", "data", "mix", "--quick", "--out", str(tmp_path / "out"), *argv]) == 2  # refused)
        err = capsys.readouterr().err
        assert err.startswith("lmlab: error: ") and message in err, err
        assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["lab", "data", "mix", "--quick", "--out", str(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_user_sources_and_weights_for_data_prepare(tmp_path):
    # two sources whose files share a name: data prepare then names them by relative path, and so must the weights
    from lmlab.lab.mix import builtin_sources
    paths, target = builtin_sources(tmp_path / "src", 6000)
    for p in paths[:2]:
        (tmp_path / p.stem).mkdir()
        p.rename(tmp_path / p.stem / "book.txt")
    out = tmp_path / "out"
    assert main(["lab", "data", "mix", str(tmp_path / "tales"), str(tmp_path / "sums"), "--target", str(target),
                 "--quick", "--seeds", "0", "--workers", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["sources"] == ["tales", "sums"] and sorted(res["prepare_weights"]) == ["sums/book.txt", "tales/book.txt"]
    argv = ["data", "prepare", str(tmp_path / "tales"), str(tmp_path / "sums"), "--tokenizer",
            str(out / "tokenizer.json"), "--out", str(tmp_path / "tokens")]
    argv += [f"--weight={k}={v}" for k, v in res["prepare_weights"].items()]
    assert main(argv) == 0
    ds = TokenDataset.open(tmp_path / "tokens")
    p_doc = np.diff(np.concatenate([[0.0], ds._sampler(8)[2]]))
    got = {d.name.split("/")[0]: p for d, p in zip(ds.documents, p_doc)}
    # the prepared token file samples the two sources in the proposed shares
    np.testing.assert_allclose([got["tales"], got["sums"]], res["proposal"], atol=5e-3)
