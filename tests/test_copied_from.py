"""`# Copied from` markers of the modeling files: every marked copy equals its original.

As transformers' `utils/check_copies.py`: the line before a class or function reads
`# Copied from hf_quantizable.modeling.<module>.<object path> [with A->B[, C->D]]`; the original's
source, with each `A` replaced by `B`, must parse to the same code as the copy (comments and line
wrapping aside). A statement of the copy's body (or of a body of a class it holds) preceded by a
`# Ignore copy` line may differ from the original's statement in the same place.
"""

import ast
import re
from pathlib import Path

import pytest

import hf_quantizable

MODELING = Path(hf_quantizable.__file__).parent / "modeling"
MARKER = re.compile(r"^\s*# Copied from hf_quantizable\.modeling\.(\w+)\.([\w.]+)(?: with (.+?))?\s*$")
IGNORE = "# Ignore copy"


def _find(tree: ast.AST, path: str) -> ast.AST:
    node = tree
    for name in path.split("."):
        node = next(
            (
                child
                for child in getattr(node, "body", [])
                if isinstance(child, (ast.ClassDef, ast.FunctionDef)) and child.name == name
            ),
            None,
        )
        if node is None:
            raise LookupError(f"no {path} (missing {name})")
    return node


def _replace(source: str, replacements: str | None) -> str:
    for pair in (replacements or "").split(","):
        if pair.strip():
            old, new = (part.strip() for part in pair.split("->"))
            source = source.replace(old, new)
    return source


def _header(node: ast.AST) -> str:
    """The node without its body (name, bases, arguments, decorators, return annotation)."""
    fields = {name: value for name, value in ast.iter_fields(node) if name != "body"}
    return ast.dump(type(node)(body=[], **fields))


def _differences(copy: ast.AST, original: ast.AST, copy_lines: list[str], where: str) -> list[str]:
    if type(copy) is not type(original) or (
        isinstance(copy, (ast.ClassDef, ast.FunctionDef)) and _header(copy) != _header(original)
    ):
        return [f"{where}: differs"]
    if not isinstance(copy, (ast.ClassDef, ast.FunctionDef)):
        return [] if ast.dump(copy) == ast.dump(original) else [f"{where}: differs"]
    if len(copy.body) != len(original.body):
        return [f"{where}: {len(copy.body)} statements, the original {len(original.body)}"]
    found = []
    for i, (mine, theirs) in enumerate(zip(copy.body, original.body)):
        first = min([mine.lineno, *(d.lineno for d in getattr(mine, "decorator_list", []))])
        if copy_lines[first - 2].strip() == IGNORE:
            continue
        found += _differences(mine, theirs, copy_lines, f"{where}, statement {i + 1} (line {mine.lineno})")
    return found


def marked_copies(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line of the marker, original module, original object path, replacements) of each marker."""
    lines = path.read_text().splitlines()
    return [(i + 1, *m.groups()) for i, line in enumerate(lines) if (m := MARKER.match(line))]


def check_copy(
    copy_source: str, marker_line: int, module: str, object_path: str, replacements: str | None
) -> list[str]:
    """What differs between the object after `marker_line` in `copy_source` and its original."""
    tree = ast.parse(copy_source)
    copy = next(
        (
            node
            for node in ast.walk(tree)
            if isinstance(node, (ast.ClassDef, ast.FunctionDef))
            and min([node.lineno, *(d.lineno for d in node.decorator_list)]) == marker_line + 1
        ),
        None,
    )
    if copy is None:
        return [f"line {marker_line}: no class or function follows the marker"]
    original_file = MODELING / f"{module}.py"
    if not original_file.is_file():
        return [f"line {marker_line}: no module {module}"]
    original_source = original_file.read_text()
    try:
        original = _find(ast.parse(original_source), object_path)
    except LookupError as error:
        return [f"line {marker_line}: {error}"]
    segment = ast.get_source_segment(original_source, original)
    indent = original.col_offset
    dedented = "\n".join(line[indent:] if i else line for i, line in enumerate(segment.splitlines()))
    replaced = ast.parse(_replace(dedented, replacements)).body[0]
    return _differences(copy, replaced, copy_source.splitlines(), f"{copy.name} (line {copy.lineno})")


MARKED = [(path, *marker) for path in sorted(MODELING.glob("*.py")) for marker in marked_copies(path)]


def test_the_modeling_files_mark_their_copies():
    names = {(path.name, obj) for path, _, _, obj, _ in MARKED}
    assert names >= {
        ("modeling_quantizable_vit.py", "QuantizableBertIntermediate"),
        ("modeling_quantizable_vit.py", "QuantizableBertEncoder"),
        ("modeling_quantizable_bert.py", "QuantizableBertForMaskedLM.forward"),
    }


@pytest.mark.parametrize("path, line, module, obj, replacements", MARKED, ids=lambda v: getattr(v, "name", str(v)))
def test_marked_copies_equal_their_originals(path, line, module, obj, replacements):
    assert check_copy(path.read_text(), line, module, obj, replacements) == []


def test_a_copy_that_drifts_is_found():
    """The check can fail: an edited copy, a wrong replacement, an unmarked difference, a missing original."""
    vit = (MODELING / "modeling_quantizable_vit.py").read_text()
    line, module, obj, replacements = next(m for m in marked_copies(MODELING / "modeling_quantizable_vit.py"))
    assert check_copy(vit, line, module, obj, replacements) == []
    drifted = vit.replace("self.intermediate_act_fn(self.dense(hidden_states))", "self.dense(hidden_states)", 1)
    assert check_copy(drifted, line, module, obj, replacements)
    assert check_copy(vit, line, module, obj, "Bert->Vit")
    assert check_copy(vit, line, module, "QuantizableBertNothing", replacements)
    bert = (MODELING / "modeling_quantizable_bert.py").read_text()
    line, module, obj, replacements = next(m for m in marked_copies(MODELING / "modeling_quantizable_bert.py"))
    assert check_copy(bert, line, module, obj, replacements) == []
    unmarked = bert.replace(
        "        # Ignore copy\n        if labels is not None:", "        if labels is not None:", 1
    )
    assert check_copy(unmarked, line, module, obj, replacements)
