"""The lm-eval command line with the `hf-quantizable` model registered.

    python -m hf_quantizable.evaluation.lm_eval run --model hf-quantizable \\
        --model_args pretrained=runs/opt-gated --tasks wikitext2_local,sst2_local --include_path eval_tasks

The plain `lm_eval` command cannot find `hf-quantizable` (lm-eval 0.4.13 has no plugin entry point for
models), but its stock `hf` model loads our FP and INT8 checkpoints through their saved code:
`lm_eval run --model hf --model_args pretrained=runs/opt-gated-w8a8,trust_remote_code=True ...`.
"""

from lm_eval.__main__ import cli_evaluate

from . import lm_eval_model  # noqa: F401  (registers "hf-quantizable")

if __name__ == "__main__":
    cli_evaluate()
