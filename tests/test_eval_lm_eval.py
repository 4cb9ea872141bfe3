"""lm-eval: the registered `hf-quantizable` model, the stock `hf` model on our checkpoints, and the local
task YAMLs, offline on a tiny OPT."""

import json
import math

import lm_eval
import pytest
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_quantizable.evaluation import lm_eval_model
from hf_quantizable.evaluation.lm_eval_model import lm_eval_records
from hf_quantizable.evaluation.results import read_results, write_results
from hf_quantizable.paths import LM_EVAL_TASKS_DIR
from hf_quantizable.quantization import W8A8Config, W8A8Quantizer
from tests.conftest import tiny_model
from tests.isolation import run_without_package

EVAL_TASKS = str(LM_EVAL_TASKS_DIR)


@pytest.fixture(scope="module")
def opt_dirs(tmp_path_factory, data_dir):
    """A tiny OPT with a byte-level BPE tokenizer trained on WikiText-2 validation, and its INT8 checkpoint."""
    lines = (data_dir / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()[:3000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    root = tmp_path_factory.mktemp("opt")
    model = tiny_model(
        "opt", vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=1, max_position_embeddings=128
    )
    model.save_pretrained(root / "fp")
    tokenizer.save_pretrained(root / "fp")
    encoded = tokenizer(lines[:64], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    batches = [{k: v[i : i + 8] for k, v in encoded.items() if k != "token_type_ids"} for i in range(0, 64, 8)]
    W8A8Quantizer.from_pretrained(root / "fp").quantize(
        root / "int8",
        quantization_config=W8A8Config(num_calibration_batches=2),
        calibration_dataset=batches,
        processor=tokenizer,
    )
    return root


def test_model_is_registered():
    assert get_model("hf-quantizable") is lm_eval_model.QuantizableLM


def test_local_tasks_are_found():
    manager = TaskManager(include_path=EVAL_TASKS, include_defaults=False)
    assert manager.all_tasks == ["rte_local", "sst2_local", "wikitext2_local"]
    glue = manager.load(["rte_local"])["tasks"]["rte_local"]
    docs = list(glue.validation_docs())
    assert len(docs) == 277 and docs[0]["label"] == 1  # RTE dev row 0 is not_entailment


@pytest.mark.parametrize("variant", ["fp", "w8a8", "int8"])
def test_simple_evaluate_offline(opt_dirs, variant, tmp_path):
    pretrained = opt_dirs / ("int8" if variant == "int8" else "fp")
    args = f"pretrained={pretrained},max_length=128,batch_size=8"
    if variant == "w8a8":
        args += ",w8a8=True,num_calibration_batches=2,calibration_length=64"
    output = lm_eval.simple_evaluate(
        model="hf-quantizable",
        model_args=args,
        tasks=["wikitext2_local", "sst2_local"],
        task_manager=TaskManager(include_path=EVAL_TASKS, include_defaults=False),
        limit=4,
        bootstrap_iters=0,
    )
    perplexity = output["results"]["wikitext2_local"]["word_perplexity,none"]
    accuracy = output["results"]["sst2_local"]["acc,none"]
    assert math.isfinite(perplexity) and perplexity > 1
    assert accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)

    precision = {"fp": "fp32", "w8a8": "w8a8-sim", "int8": "int8"}[variant]
    records = lm_eval_records(output, str(pretrained), "softmax", precision)
    write_results(records, tmp_path / "results.json")
    by_metric = {(r.dataset, r.metric): r for r in read_results(tmp_path / "results.json")}
    assert by_metric[("wikitext2_local", "word_perplexity")].value == pytest.approx(perplexity)
    assert by_metric[("sst2_local", "acc")].value == accuracy
    assert by_metric[("sst2_local", "acc")].split == "validation" and by_metric[("sst2_local", "acc")].n == 4
    assert by_metric[("wikitext2_local", "bits_per_byte")].split == "test"
    assert {r.precision for r in records} == {precision} and {r.task for r in records} == {"lm-eval"}
    assert sorted((r.dataset, r.metric) for r in records) == [
        ("sst2_local", "acc"),
        ("wikitext2_local", "bits_per_byte"),
        ("wikitext2_local", "byte_perplexity"),
        ("wikitext2_local", "word_perplexity"),
    ]  # no "sample_len" or stderr pseudo-metrics


def test_w8a8_on_int8_checkpoint_is_rejected(opt_dirs):
    with pytest.raises(ValueError, match="already INT8"):
        lm_eval_model.QuantizableLM(pretrained=str(opt_dirs / "int8"), w8a8=True)


def _evaluate(model: str, model_args: str, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=EVAL_TASKS, include_defaults=False),
        limit=4,
        bootstrap_iters=0,
    )["results"]


@pytest.mark.parametrize("variant", ["fp", "int8"])
def test_stock_hf_model_runs_our_checkpoints(opt_dirs, variant):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` gives the numbers of `hf-quantizable`."""
    common = f"pretrained={opt_dirs / variant},max_length=128,batch_size=8"
    tasks = ["wikitext2_local", "sst2_local"]
    stock = _evaluate("hf", f"{common},trust_remote_code=True,device=cpu", tasks)
    ours = _evaluate("hf-quantizable", common, tasks)
    for task, metric in [
        ("wikitext2_local", "word_perplexity,none"),
        ("wikitext2_local", "bits_per_byte,none"),
        ("sst2_local", "acc,none"),
    ]:
        assert stock[task][metric] == pytest.approx(ours[task][metric], rel=1e-6), (task, metric)


def test_stock_hf_model_without_our_package(opt_dirs, data_dir):
    """The stock `hf` model loads the FP and the INT8 checkpoint through their remote code alone."""
    ours = {
        variant: _evaluate("hf-quantizable", f"pretrained={opt_dirs / variant},max_length=128", ["wikitext2_local"])
        for variant in ("fp", "int8")
    }
    out = run_without_package(
        f"""
        import json, os
        os.environ["HF_QUANTIZABLE_DATA"] = {str(data_dir)!r}
        import lm_eval, torch
        from lm_eval.api.registry import get_model
        from lm_eval.tasks import TaskManager
        torch.set_num_threads(1)
        result = {{}}
        for variant in ("fp", "int8"):
            lm = get_model("hf").create_from_arg_string(
                "pretrained={opt_dirs}/" + variant + ",trust_remote_code=True,max_length=128", {{"device": "cpu"}}
            )
            linears = [type(m).__name__ for m in lm.model.modules() if "Linear" in type(m).__name__]
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=["wikitext2_local"],
                task_manager=TaskManager(include_path={EVAL_TASKS!r}, include_defaults=False),
                limit=4,
                bootstrap_iters=0,
            )
            result[variant] = {{
                "module": type(lm.model).__module__,
                "int8_linears": linears.count("Int8Linear"),
                "ppl": output["results"]["wikitext2_local"]["word_perplexity,none"],
            }}
        print(json.dumps(result))
        """
    )
    result = json.loads(out.strip().splitlines()[-1])
    for variant in ("fp", "int8"):
        assert result[variant]["module"].startswith("transformers_modules."), result[variant]  # remote code
        assert result[variant]["ppl"] == pytest.approx(
            ours[variant]["wikitext2_local"]["word_perplexity,none"], rel=1e-6
        )
    assert result["fp"]["int8_linears"] == 0 and result["int8"]["int8_linears"] > 0
