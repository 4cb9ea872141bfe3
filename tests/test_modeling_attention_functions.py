"""Attention variants as transformers attention functions: registration, our models' dispatch, stock models."""

import subprocess
import sys

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from hf_quantizable import QuantizableBertConfig, QuantizableBertModel, QuantizableOPTConfig, QuantizableOPTForCausalLM
from hf_quantizable.modeling.attention import clipped_softmax_parameters, ncs_parameters
from tests.conftest import TINY_BERT, TINY_OPT, tiny_inputs, tiny_model
from tests.isolation import run_without_package

CLIPPED = ("clipped_softmax", "normalized_clipped_softmax")
TINY_LLAMA = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped K/V heads
    max_position_embeddings=64,
)
CLIP_FIELDS = {"clip_gamma": -0.05, "clip_zeta": 1.02, "ncs_zeta": 1.05, "ncs_beta": 0.7}


@pytest.fixture
def register():
    """Register test attention functions (with a mask function) for the test's duration."""
    names = []

    def add(name, function, mask_function=eager_mask):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, mask_function)
        names.append(name)

    yield add
    for name in names:
        del AttentionInterface._global_mapping[name]
        del AttentionMaskInterface._global_mapping[name]


def reference_attention(variant):
    """The variant's math from scratch, on transformers' additive eager masks (0 / dtype minimum)."""

    def forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        scores = query @ key.transpose(-1, -2) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        config = module.config
        if variant == "clipped_softmax":
            gamma = config.clip_gamma
            probs = ((config.clip_zeta - gamma) * probs + gamma).clamp(0, 1)
        elif variant == "normalized_clipped_softmax":
            zeta, beta = config.ncs_zeta, config.ncs_beta
            num_keys = key.shape[-2] if attention_mask is None else (attention_mask == 0).sum(-1, keepdim=True)
            gamma = torch.where(num_keys > 1, (beta - zeta) / (num_keys - 1).clamp(min=1), 0.0)
            probs = ((zeta - gamma) * probs + gamma).clamp(0, 1)
        return (probs @ value).transpose(1, 2), probs

    return forward


def left_padded_batch():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, 99, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    return input_ids, attention_mask


def stock_decoder(family: str, attn_implementation: str, **extra):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, **extra, attn_implementation=attn_implementation))
    return OPTForCausalLM(OPTConfig(**TINY_OPT, **extra, attn_implementation=attn_implementation))


# ---------------------------------------------------------------------------- registration


def test_variants_are_registered_on_import():
    for name in CLIPPED:
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        assert name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    code = (
        "import hf_quantizable; from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as F; "
        f"print(all(name in F.valid_keys() for name in {CLIPPED!r}))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "True", fresh.stderr


def test_parameters_come_from_the_config_with_documented_defaults():
    stock = LlamaConfig(**TINY_LLAMA)
    assert clipped_softmax_parameters(stock, 64) == (1.0, -0.025)
    assert ncs_parameters(stock, is_causal=True) == (1.0, 0.9)
    assert ncs_parameters(BertConfig(), is_causal=False) == (1.0, -2.175)
    assert clipped_softmax_parameters(LlamaConfig(**TINY_LLAMA, clip_alpha=12.0), 512) == (1.0, -12.0 / 512)
    ours = QuantizableBertConfig(attn_impl="clipped_softmax", clip_alpha=3.2)
    assert clipped_softmax_parameters(ours, 128) == (1.0, ours.clip_gamma_for(128))
    with pytest.raises(ValueError, match="clip_zeta"):
        clipped_softmax_parameters(LlamaConfig(**TINY_LLAMA, clip_zeta=0.5), 8)


class _Module(torch.nn.Module):
    def __init__(self, config, is_causal):
        super().__init__()
        self.config, self.is_causal = config, is_causal


@pytest.mark.parametrize("name", ["eager", *CLIPPED])
def test_boolean_additive_and_implicit_causal_masks_agree(name):
    from hf_quantizable.modeling.attention import ATTENTION_FUNCTIONS, eager_attention_forward

    function = ATTENTION_FUNCTIONS.get(name, eager_attention_forward)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 6, 8, generator=generator) for _ in range(3))
    module = _Module(QuantizableOPTConfig(**TINY_OPT, **CLIP_FIELDS), is_causal=True).eval()
    keep = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]  # [1, 1, T_q, T_k]
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    outputs = [function(module, query, key, value, mask, scaling=0.3)[0] for mask in (keep, additive, None)]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], atol=1e-6, rtol=0)
    if name == "eager":
        sdpa = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.3)
        torch.testing.assert_close(outputs[0], sdpa.transpose(1, 2), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- our models


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
@pytest.mark.parametrize("attn_impl", ["softmax", "gated"])
def test_our_models_run_the_function_attn_implementation_names(family, attn_impl, register):
    calls = []

    def spy(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    register("hfq_test_spy", spy)
    inputs = tiny_inputs(family)
    logits = {}
    for impl in ("sdpa", "eager", "hfq_test_spy"):
        model = tiny_model(family, attn_impl=attn_impl, attn_implementation=impl)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(**inputs).logits
    assert calls == ["AttentionCore"] * TINY_BERT["num_hidden_layers"]
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["hfq_test_spy"], logits["sdpa"], atol=0, rtol=0)

    model = tiny_model(family, attn_impl=attn_impl)
    model.set_attn_implementation("eager")  # switching at run time, as for stock models
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits["eager"], atol=0, rtol=0)


@pytest.mark.parametrize("attn_impl", CLIPPED)
def test_clipped_variants_run_their_registered_function(attn_impl):
    inputs = tiny_inputs("bert")
    default = tiny_model("bert", attn_impl=attn_impl)
    assert default.config._attn_implementation == attn_impl
    eager = tiny_model("bert", attn_impl=attn_impl, attn_implementation="eager")  # their function is an eager one
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).logits, default(**inputs).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="attn_implementation"):
        tiny_model("bert", attn_impl=attn_impl, attn_implementation="sdpa")
    with pytest.raises(ValueError, match=f"attn_impl='{attn_impl}'"):
        tiny_model("bert", attn_implementation=attn_impl)  # a vanilla config: the variant belongs in the config
    with pytest.raises(ValueError, match="flex_attention"):
        tiny_model("opt", attn_implementation="flex_attention")


def test_output_attentions_under_sdpa_still_returns_probabilities():
    model = tiny_model("bert")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        attentions = model(**tiny_inputs("bert"), output_attentions=True).attentions
    assert len(attentions) == TINY_BERT["num_hidden_layers"]
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(attentions[0].shape[:-1]))


# ---------------------------------------------------------------------------- stock models


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("variant", CLIPPED)
def test_stock_decoder_with_a_registered_variant_matches_the_reference(family, variant, register):
    register(f"hfq_test_reference_{variant}", reference_attention(variant))
    input_ids, attention_mask = left_padded_batch()
    real = attention_mask.bool()
    logits = {}
    for impl in ("sdpa", variant, f"hfq_test_reference_{variant}"):
        model = stock_decoder(family, impl, **CLIP_FIELDS).eval()
        with torch.no_grad():
            logits[impl] = model(input_ids, attention_mask=attention_mask).logits[real]  # [N_real, vocab]
    torch.testing.assert_close(logits[variant], logits[f"hfq_test_reference_{variant}"], atol=1e-5, rtol=0)
    assert not torch.allclose(logits[variant], logits["sdpa"], atol=1e-3)


@pytest.mark.parametrize("variant", CLIPPED)
def test_stock_models_with_a_registered_variant_equal_our_models(variant):
    """Stock BERT / OPT with `attn_implementation=variant` and our classes with `attn_impl=variant`, same weights."""
    cases = [
        (BertConfig, BertModel, QuantizableBertConfig, QuantizableBertModel, TINY_BERT, "last_hidden_state"),
        (OPTConfig, OPTForCausalLM, QuantizableOPTConfig, QuantizableOPTForCausalLM, TINY_OPT, "logits"),
    ]
    for stock_config, stock_class, our_config, our_class, size, field in cases:
        torch.manual_seed(0)
        stock = stock_class(stock_config(**size, **CLIP_FIELDS, attn_implementation=variant)).eval()
        ours = our_class(our_config(**size, **CLIP_FIELDS, attn_impl=variant)).eval()
        ours.load_state_dict(stock.state_dict(), strict=False)
        inputs = tiny_inputs("bert" if stock_class is BertModel else "opt")
        real = inputs["attention_mask"].bool()
        with torch.no_grad():
            expected, actual = getattr(stock(**inputs), field)[real], getattr(ours(**inputs), field)[real]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=f"{stock_class.__name__} {variant}")


@pytest.mark.parametrize("variant", CLIPPED)
def test_stock_llama_trains_with_a_registered_variant(variant):
    model = stock_decoder("llama", variant).train()
    input_ids, attention_mask = left_padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(6):
        loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        if step == 0:
            for name, param in model.named_parameters():
                if "self_attn" in name:
                    assert param.grad is not None and param.grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


SMALL = {k: TINY_LLAMA[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
OTHER_STOCK_MODELS = {  # name -> (config class, model class, config fields)
    "Mistral": ("MistralConfig", "MistralForCausalLM", {**TINY_LLAMA}),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**TINY_LLAMA}),
    "GPT2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": 99, "n_embd": 32, "n_layer": 2, "n_head": 4}),
    "RoBERTa": ("RobertaConfig", "RobertaForMaskedLM", {**SMALL, "num_attention_heads": 4}),
}


@pytest.mark.parametrize("name", OTHER_STOCK_MODELS)
def test_other_stock_models_run_a_registered_variant(name):
    import transformers

    config_name, model_name, fields = OTHER_STOCK_MODELS[name]
    input_ids, attention_mask = left_padded_batch()
    logits = {}
    for impl in ("sdpa", "clipped_softmax"):
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**fields, attn_implementation=impl)
        model = getattr(transformers, model_name)(config).eval()
        with torch.no_grad():
            logits[impl] = model(input_ids, attention_mask=attention_mask).logits[attention_mask.bool()]
    assert not torch.allclose(logits["clipped_softmax"], logits["sdpa"], atol=1e-4)
    model.train()(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    attention = [p for n, p in model.named_parameters() if "attn" in n or "attention" in n]
    assert attention and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention)


def test_soft_capped_attention_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(**TINY_LLAMA, head_dim=8, attn_implementation="clipped_softmax"))
    with pytest.raises(ValueError, match="softcap"):
        model(torch.randint(0, 99, (1, 4)))


def test_registration_travels_with_remote_code(tmp_path):
    """A checkpoint's own copy of the modeling code registers the functions where our package is absent."""
    tiny_model("opt", attn_impl="normalized_clipped_softmax").save_pretrained(tmp_path)
    stdout = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        print("ours", model.config._attn_implementation)
        assert {{"clipped_softmax", "normalized_clipped_softmax"}} <= set(ALL_ATTENTION_FUNCTIONS.valid_keys())
        stock = LlamaForCausalLM(LlamaConfig(**{TINY_LLAMA!r}, attn_implementation="clipped_softmax"))
        ids = torch.randint(0, 99, (1, 6))
        stock(ids, labels=ids).loss.backward()
        print("stock", stock.config._attn_implementation, stock.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0)
        """
    )
    assert "ours normalized_clipped_softmax" in stdout and "stock clipped_softmax tensor(True)" in stdout
