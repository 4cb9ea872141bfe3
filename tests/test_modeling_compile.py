"""torch.compile on floating-point models: one graph for every family and attention variant, inductor = eager.

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
