"""The AVX2 int8 kernel: the weight split keeps every int16 lane exact, the kernel equals the exact
integer product with the runtime's rescaling bit for bit, and the INT8 runtime picks it where it should.

The kernel tests run on every x86 CPU with AVX2 (the `kernel` fixture builds the ops and the tests
force the route), also where `auto` would not choose the kernel (CPUs with VNNI)."""

import pytest
import torch

from hf_quantizable.modeling import int8, int8_kernel
from hf_quantizable.modeling.int8 import Int8Linear, integer_matmul_reference
from hf_quantizable.modeling.int8_kernel import (
    PackedInt8Weight,
    build_kernel,
    cpu_has_avx2,
    package_kernel_source,
    split_for_int16_lanes,
)


@pytest.fixture(scope="module")
def kernel():
    """`torch.ops.hf_quantizable`, built from the package's source on any x86 CPU with AVX2."""
    if not cpu_has_avx2():
        pytest.skip("the AVX2 kernel needs an x86 CPU with AVX2")
    assert build_kernel(package_kernel_source()), "the AVX2 int8 kernel did not build (see the logged warning)"
    return torch.ops.hf_quantizable


GEMM_PATHS = ["int16", "vnni"]  # the kernel's two GEMMs: vpmaddubsw pairs (any AVX2 CPU) and vpdpbusd


def packed_weight(path: str, weight: torch.Tensor, max_code: int) -> PackedInt8Weight:
    """`weight` packed for the kernel's GEMM `path` (skipped where the CPU lacks VNNI)."""
    if path == "vnni" and not int8_kernel.vnni_available():
        pytest.skip("the VNNI GEMM needs a CPU with AVX512-VNNI")
    return PackedInt8Weight(weight, max_code, vnni=path == "vnni")


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
    unpadded = split_for_int16_lanes(weight, max_code, padded=False)  # oneDNN's and the ONNX export's
    assert torch.equal(unpadded[0], dense[:, :37]) and all(map(torch.equal, unpadded[1:], (rows, columns, values)))


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
        (150, 2056, 24, 8, -127, 128, True, True),  # a wide input: shorter row chunks, entries in each
        (64, 96, 20, 6, -127, 128, False, True),  # 6-bit codes: a looser limit
        (1, 8, 16, 8, 127, 128, False, False),  # all weights 127: every lane over the limit
    ],
)
@pytest.mark.parametrize("path", GEMM_PATHS)
def test_kernel_equals_exact_product_and_rescaling(kernel, path, rows, k, n, bits, low, high, per_channel, bias):
    generator = torch.Generator().manual_seed(1)
    max_code = 2**bits - 1
    weight = torch.randint(low, high, (n, k), generator=generator, dtype=torch.int8)
    codes = torch.randint(0, max_code + 1, (rows, k), generator=generator, dtype=torch.uint8)
    codes[0] = max_code  # the largest products
    zero_point = 37 % (max_code + 1)
    input_scale = torch.tensor(0.05)
    weight_scale = torch.rand(n, generator=generator) * 0.01 if per_channel else torch.tensor(0.003)
    bias_values = torch.randn(n, generator=generator) if bias else None
    packed = packed_weight(path, weight, max_code)
    exact = integer_matmul_reference(codes, torch.tensor(float(zero_point)), weight)
    # The runtime's rescaling (`rescale_accumulator`): the same float operations.
    expected = int8.rescale_accumulator(exact.clone(), input_scale, weight_scale, bias_values)
    got = packed.linear(codes, zero_point, input_scale * weight_scale, bias_values)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.equal(got, expected)


def test_vnni_packs_the_whole_weight(kernel):
    """With VNNI nothing saturates: no entries split off, where the int16 GEMM needs many."""
    weight = torch.full((16, 64), 127, dtype=torch.int8)
    assert packed_weight("int16", weight, 255).entry_values.numel() > 0
    vnni = packed_weight("vnni", weight, 255)
    assert vnni.entry_values.numel() == 0 and torch.equal(vnni.column_sums, weight.sum(1, dtype=torch.int32))
    codes = torch.full((3, 64), 255, dtype=torch.uint8)
    assert torch.equal(vnni.linear(codes, 0, torch.ones(()), None), torch.full((3, 16), 255.0 * 127 * 64))


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


def test_build_failure_falls_back_to_onednn(monkeypatch, caplog, tmp_path):
    """Without a compiler the runtime still works (oneDNN), and says why once."""
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler")

    source = tmp_path / int8_kernel.SOURCE_FILE
    source.write_text("// a kernel source that is never compiled\n")
    monkeypatch.setattr(int8_kernel, "cpu_has_avx2", lambda: True)
    monkeypatch.setattr(int8_kernel, "ops_registered", lambda: False)
    monkeypatch.setattr(int8_kernel, "package_kernel_source", lambda: source)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    layer = Int8Linear(8, 4, bias=False, per_channel=False, has_input_quant=True, input_bits=8)
    layer.weight.fill_(1)
    with caplog.at_level("WARNING"):
        out = layer(torch.ones(2, 8))
        assert layer.avx2_weight() is None
    assert torch.equal(out, torch.full((2, 4), 8.0))
    assert caplog.text.count("no C++ compiler") == 1 and "using oneDNN" in caplog.text


def test_fused_fake_quantize_equals_the_torch_operations(kernel):
    generator = torch.Generator().manual_seed(2)
    scale, zero_point, levels = 0.0173, 131, 255
    x = torch.randn(3, 1001, generator=generator) * 2
    x[0, :50] = (torch.arange(50) - 25 + 0.5) * scale  # halfway points: round half to even
    x[0, 50:53] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x[1, :4] = torch.tensor([1e6, -1e6, 0.0, -0.0])
    expected = x.div(scale).round_().clamp_(-zero_point, levels - zero_point).mul_(scale)
    got = int8_kernel.fake_quantize(x, scale, zero_point, levels)
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and torch.equal(got.isnan(), expected.isnan())
    assert int8_kernel.fake_quantize(x.t(), scale, zero_point, levels) is None  # not contiguous
    with torch.enable_grad():
        assert int8_kernel.fake_quantize(x.requires_grad_(), scale, zero_point, levels) is None


@pytest.mark.parametrize("bits", [8, 6])
def test_quantizer_writes_the_codes_its_linear_reads(kernel, monkeypatch, bits):
    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    torch.manual_seed(0)
    quantizer = int8.Int8ActivationQuantizer(bits=bits)
    layer = Int8Linear(32, 24, bias=True, per_channel=False, has_input_quant=True, input_bits=bits)
    layer.weight.copy_(torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (24, 32), dtype=torch.int8))
    for module in (quantizer, layer):
        module.get_buffer("scale" if module is quantizer else "input_scale").fill_(0.05)
        module.get_buffer("zero_point" if module is quantizer else "input_zero_point").fill_(20)
    x = torch.randn(6, 32) * 2
    with torch.no_grad():
        out = quantizer(x)
        assert isinstance(out, int8.QuantizedActivation) and type(out + 0) is torch.Tensor
        written = out._codes[0]  # the fused pass wrote them
        assert out.grid == (0.05000000074505806, 20) and out.bits == bits and written.dtype == torch.uint8
        assert torch.equal(written, int8.grid_codes(out.clone(), *out.grid, bits))
        expected = layer(out.clone())  # a plain tensor carries no codes: the layer computes its own
        assert torch.equal(layer(out), expected) and out.codes() is written  # read, not recomputed
        layer.input_zero_point.fill_(21)  # another grid: the written codes are not the layer's
        assert torch.equal(layer(out), layer(out.clone()))
        layer.input_zero_point.fill_(20)
        out.mul_(-1)  # changed in place since its codes were written: they are stale
        assert torch.equal(layer(out), layer(out.clone())) and out.codes() is not written
    with torch.inference_mode():  # inference tensors have no version counter: the codes are still shared
        out = quantizer(x)
        assert torch.equal(layer(out), expected) and out.codes() is out._codes[0]


def test_quantized_activation_shares_codes_computed_once(monkeypatch):
    """Without the fused pass (the torch route), the first linear layer computes the codes, the others reuse them."""
    monkeypatch.setenv(int8_kernel.ENV_VAR, "onednn")
    quantizer = int8.Int8ActivationQuantizer(bits=8)
    quantizer.scale.fill_(0.05)
    quantizer.zero_point.fill_(20)
    with torch.no_grad():
        out = quantizer(torch.randn(4, 16))
        assert isinstance(out, int8.QuantizedActivation) and out._codes is None
        codes = out.codes()
        assert out.codes() is codes and torch.equal(codes, int8.grid_codes(out.clone(), 0.05000000074505806, 20, 8))


def test_changed_buffers_are_read_again(kernel, monkeypatch):
    """The cached Python numbers of a module follow its buffers (no stale grid after an in-place change)."""
    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    quantizer = int8.Int8ActivationQuantizer(bits=8)
    quantizer.scale.fill_(0.05)
    x = torch.randn(4, 16)
    first = quantizer(x)
    quantizer.scale.fill_(0.1)
    second = quantizer(x)
    assert torch.equal(second, x.div(0.1).round().clamp(0, 255).mul(0.1)) and not torch.equal(first, second)
    quantizer.load_state_dict({"scale": torch.tensor(0.2), "zero_point": torch.tensor(3.0)})
    assert torch.equal(quantizer(x), x.div(0.2).round().clamp(-3, 252).mul(0.2))


def test_int8_linear_pickles_and_copies(kernel, monkeypatch):
    import copy
    import pickle

    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    layer = Int8Linear(16, 8, bias=False, per_channel=False, has_input_quant=True, input_bits=8)
    layer.weight.copy_(torch.randint(-127, 128, (8, 16), dtype=torch.int8))
    x = torch.randint(0, 256, (2, 3, 16)).float() - 128
    expected = layer(x)
    assert layer.avx2_weight() is not None
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._avx2 is None and torch.equal(clone(x), expected)


def test_ops_have_valid_schemas_and_meta_kernels(kernel):
    """torch.library's own checks (schema, FakeTensor / Meta kernels, no aliasing) for every traced op."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 24, generator=generator)
    torch.library.opcheck(kernel.fake_quantize, (x, 0.05, 7, 255))
    torch.library.opcheck(kernel.fake_quantize_with_codes, (x, 0.05, 7, 255))
    packed = PackedInt8Weight(torch.randint(-127, 128, (20, 24), generator=generator, dtype=torch.int8), 255)
    codes = torch.randint(0, 256, (5, 24), generator=generator, dtype=torch.uint8)
    args = (codes, 3, packed.packed, packed.step_offsets, packed.safe_steps, 20, packed.column_sums)
    args += (packed.entry_offsets, packed.used_inputs, packed.entry_inputs, packed.entry_values)
    torch.library.opcheck(kernel.linear, (*args, torch.full((20,), 0.01), torch.randn(20)))
    if int8_kernel.vnni_available():
        torch.library.opcheck(kernel.linear, (*args, torch.full((20,), 0.01), torch.randn(20), True))
    a, b = torch.randn(2, 3, 5, 8).mul(20).round(), torch.randn(2, 3, 8, 4).mul(20).round()
    for heads_last in (False, True):
        torch.library.opcheck(kernel.grid_matmul, (a, 1.0, b, 1.0, 0.5, heads_last))


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
    for choice in ("avx2", "auto", "onednn"):  # the attention products (and GEMMs) in the kernel, or in torch
        monkeypatch.setenv(int8_kernel.ENV_VAR, choice)
        with torch.no_grad():
            outputs.append(int8_model(**batches[0]).logits)
        with torch.inference_mode():
            outputs.append(int8_model(**batches[0]).logits)
    assert all(torch.equal(output, outputs[0]) for output in outputs)


def _timed_layer(out_features: int = 24, in_features: int = 40) -> Int8Linear:
    layer = Int8Linear(in_features, out_features, bias=True, per_channel=False, has_input_quant=True, input_bits=8)
    layer.weight.copy_(torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8))
    layer.input_zero_point.fill_(100)
    return layer


@pytest.mark.parametrize("faster", ["avx2", "onednn"])
def test_auto_takes_the_gemm_measured_faster(kernel, monkeypatch, faster):
    """`auto` times both GEMMs once per layer shape and keeps the faster (and only its prepared weight);
    the activation quantizers run on the kernel whichever GEMM wins."""
    monkeypatch.setenv(int8_kernel.ENV_VAR, "auto")
    monkeypatch.setattr(int8, "_FASTEST_GEMM", {})
    route_of_call = []
    real = Int8Linear.integer_linear

    def spy(self, codes, x, route):
        route_of_call.append(route)
        return real(self, codes, x, route)

    clock = iter(range(10**6))

    def fake_clock():  # each timed call of the slower route takes 10 ticks, of the faster one 1
        tick = next(clock)
        return tick * (1 if route_of_call and route_of_call[-1] == faster else 10)

    monkeypatch.setattr(Int8Linear, "integer_linear", spy)
    monkeypatch.setattr(int8.time, "perf_counter", fake_clock)
    layer, twin = _timed_layer(), _timed_layer()
    assert layer.gemm_route() == faster
    assert (layer._avx2 is None) == (faster == "onednn") and (layer._packed is None) == (faster == "avx2")
    timed = len(route_of_call)
    assert timed == 8  # per route: a warm-up and three timed products
    assert twin.gemm_route() == faster and len(route_of_call) == timed  # same shape: not timed again
    monkeypatch.undo()
    x = (torch.randint(0, 256, (5, 40)).float() - 100) * layer.input_scale
    monkeypatch.setenv(int8_kernel.ENV_VAR, "onednn")  # another choice: decided again
    reference = layer(x)
    assert layer.gemm_route() == "onednn"
    monkeypatch.setenv(int8_kernel.ENV_VAR, "avx2")
    assert layer.gemm_route() == "avx2" and torch.equal(layer(x), reference)
    quantizer = int8.Int8ActivationQuantizer(bits=8)
    monkeypatch.setenv(int8_kernel.ENV_VAR, "auto")
    assert int8.uses_avx2(quantizer)
    monkeypatch.setenv(int8_kernel.ENV_VAR, "onednn")
    assert not int8.uses_avx2(quantizer)
