"""Where the INT8 runtime's AVX2 kernel comes from, and the weight preparation it needs.

The kernel is C++ in the package (`hf_quantizable/csrc/int8_avx2.cpp`, whose comments say how it
works). It registers the ops `torch.ops.hf_quantizable.{fake_quantize, fake_quantize_with_codes,
pack_weight, linear, grid_matmul}` with CPU kernels and Meta kernels (shapes only, so
`torch.compile` traces through them). Its fused activation quantizer (one pass that also writes the
uint8 codes) and its integer attention products serve every x86 CPU with AVX2. Its GEMM serves x86
CPUs without VNNI, where the int8 GEMMs of oneDNN / MLAS / fbgemm add input pairs in int16 and need
two multiplier instructions per 32 multiply-adds; the kernel adds two pair sums in int16 before
widening (three per 64) and stays exact: `split_for_int16_lanes` takes off the few weights that would
let one pair saturate (added back in int32 inside the kernel), and its `pack_weight` pairs the input
quads of each block of 16 outputs so that no int16 lane overflows. On CPUs with AVX512-VNNI
(`vnni_available`) the same GEMM adds each quad's products straight into int32 (`vpdpbusd`): exact
on any weight, nothing split off. Its epilogue applies the zero point, rescaling and bias with the
float operations of `rescale_accumulator`, so it equals the simulation bit for bit. `auto` times it
against oneDNN's GEMM on each layer shape and keeps the faster (`Int8Linear.gemm_route`).

Where the ops come from (`avx2_ops`):
- already registered in this process (by the package or an earlier load);
- the installed hf_quantizable package: its source file is compiled on first use
  (`torch.utils.cpp_extension.load`: a C++ compiler and ninja needed, cached per machine);
- never from a checkpoint's files, unless asked: `from_pretrained(..., int8_kernel="avx2")` or
  `HF_QUANTIZABLE_INT8_KERNEL=avx2` builds the `int8_avx2.cpp` an INT8 checkpoint ships
  (`build_kernel`), for users without the package.
Without them, or with `onednn` asked for, the runtime takes the exact oneDNN / torch route.

Self-contained: torch and the standard library only (this file is copied into checkpoints).
"""

import hashlib
import importlib.util
import logging
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_VAR = "HF_QUANTIZABLE_INT8_KERNEL"
CHOICES = ("auto", "avx2", "onednn")
SOURCE_FILE = "int8_avx2.cpp"  # in the package's csrc/, and next to an INT8 checkpoint's weights
_CFLAGS = ["-O3", "-mavx2", "-ffp-contract=off"]
_SPLIT_ROWS = 256  # weight rows split at a time


def kernel_choice(requested: str | None = None) -> str:
    """The INT8 GEMM asked for: `requested` (`from_pretrained(..., int8_kernel=...)`), else
    `HF_QUANTIZABLE_INT8_KERNEL`: `auto` (default), `avx2` or `onednn` (never compiles anything)."""
    source = "int8_kernel" if requested is not None else ENV_VAR
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    choice = str(choice).strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{source}={choice!r} is not supported; allowed values: {', '.join(CHOICES)}")
    return choice


def cpu_has_avx2() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    )


def _onednn_accumulator(codes: torch.Tensor, zero_point: int, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    unit_scales = torch.ones(out_features)
    zero_points = torch.zeros(out_features, dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, zero_point, packed, unit_scales, zero_points, None, 1.0, 0, torch.float32, "none", [None], ""
    )


def _onednn_accumulator_shape(codes: torch.Tensor, zero_point: int, packed: torch.Tensor, out_features: int):
    return codes.new_empty((codes.shape[0], out_features), dtype=torch.float32)


# An op of its own, so that torch.compile calls oneDNN with the weight packed at load (inductor lowers
# `onednn.qlinear_pointwise` only for weights it froze itself). Registered once per process, also
# when the package and a checkpoint's copy of this file are both imported.
_ONEDNN_OP = "hf_quantizable_onednn::int8_accumulator"
if not hasattr(torch.ops.hf_quantizable_onednn, "int8_accumulator"):
    torch.library.custom_op(_ONEDNN_OP, mutates_args=())(_onednn_accumulator).register_fake(_onednn_accumulator_shape)


def onednn_int8_accumulator(
    codes: torch.Tensor, zero_point: int, packed: torch.Tensor, out_features: int
) -> torch.Tensor:
    """`(codes - zero_point) @ W.T` as float32 with oneDNN's int8 GEMM (uint8 x int8, int32 accumulation)."""
    return torch.ops.hf_quantizable_onednn.int8_accumulator(codes, zero_point, packed, out_features)


_PAIRS_SATURATE: list[bool] = []  # the probe's answer, once per process


def int8_gemm_saturates() -> bool:
    """Whether this CPU's int8 GEMM adds input pairs in int16 and saturates (x86 without VNNI or AMX).

    Probed once with a product that saturates there (255 x 127 pairs).
    """
    if not _PAIRS_SATURATE:
        codes = torch.full((32, 64), 255, dtype=torch.uint8)
        packed = torch.ops.onednn.qlinear_prepack(torch.full((16, 64), 127, dtype=torch.int8), [32, 64])
        exact = bool((onednn_int8_accumulator(codes, 0, packed, 16) == 255 * 127 * 64).all())
        _PAIRS_SATURATE.append(not exact)
    return _PAIRS_SATURATE[0]


def ops_registered() -> bool:
    """Whether `torch.ops.hf_quantizable` holds the kernel's ops in this process."""
    return hasattr(torch.ops.hf_quantizable, "linear")


def package_kernel_source() -> Path | None:
    """The kernel source of the installed hf_quantizable package (found without importing it), else None."""
    try:
        spec = importlib.util.find_spec("hf_quantizable")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "csrc" / SOURCE_FILE
    return source if source.is_file() else None


_BUILDS: dict[str, bool] = {}  # source file -> whether its build registered the ops


def build_kernel(source: str | Path) -> bool:
    """Compile the kernel source file `source` and register its ops; False (with a warning) where it cannot.

    Built once per machine and source file (the extension's name holds a hash of its path and contents),
    loaded once per process.
    """
    if ops_registered():
        return True
    source = Path(source).resolve()
    if str(source) not in _BUILDS:
        _BUILDS[str(source)] = _build(source)
    return _BUILDS[str(source)]


def _build(source: Path) -> bool:
    if not cpu_has_avx2():
        logger.warning("The AVX2 int8 kernel needs an x86 CPU with AVX2; using oneDNN.")
        return False
    from torch.utils.cpp_extension import load

    # The build folder is per source file and contents: the package's build and a checkpoint's copy
    # never share one (sharing made each alternate load recompile: the build command names the path).
    digest = hashlib.sha256(source.read_bytes() + str(source).encode()).hexdigest()[:16]
    logger.info("Building the AVX2 int8 kernel from %s (once per machine, about a minute).", source)
    try:
        load(
            name=f"hf_quantizable_int8_avx2_{digest}",
            sources=[str(source)],
            extra_cflags=_CFLAGS,
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, read-only cache: the oneDNN route still works
        logger.warning("Could not build the AVX2 int8 kernel (%s); using oneDNN.", error)
        return False
    return ops_registered()


_ABSENT_LOGGED: list[bool] = []


def avx2_ops(requested: str | None = None) -> bool:
    """Whether the INT8 runtime may run the AVX2 kernel's ops (`torch.ops.hf_quantizable`) for the
    choice `requested` (else the environment's; see `kernel_choice`).

    `auto` and `avx2` take them wherever they are available (x86 with AVX2), building them only from
    the installed package's source; `onednn` never does. The activation quantizers and the attention
    products then run on the kernel; which GEMM each linear layer runs is `Int8Linear.gemm_route`'s
    decision (`auto`: the faster one, measured).
    """
    choice = kernel_choice(requested)
    if choice == "onednn":
        return False
    if ops_registered():
        return True
    source = package_kernel_source()
    if source is not None:
        return build_kernel(source)
    if not _ABSENT_LOGGED:
        _ABSENT_LOGGED.append(True)
        logger.warning(
            "The AVX2 int8 kernel is not available (the hf_quantizable package is not installed); using oneDNN. "
            "Install hf_quantizable, or load with int8_kernel='avx2' to build the checkpoint's %s.",
            SOURCE_FILE,
        )
    return False


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int, levels: int, codes: bool = False):
    """`fake_quantize_activation` in one pass where the kernel takes `x` (float32 on CPU, contiguous, no
    gradient needed, not traced for ONNX); None otherwise. With `codes`, `(output, uint8 codes)`."""
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or (x.requires_grad and torch.is_grad_enabled())
        or torch.jit.is_tracing()
    ):
        return None
    if codes:
        return torch.ops.hf_quantizable.fake_quantize_with_codes(x, scale, zero_point, levels)
    return torch.ops.hf_quantizable.fake_quantize(x, scale, zero_point, levels)


def _trim_lane_sums(magnitude: torch.Tensor, limit: int) -> torch.Tensor:
    """`magnitude` with each lane's (last axis) excess over `limit` taken off its largest entries first
    (one entry changes in most lanes over the limit)."""
    ordered, order = magnitude.sort(-1, descending=True)
    excess = (ordered.sum(-1) - limit).clamp(min=0)
    for j in range(ordered.shape[-1]):
        taken = torch.minimum(excess, ordered[..., j])
        ordered[..., j] -= taken
        excess -= taken
    return torch.empty_like(magnitude).scatter_(-1, order, ordered)


def split_for_int16_lanes(weight: torch.Tensor, max_code: int, padded: bool = True) -> tuple[torch.Tensor, ...]:
    """Split int8 `weight` `[N, K]` into a part whose input pairs cannot saturate, plus sparse entries.

    The one answer to int16 saturation of every route: the AVX2 kernel, oneDNN's GEMM and the ONNX
    export (ONNX Runtime's) on CPUs without VNNI. Returns `(dense, rows, columns, values)`: `dense`
    int8 `[N, K8]` (K padded with zeros to a multiple of 8; `[N, K]` unless `padded`) and the entries
    `weight - dense` (int32 values). `vpmaddubsw` adds the products of input
    channels `(2i, 2i + 1)` in int16; with codes up to `max_code` that sum is exact when
    `max_code * (sum of the pair's positive weights) <= 32767`, and likewise for the negative ones.
    Pairs over the limit give up their excess, the larger weight first. (Adding two pairs in int16,
    the kernel's pairing of quads checks on `dense`.)
    """
    limit = 32767 // max_code
    n, k = weight.shape
    k8 = -(-k // 8) * 8
    dense = F.pad(weight, (0, k8 - k))  # a copy
    for start in range(0, n, _SPLIT_ROWS):  # row chunks: int32 / int64 temporaries stay small
        pairs = dense[start : start + _SPLIT_ROWS].to(torch.int32).reshape(-1, k8 // 2, 2)
        safe = _trim_lane_sums(pairs.clamp(min=0), limit) - _trim_lane_sums((-pairs).clamp(min=0), limit)
        dense[start : start + _SPLIT_ROWS] = safe.reshape(-1, k8)
    removed = F.pad(weight.to(torch.int32), (0, k8 - k)).sub_(dense)
    rows, columns = torch.nonzero(removed, as_tuple=True)
    return dense if padded else dense[:, :k].contiguous(), rows, columns, removed[rows, columns]


def vnni_available() -> bool:
    """Whether the kernel's GEMM can use VNNI here (AVX512-VNNI: `vpdpbusd`, no int16 saturation).

    False also where the registered ops predate it (an older installed package serving a checkpoint)."""
    return hasattr(torch.ops.hf_quantizable, "vnni_available") and torch.ops.hf_quantizable.vnni_available()


class PackedInt8Weight:
    """An int8 weight prepared for the AVX2 kernel: packed dense part, its sums, the split-off entries.

    With `vnni` (default: where the CPU has it, `vnni_available`) the kernel's GEMM adds each input
    quad's products straight in int32: the weight is packed whole, with nothing split off.
    """

    def __init__(self, weight: torch.Tensor, max_code: int, vnni: bool | None = None):
        self.out_features, self.in_features = weight.shape
        self.vnni = vnni_available() if vnni is None else vnni
        if self.vnni:
            dense = F.pad(weight, (0, -(-self.in_features // 8) * 8 - self.in_features))
            rows = columns = torch.zeros(0, dtype=torch.long)
            values = torch.zeros(0, dtype=torch.int32)
        else:
            dense, rows, columns, values = split_for_int16_lanes(weight, max_code)
        self.padded_features = dense.shape[1]
        limit = 32767 if self.vnni else 32767 // max_code  # with VNNI no lane can overflow: any pairing does
        self.packed, self.step_offsets, self.safe_steps = torch.ops.hf_quantizable.pack_weight(dense, limit)
        self.column_sums = dense.sum(1, dtype=torch.int32)
        counts = torch.bincount(rows, minlength=self.out_features)
        self.entry_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        # nonzero gives row-major order: grouped by output; inputs as positions among the used ones
        self.used_inputs, self.entry_inputs = torch.unique(columns, return_inverse=True)
        self.entry_values = values  # int32

    def linear(
        self,
        codes: torch.Tensor,
        zero_point: int,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """`((codes - zero_point) @ W.T) * scale (+ bias)` as float32 `[M, N]`; `scale` per output or one."""
        codes = codes.contiguous()
        if self.padded_features != self.in_features:
            codes = F.pad(codes, (0, self.padded_features - self.in_features), value=zero_point)
        scale = scale.float().expand(self.out_features).contiguous()
        bias = None if bias is None else bias.float().contiguous()
        return torch.ops.hf_quantizable.linear(
            codes,
            zero_point,
            self.packed,
            self.step_offsets,
            self.safe_steps,
            self.out_features,
            self.column_sums,
            self.entry_offsets,
            self.used_inputs,
            self.entry_inputs,
            self.entry_values,
            scale,
            bias,
            *((True,) if self.vnni else ()),  # ops that predate `vnni` take the int16 path without it
        )
