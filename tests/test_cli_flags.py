"""One flag name per concept (issue 24 §2): flags generated from `W8A8Config` and `DataArguments`,
every flag with help text, the old names accepted as deprecated aliases with one warning line."""

import argparse
import re
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from hf_quantizable import evaluate, hub_eval, pipeline, push, quantize, retrofit, train
from hf_quantizable.cli import DataArguments, OneLineErrorParser, given_options, help_less_flags
from hf_quantizable.quantization.config import W8A8Config
from tests.cli_safety import run_main

# Each command's parser and the arguments it needs to parse at all.
COMMANDS = {
    "quantize": (quantize.build_parser, ["MODEL", "--output", "OUT"]),
    "evaluate": (evaluate.build_parser, ["MODEL", "--task", "mlm"]),
    "retrofit": (retrofit.build_parser, ["MODEL", "--output", "OUT", "--dataset", "DATA"]),
    "train": (train.build_parser, []),
    "hub_eval": (hub_eval.build_parser, []),
    "pipeline": (pipeline.build_parser, ["--local-dir", "OUT"]),
    "push": (push.build_parser, ["RUN", "--repo-id", "org/name"]),
}
# Old name -> new name, per command: the table of `hf_quantizable.cli`'s docstring.
ALIASES = [
    ("quantize", "--num-batches", "--num-calibration-batches"),
    ("quantize", "--per-channel", "--per-channel-weights"),
    ("quantize", "--estimator", "--activation-estimator"),
    ("quantize", "--calibration-data", "--dataset"),
    ("pipeline", "--calibration-batches", "--num-calibration-batches"),
    ("pipeline", "--eval-sequences", "--max-sequences"),
    ("train", "--dataset-path", "--dataset"),
    ("retrofit", "--dataset-path", "--dataset"),
    ("retrofit", "--seq-length", "--max-length"),
]


def _value(parser: argparse.ArgumentParser, flag: str) -> list[str]:
    action = parser._option_string_actions[flag]
    if action.nargs in (0, "?"):
        return []
    return ["mse"] if "estimator" in flag else ["7"]


def _without(argv: list[str], flag: str) -> list[str]:
    if flag not in argv:
        return argv
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, str]:
    namespace = {}
    code, _, err = run_main(lambda a: namespace.setdefault("args", parser.parse_args(a)) and 0, argv)
    assert code == 0, err
    return namespace["args"], err


@pytest.mark.parametrize(("command", "old", "new"), ALIASES, ids=[f"{c}{o}" for c, o, _ in ALIASES])
def test_deprecated_alias_parses_as_the_new_flag_with_one_warning(command, old, new):
    build, base = COMMANDS[command]
    parser = build()
    base = _without(base, new)
    value = _value(parser, new)
    with_new, err_new = _parse(build(), [*base, new, *value])
    with_old, err_old = _parse(build(), [*base, old, *value])
    assert vars(with_old) == vars(with_new)
    assert err_new == ""
    assert err_old.splitlines() == [f"warning: {old} is deprecated, use {new} (the old name goes in the next release)"]
    assert not re.search(rf"{old}(?![\w-])", build().format_help())  # --help shows one name per concept
    given = given_options(parser, [*base, old, *value])  # the probe counts the alias as given, silently
    assert parser._option_string_actions[new].dest in given


def test_alias_of_a_required_flag_satisfies_it():
    parser = retrofit.build_parser()
    args, _ = _parse(parser, ["MODEL", "--output", "OUT", "--dataset-path", "DATA"])
    assert args.dataset == "DATA"
    code, _, err = run_main(lambda a: retrofit.build_parser().parse_args(a) and 0, ["MODEL", "--output", "OUT"])
    assert code == 2 and err == "error: the following arguments are required: --dataset (see --help)\n"


def test_deprecated_alias_keeps_the_one_line_errors():
    code, _, err = run_main(quantize.main, ["MODEL", "--output", "OUT", "--num-batches", "many"])
    assert code == 2
    assert err == "error: argument --num-batches: must be an integer >= 1, got 'many' (see --help)\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_text(command):
    parser = COMMANDS[command][0]()
    assert help_less_flags(parser) == []
    hidden = [a.option_strings for a in parser._actions if a.help == argparse.SUPPRESS]
    aliases = [[old] for c, old, _ in ALIASES if c == command]
    assert sorted(hidden) == sorted(aliases)  # nothing but the deprecated aliases is hidden


@pytest.mark.parametrize("command", COMMANDS)
def test_one_spelling_per_flag(command):
    parser = COMMANDS[command][0]()
    for action in parser._actions:
        assert not [o for o in action.option_strings if "_" in o], action.option_strings


def test_every_w8a8config_field_is_a_quantize_flag():
    parser = quantize.build_parser()
    exposed = [f.name for f in fields(W8A8Config) if f.name not in quantize.NOT_FLAGS]
    assert set(quantize.NOT_FLAGS) == {"preset_name"}
    for name in exposed:
        action = parser._option_string_actions[f"--{name.replace('_', '-')}"]
        assert action.dest == name and action.default is None  # None: not given, the preset's / file's value
        assert action.help and action.help == parser._option_string_actions[f"--{name.replace('_', '-')}"].help


@pytest.mark.parametrize("command", ["evaluate", "pipeline"])
def test_w8a8_flags_of_other_commands_are_the_same_fields(command):
    parser = COMMANDS[command][0]()
    names = {f.name for f in fields(W8A8Config)}
    help_of = {f.name: f.metadata["help"] for f in fields(W8A8Config)}
    shared = [a for a in parser._actions if a.dest in names and a.help != argparse.SUPPRESS]
    assert shared and all(a.option_strings == [f"--{a.dest.replace('_', '-')}"] for a in shared)
    assert all(help_of[a.dest] in a.help or a.dest == "clipping_steps" for a in shared)


@pytest.mark.parametrize("command", COMMANDS)
def test_data_flags_are_data_arguments_fields(command):
    parser = COMMANDS[command][0]()
    names = {f.name for f in fields(DataArguments)}
    for action in parser._actions:
        concept = {"dataset_path": "dataset", "seq_length": "max_length", "eval_sequences": "max_sequences"}
        assert action.dest not in concept, f"{command}: {action.option_strings} is {concept.get(action.dest)}"
        if action.dest in names and action.help != argparse.SUPPRESS:
            assert action.option_strings == [f"--{action.dest.replace('_', '-')}"]


def test_a_field_added_to_the_dataclass_becomes_a_flag():
    @dataclass
    class Later(W8A8Config):
        new_knob: int = field(default=3, metadata={"help": "a knob added later"})

    parser = OneLineErrorParser()
    parser.add_dataclass_arguments(Later, [f.name for f in fields(Later) if f.name not in quantize.NOT_FLAGS])
    assert parser.parse_args(["--new-knob", "5"]).new_knob == 5
    assert "a knob added later (default 3)" in parser.format_help()

    @dataclass
    class Helpless:
        knob: int = 1

    with pytest.raises(TypeError, match="Helpless.knob has no help text"):
        OneLineErrorParser().add_dataclass_arguments(Helpless)


def _config(*flags: str) -> W8A8Config:
    return quantize.build_config(quantize.parse_args(["MODEL", "--output", "OUT", *flags]))


def test_generated_quantize_flags_set_the_config():
    assert _config("--per-channel-weights").per_channel_weights is True
    assert _config("--per-channel-weights", "--gamma-migration").gamma_migration is True
    assert _config("--preset", "wei2022-os", "--per-channel-weights", "false").per_channel_weights is False
    assert _config("--preset", "wei2022-os").per_channel_weights is True  # a flag not given keeps the preset's
    assert _config("--keep-fp-modules", "cls", "pooler").keep_fp_modules == ["cls", "pooler"]
    config = _config("--token-wise-clipping", "--clipping-quantiles", "1.0", "0.9", "--clipping-steps", "0")
    assert (config.clipping_quantiles, config.clipping_steps) == ([1.0, 0.9], 0)
    assert _config("--calibration-quantized", "all", "--momentum", "0.5").momentum == 0.5
    assert _config("--weights-only").activation_nodes == "none"
    args = quantize.parse_args(["--gamma-migration", "MODEL", "--per-channel", "--output", "OUT"])
    assert (args.gamma_migration, args.per_channel_weights, args.model_dir) == (True, True, "MODEL")  # as store_true
    assert _config("--bits", "6", "--weight-bits", "8").activation_bits == 6
    with pytest.raises(ValueError, match="--weights-only is --activation-nodes none"):
        _config("--weights-only", "--activation-nodes", "all")
    with pytest.raises(ValueError, match="`clipping_steps` are read only with --token-wise-clipping"):
        _config("--clipping-steps", "3")


def _readme_commands() -> list[tuple[str, list[str]]]:
    """The `python -m hf_quantizable.COMMAND ...` lines of the README's code blocks (continuations joined)."""
    commands, inside, line_so_far = [], False, ""
    for line in (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines():
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line_so_far += line.removesuffix("\\")
        if line.endswith("\\"):
            continue
        match = re.search(r"python -m hf_quantizable\.(\w+) (.*)", line_so_far.split(" # ")[0])
        line_so_far = ""
        if match and match.group(1) in COMMANDS:
            argv = shlex.split(re.sub(r'"\$\(.*?\)"', "MODEL", match.group(2)))
            commands.append((match.group(1), argv))
    return commands


README_COMMANDS = _readme_commands()


def test_readme_has_commands():
    assert {command for command, _ in README_COMMANDS} >= {"train", "retrofit", "quantize", "evaluate", "push"}


@pytest.mark.parametrize(("command", "argv"), README_COMMANDS, ids=[" ".join(a)[:60] for _, a in README_COMMANDS])
def test_readme_commands_parse_without_deprecation_warnings(command, argv):
    _, err = _parse(COMMANDS[command][0](), argv)
    assert err == ""
