"""Small pieces every command line of the package shares."""

import argparse
import copy


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
