"""lmlab's own int8 matmul for x86 CPUs with AVX-512 VNNI: one op that rounds each input row to 8 bits, takes
the integer dot products and scales the result back, built from the C++ below on first use.

Why: at batch 1 FBGEMM's dynamic int8 linear (`quantized::linear_dynamic`) streamed the weights at ~14 GB/s on a
2-core AMD EPYC, and the row scaling lmlab wraps around it (so that a row's grid does not depend on the rows
beside it) cost ~22 us more per call in small PyTorch ops; llama.cpp's Q8_0 decoded 1.4x faster on the same
weights. Here the three steps are one call, and the weights are laid out for the dot-product instruction
(`vpdpbusd`: 64 bytes of weights, 16 output rows x 4 inputs, against 4 bytes of the input broadcast), so a
decoding step reads them as one stream near the memory's bandwidth. docs/LOG.md has the measurements.

The numbers are FBGEMM's path's: each row x is divided by its largest |x| and rounded to the 255-level grid of
[-1, 1] (u8 with zero point 128, which is what `vpdpbusd`'s unsigned operand wants) with FBGEMM's own arithmetic,
so the integers are the same; the products are summed in int32 (exact) and y = dot * (max|x| * 2/255) * row
scale + bias, equal to the FBGEMM path's outputs up to fp32 rounding of that last scaling. Integer sums do not
depend on the order they are taken in, so a row gives the same numbers alone as in any batch, at any thread
count. A row holding a NaN or an infinity gives NaN.

Built with torch.utils.cpp_extension.load_inline (a C++ compiler and ninja; ~25 s once, then cached under
~/.cache/torch_extensions). Where it cannot be built or run (no compiler, another CPU), `kernel()` is None
and the caller uses FBGEMM (models/quant.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// A weight (N, K) int8 -> blocks of 16 output rows (N padded to 16), each one contiguous run of Kp * 16 bytes
// (K padded to 4): for every group of 4 columns, 64 bytes = 16 rows x 4 columns, row r at bytes 4r .. 4r + 3.
// Also 128 * the row sums (the zero point's share of each dot product) and the row scales in fp32.
std::vector<at::Tensor> prepack(at::Tensor w, at::Tensor scales) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "prepack: an (N, K) int8 weight");
  w = w.contiguous();
  auto sc = scales.to(at::kFloat).reshape({-1}).contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(sc.numel() == N, "prepack: one scale per row");
  const int64_t Np = (N + 15) / 16 * 16, Kp = (K + 3) / 4 * 4;
  auto packed = at::zeros({Np / 16, Kp * 16}, at::kChar);
  auto corr = at::zeros({Np}, at::kInt);
  auto ws = at::zeros({Np}, at::kFloat);
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* c = corr.data_ptr<int32_t>();
  float* s = ws.data_ptr<float>();
  const float* scp = sc.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = n / 16, r = n % 16;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = src[n * K + k];
      sum += v;
      dst[b * Kp * 16 + (k / 4) * 64 + r * 4 + (k % 4)] = v;
    }
    c[n] = 128 * sum;
    s[n] = scp[n];
  }
  return {packed, corr, ws};
}

// One row onto its grid, exactly as FBGEMM's dynamic quantization of the FBGEMM path's pinned input does it:
// x / max|x| (IEEE division, as torch.div), then fma(., 1 / (2/255), 128) in fp32 (one rounding), rounded half
// to even, clamped to [0, 255]. The largest |x| becomes +-1 whatever its last bits, and lands on level +-127.
// Writes Kp bytes; returns max|x| (at least 1e-30), or NaN for a row holding a NaN or an infinity (its outputs
// are then NaN, as x @ W.T's would be; the integers written are the zero point's).
static float quantize_row(const float* x, int64_t K, int64_t Kp, uint8_t* out) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);  // NaN or +-inf
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  float a = _mm512_reduce_max_ps(mx);
  bool finite = bad == 0;
  for (; k < K; ++k) {
    finite = finite && std::isfinite(x[k]);
    a = std::max(a, std::fabs(x[k]));
  }
  if (!finite) {
    std::fill(out, out + Kp, (uint8_t)128);
    return std::numeric_limits<float>::quiet_NaN();
  }
  a = std::max(a, 1e-30f);
  const float inv = 1.0f / (2.0f / 255.0f);  // FBGEMM's inverse scale of the span [-1, 1]: 127.49999
  const __m512 va = _mm512_set1_ps(a), vinv = _mm512_set1_ps(inv), zp = _mm512_set1_ps(128.0f);
  const __m512i lo = _mm512_setzero_si512(), hi = _mm512_set1_epi32(255);
  for (k = 0; k + 16 <= K; k += 16) {
    const __m512 t = _mm512_fmadd_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), va), vinv, zp);
    const __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(t), lo), hi);
    _mm_storeu_si128((__m128i*)(out + k), _mm512_cvtepi32_epi8(q));
  }
  for (; k < K; ++k) {
    const float t = std::fma(x[k] / a, inv, 128.0f);
    out[k] = (uint8_t)std::min(255.0f, std::max(0.0f, std::nearbyint(t)));
  }
  for (; k < Kp; ++k) out[k] = 128;  // the padding columns' weights are 0
  return a;
}

constexpr int64_t PREFETCH = 32768;  // bytes ahead in a block's stream; a T2 hint helped by ~10% at batch 1

// acc[i * R + r] = the dot products of input rows i < MR with the R blocks of 16 weight rows at wb. The sums
// stay in a local array (registers): __m512i may alias anything, so sums kept in the caller's array were stored
// and loaded again at every step
template <int R, int MR>
static inline void dots(const int8_t* wb, int64_t Kp, const int32_t* const* xs, __m512i* acc) {
  const int64_t G = Kp / 4, bs = Kp * 16;
  __m512i a[R * MR];
  for (int i = 0; i < R * MR; ++i) a[i] = _mm512_setzero_si512();
  for (int64_t g = 0; g < G; ++g) {
    __m512i w[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* p = wb + r * bs + g * 64;
      if (MR == 1) _mm_prefetch((const char*)p + PREFETCH, _MM_HINT_T2);  // one row streams from memory
      w[r] = _mm512_loadu_si512(p);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i x = _mm512_set1_epi32(xs[i][g]);
      for (int r = 0; r < R; ++r) a[i * R + r] = _mm512_dpbusd_epi32(a[i * R + r], x, w[r]);
    }
  }
  for (int i = 0; i < R * MR; ++i) acc[i] = a[i];
}

// x (M, K) fp32 -> (M, N): y = dot(x̂, Ŵ) with x̂ each row on its own grid, times the row scales, plus the bias
at::Tensor linear(at::Tensor x, at::Tensor packed, at::Tensor corr, at::Tensor ws, c10::optional<at::Tensor> bias,
                  int64_t N, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "linear: an (M, K) fp32 input");
  TORCH_CHECK(!x.requires_grad(), "linear: int8 weights are not trained (the input requires grad)");
  x = x.contiguous();
  const int64_t M = x.size(0), nb = packed.size(0), Kp = packed.size(1) / 16;
  TORCH_CHECK(x.size(1) == K && (K + 3) / 4 * 4 == Kp && nb * 16 >= N,
              "linear: an input of ", x.size(1), " columns for a weight of ", K);
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  std::vector<uint8_t> xq(M * Kp);
  std::vector<float> step(M);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) step[m] = quantize_row(xp + m * K, K, Kp, xq.data() + m * Kp) * (2.0f / 255.0f);
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* cp = corr.data_ptr<int32_t>();
  const float* sp = ws.data_ptr<float>();
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  constexpr int64_t GROUP = 4;  // blocks of 16 rows a task takes at a time
  const int64_t groups = (nb + GROUP - 1) / GROUP;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    __m512i acc[16];
    const int32_t* xs[4];
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t b0 = gi * GROUP, nblocks = std::min<int64_t>(GROUP, nb - b0);
      for (int64_t b = 0; b < nblocks; ) {
        // 4 blocks at once where there are 4, else 2 or 1; 4 input rows at once where there are 4 (each weight
        // load used 4 times: a prompt's rows), else one
        const int64_t R = nblocks - b >= 4 ? 4 : nblocks - b >= 2 ? 2 : 1;
        const int8_t* wb = wp + (b0 + b) * Kp * 16;
        for (int64_t m = 0; m < M; ) {
          const int64_t MR = M - m >= 4 ? 4 : 1;
          for (int64_t i = 0; i < MR; ++i) xs[i] = (const int32_t*)(xq.data() + (m + i) * Kp);
          if (MR == 4) {
            if (R == 4) dots<4, 4>(wb, Kp, xs, acc); else if (R == 2) dots<2, 4>(wb, Kp, xs, acc);
            else dots<1, 4>(wb, Kp, xs, acc);
          } else {
            if (R == 4) dots<4, 1>(wb, Kp, xs, acc); else if (R == 2) dots<2, 1>(wb, Kp, xs, acc);
            else dots<1, 1>(wb, Kp, xs, acc);
          }
          for (int64_t i = 0; i < MR; ++i) {
            const __m512 s = _mm512_set1_ps(step[m + i]);
            for (int64_t r = 0; r < R; ++r) {
              const __m512i d = acc[i * R + r];
              const int64_t n0 = (b0 + b + r) * 16, left = N - n0;
              if (left <= 0) break;
              const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
              __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, _mm512_loadu_si512(cp + n0))),
                                       _mm512_mul_ps(s, _mm512_loadu_ps(sp + n0)));
              if (bp) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bp + n0));
              _mm512_mask_storeu_ps(yp + (m + i) * N + n0, mask, v);
            }
          }
          m += MR;
        }
        b += R;
      }
    }
  });
  return y;
}
"""

# -fopenmp: at::parallel_for is inlined from ATen's OpenMP backend, and without it ran on one thread
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-fopenmp"]
_lock = threading.Lock()
_built: list[Any] = []  # [module or None] once tried
reason: str | None = None  # why kernel() is None, once it was tried


def supported() -> bool:
    """Can this CPU run the op (x86 with AVX-512 and its VNNI dot products)?"""
    cpu = getattr(torch, "cpu", None)
    return bool(cpu is not None and getattr(cpu, "_is_avx512_supported", lambda: False)()
                and getattr(cpu, "_is_vnni_supported", lambda: False)())


def kernel() -> Any:
    """The built module (prepack, linear), or None where the CPU lacks AVX-512 VNNI or the build fails (`reason`
    says why). Built once per process, on first use, from the cache after the first time on a machine."""
    global reason
    with _lock:
        if _built:
            return _built[0]
        module = None
        if os.environ.get("LMLAB_INT8_KERNEL", "").lower() == "fbgemm":
            reason = "LMLAB_INT8_KERNEL=fbgemm"
        elif not supported():
            reason = "this CPU has no AVX-512 VNNI"
        else:
            try:
                module = _build()
            except Exception as e:  # no compiler, no ninja, no Python headers: FBGEMM's path instead
                reason = f"its build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        _built.append(module)
        return module


def _build() -> Any:
    cxx = os.environ.get("CXX", "c++")  # what torch's build calls: without one, FBGEMM, and no build log on stderr
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
    from torch.utils.cpp_extension import load_inline

    if shutil.which("ninja") is None:  # the ninja wheel (a dependency) puts its binary beside Python's
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    digest = hashlib.sha256((SOURCE + " ".join(FLAGS) + torch.__version__).encode()).hexdigest()[:12]
    name = f"lmlab_int8_{digest}"
    folder = Path(_build_directory(name, False))
    with open(folder / "lmlab.flock", "a") as held:
        _hold(held)
        # torch's own lock file, which its build leaves behind when killed (SIGTERM, SIGKILL): every later build
        # then waited on it forever. Only a process holding the flock above builds here, and the kernel drops a
        # flock with its process, so a lock file seen now is such a leftover
        (folder / "lock").unlink(missing_ok=True)
        return load_inline(name=name, cpp_sources=SOURCE, functions=["prepack", "linear"], extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)


BUILD_WAIT_S = 600.0  # another process's build takes ~25 s; past this, FBGEMM


def _hold(file: Any) -> None:
    import fcntl

    deadline = time.monotonic() + BUILD_WAIT_S
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"another process has been building it for {BUILD_WAIT_S:.0f} s") from None
            time.sleep(0.2)


def _build_directory(name: str, verbose: bool) -> str:
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, verbose)  # TORCH_EXTENSIONS_DIR, else torch's cache folder


def linear_fn(q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> Any:
    """fn(x (M, K)) = x̂ @ Ŵ.T + b in x's dtype, as quant._w8a8's FBGEMM path computes it, on this op; None where
    kernel() is."""
    module = kernel()
    if module is None:
        return None
    n, k = q.shape
    packed, corr, ws = module.prepack(q.to(torch.int8), scales.float().reshape(n))
    bias = None if b is None else b.detach().float().contiguous()  # a copy unless fp32: QuantLinear keys on it
    op = module.linear

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return op(x, packed, corr, ws, bias, n, k)
        return op(x.float(), packed, corr, ws, bias, n, k).to(x.dtype)
    return fn
