"""Mixtures chosen by experiment (`lmlab lab data mix`): which shares of the user's sources give the lowest loss on
a target text?

RegMix (Liu et al. 2024, "RegMix: Data Mixture as Regression for Language Model Pre-training",
https://arxiv.org/abs/2407.01492): train many small proxy models on random mixtures at one small token budget,
regress their target loss on the mixture weights, and take the mixture the regression likes best; the ranking of
mixtures carries over from small models to larger ones. DoReMi (Xie et al. 2023, https://arxiv.org/abs/2305.10429)
reaches a mixture with a proxy model too, by group DRO against a reference model, with no target; here the user
names the target text, as in RegMix.

    lmlab lab data mix --out runs/mix --quick                 # built-in sources; the target is held-out tales
    lmlab lab data mix books/ru books/en code/ --target val.txt --out runs/mix

Steps, all with the Trainer and the same tokenizer (trained on the sources, never on the target):
1. `proxies` mixtures drawn from Dirichlet(1, ..., 1) over the sources (uniform on the simplex); one proxy model per
   mixture, `proxy_steps` steps from the same initialisation; its loss on the target (mean token NLL).
2. A Scheffé quadratic mixture model (Scheffé 1958, the classical regression for mixture experiments):
   loss ≈ Σ b_i w_i + Σ_{i<j} b_ij w_i w_j, least squares, no intercept (Σ w_i = 1 makes it redundant), or the linear
   model (the first sum only). Reported for each: in-sample R² and the leave-one-out Spearman ρ between predicted and
   measured loss (does the regression rank mixtures it has not seen?). fit="auto" takes the one with the higher ρ
   (linear on a tie): ranking mixtures is what the proposal needs, and R² rewards the quadratic's extra terms anyway
   (on the built-in sources the quadratic had the higher R², 0.94 against 0.71, the linear the higher ρ, 0.98
   against 0.87, and the linear's proposal reached the lower target loss on the bigger model).
3. The proposal: the mean of the `top_k` best of `candidates` Dirichlet(1) mixtures by predicted loss (RegMix
   averages its top 100 of 100k simulated mixtures: one argmin is noisy where the fit is flat).
4. A bigger model trained for `verify_steps` on the proposal and on the uniform mixture (equal shares of tokens),
   same seed, same initialisation and data generator, for each seed; the proposal wins a seed when its target loss
   is lower.

A mixture is a share of training tokens per source: a document is drawn with probability ∝ its weight × its
training tokens (TokenDataset.sample_batch), so each document of source i gets weight w_i / (tokens of source i).
The same numbers go into `lmlab data prepare --weight NAME=W` (results.json "prepare_weights").
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configs import knob, validate
from ..data import TokenDataset, find_documents, prepare_texts, read_document
from ..data.dataset import _document_names
from ..data.documents import as_sources
from ..models import ModelConfig, Transformer
from ..models.io import load_pretrained
from ..tokenizers import Tokenizer
from ..train import TrainConfig, train
from ..train.console import quiet
from ..train.demo_corpus import demo_corpus
from .facts.report import _plt, save_figure, write_report
from .parallel import process_map


@dataclasses.dataclass
class MixLabConfig:
    # each proxy is a model trained (RegMix, Liu et al. 2024, used 512); 2**63 failed in numpy after the set-up
    proxies: int = knob(24, "proxy models, one per random mixture", ge=1, le=10_000)
    proxy_steps: int = 150
    proxy_layers: int = knob(1, "layers of each proxy model", ge=1)
    proxy_embd: int = knob(32, "width of each proxy model", ge=1)
    verify_steps: int = 400
    verify_layers: int = knob(2, "layers of the bigger model the proposal is checked on", ge=1)
    verify_embd: int = knob(64, "width of the bigger model", ge=1)
    block_size: int = 64
    batch_size: int = 16
    vocab_size: int = knob(384, "the BPE tokenizer's vocabulary (4 specials + 256 bytes at least)", ge=260)
    lr: float = knob(3e-3, "learning rate of every model", gt=0)
    fit: str = "auto"
    candidates: int = 100_000
    top_k: int = 100
    chars_per_source: int = knob(60_000, "characters of each built-in source", ge=1)

    def __post_init__(self) -> None:
        validate(self)  # types and finite numbers ("3" was a TypeError below, nan passed), the bounds above
        for name in ("proxies", "proxy_steps", "verify_steps", "batch_size", "candidates", "top_k", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.fit not in ("auto", "linear", "quadratic"):
            raise ValueError(f"fit must be auto, linear or quadratic, not {self.fit!r}")
        if self.top_k > self.candidates:
            raise ValueError(f"top_k ({self.top_k}) must be <= candidates ({self.candidates})")

    @classmethod
    def quick(cls) -> MixLabConfig:
        return cls(proxies=12, proxy_steps=40, verify_steps=80, verify_embd=48, block_size=32, vocab_size=300,
                   candidates=20_000, top_k=20, chars_per_source=20_000)


# ---- the regression ---------------------------------------------------------------------------------------------

def features(w: np.ndarray, fit: str) -> np.ndarray:
    """Scheffé's terms of mixtures w (n, k): the k shares, then (quadratic) the k(k-1)/2 products w_i w_j, i < j."""
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    if fit == "linear":
        return w
    i, j = np.triu_indices(w.shape[1], k=1)
    return np.concatenate([w, w[:, i] * w[:, j]], axis=1)


def fit_mixture(w: np.ndarray, y: np.ndarray, fit: str) -> np.ndarray:
    """Least-squares coefficients of loss on features(w); ValueError with too few mixtures to fit them."""
    x = features(w, fit)
    if len(x) <= x.shape[1]:
        raise ValueError(f"a {fit} fit over {w.shape[1]} sources has {x.shape[1]} coefficients and needs more "
                         f"mixtures than that; have {len(x)}")
    return np.linalg.lstsq(x, np.asarray(y, dtype=np.float64), rcond=None)[0]


def min_proxies(k: int, fit: str) -> int:
    """The fewest mixtures a fit over k sources can be judged on: leave-one-out refits it on all but one, and each
    refit needs more mixtures than the fit has coefficients."""
    return features(np.ones((1, k)) / k, fit).shape[1] + 2


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ: Pearson's r of the ranks (average ranks for ties)."""
    def rank(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v), dtype=np.float64)
        for u in np.unique(v):  # ties share the mean of their ranks
            r[v == u] = r[v == u].mean()
        return r
    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def fit_quality(w: np.ndarray, y: np.ndarray, fit: str) -> dict[str, float]:
    """In-sample R² and leave-one-out predictions' Spearman ρ against the measured losses."""
    y = np.asarray(y, dtype=np.float64)
    pred = features(w, fit) @ fit_mixture(w, y, fit)
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300)
    loo = np.array([(features(w[i], fit) @ fit_mixture(np.delete(w, i, 0), np.delete(y, i), fit))[0]
                    for i in range(len(y))])
    return {"r2": float(r2), "loo_spearman": spearman(loo, y), "loo_pred": loo.tolist()}


def choose_fit(w: np.ndarray, y: np.ndarray, fit: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The fit to use and the quality of each one tried: `fit` itself, or for "auto" the one with the higher
    leave-one-out Spearman ρ (linear on a tie, or when there are too few mixtures to judge the quadratic)."""
    tried = ("linear", "quadratic") if fit == "auto" else (fit,)
    quality = {f: fit_quality(w, y, f) for f in tried if not (fit == "auto" and f == "quadratic"
                                                               and len(w) < min_proxies(w.shape[1], f))}
    rho = {f: q["loo_spearman"] if np.isfinite(q["loo_spearman"]) else -np.inf for f, q in quality.items()}
    return max(quality, key=lambda f: (rho[f], f == "linear")), quality


def propose(coef: np.ndarray, k: int, fit: str, candidates: int, top_k: int, seed: int = 0) -> np.ndarray:
    """The mean of the top_k of `candidates` Dirichlet(1) mixtures (plus the k pure sources and the uniform mixture)
    by predicted loss."""
    rng = np.random.default_rng(seed)
    cand = np.concatenate([rng.dirichlet(np.ones(k), candidates), np.eye(k), np.full((1, k), 1 / k)])
    pred = features(cand, fit) @ coef
    best = cand[np.argsort(pred, kind="stable")[:top_k]].mean(0)
    return best / best.sum()


# ---- built-in sources -------------------------------------------------------------------------------------------

def _sums(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    return f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}."


def _log(rng: random.Random) -> str:
    return (f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} "
            f"station {rng.randint(1, 40)} temp {rng.randint(-20, 35)} C wind {rng.randint(0, 20)} m/s "
            f"status {rng.choice(['OK', 'OK', 'WARN', 'FAIL'])}")


@contextlib.contextmanager
def set_up(out: Path) -> Iterator[None]:
    """A lab run's set-up and its checks: on a refusal --out is left as it was (a folder it made is removed, one
    that was empty is emptied again), so that the corrected command can run into it."""
    made = not out.exists()
    try:
        yield
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():  # it was empty: all in it is this call's
            for entry in out.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        raise


def save_target(out: Path, tok: Tokenizer, text: str, block_size: int) -> None:
    """The target text's ids as out/target.npy; a target shorter than one window is refused."""
    ids = np.asarray(tok.encode(text), dtype=np.int32)
    if len(ids) <= block_size:
        raise ValueError(f"the target has {len(ids)} tokens, fewer than one window of {block_size + 1}")
    np.save(out / "target.npy", ids)


def builtin_sources(folder: Path, chars: int) -> tuple[list[Path], Path]:
    """Three sources that differ in kind (folk tales, arithmetic, sensor logs) and a target of held-out tales (other
    stories from the same grammar): a good proposal puts most of its weight on the tales."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    texts = {"tales": demo_corpus(n_stories=max(1, chars // 300), seed=0),
             "sums": "\n".join(" ".join(_sums(rng) for _ in range(6)) for _ in range(max(1, chars // 100))),
             "logs": "\n".join(_log(rng) for _ in range(max(1, chars // 60)))}
    paths = []
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text[:chars] + "\n", encoding="utf-8")
        paths.append(folder / f"{name}.txt")
    target = folder / "target.txt"
    target.write_text(demo_corpus(n_stories=max(1, chars // 1500), seed=1), encoding="utf-8")
    return paths, target


# ---- training ---------------------------------------------------------------------------------------------------

def mixture_dataset(ds: TokenDataset, source_of: list[int], shares: np.ndarray,
                    seq_len: int | None = None) -> TokenDataset:
    """`ds` with document weights that give source i a share `shares[i]` of the sampled training windows
    (`seq_len`: by the windows that start in each document, as the sampler counts them; a last source of few
    tokens, whose final starts fall past the region's last one, got [0.33, 0.67] of [0.5, 0.5] by token counts);
    without seq_len, by train tokens."""
    tokens = np.zeros(len(shares))
    counts = ds.window_starts(seq_len) if seq_len else [d.train_tokens for d in ds.documents]
    for c, s in zip(counts, source_of):
        tokens[s] += c
    docs = [{**d, "weight": float(shares[s] / tokens[s]) if tokens[s] else 0.0}
            for d, s in zip(ds.header["documents"], source_of)]
    return TokenDataset(ds.path, {**ds.header, "documents": docs}, ds.tokens)


def target_loss(model: Transformer, ids: np.ndarray, seq_len: int) -> float:
    """Mean token NLL over consecutive windows of the target (each token after the first is a target once)."""
    starts = np.arange(0, len(ids) - seq_len, seq_len)
    rows = torch.from_numpy(ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    model.eval()
    total = n = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            x, y = rows[i:i + 32, :-1], rows[i:i + 32, 1:]
            total += model(x, y).loss.item() * y.numel()
            n += y.numel()
    return total / n


def _run(job: dict[str, Any]) -> float:
    """One model on one mixture: its target loss (a module-level function, so that process_map can spawn it)."""
    torch.set_num_threads(1)
    ds = TokenDataset.open(job["data"])
    ds = mixture_dataset(ds, job["source_of"], np.asarray(job["shares"]), job["model"]["block_size"])
    torch.manual_seed(job["init_seed"])  # proxies share one initialisation: only the mixture differs
    model = Transformer(ModelConfig.from_dict(job["model"]))
    steps = job["steps"]
    tc = TrainConfig(max_steps=steps, batch_size=job["batch_size"], lr=job["lr"], warmup_steps=min(20, steps // 5),
                     eval_every=0, eval_batches=1, save_every=0, log_every=steps, seed=job["seed"], device="cpu",
                     peak_flops=1e12, sample_every=0)
    with quiet():
        train(model, Tokenizer.load(job["tokenizer"]), ds, tc, job["out"],
              provenance={"mixture": dict(zip(job["names"], job["shares"]))})
    ids = np.load(job["target"], allow_pickle=False)
    return target_loss(load_pretrained(Path(job["out"]) / "final")[0], ids, job["model"]["block_size"])


def _source_names(sources: list[Path]) -> list[str]:
    names = [Path(s).stem or Path(s).name for s in sources]
    if len(set(names)) != len(names):
        names = [str(s) for s in sources]
    return names


def run_mix_lab(out: str | Path, sources: list[str | Path] | None, target: str | Path | None, seeds: list[int],
                cfg: MixLabConfig, workers: int | None = None, command: str = "") -> dict[str, Any]:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    if not seeds:
        raise ValueError("give at least one seed")
    if sources:
        sources = as_sources(sources)  # one path alone is one source (then refused: a mixture needs two)
    if bool(sources) != (target is not None):
        raise ValueError("give both SOURCES and --target, or neither (the built-in sources and target)")
    t0, cpu0 = time.perf_counter(), time.process_time()
    with set_up(out):  # a refusal leaves --out as it was, so the same command can run again
        if sources:
            if len(sources) < 2:
                raise ValueError(f"a mixture needs at least two sources, got {len(sources)}")
            docs = [find_documents([s]) for s in sources]  # a source of no documents is refused there
            target_text = "\n\n".join(read_document(p) for p in find_documents([target]))
            names = _source_names([Path(s) for s in sources])
        else:
            paths, target_path = builtin_sources(out / "sources", cfg.chars_per_source)
            docs, names, target_text = [[p] for p in paths], [p.stem for p in paths], target_path.read_text("utf-8")
        k, least = len(docs), "linear" if cfg.fit == "auto" else cfg.fit
        if cfg.proxies < min_proxies(k, least):
            c = min_proxies(k, least) - 2
            raise ValueError(f"a {least} fit over {k} sources has {c} coefficients; judging it leave-one-out needs "
                             f"at least {c + 2} mixtures, have {cfg.proxies} (raise --proxies"
                             + (" or use --fit linear)" if least != "linear" else ")"))
        texts = [[read_document(p) for p in d] for d in docs]
        tok = Tokenizer.train([t for group in texts for t in group], kind="bpe", vocab_size=cfg.vocab_size)
        tok.save(out / "tokenizer.json")
        flat = [t for group in texts for t in group]
        source_of = [i for i, group in enumerate(texts) for _ in group]
        doc_names = [f"{names[i]}/{p.name}" for i, d in enumerate(docs) for p in d]
        ds = prepare_texts(flat, tok, out / "data", names=doc_names, seq_len=cfg.block_size)
        for i in range(k):
            if not any(d.train_tokens for d, s in zip(ds.documents, source_of) if s == i):
                raise ValueError(f"source {names[i]} has no text")
        save_target(out, tok, target_text, cfg.block_size)

    def model(layers: int, embd: int) -> dict[str, Any]:
        return ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=cfg.block_size, n_layer=layers,
                                  n_embd=embd, n_head=max(1, embd // 16)).to_dict()

    common = {"data": str(out / "data"), "tokenizer": str(out / "tokenizer.json"), "target": str(out / "target.npy"),
              "source_of": source_of, "names": names,
              "batch_size": cfg.batch_size, "lr": cfg.lr}
    mixes = np.random.default_rng(12345).dirichlet(np.ones(k), cfg.proxies)
    jobs = [{**common, "shares": m.tolist(), "model": model(cfg.proxy_layers, cfg.proxy_embd),
             "steps": cfg.proxy_steps, "seed": 0, "init_seed": 0, "out": str(out / "proxies" / f"p{i:03d}")}
            for i, m in enumerate(mixes)]
    workers = max(1, min(workers or 2, len(jobs)))
    mapper = (lambda fn, xs: [fn(x) for x in xs]) if workers == 1 else (lambda fn, xs: process_map(fn, xs, workers))
    losses = np.asarray(mapper(_run, jobs))
    fit, fits = choose_fit(mixes, losses, cfg.fit)
    coef, quality = fit_mixture(mixes, losses, fit), fits[fit]
    proposal = propose(coef, k, fit, cfg.candidates, cfg.top_k)
    uniform = np.full(k, 1 / k)
    pred = {arm: float((features(m, fit) @ coef)[0]) for arm, m in (("proposal", proposal), ("uniform", uniform))}

    vjobs = [{**common, "shares": m.tolist(), "model": model(cfg.verify_layers, cfg.verify_embd),
              "steps": cfg.verify_steps, "seed": s, "init_seed": 1000 + s,
              "out": str(out / "verify" / f"seed{s}" / arm)}
             for s in seeds for arm, m in (("proposal", proposal), ("uniform", uniform))]
    vl = mapper(_run, vjobs)
    per_seed = [{"seed": s, "proposal": vl[2 * i], "uniform": vl[2 * i + 1], "win": vl[2 * i] < vl[2 * i + 1]}
                for i, s in enumerate(seeds)]
    share = sum(r["win"] for r in per_seed) / len(per_seed)

    tokens = np.zeros(k)
    for d, s in zip(ds.documents, source_of):
        tokens[s] += d.train_tokens
    # `lmlab data prepare --weight FILE=W`: per document, share / tokens of its source, scaled so the largest is 1
    doc_w = proposal[source_of] / tokens[source_of]
    # keyed as `data prepare` names documents given all the sources at once (relative paths where file names clash)
    prepare_weights = {n: float(w / doc_w.max()) for n, w in zip(_document_names([p for d in docs for p in d]), doc_w)}
    checks = {"the proposal beats uniform on >= 70% of seeds": share >= 0.7,
              "the regression ranks unseen mixtures (leave-one-out Spearman rho >= 0.5)":
                  None if not np.isfinite(quality["loo_spearman"]) else quality["loo_spearman"] >= 0.5}
    mix_text = ", ".join(f"{n} {w:.2f}" for n, w in zip(names, proposal))
    measured = (f"proposal ({mix_text}) beat uniform on {sum(r['win'] for r in per_seed)} of {len(seeds)} seed(s); "
                f"target loss {statistics.mean(vl[0::2]):.3f} vs {statistics.mean(vl[1::2]):.3f}; {fit} fit R² "
                f"{quality['r2']:.3f}, leave-one-out Spearman rho {quality['loo_spearman']:.2f} over {cfg.proxies} "
                f"proxies")
    plot = _scatter(out / "fit.png", losses, np.asarray(quality["loo_pred"]), mixes, names)
    table = [{"seed": r["seed"], "proposal target loss": r["proposal"], "uniform target loss": r["uniform"],
              "proposal wins": r["win"]} for r in per_seed]
    weights_table = [{"source": n, "proposal share": float(p), "uniform share": 1 / k, "training tokens": int(t),
                      "loss of the proxy with most of it": _best_near_vertex(mixes, losses, i)}
                     for i, (n, p, t) in enumerate(zip(names, proposal, tokens))]
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds, "sources": names, "proposal": proposal.tolist(),
               "uniform": uniform.tolist(), "predicted": pred, "coefficients": coef.tolist(), "fit_used": fit,
               "fit": quality, "fits": {f: {"r2": q["r2"], "loo_spearman": q["loo_spearman"]} for f, q in fits.items()},
               "proxies": [{"shares": m.tolist(), "target_loss": float(v)} for m, v in zip(mixes, losses)],
               "per_seed": per_seed, "win_share": share, "prepare_weights": prepare_weights,
               "speed": {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}}
    write_report(out, "mix", "A mixture chosen by regressing small proxy models' target loss on their mixture weights "
                 "beats the uniform mixture on the target when a bigger model is trained on it (RegMix, Liu et al. "
                 "2024; DoReMi, Xie et al. 2023, as background).", measured, checks, table, [plot], results,
                 command or "lmlab lab data mix", [("the proposed mixture", weights_table)],
                 title="lmlab lab data", claim_label="<b>Claim</b> (mixtures chosen by experiment)",
                 note=f"Proxies: {cfg.proxy_layers} layer(s), width {cfg.proxy_embd}, {cfg.proxy_steps} steps each, "
                      f"one initialisation; check: {cfg.verify_layers} layers, width {cfg.verify_embd}, "
                      f"{cfg.verify_steps} steps, the two arms of a seed share initialisation and data generator. "
                      "Shares are of training tokens. Target loss: mean token NLL over all windows of the target text.")
    return results


def _best_near_vertex(mixes: np.ndarray, losses: np.ndarray, i: int) -> float:
    """The measured loss of the proxy with the largest share of source i (the nearest thing to a pure source)."""
    return float(losses[int(np.argmax(mixes[:, i]))])


def _scatter(path: Path, y: np.ndarray, loo: np.ndarray, mixes: np.ndarray, names: list[str]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    dominant = mixes.argmax(1)
    for i, n in enumerate(names):
        sel = dominant == i
        ax.scatter(loo[sel], y[sel], s=18, label=f"largest share: {n}")
    lo, hi = float(min(y.min(), loo.min())), float(max(y.max(), loo.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
    ax.set(title="proxies: target loss, measured and predicted (leave-one-out)",
           xlabel="predicted (fit without this proxy)", ylabel="measured (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
