"""`lmlab lab interp lens|attention|patch`: one model directory and a prompt -> results.json, PNG heatmaps and a
self-contained report.html (the facts lab's report writer), each with self-checks that run on the user's model:
the last logit-lens row equals the model's logits, attention rows are causal distributions, patching the whole
clean residual restores 100% and patching nothing 0%."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...models.generation import GenerationConfig, generate_rows
from ...models.io import load_pretrained
from ..facts.report import _plt, new_report, save_figure, write_report
from . import steer
from .hooks import run_with_residuals
from .views import attention_view, encode, label, lens_view, patch_view, stream_labels, token_id

HEADING = "lmlab lab interp"
NOTE = ("Residual streams: 'embeddings' is the input of block 0, 'block i' the output of block i (the last one before "
        "the final norm). Numbers in results.json.")


def load(model_dir: str | Path) -> tuple[Any, Any]:
    model, tok = load_pretrained(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json; cannot turn text into tokens")
    return model, tok


def heatmap(path: Path, title: str, values: np.ndarray, xlabels: list[str], ylabels: list[str],
            text: list[list[str]] | None = None, cmap: str = "viridis", vmin: float | None = None,
            vmax: float | None = None, xlabel: str = "position", ylabel: str = "residual stream") -> Path:
    plt = _plt()
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.7 * cols, 24), min(1.5 + 0.45 * rows, 24)), dpi=100)
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
    ax.set_xticks(range(cols), xlabels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(rows), ylabels, fontsize=8)
    if text is not None and cols <= 40:
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, text[r][c][:8], ha="center", va="center", fontsize=6,
                        color="k" if cmap == "coolwarm" else "w")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def run_lens(model_dir: str | Path, prompt: str, out: str | Path, target: str | None = None, k: int = 5,
             command: str = "", bos: bool = False) -> dict[str, Any]:
    """The logit lens of every residual stream at every position; the target (default: the model's own top
    token after the prompt) by probability and rank."""
    out = new_report(out)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:  # 0: IndexError; -1: a torch error
        raise ValueError(f"--top-k ({k}) must be >= 1")
    model, tok = load(model_dir)
    ids = encode(model, tok, prompt, bos=bos)
    view = lens_view(model, tok, ids, token_id(tok, target, "--target") if target is not None else None, k)
    tid, gap, streams, tokens = view["target"]["id"], view["max_abs_diff_last_stream"], view["streams"], view["tokens"]
    top = [[pos[0]["token"] for pos in layer] for layer in view["top"]]
    probs = np.array(view["target"]["prob"])
    plot = heatmap(out / "lens.png", f"logit lens: p({label(tok, tid)}) by stream and position", probs,
                   tokens, streams, text=top, vmin=0, vmax=1)
    top_at = [view["target"]["rank"][s][-1] == 0 for s in range(len(streams))]
    first = next((s for s in range(len(streams)) if all(top_at[s:])), None)  # top there and in every later stream
    measured = (f"p({label(tok, tid)}) after the prompt by stream: "
                + ", ".join(f"{s} {p:.3f}" for s, p in zip(streams, probs[:, -1]))
                + (f"; it is the top token from {streams[first]} on" if first is not None else
                   "; not the top token of the last stream" if not top_at[-1] else "")
                + f"; the last stream's lens differs from the model's logits by at most {gap:.2g}")
    rows = [{"stream": s, **{f"{t}@{p}": top[i][p] for p, t in enumerate(tokens)}} for i, s in enumerate(streams)]
    results = {"model": str(model_dir), "prompt": prompt, **view}
    write_report(out, "logit lens", "Each residual stream, read through the final norm and the head, shows what the "
                 "model would predict if it stopped there (nostalgebraist 2020).", measured,
                 {"last_stream_equals_logits": gap <= 1e-5}, rows, [plot], results, command,
                 title=HEADING, claim_label="<b>Method</b>", note=NOTE)
    return results


def run_attention(model_dir: str | Path, prompt: str, out: str | Path, command: str = "",
                  bos: bool = False) -> dict[str, Any]:
    """Every head's attention probabilities on the prompt, one small heatmap per layer and head."""
    out = new_report(out)
    model, tok = load(model_dir)
    ids = encode(model, tok, prompt, bos=bos)
    view = attention_view(model, tok, ids)
    probs, tokens = view["attention"], view["tokens"]
    row_err, future = view["max_row_sum_error"], view["max_future_weight"]
    L, H, T, _ = probs.shape
    plt = _plt()
    fig, axes = plt.subplots(L, H, figsize=(min(1.8 * H, 30), min(1.8 * L, 30)), dpi=100, squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(probs[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"L{layer} H{head}", fontsize=7)
    plot = save_figure(fig, out / "attention.png")
    # what each head attends to most from the last position: a one-line summary per head
    last = probs[:, :, -1]                                                    # (L, H, T)
    rows = [{"layer": layer, "head": h, "from last token, most to": tokens[int(last[layer, h].argmax())],
             "weight": round(float(last[layer, h].max()), 4),
             "mean weight on own token": round(float(probs[layer, h].diagonal().mean()), 4)}
            for layer in range(L) for h in range(H)]
    measured = (f"{L} layers x {H} heads on {T} tokens; rows sum to 1 within {row_err:.2g}, largest weight on a "
                f"later token {future:.2g}")
    results = {"model": str(model_dir), "prompt": prompt, **view, "attention": probs.numpy().round(5)}
    write_report(out, "attention patterns", "The softmax weights of every head as the model computes them (causal "
                 "mask, RoPE and shared key/value heads included).", measured,
                 {"rows_are_distributions": row_err <= 1e-5, "causal": future == 0.0}, rows, [plot], results,
                 command, title=HEADING, claim_label="<b>Method</b>", note="Numbers in results.json (attention: layer, "
                 "head, query position, key position).")
    return results


def run_patch(model_dir: str | Path, prompt: str, corrupt: str, out: str | Path, target: str | None = None,
              foil: str | None = None, command: str = "", bos: bool = False) -> dict[str, Any]:
    """Activation patching from the clean prompt into the corrupted one: the layer x position heatmap of the
    restored fraction of the logit difference. Target: the clean run's top token unless given."""
    out = new_report(out)
    model, tok = load(model_dir)
    clean, bad = encode(model, tok, prompt, bos=bos), encode(model, tok, corrupt, "--corrupt", bos)
    view = patch_view(model, tok, clean, bad, token_id(tok, target, "--target") if target is not None else None,
                      token_id(tok, foil, "--foil") if foil is not None else None)
    tid, fid, streams, tokens = view["target"]["id"], view["foil"]["id"], view["streams"], view["tokens"]
    restored = view["restored"].numpy()
    everything, nothing = view["restored_all_positions_stream0"], view["restored_nothing"]
    lim = max(1.0, float(np.abs(restored).max()))
    plot = heatmap(out / "patch.png", f"restored share of logit({label(tok, tid)}) - logit({label(tok, fid)})",
                   restored, tokens, streams, text=[[f"{v:.2f}" for v in row] for row in restored], cmap="coolwarm",
                   vmin=-lim, vmax=lim, xlabel="position (clean/corrupted token)")
    s, p = np.unravel_index(int(np.argmax(restored)), restored.shape)
    measured = (f"logit difference {view['logit_diff_clean']:.3f} clean, {view['logit_diff_corrupt']:.3f} corrupted; "
                f"the largest restoration {restored[s, p]:.3f} at {streams[s]}, position {p} ({tokens[p]}); patching "
                f"every position at the embeddings restores {everything:.6f}, patching none {nothing:.6f}")
    rows = [{"stream": streams[i], **{f"{p}:{t}": round(float(v), 4) for p, (t, v) in enumerate(zip(tokens, row))}}
            for i, row in enumerate(restored)]
    results = {"model": str(model_dir), "prompt": prompt, "corrupt": corrupt, **view, "restored": restored}
    write_report(out, "activation patching", "Restoring the clean run's residual stream at one layer and position "
                 "in the corrupted run shows where the information that decides the prediction sits (Meng et al. "
                 "2022's causal tracing; Heimersheim & Nanda 2024).", measured,
                 {"everything_restores_100%": abs(everything - 1) <= 1e-5, "nothing_restores_0%": abs(nothing) <= 1e-6},
                 rows, [plot], results, command, title=HEADING, claim_label="<b>Method</b>", note=NOTE)
    return results


# ---- steering directions (steer.py) ---------------------------------------------------------------------------

def read_prompts(path: str | Path, flag: str, model: Any, tok: Any, bos: bool = False,
                 limit: int | None = None) -> tuple[list[str], list[list[int]]]:
    """The non-empty lines of a text file (up to `limit`) and their ids, cut to the model's context."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()][:limit]
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: not UTF-8 text") from None
    ids = [[tok.bos_id] * bos + tok.encode(s) for s in lines]
    ids = [i[:model.config.block_size] for i in ids if i]
    if not ids:
        raise ValueError(f"{flag} {path}: no line of text (one prompt per line)")
    return lines, ids


def scorer(word: str | None) -> tuple[str, Any]:
    """The rule-checked property of a generated text: (its name, text -> (value, on?)). Cyrillic share by
    default; with `word`, whether the text contains it."""
    if word is not None:
        return f"contains {word!r}", lambda t: (float(word in t), word in t)

    def cyr(t: str) -> tuple[float | None, bool]:
        share = steer.cyrillic_share(t)
        return share, share is not None and share > 0.5
    return "Cyrillic share of letters", cyr


def check_steer(coefs: Sequence[float], n_prompts: int, max_new_tokens: int) -> None:
    """run_steer's numbers, the sentences `lmlab lab interp steer` says for its flags."""
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in (n_prompts, max_new_tokens)):
        raise ValueError("--samples and --max-new-tokens must be >= 1")
    if isinstance(coefs, (str, bytes)) or not coefs or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coefs):
        raise ValueError("--coefs must be finite numbers")  # nan failed only after the direction was written
    if any(abs(c) > steer.MAX_COEF for c in coefs):
        raise ValueError(f"--coefs must be between -{steer.MAX_COEF:g} and {steer.MAX_COEF:g}")


def run_steer(model_dir: str | Path, positive: str | Path, negative: str | Path, layer: int, out: str | Path, *,
              neutral: str | Path, prompts: str | Path | None = None, coefs: Sequence[float] = (0, 0.5, 1, 2, 4),
              n_prompts: int = 16, max_new_tokens: int = 32, temperature: float = 0.8, word: str | None = None,
              seed: int = 0, command: str = "", bos: bool = False) -> dict[str, Any]:
    """Build the positive - negative direction at `layer`, save it in `out`, and measure it: the rule-checked
    property of sampled continuations of the prompts (default: the negative set's lines) for each coefficient
    and with the direction ablated, and the mean per-token KL it costs on the neutral texts. Its settings and
    `out` are checked before anything is loaded or written (a direction already there is not replaced)."""
    out = new_report(out)  # a direction already there too
    check_steer(coefs, n_prompts, max_new_tokens)
    model, tok = load(model_dir)
    _, pos_ids = read_prompts(positive, "--positive", model, tok, bos)
    _, neg_ids = read_prompts(negative, "--negative", model, tok, bos)
    _, neutral_ids = read_prompts(neutral, "--neutral", model, tok, bos, limit=64)
    prompt_src = prompts if prompts is not None else negative
    prompt_text, _ = read_prompts(prompt_src, "--prompts", model, tok, bos, limit=n_prompts)
    direction = steer.difference_of_means(model, pos_ids, neg_ids, layer, {
        "positive": str(positive), "negative": str(negative), "model": str(model_dir)})
    direction.save(out)
    name, score = scorer(word)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=40, seed=seed,
                           stop_at_eos=False)
    rows, samples = [], {}
    for coef, ablate in [*((float(c), False) for c in coefs), (0.0, True)]:
        with steer.Steering(model, direction, coef, ablate):
            texts, _, _ = generate_rows(model, tok, prompt_text, cfg, add_bos=bos)
        values = [score(t) for t in texts]
        measured_values = [v for v, _ in values if v is not None]
        key = "ablate" if ablate else f"{coef:g}"
        samples[key] = texts
        rows.append({"coefficient": key, "property_mean": float(np.mean(measured_values)) if measured_values else None,
                     "share_on": float(np.mean([on for _, on in values])),
                     "kl_neutral": steer.neutral_kl(model, neutral_ids, direction, coef, ablate)})
    leak = ablation_leak(model, direction, neutral_ids[0])
    added = [r for r in rows if r["coefficient"] != "ablate"]
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    xs = [float(r["coefficient"]) for r in added]
    a.plot(xs, [r["property_mean"] for r in added], "o-", label=f"mean {name}")
    a.plot(xs, [r["share_on"] for r in added], "s--", label="share of samples where it holds" if word else
           "share of samples mostly Cyrillic")
    a.set(xlabel="coefficient", ylabel="property", ylim=(-0.05, 1.05),
          title=f"added at {stream_labels(model.config.n_layer)[layer]}")
    a.legend(fontsize=8)
    b.plot(xs, [r["kl_neutral"] for r in added], "o-")
    b.set(xlabel="coefficient", ylabel="nats per token", title="KL(unsteered || steered) on neutral text")
    plot = save_figure(fig, out / "steer.png")
    base = next((r for r in added if r["coefficient"] == "0"), None)
    best = max(added, key=lambda r: r["share_on"])
    abl = rows[-1]
    measured = (f"{name} of {len(prompt_text)} sampled continuations: "
                + ", ".join(f"coef {r['coefficient']}: {_fmt(r['property_mean'])} (holds in {r['share_on']:.0%}, KL "
                            f"{r['kl_neutral']:.4f})" for r in rows)
                + f"; direction norm {direction.norm:.4g} at stream {layer}; after ablation the largest component left "
                f"along it is {leak:.2g}")
    results = {"model": str(model_dir), "layer": layer, "norm": direction.norm, "property": name,
               "coefficients": rows, "samples": samples, "ablation_leak": leak,
               "best": {"coefficient": best["coefficient"], "share_on": best["share_on"], "kl": best["kl_neutral"]},
               "direction": dict(direction.meta)}
    checks = {"coefficient_0_costs_no_kl": None if base is None else base["kl_neutral"] == 0.0,
              "ablation_removes_the_component": leak <= 1e-4, "ablation_kl_reported": abl["kl_neutral"] >= 0}
    write_report(out, "steering direction", "The difference of the mean residual stream over two contrastive sets of "
                 "texts, added to the stream with a coefficient (Turner et al. 2023; Rimsky et al. 2024) or projected "
                 "out of every stream (Arditi et al. 2024), moves a rule-checked property of the generated text; the "
                 "KL on neutral text is its cost.", measured, checks, rows, [plot], results, command, title=HEADING,
                 claim_label="<b>Method</b>", note="KL: mean over every position of the neutral texts of "
                 "KL(P_unsteered || P_steered), nats. direction.safetensors + direction.json in this folder: use them "
                 "with lmlab generate --steer FOLDER --steer-coef C (or --steer-ablate).")
    return results


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


@torch.no_grad()
def ablation_leak(model: Any, direction: steer.Direction, ids: list[int]) -> float:
    """The largest |component along the direction| left in any residual stream at any position once it is
    ablated, relative to the stream's largest entry: ~1e-7 in float32."""
    unit = direction.vector / direction.vector.norm()
    with steer.Steering(model, direction, ablate=True):
        _, streams = run_with_residuals(model, ids)
    return max(float((s[0] @ unit.to(s.dtype)).abs().max() / s.abs().max()) for s in streams)
