"""What each document does (`lmlab lab data influence`): per-document influence on a target text, checked against
true leave-one-out retraining.

    lmlab lab data influence --out runs/influence --quick

Influence is TracIn (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent",
https://arxiv.org/abs/2002.08484): score(doc) = sum over the steps t that trained on the document of
lr_t <grad L(target; w_t), grad L(doc; w_t)>, and its checkpoint form TracInCP, the same sum over saved checkpoints
k with lr_k standing for the steps between them. A positive score means a step on the document lowers the target's
loss (it helped). Per-example gradients come one row at a time (row_grads), and their dot products are exact by
default; with --proj-dim K they are multiplied by a Gaussian random matrix P (d x k, entries N(0, 1/k)) first, as
TRAK does (Park et al. 2023,
https://arxiv.org/abs/2303.14186): by Johnson-Lindenstrauss <Pa, Pb> = <a, b> in expectation, with standard
deviation sqrt((|a|^2 |b|^2 + <a, b>^2) / k), and only k numbers per document are kept. P is drawn block by block
from a seed, so it is never held whole.

The check: a tiny model is trained on N short synthetic biographies with plain SGD (TracIn's derivation is for SGD;
AdamW's per-coordinate scaling is not in the score), in a fixed order of batches, and retrained N more times, each
time with one document's term removed from the loss of its batches and nothing else changed: same initialisation,
same batches (the document stays in its row with weight 0, so every other row's arithmetic is bit for bit the same),
single-threaded and deterministic. The difference in the target's loss is then that document's effect and nothing
else (no seed noise to average away), and Spearman's rho compares it with the scores.
TracIn is a first-order estimate: the default run (lr 0.01, 2 epochs, a barely trained model) is in that regime; with
lr 0.1 and 4 epochs, later steps undo and amplify early ones and rho fell to 0.08 in one measurement. Scores come
both per step (TracIn: the verdict) and from epoch-start checkpoints (TracInCP: reported beside it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..configs import parse_seeds, validate
from ..models import ModelConfig, Transformer
from ..models.model import available_memory
from ..tokenizers import Tokenizer
from .facts.data import pseudo_words
from .facts.report import write_report


def examples(texts_ids: Sequence[Sequence[int]], answer_starts: Sequence[int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (x, y) padded to one length: y is x shifted by one, -100 where nothing is scored
    (padding, and the prompt before answer_starts[i] when given: an eval item scores its answer only)."""
    T = max(len(ids) for ids in texts_ids) - 1
    x = torch.zeros(len(texts_ids), T, dtype=torch.long)
    y = torch.full((len(texts_ids), T), -100, dtype=torch.long)
    for i, ids in enumerate(texts_ids):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        x[i, :len(ids) - 1], y[i, :len(ids) - 1] = ids[:-1], ids[1:]
        if answer_starts is not None:
            y[i, :max(0, answer_starts[i] - 1)] = -100
    return x, y


def doc_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row: the mean next-token loss over its scored targets, (B,); as the model's own loss, targets equal to
    its pad_token_id are not scored."""
    pad = model.config.pad_token_id
    if pad is not None:
        y = y.masked_fill(y == pad, -100)
    logits = model(x).logits
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="none")
    scored = (y != -100).sum(1).clamp_min(1)
    return nll.view_as(y.float()).sum(1) / scored


def row_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each row's gradient of doc_losses with respect to every trained parameter, flattened in parameters()
    order (a tied head counts once), (d,), one at a time: the caller uses each and lets it go. One backward per
    row: torch.func's vmap(grad) gives the same numbers, but on CPU it falls back to a per-row loop for
    scaled_dot_product_attention and took 10x longer on this model size."""
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()  # no dropout: the gradient of the function the checkpoint computes
    try:
        for i in range(x.shape[0]):
            yield torch.cat([g.flatten() for g in torch.autograd.grad(doc_losses(model, x[i:i + 1], y[i:i + 1])[0],
                                                                      params)])
    finally:
        model.train(was)


def per_example_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, d): row_grads stacked (B x d floats: for a few rows)."""
    return torch.stack(list(row_grads(model, x, y)))


def check_proj_dim(k: int | None, dim: int) -> None:
    """ValueError for a projection to k numbers of gradients of `dim`: more numbers than the gradient has (no
    saving, only noise), or a matrix P (dim x k float32) larger than the free memory (a big k died in the middle
    of the scoring with a traceback)."""
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"--proj-dim ({k!r}) must be >= 1 to project (0: exact dot products)")
    if k > dim:
        raise ValueError(f"--proj-dim ({k}) must be at most the gradient's size, {dim:,} numbers (one per trained "
                         "parameter); 0 gives exact dot products")
    have = available_memory(torch.device("cpu"))
    if have is not None and 4 * k * dim > have:
        raise ValueError(f"--proj-dim {k} needs {_size(4 * k * dim)} for the projection ({dim:,} x {k} float32), "
                         f"more than the {_size(have)} available; lower it (0: exact dot products)")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Projector:
    """x -> x @ P for a Gaussian P (d x k, entries N(0, 1/k)), drawn in blocks of rows from `seed` on first use and
    kept (d * k float32: 0.1M parameters at k = 128 hold 58 MB); the same seed gives the same P, so scores from
    different checkpoints and calls add up. k = None: the identity (exact dot products, in float64)."""

    def __init__(self, dim: int, k: int | None, seed: int = 0, block_elems: int = 1 << 22) -> None:
        check_proj_dim(k, dim)
        self.dim, self.k, self.seed = dim, k, seed
        self.rows = max(1, block_elems // (k or 1))
        self.blocks: list[torch.Tensor] = []

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if g.shape[1] != self.dim:
            raise ValueError(f"gradients have {g.shape[1]} entries; the projection was made for {self.dim}")
        if self.k is None:
            return g.double()
        if not self.blocks:
            for b, lo in enumerate(range(0, self.dim, self.rows)):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
                rows = min(self.rows, self.dim - lo)
                self.blocks.append(torch.randn(rows, self.k, generator=gen) / math.sqrt(self.k))
        return sum(g[:, lo:lo + len(p)] @ p for lo, p in zip(range(0, self.dim, self.rows), self.blocks)).double()


def tracin(checkpoints: Sequence[tuple[torch.nn.Module | Callable[[], torch.nn.Module], float]],
           docs: tuple[torch.Tensor, torch.Tensor] | Sequence[tuple[torch.Tensor, torch.Tensor]],
           target: tuple[torch.Tensor, torch.Tensor], k: int | None = 512, seed: int = 0,
           batches: Sequence[Sequence[int]] | None = None, chunk: int = 64) -> np.ndarray:
    """TracIn scores of every document (rows of docs = (x, y)) on the target (one or more rows, their losses
    summed): sum over (model, lr) of lr * <P g(target), P g(doc)>; a model may be given as a function that loads
    it (then one is in memory at a time), and each document's gradient is used and let go. k=None: no
    projection (exact dot products).
    `docs` may also be a list of (x, y) parts, each padded to its own longest row, numbered one after another:
    the target's gradient and P are still made once per checkpoint.

    batches=None: every document at every checkpoint (TracInCP, Pruthi et al. §3.2: checkpoints saved now and
    then, lr the learning rate over the interval they stand for). batches[c]: only the documents of the batch
    trained right after checkpoint c (TracIn's ideal form, §3.1: each step's own first-order effect)."""
    parts = [docs] if isinstance(docs, tuple) else list(docs)
    if batches is not None and len(parts) != 1:
        raise ValueError("batches index the rows of one (x, y) tensor pair")
    starts = np.cumsum([0, *(x.shape[0] for x, _ in parts)])
    scores = np.zeros(int(starts[-1]))
    proj = None
    for c, (model, lr) in enumerate(checkpoints):
        if not isinstance(model, torch.nn.Module):  # a loader: one checkpoint in memory at a time
            model = model()
        if proj is None:
            proj = Projector(sum(p.numel() for p in model.parameters() if p.requires_grad), k, seed)
        gt = sum(proj(g[None])[0] for g in row_grads(model, *target))  # the target's rows, summed
        for (x, y), start in zip(parts, starts):
            rows = torch.arange(x.shape[0]) if batches is None else torch.as_tensor(list(batches[c]), dtype=torch.long)
            # exact: row by row (64 rows of gradients and their float64 copies held 9 GB at 7M parameters);
            # projected: as many rows as fit 256 MB of gradients, projected together (P is read once per block)
            for part in rows.split(min(chunk, 1 if proj.k is None else max(1, (1 << 26) // proj.dim))):
                g = torch.stack(list(row_grads(model, x[part], y[part])))
                np.add.at(scores, start + part.numpy(), lr * (proj(g) @ gt).numpy())
        del model
    return scores


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties get their average rank)."""
    def ranks(v: Sequence[float]) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v))
        _, inv = np.unique(v, return_inverse=True)
        return (np.bincount(inv, r) / np.bincount(inv))[inv]
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


# ---- the experiment ---------------------------------------------------------------------------------------

CITIES_TEMPLATES = ("{n} lives in {c} .", "{n} has a home in {c} .", "{n} moved to {c} .", "the city of {n} is {c} .")
JOB_TEMPLATES = ("{n} works as a {j} .", "{n} is a {j} .", "the job of {n} is {j} .")


@dataclasses.dataclass
class InfluenceLabConfig:
    documents: int = 200
    people: int = 40
    cities: int = 8
    jobs: int = 8
    n_layer: int = 2
    n_embd: int = 80  # 186,480 parameters with the biographies' vocabulary: the issue's "0.2M model"
    n_head: int = 4
    epochs: int = 2
    batch_size: int = 20
    lr: float = 0.01
    # 0: exact dot products. A small k lets the projection's noise (std ~ |a||b| / sqrt(k)) swamp the small dot
    # products of unrelated documents at this model size (rho against k: docs/LOG.md)
    proj_dim: int = 0

    def __post_init__(self) -> None:
        validate(self)  # types and finite numbers: "3" was a TypeError below, nan passed
        for f in dataclasses.fields(self):
            if f.name == "proj_dim" and self.proj_dim < 0:  # 0 is allowed: exact dot products
                raise ValueError(f"proj_dim must be >= 0, got {self.proj_dim}")
            if f.name != "proj_dim" and getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)}")

    @classmethod
    def quick(cls) -> InfluenceLabConfig:
        return cls(documents=60, people=12, batch_size=10)


def biographies(cfg: InfluenceLabConfig, seed: int) -> tuple[list[str], str, int]:
    """(documents, the target text "NAME lives in CITY .", the number of its prompt words): one or two facts per
    document about a person of a small population; the target is person 0's city."""
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    names = pseudo_words(cfg.people, rng, taken)
    cities, jobs = pseudo_words(cfg.cities, rng, taken), pseudo_words(cfg.jobs, rng, taken)
    city = rng.integers(cfg.cities, size=cfg.people)
    job = rng.integers(cfg.jobs, size=cfg.people)
    docs = []
    for _ in range(cfg.documents):
        p = int(rng.integers(cfg.people))
        facts = [CITIES_TEMPLATES[int(rng.integers(4))].format(n=names[p], c=cities[city[p]]),
                 JOB_TEMPLATES[int(rng.integers(3))].format(n=names[p], j=jobs[job[p]])]
        docs.append(" ".join(facts if rng.random() < 0.5 else facts[int(rng.integers(2))::2]))
    return docs, f"{names[0]} lives in {cities[city[0]]} .", 3


def train_sgd(cfg: InfluenceLabConfig, mc: ModelConfig, docs: tuple[torch.Tensor, torch.Tensor], order: np.ndarray,
              weights: torch.Tensor, seed: int, keep: bool = False
              ) -> tuple[Transformer, list[tuple[Transformer, list[int]]]]:
    """Plain SGD over the documents in `order` (one row per document, (epochs, N)), batch loss = sum over the batch
    of weight_i * loss_i / batch_size: weight 0 removes a document's term and nothing else. Returns the model and,
    with keep, a copy before every step with the documents of that step."""
    torch.manual_seed(seed)
    model = Transformer(mc)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    saved = []
    for epoch in order:
        for lo in range(0, len(epoch), cfg.batch_size):
            rows = torch.as_tensor(epoch[lo:lo + cfg.batch_size])
            if keep:
                saved.append((_copy(model), rows.tolist()))
            loss = (doc_losses(model, docs[0][rows], docs[1][rows]) * weights[rows]).sum() / cfg.batch_size
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model, saved


def _copy(model: Transformer) -> Transformer:
    clone = Transformer(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


@torch.no_grad()
def target_loss(model: Transformer, target: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float(doc_losses(model.eval(), *target).sum())


def _lab_data(cfg: InfluenceLabConfig, seed: int) -> tuple[list[str], str, tuple[torch.Tensor, torch.Tensor],
                                                          tuple[torch.Tensor, torch.Tensor], ModelConfig]:
    """One seed's documents, target text, their (x, y) and the model's config."""
    texts, target_text, prompt_words = biographies(cfg, seed)
    tok = Tokenizer.train([*texts, target_text], kind="word", vocab_size=1000, min_frequency=1)
    docs = examples([tok.encode(t) for t in texts])
    target = examples([tok.encode(target_text)], [prompt_words])
    mc = ModelConfig(family="llama", vocab_size=len(tok), n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, block_size=docs[0].shape[1])
    return texts, target_text, docs, target, mc


def run_influence_lab(out: str | Path, seeds: list[int], cfg: InfluenceLabConfig, command: str = "") -> dict[str, Any]:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    seeds = parse_seeds(seeds)  # none was an IndexError after the work
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same arithmetic in every retraining (and a fair share of the host)
    per_seed, table, extra = [], [], []
    data = {seed: _lab_data(cfg, seed) for seed in seeds}  # (cheap) so that --proj-dim is checked before any training
    for *_, mc in data.values():
        check_proj_dim(cfg.proj_dim or None, mc.num_parameters())
    try:
        for seed in seeds:
            texts, target_text, docs, target, mc = data[seed]
            rng = np.random.default_rng(seed)
            order = np.stack([rng.permutation(cfg.documents) for _ in range(cfg.epochs)])
            ones = torch.ones(cfg.documents)
            t1 = time.perf_counter()
            model, steps = train_sgd(cfg, mc, docs, order, ones, seed, keep=True)
            full = target_loss(model, target)
            t_train = time.perf_counter() - t1
            t1 = time.perf_counter()
            lr = cfg.lr / cfg.batch_size  # each document's term is weighted 1 / batch_size in its step
            scores = tracin([(m, lr) for m, _ in steps], docs, target, cfg.proj_dim or None, seed,
                            [b for _, b in steps])
            t_score = time.perf_counter() - t1
            t1 = time.perf_counter()
            per_epoch = len(steps) // cfg.epochs  # TracInCP: the checkpoint at each epoch's start, lr over its steps
            scores_cp = tracin([(m, lr) for m, _ in steps[::per_epoch]], docs, target, cfg.proj_dim or None, seed)
            t_cp = time.perf_counter() - t1
            t1 = time.perf_counter()
            loo = np.array([target_loss(train_sgd(cfg, mc, docs, order, ones.index_fill(0, torch.tensor([i]), 0.0),
                                                  seed)[0], target) - full for i in range(cfg.documents)])
            t_loo = time.perf_counter() - t1
            rho, rho_cp = spearman(scores, loo), spearman(scores_cp, loo)
            per_seed.append({"seed": seed, "spearman": rho, "spearman_cp": rho_cp, "scores_cp": scores_cp.tolist(),
                             "target": target_text, "target_loss": full, "parameters": model.num_parameters(),
                             "scores": scores.tolist(), "loo": loo.tolist(),
                             "documents": texts,
                             "wall_s": {"train": t_train, "tracin": t_score, "tracin_cp": t_cp, "loo": t_loo}})
            table.append({"seed": seed, "parameters": model.num_parameters(), "documents": cfg.documents,
                          "target": target_text, "target loss": full, "Spearman ρ (TracIn vs LOO)": rho,
                          "Spearman ρ (TracInCP vs LOO)": rho_cp, "TracIn s": t_score, "TracInCP s": t_cp,
                          "LOO retraining s": t_loo})
            rank = np.argsort(-scores)
            for label, pick in (("helped", rank[:5]), ("hurt", rank[::-1][:5])):
                extra.append((f"seed {seed}: documents that {label} “{target_text}” most (by TracIn)",
                              [{"document": texts[i], "TracIn score": float(scores[i]),
                                "LOO: target loss without it − with it": float(loo[i])} for i in pick]))
    finally:
        torch.set_num_threads(threads)
    rhos = [r["spearman"] for r in per_seed]
    mean_rho = float(np.mean(rhos))
    measured = (f"Spearman ρ between TracIn scores and true leave-one-out effects: {mean_rho:.3f} (per seed: "
                f"{', '.join(f'{r:.3f}' for r in rhos)}), {cfg.documents} documents, "
                f"{per_seed[0]['parameters']:,} parameters")
    checks = {"Spearman ρ ≥ 0.3 on every seed": all(r >= 0.3 for r in rhos)}
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds, "per_seed": per_seed,
               "speed": {"wall_s": time.perf_counter() - t0}}
    dots = (f"gradients random-projected to {cfg.proj_dim} numbers, as TRAK (Park et al. 2023)" if cfg.proj_dim
            else "exact gradient dot products")
    write_report(out, "influence", f"Per-step TracIn influence ({dots}) ranks documents by their true leave-one-out "
                 "effect on a target text (Pruthi et al. 2020).",
                 measured, checks, table, [], results, command or "lmlab lab data influence", extra,
                 title="lmlab lab data", claim_label="<b>Claim</b>",
                 extra_html="", note="LOO: the model retrained without one document (its term removed from its "
                 "batches; same initialisation, order and arithmetic otherwise) minus the full model, in target loss "
                 "(nats): positive = the document helped. TracIn (the verdict): sum over the steps whose batch held "
                 "the document of lr/batch × <gradient of the target's loss, gradient of the document's loss> at the "
                 "weights before that step. TracInCP (beside it): the same at the epoch-start checkpoints only, every "
                 "document at each. Dot products " + ("projected (--proj-dim)." if cfg.proj_dim else "exact."))
    return results


__all__ = ["InfluenceLabConfig", "Projector", "examples", "per_example_grads", "run_influence_lab", "spearman",
           "tracin"]


# ---- a user's run: which of its training passages helped or hurt a text ------------------------------------

def trained_texts(run_dir: Path, saved: dict[str, Any], sources: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(names, texts) of the run's books as far as it trained on them, from its token data (tokens.json): a book
    that changed since is refused (its length in characters is not the one recorded), and each is cut before its
    held-out tail (the share of its characters that its val tokens are of its tokens); a book the run's filters
    removed is left out. It read the books as they were on disk: edited ones, and the held-out text, were scored
    as training passages. A run whose filters changed its texts (or without token data) reads them whole."""
    from ..data import TokenDataset, read_document
    from ..data.dataset import _document_names
    names, texts = _document_names(sources), [read_document(p) for p in sources]
    data = saved.get("dataset")
    path = (Path(data) if Path(data).is_absolute() else run_dir / data) if data else None
    if path is None or not path.is_dir():
        return names, texts
    ds = TokenDataset.open(path)
    if ds.header.get("filters"):
        return names, texts
    recorded = {d.name: d for d in ds.documents}
    out_names, out_texts = [], []
    for name, text in zip(names, texts):
        d = recorded.get(name)
        if d is None:  # not among the run's documents (nothing of it was trained on)
            continue
        if d.chars != len(text):
            raise ValueError(f"the run's book {name} changed since it trained ({len(text)} characters now, {d.chars} "
                             "then): its passages would not be what it trained on")
        share = d.train_tokens / max(1, d.train_tokens + d.val_tokens)
        out_names.append(name)
        out_texts.append(text[:round(len(text) * share)])
    return out_names, out_texts


def passages(texts: Sequence[str], names: Sequence[str], unit: str = "paragraph") -> list[tuple[str, str]]:
    """(document name, passage text) per paragraph (text between blank lines) or per whole document."""
    out = []
    for name, text in zip(names, texts):
        parts = [text] if unit == "document" else text.split("\n\n")
        out += [(name, p.strip()) for p in parts if p.strip()]
    return out


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive windows of at most size + 1 tokens (size next-token targets each), overlapping by one token so
    that every next-token pair of `ids` is in exactly one window; nothing for fewer than two tokens."""
    return [list(ids[i:i + size + 1]) for i in range(0, max(1, len(ids) - 1), size) if len(ids[i:i + size + 1]) > 1]


def run_influence(run_dir: str | Path, out: str | Path, target: str, *, unit: str = "paragraph",
                  max_passages: int = 2000, proj_dim: int = 0, top: int = 10, seed: int = 0,
                  command: str = "") -> dict[str, Any]:
    """TracInCP scores of a run's training passages on `target`, from the run's saved checkpoints: per checkpoint c,
    lr_c × (steps since the previous checkpoint) × <g(target; w_c), g(passage; w_c)>, summed (Pruthi et al. 2020
    §3.2). A passage longer than the model's context is cut into windows whose scores add up. Exact dot products
    by default: each passage's gradient is used and dropped, so memory stays at a few gradients whatever the
    corpus; proj_dim=K projects them first (as TRAK, Park et al. 2023; approximate). `max_passages`: a random sample
    (fixed by `seed`) of that many when the run has more. results.json has every score; report.html the passages
    that helped and hurt most."""
    from ..train import TrainConfig, checkpoint_step, checkpoints, lr_at
    from ..train.checkpoint import checkpoint_model
    from ..train.trainer import read_run_config
    from ..tune.lora import checkpoint_adapters
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    if unit not in ("paragraph", "document"):
        raise ValueError(f"unit must be paragraph or document, got {unit!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) for n in (max_passages, top, proj_dim)) \
            or max_passages < 1 or top < 1 or proj_dim < 0:  # 0 wrote a report of no passages
        raise ValueError("--max-passages and --top must be >= 1, --proj-dim >= 0")
    if not target.strip():
        raise ValueError("the target text is empty")
    saved = read_run_config(run_dir)
    cps = checkpoints(run_dir)
    if not cps:
        raise ValueError(f"{run_dir} has no checkpoints (train with --save-every N --keep-last 0 to keep several)")
    sources = [Path(p) for p in saved.get("sources") or []]
    missing = [str(p) for p in sources if not p.is_file()]
    if not sources or missing:
        raise ValueError(f"the run's books are not where it read them: {', '.join(missing) or 'none recorded'}")
    t0 = time.perf_counter()
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    tc = TrainConfig.from_dict(saved["train"])
    horizon = json.loads((cps[-1] / "state.json").read_text(encoding="utf-8")).get("schedule_steps")
    models = [lambda p=p: checkpoint_model(p, checkpoint_adapters) for p in cps]  # loaded one at a time
    mc = ModelConfig.from_dict(json.loads((cps[0] / "config.json").read_text(encoding="utf-8"))["model"])
    check_proj_dim(proj_dim or None, mc.num_parameters())  # before the books are read and the checkpoints loaded
    size = mc.block_size
    steps = [checkpoint_step(p) for p in cps]
    # the checkpoint at step s stands for the steps since the previous one; its lr is the schedule's there
    weights = [lr_at(s - 1, tc, horizon) * (s - prev) for s, prev in zip(steps, [0, *steps[:-1]])]
    names, texts = trained_texts(run_dir, saved, sources)
    units = passages(texts, names, unit)
    if len(units) > max_passages:
        keep = np.sort(np.random.default_rng(seed).choice(len(units), max_passages, replace=False))
        units = [units[i] for i in keep]
    rows, owner = [], []
    for u, (_, text) in enumerate(units):
        for w in windows(tok.encode(text), size):
            rows.append(w)
            owner.append(u)
    tids = tok.encode(target)
    if len(tids) < 2:
        raise ValueError("the target text is shorter than two tokens")
    target_rows = windows(tids, size)
    # parts of 256 windows, each padded to its own longest window, not to the corpus's
    window_scores = tracin(list(zip(models, weights)), [examples(rows[lo:lo + 256]) for lo in range(0, len(rows), 256)],
                           examples(target_rows), proj_dim or None, seed)
    scores = np.zeros(len(units))
    np.add.at(scores, np.asarray(owner, dtype=np.int64), window_scores)
    rank = np.argsort(-scores)
    row = lambda i: {"document": units[i][0], "passage": units[i][1][:300], "TracIn score": float(scores[i])}  # noqa: E731
    helped, hurt = [row(i) for i in rank[:top] if scores[i] > 0], [row(i) for i in rank[::-1][:top] if scores[i] < 0]
    measured = (f"{len(units)} {unit}s ({len(rows)} windows of up to {size} tokens) scored at {len(cps)} checkpoints "
                f"(steps {', '.join(map(str, steps))}); {int((scores > 0).sum())} helped, {int((scores < 0).sum())} "
                f"hurt the target's loss")
    results = {"run": str(run_dir), "target": target, "unit": unit, "checkpoints": steps, "weights": weights,
               "proj_dim": proj_dim or None, "passages": [{"document": d, "text": t, "score": float(s)}
                                                          for (d, t), s in zip(units, scores)],
               "helped": helped, "hurt": hurt, "speed": {"wall_s": time.perf_counter() - t0}}
    write_report(out, "influence", "Which training passages lowered (helped) or raised (hurt) the loss of a text, by "
                 "gradient similarity over the run's checkpoints (TracInCP, Pruthi et al. 2020).", measured, {},
                 helped, [], results, command or f"lmlab lab data influence --run {run_dir}",
                 [("passages that hurt most", hurt)], title="lmlab lab data", claim_label="<b>What it shows</b>",
                 note="TracIn score: sum over checkpoints of lr × steps it stands for × <gradient of the target's "
                 "loss, gradient of the passage's loss> (exact unless --proj-dim). Positive: a step on the passage "
                 "lowers the target's loss. On a tiny model `lmlab lab data influence` (without --run) checks these "
                 "scores against true leave-one-out retraining.")
    return results
