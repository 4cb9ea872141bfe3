"""An exact int8 GEMM for x86 CPUs with AVX2 but without VNNI, compiled on first use.

Without VNNI, x86 int8 kernels (oneDNN, MLAS, fbgemm) multiply uint8 x int8 with `vpmaddubsw`, which
adds input pairs in int16, and widen every pair sum to int32 at once (`vpmaddwd`): two multiplier
instructions per 32 multiply-adds. This kernel adds two pair sums in int16 before widening (three
instructions per 64), about 1.25x faster than oneDNN here. It is exact because the weights are split
first (`split_for_int16_lanes`): every int16 lane (four weights of one output, input channels
`8b + 2h + {0, 1, 4, 5}`) keeps same-sign weights whose sum times the largest activation code fits in
int16; the few entries taken off come back in int32 inside the kernel. Its epilogue applies the zero
point, the rescaling and the bias with the float operations of `rescale_accumulator`, so its outputs
equal the simulation's bit for bit. `fake_quantize` does the activation quantizers' arithmetic in
one pass instead of four.

The C++ source is compiled with `torch.utils.cpp_extension.load_inline` (a C++ compiler and ninja
needed; cached per machine). Where that fails, or with `HF_QUANTIZABLE_INT8_KERNEL=onednn`, the
INT8 runtime uses oneDNN. Self-contained: torch and the standard library only (this file is copied
into checkpoints).
"""

import functools
import logging
import os
import platform

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_VAR = "HF_QUANTIZABLE_INT8_KERNEL"
CHOICES = ("auto", "avx2", "onednn")
_NAME = "hf_quantizable_int8_avx2_v4"
_SPLIT_ROWS = 256  # weight rows split at a time

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlockCols = 16;  // output columns per packed block: two ymm of eight int32
constexpr int64_t kTileRows = 4;    // rows per register tile
constexpr int64_t kChunkRows = 128; // rows per pass over the packed weight (their codes stay in L2)

// acc[r][h] (columns 8h .. 8h+7) of `rows` rows of uint8 codes `a` times one packed block `b`. Each
// step reads two quads of input channels: vpmaddubsw per quad, the two int16 results added in int16
// (exact by the weight split), then widened once with vpmaddwd.
template <int R>
inline void tile_product(const uint8_t* a, int64_t lda, const int8_t* b, int64_t quads, int32_t* tile) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < quads; q += 2) {
    const __m256i b00 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + q * 64));
    const __m256i b01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + q * 64 + 32));
    const __m256i b10 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + q * 64 + 64));
    const __m256i b11 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + q * 64 + 96));
    for (int r = 0; r < R; ++r) {
      int32_t first, second;
      std::memcpy(&first, a + r * lda + 4 * q, 4);
      std::memcpy(&second, a + r * lda + 4 * q + 4, 4);
      const __m256i a0 = _mm256_set1_epi32(first), a1 = _mm256_set1_epi32(second);
      const __m256i t0 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, b00), _mm256_maddubs_epi16(a1, b10));
      const __m256i t1 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, b01), _mm256_maddubs_epi16(a1, b11));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(t0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(t1, ones));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kBlockCols), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kBlockCols + 8), acc[r][1]);
  }
}

}  // namespace

// clamp(round(x / scale), -zero_point, levels - zero_point) * scale in one pass: the float operations
// of `fake_quantize_activation` (true division, round half to even, NaN kept), one read and one write.
torch::Tensor fake_quantize(const torch::Tensor& x, double scale, int64_t zero_point, int64_t levels) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "fake_quantize takes contiguous float32");
  auto out = torch::empty_like(x);
  const float s = static_cast<float>(scale), low = static_cast<float>(-zero_point);
  const float high = static_cast<float>(levels - zero_point);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    const __m256 vs = _mm256_set1_ps(s), vlow = _mm256_set1_ps(low), vhigh = _mm256_set1_ps(high);
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(src + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(vhigh, _mm256_max_ps(vlow, v));  // max/min return the second operand for NaN
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(v, vs));
    }
    for (; i < end; ++i) {
      float v = std::nearbyint(src[i] / s);
      v = v < low ? low : v;
      v = v > high ? high : v;
      dst[i] = v * s;
    }
  });
  return out;
}

// int8 weight [N, K] (K a multiple of 8) -> blocks of 16 outputs; in each block, for every quad of
// input channels, two 32-byte halves (outputs 0-7, 8-15) of four consecutive weights per output.
torch::Tensor pack_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.dim() == 2 && weight.size(1) % 8 == 0,
              "pack_weight takes an int8 [N, K] weight with K a multiple of 8");
  const auto w = weight.contiguous();
  const int64_t n_out = w.size(0), k_in = w.size(1), quads = k_in / 4;
  const int64_t blocks = (n_out + kBlockCols - 1) / kBlockCols;
  auto packed = torch::zeros({blocks * quads * 64}, torch::kInt8);
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  for (int64_t n = 0; n < n_out; ++n) {
    const int64_t block = n / kBlockCols, col = n % kBlockCols;
    for (int64_t q = 0; q < quads; ++q)
      std::memcpy(dst + ((block * quads + q) * 2 + col / 8) * 32 + (col % 8) * 4, src + n * k_in + 4 * q, 4);
  }
  return packed;
}

// float32 [M, N]: ((codes - zero_point) @ W.T + entries) * scale (+ bias), the integer sum exact in
// int32. `column_sums` [N] are the packed weight's row sums; the entries taken off by the split are
// `entry_inputs` (positions in `used_inputs`, the input channels they read) / `entry_values`, grouped
// by output through `entry_offsets` [N + 1].
torch::Tensor linear(const torch::Tensor& codes, int64_t zero_point, const torch::Tensor& packed, int64_t n_out,
                     const torch::Tensor& column_sums, const torch::Tensor& entry_offsets,
                     const torch::Tensor& used_inputs, const torch::Tensor& entry_inputs,
                     const torch::Tensor& entry_values,
                     const torch::Tensor& scale, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(1) % 8 == 0, "linear takes contiguous uint8 codes [M, K] with K a multiple of 8");
  const int64_t rows = codes.size(0), k_in = codes.size(1), quads = k_in / 4;
  const int64_t blocks = (n_out + kBlockCols - 1) / kBlockCols;
  TORCH_CHECK(packed.numel() == blocks * quads * 64, "packed weight does not match the codes' width");
  auto out = torch::empty({rows, n_out}, torch::kFloat32);
  const uint8_t* a = codes.data_ptr<uint8_t>();
  const int8_t* b = packed.data_ptr<int8_t>();
  const int32_t* sums = column_sums.data_ptr<int32_t>();
  const int64_t* offsets = entry_offsets.data_ptr<int64_t>();
  const int64_t* inputs = entry_inputs.data_ptr<int64_t>();
  const int32_t* values = entry_values.data_ptr<int32_t>();
  const float* s = scale.data_ptr<float>();
  const float* bias_data = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const int32_t z = static_cast<int32_t>(zero_point);
  // The split-off entries read their input channel across rows: the channels they use, transposed
  // once ([used, rows], row blocks kept in cache while their columns are read).
  const int64_t used = used_inputs.numel();
  std::vector<uint8_t> columns(used * rows);
  const int64_t* used_data = used_inputs.data_ptr<int64_t>();
  for (int64_t m0 = 0; m0 < rows; m0 += 64)
    for (int64_t u = 0; u < used; ++u)
      for (int64_t m = m0; m < std::min(rows, m0 + 64); ++m) columns[u * rows + m] = a[m * k_in + used_data[u]];
  const uint8_t* a_t = columns.data();
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    alignas(32) int32_t tile[kTileRows * kBlockCols];
    std::vector<int32_t> extra(kBlockCols * kChunkRows);  // [column, row] sums of the entries
    for (int64_t m0 = 0; m0 < rows; m0 += kChunkRows) {
      const int64_t m1 = std::min(rows, m0 + kChunkRows), chunk = m1 - m0;
      for (int64_t block = first_block; block < last_block; ++block) {
        const int8_t* panel = b + block * quads * 64;
        const int64_t n0 = block * kBlockCols, cols = std::min(kBlockCols, n_out - n0);
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t n = n0 + c;
          if (offsets[n] == offsets[n + 1]) continue;
          int32_t* dst = extra.data() + c * kChunkRows;
          std::fill(dst, dst + chunk, 0);
          for (int64_t e = offsets[n]; e < offsets[n + 1]; ++e) {
            const uint8_t* src = a_t + inputs[e] * rows + m0;
            const __m256i value = _mm256_set1_epi32(values[e]), zero = _mm256_set1_epi32(z);
            int64_t i = 0;
            for (; i + 8 <= chunk; i += 8) {
              const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
              const __m256i sum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + i));
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                                  _mm256_add_epi32(sum, _mm256_mullo_epi32(_mm256_sub_epi32(x, zero), value)));
            }
            for (; i < chunk; ++i) dst[i] += (static_cast<int32_t>(src[i]) - z) * values[e];
          }
        }
        for (int64_t m = m0; m < m1; m += kTileRows) {
          const int64_t tile_rows = std::min(kTileRows, m1 - m);
          const uint8_t* a_tile = a + m * k_in;
          switch (tile_rows) {
            case 4: tile_product<4>(a_tile, k_in, panel, quads, tile); break;
            case 3: tile_product<3>(a_tile, k_in, panel, quads, tile); break;
            case 2: tile_product<2>(a_tile, k_in, panel, quads, tile); break;
            default: tile_product<1>(a_tile, k_in, panel, quads, tile);
          }
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t n = n0 + c;
            const int32_t offset = z * sums[n];
            const bool has_entries = offsets[n] != offsets[n + 1];
            for (int64_t r = 0; r < tile_rows; ++r) {
              tile[r * kBlockCols + c] -= offset;
              if (has_entries) tile[r * kBlockCols + c] += extra[c * kChunkRows + m - m0 + r];
            }
          }
          for (int64_t r = 0; r < tile_rows; ++r) {
            float* dst = o + (m + r) * n_out + n0;
            if (cols == kBlockCols) {
              for (int h = 0; h < 2; ++h) {
                const __m256 acc = _mm256_cvtepi32_ps(
                    _mm256_load_si256(reinterpret_cast<const __m256i*>(tile + r * kBlockCols + 8 * h)));
                __m256 y = _mm256_mul_ps(acc, _mm256_loadu_ps(s + n0 + 8 * h));
                if (bias_data) y = _mm256_add_ps(y, _mm256_loadu_ps(bias_data + n0 + 8 * h));
                _mm256_storeu_ps(dst + 8 * h, y);
              }
            } else {
              for (int64_t c = 0; c < cols; ++c) {
                float y = static_cast<float>(tile[r * kBlockCols + c]) * s[n0 + c];
                if (bias_data) y = y + bias_data[n0 + c];
                dst[c] = y;
              }
            }
          }
        }
      }
    }
  });
  return out;
}
"""


def kernel_choice() -> str:
    """The INT8 GEMM asked for by `HF_QUANTIZABLE_INT8_KERNEL`: `auto` (default), `avx2` or `onednn`."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not supported; allowed values: {', '.join(CHOICES)}")
    return choice


def fake_quantize(kernel, x: torch.Tensor, scale: float, zero_point: int, levels: int) -> torch.Tensor | None:
    """`fake_quantize_activation` in one pass, where the kernel takes `x` (contiguous float32 on CPU,
    no gradient needed, not traced); None otherwise."""
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or (x.requires_grad and torch.is_grad_enabled())
        or torch.jit.is_tracing()
    ):
        return None
    return kernel.fake_quantize(x, scale, zero_point, levels)


def _cpu_has_avx2() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    )


@functools.cache
def load_avx2_kernel():
    """The compiled kernel module, or None where it cannot be built (with a warning saying why)."""
    if not _cpu_has_avx2():
        logger.warning("The AVX2 int8 kernel needs an x86 CPU with AVX2; using oneDNN.")
        return None
    from torch.utils.cpp_extension import load_inline

    logger.info("Loading the AVX2 int8 kernel (compiled once per machine, about a minute).")
    try:
        return load_inline(
            name=_NAME,
            cpp_sources=_SOURCE,
            functions=["fake_quantize", "pack_weight", "linear"],
            extra_cflags=["-O3", "-mavx2", "-ffp-contract=off"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, read-only cache: the oneDNN route still works
        logger.warning("Could not build the AVX2 int8 kernel (%s); using oneDNN.", error)
        return None


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


def split_for_int16_lanes(weight: torch.Tensor, max_code: int) -> tuple[torch.Tensor, ...]:
    """Split int8 `weight` `[N, K]` into a part whose int16 lanes cannot overflow, plus sparse entries.

    Returns `(dense, rows, columns, values)`: `dense` int8 `[N, K8]` (K padded with zeros to a multiple
    of 8) and the entries `weight - dense` (int32 values). A lane holds the weights of one output at
    input channels `8b + 2h + {0, 1, 4, 5}`; with codes up to `max_code`, its int16 sum is exact when
    `max_code * (sum of its positive weights) <= 32767` and likewise for the negative ones. Lanes
    over the limit give up their excess, largest weights of that sign first.
    """
    limit = 32767 // max_code
    n, k = weight.shape
    k8 = -(-k // 8) * 8
    dense = F.pad(weight, (0, k8 - k))  # a copy
    for start in range(0, n, _SPLIT_ROWS):  # row chunks: int32 / int64 temporaries stay small
        w = dense[start : start + _SPLIT_ROWS].to(torch.int32)
        # [rows, block, quad, half, pair] -> [rows, block, half, quad, pair]: one lane per (row, block, half)
        lanes = w.reshape(-1, k8 // 8, 2, 2, 2).permute(0, 1, 3, 2, 4)
        lanes = lanes.reshape(-1, k8 // 8, 2, 4)
        safe = _trim_lane_sums(lanes.clamp(min=0), limit) - _trim_lane_sums((-lanes).clamp(min=0), limit)
        dense[start : start + _SPLIT_ROWS] = safe.reshape(-1, k8 // 8, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(w.shape)
    removed = F.pad(weight.to(torch.int32), (0, k8 - k)).sub_(dense)
    rows, columns = torch.nonzero(removed, as_tuple=True)
    return dense, rows, columns, removed[rows, columns]


class PackedInt8Weight:
    """An int8 weight prepared for the AVX2 kernel: packed dense part, its sums, the split-off entries."""

    def __init__(self, kernel, weight: torch.Tensor, max_code: int):
        self.kernel = kernel
        self.out_features, self.in_features = weight.shape
        dense, rows, columns, values = split_for_int16_lanes(weight, max_code)
        self.padded_features = dense.shape[1]
        self.packed = kernel.pack_weight(dense)
        self.column_sums = dense.sum(1, dtype=torch.int32)
        counts = torch.bincount(rows, minlength=self.out_features)
        self.entry_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        # nonzero gives row-major order: grouped by output; inputs as positions among the used ones
        self.used_inputs, self.entry_inputs = torch.unique(columns, return_inverse=True)
        self.entry_values = values  # int32

    @property
    def num_entries(self) -> int:
        return self.entry_inputs.numel()

    def linear(
        self, codes: torch.Tensor, zero_point: int, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`((codes - zero_point) @ W.T) * scale (+ bias)` as float32 `[M, N]`; `scale` per output or one."""
        codes = codes.contiguous()
        if self.padded_features != self.in_features:
            codes = F.pad(codes, (0, self.padded_features - self.in_features), value=zero_point)
        scale = scale.float().expand(self.out_features).contiguous()
        bias = None if bias is None else bias.float().contiguous()
        return self.kernel.linear(
            codes,
            zero_point,
            self.packed,
            self.out_features,
            self.column_sums,
            self.entry_offsets,
            self.used_inputs,
            self.entry_inputs,
            self.entry_values,
            scale,
            bias,
        )
