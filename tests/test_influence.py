"""Influence (lab/influence.py): exact TracIn equals autograd's per-example dot products; the random projection
stays within the Johnson-Lindenstrauss tolerance; Spearman's rho; the LOO check (slow)."""

from __future__ import annotations

import json
import math
import sys

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
    # the same documents in two parts, each padded to its own longest row (rows 0-2 are 4, 8 and 11 targets long)
    ids = [torch.cat([x[y != -100][:1], y[y != -100]]).tolist() for x, y in zip(*docs)]
    parts = tracin(list(zip(models, lrs)), [examples(ids[:3]), examples(ids[3:])], target, k=None, chunk=4)
    np.testing.assert_allclose(parts, want, rtol=1e-6, atol=1e-12)
    # ideal TracIn: each checkpoint scores only its own batch
    only = tracin(list(zip(models, lrs)), docs, target, k=None, batches=[[0, 1], [1, 5]])
    g = [[_autograd_grad(m, docs[0][i], docs[1][i]) @ _autograd_grad(m, target[0][0], target[1][0])
          for i in range(6)] for m in models]
    np.testing.assert_allclose(only, [0.3 * g[0][0], 0.3 * g[0][1] + 0.1 * g[1][1], 0, 0, 0, 0.1 * g[1][5]],
                               rtol=1e-6, atol=1e-12)


def test_checkpoints_given_as_loaders_are_in_memory_one_at_a_time():
    """run_influence loaded every checkpoint at once and scored 64 rows of full gradients together (9.3 GB for 20
    passages of a 7M-parameter run, docs/LOG.md); checkpoints may be loaders now, each model let go before the
    next is loaded, with the same scores, exact and projected."""
    import gc
    import weakref
    models, docs, target = _setup()
    lrs = [0.3, 0.1]
    alive: list[weakref.ref] = []

    def loader(m):
        def load():
            gc.collect()
            assert not any(r() is not None for r in alive), "the previous checkpoint is still in memory"
            copy = Transformer(m.config)
            copy.load_state_dict(m.state_dict())
            alive.append(weakref.ref(copy))
            return copy
        return load

    for k in (None, 64):
        want = tracin(list(zip(models, lrs)), docs, target, k=k, seed=1)
        got = tracin([(loader(m), lr) for m, lr in zip(models, lrs)], docs, target, k=k, seed=1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
        alive.clear()


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


def test_a_projection_larger_than_the_gradient_or_the_memory_is_refused(monkeypatch):
    from lmlab.lab import influence
    with pytest.raises(ValueError, match=r"^--proj-dim \(101\) must be at most the gradient's size, 100 numbers "):
        Projector(100, 101)
    monkeypatch.setattr(influence, "available_memory", lambda device: 3 * 2**30)
    Projector(2**20, 512)  # 2 GiB
    with pytest.raises(ValueError, match=r"^--proj-dim 1024 needs 4.0 GiB for the projection \(1,048,576 x 1024 "
                                         r"float32\), more than the 3.0 GiB available; lower it"):
        Projector(2**20, 1024)
    Projector(2**20, None)  # exact dot products: no matrix


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4): Pearson by hand
    r = np.array([1.5, 1.5, 3, 4]) - 2.5
    assert spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(float(r @ (np.arange(1, 5) - 2.5)) /
                                                               math.sqrt(float(r @ r) * 5.0))
def test_the_lab_checks_its_seeds_before_it_trains(tmp_path):
    from lmlab.lab.influence import InfluenceLabConfig, run_influence_lab
    for seeds in ([], [1, 1]):  # []: an IndexError after the work; a seed twice: the same work twice
        with pytest.raises(ValueError, match=r"^--seeds \(.*\) must be distinct integers"):
            run_influence_lab(tmp_path / "inf", seeds, InfluenceLabConfig.quick())
    assert not (tmp_path / "inf").exists()


def test_the_lab_report_says_what_it_measures(tmp_path):
    """The claim said "TracInCP with a random projection" and the note called TracInCP "TracIn", while the graded
    scores are per-step TracIn with exact dot products (proj_dim 0)."""
    from lmlab.lab.influence import InfluenceLabConfig, run_influence_lab
    tiny = dict(documents=6, people=3, cities=2, jobs=2, n_layer=1, n_embd=8, n_head=2, batch_size=3)
    for k, dots in ((0, "exact gradient dot products"),
                    (4, "gradients random-projected to 4 numbers, as TRAK (Park et al. 2023)")):
        res = json.loads(run_influence_lab(tmp_path / f"k{k}", [0], InfluenceLabConfig(**tiny, proj_dim=k))
                         and (tmp_path / f"k{k}" / "results.json").read_text())
        assert res["claim"] == (f"Per-step TracIn influence ({dots}) ranks documents by their true leave-one-out "
                                "effect on a target text (Pruthi et al. 2020).")
        page = (tmp_path / f"k{k}" / "report.html").read_text()
        assert "TracIn (the verdict): sum over the steps whose batch held the document" in page
        assert "TracInCP (beside it): the same at the epoch-start checkpoints only" in page
        assert ("Dot products projected (--proj-dim)." if k else "Dot products exact.") in page


@pytest.mark.slow
def test_tracin_ranks_documents_like_leave_one_out(tmp_path):
    """The must-show: 200 documents, a 0.19M model, rho >= 0.3 against true (deterministic) leave-one-out."""
    assert main(["lab", "data", "influence", "--out", str(tmp_path / "inf")]) == 0
    res = json.loads((tmp_path / "inf" / "results.json").read_text())
    assert len(res["per_seed"][0]["loo"]) == 200 and res["per_seed"][0]["parameters"] == 186_480
    assert res["per_seed"][0]["spearman"] >= 0.3


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    """A 30-step run on a small book of distinct paragraphs, checkpoints at 10, 20 and 30."""
    from lmlab.train.demo_corpus import demo_corpus
    tmp = tmp_path_factory.mktemp("influence-run")
    book = tmp / "tales.txt"
    book.write_text(demo_corpus(n_stories=40, seed=1), encoding="utf-8")
    run = tmp / "run"
    torch.set_num_threads(1)
    assert main(["train", str(book), "--out", str(run), "--tokenizer-kind", "word", "--vocab-size", "600",
                 "--family", "llama", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32",
                 "--max-steps", "30", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "5", "--eval-every", "0",
                 "--save-every", "10", "--keep-last", "0", "--sample-every", "0", "--no-compile"]) == 0
    return book, run


def test_a_runs_passages_scored_on_a_target_equal_autograds_sum_over_its_checkpoints(word_run, tmp_path, capsys):
    from lmlab.tokenizers import Tokenizer
    from lmlab.train import TrainConfig, checkpoints, lr_at
    from lmlab.train.checkpoint import checkpoint_model
    book, run = word_run
    paragraphs = [p.strip() for p in book.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    target = paragraphs[7]
    out = tmp_path / "inf"
    assert main(["lab", "data", "influence", "--run", str(run), "--target", target, "--out", str(out)]) == 0
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    # the passages of what the run trained on: the book before its held-out tail (it scored those too)
    doc = json.loads((run / "data" / "tokens.json").read_text())["documents"][0]
    text = book.read_text(encoding="utf-8")
    trained = text[:round(len(text) * (doc["train"][1] - doc["train"][0]) / (doc["train"][1] - doc["train"][0]
                                                                             + doc["val"][1] - doc["val"][0]))]
    assert [p["text"] for p in res["passages"]] == [p.strip() for p in trained.split("\n\n") if p.strip()]
    assert len(res["passages"]) < len(paragraphs) and res["checkpoints"] == [10, 20, 30]
    # the reference: lr at each checkpoint x the 10 steps it stands for x autograd's dot product of the
    # model's own mean losses, one window (a passage cut at the context of 32) at a time
    tok, tc = Tokenizer.load(run / "tokenizer.json"), TrainConfig.from_dict(json.loads((run / "config.json")
                                                                                       .read_text())["train"])
    models = [checkpoint_model(p) for p in checkpoints(run)]
    weights = [lr_at(s - 1, tc, 30) * 10 for s in (10, 20, 30)]
    assert res["weights"] == pytest.approx(weights, rel=1e-12)
    cut = lambda ids: [ids[i:i + 33] for i in range(0, len(ids) - 1, 32) if len(ids[i:i + 33]) > 1]  # noqa: E731
    def grad(model, ids):
        x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        return _autograd_grad(model, x, y)
    for k in (0, 7, 19):
        want = sum(w * sum(float(grad(m, t) @ grad(m, d)) for t in cut(tok.encode(target))
                           for d in cut(tok.encode(paragraphs[k]))) for m, w in zip(models, weights))
        assert res["passages"][k]["score"] == pytest.approx(want, rel=1e-6)
    # the report's lists: the highest scores above 0, the lowest below 0
    scores = sorted((p["score"] for p in res["passages"]), reverse=True)
    assert [h["TracIn score"] for h in res["helped"]] == [v for v in scores[:10] if v > 0]
    assert [h["TracIn score"] for h in res["hurt"]] == [v for v in scores[::-1][:10] if v < 0]
    assert res["helped"][0]["passage"][:20] in (out / "report.html").read_text()


def test_the_reproduce_line_is_quoted_for_a_shell(word_run, tmp_path, monkeypatch):
    """A target of several words read back as several arguments: the line did not run what was run."""
    import shlex
    _, run = word_run
    argv = ["lab", "data", "influence", "--run", str(run), "--target", "the fox ran", "--max-passages", "2",
            "--out", str(tmp_path / "my inf")]
    monkeypatch.setattr(sys, "argv", ["lmlab", *argv])
    assert main(argv) == 0
    command = json.loads((tmp_path / "my inf" / "results.json").read_text())["command"]
    assert command == f"lmlab lab data influence --run {run} --target 'the fox ran' --max-passages 2 --out " \
                      f"'{tmp_path / 'my inf'}'"
    assert shlex.split(command) == ["lmlab", *argv]


def test_proj_dim_is_checked_before_the_work(word_run, tmp_path, capsys, monkeypatch):
    """A big --proj-dim allocated d x k floats half-way through and died with a traceback; -3 in the lab said
    "must be positive" of a flag that takes 0."""
    from lmlab.lab import influence
    _, run = word_run
    out = tmp_path / "o"
    d = influence.ModelConfig.from_dict(json.loads((run / "config.json").read_text())["model"]).num_parameters()
    cases = [(["--run", str(run), "--target", "the fox", "--proj-dim", "100000000"],
              f"--proj-dim (100000000) must be at most the gradient's size, {d:,} numbers (one per trained "
              "parameter); 0 gives exact dot products"),
             (["--quick", "--proj-dim", "100000000"], "--proj-dim (100000000) must be at most the gradient's size, "),
             (["--quick", "--proj-dim", "-3"], "--proj-dim (-3) must be >= 0 (0: exact dot products)"),
             (["--run", str(run), "--target", "the fox", "--proj-dim", "-3"],
              "--proj-dim (-3) must be >= 0 (0: exact dot products)")]
    trained = []
    monkeypatch.setattr(influence, "train_sgd", lambda *a, **k: trained.append(1))
    for argv, message in cases:
        assert main(["lab", "data", "influence", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lmlab: error: {message}") and err.count("\n") == 1, err
    monkeypatch.setattr(influence, "available_memory", lambda device: 2**20)
    assert main(["lab", "data", "influence", "--out", str(out), "--run", str(run), "--target", "the fox",
                 "--proj-dim", "64"]) == 2
    assert f"--proj-dim 64 needs {4 * 64 * d / 2**20:.1f} MiB for the projection ({d:,} x 64 float32), more than " \
           "the 1.0 MiB available; lower it (0: exact dot products)\n" in capsys.readouterr().err
    assert not out.exists() and not trained
    with pytest.raises(ValueError, match=r"^proj_dim must be >= 0, got -3$"):
        influence.InfluenceLabConfig(proj_dim=-3)


def test_a_flag_the_mode_does_not_read_is_refused(word_run, tmp_path, capsys, monkeypatch):
    """--top, --unit without --run, and --quick, --seeds with it, were ignored without a word."""
    from lmlab.lab import influence
    _, run = word_run
    out = tmp_path / "o"
    monkeypatch.setattr(influence, "train_sgd", lambda *a, **k: pytest.fail("trained"))
    for argv, message in [(["--quick", "--top", "3", "--unit", "document"],
                           "the influence check (without --run) does not read --unit, --top; drop them"),
                          (["--max-passages", "5"], "the influence check (without --run) does not read "
                                                    "--max-passages; drop it"),
                          (["--run", str(run), "--target", "the fox", "--quick", "--seeds", "0"],
                           "influence on a run's passages (--run) does not read --seeds, --quick; drop them")]:
        assert main(["lab", "data", "influence", "--out", str(out), *argv]) == 2
        assert capsys.readouterr().err == f"lmlab: error: {message} (a setting that would be ignored is refused)\n"
    assert not out.exists()


def test_a_runs_influence_refuses_what_it_cannot_score(word_run, tmp_path, capsys):
    book, run = word_run
    base = ["lab", "data", "influence", "--out", str(tmp_path / "o")]
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()),
                                                   "sources": [str(tmp_path / "gone.txt")]}))
    (moved / "checkpoints" / "step-10").mkdir(parents=True)
    for argv, message in [(["--run", str(run)], "takes --run and one of --target or --target-file"),
                          (["--run", str(run), "--target", "a", "--target-file", str(book)], "one of --target"),
                          (["--target", "a"], "takes --run"),
                          (["--run", str(tmp_path), "--target", "the fox"], "config.json"),
                          (["--run", str(moved), "--target", "the fox"], "the run's books are not where it read them"),
                          (["--run", str(run), "--target", "  "], "the target text is empty")]:
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmlab: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    # a book edited since the run trained on it: its passages are not what the run trained on
    kept = book.read_text(encoding="utf-8")
    book.write_text(kept + "\n\nCompletely different text that was never trained on.\n", encoding="utf-8")
    try:
        assert main([*base, "--run", str(run), "--target", "the fox"]) == 2
        assert "the run's book tales.txt changed since it trained" in capsys.readouterr().err
    finally:
        book.write_text(kept, encoding="utf-8")
    # --target-file is read as the books are: a cp1251 file was an internal error, a NUL byte went through
    (tmp_path / "t1251.txt").write_bytes("Ёжик шёл по лесу и нашёл гриб.".encode("cp1251"))
    (tmp_path / "nul.txt").write_bytes(b"the fox\x00 ran")
    assert main([*base, "--run", str(run), "--target-file", str(tmp_path / "t1251.txt"), "--max-passages", "2"]) == 0
    assert "Ёжик" in json.loads((tmp_path / "o" / "results.json").read_text())["target"]
    assert main([*base[:-1], str(tmp_path / "o2"), "--run", str(run), "--target-file", str(tmp_path / "nul.txt")]) == 2
    assert "NUL" in capsys.readouterr().err
