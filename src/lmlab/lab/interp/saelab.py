"""`lmlab lab interp sae` (an SAE on a model's residual stream over the user's books, its metrics and a feature
browser in report.html) and `lmlab lab interp sae-facts` (ground truth: how pure SAE features are for attribute
type on a biographies model from the facts lab, against the same SAE on a randomly initialised model).

    lmlab lab interp sae --model runs/demo/final --books books/ --layer 2 --kind topk --k 16 --out runs/sae
    lmlab lab interp sae-facts --out runs/sae-facts --seeds 0,1,2 --quick
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...files import check_component
from ...models import Transformer
from ..facts.report import _plt, new_report, save_figure, write_report
from .report import HEADING, label, load, stream_labels
from .sae import SAEConfig, evaluate, labelled_share, purity, save_sae, stream_activations, superiority, train_sae

CONTEXT = (12, 3)  # tokens shown before and after the activating one


def _unembed_direction(model: Transformer, d: torch.Tensor) -> torch.Tensor:
    """A residual direction (d_in, F) read out as logits (V, F): through the final norm's gain, then the head
    (the norm's per-token rescaling is left out, as in Neuronpedia's logit-effect tables)."""
    gain = getattr(model.norm_f, "weight", None)
    return model.lm_head.weight @ (d * gain[:, None] if gain is not None else d)


def feature_browser(sae, model: Transformer, tok: Any, windows: torch.Tensor, acts: torch.Tensor,
                    features: list[int], top: int = 8) -> list[dict[str, Any]]:
    """Per feature: its top activating contexts (window, position, activation), the tokens it fires on most (by
    count) and the tokens its decoder direction promotes and suppresses through the unembedding."""
    with torch.no_grad():
        f = sae.encode(acts.flatten(0, 1))                                    # (n * T, F)
        logit = _unembed_direction(model, sae.W_dec.detach()[:, features])    # (V, n_shown)
    T = windows.shape[1]
    flat_ids = windows.flatten()
    out = []
    for j, feat in enumerate(features):
        col = f[:, feat]
        fired = col > 0
        vals, where = col.topk(min(top, int(fired.sum())))
        contexts = []
        for v, w in zip(vals.tolist(), where.tolist()):
            row, pos = divmod(w, T)
            lo, hi = max(0, pos - CONTEXT[0]), min(T, pos + CONTEXT[1] + 1)
            contexts.append({"activation": v, "tokens": [label(tok, int(i)) for i in windows[row, lo:hi]],
                             "at": pos - lo})
        ids, counts = flat_ids[fired].unique(return_counts=True)
        order = counts.argsort(descending=True)[:10]
        up, down = logit[:, j].topk(5), (-logit[:, j]).topk(5)
        out.append({"feature": feat, "frequency": float(fired.float().mean()), "max_activation": float(col.max()),
                    "contexts": contexts,
                    "tokens": [{"token": label(tok, int(ids[o])), "count": int(counts[o])} for o in order],
                    "promotes": [{"token": label(tok, i), "logit": v} for i, v in zip(up.indices.tolist(),
                                                                                    up.values.tolist())],
                    "suppresses": [{"token": label(tok, i), "logit": -v} for i, v in zip(down.indices.tolist(),
                                                                                       down.values.tolist())]})
    return out


def browser_html(cards: list[dict[str, Any]]) -> str:
    """The feature browser as plain HTML (no scripts, no CDN): one card per feature."""
    e = html.escape
    parts = ["<h2>Feature browser</h2><style>.ctx{font-family:monospace;white-space:pre-wrap;font-size:.85rem}"
             ".ctx mark{background:#f6c343}.bar{display:inline-block;background:#4c8bf5;height:.7rem}"
             ".card{border:1px solid #ccc;padding:.5rem 1rem;margin:1rem 0}</style>"]
    for c in cards:
        peak = max(c["max_activation"], 1e-12)
        ctx = "".join(
            f"<div class='ctx'>{c_['activation']:.3g}: "
            + "".join(f"<mark style='opacity:{0.4 + 0.6 * c_['activation'] / peak:.2f}'>{e(t)}</mark>"
                      if i == c_["at"] else e(t) for i, t in enumerate(c_["tokens"])) + "</div>"
            for c_ in c["contexts"])
        most = max((t["count"] for t in c["tokens"]), default=1)
        hist = "".join(f"<div><code>{e(t['token'])}</code> <span class='bar' style='width:"
                       f"{8 * t['count'] / most:.2f}rem'></span> {t['count']}</div>" for t in c["tokens"])
        logits = ", ".join(f"<code>{e(t['token'])}</code> {t['logit']:+.2f}" for t in c["promotes"])
        logits_down = ", ".join(f"<code>{e(t['token'])}</code> {t['logit']:+.2f}" for t in c["suppresses"])
        parts.append(f"<div class='card' id='f{c['feature']}'><h3>feature {c['feature']}</h3><p>fires on "
                     f"{100 * c['frequency']:.2f}% of tokens, max activation {c['max_activation']:.3g}</p>"
                     f"<p><b>Top activating contexts</b></p>{ctx}<p><b>Tokens it fires on</b></p>{hist}"
                     f"<p><b>Logit effect</b>: promotes {logits}; suppresses {logits_down}</p></div>")
    return "".join(parts)


def run_sae(model_dir: str | Path, books: list[str], out: str | Path, settings: dict[str, Any], tokens: int = 65536,
            browse: int = 24, name: str | None = None, command: str = "") -> dict[str, Any]:
    """Train an SAE (`settings`: SAEConfig's fields; stream and n_features may be None) on the books' residual
    stream, save it as MODEL/sae/NAME (default layer{stream}-{kind}; refused if it exists), measure it on
    held-out windows and write the report."""
    from ...models.quant import calibration_windows

    out, model_dir = new_report(out), Path(model_dir)
    if name is not None:
        check_component(name, "--name")
    model, tok = load(model_dir)
    model.eval()
    mc = model.config
    if settings.get("stream") is not None and not 0 <= settings["stream"] <= mc.n_layer:
        raise ValueError(f"--layer {settings['stream']} out of range: the model has residual streams 0..{mc.n_layer}")
    # unset: the middle stream, 8 features per residual dimension
    stream = settings.get("stream")
    cfg = SAEConfig(**{**settings, "d_in": mc.n_embd, "stream": mc.n_layer // 2 if stream is None else stream,
                       "n_features": settings.get("n_features") or 8 * mc.n_embd})
    dest = model_dir / "sae" / (name or f"layer{cfg.stream}-{cfg.kind}")
    if dest.exists():
        raise ValueError(f"{dest} already exists; remove it or choose another --name")
    T = model.config.block_size
    windows, docs = calibration_windows(books, tok, T + 1, tokens)
    if len(windows) < 2:
        raise ValueError(f"the books give {len(windows)} window of {T + 1} tokens; an SAE needs at least 2 "
                         "(one held out): give more text or a larger --tokens")
    n_eval = max(1, len(windows) // 10)
    x, y = windows[:, :-1], windows[:, 1:]
    acts = stream_activations(model, x, cfg.stream)                           # (n, T, d)
    t0 = time.perf_counter()
    sae, record = train_sae(acts[n_eval:].flatten(0, 1), cfg, log_every=max(1, cfg.steps // 50))
    wall = time.perf_counter() - t0
    metrics = evaluate(sae, model, x[:n_eval], y[:n_eval], acts[:n_eval])
    save_sae(sae, dest, {"model": str(model_dir), "books": docs, "metrics": metrics})
    with torch.no_grad():
        freq = (sae.encode(acts[:n_eval].flatten(0, 1)) > 0).float().mean(0)
    alive = [int(i) for i in (freq > 0).nonzero().flatten()]
    shown = sorted(np.random.default_rng(cfg.seed).choice(alive, min(browse, len(alive)), replace=False).tolist())
    cards = feature_browser(sae, model, tok, x[:n_eval], acts[:n_eval], shown)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    h = record["history"]
    # training logs the error in the SAE's normalised units (E||x||^2 = d_in), scale^2 times the model's: back in
    # the model's units, the curve ends near the held-out MSE the report gives (it read 15-70 beside an MSE of 0.006)
    unit = float(sae.scale) ** 2
    a1.plot([r["step"] for r in h], [r["mse_normalised"] / unit for r in h], label="MSE (training batches)")
    a1.set(xlabel="step", ylabel="MSE: squared error per token", yscale="log", title="training")
    a1b = a1.twinx()
    a1b.plot([r["step"] for r in h], [r["l0"] for r in h], color="C1", label="L0")
    a1b.set_ylabel("L0")
    a2.hist(np.log10(freq[freq > 0].numpy()), bins=40)
    a2.set(xlabel="log10 firing frequency (held-out tokens)", ylabel="features",
           title=f"feature density ({int((freq == 0).sum())} dead)")
    plot = save_figure(fig, out / "sae.png")
    m = metrics
    measured = (f"{cfg.kind} SAE, {cfg.n_features} features on stream {cfg.stream} ({len(windows) - n_eval} "
                f"training windows, {n_eval} held out; {cfg.steps} steps in {wall:.0f} s): MSE {m['mse']:.4g}, FVU "
                f"{m['fvu']:.3f}, L0 {m['l0']:.1f}, dead {100 * m['dead_share']:.1f}%, dense "
                f"{100 * m['dense_share']:.1f}%, loss recovered {100 * m['loss_recovered']:.1f}% (clean "
                f"{m['loss_clean']:.3f}, with SAE {m['loss_sae']:.3f}, zero-ablated {m['loss_zero_ablated']:.3f})")
    results = {"model": str(model_dir), "books": docs, "sae": {**vars(cfg)}, "saved": str(dest), "metrics": metrics,
               "training": {**record, "wall_s": wall}, "features": cards}
    rows = [{"metric": k, "value": v} for k, v in metrics.items()]
    write_report(out, "sparse autoencoder", "A sparse autoencoder rewrites one residual stream as a sparse sum of "
                 "learned directions (Bricken et al. 2023; Gao et al. 2024); it is judged by how well it "
                 "reconstructs the stream, how sparse it is and how much of the model's loss survives splicing it "
                 "in: (L_zero_ablate - L_sae) / (L_zero_ablate - L_clean).", measured,
                 {"loss_recovered_at_least_90%": m["loss_recovered"] >= 0.9, "mean_l0_at_most_32": m["l0"] <= 32},
                 rows, [plot], results, command, title=HEADING, claim_label="<b>Method</b>",
                 extra_html=browser_html(cards), note=f"The SAE is saved in {dest}. Features shown: a random sample of "
                 "those alive on the held-out windows. Numbers in results.json.")
    return results


# ---- ground truth on the facts lab's biographies -------------------------------------------------------------

def attribute_labels(es: Any, n_attr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, T) labels over an EvalSet's inputs x: the attribute index at every value token ("value") and at the
    token just before each value, where the model must predict it ("cue"); -1 elsewhere."""
    value = torch.full(es.x.shape, -1, dtype=torch.long)
    cue = value.clone()
    rows = torch.arange(len(es.x))
    for j in range(n_attr):
        for t in range(es.pos.shape[2]):  # es.pos indexes the targets y; x holds the same token one later
            m = es.mask[:, j, t]
            value[rows[m], es.pos[m, j, t] + 1] = j
        cue[rows, es.pos[:, j, 0]] = j
    return value, cue


# The verdict, fixed before the final 3-seed run: at each site, in every seed, the trained model's features are
# purer than the control's by a one-sided Mann-Whitney U test at p < 0.01 with a large effect, Vargha & Delaney's
# A >= 0.71 (their "large" cut-off, https://doi.org/10.3102/10769986025002101: a trained feature is purer than a
# control feature in at least 71% of pairs). A difference of means was the earlier check; purity is bounded and
# skewed (many features at 1), so a rank statistic over the two distributions says more.
VERDICT_P, VERDICT_A = 0.01, 0.71
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def run_sae_facts(out: str | Path, seeds: list[int], quick: bool = False, command: str = "") -> dict[str, Any]:
    """Per seed: a biographies model trained with the facts lab's runner and an untrained one of the same shape
    (the control), one TopK SAE on each's middle residual stream (trained on every token of training
    biographies), and the purity of every feature for attribute type over the value tokens, and over the tokens
    that predict a value, of every seen individual's biography on held-out templates."""
    from ..facts.data import ATTRIBUTES, BioConfig, Biographies
    from ..facts.metrics import attribute_metrics
    from ..facts.runner import RunConfig, load_weights, model_config, run_one

    out = new_report(out)
    steps, sae_steps, bios, n = (300, 600, 256, 200) if quick else (1500, 2000, 1024, 1000)
    sites = ("value", "cue")
    rows, qrows, stats, traces = [], [], [], []
    dist = {(m, s): [] for m in ("trained", "random") for s in sites}
    chance = {(m, s): [] for m in ("trained", "random") for s in sites}
    t0 = time.perf_counter()
    for seed in seeds:
        # n_eval = n: the purity set holds every seen individual once (7 value tokens each), so a feature that
        # fires on 1% of tokens still has its 20 labelled firings; 256 biographies left most features unscored
        rc = RunConfig(bio=BioConfig(n_individuals=n, n_unseen=0, n_eval=n, seed=seed), steps=steps,
                       eval_every=steps, probes=False, seed=seed)
        summary = run_one(rc, out / f"seed{seed}")
        data = Biographies(rc.bio)
        mc = model_config(rc, data)
        trained = Transformer(mc)
        load_weights(trained, summary["final_weights"])
        torch.manual_seed(10_000 + seed)
        random = Transformer(mc)  # the control: the same shape, never trained
        xt, _ = data.sample_batch(bios, data.seq_len, torch.Generator().manual_seed(seed))
        es = data.eval_set("seen_eval")
        keep = es.x != 0                                                      # PAD after the biography
        y = es.y.masked_fill(es.y == 0, -100)
        labels = dict(zip(sites, (lab[keep] for lab in attribute_labels(es, len(ATTRIBUTES)))))
        stream = mc.n_layer // 2 + 1
        traces.append(trace_attributes(trained.eval(), data, 12 if quick else 32, seed))
        for name, model in (("trained", trained), ("random", random)):
            model.eval()
            cfg = SAEConfig(d_in=mc.n_embd, n_features=8 * mc.n_embd, kind="topk", k=8, stream=stream,
                            steps=sae_steps, batch_size=512, seed=seed)
            sae, _ = train_sae(stream_activations(model, xt, stream)[xt != 0], cfg)
            acts = stream_activations(model, es.x, stream)
            m = evaluate(sae, model, es.x, y, acts, keep)
            facts = attribute_metrics(model, es, data.baseline())
            with torch.no_grad():
                f = sae.encode(acts[keep])
            rows.append({"seed": seed, "model": name, "fact_acc": facts["acc"], "fact_loss": facts["loss"],
                         "fact_baseline": data.baseline(), "loss_clean": m["loss_clean"], "l0": m["l0"],
                         "fvu": m["fvu"], "dead_share": m["dead_share"], "dense_share": m["dense_share"],
                         "loss_recovered": m["loss_recovered"]})
            for site, lab in labels.items():
                p = purity(f, lab, len(ATTRIBUTES))
                scored = ~np.isnan(p)
                # the null: the same features with the labels shuffled among the labelled tokens
                shuffled = lab.clone()
                at = (lab >= 0).nonzero().flatten()
                shuffled[at] = lab[at[torch.randperm(len(at), generator=torch.Generator().manual_seed(seed))]]
                c = purity(f, shuffled, len(ATTRIBUTES))
                share = labelled_share(f, lab)[scored]
                dist[name, site].append(p[scored])
                chance[name, site].append(c[~np.isnan(c)])
                qrows.append({"seed": seed, "model": name, "site": site, "features_scored": int(scored.sum()),
                              **{f"q{round(100 * q)}": v for q, v in zip(QUANTILES, np.quantile(p[scored], QUANTILES))},
                              "mean": float(p[scored].mean()), "chance_mean": float(c[~np.isnan(c)].mean()),
                              "labelled_share_mean": float(share.mean()),
                              "purity_x_share_mean": float((p[scored] * share).mean())})
        for site in sites:
            A, pv = superiority(dist["trained", site][-1], dist["random", site][-1])
            stats.append({"seed": seed, "site": site, "A": A, "p": pv,
                          "holds": bool(pv < VERDICT_P and A >= VERDICT_A)})
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    for ax, site in zip(axes, sites):
        for i, seed in enumerate(seeds):
            for name, ls in (("trained", "-"), ("random", "--")):
                ax.hist(dist[name, site][i], bins=20, range=(0, 1), histtype="step", density=True, ls=ls,
                        color=f"C{i}", label=f"{name}, seed {seed}")
        ax.axvline(1 / len(ATTRIBUTES), color="grey", lw=0.8)
        ax.set(title=f"purity for attribute type at {site} tokens", xlabel="purity (share of the mass on "
               f"{site} tokens on the majority attribute)", ylabel="density over scored features")
        ax.legend(fontsize=7)
    plot = save_figure(fig, out / "purity.png")
    trace = np.mean(traces, 0)                                                # (A, L + 1, sites)
    fig, axes = plt.subplots(1, len(ATTRIBUTES), figsize=(3 * len(ATTRIBUTES), 3.2), dpi=100, sharey=True)
    for ax, attr, t in zip(axes, ATTRIBUTES, trace):
        ax.imshow(t, cmap="coolwarm", vmin=-1, vmax=1, origin="lower", aspect="auto")
        ax.set_xticks(range(len(SITES)), SITES, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(t)), stream_labels(len(t) - 1), fontsize=8)
        ax.set_title(attr, fontsize=9)
        for r in range(len(t)):
            for c in range(len(SITES)):
                ax.text(c, r, f"{t[r, c]:.2f}", ha="center", va="center", fontsize=7)
    tplot = save_figure(fig, out / "tracing.png")
    trace_rows = [{"attribute": attr, "stream": sl, **{site: round(float(v), 4) for site, v in zip(SITES, row)}}
                  for attr, t in zip(ATTRIBUTES, trace) for sl, row in zip(stream_labels(len(t) - 1), t)]

    def per_seed(site: str, model: str, key: str) -> str:
        return ", ".join(f"{r[key]:.3f}" for r in qrows if r["site"] == site and r["model"] == model)

    measured = "; ".join(
        f"{site} tokens: median purity trained {per_seed(site, 'trained', 'q50')} vs random "
        f"{per_seed(site, 'random', 'q50')} (chance {per_seed(site, 'random', 'chance_mean')}), A "
        + ", ".join(f"{r['A']:.2f}" for r in stats if r["site"] == site) + ", p "
        + ", ".join(f"{r['p']:.1e}" for r in stats if r["site"] == site) + " (seeds " + ",".join(map(str, seeds))
        + ")" for site in sites)
    results = {"seeds": seeds, "quick": quick, "stream": stream, "stats": stats, "wall_s": time.perf_counter() - t0,
               "verdict_rule": {"p_below": VERDICT_P, "A_at_least": VERDICT_A},
               "purity": {f"{n}/{s}": [d.tolist() for d in v] for (n, s), v in dist.items()},
               "chance": {f"{n}/{s}": [d.tolist() for d in v] for (n, s), v in chance.items()},
               "tracing": {"sites": list(SITES), "per_seed": np.array(traces)}}
    checks = {f"{site}_trained_purer_every_seed (Mann-Whitney p < {VERDICT_P}, A >= {VERDICT_A})":
              all(r["holds"] for r in stats if r["site"] == site) for site in sites}
    write_report(out, "SAE feature purity on biographies", "Where each value token's attribute is known, features "
                 "of an SAE on a trained model should each belong to one attribute type, clearly more than features "
                 "of the same SAE on an untrained model of the same shape. Purity of a feature: the share of its "
                 "activation mass over the labelled tokens (value tokens, or the tokens that predict a value) that "
                 "falls on its majority attribute (1/6: spread evenly, 1: one attribute).",
                 measured, checks, rows, [plot, tplot], results, command,
                 [("purity distribution per seed, model and site (quantiles over the scored features)", qrows),
                  (f"trained against random per seed: Vargha-Delaney A = P(trained feature purer), one-sided "
                   f"Mann-Whitney p; holds if p < {VERDICT_P} and A >= {VERDICT_A}", stats),
                  ("causal tracing on the trained models: restored fraction by attribute, stream and site (mean over "
                   "seeds and individuals)", trace_rows)], title=HEADING,
                 claim_label="<b>Question</b>", note="The SAE is trained on every token; purity is scored on held-out "
                 "biographies (every seen individual once, held-out templates). Features firing on fewer than 20 "
                 "labelled tokens are left out. Value: the value's own tokens; cue: the token just before a value, "
                 "where the model predicts it. chance_mean: the same purity with the labels shuffled among the "
                 "labelled tokens. labelled_share: the share of a feature's mass on labelled tokens at all; "
                 "purity_x_share is the earlier all-token measure. fact_acc / fact_loss: the facts lab's attribute "
                 "accuracy and loss (nats per value; fact_baseline = knowing no individual). Causal tracing: the "
                 "prompt runs up to a value; the corrupted one has another individual's name in every sentence. "
                 "Numbers in results.json.")
    return results


SITES = ("subject", "subject last", "cue", "other")


def trace_sites(T: int, name_pos: list[int]) -> list[int]:
    """The site of every position of a prompt of T tokens whose current sentence names its subject at name_pos:
    0 subject tokens but the last, 1 the subject's last token, 2 the last position (where the value is
    predicted), 3 anything else (ROME's grouping, Meng et al. 2022 Fig. 1)."""
    sites = [3] * T
    for p in name_pos[:-1]:
        sites[p] = 0
    sites[name_pos[-1]] = 1
    sites[T - 1] = 2
    return sites


def trace_attributes(model: Transformer, data: Any, people: int = 12, seed: int = 0) -> np.ndarray:
    """Causal tracing per attribute: the prompt is a biography up to one attribute's value; the corrupted run has
    another individual's name everywhere; restoring the clean stream at one (stream, position) gives the restored
    fraction of logit(own value) - logit(the other's value) (hooks.activation_patching). Returns (A, n_layer + 1,
    len(SITES)): the mean over individuals and over the positions of each site."""
    from ..facts.data import ATTRIBUTES
    from .hooks import activation_patching

    rng = np.random.default_rng([seed, 7])
    total = np.zeros((len(ATTRIBUTES), model.config.n_layer + 1, len(SITES)))
    count = np.zeros((len(ATTRIBUTES), 1, len(SITES)))
    for _ in range(people):
        a, b = (int(p) for p in rng.choice(data.seen, 2, replace=False))
        ids, vpos, npos = data.biography(a, rng)
        other = [*data.first_ids[data.names[b, 0]], *data.middle_ids[data.names[b, 1]],
                 *data.last_ids[data.names[b, 2]]]
        bad = list(ids)
        for j in range(len(ATTRIBUTES)):
            for p, t in zip(npos[j], other):
                bad[p] = t
        for j, attr in enumerate(ATTRIBUTES):
            v = vpos[j][0]
            target, foil = ids[v], data.value_ids[attr][data.values[b, j]][0]
            if target == foil:
                continue
            try:
                res = activation_patching(model, ids[:v], bad[:v], target, foil)
            except ValueError:  # the corruption changes nothing here: nothing to restore
                continue
            sites = np.array(trace_sites(v, npos[j]))
            for s in range(len(SITES)):
                if (sites == s).any():
                    total[j, :, s] += res["restored"].numpy()[:, sites == s].mean(1)
                    count[j, 0, s] += 1
    return total / np.maximum(count, 1)
