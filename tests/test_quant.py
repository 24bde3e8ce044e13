"""int8/int4 weight-only quantization (lmlab.models.quant, `lmlab quantize`): the kernels against a dequantised
fp32 reference, a quantized directory saved, loaded and generated from, the fast decoder against the full
forward, GPTQ against round-to-nearest on its own objective, and the CLI's refusals."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lmlab
from lmlab.cli import main
from lmlab.models import ModelConfig, Transformer, fast, generate_ids, int8_cpu, quant
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.models.model import KVCache
from lmlab.models.quant import (
    QuantLinear,
    calibration_windows,
    gptq,
    kernels_available,
    output_error,
    quantize_model,
    rtn,
    w8a8_available,
)
from lmlab.tokenizers import Tokenizer

TEXT = ("the cat sat on the mat. the dog sat on the log. a bird flew over the tree and sang a song. "
        "the fox ran into the wood, and the cat ran after the fox. ") * 30
FORMATS = [(8, None), (4, 32), (4, 64), (4, 128)]


def quant_linear(bits, group_size, n_out=40, n_in=256):
    """n_out = 40: not a multiple of 16, so the int4 kernel's row padding is exercised."""
    linear = nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
        linear.weight[3, 7] = 0.6  # an outlier, as trained weights have
    return linear, QuantLinear.from_quantized(linear, *rtn(linear.weight, bits, group_size), bits, group_size)


@pytest.fixture
def kernels_for_all_sizes(monkeypatch):
    """The test models are small enough that every linear would take the dequantised fp32 path."""
    monkeypatch.setattr(QuantLinear, "kernel_min_weights", 0)


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_matmuls_equal_a_dequantised_fp32_reference(bits, group_size, kernels_for_all_sizes, monkeypatch):
    """The weight-only kernels take bf16 activations and return bf16 outputs (fp32 accumulation): against
    x_bf16 @ Ŵ.T in fp32 each output is within 2^-8 of its magnitude (one bf16 rounding) plus 1e-3 of the
    largest output. The fallback (a cached dequantised weight, fp32 throughout) equals it to fp32 rounding.
    (int8's default kernel, with 8-bit activations, is test_int8_activations_are_quantized_per_row's.)"""
    monkeypatch.setattr(QuantLinear, "int8_activations", False)
    linear, q = quant_linear(bits, group_size)
    x = torch.randn(5, 3, 256)
    w_hat = q.dequantized()
    # Ŵ is the nearest grid point: within half a step of W (scale of the row or group)
    step = q.scales.float().repeat_interleave(q.group_size, dim=1)
    assert ((linear.weight - w_hat).abs() <= step / 2 + 1e-6).all()
    assert q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.qweight.shape == (40, 256 if bits == 8 else 128)
    with torch.no_grad():
        reference = x.bfloat16().float() @ w_hat.T + linear.bias
        exact = x @ w_hat.T + linear.bias
        if kernels_available(bits):
            assert q._prepared()[0] == f"int{bits}"
        y = q(x)
        assert y.shape == (5, 3, 40) and y.dtype == torch.float32
        tol = 2**-8 * reference.abs() + 1e-3 * reference.abs().max()
        assert ((y - reference).abs() <= tol).all(), float((y - reference).abs().max())
        QuantLinear.use_kernels = False
        try:
            assert q._prepared()[0] == "dequantised"
            torch.testing.assert_close(q(x), exact, rtol=1e-5, atol=1e-5)
        finally:
            QuantLinear.use_kernels = True
        rows = torch.tensor([5, 0, 39, 5])  # a tied embedding's lookups, from the packed weight...
        torch.testing.assert_close(q.rows(rows), w_hat[rows], rtol=0, atol=0)
        QuantLinear.kernel_min_weights = 40 * 256 + 1  # one weight more than this layer has
        assert q._prepared()[0] == "dequantised"
        torch.testing.assert_close(q(x), exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q.rows(rows), w_hat[rows], rtol=0, atol=0)  # ... and from the cached table


ENGINES = [pytest.param("vnni", True, marks=pytest.mark.skipif(
               not int8_cpu.supported(), reason="this CPU has no AVX-512 VNNI")),
           pytest.param("fbgemm", True, marks=pytest.mark.skipif(not w8a8_available(), reason="no FBGEMM")),
           pytest.param("fbgemm", False, marks=pytest.mark.skipif(not w8a8_available(), reason="no FBGEMM"))]


@pytest.mark.parametrize("engine,full_range", ENGINES)
def test_int8_activations_are_quantized_per_row(engine, full_range, kernels_for_all_sizes, monkeypatch):
    """int8's default kernel rounds each input row to a grid of its own (8 bits, or 7 where FBGEMM's int16
    pair sums could saturate) over [-max|x|, max|x|]: x̂ is within half a step (2 max|x| / 255 or / 127) of x,
    so each output is within half a step times the row's sum |Ŵ| of x @ Ŵ.T + b (plus fp32 rounding), and a
    row gives the same numbers alone as beside rows 100x larger (one grid for the batch would zero it). The
    same on lmlab's own op (8 bits: its dot products are exact) and on FBGEMM."""
    monkeypatch.setattr(quant, "_full_range_activations", lambda: full_range)
    monkeypatch.setattr(QuantLinear, "fused_int8", engine == "vnni")
    linear, q = quant_linear(8, None)
    x = torch.randn(6, 256) * torch.tensor([1e-3, 1, 1, 100, 7, 0.1])[:, None]
    x[2, 5] = 30.0  # an activation outlier: its row's grid is coarse, the others' are not
    x[4] = 0.0
    with torch.no_grad():
        assert q._prepared()[0] == ("int8 vnni" if engine == "vnni" else "int8 w8a8")
        y = q(x)
        exact = x @ q.dequantized().T + linear.bias
        step = 2 * x.abs().amax(1, keepdim=True) / (255 if full_range else 127)
        bound = step / 2 * q.dequantized().abs().sum(1) + 1e-5 * exact.abs()
        err = (y - exact).abs()
        assert (err <= bound).all(), float((err / bound).max())
        assert (err.amax(1) > 0.05 * bound.amax(1)).sum() >= 4  # the activations really are rounded
        torch.testing.assert_close(y[4], linear.bias, rtol=0, atol=0)  # a zero row gives the bias exactly
        for i in range(6):
            torch.testing.assert_close(q(x[i:i + 1])[0], y[i], rtol=0, atol=0)
        relative = (err / exact.abs().amax(1, keepdim=True)).amax(1)
        assert relative[0] < 0.02 and relative[1] < 0.02  # a small row keeps its own precision


@pytest.mark.skipif(not int8_cpu.supported(), reason="this CPU has no AVX-512 VNNI")
def test_lmlab_s_int8_op_equals_the_fbgemm_path_and_keeps_rows_apart(monkeypatch):
    """lmlab's own int8 op (one call: the rows' rounding, VNNI dot products, the scaling back) against the FBGEMM
    path it replaces: the same integers (FBGEMM's own rounding: x / max|x|, then one fp32 fma with its inverse
    scale and zero point), so the outputs agree to fp32 rounding of the last scaling (a row whose largest input
    was negative came out one step apart at that input while the op rounded it to -128: half of all rows).
    Shapes whose rows and columns are not multiples of the 16 x 4 blocks; 1 to 9 rows (the op takes 4 at a
    time); every row equal alone and in the batch, bit for bit, at 1 and 2 threads."""
    assert int8_cpu.kernel() is not None, int8_cpu.reason  # this machine has the CPU: the op must build
    torch.manual_seed(0)
    for n, k in [(40, 256), (37, 10), (17, 4), (5, 13), (300, 772)]:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scales = (torch.rand(n, 1) * 0.02 + 1e-3).bfloat16()
        b = torch.randn(n)
        ours, fbgemm = int8_cpu.linear_fn(q, scales, b), quant._w8a8(q, scales, b, reduce_range=False)
        w_hat = q.float() * scales.float()
        for m in (1, 3, 4, 9):
            x = torch.randn(m, k) * torch.logspace(-3, 2, m)[:, None]
            x[0, -1] = -2 * x[0].abs().max()  # a row whose largest |x| is negative
            y = ours(x)
            step = 2 * x.abs().amax(1, keepdim=True) / 255
            torch.testing.assert_close(y, fbgemm(x), rtol=1e-6, atol=1e-6 * float(y.abs().max()))
            exact = x @ w_hat.T + b  # and the grid's own error bound against fp32, as the test above
            assert ((y - exact).abs() <= step / 2 * w_hat.abs().sum(1) + 1e-5 * exact.abs() + 1e-6).all()
            threads = torch.get_num_threads()
            try:
                for t in (1, 2):
                    torch.set_num_threads(t)
                    assert torch.equal(ours(x), y)
                    assert all(torch.equal(ours(x[i:i + 1])[0], y[i]) for i in range(m))
            finally:
                torch.set_num_threads(threads)
    assert ours(torch.zeros(0, k)).shape == (0, n)
    assert ours(torch.randn(2, k).double()).dtype == torch.float64  # the caller's dtype back
    x = torch.randn(3, k)
    x[0, 5], x[2, -1] = float("nan"), float("inf")  # in the vector part and in the tail: NaN out, as x @ W.T
    y = ours(x)
    assert y[0].isnan().all() and y[2].isnan().all() and torch.equal(y[1], ours(x[1:2])[0])
    with pytest.raises(RuntimeError, match=f"an input of {k + 1} columns for a weight of {k}"):
        ours(torch.randn(1, k + 1))  # 773 pads to the same 776 columns: it was taken
    with pytest.raises(RuntimeError, match="not trained"):
        ours(torch.randn(1, k, requires_grad=True))


def test_a_build_killed_before_does_not_hang_the_next_and_a_long_wait_ends(tmp_path, monkeypatch):
    """torch's build leaves its lock file when killed (SIGTERM mid-build: measured), and every later build waited
    on it forever, with no message and no fallback. The build is now held by a flock (dropped with its process)
    and clears such a leftover; a build held by another process for longer than BUILD_WAIT_S is given up on."""
    import fcntl

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen = []

    def load_inline(name, build_directory, **kw):
        seen.append((Path(build_directory) / "lock").exists())
        return "built"
    monkeypatch.setattr(cpp_extension, "load_inline", load_inline)
    folder = Path(int8_cpu._build_directory("lmlab_int8_x", False))  # torch's folder under TORCH_EXTENSIONS_DIR
    assert folder.is_dir() and folder.parent == tmp_path
    monkeypatch.setattr(int8_cpu, "_build_directory", lambda name, verbose: str(folder))
    (folder / "lock").write_text("")  # what a killed build leaves
    assert int8_cpu._build() == "built" and seen == [False]
    monkeypatch.setattr(int8_cpu, "BUILD_WAIT_S", 0.3)
    with open(folder / "lmlab.flock", "a") as other:  # another process building now
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another process has been building it for 0 s"):
            int8_cpu._build()


@pytest.mark.skipif(not int8_cpu.supported(), reason="this CPU has no AVX-512 VNNI")
def test_a_bf16_bias_changed_in_place_is_used(kernels_for_all_sizes):
    """lmlab's int8 op keeps an fp32 copy of a bf16 bias: changed in place after the first call (load_state_dict),
    the copy is made again, as the FBGEMM path reads the live bias."""
    _, q = quant_linear(8, None)
    q = q.to(torch.bfloat16)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        before = q(x).float()
        q.bias.add_(100)
        torch.testing.assert_close(q(x).float() - before, torch.full_like(before, 100.0), rtol=0, atol=1.0)


def test_int8_falls_back_to_fbgemm_where_lmlab_s_op_cannot_be_built(monkeypatch, kernels_for_all_sizes):
    """No compiler (or no ninja, or no Python headers): kernel() says why and int8 runs on FBGEMM, with no error."""
    monkeypatch.setattr(int8_cpu, "_built", [])
    monkeypatch.setattr(int8_cpu, "supported", lambda: True)

    def fails():
        raise RuntimeError("Error building extension 'lmlab_int8'\ng++: command not found")
    monkeypatch.setattr(int8_cpu, "_build", fails)
    assert int8_cpu.kernel() is None and int8_cpu.reason == "its build failed: g++: command not found"
    _, q = quant_linear(8, None)
    if w8a8_available():
        assert q._prepared()[0] == "int8 w8a8"
    monkeypatch.setattr(int8_cpu, "_built", [])
    monkeypatch.setenv("LMLAB_INT8_KERNEL", "fbgemm")
    assert int8_cpu.kernel() is None and int8_cpu.reason == "LMLAB_INT8_KERNEL=fbgemm"


@pytest.mark.parametrize("engine,_", ENGINES[:2])
def test_int8_input_buffers_serve_any_thread_and_mode(engine, _, kernels_for_all_sizes, monkeypatch):
    """FBGEMM's scaled input goes into a buffer kept per thread and shape (decoding reuses it every step): a
    buffer first made in inference mode still takes a call outside it, and threads decoding at once each get
    their own rows' numbers, the ones a call alone gives. The same of lmlab's own op (its buffers are its own)."""
    import threading

    monkeypatch.setattr(QuantLinear, "fused_int8", engine == "vnni")
    _, q = quant_linear(8, None)
    xs = [torch.randn(1, 256) * (i + 1) for i in range(4)]
    with torch.no_grad():
        alone = [q(x) for x in xs]
    three = torch.cat(xs[:3])  # a shape no call has made a buffer for yet
    with torch.inference_mode():
        first = q(three)
    torch.testing.assert_close(q(three), first, rtol=0, atol=0)  # grad mode on: no write to inference tensors
    torch.testing.assert_close(first, torch.cat(alone[:3]), rtol=0, atol=0)
    wrong: list[int] = []

    def decode(i: int) -> None:
        with torch.no_grad():
            for _ in range(300):
                if not torch.equal(q(xs[i]), alone[i]):
                    wrong.append(i)
    threads = [threading.Thread(target=decode, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_gptq_beats_round_to_nearest_on_layer_output_error():
    """GPTQ's objective, ||W X - Ŵ X||², on correlated inputs (as a model's activations are): GPTQ's error
    is well below RTN's at every format, with the same grid constraints (checked by dequantising)."""
    torch.manual_seed(0)
    K, N, n = 128, 64, 2048
    mix = torch.randn(K, K) * (torch.rand(K) ** 3)[:, None]   # a few directions carry most of the variance
    X = torch.randn(n, K) @ mix + 0.1 * torch.randn(n, K)
    H = 2 / n * X.T @ X
    w = torch.randn(N, K) * 0.05
    for bits, group_size in FORMATS:
        linear = nn.Linear(K, N, bias=False)
        q_r, s_r, z_r = rtn(w, bits, group_size)
        q_g, s_g, z_g = gptq(w, H, bits, group_size)
        err = {}
        for name, (q, s, z) in {"rtn": (q_r, s_r, z_r), "gptq": (q_g, s_g, z_g)}.items():
            m = QuantLinear.from_quantized(linear, q, s, z, bits, group_size)
            torch.testing.assert_close(m.integers(), q)  # integers in range survive packing
            err[name] = output_error(w, m.dequantized(), H)
        direct = ((X @ w.T - X @ m.dequantized().T) ** 2).sum() / n   # the objective, from X itself
        assert abs(direct / err["gptq"] - 1) < 1e-3
        assert err["gptq"] < 0.5 * err["rtn"], (bits, group_size, err)


def fit(model, tok, steps=60):
    """A few AdamW steps on TEXT: a model whose greedy text is not one token repeated (test_interop_gguf too)."""
    ids = torch.tensor(tok.encode(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,)).tolist()
        batch = torch.stack([ids[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = fit(Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=tok.vocab_size + 3, block_size=128)), tok)
    (tmp / "book.txt").write_text(TEXT)
    return save_pretrained(tmp / "fp32", model.eval(), tok), tmp


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["--to", "int8"], ["--to", "int4", "--group-size", "64", "--keep-head"],
                                  ["--to", "int4", "--method", "gptq", "--calibration", "BOOK"]])
def test_a_quantized_model_saves_loads_and_generates(capsys, trained_dir, argv, kernels_for_all_sizes):
    src, tmp = trained_dir
    out = tmp / "-".join(a.strip("-") for a in argv if "BOOK" not in a)
    argv = [str(tmp / "book.txt") if a == "BOOK" else a for a in argv]
    code, printed, err = run(capsys, "quantize", src, "--out", out, *argv)
    assert code == 0, err
    qc = json.loads((out / "quantization.json").read_text())
    bits, keep = (8 if "int8" in argv else 4), "--keep-head" in argv
    assert (qc["bits"], qc["method"], qc["source"]) == (bits, "gptq" if "gptq" in argv else "rtn", str(src.resolve()))
    assert qc["group_size"] == {8: None, 4: 64 if "64" in argv else 32}[bits]
    assert ("lm_head" in qc["modules"]) != keep and len(qc["modules"]) == 4 * 2 + (not keep)
    assert ("tok_emb.weight" in qc["kept_fp32"]) == keep  # tied: the embedding reads the quantized head
    if "gptq" in argv:
        assert qc["calibration"]["documents"] == ["book.txt"] and "gptq" in printed
    # the same model, made in memory, gives the loaded directory's logits exactly
    fp32, tok = load_pretrained(src)
    windows = calibration_windows([str(tmp / "book.txt")], tok, 128, 32768)[0] if qc["method"] == "gptq" else None
    expected, _, _ = quantize_model(load_pretrained(src)[0], bits, qc["group_size"], method=qc["method"],
                                    keep_head=keep, calibration=windows)
    loaded, tok2 = lmlab.load(out)
    assert tok2 is not None and all(isinstance(loaded.get_submodule(n), QuantLinear) for n in qc["modules"])
    idx = torch.tensor([tok.encode("the fox ran into the wood")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, expected(idx).logits, rtol=0, atol=0)
        gap = (loaded(idx).logits - fp32(idx).logits).abs().max() / fp32(idx).logits.abs().max()
    assert 0 < gap < (0.05 if bits == 8 else 0.3)  # quantized, and still the same model
    assert (out / "model.safetensors").stat().st_size < (0.45 if bits == 8 else 0.35) * (
        src / "model.safetensors").stat().st_size
    prompt = tok.encode("the cat")
    ours = generate_ids(loaded, [prompt], max_new_tokens=24, do_sample=False, eos_token_id=None)[0]
    assert ours == generate_ids(expected, [prompt], max_new_tokens=24, do_sample=False, eos_token_id=None)[0]
    code, printed, err = run(capsys, "generate", out, "--prompt", "the cat", "--greedy", "--max-new-tokens", "24",
                             "--ignore-eos", "--no-stream")
    assert code == 0 and printed.strip() == "the cat" + tok.decode(ours), (printed, err)


def test_info_tells_a_quantized_model_and_its_config_is_checked(trained_dir, tmp_path, capsys):
    """`lmlab info` described a quantized model as its fp32 source (fp32 weights, a training-memory line); a
    quantization.json with bits "8" said "bits (8) must be 8 or 4", and modules "lm_head" named layers l, m, ..."""
    from lmlab.models.quant import QuantConfig
    src, _ = trained_dir
    out = tmp_path / "q4"
    assert main(["quantize", str(src), "--to", "int4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("quantized:         int4 g32 rtn, 9 linears, head int4;")
    assert lines[4].startswith("inference memory:") and "stored weights" in lines[4]
    assert lines[5] == f"training memory:   - (a quantized model does not train; train the model it was made " \
                       f"from: {src.resolve()})"
    with pytest.raises(ValueError, match=r"bits \('8'\) must be 8 or 4"):
        QuantConfig(bits="8")
    with pytest.raises(ValueError, match="modules must be a list of tensor names, not 'lm_head'"):
        QuantConfig(bits=8, modules="lm_head")


def test_calibration_tokenizes_only_what_its_windows_need(tmp_path):
    """GPTQ's calibration tokenized every book whole, keeping each token as a Python int (2.9 GB for a 17 MB book,
    to use 1024 tokens); from books larger than its windows need, each window is now tokenized from a slice at
    evenly spaced places, over every book, one book in memory at a time."""
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    for word in ("cat", "dog"):
        (tmp_path / f"{word}.txt").write_text(f"the {word} sat on the mat and sang a song. " * 20_000)  # 0.8 MB
    seen = []
    encode = tok.encode
    tok.encode = lambda text: seen.append(len(text)) or encode(text)
    windows, names = calibration_windows([str(tmp_path)], tok, 64, 8 * 64)
    assert windows.shape == (8, 64) and names == ["cat.txt", "dog.txt"]
    assert sum(seen) < 20 * 8 * 64  # characters tokenized: the windows' slices, not the 1.6 MB
    text = {w: encode(f"the {w} sat on the mat and sang a song. " * 40) for w in ("cat", "dog")}
    for row, word in zip(windows.tolist(), ["cat"] * 4 + ["dog"] * 4):  # each a stretch of its own book
        assert any(text[word][k:k + 64] == row for k in range(len(text[word]) - 64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no documents .* in the folder"):  # it said "0 tokens"
        calibration_windows([str(tmp_path / "empty")], tok, 64, 512)


def test_a_quantized_tied_head_loads_in_bf16_and_fp16(trained_dir, tmp_path):
    """The embedding of a tied, quantized head gave fp32 rows whatever the model's dtype: `lmlab.load(...,
    dtype=torch.bfloat16)` failed at its first norm (mixed dtype). Now its rows follow the model's dtype, in the
    forward and in the fast decoder."""
    src, tmp = trained_dir
    out = tmp_path / "q8"
    assert main(["quantize", str(src), "--to", "int8", "--out", str(out)]) == 0
    fp32, tok = lmlab.load(out)
    idx = torch.tensor([tok.encode("the fox ran into the wood")])
    prompt = tok.encode("the cat")
    with torch.no_grad():
        want = fp32(idx).logits
        for dtype in (torch.bfloat16, torch.float16):
            model, _ = lmlab.load(out, dtype=dtype)
            got = model(idx).logits
            assert got.dtype == dtype and model.tok_emb(idx).dtype == dtype
            assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
            assert len(generate_ids(model, [prompt], max_new_tokens=8, do_sample=False, eos_token_id=None)[0]) == 8

@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("bits,group_size,keep", [(8, None, False), (4, 32, False), (4, 32, True)])
def test_the_fast_decoder_runs_the_quantized_model(family, bits, group_size, keep, kernels, monkeypatch):
    """Decoder steps (the batch-1 generation path, where speed is measured) give the full forward's logits
    at every position, left-padded batches included, on the kernels and on the cached dequantised weights
    of small matrices; without the quantized linears in the Decoder it would read fp32 weights the model no
    longer has."""
    if kernels:
        monkeypatch.setattr(QuantLinear, "kernel_min_weights", 0)
    kv = {"n_kv_head": 2} if family == "llama" else {}
    cfg = ModelConfig.preset(f"{family}-tiny", vocab_size=301, block_size=64, **kv)
    model, _, _ = quantize_model(Transformer(cfg).eval(), bits, group_size, keep_head=keep)
    step = fast.decoder(model)
    assert step is not None
    idx = torch.randint(0, 301, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    pos = Transformer.positions_from_mask(mask)
    with torch.no_grad():
        full = model(idx, attention_mask=mask, position_ids=pos).logits
        cache = KVCache(cfg, 2)
        steps = torch.stack([step(idx[:, i:i + 1], cache, mask[:, :i + 1], pos[:, i:i + 1]) for i in range(12)], 1)
    real = mask.bool()
    torch.testing.assert_close(steps[real], full[real], rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_in_one_line(capsys, trained_dir):
    src, tmp = trained_dir

    def fails(match, *argv):
        code, out, err = run(capsys, "quantize", src, *argv)
        assert code == 2, (out, err)
        assert err.startswith("lmlab: error: ") and err.count("\n") == 1 and match in err, err

    fails("--to 'int3' is not a format", "--to", "int3", "--out", tmp / "x")
    fails("--group-size must be one of 32, 64, 128", "--to", "int4", "--group-size", "48", "--out", tmp / "x")
    fails("--group-size is for int4", "--to", "int8", "--group-size", "32", "--out", tmp / "x")
    fails("--method 'awq' is not a method", "--to", "int4", "--method", "awq", "--out", tmp / "x")
    fails("--method gptq needs --calibration", "--to", "int4", "--method", "gptq", "--out", tmp / "x")
    assert not (tmp / "x").exists()
    wide = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=303, n_embd=96, n_head=4))
    save_pretrained(tmp / "wide", wide.eval(), Tokenizer.train([TEXT], kind="bpe", vocab_size=300))
    code, _, err = run(capsys, "quantize", tmp / "wide", "--to", "int4", "--group-size", "64", "--out", tmp / "x")
    assert code == 2 and "--group-size 64 does not divide blocks.0.attn.qkv's 96 input columns" in err, err
    assert not (tmp / "x").exists()
    (tmp / "taken").mkdir()
    (tmp / "taken" / "mine.txt").write_text("keep me")
    fails("already exists", "--to", "int8", "--out", tmp / "taken")
    assert [p.name for p in (tmp / "taken").iterdir()] == ["mine.txt"]
    assert run(capsys, "quantize", src, "--to", "int8", "--out", tmp / "q8")[0] == 0
    code, _, err = run(capsys, "export", "gguf", tmp / "q8", tmp / "q8.gguf")
    assert code == 2 and "is an lmlab int8/int4 model" in err, err
    code, _, err = run(capsys, "quantize", tmp / "q8", "--to", "int4", "--out", tmp / "q4")
    assert code == 2 and "already quantized" in err, err
    code, _, err = run(capsys, "train", tmp / "book.txt", "--init", tmp / "q8", "--out", tmp / "run", "--max-steps", 1)
    assert code == 2 and "is an int8/int4 model, which cannot train" in err and not (tmp / "run").exists(), err
    assert not list(tmp.glob(".*.tmp"))


def test_no_run_on_the_trainer_takes_a_quantized_model(capsys, trained_dir, tmp_path):
    """The Trainer refuses it, so every command that trains does (tune dpo trained the norms alone and wrote a
    final/ no loader reads before the check moved there from `lmlab train`)."""
    src, tmp = trained_dir
    assert run(capsys, "quantize", src, "--to", "int8", "--out", tmp_path / "q8")[0] == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the cat", "chosen": " sat on the mat.", "rejected": " ran."}) + "\n")
    code, _, err = run(capsys, "tune", "dpo", "--model", tmp_path / "q8", "--data", pairs, "--out", tmp_path / "run",
                       "--max-steps", 1, "--ref-cache", "none")
    assert code == 2 and "is an int8/int4 model, which cannot train" in err, err
