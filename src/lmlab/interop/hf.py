"""Hugging Face transformers interop: an lmlab model directory <-> a transformers-native checkpoint.

    lmlab export hf runs/demo/final demo-hf      # GPT2LMHeadModel / LlamaForCausalLM / OpenAIGPTLMHeadModel
    lmlab import hf demo-hf demo-again           # and back

The export is what `save_pretrained` of the native class writes (config.json with `architectures`,
model.safetensors, generation_config.json) plus a `PreTrainedTokenizerFast` over the very same
tokenizer.json, so `AutoModelForCausalLM.from_pretrained` and `pipeline("text-generation")` load it
with no custom code. The import reads only JSON and safetensors (never pickle, never transformers'
code), so it works without transformers installed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from ..files import refuse_nonempty
from ..models import GenerationConfig, Transformer
from ..models.io import GENERATION, TRAINING, require_size, save_pretrained
from ..models.quant import is_quantized
from ..tokenizers import EOS_ID, SPECIAL_TOKENS, Tokenizer
from ._files import (
    CHAT_TEMPLATE,
    CONFIG,
    GENERATION_CONFIG,
    HF_TOKENIZER_DIR,
    LMLAB_SPECIALS,
    QUANTIZED,
    TOKENIZER,
    WEIGHTS,
    Specials,
    _json_object,
    check_out_name,
    end_of_turn_id,
    eos_token_ids,
    load_model_dir,
    read_hf_tokenizer_files,
    staged_dir,
)
from .hf_mapping import (
    HF_ARCHITECTURES,
    from_hf_state_dict,
    hf_config_dict,
    hf_prefixes,
    model_config_from_hf,
    to_hf_state_dict,
)

# Classes whose checkpoints hold a causal LM we can read (bare models too: their head is the tied embedding).
_IMPORTABLE = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"), "llama": ("LlamaForCausalLM", "LlamaModel"),
               "gpt": ("OpenAIGPTLMHeadModel", "OpenAIGPTModel")}
# Buffers some checkpoints carry that are not weights (causal masks, RoPE tables, position ids).
_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "position_ids")
# What a previous export or import may have left in the output folder that the new one would not write.
_HF_STALE = ("model.safetensors.index.json", "pytorch_model.bin", "generation_config.json", CHAT_TEMPLATE,
             "special_tokens_map.json", "tokenizer_config.json", "vocab.json", "merges.txt")
# what an lmlab model folder may hold beside the weights: an import replaces the model completely (a quantized
# model's quantization.json left behind would make the imported fp32 weights unreadable)
_LMLAB_STALE = (TOKENIZER, GENERATION, TRAINING, HF_TOKENIZER_DIR, CHAT_TEMPLATE, "quantization.json", "merge.json",
                "speed.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("this needs transformers: pip install 'lmlab[hf]'") from None
    return transformers


# ---- in memory (llm-arch-research's HFAdapter / HFTokenizerAdapter) ---------------------------------

def _weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The weights a plain Transformer would hold: LoRA adapters (tune/lora.py) merged in, as `lmlab lora merge`
    writes them (the base weights alone gave other logits, by 4.6 on a test model); a quantized model refused."""
    if is_quantized(model):
        raise ValueError(f"the model {QUANTIZED}")
    state = dict(model.state_dict())
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "effective_weight"):  # duck-typed as fast.py does: this layer sits below tune
                state[f"{name}.weight"] = m.effective_weight()
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}


def to_hf_model(model: Transformer, *, specials: Specials = LMLAB_SPECIALS) -> Any:
    """The transformers-native model (GPT2LMHeadModel, LlamaForCausalLM or OpenAIGPTLMHeadModel) holding a
    copy of `model`'s weights (LoRA adapters merged in), in eval mode. Raises ValueError if the model has switches
    the class lacks, or is quantized."""
    tf = _transformers()
    state = _weights(model)
    cfg = model.config
    family_classes = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                      "gpt": (tf.OpenAIGPTConfig, tf.OpenAIGPTLMHeadModel)}
    config_cls, model_cls = family_classes[cfg.family]
    kwargs = hf_config_dict(cfg, bos_token_id=specials.bos, eos_token_id=specials.eos)
    config = config_cls(**kwargs, architectures=[HF_ARCHITECTURES[cfg.family]])
    hf = model_cls(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(state, cfg), strict=False)
    params = {name for name, _ in hf.named_parameters(remove_duplicate=False)}
    if unexpected or params & set(missing):  # only non-weight buffers may stay as the class made them
        raise RuntimeError(f"lmlab -> {model_cls.__name__} mapping is incomplete: missing "
                           f"{sorted(params & set(missing))[:3]}, unexpected {sorted(unexpected)[:3]}")
    hf.generation_config = tf.GenerationConfig(bos_token_id=specials.bos, eos_token_id=specials.eos,
                                               pad_token_id=specials.pad)
    return hf.eval()


def to_hf_tokenizer(tokenizer: Tokenizer | HFTokenizer, *, special_tokens: dict[str, str] | None = None,
                    model_max_length: int | None = None, chat_template: str | None = None) -> Any:
    """A `transformers.PreTrainedTokenizerFast` over the same `tokenizers` object, with lmlab's specials
    (or `special_tokens`, e.g. {"eos_token": "<|endoftext|>"}) registered as bos/eos/unk/pad. It adds no
    BOS/EOS when encoding and decodes without clean-up, so ids and text equal lmlab's (for a model with lmlab's
    chat template: on text that does not spell a special token, see lmlab.tune.chat)."""
    tf = _transformers()
    hf = tokenizer.hf if isinstance(tokenizer, Tokenizer) else tokenizer
    extra: dict[str, Any] = {"model_max_length": model_max_length} if model_max_length else {}
    if special_tokens is None or isinstance(tokenizer, Tokenizer):
        special_tokens = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), SPECIAL_TOKENS))
    # lmlab encodes the text "<EOS>" as text, not as EOS; but a chat template that writes special tokens of its
    # own (lmlab's <|user|> ...) needs them matched in text to turn back into their ids, as every HF chat model
    own = [t.content for t in hf.get_added_tokens_decoder().values() if t.special and t.content not in SPECIAL_TOKENS]
    chat = chat_template is not None and any(t in chat_template for t in own)
    if special_tokens.get("bos_token") == SPECIAL_TOKENS[2] and not chat:
        extra["split_special_tokens"] = True
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=hf, clean_up_tokenization_spaces=False,
                                      padding_side="left", **special_tokens, **extra)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def from_hf_model(hf_model: Any) -> Transformer:
    """A transformers GPT2LMHeadModel / LlamaForCausalLM / OpenAIGPTLMHeadModel -> an lmlab Transformer
    with the same weights (fp32, eval mode)."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in hf_model.state_dict().items()}
    cfg = _own_head(state, model_config_from_hf(hf_model.config))
    model = Transformer(cfg)
    model.load_state_dict(_mapped(state, cfg, "the model"))
    return model.eval()


# ---- files -----------------------------------------------------------------------------------------

def _hf_generation_config(tf: Any, ours: GenerationConfig, specials: Specials, eos: int | list[int] | None) -> Any:
    """generation.json's defaults in transformers' spelling (sampling knobs only when sampling; no EOS id when
    generation goes past EOS). Stop strings are left out: transformers' generate refuses a config that has them
    unless the caller passes tokenizer=, so `model.generate(ids)` and pipeline(...) raised on such an export.
    lmlab's beam search takes the best beams, whatever do_sample says: with num_beams > 1 transformers samples
    the beams when do_sample is true, so it is false there."""
    sample = not ours.greedy and ours.num_beams == 1
    kwargs: dict[str, Any] = dict(bos_token_id=specials.bos, eos_token_id=eos if ours.stop_at_eos else None,
                                  pad_token_id=specials.pad, max_new_tokens=ours.max_new_tokens,
                                  do_sample=sample, num_beams=ours.num_beams)
    if sample:
        kwargs.update(temperature=ours.temperature, top_k=ours.top_k, top_p=ours.top_p)
    if ours.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = ours.repetition_penalty
    if ours.num_beams > 1:
        kwargs["length_penalty"] = ours.length_penalty
    return tf.GenerationConfig(**kwargs)


def export_hf(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `model_dir` as a transformers-native checkpoint in `out_dir`: a new or empty folder, or with
    overwrite=True one whose checkpoint files are replaced (and a previous export's leftovers removed).
    generation_config.json stops at every id of the model's eos_ids: a chat model's <|end|> too (its reply ends
    there), or the list the imported checkpoint had."""
    check_out_name(out_dir)
    if not overwrite and Path(out_dir).resolve() != Path(model_dir).resolve():  # that one: staged_dir's error
        refuse_nonempty(Path(out_dir))
    tf = _transformers()
    md = load_model_dir(model_dir)
    hf_model = to_hf_model(md.model, specials=md.specials)
    eos = list(md.eos_ids) if len(md.eos_ids) > 1 else md.eos_ids[0] if md.eos_ids else None
    hf_model.generation_config.eos_token_id = eos
    if (md.path / GENERATION).is_file():
        hf_model.generation_config = _hf_generation_config(
            tf, GenerationConfig.load(md.path / GENERATION), md.specials, eos)
    fast = to_hf_tokenizer(md.tokenizer, special_tokens=md.special_tokens,
                           model_max_length=md.model.config.block_size, chat_template=md.chat_template)
    # replace=overwrite: a folder another process filled since the check above is refused, not replaced
    with staged_dir(Path(out_dir), refuse=md.path, stale=_HF_STALE, replace=overwrite) as tmp, _no_progress_bars(tf):
        hf_model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        # transformers 5 writes its new class name, which transformers 4 cannot resolve; the classic name
        # loads in both (and is what this is: a PreTrainedTokenizerFast over tokenizer.json).
        config_file = tmp / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if md.chat_template:  # recent transformers write chat_template.jinja; older ones read only this key
            config["chat_template"] = md.chat_template
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(out_dir)


@contextmanager
def _no_progress_bars(tf: Any) -> Iterator[None]:
    """save_pretrained draws a progress bar per shard; a CLI export should print one line, not bars."""
    enabled = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            tf.utils.logging.enable_progress_bar()


def _shard(folder: Path, index: Path, name: str) -> Path:
    """The shard file `name` of the index: a path under the checkpoint's folder, in a subfolder too (transformers
    joins the name to the folder; a shard "sub/model-00001.safetensors" was reported missing). Never outside it:
    not absolute, no "..", and no folder on the way that a symbolic link takes elsewhere. The file itself may be a
    link, as a shard beside the index may: the hub's cache links every file of a checkpoint into its blobs/."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise ValueError(f"{index} names a shard outside its folder: {name!r}")
    file = folder.joinpath(*parts)
    if not file.parent.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{index} names a shard, {name}, in a folder that a symbolic link takes outside {folder}")
    if not file.is_file():
        raise FileNotFoundError(f"{index} names a shard that is missing: {name}")
    return file


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / WEIGHTS, folder / f"{WEIGHTS}.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _json_object(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must be an object of tensor names to file names, not "
                             f"{weight_map!r:.60}")
        files = [_shard(folder, index, name) for name in sorted(set(weight_map.values()))]
    elif any(folder.glob("*.bin")):
        raise ValueError(f"{folder} holds only pickled PyTorch weights (*.bin); lmlab never unpickles files "
                         "from outside: re-save them with transformers' save_pretrained(), which writes safetensors")
    else:
        raise FileNotFoundError(f"{folder} has no {WEIGHTS} (nor a sharded {index.name})")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{f} is not a readable safetensors file: {exc}") from None
    return {k: v.to(torch.float32) for k, v in state.items()}


def _own_head(state: dict[str, torch.Tensor], cfg: Any) -> Any:
    """`cfg` untied when the weights hold an output head other than the embedding, whatever tie_word_embeddings
    says (true, or absent: GPT-2's default): transformers 5 then keeps the checkpoint's head, and so does lmlab
    (tying threw it away, logits off by 2.4 on a test model)."""
    head = state.get("lm_head.weight")
    emb_name = hf_prefixes(cfg.family)[1]["tok_emb.weight"]
    emb = state.get(emb_name, state.get(emb_name.split(".", 1)[1]))  # bare-model names: "wte.weight"
    if cfg.tie_embeddings and head is not None and emb is not None and not torch.equal(head, emb):
        return dataclasses.replace(cfg, tie_embeddings=False)
    return cfg


def _mapped(state: dict[str, torch.Tensor], cfg: Any, source: str) -> dict[str, torch.Tensor]:
    """HF names -> ours, refusing tensors we would silently drop (extra heads, biases we lack)."""
    prefix = "model." if cfg.family == "llama" else "transformer."
    if not any(k.startswith(prefix) for k in state):  # bare-model checkpoints (the hub's gpt2) lack it
        state = {k if k.startswith("lm_head.") else prefix + k: v for k, v in state.items()}
    missing = [name for name in hf_prefixes(cfg.family)[1].values() if name not in state]
    if missing:  # from_hf_state_dict skips absent top-level tensors; every one is needed here
        raise ValueError(f"{source} lacks tensor {missing[0]}")
    try:
        ours = from_hf_state_dict(state, cfg)
    except KeyError as exc:
        raise ValueError(f"{source} lacks tensor {exc.args[0]}") from None
    expected = set(to_hf_state_dict(ours, cfg))
    extra = sorted(k for k in state if k not in expected and not k.endswith(_BUFFERS))
    if cfg.tie_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]
    if extra:
        raise ValueError(f"{source} has tensors a {cfg.family} model cannot hold: {', '.join(extra[:3])}")
    return ours


def _normalised(hf: HFTokenizer) -> HFTokenizer:
    """Undo what transformers adds when it saves one of our tokenizers (a post-processor that adds
    nothing, padding/truncation settings), so the imported tokenizer.json equals the exported one and
    token files made with it stay valid (they record its fingerprint)."""
    data = json.loads(hf.to_str())
    post = data.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing" and not post.get("special_tokens"):
        data["post_processor"] = None
    data["padding"] = data["truncation"] = None
    return HFTokenizer.from_str(json.dumps(data))


def _stop_ids(hf_dir: Path, hf_config: dict[str, Any], vocab_size: int) -> list[int]:
    """Where the checkpoint's generation stops: generation_config.json's eos_token_id (what transformers'
    generate reads), else config.json's."""
    file = hf_dir / GENERATION_CONFIG
    generation = _json_object(file)
    if "eos_token_id" not in generation:
        file, generation = hf_dir / CONFIG, hf_config
    return eos_token_ids(generation.get("eos_token_id"), file, vocab_size)


# generation_config.json's keys that lmlab's GenerationConfig has too, under the same name and meaning
_HF_GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                       "num_beams", "length_penalty")
HF_TOP_K = 50  # what transformers samples with when generation_config.json sets no top_k


def _generation_from_hf(hf_dir: Path) -> GenerationConfig | None:
    """generation_config.json's decoding defaults as lmlab's generation.json (export_hf writes them there, and the
    import lost them), None when it sets none of them (only token ids, as save_pretrained of a bare model writes).
    Keys lmlab lacks are ignored; a value lmlab refuses (null, out of bounds, of another type) is left out, as if
    the file did not set it, so an odd file never stops the import. Where the file is silent transformers does not
    sample, and samples with top-k 50: so does the imported model."""
    given = _json_object(hf_dir / GENERATION_CONFIG)
    kept: dict[str, Any] = {}
    for key in _HF_GENERATION_KEYS:
        if given.get(key) is None:
            continue
        try:
            GenerationConfig(**{**kept, key: given[key]})
        except (TypeError, ValueError):
            continue
        kept[key] = given[key]
    if not kept:
        return None
    kept.setdefault("do_sample", False)
    if kept["do_sample"]:
        kept.setdefault("top_k", HF_TOP_K)
    return GenerationConfig(**kept)


def import_hf(hf_dir: str | Path, model_dir: str | Path, overwrite: bool = False) -> Path:
    """Read a local transformers checkpoint (GPT-2, Llama or GPT-1 causal LM: config.json, safetensors and
    a fast tokenizer) into an lmlab model directory.

    If the tokenizer puts lmlab's four specials at ids 0..3 (every lmlab export does), it becomes the
    model's tokenizer.json. If it has none of them (real GPT-2: ids 0..3 are ``! " # $``), the model is
    imported all the same, its tokenizer files are kept unchanged in `hf_tokenizer/` (exports use them),
    and pad_token_id comes from the checkpoint; its stop ids (eos_token_id of generation_config.json, else of
    config.json), where they are not just the tokenizer's EOS, are kept in `hf_tokenizer/generation_config.json`
    for the exports. The decoding defaults of generation_config.json (max_new_tokens, do_sample, temperature,
    top_k, top_p, repetition_penalty, num_beams, length_penalty) become generation.json. Having lmlab's specials
    at other ids is an error, and so is, with them, a stop id other than <EOS> (or a chat model's <|end|>), where
    lmlab's generation would not stop. `model_dir` must be new or empty, unless overwrite=True: then the model it
    holds is replaced completely."""
    hf_dir = Path(hf_dir)
    check_out_name(model_dir)
    if not overwrite and Path(model_dir).resolve() != hf_dir.resolve():  # that one: staged_dir's error
        refuse_nonempty(Path(model_dir))
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {hf_dir}")
    if not (hf_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{hf_dir} is not a transformers checkpoint: {CONFIG} is missing")
    hf_config = _json_object(hf_dir / CONFIG)  # ValueError naming it: not UTF-8, not JSON, not an object
    try:
        cfg = model_config_from_hf(hf_config)
    except KeyError as exc:
        raise ValueError(f"{hf_dir / CONFIG} lacks {exc.args[0]}") from None
    except ValueError as exc:
        raise ValueError(f"{hf_dir / CONFIG}: {exc}") from None
    archs = hf_config.get("architectures") or [None]
    arch = archs if isinstance(archs, str) else archs[0] if isinstance(archs, list) else archs
    if arch is not None and arch not in _IMPORTABLE[cfg.family]:
        raise ValueError(f"{hf_dir} holds a {arch}; lmlab imports causal language models "
                         f"({', '.join(HF_ARCHITECTURES.values())})")

    tokenizer, names, template = read_hf_tokenizer_files(hf_dir)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise ValueError(f"{hf_dir / TOKENIZER} has {size} tokens but the model's vocab_size is {cfg.vocab_size}")
    special_ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    ours: Tokenizer | None = None
    if special_ids == list(range(len(SPECIAL_TOKENS))):
        ours = Tokenizer(_normalised(tokenizer))
        for key, want in (("bos_token_id", ours.bos_id), ("eos_token_id", ours.eos_id)):
            if hf_config.get(key) not in (None, want, [want]):  # a list of one is transformers' spelling too
                raise ValueError(f"{hf_dir / CONFIG} says {key} is {hf_config[key]} but the tokenizer's "
                                 f"{SPECIAL_TOKENS[want]} is {want}")
    elif any(i is not None for i in special_ids):
        found = ", ".join(f"{t}={i}" for t, i in zip(SPECIAL_TOKENS, special_ids))
        raise ValueError(f"{hf_dir / TOKENIZER} has lmlab's special tokens at the wrong ids ({found}; "
                         "expected 0, 1, 2, 3)")
    elif cfg.pad_token_id is None and "pad_token" in names:
        cfg = dataclasses.replace(cfg, pad_token_id=tokenizer.token_to_id(names["pad_token"]))

    stop_ids = _stop_ids(hf_dir, hf_config, cfg.vocab_size)
    if ours is not None:
        allowed = [EOS_ID] + [i for i in [end_of_turn_id(ours.hf, template)] if i is not None]
        if not set(stop_ids) <= set(allowed):  # lmlab's generation stops at those only: refused, not dropped
            raise ValueError(f"{hf_dir} stops generation at ids {stop_ids} (eos_token_id), but an lmlab model stops "
                             f"only at {' and '.join(map(str, allowed))}; remove the others from its "
                             f"{GENERATION_CONFIG} to import it")
    generation = _generation_from_hf(hf_dir)
    weights = _read_hf_weights(hf_dir)
    require_size(cfg, sum(t.numel() for t in weights.values()), hf_dir / CONFIG)
    cfg = _own_head(weights, cfg)
    model = Transformer(cfg)
    try:
        model.load_state_dict(_mapped(weights, cfg, str(hf_dir)))
    except RuntimeError as exc:  # shapes in the weights disagree with config.json
        raise ValueError(f"{hf_dir} weights do not match its {CONFIG}: {str(exc).splitlines()[-1].strip()}") from None

    # replace=overwrite: a folder another process filled since the check above is refused, not replaced
    with staged_dir(Path(model_dir), refuse=hf_dir, stale=_LMLAB_STALE, replace=overwrite) as tmp:
        save_pretrained(tmp, model, ours, generation=generation)
        if ours is None:
            (tmp / HF_TOKENIZER_DIR).mkdir()
            for name in (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", CHAT_TEMPLATE):
                if (hf_dir / name).is_file():
                    shutil.copyfile(hf_dir / name, tmp / HF_TOKENIZER_DIR / name)
            eos_name = names.get("eos_token")
            if stop_ids != ([] if eos_name is None else [tokenizer.token_to_id(eos_name)]):  # exports write them
                (tmp / HF_TOKENIZER_DIR / GENERATION_CONFIG).write_text(
                    json.dumps({"eos_token_id": stop_ids}) + "\n", encoding="utf-8")
        elif template:
            (tmp / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
    return Path(model_dir)
