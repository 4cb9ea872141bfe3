"""What every quantizable `PreTrainedModel` adds to its stock base class.

Self-contained: torch, transformers and relative imports only.
"""

import shutil
from pathlib import Path

import torch
from transformers import initialization as init
from transformers.utils import cached_file

from . import int8_kernel as kernels
from .attention import AttentionGate, check_attention_implementation
from .int8 import (
    check_int8_config,
    check_int8_loading,
    check_int8_tensors,
    convert_to_int8,
    int8_fp32_tensor_names,
    prepare_int8_runtime,
    set_kernel_choice,
)


class QuantizableModelMixin:
    """`auto_map` for remote code, gate initialisation from `pi_init`, INT8 rebuild and checks on load,
    the attention function of the config's variant.

    Mixed in before the stock `*PreTrainedModel`; subclasses set `auto_map`, and the family knowledge
    generic code reads from the class (through `hf_quantizable.families`) instead of branching on the
    family, the way transformers reads `_no_split_modules`:

    - `_layer_paths`: where the base model keeps its layer list (the first path present; stock
      transformers versions differ);
    - `_outlier_hook_points`: the tensors `evaluation.outliers` hooks, per layer unless `per_layer` is
      False: `kind`, `paths` ((module path, "output" | "input") tried in turn: the quantization point,
      then the stock module), `kurtosis` (whether the tensor carries one);
    - `_keep_fp_modules`: the heads W8A8 keeps in floating point (`W8A8Config.keep_fp_modules`);
    - `_retrofit_modules`: per layer, the attention output projection and the FFN output that
      `hf_quantizable.retrofit` rescales and watches (None: the family is not retrofitted);
    - `_gamma_migration_layer_plan`: per layer, (LayerNorm, the linear layers reading its output) of a
      pre-LN family, which `_gamma_migration_plan()` turns into the Outlier Suppression plan (a
      post-LN family overrides that method);
    - on each model class, `_evaluation_task` (the `hf_quantizable.evaluate` task it runs) and, on the
      pre-training head, `_training_objective` ("mlm", "clm", "image-classification").
    """

    auto_map: dict[str, str] = {}
    _layer_paths: tuple[str, ...] = ()
    _outlier_hook_points: tuple[dict, ...] = ()
    _keep_fp_modules: tuple[str, ...] = ()
    _retrofit_modules: dict[str, str] | None = None
    _gamma_migration_layer_plan: tuple[tuple[str, tuple[str, ...]], ...] = ()
    _evaluation_task: str | None = None
    _training_objective: str | None = None
    _can_record_outputs = None
    # The losses are per-batch means that ignore `num_items_in_batch`: Trainer must scale them itself.
    accepts_loss_kwargs = False

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        config.auto_map = dict(self.auto_map)

    def _base_model_path(self) -> str:
        """The module path of the base model inside this model, with a trailing dot ("" for the base model)."""
        return "" if self.base_model is self else self.base_model_prefix + "."

    def _gamma_migration_plan(self) -> list[tuple[str, list[str], str | None]]:
        """(LayerNorm, linear layers reading its output, residual module whose shortcut reads it) triples of
        gamma migration (`quantization.outlier_suppression`), by module name: here those of
        `_gamma_migration_layer_plan` in every layer of `_layer_paths[0]` (pre-LN: no shortcut reads a
        LayerNorm output; the final LayerNorm leaves the model and stays)."""
        if not self._gamma_migration_layer_plan:
            raise ValueError(f"{type(self).__name__} has no gamma migration plan")
        prefix = self._base_model_path() + self._layer_paths[0]
        layers = self.base_model.get_submodule(self._layer_paths[0])
        return [
            (f"{prefix}.{i}.{norm}", [f"{prefix}.{i}.{linear}" for linear in linears], None)
            for i in range(len(layers))
            for norm, linears in self._gamma_migration_layer_plan
        ]

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        """transformers' check of `attn_implementation` (at init and in `set_attn_implementation`), after
        ours: the clipped variants run their registered function, see `check_attention_implementation`."""
        attn_implementation = check_attention_implementation(self.config.attn_impl, attn_implementation)
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)

    def post_init(self):
        super().post_init()
        if self.config.w8a8_config:
            convert_to_int8(self, self.config.w8a8_config)
            # Scales and zero points stay float32 under `from_pretrained(..., dtype=torch.float16)` (the
            # names are matched as patterns; unescaped dots still match themselves).
            self._keep_in_fp32_modules_strict = set(self._keep_in_fp32_modules_strict) | int8_fp32_tensor_names(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`; an INT8 checkpoint is checked before it is returned.

        Unreadable (truncated) safetensors raise ValueError. Refused for INT8 checkpoints (ValueError
        naming the tensor or module): a `w8a8_config` naming modules the model lacks, INT8 tensors
        missing from the weights or present for modules the config does not quantize, scales that are
        zero, negative or not finite, zero points off the grid.

        `int8_kernel` (INT8 checkpoints only; overrides `HF_QUANTIZABLE_INT8_KERNEL`): `"auto"` runs the
        AVX2 kernel of the installed hf_quantizable package on x86 with AVX2, each GEMM on the faster of
        it and oneDNN (timed once per layer shape); `"avx2"` wherever it can, and where the package is absent builds the checkpoint's own
        `int8_avx2.cpp` (the only way loading compiles code that came with a checkpoint); `"onednn"`
        never runs it.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        int8_kernel = kwargs.pop("int8_kernel", None)
        if int8_kernel is not None:
            kernels.kernel_choice(int8_kernel)  # a bad value is refused before loading
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as error:  # safetensors' error class, by name: modeling/ imports only torch and transformers
            if type(error).__name__ != "SafetensorError":
                raise
            raise ValueError(
                f"{pretrained_model_name_or_path!s}: a weight file is not readable safetensors (truncated or "
                f"corrupt?): {error}"
            ) from None
        if model.config.w8a8_config:
            try:
                check_int8_config(model, model.config.w8a8_config)
                check_int8_loading(model, loading_info["missing_keys"], loading_info["unexpected_keys"])
                check_int8_tensors(model)
            except ValueError as error:
                raise ValueError(f"{pretrained_model_name_or_path!s}: {error}") from None
            if (
                kernels.kernel_choice(int8_kernel) == "avx2"
                and not kernels.ops_registered()
                and kernels.package_kernel_source() is None
            ):
                source = cached_file(
                    pretrained_model_name_or_path,
                    kernels.SOURCE_FILE,
                    _raise_exceptions_for_missing_entries=False,
                    **{k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs},
                )
                if source is not None:  # asked for: the checkpoint's kernel source
                    kernels.build_kernel(source)
            if int8_kernel is not None:
                set_kernel_choice(model, int8_kernel)
            prepare_int8_runtime(model)
        elif int8_kernel is not None:
            raise ValueError(
                f"int8_kernel={int8_kernel!r} applies to INT8 checkpoints only; {pretrained_model_name_or_path!s} is not one"
            )
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; an INT8 model also writes the installed package's kernel
        source (`int8_avx2.cpp`), which its users may build with `int8_kernel="avx2"`."""
        super().save_pretrained(save_directory, *args, **kwargs)
        source = kernels.package_kernel_source()
        if self.config.w8a8_config and source is not None and kwargs.get("is_main_process", True):
            shutil.copyfile(source, Path(save_directory) / kernels.SOURCE_FILE)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AttentionGate):
            std = getattr(self.config, "initializer_range", None) or self.config.init_std
            module.init_gate(init, std)
