"""The attention variants: clipped softmax, normalized clipped softmax, gates, masks."""

import math

import pytest
import torch

from hf_quantizable.modeling.attention import (
    AttentionGate,
    causal_mask,
    clipped_softmax,
    normalized_clipped_softmax,
)
from tests.conftest import ATTN_IMPLS, tiny_inputs, tiny_model

GATE_TYPES = ("linear", "mlp", "all_heads_linear", "per_head", "unconditional")


def test_clipped_softmax_outputs_exact_zeros_and_ones():
    # One dominant key: softmax ~ [1, 0, 0, 0]; with zeta = 1.1, gamma = -0.1 the top probability
    # stretches above 1 and the others below 0, so clipping gives exact 1 and exact 0.
    scores = torch.tensor([[20.0, 0.0, 0.0, 0.0]])
    probs = clipped_softmax(scores, zeta=1.1, gamma=-0.1)
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    # Moderate scores stay inside (0, 1) and follow the formula exactly.
    scores = torch.tensor([[0.3, 0.1, -0.2, 0.0]])
    expected = (1.1 + 0.1) * torch.softmax(scores, -1) - 0.1
    assert torch.allclose(clipped_softmax(scores, zeta=1.1, gamma=-0.1), expected)
    assert expected.min() > 0 and expected.max() < 1


def test_clipped_softmax_zeta_one_gamma_zero_is_softmax():
    scores = torch.randn(3, 5)
    assert torch.allclose(clipped_softmax(scores, zeta=1.0, gamma=0.0), torch.softmax(scores, -1))


@pytest.mark.parametrize("zeta,beta", [(1.0, 0.9), (1.0, -2.175), (1.03, 1.0)])
def test_ncs_stretched_probabilities_sum_to_beta_for_every_query_length(zeta, beta):
    # Causal mask: query t sees t + 1 keys. Uniform scores keep every stretched value inside
    # [0, 1] only for beta > 0; compare the unclipped sum through the closed form instead.
    length = 12
    mask = causal_mask(None, 1, length, 0, torch.device("cpu"))  # [1, 1, T, T]
    num_keys = mask.sum(-1, keepdim=True)  # [1, 1, T, 1]
    scores = torch.randn(1, 1, length, length).masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, -1)
    gamma = torch.where(num_keys > 1, (beta - zeta) / (num_keys - 1).clamp(min=1), torch.zeros_like(num_keys))
    stretched = ((zeta - gamma) * probs + gamma) * mask  # masked keys do not count
    sums = stretched.sum(-1).flatten()
    assert sums[0].item() == pytest.approx(zeta)  # a single key: nothing to clip
    assert torch.allclose(sums[1:], torch.full_like(sums[1:], beta), atol=1e-5)
    # The function itself equals the clipped version of exactly these values.
    expected = stretched.clamp(0, 1) * mask
    assert torch.allclose(normalized_clipped_softmax(scores, zeta, beta, num_keys) * mask, expected, atol=1e-6)


def test_ncs_sums_equal_beta_when_nothing_is_clipped():
    # OPT setting beta = 0.9: uniform attention over n keys stretches to 0.9 / n > 0, no clipping.
    for n in range(2, 20):
        probs = normalized_clipped_softmax(torch.zeros(1, n), 1.0, 0.9, n)
        assert probs.sum().item() == pytest.approx(0.9, abs=1e-5)


def test_ncs_bert_setting_matches_clipped_softmax_at_length_128():
    # Liao & Monz BERT (zeta 1, beta -2.175) gives gamma = -0.025 at T = 128: Bondarenko's setting.
    scores = torch.randn(4, 128)
    assert torch.allclose(
        normalized_clipped_softmax(scores, 1.0, -2.175, 128), clipped_softmax(scores, 1.0, -0.025), atol=1e-6
    )


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_gate_starts_at_pi_init(gate_type):
    model = tiny_model("bert", attn_impl="gated", gate_type=gate_type, pi_init=0.25)
    gates = [m for m in model.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == model.config.num_hidden_layers
    hidden = torch.randn(2, 7, model.config.hidden_size)
    for gate in gates:
        assert torch.allclose(gate(hidden), torch.tensor(0.25))
        assert torch.allclose(gate.bias, torch.tensor(math.log(0.25 / 0.75)))


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_gate_output_shapes(gate_type):
    gate = AttentionGate(gate_type, num_heads=4, head_dim=8, n_hid=4, pi_init=0.5)
    expected = {"per_head": (2, 4, 1, 1), "unconditional": (1, 4, 1, 1)}.get(gate_type, (2, 4, 7, 1))
    assert gate(torch.randn(2, 7, 32)).shape == expected


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
@pytest.mark.parametrize("gate_type", ["linear", "mlp", "all_heads_linear", "unconditional"])
def test_gradients_reach_every_gate_parameter(family, gate_type):
    model = tiny_model(family, attn_impl="gated", gate_type=gate_type).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = tiny_inputs(family)
    gate_params = {n: p for n, p in model.named_parameters() if ".gate." in n}
    assert gate_params
    # Two steps: the zero-initialised output weights of the MLP gate block the hidden layer's
    # gradient on the first step only.
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(**inputs).logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
    for name, param in gate_params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_per_head_gate_ignores_padding():
    gate = AttentionGate("per_head", num_heads=2, head_dim=4, n_hid=4, pi_init=0.5)
    torch.nn.init.normal_(gate.weight)
    hidden = torch.randn(1, 5, 8)
    padded = torch.cat([hidden, 100 * torch.randn(1, 3, 8)], dim=1)
    token_mask = torch.tensor([[1] * 5 + [0] * 3])
    assert torch.allclose(gate(hidden), gate(padded, token_mask), atol=1e-6)


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
def test_bert_outputs_ignore_right_padding(attn_impl):
    # clip_gamma (not clip_alpha, which depends on the padded length) makes clipped softmax length-free.
    extra = {"clip_gamma": -0.03} if attn_impl == "clipped_softmax" else {}
    model = tiny_model("bert", attn_impl=attn_impl, **extra)
    ids = torch.randint(2, 99, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        short = model(ids).logits
        long = model(padded, attention_mask=mask).logits[:, :6]
    assert torch.allclose(short, long, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
def test_opt_outputs_ignore_left_padding(attn_impl):
    model = tiny_model("opt", attn_impl=attn_impl)
    ids = torch.randint(2, 99, (1, 6))
    padded = torch.cat([torch.ones(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0] * 3 + [1] * 6])
    with torch.no_grad():
        short = model(ids).logits
        long = model(padded, attention_mask=mask).logits[:, 3:]
    assert torch.allclose(short, long, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_clipped_attention_probabilities_are_exact_zero_on_masked_keys(family):
    model = tiny_model(family, attn_impl="clipped_softmax")
    inputs = tiny_inputs(family)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    padded = inputs["attention_mask"][-1] == 0
    for probs in attentions:  # [B, H, T, T]
        assert probs.min() >= 0 and probs.max() <= 1
        real_queries = probs[-1][:, ~padded]  # padded queries (OPT left padding) are unused
        assert (real_queries[..., padded] == 0).all()
