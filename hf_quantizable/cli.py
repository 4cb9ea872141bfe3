"""Small pieces every command line of the package shares.

Flag names: one name per concept across every command, the name of the dataclass field the flag
sets. The quantization flags come from `W8A8Config`'s fields, the data flags from `DataArguments`,
both through transformers' `HfArgumentParser` (help from `field(metadata={"help": ...})`, a bool
as `--flag [true|false]`, a list as several values; only the `--field-name` spelling). Where
commands used different names, the one most commands and the dataclass fields already used won;
the others are deprecated aliases for one release (they work, are hidden from --help, and print
one `warning: OLD is deprecated, use NEW` line on stderr):

    concept               flag                       deprecated aliases (command)
    calibration batches   --num-calibration-batches  --num-batches (quantize), --calibration-batches (pipeline)
    per-channel weights   --per-channel-weights      --per-channel (quantize)
    activation estimator  --activation-estimator     --estimator (quantize)
    data                  --dataset                  --dataset-path (train, retrofit), --calibration-data (quantize)
    sequence length       --max-length               --seq-length (retrofit)
    evaluated sequences   --max-sequences            --eval-sequences (pipeline)

`--num-calibration-batches`, `--per-channel-weights` and `--activation-estimator` are W8A8Config's
field names (as in its JSON and `quantization_config`); `--dataset` is what `train`'s
`data.dataset` and the evaluation settings call it, and covers Hub names as well as local paths;
`--max-length` is the tokenizers' `max_length` (and was already the name in quantize and evaluate).
"""

import argparse
import copy
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser, string_to_bool


class _DeprecatedAlias(argparse.Action):
    """An old flag name: stores through the new flag's action and prints one deprecation line."""

    def __init__(self, option: str, new: str, target: argparse.Action):
        super().__init__(
            [option],
            target.dest,
            nargs=target.nargs,
            const=target.const,
            default=argparse.SUPPRESS,
            type=target.type,
            choices=target.choices,
            help=argparse.SUPPRESS,
            metavar=target.metavar,
        )
        self.new, self.target, self.quiet = new, target, False

    def __call__(self, parser, namespace, values, option_string=None):
        if not self.quiet:
            print(
                f"warning: {self.option_strings[0]} is deprecated, use {self.new} (the old name goes in the next release)",
                file=sys.stderr,
            )
        self.target(parser, namespace, values, self.new)


class OneLineErrorParser(HfArgumentParser):
    """ArgumentParser whose errors are a single `error: ...` line on stderr (exit code 2), like every
    other refusal of the package's commands.

    An `HfArgumentParser` (plain argparse help layout): `add_dataclass_arguments` adds chosen fields
    of a dataclass as flags, `add_deprecated_alias` an old name of a flag.
    """

    def __init__(self, dataclass_types=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        self._deferred_required: dict[str, str] = {}  # dest -> flag: required, but an alias may set it

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        args = _explicit_bools(self, sys.argv[1:] if args is None else list(args))
        namespace, extras = super().parse_known_args(args, namespace)
        missing = [flag for dest, flag in self._deferred_required.items() if getattr(namespace, dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace, extras

    def add_dataclass_arguments(
        self,
        dtype,
        names: typing.Iterable[str] | None = None,
        *,
        group: argparse._ActionsContainer | None = None,
        defaults: dict[str, typing.Any] | None = None,
        types: dict[str, typing.Callable] | None = None,
        helps: dict[str, str] | None = None,
        required: typing.Iterable[str] = (),
        optional: bool = False,
    ) -> list[argparse.Action]:
        """Add the fields `names` (default: all) of the dataclass `dtype` as flags.

        Each field goes through `HfArgumentParser`'s field parsing: the flag `--field-name`, the type from the annotation (`X | None` as X, lists as several values, a bool as
        `--flag [true|false]`), the help from `field(metadata={"help": ...})` (a field without one is
        refused), the default from the field, followed by `(default ...)` in the help.

        Per command: `defaults`, `types` (an argparse type such as `positive_int`) and `helps`
        override the field's; `required` fields have no default; `optional=True` makes every default
        None, so a flag that is not given leaves the value to a preset or a config file.
        """
        defaults, types_, helps, required = defaults or {}, types or {}, helps or {}, set(required)
        hints = typing.get_type_hints(dtype)
        by_name = {f.name: f for f in dataclasses.fields(dtype)}
        container = group if group is not None else self
        added = []
        for name in by_name if names is None else names:
            source = by_name[name]
            help_text = helps.get(name, source.metadata.get("help"))
            if not help_text:
                raise TypeError(f"{dtype.__name__}.{name} has no help text: field(metadata={{'help': ...}})")
            if name in required:
                default = dataclasses.MISSING
            elif name in defaults:
                default = defaults[name]
            elif optional:
                default = None
            elif source.default_factory is not dataclasses.MISSING:
                default = source.default_factory()
            else:
                default = source.default
            shown = _field_default(source) if optional and name not in defaults else default
            if shown not in (None, False, dataclasses.MISSING) and "default" not in help_text:
                help_text += f" (default {_show(shown)})"
            metadata = {k: v for k, v in source.metadata.items() if k != "help"}
            metadata["help"] = help_text.replace("%", "%%")
            if isinstance(default, list):
                derived = field(default_factory=lambda value=default: list(value), metadata=metadata)
            else:
                derived = field(default=default, metadata=metadata)
            derived.name = name
            derived.type = types_.get(name, _without_none(hints[name]))
            HfArgumentParser._parse_dataclass_field(container, derived)
            flag = f"--{name.replace('_', '-')}"
            action = self._option_string_actions[flag]
            if flag != f"--{name}":  # one spelling per flag: --field-name, not also transformers' --field_name
                action.option_strings.remove(f"--{name}")
                del self._option_string_actions[f"--{name}"]
            added.append(action)
        return added

    def add_deprecated_alias(self, old: str, new: str) -> None:
        """Accept `old` for the flag `new` (same value), with a deprecation line on stderr."""
        target = self._option_string_actions[new]
        if target.required:
            target.required = False
            self._deferred_required[target.dest] = new
        self._add_action(_DeprecatedAlias(old, new, target))


_BOOL_WORDS = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}


def _explicit_bools(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """`--flag` of a generated bool followed by something that is not a truth value (a positional
    argument) -> `--flag true`: such a flag alone still means true wherever it stands, as the
    `store_true` flags it replaced did, and `--flag false` still sets false."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        out.append(arg)
        action = parser._option_string_actions.get(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if (
            action is not None
            and action.type is string_to_bool
            and following is not None
            and not following.startswith("-")
            and following.lower() not in _BOOL_WORDS
        ):
            out.append("true")
    return out


def _field_default(source: dataclasses.Field):
    if source.default_factory is not dataclasses.MISSING:
        return source.default_factory()
    return source.default


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _without_none(annotation):
    """`X | None` -> X (a bool stays a bool, so `--flag` alone still means true)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


@dataclass
class DataArguments:
    """The data flags every command shares: one field (and flag name) per concept.

    Each command exposes the fields it reads (`OneLineErrorParser.add_dataclass_arguments`), with
    its own defaults where they differ (evaluation 8 examples a batch, calibration 16, ...).
    """

    dataset: str | None = field(default=None, metadata={"help": "data: a Hub dataset name or a local file / folder"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration"})
    data_files: str | None = field(
        default=None, metadata={"help": "files for a builder name given as --dataset (text, json, csv, imagefolder)"}
    )
    split: str | None = field(default=None, metadata={"help": "evaluation split"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    image_column: str = field(default="image", metadata={"help": "column holding the image"})
    label_column: str = field(default="label", metadata={"help": "column holding the label"})
    max_sequences: int = field(default=128, metadata={"help": "sequences / images evaluated"})
    max_length: int = field(default=128, metadata={"help": "tokens per sequence"})
    batch_size: int = field(default=8, metadata={"help": "examples per batch"})


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def one_line(error: BaseException) -> str:
    """An exception's message on one line (multi-line library errors folded)."""
    return " ".join(str(error).split())


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """`dest` names of the options the user actually passed in `argv` (defaults excluded)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
        if isinstance(action, _DeprecatedAlias):
            action.quiet = True
    if isinstance(probe, OneLineErrorParser):
        probe._deferred_required = {}
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))


def refuse_unused(given: set[str], unused: dict[str, str]) -> None:
    """Raise ValueError for the first given option in `unused` (dest -> why it does not apply)."""
    for dest, reason in unused.items():
        if dest in given:
            raise ValueError(f"--{dest.replace('_', '-')} {reason}")


def help_less_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Flags of `parser` shown without help text (deprecated aliases are hidden, not help-less)."""
    return [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
