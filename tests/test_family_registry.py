"""Family knowledge lives on the model classes: no family branches outside `modeling/`, and a fourth
family registered in-process works with the generic helpers from its class attributes alone."""

import ast
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import hf_quantizable
from hf_quantizable import (
    QuantizableBertConfig,
    QuantizableBertForMaskedLM,
    QuantizableBertModel,
    families,
)
from hf_quantizable.evaluation import harness
from hf_quantizable.evaluation.outliers import OutlierStatsCollector, compute_outlier_stats
from hf_quantizable.hub.card import CardInputs, build_card_data, reference_rows
from hf_quantizable.modeling.configuration_quantizable import ATTENTION_VARIANTS, ATTN_IMPLS
from hf_quantizable.quantization.config import DEFAULT_KEEP_FP
from hf_quantizable.quantization.outlier_suppression import migrate_gamma
from hf_quantizable.quantize import max_length_for
from hf_quantizable.training import presets
from hf_quantizable.training.data import train_tokenizer
from hf_quantizable.training.runner import build_model
from hf_quantizable.training.trainer import TRAINERS, MaskedLMTrainer
from tests.conftest import TINY_BERT

PACKAGE = Path(hf_quantizable.__file__).parent
BRANCH_NAMES = {"family", "model_type", "_family", "family_name"}


# ------------------------------------------------------------------------------ no family branches


def _names(node: ast.AST) -> set[str]:
    """The variable / attribute names of an expression (`preset.family` -> {"family"})."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return {a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return set()


def _strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {s for element in node.elts for s in _strings(element)}
    return set()


def family_branches(source: str) -> list[tuple[int, str]]:
    """(line, code) of every comparison that names a family: `family` / `model_type` against a string
    literal, or anything against a family name or quantizable model type literal."""
    known = {*families.names(), *(families.config_class(f).model_type for f in families.names())}
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = set().union(*(_names(side) for side in sides))
        strings = set().union(*(_strings(side) for side in sides))
        if (names & BRANCH_NAMES and strings) or strings & known:
            found.append((node.lineno, ast.get_source_segment(source, node)))
    return found


def test_the_branch_finder_finds_branches():
    """The check below can fail: each of these is a family branch."""
    for code in (
        'if family == "vit":\n    pass\n',
        'x = preset.family != "vit"\n',
        'if model_type in ("quantizable_vit", "vit"):\n    pass\n',
        'if config.get("model_type") == "quantizable_bert":\n    pass\n',
        'if kind == "opt":\n    pass\n',
    ):
        assert family_branches(code), code
    assert not family_branches("if families.modality(family) == 'image':\n    pass\n")


def test_no_family_branches_outside_modeling():
    """Generic code asks the model classes (through `hf_quantizable.families`) instead of branching."""
    branches = {
        f"{path.relative_to(PACKAGE.parent)}:{line}": code
        for path in sorted(PACKAGE.rglob("*.py"))
        if "modeling" not in path.relative_to(PACKAGE).parts
        for line, code in family_branches(path.read_text())
    }
    assert branches == {}


# ------------------------------------------------------------------------------ the registry


def test_registry_covers_the_auto_registration_and_the_classes():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    assert families.names() == ("bert", "opt", "vit")
    for family in families.names():
        config_class = families.config_class(family)
        assert AutoConfig.for_model(config_class.model_type).__class__ is config_class
        assert families.family_of(family) == families.family_of(config_class.model_type) == family
        assert families.pretraining_class(family) in families.model_classes(family)
    assert families.family_of("roberta") is None and families.family_of(None) is None
    assert AutoModelForMaskedLM.from_config(QuantizableBertConfig(**TINY_BERT)).__class__ is QuantizableBertForMaskedLM
    assert families.auto_classes(hf_quantizable.QuantizableOPTForCausalLM) == ["AutoModelForCausalLM"]
    assert AutoModelForCausalLM._model_mapping[hf_quantizable.QuantizableOPTConfig] is (
        hf_quantizable.QuantizableOPTForCausalLM
    )
    assert {f: families.training_objective(f) for f in families.names()} == {
        "bert": "mlm",
        "opt": "clm",
        "vit": "image-classification",
    }
    assert set(TRAINERS) == {families.training_objective(f) for f in families.names()}
    assert [families.modality(f) for f in families.names()] == ["text", "text", "image"]


def test_default_keep_fp_modules_are_the_families_heads():
    """`W8A8Config.keep_fp_modules` defaults to the heads every family keeps in floating point."""
    heads = {m for f in families.names() for cls in families.model_classes(f) for m in cls._keep_fp_modules}
    assert heads == set(DEFAULT_KEEP_FP)
    for family in families.names():  # every listed head exists in some model of the family
        for name in families.base_model_class(family)._keep_fp_modules:
            assert any(
                hasattr(cls, name) or name in cls.__init__.__code__.co_names for cls in families.model_classes(family)
            )


def test_one_variant_vocabulary():
    from hf_quantizable import pipeline, retrofit

    assert ATTN_IMPLS == ("softmax", "clipped_softmax", "normalized_clipped_softmax", "gated")
    assert presets.VARIANTS == ("vanilla", "clipped", "gated")
    assert set(pipeline.VARIANTS) == set(presets.VARIANTS) and pipeline.VARIANTS[0] == "vanilla"
    assert set(retrofit.RETROFIT_IMPLS) == set(ATTN_IMPLS)
    for preset in presets.PRESETS.values():
        variant = preset.name.rsplit("-", 1)[1]
        assert preset.model["attn_impl"] == ATTENTION_VARIANTS[variant]


# ------------------------------------------------------------------------------ a fourth family


class QuantizableToyConfig(QuantizableBertConfig):
    model_type = "quantizable_toy"


TOY_AUTO_MAP = {
    "AutoConfig": "configuration_toy.QuantizableToyConfig",
    "AutoModel": "modeling_toy.QuantizableToyModel",
    "AutoModelForMaskedLM": "modeling_toy.QuantizableToyForMaskedLM",
}


class ToyFamily:
    """The toy family's knowledge, on each of its classes (a BERT layout with its own choices)."""

    config_class = QuantizableToyConfig
    auto_map = TOY_AUTO_MAP
    _outlier_hook_points = (
        {"kind": "ffn_output", "paths": (("output.dense_quant", "output"), ("output.dense", "output"))},
    )
    _keep_fp_modules = ("cls",)


class QuantizableToyModel(ToyFamily, QuantizableBertModel):
    pass


class QuantizableToyForMaskedLM(ToyFamily, QuantizableBertForMaskedLM):
    pass


@pytest.fixture
def toy():
    families.register_family("toy", (QuantizableToyModel, QuantizableToyForMaskedLM))
    try:
        yield
    finally:
        families.FAMILIES.pop("toy")


def toy_model() -> QuantizableToyForMaskedLM:
    torch.manual_seed(0)
    return QuantizableToyForMaskedLM(QuantizableToyConfig(**TINY_BERT)).eval()


def toy_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_register_family_refuses_mixed_config_classes():
    with pytest.raises(ValueError, match="one config class"):
        families.register_family("mixed", (QuantizableToyModel, QuantizableBertForMaskedLM))
    assert "mixed" not in families.names()


def test_toy_family_is_found_and_loaded(toy):
    from transformers import AutoModelForMaskedLM

    assert families.family_of("quantizable_toy") == families.family_of("toy") == "toy"
    assert families.family_of_model(toy_model()) == "toy"
    assert families.pretraining_class("toy") is QuantizableToyForMaskedLM
    assert type(AutoModelForMaskedLM.from_config(QuantizableToyConfig(**TINY_BERT))) is QuantizableToyForMaskedLM


def test_toy_outlier_statistics_use_its_hook_points(toy):
    sites = OutlierStatsCollector(toy_model()).sites
    assert [site.name for site, _, _ in sites] == [
        "bert.encoder.layer.0.output.dense_quant",
        "bert.encoder.layer.1.output.dense_quant",
    ]
    stats = compute_outlier_stats(toy_model(), [toy_batch()])
    assert {entry["kind"] for entry in stats["per_layer"]} == {"ffn_output"}


def test_toy_gamma_migration_uses_its_plan(toy):
    model = toy_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name:
                param.uniform_(0.5, 2.0)
        before = model(**toy_batch()).logits
        shortcuts = migrate_gamma(model)
        after = model(**toy_batch()).logits
    assert shortcuts == ["bert.encoder.layer.0.attention.output", "bert.encoder.layer.0.output"] + [
        "bert.encoder.layer.1.attention.output",
        "bert.encoder.layer.1.output",
    ]
    assert torch.allclose(before, after, atol=1e-4)


def test_toy_evaluation_tasks(toy, tmp_path):
    assert families.class_for_task("toy", "mlm") is QuantizableToyForMaskedLM
    assert families.class_for_task("toy", "glue") is None
    assert harness.family_tasks("toy") == "mlm or embedding"
    assert harness.family_tasks("bert") == "mlm, embedding or glue"
    toy_model().save_pretrained(tmp_path)
    assert harness.check_model_for_task(str(tmp_path), "mlm").model_type == "quantizable_toy"
    with pytest.raises(ValueError, match="needs a BERT model.*tasks for this model: mlm or embedding"):
        harness.check_model_for_task(str(tmp_path), "glue")
    assert type(harness.load_fp_model(str(tmp_path), "mlm")) is QuantizableToyForMaskedLM
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(ValueError, match="task 'mlm' needs a BERT or TOY model"):
        harness.check_model_for_task(str(opt), "mlm")


def test_toy_presets_and_training_model(toy):
    preset = presets.TrainingPreset(
        name="toy-tiny",
        family="toy",
        description="toy",
        model={**TINY_BERT, "attn_impl": "gated"},
        training={"max_steps": 2, "learning_rate": 1e-3},
        data=presets.DataSpec(seq_length=16),
    )
    presets.validate_preset(preset)
    assert "model.clip_gamma" in presets.allowed_fields("toy")
    with pytest.raises(ValueError, match=r"image-model field and this preset trains a text model \(toy\)"):
        presets.apply_overrides(preset, {"data.image_size": 32})
    with pytest.raises(ValueError, match="it is set from the tokenizer"):
        presets.apply_overrides(preset, {"model.pad_token_id": 3})
    presets.apply_overrides(preset, {"data.mlm_probability": 0.3})  # a masked-LM family reads it
    tokenizer = train_tokenizer("toy", iter(["a b c d e f g"] * 50), vocab_size=60)
    model = build_model(preset, tokenizer)
    assert type(model) is QuantizableToyForMaskedLM
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id
    assert TRAINERS[families.training_objective("toy")] is MaskedLMTrainer


def test_toy_card_quantize_and_retrofit(toy):
    from hf_quantizable import retrofit

    config = {"model_type": "quantizable_toy", "architectures": ["QuantizableToyForMaskedLM"]}
    card = build_card_data(CardInputs(repo_id="org/toy", config=config, records=[]))
    assert "toy" in card.tags
    assert reference_rows("toy", "softmax", [])[0]["fp_quality"] == "–"
    assert max_length_for(Namespace(max_length=None), {"max_position_embeddings": 64}, "quantizable_toy") == 64
    assert "toy" in retrofit.retrofit_families()  # it inherits BERT's `_retrofit_modules`
