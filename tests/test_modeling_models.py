"""The three model families: configs, shapes, stock-weight compatibility, Auto classes, remote code."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertModel,
    OPTConfig,
    OPTForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from hf_quantizable import (
    QuantizableBertConfig,
    QuantizableBertForSequenceClassification,
    QuantizableBertModel,
    QuantizableOPTConfig,
    QuantizableOPTForCausalLM,
    QuantizableViTConfig,
    QuantizableViTForImageClassification,
)
from tests.conftest import ATTN_IMPLS, FAMILIES, TINY_BERT, TINY_OPT, TINY_VIT, tiny_inputs, tiny_model
from tests.isolation import run_without_package

# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family, tmp_path):
    config_class, _, kwargs = FAMILIES[family]
    config = config_class(**kwargs, attn_impl="gated", gate_type="mlp", gate_n_hid=8, pi_init=0.25)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"quantizable_{family}"
    assert (saved["attn_impl"], saved["gate_type"], saved["gate_n_hid"], saved["pi_init"]) == ("gated", "mlp", 8, 0.25)
    loaded = config_class.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_clipped_softmax_defaults_and_alpha_form():
    assert QuantizableBertConfig(attn_impl="clipped_softmax").clip_gamma == -0.025
    config = QuantizableBertConfig(attn_impl="clipped_softmax", clip_alpha=3.2)
    assert config.clip_gamma is None
    assert config.clip_gamma_for(128) == pytest.approx(-0.025)
    assert QuantizableBertConfig().ncs_beta == -2.175
    assert QuantizableOPTConfig().ncs_beta == 0.9


@pytest.mark.parametrize(
    "config_class,kwargs,field",
    [
        (QuantizableBertConfig, {"attn_impl": "flash"}, "attn_impl"),
        (QuantizableBertConfig, {"gate_type": "conv"}, "gate_type"),
        (QuantizableBertConfig, {"pi_init": 0.0}, "pi_init"),
        (QuantizableBertConfig, {"pi_init": 1.5}, "pi_init"),
        (QuantizableBertConfig, {"pi_init": "half"}, "pi_init"),
        (QuantizableBertConfig, {"clip_gamma": 0.1}, "clip_gamma"),
        (QuantizableBertConfig, {"clip_alpha": -1.0}, "clip_alpha"),
        (QuantizableBertConfig, {"clip_gamma": -0.1, "clip_alpha": 3.0}, "clip_gamma"),
        (QuantizableBertConfig, {"clip_zeta": 0.9}, "clip_zeta"),
        (QuantizableBertConfig, {"ncs_zeta": 0.5}, "ncs_zeta"),
        (QuantizableBertConfig, {"ncs_beta": 2.0}, "ncs_beta"),
        (QuantizableBertConfig, {"gate_n_hid": 0}, "gate_n_hid"),
        (QuantizableBertConfig, {"w8a8_config": "int8"}, "w8a8_config"),
        (QuantizableOPTConfig, {"wd_ln_gamma": "yes"}, "wd_ln_gamma"),
        (QuantizableOPTConfig, {"attention_init": "xavier"}, "attention_init"),
        (QuantizableOPTConfig, {"attn_impl": "gated", "gate_type": "per_head"}, "gate_type"),
        (QuantizableViTConfig, {"patch_embed_layernorm": 1}, "patch_embed_layernorm"),
        (QuantizableBertConfig, {"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
        (QuantizableOPTConfig, {"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
    ],
)
def test_invalid_config_values_name_the_field(config_class, kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        config_class(**kwargs)


def test_opt_attention_init_options(tmp_path):
    """`torch_default` gives the attention projections nn.Linear's kaiming-uniform init (the official
    run_clm.py's), every other weight keeps OPT's normal(0, init_std); a saved model reloads as saved."""
    hidden, init_std = 256, 0.006
    shape = dict(TINY_OPT, hidden_size=hidden, word_embed_proj_dim=hidden, ffn_dim=512, init_std=init_std)
    stds = {}
    for attention_init in ("opt", "torch_default"):
        torch.manual_seed(0)
        model = QuantizableOPTForCausalLM(QuantizableOPTConfig(**shape, attention_init=attention_init))
        attention = model.model.decoder.layers[1].self_attn
        stds[attention_init] = [
            getattr(attention, p).weight.std().item() for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        ]
        assert model.model.decoder.layers[1].fc1.weight.std().item() == pytest.approx(init_std, rel=0.05)
    assert stds["opt"] == pytest.approx([init_std] * 4, rel=0.05)
    assert stds["torch_default"] == pytest.approx([(3 * hidden) ** -0.5] * 4, rel=0.05)
    bias = attention.v_proj.bias
    assert bias.abs().max() <= hidden**-0.5 and bias.std() > 0.5 * (3 * hidden) ** -0.5  # uniform(+-1/sqrt(fan_in))
    model.save_pretrained(tmp_path)
    reloaded = QuantizableOPTForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_invalid_attn_impl_lists_allowed_values():
    with pytest.raises(ValueError, match="normalized_clipped_softmax"):
        QuantizableBertConfig(attn_impl="flash")


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes_attentions_and_hidden_states(family, attn_impl):
    model = tiny_model(family, attn_impl=attn_impl)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    num_layers = model.config.num_hidden_layers
    tokens = 17 if family == "vit" else 9  # ViT: 16 patches + CLS
    expected_logits = {"bert": (2, 9, 99), "opt": (2, 9, 99), "vit": (2, 5)}[family]
    assert out.logits.shape == expected_logits
    assert len(out.attentions) == num_layers and len(out.hidden_states) == num_layers + 1
    assert out.attentions[0].shape == (2, 4, tokens, tokens)
    assert out.hidden_states[-1].shape == (2, tokens, 32)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize(
    ("num_labels", "labels", "problem_type", "reference"),
    [
        (1, torch.tensor([0.5, 1.5]), "regression", lambda z, y: F.mse_loss(z.squeeze(-1), y)),
        (3, torch.tensor([0, 2]), "single_label_classification", F.cross_entropy),
        (
            3,
            torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
            "multi_label_classification",
            F.binary_cross_entropy_with_logits,
        ),
    ],
)
def test_sequence_classification_losses(num_labels, labels, problem_type, reference):
    """The loss of each problem type equals torch.nn.functional's on the same logits (as transformers' BERT)."""
    torch.manual_seed(0)
    model = QuantizableBertForSequenceClassification(QuantizableBertConfig(**TINY_BERT, num_labels=num_labels))
    out = model(**tiny_inputs("bert"), labels=labels)
    assert out.logits.shape == (2, num_labels) and model.config.problem_type == problem_type
    torch.testing.assert_close(out.loss, reference(out.logits, labels), rtol=0, atol=0)


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
def test_opt_generate_with_cache_matches_full_forward(attn_impl):
    model = tiny_model("opt", attn_impl=attn_impl)
    prompt = torch.randint(2, 99, (2, 5))
    with torch.no_grad():
        cached = model.generate(
            prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        full_logits = model(cached.sequences).logits  # [B, T, vocab], no cache
    assert torch.equal(cached.sequences, uncached)
    step_logits = torch.stack(cached.logits, dim=1)  # [B, new tokens, vocab]
    assert torch.allclose(step_logits, full_logits[:, 4:-1], atol=1e-5)


# ------------------------------------------------------------- stock-weight compatibility


def test_real_pretrained_bert_loads_and_matches_stock(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(
        ["Quantization needs small activations.", "Attention heads learn to do nothing, which costs outliers."],
        padding=True,
        return_tensors="pt",
    )
    stock = BertModel.from_pretrained(minilm_path).eval()
    ours, info = QuantizableBertModel.from_pretrained(minilm_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        expected = stock(**batch).last_hidden_state
        got = ours.eval()(**batch).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5)

    gated, info = QuantizableBertModel.from_pretrained(
        minilm_path, attn_impl="gated", pi_init=0.25, output_loading_info=True
    )
    assert info["missing_keys"] and all(".gate." in key for key in info["missing_keys"])
    gates = [m for m in gated.modules() if m.__class__.__name__ == "AttentionGate"]
    assert all(torch.allclose(torch.sigmoid(g.bias), torch.tensor(0.25)) for g in gates)


@pytest.mark.parametrize(
    "stock_class,stock_config,ours_class,ours_config,inputs",
    [
        (OPTForCausalLM, OPTConfig(**TINY_OPT), QuantizableOPTForCausalLM, QuantizableOPTConfig, "opt"),
        (
            ViTForImageClassification,
            ViTConfig(**TINY_VIT),
            QuantizableViTForImageClassification,
            QuantizableViTConfig,
            "vit",
        ),
    ],
)
def test_stock_opt_and_vit_weights_load_and_match(stock_class, stock_config, ours_class, ours_config, inputs, tmp_path):
    torch.manual_seed(0)
    stock = stock_class(stock_config).eval()
    stock.save_pretrained(tmp_path)
    ours, info = ours_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert isinstance(ours.config, ours_config) and ours.config.attn_impl == "softmax"
    batch = tiny_inputs(inputs)
    with torch.no_grad():
        expected, got = stock(**batch).logits, ours.eval()(**batch).logits
    if inputs == "opt":  # compare real (non-padded) positions
        keep = batch["attention_mask"].bool()
        expected, got = expected[keep], got[keep]
    assert torch.allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------ Auto classes and remote code


def test_auto_classes_resolve_registered_types(tmp_path):
    for family, auto_class in [("bert", AutoModelForMaskedLM), ("opt", AutoModelForCausalLM)]:
        model = tiny_model(family, attn_impl="gated")
        model.save_pretrained(tmp_path / family)
        loaded = auto_class.from_pretrained(tmp_path / family)
        assert type(loaded) is type(model)
    vit = tiny_model("vit")
    vit.save_pretrained(tmp_path / "vit")
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "vit")) is type(vit)
    assert type(AutoModel.from_pretrained(tmp_path / "vit")).__name__ == "QuantizableViTModel"


def test_saved_folder_is_self_contained(tmp_path):
    tiny_model("bert", attn_impl="gated").save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "configuration_quantizable.py",
        "modeling_quantizable_bert.py",
        "attention.py",
        "int8.py",
        "quantizable_utils.py",
    } <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForMaskedLM"] == "modeling_quantizable_bert.QuantizableBertForMaskedLM"
    assert auto_map["AutoModel"] == "modeling_quantizable_bert.QuantizableBertModel"
    for source in tmp_path.glob("*.py"):  # only torch / transformers / relative imports travel
        for line in source.read_text().splitlines():
            if line.startswith(("import ", "from ")) and not line.startswith("from ."):
                module = line.split()[1].split(".")[0]
                assert module in {"torch", "transformers"} | sys.stdlib_module_names, (source.name, line)


def test_trust_remote_code_load_in_a_process_without_the_package(tmp_path):
    expected = {}
    batches = {}
    for family, impl in [("bert", "gated"), ("opt", "normalized_clipped_softmax"), ("vit", "clipped_softmax")]:
        model = tiny_model(family, attn_impl=impl)
        model.save_pretrained(tmp_path / family)
        batch = tiny_inputs(family)
        torch.save(batch, tmp_path / f"{family}.pt")
        with torch.no_grad():
            expected[family] = model(**batch).logits
        batches[family] = batch
    stdout = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForMaskedLM, AutoModelForCausalLM, AutoModelForImageClassification
        root = {str(tmp_path)!r}
        for family, auto in [("bert", AutoModelForMaskedLM), ("opt", AutoModelForCausalLM),
                             ("vit", AutoModelForImageClassification)]:
            model = auto.from_pretrained(f"{{root}}/{{family}}", trust_remote_code=True).eval()
            assert "hf_quantizable" not in type(model).__module__, type(model).__module__
            with torch.no_grad():
                logits = model(**torch.load(f"{{root}}/{{family}}.pt")).logits
            torch.save(logits, f"{{root}}/{{family}}_logits.pt")
            print(family, type(model).__name__)
        """
    )
    assert "bert QuantizableBertForMaskedLM" in stdout and "vit QuantizableViTForImageClassification" in stdout
    for family, logits in expected.items():
        assert torch.allclose(torch.load(tmp_path / f"{family}_logits.pt"), logits, atol=1e-6), family


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    no_dropout = (
        {"dropout": 0.0, "attention_dropout": 0.0}
        if family == "opt"
        else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    )
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(family, attn_impl="gated", **no_dropout).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**tiny_inputs(family)).logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_stock_checkpoint_becomes_a_quantizable_config(minilm_path):
    config = QuantizableBertConfig.from_pretrained(minilm_path, attn_impl="gated")
    assert config.model_type == "quantizable_bert" and config.attn_impl == "gated"
    assert QuantizableBertModel.from_pretrained(minilm_path).config.model_type == "quantizable_bert"


NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "opt": dict(dropout=0.0, attention_dropout=0.0),
    "vit": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def _first_step_gradients(family: str, batch_size: int, accumulation: int, tmp_path) -> dict[str, torch.Tensor]:
    """The gradients `Trainer` steps the optimizer with, on the same 8 examples (no padding, no dropout)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    generator = torch.Generator().manual_seed(3)
    if family == "vit":
        examples = [
            {"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": torch.tensor(i % 5)}
            for i in range(8)
        ]
    else:
        ids = torch.randint(2, 99, (8, 9), generator=generator)
        examples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    grads: dict[str, torch.Tensor] = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    args = TrainingArguments(
        output_dir=str(tmp_path / f"run-{batch_size}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, use_cpu=True, report_to=[], save_strategy="no",
        max_grad_norm=0.0, seed=0,
    )  # fmt: skip
    Trainer(
        model=tiny_model(family, **NO_DROPOUT[family]).train(), args=args, train_dataset=examples, callbacks=[Record()]
    ).train()
    return grads


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_scales_the_loss_for_gradient_accumulation(family, tmp_path):
    """One batch of 8 and 4 accumulated batches of 2 give the same gradients (the loss is divided by
    the accumulation steps: the models return a mean loss and take no `num_items_in_batch`)."""
    whole = _first_step_gradients(family, 8, 1, tmp_path)
    accumulated = _first_step_gradients(family, 2, 4, tmp_path)
    assert whole.keys() == accumulated.keys() and whole
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)
