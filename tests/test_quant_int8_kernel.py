"""The AVX2 int8 kernel: the weight split keeps every int16 lane exact, the kernel equals the exact
integer product with the runtime's rescaling bit for bit, and the INT8 runtime picks it where it should."""

import platform

import pytest
import torch

from hf_quantizable.modeling import int8, int8_kernel
from hf_quantizable.modeling.int8 import Int8Linear, int8_gemm_saturates, integer_matmul_reference
from hf_quantizable.modeling.int8_kernel import PackedInt8Weight, load_avx2_kernel, split_for_int16_lanes


def expected_avx2_route() -> bool:
    """Whether the INT8 runtime must run the AVX2 kernel here (x86 with AVX2, an int8 GEMM that saturates)."""
    capable = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    )
    return capable and int8_gemm_saturates()


@pytest.fixture(scope="module")
def kernel():
    if not expected_avx2_route():
        pytest.skip("the AVX2 kernel runs on x86 CPUs with AVX2 whose int8 GEMM saturates")
    module = load_avx2_kernel()
    assert module is not None, "the AVX2 int8 kernel did not build (see the logged warning)"
    return module


def _pair_loads(weight: torch.Tensor) -> torch.Tensor:
    """`[N, K / 2, 2]`: per input pair `(2i, 2i + 1)` of each output, the sum of its positive and of its
    negative weight magnitudes (what `vpmaddubsw` adds in one int16)."""
    pairs = weight.int().reshape(weight.shape[0], -1, 2)
    return torch.stack([pairs.clamp(min=0).sum(-1), (-pairs).clamp(min=0).sum(-1)], -1)


@pytest.mark.parametrize("max_code", [255, 63])
def test_split_keeps_pairs_exact_and_rebuilds_the_weight(max_code):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (24, 37), generator=generator, dtype=torch.int8)
    dense, rows, columns, values = split_for_int16_lanes(weight, max_code)
    assert dense.shape == (24, 40)  # K padded to a multiple of 8 with zero weights
    assert not dense[:, 37:].any()
    rebuilt = dense[:, :37].int().clone()
    rebuilt[rows, columns] += values
    assert torch.equal(rebuilt, weight.int())
    assert (max_code * _pair_loads(dense) <= 32767).all()
    # Entries come only from pairs over the limit, one per such pair (its larger weight).
    over = (max_code * _pair_loads(torch.nn.functional.pad(weight, (0, 3))) > 32767).any(-1)
    assert len(values) == int(over.sum())
    assert (len(values) > 0) == (max_code == 255)  # 6-bit codes: 63 * 2 * 127 fits in int16


def test_split_leaves_small_weights_alone():
    weight = torch.randint(-64, 65, (16, 64), dtype=torch.int8)  # 255 * 2 * 64 < 32767
    dense, rows, _, _ = split_for_int16_lanes(weight, 255)
    assert torch.equal(dense, weight) and rows.numel() == 0


@pytest.mark.parametrize(
    ("low", "high", "some_safe", "all_safe"), [(-60, 61, True, False), (-127, 128, False, False), (-20, 21, True, True)]
)
def test_pairing_keeps_safe_steps_in_int16(kernel, low, high, some_safe, all_safe):
    """Every quad is used once per block, the packed bytes are the weights, and in the safe steps (the
    first of each block) the two quads' pair sums fit in int16 for every code up to 255."""
    generator = torch.Generator().manual_seed(3)
    n, k, limit = 40, 96, 32767 // 255
    dense = split_for_int16_lanes(torch.randint(low, high, (n, k), generator=generator, dtype=torch.int8), 255)[0]
    packed, offsets, safe = kernel.pack_weight(dense, limit)
    steps, blocks = k // 8, -(-n // 16)
    packed = packed.reshape(blocks, steps, 2, 2, 8, 4)  # block, step, quad of the step, half, column, byte
    quads = offsets.reshape(blocks, steps, 2).long() // 4
    padded = torch.nn.functional.pad(dense, (0, 0, 0, 16 * blocks - n)).reshape(blocks, 2, 8, k // 4, 4)
    loads = _pair_loads(padded.reshape(blocks * 16, k)).reshape(
        blocks, 16, k // 4, 2, 2
    )  # block, column, quad, pair, sign
    for block in range(blocks):
        assert sorted(quads[block].flatten().tolist()) == list(range(k // 4))
        expected = padded[block][:, :, quads[block]].permute(
            2, 3, 0, 1, 4
        )  # step, quad of the step, half, column, byte
        assert torch.equal(packed[block], expected)
        lanes = loads[block][:, quads[block, : safe[block]]].sum(2)  # column, safe step, pair, sign
        assert (lanes <= limit).all()
    assert bool((safe > 0).any()) == some_safe and bool((safe == steps).all()) == all_safe


@pytest.mark.parametrize(
    ("rows", "k", "n", "bits", "low", "high", "per_channel", "bias"),
    [
        (37, 64, 48, 8, -127, 128, True, True),  # many split entries, quads widened one by one
        (21, 96, 40, 8, -60, 61, False, True),  # safe and unsafe steps
        (5, 13, 7, 8, -127, 128, False, False),  # every tail: rows, K not a multiple of 8, N below 16
        (130, 200, 33, 8, -30, 31, True, True),  # no entries; several row chunks
        (64, 96, 20, 6, -127, 128, False, True),  # 6-bit codes: a looser limit
        (1, 8, 16, 8, 127, 128, False, False),  # all weights 127: every lane over the limit
    ],
)
def test_kernel_equals_exact_product_and_rescaling(kernel, rows, k, n, bits, low, high, per_channel, bias):
    generator = torch.Generator().manual_seed(1)
    max_code = 2**bits - 1
    weight = torch.randint(low, high, (n, k), generator=generator, dtype=torch.int8)
    codes = torch.randint(0, max_code + 1, (rows, k), generator=generator, dtype=torch.uint8)
    codes[0] = max_code  # the largest products
    zero_point = 37 % (max_code + 1)
    input_scale = torch.tensor(0.05)
    weight_scale = torch.rand(n, generator=generator) * 0.01 if per_channel else torch.tensor(0.003)
    bias_values = torch.randn(n, generator=generator) if bias else None
    packed = PackedInt8Weight(kernel, weight, max_code)
    exact = integer_matmul_reference(codes, torch.tensor(float(zero_point)), weight)
    # The runtime's rescaling (`rescale_accumulator`): the same float operations.
    expected = int8.rescale_accumulator(exact.clone(), input_scale, weight_scale, bias_values)
    got = packed.linear(codes, zero_point, input_scale * weight_scale, bias_values)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.equal(got, expected)


def test_int8_linear_routes_agree_bit_for_bit(kernel, monkeypatch):
    torch.manual_seed(0)
    layer = Int8Linear(96, 40, bias=True, per_channel=True, has_input_quant=True, input_bits=8, outlier_channels=2)
    layer.weight.copy_(torch.randint(-127, 128, (40, 96), dtype=torch.int8))
    layer.weight_scale.copy_(torch.rand(40) * 0.01)
    layer.bias.copy_(torch.randn(40))
    layer.input_scale.fill_(0.05)
    layer.input_zero_point.fill_(120)
    layer.outlier_channels.copy_(torch.tensor([5, 70]))
    layer.outlier_scale.fill_(0.7)
    x = (torch.randint(0, 256, (3, 11, 96)).float() - 120) * 0.05
    outputs = {}
    for choice in ("avx2", "onednn"):
        monkeypatch.setenv(int8_kernel.ENV_VAR, choice)
        assert (layer.avx2_weight() is not None) == (choice == "avx2")
        outputs[choice] = layer(x.clone())
    assert outputs["avx2"].shape == (3, 11, 40)
    assert torch.equal(outputs["avx2"], outputs["onednn"])


def test_weight_changes_repack(kernel, monkeypatch):
    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    layer = Int8Linear(16, 16, bias=False, per_channel=False, has_input_quant=True, input_bits=8)
    first = layer.avx2_weight()
    layer.weight.fill_(3)
    second = layer.avx2_weight()
    assert second is not first and torch.equal(second.column_sums, torch.full((16,), 48, dtype=torch.int32))


def test_unknown_kernel_choice_is_refused(monkeypatch):
    monkeypatch.setenv(int8_kernel.ENV_VAR, "vnni")
    layer = Int8Linear(8, 8, bias=False, per_channel=False, has_input_quant=True, input_bits=8)
    with pytest.raises(ValueError, match=r"HF_QUANTIZABLE_INT8_KERNEL='vnni'.*auto, avx2, onednn"):
        layer(torch.zeros(2, 8))


def test_build_failure_falls_back_to_onednn(monkeypatch, caplog):
    """Without a compiler the runtime still works (oneDNN), and says why once."""
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(int8_kernel, "_cpu_has_avx2", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    load_avx2_kernel.cache_clear()
    try:
        layer = Int8Linear(8, 4, bias=False, per_channel=False, has_input_quant=True, input_bits=8)
        layer.weight.fill_(1)
        with caplog.at_level("WARNING"):
            out = layer(torch.ones(2, 8))
        assert layer.avx2_weight() is None
        assert torch.equal(out, torch.full((2, 4), 8.0))
        assert "no C++ compiler" in caplog.text and "using oneDNN" in caplog.text
    finally:
        load_avx2_kernel.cache_clear()


def test_fused_fake_quantize_equals_the_torch_operations(kernel):
    generator = torch.Generator().manual_seed(2)
    scale, zero_point, levels = 0.0173, 131, 255
    x = torch.randn(3, 1001, generator=generator) * 2
    x[0, :50] = (torch.arange(50) - 25 + 0.5) * scale  # halfway points: round half to even
    x[0, 50:53] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x[1, :4] = torch.tensor([1e6, -1e6, 0.0, -0.0])
    expected = x.div(scale).round_().clamp_(-zero_point, levels - zero_point).mul_(scale)
    got = int8_kernel.fake_quantize(kernel, x, scale, zero_point, levels)
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and torch.equal(got.isnan(), expected.isnan())
    assert int8_kernel.fake_quantize(kernel, x.t(), scale, zero_point, levels) is None  # not contiguous
    with torch.enable_grad():
        assert int8_kernel.fake_quantize(kernel, x.requires_grad_(), scale, zero_point, levels) is None


def test_pooled_output_is_written_again_only_when_nothing_else_holds_it(kernel):
    """The fused fake-quant writes into an earlier output only when no reference, view or alias of it
    is left (and never with autograd on); what a caller still holds never changes."""
    pool = int8_kernel.OutputPool()
    first, second = torch.randn(4, 16), torch.randn(4, 16)

    def run(x):
        return int8_kernel.fake_quantize(kernel, x, 0.05, 7, 255, pool)

    def expected(x):
        return x.div(0.05).round_().clamp_(-7, 248).mul_(0.05)

    with torch.no_grad():
        held = run(first)
        address = held.data_ptr()
        held.note = "previous life"
        del held
        again = run(second)
        assert again.data_ptr() == address and not hasattr(again, "note")  # recycled, attributes dropped
        assert torch.equal(again, expected(second))
        for keep in (lambda t: t, lambda t: t[1:], lambda t: t.numpy(), lambda t: t.detach()):
            kept = keep(again)
            snapshot = torch.as_tensor(kept).clone()
            del again
            again = run(first)
            assert again.data_ptr() != torch.as_tensor(kept).data_ptr()
            assert torch.equal(torch.as_tensor(kept), snapshot)
            del kept
    address = again.data_ptr()
    del again
    with torch.enable_grad():
        assert run(second).data_ptr() != address


def test_pooled_activation_does_not_reuse_stale_codes(kernel, monkeypatch):
    """An Int8Linear caches the uint8 codes of its input on the tensor; an activation written into the
    same buffer must not hand the previous forward's codes to the next one."""
    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    torch.manual_seed(0)
    quantizer = int8.Int8ActivationQuantizer(bits=8)
    quantizer.scale.fill_(0.05)
    quantizer.zero_point.fill_(100)
    layer = Int8Linear(32, 24, bias=True, per_channel=False, has_input_quant=True, input_bits=8)
    layer.weight.copy_(torch.randint(-127, 128, (24, 32), dtype=torch.int8))
    layer.bias.copy_(torch.randn(24))
    layer.input_scale.fill_(0.05)
    layer.input_zero_point.fill_(100)
    first, second = torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad():
        activation = quantizer(first)
        address = activation.data_ptr()
        first_output = layer(activation)  # caches the codes of `first` on the activation
        del activation
        activation = quantizer(second)
        assert activation.data_ptr() == address  # the same buffer, now holding `second`
        assert torch.equal(layer(activation), layer(activation.clone()))  # a clone has no cached codes
        assert torch.equal(first_output, layer(quantizer(first).clone()))


@pytest.mark.parametrize("bits", [8, 6])
def test_quantizer_writes_the_codes_its_linear_reads(kernel, monkeypatch, bits):
    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    torch.manual_seed(0)
    quantizer = int8.Int8ActivationQuantizer(bits=bits)
    layer = Int8Linear(32, 24, bias=True, per_channel=False, has_input_quant=True, input_bits=bits)
    layer.output_pool = quantizer.output_pool
    layer.weight.copy_(torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (24, 32), dtype=torch.int8))
    for module in (quantizer, layer):
        module.get_buffer("scale" if module is quantizer else "input_scale").fill_(0.05)
        module.get_buffer("zero_point" if module is quantizer else "input_zero_point").fill_(20)
    x = torch.randn(6, 32) * 2
    with torch.no_grad():
        first = quantizer(x)
        assert not quantizer.emit_codes and not hasattr(first, int8._CODES)
        expected = layer(first)  # computes the codes itself, then asks the quantizer for them
        assert quantizer.emit_codes
        second = quantizer(x)
        grid, codes = getattr(second, int8._CODES)
        assert grid == (0.05000000074505806, 20.0) and codes.dtype == torch.uint8
        assert torch.equal(codes, int8.grid_codes(first, quantizer.scale, quantizer.zero_point, bits))
        assert torch.equal(second, first) and torch.equal(layer(second), expected)
        layer.input_zero_point.fill_(21)  # another grid: the written codes are not the layer's
        assert torch.equal(layer(second), layer(second.clone()))


def test_int8_modules_share_one_pool_and_recycle_safely(kernel, monkeypatch):
    import copy
    import pickle

    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    layer = Int8Linear(16, 8, bias=False, per_channel=False, has_input_quant=True, input_bits=8)
    layer.weight.copy_(torch.randint(-127, 128, (8, 16), dtype=torch.int8))
    xs = [(torch.randint(0, 256, (2, 3, 16)).float() - 128) for _ in range(3)]
    with torch.no_grad():
        held = layer(xs[0])
        snapshot = held.clone()
        address = layer(xs[1]).data_ptr()  # a new output: the first one is still held
        assert address != held.data_ptr() and torch.equal(held, snapshot)
        assert layer(xs[2]).data_ptr() == address  # the second was released: written again
        del held
        assert torch.equal(layer(xs[0]), snapshot)
    # One size, two buffers: the one still held above and the one written again since.
    assert [len(buffers) for buffers in layer.output_pool._buffers.values()] == [2]
    clone = copy.deepcopy(layer)
    assert clone.output_pool._buffers == {} and torch.equal(clone(xs[0]), snapshot)
    assert pickle.loads(pickle.dumps(layer)).avx2_weight() is not None
    model = torch.nn.Sequential(int8.QuantPoint(), torch.nn.Linear(16, 8))
    int8.convert_to_int8(
        model,
        {"quantized_linears": {"1": True}, "quantized_activations": ["0"], "activation_bits": 8},
    )
    assert model[0].output_pool is model[1].output_pool


def _on_grid(shape: tuple[int, ...], grid: int8.TensorGrid) -> torch.Tensor:
    """A random activation on `grid` (as its quantizer outputs it)."""
    codes = torch.randint(0, grid.levels + 1, shape)
    return (codes - grid.zero_point).float() * grid.scale


@pytest.mark.parametrize(
    ("batch", "heads", "rows", "k", "cols", "product"),
    [
        (2, 3, 128, 64, 128, "scores"),  # Q.K^T of [B, T, H, d] projections, read in place
        (2, 3, 128, 128, 64, "context"),  # P.V, written heads-last
        (1, 2, 7, 9, 5, "scores"),  # odd K, a partial tile of rows and of columns
        (1, 2, 6, 33, 19, "context"),
        (2, 1, 5, 300, 8, "context"),  # partial sums over 2^24: float64 in the torch route
    ],
)
def test_grid_products_equal_the_exact_integer_product(kernel, monkeypatch, batch, heads, rows, k, cols, product):
    a_grid, b_grid = int8.TensorGrid(0.031, 117, 255), int8.TensorGrid(0.027, 200, 255)
    if product == "scores":  # a [B, H, M, K], b = key^T [B, H, K, N], both strided views of [B, T, H, d]
        a = _on_grid((batch, rows, heads, k), a_grid).transpose(1, 2)
        b = _on_grid((batch, cols, heads, k), b_grid).transpose(1, 2).transpose(-1, -2)
    else:  # a = probabilities [B, H, M, K] (contiguous), b = value [B, H, K, N] (a view of [B, K, H, N])
        a = _on_grid((batch, heads, rows, k), a_grid)
        b = _on_grid((batch, k, heads, cols), b_grid).transpose(1, 2)
    out_scale = a_grid.scale * b_grid.scale * 0.125
    steps = (a / a_grid.scale).round().double() @ (b / b_grid.scale).round().double()
    expected = steps.float().mul_(out_scale)
    outputs = {}
    for choice in ("avx2", "onednn"):  # the kernel, and the torch operations of the simulation elsewhere
        monkeypatch.setenv(int8_kernel.ENV_VAR, choice)
        with torch.no_grad():
            outputs[choice] = int8.grid_matmul(a, a_grid, b, b_grid, out_scale, heads_last=product == "context")
        assert torch.equal(outputs[choice], expected), choice
    if product == "context":  # heads-last memory: merging the heads is a view
        assert outputs["avx2"].transpose(1, 2).is_contiguous()


def test_int8_model_routes_agree_bit_for_bit(kernel, monkeypatch):
    from hf_quantizable.quantization import W8A8Config, quantize_model
    from hf_quantizable.quantization.export import build_int8_model
    from tests.test_quant_core import tiny_model

    model, batches = tiny_model("opt", "clipped_softmax")
    simulated = quantize_model(model, W8A8Config(num_calibration_batches=2), batches)
    int8_model = build_int8_model(simulated)
    outputs = []
    for choice in ("avx2", "onednn"):  # the integer attention products (and GEMMs) in the kernel, or in torch
        monkeypatch.setenv(int8_kernel.ENV_VAR, choice)
        with torch.no_grad():
            outputs.append(int8_model(**batches[0]).logits)
    assert torch.equal(outputs[0], outputs[1])
