"""torch.compile: floating-point models give one graph for every family and attention variant, inductor =
eager; INT8 models one graph on each GEMM route, equal to eager.

Tolerance: logits within 1e-5 (absolute) of eager. Inductor compiles for tens of seconds per model on
2 CPU cores, so the inductor tests cover each family and each variant once across a handful of
models; the dynamo-only test (backend="eager", fullgraph=True) covers the whole matrix.
"""

import pytest
import torch

from tests.conftest import ATTN_IMPLS, tiny_inputs, tiny_model

MATRIX = [
    (family, attn_impl, attn_implementation)
    for family in ("bert", "opt", "vit")
    for attn_impl in ATTN_IMPLS
    for attn_implementation in (("sdpa", "eager") if attn_impl in ("softmax", "gated") else (None,))
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_and_eager(family: str, attn_impl: str, attn_implementation: str | None, **compile_kwargs):
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = tiny_model(family, attn_impl=attn_impl, **extra)
    inputs = tiny_inputs(family)  # BERT right padding, OPT left padding
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = torch.compile(model, **compile_kwargs)(**inputs).logits
    return actual, expected


@pytest.mark.parametrize("family,attn_impl,attn_implementation", MATRIX)
def test_every_family_and_variant_compiles_to_one_graph(family, attn_impl, attn_implementation):
    actual, expected = compiled_and_eager(family, attn_impl, attn_implementation, backend="eager", fullgraph=True)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,attn_impl,attn_implementation",
    [
        ("bert", "clipped_softmax", None),
        ("opt", "normalized_clipped_softmax", None),
        ("vit", "gated", "sdpa"),
        ("opt", "softmax", "eager"),
    ],
)
def test_inductor_equals_eager(family, attn_impl, attn_implementation):
    actual, expected = compiled_and_eager(family, attn_impl, attn_implementation)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


# --- INT8 checkpoints ------------------------------------------------------------------------------


def _int8_model(family: str, kernel: str):
    from hf_quantizable.modeling.int8 import prepare_int8_runtime, set_kernel_choice
    from hf_quantizable.quantization import W8A8Config, quantize_model
    from hf_quantizable.quantization.export import build_int8_model
    from tests.test_quant_core import tiny_model as tiny_quantizable_model

    model, batches = tiny_quantizable_model(family, "clipped_softmax")
    simulated = quantize_model(model, W8A8Config(num_calibration_batches=2), batches)
    int8_model = build_int8_model(simulated)
    set_kernel_choice(int8_model, kernel)
    prepare_int8_runtime(int8_model)
    return int8_model, batches[0]


def _int8_routes() -> list[str]:
    from hf_quantizable.modeling.int8_kernel import cpu_has_avx2

    return ["onednn", "avx2"] if cpu_has_avx2() else ["onednn"]


@pytest.mark.parametrize("kernel", _int8_routes())
@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
def test_int8_model_compiles_to_one_graph_bit_for_bit(family, kernel):
    """No `.item()`, no attribute side channels, no packing in the graph: one graph on either GEMM route,
    equal to eager bit for bit (the integer products run in the same ops)."""
    model, batch = _int8_model(family, kernel)
    with torch.no_grad():
        expected = model(**batch).logits
        actual = torch.compile(model, backend="eager", fullgraph=True)(**batch).logits
    assert torch.equal(actual, expected)


@pytest.mark.slow
def test_int8_model_inductor_equals_eager():
    model, batch = _int8_model("opt", "auto")
    with torch.no_grad():
        expected = model(**batch).logits
        actual = torch.compile(model, fullgraph=True)(**batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
