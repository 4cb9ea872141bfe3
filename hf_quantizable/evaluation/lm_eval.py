"""The lm-eval command line with the `hf-quantizable` model registered.

    python -m hf_quantizable.evaluation.lm_eval run --model hf-quantizable \\
        --model_args pretrained=runs/opt-gated --tasks wikitext2_local,sst2_local --include_path eval_tasks

The plain `lm_eval` command cannot find `hf-quantizable` (lm-eval 0.4.13 has no plugin entry point for
models), but its stock `hf` model loads our FP and INT8 checkpoints through their saved code:
`lm_eval run --model hf --model_args pretrained=runs/opt-gated-w8a8,trust_remote_code=True ...` (which runs
the checkpoint's own copy of the code: give it only folders you trust). `hf-quantizable` loads our
model types without remote code; `trust_remote_code=True` in its model_args allows foreign code.
"""

import sys

from lm_eval.__main__ import cli_evaluate

from . import lm_eval_model  # noqa: F401  (registers "hf-quantizable")


def main() -> int:
    """lm-eval's command line; a bad model or argument is one `error:` line, not a traceback."""
    try:
        cli_evaluate()
    except (ValueError, OSError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
