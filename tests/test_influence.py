"""Influence (lab/influence.py): exact TracIn equals autograd's per-example dot products; the random projection
stays within the Johnson-Lindenstrauss tolerance; Spearman's rho; the LOO check (slow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.lab.influence import Projector, examples, per_example_grads, spearman, tracin
from lmlab.models import ModelConfig, Transformer


def _setup():
    torch.manual_seed(0)
    mc = ModelConfig(family="llama", vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=12)
    models = [Transformer(mc) for _ in range(2)]
    ids = [torch.randint(0, 50, (n,)).tolist() for n in (5, 9, 12, 7, 10, 6)]
    return models, examples(ids), examples([torch.randint(0, 50, (8,)).tolist()], [4])


def _autograd_grad(model, x, y):
    """One row's gradient from the model's own mean loss (-100 ignored), by plain backward."""
    model.zero_grad()
    model(x[None], y[None]).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def test_unprojected_scores_equal_autograd_dot_products():
    models, docs, target = _setup()
    lrs = [0.3, 0.1]
    got = tracin(list(zip(models, lrs)), docs, target, k=None, chunk=4)
    want = np.zeros(len(got))
    for m, lr in zip(models, lrs):
        gt = _autograd_grad(m, target[0][0], target[1][0])
        for i in range(len(want)):
            want[i] += lr * float(_autograd_grad(m, docs[0][i], docs[1][i]) @ gt)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    # ideal TracIn: each checkpoint scores only its own batch
    only = tracin(list(zip(models, lrs)), docs, target, k=None, batches=[[0, 1], [1, 5]])
    g = [[_autograd_grad(m, docs[0][i], docs[1][i]) @ _autograd_grad(m, target[0][0], target[1][0])
          for i in range(6)] for m in models]
    np.testing.assert_allclose(only, [0.3 * g[0][0], 0.3 * g[0][1] + 0.1 * g[1][1], 0, 0, 0, 0.1 * g[1][5]],
                               rtol=1e-6, atol=1e-12)


def test_projected_dot_products_within_the_jl_tolerance():
    models, docs, target = _setup()
    G = per_example_grads(models[0], *docs).double()
    gt = per_example_grads(models[0], *target).double()[0]
    k = 512
    proj = Projector(G.shape[1], k, seed=3, block_elems=4096)  # several blocks
    exact, approx = (G @ gt).numpy(), (proj(G.float()) @ proj(gt[None].float())[0]).numpy()
    # std of <Pa, Pb> for Gaussian P: sqrt((|a|^2 |b|^2 + <a, b>^2) / k); 4 std
    tol = 4 * np.sqrt(((G.norm(dim=1) * gt.norm()) ** 2 + torch.as_tensor(exact) ** 2).numpy() / k)
    assert np.all(np.abs(approx - exact) <= tol)
    # squared norms: <Pa, Pa> has std sqrt(2 / k) |a|^2 (a wrongly scaled P fails here)
    norms, pnorms = (G.norm(dim=1) ** 2).numpy(), (proj(G.float()).norm(dim=1) ** 2).numpy()
    assert np.all(np.abs(pnorms - norms) <= 4 * np.sqrt(2 / k) * norms)
    assert not np.allclose(approx, exact, rtol=1e-4)  # it is a projection, not the identity
    again = Projector(G.shape[1], k, seed=3, block_elems=4096)  # the same seed draws the same P
    assert np.array_equal(proj(G.float()).numpy(), again(G.float()).numpy())
    with pytest.raises(ValueError, match="gradients have"):
        proj(G[:, :10])


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4): Pearson by hand
    r = np.array([1.5, 1.5, 3, 4]) - 2.5
    assert spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(float(r @ (np.arange(1, 5) - 2.5)) /
                                                               math.sqrt(float(r @ r) * 5.0))
@pytest.mark.slow
def test_tracin_ranks_documents_like_leave_one_out(tmp_path):
    """The must-show: 200 documents, a 0.12M model, rho >= 0.3 against true (deterministic) leave-one-out."""
    assert main(["lab", "data", "influence", "--out", str(tmp_path / "inf")]) == 0
    res = json.loads((tmp_path / "inf" / "results.json").read_text())
    assert len(res["per_seed"][0]["loo"]) == 200
    assert res["per_seed"][0]["spearman"] >= 0.3
