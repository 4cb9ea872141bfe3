"""Orders of a linear layer's input channels under which a CPU int8 GEMM without VNNI cannot saturate.

x86 uint8 x int8 kernels without VNNI add the products of input channels `(2i, 2i+1)` in int16
(`vpmaddubsw`; see `split_for_int16_lanes`). Whether a pair can saturate depends only on the
weights, so reordering the input channels (and the weight columns alike: the product is unchanged)
can pair every large weight with a small or opposite-sign one. `safe_pairing` finds such an order as
a matching in the graph of channels that are safe together (greedy, then repaired); the export to
ONNX applies it (one gather of the uint8 codes per input, shared by the layers that read it, e.g. Q,
K and V) instead of the sparse correction that the natural order needs. With per-tensor weight
scales (the papers' setting) such orders exist in the models we measured; per-channel scales put a
127 in every row, and there an order only removes part of the saturating pairs.
"""

import torch

from ..modeling.int8_kernel import split_for_int16_lanes


def saturating_pairs(weight: torch.Tensor, max_code: int) -> torch.Tensor:
    """`[K, K]` bool: which input channels `a, b` of int8 `weight` `[N, K]` saturate when paired.

    A pair saturates when some row has same-sign weights with `max_code * (|w_a| + |w_b|) > 32767`.
    """
    limit = 32767 // max_code
    k = weight.shape[1]
    bad = torch.zeros(k, k, dtype=torch.bool)
    for sign in (1, -1):
        magnitude = (weight.to(torch.int32) * sign).clamp(min=0)  # [N, K], this sign only
        # Only a weight above limit / 2 can exceed the limit with a partner; one row at a time.
        heavy_rows = torch.nonzero((magnitude > limit // 2).any(1)).flatten()
        for row in magnitude[heavy_rows]:
            heavy = torch.nonzero(row > limit // 2).flatten()
            bad[heavy] |= row.unsqueeze(0) > (limit - row[heavy]).unsqueeze(1)
    bad |= bad.clone().t()
    bad.fill_diagonal_(False)
    return bad


def _greedy_matching(bad: torch.Tensor) -> list[tuple[int, int]]:
    """Safe pairs, the most constrained channel first, each with its most constrained safe partner."""
    degree = bad.sum(1)
    free = torch.ones(bad.shape[0], dtype=torch.bool)
    pairs = []
    for a in torch.argsort(degree, descending=True, stable=True).tolist():
        if not free[a]:
            continue
        free[a] = False
        candidates = torch.nonzero(free & ~bad[a]).flatten()
        if len(candidates):
            b = int(candidates[torch.argmax(degree[candidates])])
            free[b] = False
            pairs.append((a, b))
    return pairs


def _repair(pairs: list[tuple[int, int]], unmatched: list[int], bad: torch.Tensor) -> list[tuple[int, int]]:
    """Pair up unmatched channels by splitting matched pairs: unmatched `u, v` and a pair `(a, b)` with
    `u, a` and `v, b` safe become `(u, a), (v, b)`. Channels this cannot place stay unmatched."""
    pairs, unmatched = list(pairs), list(unmatched)
    while len(unmatched) >= 2 and pairs:
        firsts, seconds = torch.tensor(pairs).t()  # [P] each
        u = unmatched[0]
        for v in unmatched[1:]:
            straight = ~bad[u, firsts] & ~bad[v, seconds]
            crossed = ~bad[u, seconds] & ~bad[v, firsts]
            fits = torch.nonzero(straight | crossed).flatten()
            if len(fits):
                i = int(fits[0])
                a, b = pairs.pop(i)
                pairs += [(u, a), (v, b)] if straight[i] else [(u, b), (v, a)]
                unmatched.remove(v)
                break
        unmatched.remove(u)
    return pairs


def _removed_entries(weight: torch.Tensor, max_code: int) -> int:
    return len(split_for_int16_lanes(weight, max_code)[1])


def safe_pairing(weight: torch.Tensor, max_code: int) -> torch.Tensor | None:
    """A permutation `perm` of the input channels of int8 `weight` `[N, K]` for which `weight[:, perm]`
    has no (or, where no such order exists, fewer) saturating pairs; None when the natural order
    is as good.

    Stack the weights of the layers that read one input (`[N1 + N2 + ..., K]`) to get one order for all.
    """
    natural = _removed_entries(weight, max_code)
    if natural == 0:
        return None
    k = weight.shape[1]
    bad = saturating_pairs(weight, max_code)
    pairs = _greedy_matching(bad)
    matched = {channel for pair in pairs for channel in pair}
    pairs = _repair(pairs, [c for c in range(k) if c not in matched], bad)
    paired = torch.tensor(pairs, dtype=torch.long).reshape(-1)
    left = torch.ones(k, dtype=torch.bool)
    left[paired] = False
    perm = torch.cat([paired, torch.nonzero(left).flatten()])  # unpaired channels last, in any pairs
    if _removed_entries(weight[:, perm], max_code) >= natural:
        return None
    return perm
