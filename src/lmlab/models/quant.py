"""int8 / int4 quantization of a model's weights (int8 rounds activations too), and the modules that run it.

    lmlab quantize runs/demo/final --to int8 --out runs/demo/int8
    lmlab quantize runs/demo/final --to int4 --group-size 32 --method gptq --calibration books/ --out runs/demo/int4

int8 keeps one scale per output row (symmetric, q in [-127, 127]); int4 one scale and one zero per group of
`group_size` input columns (asymmetric min-max, q in [0, 15], w = (q - 8) * scale + zero: the layout of
PyTorch's int4 CPU kernel). Scales and zeros are stored in bf16, the precision those kernels read, and the
integers are chosen against the rounded scales, so the dequantised weight is exactly what the kernel uses.

The matmuls read 1 or 0.5 bytes per weight instead of 4. int8 runs on lmlab's own op where the CPU has AVX-512
VNNI and a C++ compiler is there to build it (models/int8_cpu.py: the row's rounding, the integer dot products
and the scaling back in one call, the same numbers as the FBGEMM path below, ~1.6x faster at batch 1), else on
FBGEMM's int8 x int8 GEMM (`quantized::linear_dynamic`, https://github.com/pytorch/FBGEMM) with each input row
quantized to 8 bits on the fly, as llama.cpp's Q8_0 x Q8_0 dot products do (per 32-block there, per row here, the
per-token dynamic quantization of ZeroQuant, Yao et al. 2022, https://arxiv.org/abs/2206.01861): integer dot
products (VNNI) instead of widening every weight to bf16 made int8 decoding 1.5-2x faster than
`aten::_weight_int8pack_mm`, which is compute-bound at batch 1 and scales with the rows after it. That kernel
(weight-only, bf16 activations) stays as the int8 fallback where FBGEMM is missing; int4 runs on
`aten::_weight_int4pack_mm_for_cpu` (as torchchat does). Both bf16 kernels are fast only with bf16 activations
(their fp32 path is several times slower than fp32 sgemv), so they round a linear's input and output to bf16.
Where no kernel applies (another device, an older torch), and for matrices small enough to stay in cache
(QuantLinear.kernel_min_weights), the fallback is a plain matmul with a dequantised weight built once and cached,
never dequantising per call (torchao's eager path, slower than fp32 on CPU).

method "gptq" is GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) in its plain form: each
linear's Hessian H = 2/n X^T X from calibration activations (every linear's inputs collected in one pass of
the fp32 model, not layer by layer), damped by 1% of its mean diagonal, then columns quantized left to right
with each column's rounding error spread over the columns not yet quantized through the Cholesky factor of
H^-1, in blocks of 128 columns.

The model directory is the usual one plus quantization.json (how it was made: bits, group size, method,
calibration, which linears are quantized and what stays fp32); model.safetensors holds, per quantized
linear, `qweight` (int8, or uint8 with two int4 per byte, low nibble first), `scales` and for int4 `zeros`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import configs
from ..files import atomic_write_text, staged_dir
from . import int8_cpu

QUANTIZATION = "quantization.json"
FORMATS = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")
_KERNELS = {8: "_weight_int8pack_mm", 4: "_weight_int4pack_mm_for_cpu"}


@dataclass
class QuantConfig:
    """How a model directory was quantized; saved as quantization.json beside config.json."""
    bits: int                                  # 8 or 4
    group_size: int | None = None              # int4: input columns per scale and zero; int8: None (per row)
    method: str = "rtn"                        # rtn (round to nearest) or gptq
    modules: list[str] = field(default_factory=list)   # the quantized linears, e.g. blocks.0.attn.qkv
    kept_fp32: list[str] = field(default_factory=list)  # tensors left in fp32
    calibration: dict[str, Any] | None = None  # gptq: documents, tokens, damping
    source: str | None = None                  # the model directory it was made from

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (8, 4):  # repr: "8", a string, read as 8 in the message
            raise ValueError(f"bits ({self.bits!r}) must be 8 or 4")
        if self.bits == 4 and (isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES):
            raise ValueError(f"group_size ({self.group_size!r}) must be one of {', '.join(map(str, GROUP_SIZES))}")
        for key in ("modules", "kept_fp32"):  # a string is no list: its characters read as layer names
            names = getattr(self, key)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{key} must be a list of tensor names, not {names!r}")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 has one scale per output row: no group size")
        if self.method not in METHODS:
            raise ValueError(f"method ({self.method!r}) must be one of {', '.join(METHODS)}")

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> QuantConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        return configs.from_dict(cls, data)


# ---- the arithmetic -------------------------------------------------------------------------------

_QRANGE = {8: (-127, 127, 0), 4: (0, 15, 8)}  # (lowest q, highest q, q of the zero point)


def grid(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (N, G) and zeros (N, G) or None (int8) of w (N, K), in bf16; G = K / group_size (1 for int8)."""
    if bits == 8:
        return (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-8).bfloat16(), None
    g = w.reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).bfloat16()
    return scale, (lo + 8 * scale.float()).bfloat16()


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integers (as float) nearest to w on the grid; scale and zero broadcast against w."""
    lo, hi, mid = _QRANGE[bits]
    shifted = w if zero is None else w - zero.float()
    return (shifted / scale.float()).round_().add_(mid).clamp_(lo, hi)


def dequantize_columns(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    w = (q - _QRANGE[bits][2]) * scale.float()
    return w if zero is None else w + zero.float()


def _expand(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, dim=1)  # (N, G) -> (N, K)


def rtn(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round to nearest: (integers (N, K) as float, scales, zeros)."""
    scale, zero = grid(w, bits, group_size)
    gs = group_size or w.shape[1]
    return quantize_columns(w, _expand(scale, gs), None if zero is None else _expand(zero, gs), bits), scale, zero


def gptq(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, *, damp: float = 0.01,
         block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ (Frantar et al. 2022, Algorithm 1) of w (N, K) for the layer input Hessian H (K, K): the same
    (integers, scales, zeros) as rtn, chosen to minimise tr((W - Ŵ) H (W - Ŵ)^T) column by column.
    An int4 group's grid is set from its columns as they stand when the group's first column is reached, after
    the error of every column before it was spread onto them. The reference implementation (IST-DASLab's gptq.py,
    https://github.com/IST-DASLab/gptq, and AutoGPTQ) sets it from the block's columns before the updates made
    within the block, which differs where a group starts inside a block of 128 columns (group sizes 32 and 64);
    this choice sees the errors already made, and gave the lower output error where they differ."""
    W, H = w.detach().clone().float(), H.detach().clone().double()
    N, K = W.shape
    gs = group_size or K
    dead = H.diagonal() == 0              # inputs that never fire: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.empty_like(W)
    scales = torch.empty(N, K // gs, dtype=torch.bfloat16)
    zeros = torch.empty(N, K // gs, dtype=torch.bfloat16) if bits == 4 else None
    if bits == 8:
        scales, _ = grid(W, 8, None)
    block = max(block // gs, 1) * gs if gs < K else block  # blocks hold whole groups
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if bits == 4 and col % gs == 0:
                s, z = grid(W1[:, i:i + gs], 4, gs)
                scales[:, col // gs], zeros[:, col // gs] = s[:, 0], z[:, 0]
            s = scales[:, col // gs]
            z = zeros[:, col // gs] if zeros is not None else None
            q = quantize_columns(W1[:, i], s, z, bits)
            Q[:, col] = q
            err = (W1[:, i] - dequantize_columns(q, s, z, bits)) / Hinv1[i, i]
            W1[:, i:].sub_(err[:, None] * Hinv1[i, i:][None, :])
            Err[:, i] = err
        W[:, i2:].sub_(Err @ Hinv[i1:i2, i2:])
    return Q, scales, zeros


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ's objective: ||W X - Ŵ X||² per sample, = tr((W - Ŵ) H (W - Ŵ)^T) / 2 for H = 2/n X^T X."""
    d = (w - w_hat).double()
    return float(((d @ H.double()) * d).sum() / 2)


# ---- modules --------------------------------------------------------------------------------------

def _pack4(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)                               # (N, K/2), low nibble first


def _unpack4(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)             # (N, K) in [0, 15]


def kernels_available(bits: int) -> bool:
    return hasattr(torch.ops.aten, _KERNELS[bits]) and (bits == 8 or hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def w8a8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


@functools.cache
def _full_range_activations() -> bool:
    """Does FBGEMM multiply 8-bit activations exactly here? Without VNNI its AVX2 kernel sums pairs of u8 x s8
    products in int16 (vpmaddubsw), which saturates above 32767 (2 * 255 * 127 = 64770): PyTorch then quantizes
    activations to 7 bits (reduce_range). Probed on the worst case, every activation and weight at its extreme:
    exact up to the activation's rounding (half a step, 1/255 of it), where a saturated sum is off by 99%."""
    n, k = 16, 64
    q = torch.full((n, k), 127, dtype=torch.int8)
    y = _w8a8(q, torch.ones(n, 1), None, reduce_range=False)(torch.ones(1, k))
    return bool(((y - 127 * k).abs() <= 127 * k / 200).all())


def _w8a8(q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None,
          reduce_range: bool | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(x (M, K)) = x̂ @ Ŵ.T + b in fp32, x̂ each row of x on its own 8-bit grid (7-bit with reduce_range).

    FBGEMM's dynamic linear quantizes its whole input on one grid spanning its min and max; a row's grid must not
    depend on the rows beside it (a batch, a prompt's other tokens), so each row is divided by its largest |x|
    and two columns, -1 and +1 against zero weights, pin every input's span to [-1, 1]: each row then has the
    same grid, scaled by its own maximum, and a row gives the same numbers alone as in any batch."""
    n, k = q.shape
    with warnings.catch_warnings():  # quantized tensors are deprecated; w8a8_available() says when they are gone
        warnings.simplefilter("ignore", UserWarning)
        wq = torch._make_per_channel_quantized_tensor(F.pad(q, (0, 2)), scales.reshape(n).double(),
                                                      torch.zeros(n, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(wq, None)
    rr = not _full_range_activations() if reduce_range is None else reduce_range

    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        a = xf.abs().amax(1, keepdim=True).clamp_min_(1e-30)   # (M, 1); vector_norm(inf) is 2-3x slower here
        pinned = _pinned_input(xf.shape[0], k)
        torch.div(xf, a, out=pinned[:, :k])  # one op where cat([x, -a, a]).div_(a) took three: the same numbers
        y = torch.ops.quantized.linear_dynamic(pinned, packed, rr)
        return (y.mul_(a) if b is None else torch.addcmul(b, y, a)).to(x.dtype)
    return fn


_inputs = threading.local()
KEPT_ROWS = 64  # inputs of at most this many rows (decoding steps) reuse a buffer; a prompt's get a new one


def _pinned_input(m: int, k: int) -> torch.Tensor:
    """An (m, k + 2) buffer whose last two columns are -1 and +1, for _w8a8's scaled input. Decoding steps reuse
    theirs, kept per thread (the server decodes while other threads generate) and shape; made outside inference
    mode, so a later call outside it may still write into it."""
    kept = _inputs.__dict__.setdefault("kept", {}) if m <= KEPT_ROWS else {}
    buf = kept.get((m, k))
    if buf is None:
        if len(kept) >= 16:  # the shapes of a few models' steps at a few batch sizes
            kept.clear()
        with torch.inference_mode(False):
            buf = kept[m, k] = torch.empty(m, k + 2)
            buf[:, k], buf[:, k + 1] = -1.0, 1.0
    return buf


class QuantLinear(nn.Module):
    """nn.Linear with an int8 (per row) or int4 (per group) weight; forward is x @ Ŵ.T + b."""

    use_kernels = True  # False: the fallback everywhere (tests compare the two)
    int8_activations = True  # False: int8 on the weight-only bf16 kernel even where FBGEMM is present
    fused_int8 = True  # False: 8-bit activations on FBGEMM even where lmlab's own op (int8_cpu) runs
    # Below this many weights a matrix runs as an fp32 matmul on its dequantised weight, cached (at most
    # 1 MiB): such a matrix stays in cache, so reading fewer bytes gains nothing, and the kernels' fixed
    # cost (casting to bf16 and back) made the tiny preset decode at half the fp32 speed. Measured at batch
    # 1 on one thread, the int8 kernel overtakes fp32 sgemv near 2^18 weights (768x384: 1.1x, 256x64: 0.4x).
    kernel_min_weights = 2**18

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size or in_features
        groups = in_features // self.group_size
        cols, dtype = (in_features, torch.int8) if bits == 8 else (in_features // 2, torch.uint8)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=dtype))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16) if bits == 4 else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._cache: tuple[Any, ...] = (None, None, None)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, group_size: int | None) -> QuantLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        with torch.no_grad():
            m.qweight.copy_(q.to(torch.int8) if bits == 8 else _pack4(q))
            m.scales.copy_(scales)
            if zeros is not None:
                m.zeros.copy_(zeros)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m.to(linear.weight.device)

    def integers(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        q = self.qweight[rows]
        return q.float() if self.bits == 8 else _unpack4(q).float()

    def dequantized(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Ŵ (or its `rows`) in fp32: what the kernels multiply by."""
        z = None if self.zeros is None else _expand(self.zeros[rows], self.group_size)
        return dequantize_columns(self.integers(rows), _expand(self.scales[rows], self.group_size), z, self.bits)

    def _prepared(self) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
        """(kind, fn): fn(x (M, in)) = x @ Ŵ.T + b, (M, out) in x's dtype, with the kernel's operands (or the
        fallback's dequantised weight) built once per weight and bound; the Decoder calls fn directly."""
        w = self.qweight
        bias = self.bias  # int8_cpu keeps an fp32 copy of a bf16 / fp16 bias: changed in place, it is made again
        key = (w.data_ptr(), w._version, self.scales._version, w.device, QuantLinear.use_kernels,
               QuantLinear.kernel_min_weights, QuantLinear.int8_activations, QuantLinear.fused_int8,
               None if bias is None else (bias.data_ptr(), bias._version, bias.dtype))
        if self._cache[0] == key:
            return self._cache[1]
        b, n, gs, bf16 = self.bias, self.out_features, self.group_size, torch.bfloat16
        if (QuantLinear.use_kernels and w.device.type == "cpu" and kernels_available(self.bits)
                and self.in_features * n >= QuantLinear.kernel_min_weights):
            kind = f"int{self.bits}"
            if self.bits == 8 and QuantLinear.int8_activations:
                fn = int8_cpu.linear_fn(w, self.scales, b) if QuantLinear.fused_int8 else None
                if fn is not None or w8a8_available():  # lmlab's own op, else the same numbers on FBGEMM
                    made = ("int8 vnni", fn) if fn is not None else ("int8 w8a8", _w8a8(w, self.scales, b))
                    self._cache = (key, made, None)
                    return made
            if self.bits == 8:
                scales = self.scales[:, 0].to(bf16).contiguous()

                def mm(x: torch.Tensor) -> torch.Tensor:
                    return torch.ops.aten._weight_int8pack_mm(x.to(bf16), w, scales)
            else:
                # the kernel wants rows in multiples of 16: pad with zero rows, sliced off after
                pad = -n % 16
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(F.pad(_unpack4(w).int(), (0, 0, 0, pad)), 1)
                sz = torch.stack([self.scales, self.zeros], dim=-1).to(bf16)               # (N, G, 2)
                sz = F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous()           # (G, N + pad, 2)

                def mm(x: torch.Tensor) -> torch.Tensor:
                    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(bf16), packed, gs, sz)
                    return y[:, :n] if pad else y

            def fn(x: torch.Tensor) -> torch.Tensor:  # bf16 + fp32 bias promotes: one op back to fp32
                y = mm(x)
                return (y if b is None else torch.add(y, b)).to(x.dtype)
        else:
            kind, wt = "dequantised", self.dequantized().t().contiguous()

            def fn(x: torch.Tensor) -> torch.Tensor:
                if x.dtype != wt.dtype:
                    return x @ wt.to(x.dtype) if b is None else torch.addmm(b.to(x.dtype), x, wt.to(x.dtype))
                return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)
        self._cache = (key, (kind, fn), wt if kind == "dequantised" else None)
        return kind, fn

    def operands(self) -> Any:
        """What fast.Decoder multiplies by: (Ŵ.T, b) where the matrix runs dequantised, as an nn.Linear's
        transposed copy (so its step is the fp32 model's, without a call through fn), else the kernel's fn."""
        kind, fn = self._prepared()
        return (self._cache[2], self.bias) if kind == "dequantised" else fn

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Ŵ[idx] (a tied embedding's lookups): from the cached dequantised weight where there is one."""
        self._prepared()
        table = self._cache[2]
        return self.dequantized(idx) if table is None else table.t()[idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._prepared()[1](x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int{self.bits}, group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """The token embedding of a model whose tied head is quantized: rows of the head's Ŵ, in the model's dtype.
    Holds no weights of its own (the head's are saved once, under lm_head); an empty buffer, not saved, follows
    model.to(dtype) and says which dtype that is (a bf16 model got fp32 rows, and its first norm failed)."""

    def __init__(self, head: QuantLinear) -> None:
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: its buffers belong to lm_head
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head.rows(idx.reshape(-1)).view(*idx.shape, self.head.in_features).to(self.dtype_probe.dtype)

    def lookup(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """ids (B,) -> rows (B, C), for the Decoder: a small head's dequantised table is indexed directly
        (a contiguous copy, at most 1 MiB), as an fp32 embedding would be."""
        head, dtype = self.head, self.dtype_probe.dtype
        if head.in_features * head.out_features < QuantLinear.kernel_min_weights:
            return head.dequantized().to(dtype).__getitem__
        return head.rows if dtype == torch.float32 else lambda idx: head.rows(idx).to(dtype)


# ---- whole models ---------------------------------------------------------------------------------

def is_quantized(model: nn.Module) -> bool:
    """Does the model hold int8/int4 layers (integer buffers under other names than a plain model's weights)?"""
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def refuse_quantized(model: nn.Module) -> None:
    """ValueError for a model with int8/int4 layers, which cannot train: their integer weights are buffers, so a
    run would train the norms alone and write a final/ that no loader reads."""
    if is_quantized(model):
        raise ValueError("this model is an int8/int4 model, which cannot train; start from the model it was "
                         f"quantized from (its {QUANTIZATION}: source)")


def plan_modules(model: nn.Module, keep_head: bool) -> tuple[list[str], list[str]]:
    """(the linears to quantize, the weights kept in fp32). The head is quantized unless keep_head; with a
    tied head the embedding then reads the quantized rows. An untied embedding, position table, norms and
    biases stay fp32: they are lookups or vectors, not matmuls."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    kept = [n for n, p in model.named_parameters() if not any(n == f"{m}.weight" for m in linears)]
    if not keep_head:
        linears.append("lm_head")
        kept = [n for n in kept if n not in ("lm_head.weight", "tok_emb.weight")
                or (n == "tok_emb.weight" and not model.config.tie_embeddings)]
    elif model.config.tie_embeddings:
        kept.append("lm_head.weight (tied to tok_emb.weight)")
    return linears, kept


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_quantization(model: nn.Module, qc: QuantConfig) -> nn.Module:
    """Give `model` empty quantized linears where `qc` names them (for loading a quantized directory)."""
    for name in qc.modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization.json names {name}, which is not a linear layer of this model")
        q = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, qc.bits, qc.group_size)
        _replace(model, name, q.to(linear.weight.device))
    _tie(model, qc)
    model.quantization = qc  # io.save_pretrained writes it beside the weights
    return model


def _tie(model: nn.Module, qc: QuantConfig) -> None:
    if "lm_head" in qc.modules and model.config.tie_embeddings:
        model.tok_emb = QuantEmbedding(model.lm_head)


def check_shapes(model: nn.Module, names: list[str], bits: int, group_size: int | None) -> None:
    for name in names:
        m = model.get_submodule(name)
        if bits == 4 and m.in_features % group_size:
            raise ValueError(f"--group-size {group_size} does not divide {name}'s {m.in_features} input columns")
        if bits == 4 and m.in_features % 2:
            raise ValueError(f"int4 packs two columns per byte: {name} has an odd width ({m.in_features})")


@torch.no_grad()
def hessians(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of each named linear's inputs X over every token of `windows` (n_windows, T)."""
    H = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features) for n in names}
    count = 0

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            H[name].addmm_(x.t(), x)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            model(batch)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return {n: h * (2 / count) for n, h in H.items()}


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, *, method: str = "rtn",
                   keep_head: bool = False, calibration: torch.Tensor | None = None,
                   damp: float = 0.01) -> tuple[nn.Module, QuantConfig, dict[str, dict[str, float]]]:
    """Quantize `model`'s linears in place -> (model, its QuantConfig, per-linear stats). gptq needs
    `calibration` token windows (n, T); the stats then give each linear's output error under RTN and GPTQ."""
    names, kept = plan_modules(model, keep_head)
    qc = QuantConfig(bits, group_size, method, names, kept)
    check_shapes(model, names, bits, group_size)
    if method == "gptq":
        if calibration is None or not len(calibration):
            raise ValueError("gptq needs calibration text (--calibration BOOKS)")
        H = hessians(model.eval(), names, calibration)
        qc.calibration = {"tokens": int(calibration.numel()), "windows": int(len(calibration)), "damp": damp}
    stats = {}
    for name in names:
        linear = model.get_submodule(name)
        w = linear.weight.detach().float().cpu()
        if method == "gptq":
            q, scales, zeros = gptq(w, H[name], bits, group_size, damp=damp)
            r = QuantLinear.from_quantized(linear, *rtn(w, bits, group_size), bits, group_size)
            stats[name] = {"rtn": output_error(w, r.dequantized(), H[name])}
        else:
            q, scales, zeros = rtn(w, bits, group_size)
        quantized = QuantLinear.from_quantized(linear, q, scales, zeros, bits, group_size)
        if method == "gptq":
            stats[name]["gptq"] = output_error(w, quantized.dequantized(), H[name])
        _replace(model, name, quantized)
    _tie(model, qc)
    model.quantization = qc  # io.save_pretrained writes it beside the weights
    return model, qc, stats


# bits per element of the dtypes model.safetensors holds (U8 is int4 packed two to a byte: 8 bits per element)
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
              "BOOL": 8}


def weight_bits(path: Path, parameters: int) -> tuple[float | None, float | None]:
    """(bits of all of model.safetensors' tensors per parameter, bits of the quantized linears alone per weight:
    their integers, scales and zeros over out x in; None for a model without quantized linears)."""
    from safetensors import safe_open

    total = quant = weights = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            n = math.prod(t.get_shape())
            total += n * DTYPE_BITS[t.get_dtype()]
            leaf = key.rpartition(".")[2]
            if leaf in ("qweight", "scales", "zeros"):  # quant.QuantLinear's buffers
                quant += n * DTYPE_BITS[t.get_dtype()]
                weights += n * (2 if t.get_dtype() == "U8" else 1) if leaf == "qweight" else 0
    return (total / parameters if parameters else None), (quant / weights if weights else None)


def calibration_windows(sources: list[str], tokenizer: Any, length: int,
                        max_tokens: int) -> tuple[torch.Tensor, list[str]]:
    """Token windows (n, length) from the user's books, spread evenly over them, up to max_tokens tokens.
    Books of up to 16 characters per token wanted are tokenized whole; from more, each window is tokenized from
    a slice of its book at evenly spaced places (a folder of books of hundreds of MB held every token as a Python
    int: ~175x the text in memory for the few windows used), one book in memory at a time."""
    from ..data import find_documents, read_document

    paths = find_documents(sources)
    if not paths:
        raise ValueError(f"no documents to calibrate on in {', '.join(map(str, sources))}")
    names = [p.name for p in paths]
    sizes = [len(read_document(p)) for p in paths]
    total, wanted = sum(sizes), max(max_tokens // length, 1)
    if total <= 16 * wanted * length:
        ids = [t for p in paths for t in tokenizer.encode(read_document(p))]
        n = min(len(ids) // length, wanted)
        if n < 1:
            raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {length}")
        starts = torch.linspace(0, len(ids) - length, n).long().tolist()
        ids_t = torch.tensor(ids)
        return torch.stack([ids_t[s:s + length] for s in starts]), names
    places = [int(i * total / wanted) for i in range(wanted)]  # character offsets over the books end to end
    windows, begin = [], 0
    for path, size in zip(paths, sizes):
        mine = [c - begin for c in places if begin <= c < begin + size]
        begin += size
        if not mine:
            continue
        text = read_document(path)
        for c in mine:
            span = 8 * length
            while True:
                ids = tokenizer.encode(text[c:c + span])
                if len(ids) > length or c + span >= len(text):
                    break
                span *= 2
            if len(ids) > length:  # the first token may be a word cut by the slice: it is left out
                windows.append(ids[1:length + 1])
    if not windows:
        raise ValueError(f"the calibration text has no stretch of {length} tokens")
    return torch.tensor(windows), names


def quantize_dir(model_dir: str | Path, out: str | Path, bits: int, group_size: int | None = None, *,
                 method: str = "rtn", keep_head: bool = False, calibration: list[str] | None = None,
                 calibration_tokens: int = 32768) -> tuple[Path, QuantConfig, dict[str, dict[str, float]]]:
    """Quantize a model directory into a new one (refused if `out` exists; written beside it and renamed)."""
    from .io import SIDE_FILES, TRAINING, copy_side_files, load_pretrained, save_pretrained

    out, model_dir = Path(out), Path(model_dir)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder for the quantized model")
    if (model_dir / QUANTIZATION).is_file():
        raise ValueError(f"{model_dir} is already quantized; quantize the model it was made from")
    if method == "gptq" and not calibration:
        raise ValueError("--method gptq needs --calibration BOOKS (text to measure the layers' inputs on)")
    if method == "rtn" and calibration:
        raise ValueError("--calibration is used by --method gptq only")
    if isinstance(calibration_tokens, bool) or not isinstance(calibration_tokens, int) or calibration_tokens < 1:
        raise ValueError(f"--calibration-tokens must be a positive number of tokens, not {calibration_tokens!r}")
    if isinstance(calibration, (str, Path)):  # one path, not its characters
        calibration = [str(calibration)]
    if bits == 8 and group_size is not None:
        raise ValueError("--group-size is for int4; int8 has one scale per output row")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} for int4")
    model, tok = load_pretrained(model_dir)
    windows, docs = None, []
    if method == "gptq":
        if tok is None:
            raise ValueError(f"{model_dir} has no tokenizer.json; gptq cannot read calibration text")
        windows, docs = calibration_windows(calibration, tok, min(model.config.block_size, 512), calibration_tokens)
    model, qc, stats = quantize_model(model, bits, group_size if bits == 4 else None, method=method,
                                      keep_head=keep_head, calibration=windows)
    if qc.calibration is not None:
        qc.calibration["documents"] = docs
    qc.source = str(model_dir.resolve())
    with staged_dir(out, replace=False) as tmp:
        save_pretrained(tmp, model, tok)  # with quantization.json: qc, its source set
        copy_side_files(model_dir, tmp, (*SIDE_FILES, TRAINING))  # the same trained model, in fewer bits
    return out, qc, stats

