"""GGUF export for llama.cpp, written with the `gguf` package (llama.cpp's own writer).

    lmlab export gguf runs/demo/final demo.gguf --dtype q8_0
    llama-cli -m demo.gguf -p "Once upon a time" -n 64 --temp 0

Families: `llama` (llama.cpp's LLAMA architecture) and `gpt2` (its GPT2 architecture); llama.cpp has no
GPT-1 (post-LN, no final norm) architecture, so `gpt` is refused. The tokenizer must be byte-level BPE
with GPT-2's split (every lmlab `bpe` tokenizer is): it is embedded as llama.cpp's "gpt2" tokenizer
model with pre-tokenizer "gpt-2", its merges and the special-token ids. Tensor names, the dtype of each
tensor and the Q/K permutation follow llama.cpp's convert_hf_to_gguf.py, so an f32, f16 or q8_0 file is what
converting the HF export would give. q4_0, q4_1, q5_0 and q5_1, which that script does not write, put every
matrix the plan allows in the one type, the output head included, as `llama-quantize --pure` does (without
--pure, llama-quantize gives the output head, or a tied token_embd, q6_K or q8_0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from ..models import ModelConfig
from ._files import (
    GENERATION_CONFIG,
    HF_TOKENIZER_DIR,
    ModelDir,
    check_out_name,
    end_of_turn_id,
    load_model_dir,
    staged_file,
)
from .hf_mapping import hf_config_dict

DTYPES = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
GGUF_ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'lmlab[gguf]'") from None
    return gguf


def permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from the half-split RoPE layout (HF Llama, lmlab: dims i and i + D/2 rotate
    together) to the interleaved one llama.cpp's LLAMA architecture uses (dims 2i and 2i + 1): within each
    head, row j*2 + h of the output is row h*D/2 + j of the input. As convert_hf_to_gguf.py's permute()."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lmlab state dict -> llama.cpp tensor names (numpy-order shapes, as convert_hf_to_gguf.py writes)."""
    out = {"token_embd.weight": state["tok_emb.weight"], "output_norm.weight": state["norm_f.weight"]}
    if not cfg.tie_embeddings:  # a missing output.weight makes llama.cpp reuse token_embd
        out["output.weight"] = state["lm_head.weight"]
    if cfg.family == "gpt2":
        out["position_embd.weight"] = state["pos_emb.weight"]
        out["output_norm.bias"] = state["norm_f.bias"]
        names = {"norm1": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output", "norm2": "ffn_norm",
                 "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}
        for i in range(cfg.n_layer):
            for ours, theirs in names.items():  # our Linear layout (out, in) is ggml's {in, out}: no transpose
                for kind in ("weight", "bias"):
                    out[f"blk.{i}.{theirs}.{kind}"] = state[f"blocks.{i}.{ours}.{kind}"]
        return out
    kv_dim = cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        q, k, v = state[b + "attn.qkv.weight"].split([cfg.n_embd, kv_dim, kv_dim])
        gate, up = state[b + "mlp.fc.weight"].chunk(2)
        out.update({
            f"blk.{i}.attn_norm.weight": state[b + "norm1.weight"],
            f"blk.{i}.attn_q.weight": permute_for_rope(q, cfg.n_head),
            f"blk.{i}.attn_k.weight": permute_for_rope(k, cfg.n_kv_head),
            f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": state[b + "attn.proj.weight"],
            f"blk.{i}.ffn_norm.weight": state[b + "norm2.weight"],
            f"blk.{i}.ffn_gate.weight": gate,
            f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": state[b + "mlp.proj.weight"],
        })
    return out


@dataclass(frozen=True)
class TensorPlan:
    name: str                 # llama.cpp's tensor name
    shape: tuple[int, ...]    # (rows, values per row), numpy order
    type: str                 # the type written: f32, f16, q8_0, q4_0, ...
    note: str                 # why it is not the requested type ("" when it is)
    nbytes: int


@dataclass(frozen=True)
class GGUFPlan:
    """What export_gguf writes (or would write): every tensor's type, each fallback and why, the achieved
    bits per weight. A block type quantizes runs of 32 values along a row; rows of another length cannot be
    cut into blocks and fall back to f16 (llama.cpp's converter does the same), which costs bits: printing it
    is how a model that silently ended at many more bits per weight than asked for is caught."""
    dtype: str
    tensors: tuple[TensorPlan, ...]
    path: Path | None = None  # the file, once written

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(t.nbytes for t in self.tensors) / sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def fallbacks(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.note.startswith("fallback")]

    def lines(self) -> list[str]:
        width = max(len(t.name) for t in self.tensors)
        rows = [f"{t.name:<{width}}  {'x'.join(map(str, t.shape)):>12}  {t.type:<5} {t.note}".rstrip()
                for t in self.tensors]
        return rows + [f"{len(self.tensors)} tensors, {len(self.fallbacks)} fallbacks; {self.dtype} requested, "
                       f"{self.bits_per_weight:.3f} bits per weight overall"]


def gguf_plan(tensors: dict[str, np.ndarray], dtype: str) -> GGUFPlan:
    """The type of each tensor. convert_hf_to_gguf.py's rule: 1-D tensors, norms and position embeddings stay
    f32; matrices take the requested type, or f16 where their rows are not whole blocks of the type."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise ValueError(f"dtype ({dtype!r}) must be one of {', '.join(DTYPES)}")
    T = gguf.GGMLQuantizationType
    plan = []
    for name, array in tensors.items():
        wanted, note = T[dtype.upper()], ""
        if array.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd"):
            wanted, note = T.F32, ("kept f32 (1-D)" if array.ndim <= 1 else "kept f32 (as llama.cpp's converter)")
        block = gguf.GGML_QUANT_SIZES[wanted][0]
        if array.shape[-1] % block:
            note = f"fallback: rows of {array.shape[-1]} values are not whole blocks of {block}"
            wanted = T.F16
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(array.shape, wanted)))
        plan.append(TensorPlan(name, tuple(array.shape), wanted.name.lower(), note, nbytes))
    return GGUFPlan(dtype, tuple(plan))


def _vocab(md: ModelDir, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings, token types and merges for llama.cpp's "gpt2" (byte-level BPE) tokenizer model."""
    gguf = _gguf()
    data = json.loads(md.tokenizer.to_str())
    model, pre, dec = data.get("model") or {}, data.get("pre_tokenizer") or {}, data.get("decoder") or {}
    byte_level = (model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not pre.get("add_prefix_space") and dec.get("type") == "ByteLevel" and not data.get("normalizer"))
    if not byte_level:
        kind = md.lmlab_tokenizer.kind if md.lmlab_tokenizer is not None else model.get("type", "unknown")
        raise ValueError(f"GGUF export embeds byte-level BPE tokenizers with GPT-2's split only (llama.cpp has "
                         f"no equivalent of this {kind} tokenizer); train the model with a bpe tokenizer")
    added = md.tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = md.tokenizer.id_to_token(i)
        if token is None:  # rows of the embedding no token uses
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _added_specials(md: ModelDir) -> tuple[bool, bool]:
    """(add_bos_token, add_eos_token): what the tokenizer's post-processor puts around an encoded text, which
    llama.cpp must do too to see the prompt ids transformers sees. lmlab's tokenizers add nothing; a checkpoint's
    may prepend BOS (Llama's). Anything else (a template that adds other tokens) has no llama.cpp equivalent."""
    tok = HFTokenizer.from_str(md.tokenizer.to_str())
    tok.no_padding()  # padding or truncation would change both encodings, not what the post-processor adds
    tok.no_truncation()
    text = "a b"
    plain, full = tok.encode(text, add_special_tokens=False).ids, tok.encode(text, add_special_tokens=True).ids
    bos = md.specials.bos is not None and full[:1] == [md.specials.bos]
    rest = full[1:] if bos else full
    eos = md.specials.eos is not None and rest == plain + [md.specials.eos]
    if not eos and rest != plain:
        raise ValueError(f"the tokenizer encodes {text!r} as {full}, not {plain} (its post-processor); llama.cpp can "
                         "only add BOS before and EOS after a text, so the GGUF would see other prompt ids")
    return bos, eos


def stop_ids(md: ModelDir) -> dict[str, int]:
    """Where llama.cpp stops generating, as GGUF tells it: its end-of-generation set holds the EOS, EOT and EOM ids
    (llama-vocab.cpp; gguf-py's SpecialVocab also puts a second and third end token there), the only stop ids the
    format has keys for. -> {"eos" | "eot" | "eom": id} for the model's stop ids (ModelDir.eos_ids: its EOS, a chat
    model's end of turn, an imported checkpoint's list), EOS and end of turn in their own slots, the others in the
    free ones; ValueError when there are more than three. (The export wrote EOS alone: llama.cpp ran past the rest
    of a checkpoint's list.)"""
    slots = {} if md.specials.eos is None else {"eos": md.specials.eos}
    end = end_of_turn_id(md.tokenizer, md.chat_template)
    if end is not None and end not in slots.values():
        slots["eot"] = end
    rest = [i for i in md.eos_ids if i not in slots.values()]
    free = [slot for slot in ("eos", "eot", "eom") if slot not in slots]
    if len(rest) > len(free):
        raise ValueError(f"{md.path} stops generation at ids {sorted({*slots.values(), *rest})}, but GGUF holds three "
                         f"at most (llama.cpp's EOS, EOT and EOM ids): llama.cpp would not stop at "
                         f"{rest[len(free):]}; keep three in its {HF_TOKENIZER_DIR}/{GENERATION_CONFIG}")
    return {**slots, **dict(zip(free, rest))}


def _is_gguf(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == b"GGUF"


def export_gguf(model_dir: str | Path, out_path: str | Path, *, dtype: str = "f32", overwrite: bool = False
                ) -> GGUFPlan:
    """Write `model_dir` as one GGUF file that llama.cpp loads, tokenizer included -> its plan (with `path`).
    dtype: f32, f16, or a block type of llama.cpp (blocks of 32 values along a row): q8_0 (8-bit, one f16
    scale), q5_1 / q4_1 (5 / 4 bits with an f16 scale and minimum), q5_0 / q4_0 (5 / 4 bits, one f16 scale).
    Matrices whose rows are not a multiple of 32 fall back to f16, as llama.cpp's converter does. An existing
    `out_path` is replaced only with overwrite=True, and never when it is a folder or a file of the model
    directory (its weights would be the GGUF) other than an earlier GGUF export."""
    out = Path(out_path)
    check_out_name(out, file=True)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; name the .gguf file to write in it")
    if out.is_file() and out.resolve().is_relative_to(Path(model_dir).resolve()) and not _is_gguf(out):
        raise ValueError(f"{out} is a file of the model directory being exported ({model_dir}), not an earlier "
                         "GGUF export; write the GGUF elsewhere")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} exists; replace it with --force (overwrite=True in Python), or choose another "
                              "name")
    gguf = _gguf()
    if dtype not in DTYPES:
        raise ValueError(f"dtype ({dtype!r}) must be one of {', '.join(DTYPES)}")
    md = load_model_dir(model_dir)
    cfg = md.model.config
    if cfg.family not in GGUF_ARCHITECTURES:
        raise ValueError(f"llama.cpp has no architecture for the {cfg.family} family (GPT-1: post-LN, no final "
                         f"norm); GGUF export supports {', '.join(GGUF_ARCHITECTURES)}")
    hf_config_dict(cfg)  # ValueError for switches the standard architecture lacks (llama.cpp would misread them)
    tokens, types, merges = _vocab(md, cfg.vocab_size)
    add_bos, add_eos = _added_specials(md)
    stops = stop_ids(md)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in md.model.state_dict().items()}
    tensors = {name: t.contiguous().numpy() for name, t in gguf_tensors(state, cfg).items()}
    plan = gguf_plan(tensors, dtype)
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, GGUF_ARCHITECTURES[cfg.family])
        w.add_name(md.path.resolve().name)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        if cfg.family == "llama":
            w.add_head_count_kv(cfg.n_kv_head)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_vocab_size(cfg.vocab_size)
        else:
            w.add_layer_norm_eps(cfg.norm_eps)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        # EOT: a chat model's end of turn, where llama.cpp's chat stops a reply, not only at <EOS>
        for add, token_id in ((w.add_bos_token_id, md.specials.bos), (w.add_eos_token_id, stops.get("eos")),
                              (w.add_eot_token_id, stops.get("eot")), (w.add_eom_token_id, stops.get("eom")),
                              (w.add_unk_token_id, md.specials.unk), (w.add_pad_token_id, md.specials.pad)):
            if token_id is not None:
                add(token_id)
        w.add_add_bos_token(add_bos)  # lmlab's prompts start with text, not <BOS>; a checkpoint's may not
        w.add_add_eos_token(add_eos)
        if md.chat_template:
            w.add_chat_template(md.chat_template)
        for t in plan.tensors:
            qtype = gguf.GGMLQuantizationType[t.type.upper()]
            w.add_tensor(t.name, gguf.quants.quantize(tensors[t.name], qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return dataclasses.replace(plan, path=staged_file(Path(out_path), write))


@contextlib.contextmanager
def llama_cpp_without_repack(llama_cpp: Any) -> Iterator[None]:
    """Inside, `llama_cpp.Llama(...)` loads with llama.cpp's extra CPU buffer types off (llama-cli's `--no-repack`).
    On CPUs with AMX, llama-cpp-python 0.3.36 segfaults in its first decode of a q8_0 file when they are on
    (measured on tiny and d=256 models, every vocab size tried; f32/f16 are unaffected), and Llama() has no
    switch for it: the module's default model parameters are patched for the duration."""
    defaults = llama_cpp.llama_model_default_params

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults
