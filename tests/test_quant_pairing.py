"""Input-channel orders under which a CPU int8 GEMM without VNNI cannot saturate (`pairing`)."""

import itertools

import torch

from hf_quantizable.modeling.int8_kernel import split_for_int16_lanes
from hf_quantizable.quantization.pairing import safe_pairing, saturating_pairs

MAX_CODE = 255  # uint8 activation codes: pairs saturate when |w_a| + |w_b| > 128 with one sign


def _gaussian_codes(rows: int, columns: int, seed: int) -> torch.Tensor:
    """int8 codes like a per-tensor min-max quantized Gaussian weight (largest |code| 127)."""
    w = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    return torch.round(w / w.abs().max() * 127).to(torch.int8)


def _removed(weight: torch.Tensor) -> int:
    return len(split_for_int16_lanes(weight, MAX_CODE)[1])


def test_saturating_pairs_matches_the_definition():
    weight = torch.randint(-127, 128, (6, 10), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    bad = saturating_pairs(weight, MAX_CODE)
    w = weight.int()
    for a, b in itertools.product(range(10), repeat=2):
        expected = a != b and bool(((w[:, a] * w[:, b] > 0) & (w[:, a].abs() + w[:, b].abs() > 128)).any())
        assert bool(bad[a, b]) == expected, (a, b)


def test_safe_pairing_removes_every_saturating_pair():
    # Q, K and V of a BERT-base layer read one input: one order for the three stacked.
    weight = _gaussian_codes(3 * 768, 768, seed=0)
    assert _removed(weight) > 100  # the natural order saturates
    perm = safe_pairing(weight, MAX_CODE)
    assert sorted(perm.tolist()) == list(range(768))
    assert _removed(weight[:, perm]) == 0
    # The reordered product is the same product.
    codes = torch.randint(0, 256, (5, 768), generator=torch.Generator().manual_seed(2)).float()
    torch.testing.assert_close(codes[:, perm] @ weight[:, perm].float().t(), codes @ weight.float().t(), rtol=0, atol=0)


def test_odd_widths_and_narrow_activation_grids():
    weight = _gaussian_codes(64, 33, seed=3) // 2  # |codes| <= 63: no pair can saturate ...
    weight[0, :4] = 100  # ... but for these four channels, in the first row
    perm = safe_pairing(weight, MAX_CODE)
    assert sorted(perm.tolist()) == list(range(33)) and _removed(weight[:, perm]) == 0
    # With 7-bit activation codes (max 127) the limit is 258: no pair of int8 weights can reach it.
    assert safe_pairing(weight, 127) is None


def test_no_order_is_returned_when_none_helps():
    assert safe_pairing(_gaussian_codes(8, 16, seed=4) // 4, MAX_CODE) is None  # already safe
    assert safe_pairing(torch.full((4, 8), 127, dtype=torch.int8), MAX_CODE) is None  # every pair saturates


def test_an_order_that_cannot_be_safe_is_still_better():
    weight = _gaussian_codes(16, 12, seed=5)
    weight[:, :6] = 127  # six channels that saturate with each other: three pairs stay unsafe at best
    perm = safe_pairing(weight, MAX_CODE)
    assert sorted(perm.tolist()) == list(range(12))
    assert 0 < _removed(weight[:, perm]) < _removed(weight)
