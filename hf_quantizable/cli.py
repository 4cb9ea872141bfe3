"""Small pieces every command line of the package shares."""

import argparse
import copy


class OneLineErrorParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single `error: ...` line on stderr (exit code 2), like every
    other refusal of the package's commands."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


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
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))


def refuse_unused(given: set[str], unused: dict[str, str]) -> None:
    """Raise ValueError for the first given option in `unused` (dest -> why it does not apply)."""
    for dest, reason in unused.items():
        if dest in given:
            raise ValueError(f"--{dest.replace('_', '-')} {reason}")
