"""The lm-eval command line with the `hf-quantizable` model registered.

    python -m hf_quantizable.evaluation.lm_eval run --model hf-quantizable \\
        --model_args pretrained=runs/opt-gated --tasks wikitext2_local,sst2_local

Without `--include_path` it adds the package's task folder (`paths.LM_EVAL_TASKS_DIR`: the offline
`wikitext2_local`, `sst2_local` and `rte_local` tasks).

The plain `lm_eval` command cannot find `hf-quantizable` (lm-eval 0.4.13 has no plugin entry point for
models), but its stock `hf` model loads our FP and INT8 checkpoints through their saved code:
`lm_eval run --model hf --model_args pretrained=runs/opt-gated-w8a8,trust_remote_code=True ...` (which runs
the checkpoint's own copy of the code: give it only folders you trust). `hf-quantizable` loads our
model types without remote code; `trust_remote_code=True` in its model_args allows foreign code.
"""

import sys

from lm_eval.__main__ import cli_evaluate

from ..paths import LM_EVAL_TASKS_DIR
from . import lm_eval_model  # noqa: F401  (registers "hf-quantizable")


def main() -> int:
    """lm-eval's command line; a bad model or argument is one `error:` line, not a traceback."""
    if len(sys.argv) > 1 and sys.argv[1] == "run" and "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(LM_EVAL_TASKS_DIR)]
    try:
        cli_evaluate()
    except (ValueError, OSError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
