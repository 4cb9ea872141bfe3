"""The JSON result format: records, schema validation, atomic writes."""

import json
import math
import os

import jsonschema
import pytest

from hf_quantizable.evaluation.results import (
    SCHEMA_VERSION,
    ResultRecord,
    read_results,
    result_schema,
    validate_results,
    write_results,
)
from hf_quantizable.paths import atomic_path, write_text_atomic


def _record(**overrides) -> ResultRecord:
    fields = dict(
        model="runs/bert-gated",
        attn_impl="gated",
        precision="w8a8-sim",
        task="mlm",
        dataset="wikitext",
        dataset_config="wikitext-2-raw-v1",
        split="test",
        metric="perplexity",
        value=4.5,
        n=128,
        seed=0,
    )
    return ResultRecord(**{**fields, **overrides})


def test_round_trip_validates_against_schema(tmp_path):
    records = [_record(), _record(metric="max_inf_norm", task="outliers", value=21.5, extra={"per_layer": [1, 2]})]
    path = write_results(records, tmp_path / "out" / "results.json")
    document = json.loads(path.read_text())
    assert document["schema_version"] == SCHEMA_VERSION
    jsonschema.validate(document, result_schema())
    back = read_results(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in records]
    assert back[0].versions["torch"] and back[0].versions["transformers"]
    assert back[0].timestamp.endswith("+00:00")
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left


def test_append_keeps_existing_records(tmp_path):
    path = tmp_path / "results.json"
    write_results([_record(value=1.0)], path)
    write_results([_record(value=2.0)], path, append=True)
    assert [r.value for r in read_results(path)] == [1.0, 2.0]
    write_results([_record(value=3.0)], path)
    assert [r.value for r in read_results(path)] == [3.0]


def test_non_finite_value_is_null_with_note(tmp_path):
    record = _record(value=math.inf)
    assert record.value is None and record.extra["non_finite"] == "inf"
    write_results([record], tmp_path / "r.json")
    assert read_results(tmp_path / "r.json")[0].value is None


@pytest.mark.parametrize(("field", "value"), [("precision", "int4"), ("task", "translation")])
def test_bad_enum_names_field_and_allowed_values(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be one of"):
        _record(**{field: value})


def test_schema_rejects_bad_documents(tmp_path):
    good = {"schema_version": 1, "records": [_record().to_dict()]}
    validate_results(good)
    missing = {"schema_version": 1, "records": [{k: v for k, v in _record().to_dict().items() if k != "metric"}]}
    with pytest.raises(jsonschema.ValidationError, match="metric"):
        validate_results(missing)
    with pytest.raises(jsonschema.ValidationError):
        validate_results({"schema_version": 2, "records": []})
    (tmp_path / "bad.json").write_text(json.dumps(missing))
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for name in ("bad.json", "garbage.json", "binary.json"):  # one line naming the file, not a parser error
        with pytest.raises(ValueError, match=rf"{name} is not a valid results file"):
            read_results(tmp_path / name)


def test_atomic_writers_never_leave_a_half_written_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp.name.startswith(".results.") and tmp.suffix == ".json"
            tmp.write_text("partial")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # the temporary file is gone
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not mkstemp's 0600
    with atomic_path(path) as first, atomic_path(path) as second:
        assert first != second  # unique temporary names: concurrent writers never share one
        first.write_text("1")
        second.write_text("2")
    assert path.read_text() == "1"  # the last rename wins; both are complete files
