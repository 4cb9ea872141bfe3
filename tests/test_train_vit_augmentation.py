"""ViT augmentation: the paper presets run without timm (`auto` falls back to the built-in pipeline)."""

import dataclasses

import pytest

from hf_quantizable.training import data
from hf_quantizable.training.presets import get_preset


def _broken_timm(*args, **kwargs):
    raise RuntimeError("operator torchvision::nms does not exist")  # what a mismatched torchvision raises


@pytest.fixture
def spec():
    return dataclasses.replace(get_preset("vit-tiny-gated").data, dataset="embedded", embedded_size=40)


def test_paper_presets_use_auto():
    assert get_preset("vit-s16-gated").data.augmentation == "auto"


def test_auto_falls_back_to_basic_when_timm_does_not_import(spec, monkeypatch):
    monkeypatch.setattr(data, "_timm_transforms", _broken_timm)
    images = data.load_image_datasets(dataclasses.replace(spec, augmentation="auto"), seed=0)
    example = images.train[0]
    assert example["pixel_values"].shape == (3, spec.image_size, spec.image_size)


def test_explicit_timm_without_timm_is_refused(spec, monkeypatch):
    monkeypatch.setattr(data, "_timm_transforms", _broken_timm)
    with pytest.raises(ValueError, match="augmentation=timm needs an importable timm .* use augmentation=auto"):
        data.load_image_datasets(dataclasses.replace(spec, augmentation="timm"), seed=0)
