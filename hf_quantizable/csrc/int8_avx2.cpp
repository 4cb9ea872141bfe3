// The INT8 runtime's kernels for x86 CPUs with AVX2 (no VNNI needed), registered as the ops
// `torch.ops.hf_quantizable.*` (hf_quantizable/modeling/int8_kernel.py builds and finds them).
//
// - `linear`: (uint8 codes - zero point) x int8 weight, int32 sums, then the simulation's rescaling and
//   bias. Without VNNI, `vpmaddubsw` adds input pairs in int16; this kernel also adds two such pair
//   sums in int16 before widening with `vpmaddwd` (three multiplier instructions per 64 multiply-adds,
//   oneDNN's GEMM needs four). Exact because the Python side takes off the weights that could let a
//   pair saturate (`split_for_int16_lanes`, added back here in int32) and `pack_weight` pairs the quads
//   of input channels so that no added int16 lane can overflow (pairs it cannot make safe are widened
//   one by one). With `vnni` (CPUs with AVX512-VNNI, `vnni_available`), `vpdpbusd` adds each quad's
//   four products straight into the int32 sums: exact on any weight, so nothing is split or paired.
// - `fake_quantize` / `fake_quantize_with_codes`: the activation quantizers' arithmetic in one pass
//   (optionally writing the uint8 codes an integer GEMM reads).
// - `grid_matmul`: the attention products of activations on grids (Q.K^T, P.V) as int16 `vpmaddwd`
//   products with int32 sums, reading the heads of Q, K and V in place.
// Each op has a Meta kernel (shapes only) for torch.compile / FakeTensor tracing.

#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlockCols = 16;  // output columns per packed block: two ymm of eight int32
constexpr int64_t kTileRows = 4;    // rows per register tile
constexpr int64_t kVnniTileRows = 8;  // rows per register tile with VNNI (16 zmm sums)
constexpr int64_t kChunkRows = 128;          // at most this many rows per pass over the packed weight
constexpr int64_t kChunkBytes = 192 * 1024;  // and at most this many bytes of their codes (they stay in L2)

// One step of `tile_product`: with `kPaired`, the two quads' int16 results are added before widening.
template <int R, bool kPaired>
inline void step_product(const uint8_t* a, int64_t lda, const int8_t* step, const int32_t* offsets, __m256i (&acc)[R][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i b00 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step));
  const __m256i b01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + 32));
  const __m256i b10 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + 64));
  const __m256i b11 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + 96));
  const uint8_t* first_quad = a + offsets[0];
  const uint8_t* second_quad = a + offsets[1];
  for (int r = 0; r < R; ++r) {
    int32_t first, second;
    std::memcpy(&first, first_quad + r * lda, 4);
    std::memcpy(&second, second_quad + r * lda, 4);
    const __m256i a0 = _mm256_set1_epi32(first), a1 = _mm256_set1_epi32(second);
    if (kPaired) {
      const __m256i t0 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, b00), _mm256_maddubs_epi16(a1, b10));
      const __m256i t1 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, b01), _mm256_maddubs_epi16(a1, b11));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(t0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(t1, ones));
    } else {
      const __m256i t0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, b00), ones),
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(a1, b10), ones));
      const __m256i t1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, b01), ones),
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(a1, b11), ones));
      acc[r][0] = _mm256_add_epi32(acc[r][0], t0);
      acc[r][1] = _mm256_add_epi32(acc[r][1], t1);
    }
  }
}

// acc[r][h] (columns 8h .. 8h+7) of `R` rows of uint8 codes `a` times one packed block `b`. Each step
// reads two quads of input channels (byte offsets `offsets[2i]`, `offsets[2i + 1]`), one vpmaddubsw
// per quad; in the first `safe_steps` steps their int16 results are added in int16 (exact: the
// pairing checked it) and widened once with vpmaddwd, in the others each is widened on its own.
template <int R>
inline void tile_product(const uint8_t* a, int64_t lda, const int8_t* b, const int32_t* offsets, int64_t safe_steps,
                         int64_t steps, int32_t* tile) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i < safe_steps; ++i) step_product<R, true>(a, lda, b + i * 128, offsets + 2 * i, acc);
  for (; i < steps; ++i) step_product<R, false>(a, lda, b + i * 128, offsets + 2 * i, acc);
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kBlockCols), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kBlockCols + 8), acc[r][1]);
  }
}

// `tile_product` with VNNI: per row and step, one `vpdpbusd` per quad adds its four uint8 x int8
// products to the 16 int32 sums of the block (a quad's 64 packed bytes are the 16 outputs' four
// weights, in output order). The two quads of a step go to separate sums (shorter dependency chains).
template <int R>
__attribute__((target("avx2,avx512f,avx512vl,avx512vnni"))) void tile_product_vnni(
    const uint8_t* a, int64_t lda, const int8_t* b, const int32_t* offsets, int64_t steps, int32_t* tile) {
  __m512i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  for (int64_t i = 0; i < steps; ++i) {
    const __m512i b0 = _mm512_loadu_si512(b + i * 128);
    const __m512i b1 = _mm512_loadu_si512(b + i * 128 + 64);
    const uint8_t* first_quad = a + offsets[2 * i];
    const uint8_t* second_quad = a + offsets[2 * i + 1];
    for (int r = 0; r < R; ++r) {
      int32_t first, second;
      std::memcpy(&first, first_quad + r * lda, 4);
      std::memcpy(&second, second_quad + r * lda, 4);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_set1_epi32(first), b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_set1_epi32(second), b1);
    }
  }
  for (int r = 0; r < R; ++r)
    _mm512_storeu_si512(tile + r * kBlockCols, _mm512_add_epi32(acc[r][0], acc[r][1]));
}

// Whether this CPU (and its OS) runs AVX512-VNNI with 512-bit registers.
bool cpu_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

// Whether two quads' int16 lanes (`loads`: per column, pair and sign, the sum of that sign's weight
// magnitudes) stay within `limit` when added.
inline bool fits(const int16_t* first, const int16_t* second, const __m256i limit) {
  __m256i over = _mm256_setzero_si256();
  for (int v = 0; v < 4; ++v) {
    const __m256i sum = _mm256_add_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + 16 * v)),
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + 16 * v)));
    over = _mm256_or_si256(over, _mm256_cmpgt_epi16(sum, limit));
  }
  return _mm256_testz_si256(over, over);
}

}  // namespace

// clamp(round(x / scale), -zero_point, levels - zero_point) * scale in one pass: the float operations
// of `fake_quantize_activation` (true division, round half to even, NaN kept), one read and one write.
// `out_buffer`: the output to write into, else a new tensor. `codes_out`: where
// to also write the uint8 codes (step + zero_point; levels <= 255), for the integer GEMMs reading it.
torch::Tensor fake_quantize_into(const torch::Tensor& x, double scale, int64_t zero_point, int64_t levels,
                                 const c10::optional<torch::Tensor>& out_buffer, const c10::optional<torch::Tensor>& codes_out) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "fake_quantize takes contiguous float32");
  auto out = out_buffer.has_value() ? *out_buffer : torch::empty_like(x);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.sizes() == x.sizes(),
              "fake_quantize: the output buffer does not match the input");
  TORCH_CHECK(!codes_out.has_value() || (codes_out->scalar_type() == torch::kUInt8 && codes_out->is_contiguous() &&
                                         codes_out->sizes() == x.sizes() && levels <= 255),
              "fake_quantize: the codes buffer does not match the input (uint8, at most 8 bits)");
  const float s = static_cast<float>(scale), low = static_cast<float>(-zero_point);
  const float high = static_cast<float>(levels - zero_point);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint8_t* codes = codes_out.has_value() ? codes_out->data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    const __m256 vs = _mm256_set1_ps(s), vlow = _mm256_set1_ps(low), vhigh = _mm256_set1_ps(high);
    const __m256i vz = _mm256_set1_epi32(static_cast<int32_t>(zero_point));
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(src + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(vhigh, _mm256_max_ps(vlow, v));  // max/min return the second operand for NaN
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(v, vs));
      if (codes) {
        const __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(v), vz);
        const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(words, words));
      }
    }
    for (; i < end; ++i) {
      float v = std::nearbyint(src[i] / s);
      v = v < low ? low : v;
      v = v > high ? high : v;
      dst[i] = v * s;
      if (codes) codes[i] = static_cast<uint8_t>(std::max(0.0f, std::min(255.0f, v + static_cast<float>(zero_point))));
    }
  });
  return out;
}

// int8 weight [N, K] (K a multiple of 8, no input pair over `limit`) -> blocks of 16 outputs, each a
// list of steps: two quads of input channels (K / 8 steps), 128 bytes: per quad two 32-byte halves
// (outputs 0-7, 8-15) of four consecutive weights per output. Per block the quads are paired greedily
// (the most loaded first, with the most loaded partner whose int16 lanes stay within `limit`); the
// safe steps come first. Returns (packed, byte offsets of each step's quads [blocks * steps * 2],
// safe steps per block).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> pack_weight(const torch::Tensor& weight, int64_t limit) {
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.dim() == 2 && weight.size(1) % 8 == 0,
              "pack_weight takes an int8 [N, K] weight with K a multiple of 8");
  TORCH_CHECK(limit > 0 && limit <= 32767, "pack_weight takes a lane limit in [1, 32767]");
  const auto w = weight.contiguous();
  const int64_t n_out = w.size(0), k_in = w.size(1), quads = k_in / 4, steps = quads / 2;
  const int64_t blocks = (n_out + kBlockCols - 1) / kBlockCols;
  auto packed = torch::zeros({blocks * steps * 128}, torch::kInt8);
  auto offsets = torch::empty({blocks * steps * 2}, torch::kInt32);
  auto safe = torch::empty({blocks}, torch::kInt64);
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* offset_data = offsets.data_ptr<int32_t>();
  int64_t* safe_data = safe.data_ptr<int64_t>();
  const __m256i vlimit = _mm256_set1_epi16(static_cast<int16_t>(limit));
  std::vector<int16_t> loads(quads * 64);  // [quad][column][pair][sign]
  std::vector<int16_t> heaviest(quads);
  std::vector<int64_t> order(quads);
  std::vector<char> taken(quads);
  std::vector<int64_t> pairs, unsafe;
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t n0 = block * kBlockCols, cols = std::min(kBlockCols, n_out - n0);
    std::fill(loads.begin(), loads.end(), 0);
    for (int64_t q = 0; q < quads; ++q) {
      int16_t* load = loads.data() + q * 64;
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t k = 0; k < 4; ++k) {
          const int16_t v = src[(n0 + c) * k_in + 4 * q + k];
          load[c * 4 + (k / 2) * 2 + (v < 0)] += v < 0 ? -v : v;
        }
      heaviest[q] = *std::max_element(load, load + 64);
    }
    for (int64_t q = 0; q < quads; ++q) order[q] = q;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return heaviest[x] > heaviest[y]; });
    std::fill(taken.begin(), taken.end(), 0);
    pairs.clear();
    unsafe.clear();
    int64_t first_free = 0;
    for (int64_t i = 0; i < quads; ++i) {
      const int64_t q = order[i];
      if (taken[q]) continue;
      taken[q] = 1;
      while (taken[order[first_free]]) ++first_free;  // quads is even: a partner is left
      int64_t partner = -1;
      for (int64_t j = first_free; j < quads && partner < 0; ++j)
        if (!taken[order[j]] && fits(loads.data() + q * 64, loads.data() + order[j] * 64, vlimit)) partner = order[j];
      auto& list = partner < 0 ? unsafe : pairs;
      if (partner < 0) partner = order[first_free];
      taken[partner] = 1;
      list.push_back(q);
      list.push_back(partner);
    }
    safe_data[block] = static_cast<int64_t>(pairs.size() / 2);
    pairs.insert(pairs.end(), unsafe.begin(), unsafe.end());
    for (int64_t i = 0; i < steps; ++i)
      for (int64_t p = 0; p < 2; ++p) {
        const int64_t q = pairs[2 * i + p];
        offset_data[(block * steps + i) * 2 + p] = static_cast<int32_t>(4 * q);
        for (int64_t c = 0; c < cols; ++c)
          std::memcpy(dst + (block * steps + i) * 128 + p * 64 + (c / 8) * 32 + (c % 8) * 4, src + (n0 + c) * k_in + 4 * q, 4);
      }
  }
  return std::make_tuple(packed, offsets, safe);
}

// float32 [M, N]: ((codes - zero_point) @ W.T + entries) * scale (+ bias), the integer sum exact in
// int32. `column_sums` [N] are the packed weight's row sums; the entries taken off by the split are
// `entry_inputs` (positions in `used_inputs`, the input channels they read) / `entry_values`, grouped
// by output through `entry_offsets` [N + 1].
torch::Tensor linear_into(const torch::Tensor& codes, int64_t zero_point, const torch::Tensor& packed,
                     const torch::Tensor& step_offsets, const torch::Tensor& safe_steps, int64_t n_out,
                     const torch::Tensor& column_sums, const torch::Tensor& entry_offsets,
                     const torch::Tensor& used_inputs, const torch::Tensor& entry_inputs,
                     const torch::Tensor& entry_values,
                     const torch::Tensor& scale, const c10::optional<torch::Tensor>& bias, bool vnni,
                     const c10::optional<torch::Tensor>& out_buffer) {
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(1) % 8 == 0, "linear takes contiguous uint8 codes [M, K] with K a multiple of 8");
  TORCH_CHECK(!vnni || cpu_vnni(), "linear: vnni=True needs a CPU with AVX512-VNNI");
  const int64_t rows = codes.size(0), k_in = codes.size(1), steps = k_in / 8;
  const int64_t blocks = (n_out + kBlockCols - 1) / kBlockCols;
  TORCH_CHECK(packed.numel() == blocks * steps * 128 && step_offsets.numel() == blocks * steps * 2 &&
                  safe_steps.numel() == blocks, "packed weight does not match the codes' width");
  auto out = out_buffer.has_value() ? *out_buffer : torch::empty({rows, n_out}, torch::kFloat32);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) == n_out, "linear: the output buffer does not match [M, N] float32");
  const uint8_t* a = codes.data_ptr<uint8_t>();
  const int8_t* b = packed.data_ptr<int8_t>();
  const int32_t* step_offset_data = step_offsets.data_ptr<int32_t>();
  const int64_t* safe_data = safe_steps.data_ptr<int64_t>();
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
  // Wide inputs (fc2's) in fewer rows per pass: reading the chunk's codes from L3 for every block of
  // outputs costs more than reading the packed weight once more per chunk.
  const int64_t chunk_rows = std::clamp(kChunkBytes / std::max<int64_t>(k_in, 1) / kTileRows * kTileRows, kTileRows, kChunkRows);
  const int64_t tile_step = vnni ? kVnniTileRows : kTileRows;
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    alignas(64) int32_t tile[kVnniTileRows * kBlockCols];
    std::vector<int32_t> extra(kBlockCols * kChunkRows);  // [column, row] sums of the entries
    for (int64_t m0 = 0; m0 < rows; m0 += chunk_rows) {
      const int64_t m1 = std::min(rows, m0 + chunk_rows), chunk = m1 - m0;
      for (int64_t block = first_block; block < last_block; ++block) {
        const int8_t* panel = b + block * steps * 128;
        const int32_t* quad_offsets = step_offset_data + block * steps * 2;
        const int64_t safe = safe_data[block];
        const int64_t n0 = block * kBlockCols, cols = std::min(kBlockCols, n_out - n0);
        alignas(32) int32_t zero_point_terms[kBlockCols] = {};  // z * column sum
        int64_t entry_columns[kBlockCols], num_entry_columns = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t n = n0 + c;
          zero_point_terms[c] = z * sums[n];
          if (offsets[n] == offsets[n + 1]) continue;
          entry_columns[num_entry_columns++] = c;
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
        for (int64_t m = m0; m < m1; m += tile_step) {
          const int64_t tile_rows = std::min(tile_step, m1 - m);
          const uint8_t* a_tile = a + m * k_in;
          if (vnni) {
            switch (tile_rows) {
              case 8: tile_product_vnni<8>(a_tile, k_in, panel, quad_offsets, steps, tile); break;
              case 7: tile_product_vnni<7>(a_tile, k_in, panel, quad_offsets, steps, tile); break;
              case 6: tile_product_vnni<6>(a_tile, k_in, panel, quad_offsets, steps, tile); break;
              case 5: tile_product_vnni<5>(a_tile, k_in, panel, quad_offsets, steps, tile); break;
              case 4: tile_product_vnni<4>(a_tile, k_in, panel, quad_offsets, steps, tile); break;
              case 3: tile_product_vnni<3>(a_tile, k_in, panel, quad_offsets, steps, tile); break;
              case 2: tile_product_vnni<2>(a_tile, k_in, panel, quad_offsets, steps, tile); break;
              default: tile_product_vnni<1>(a_tile, k_in, panel, quad_offsets, steps, tile);
            }
          } else {
            switch (tile_rows) {
              case 4: tile_product<4>(a_tile, k_in, panel, quad_offsets, safe, steps, tile); break;
              case 3: tile_product<3>(a_tile, k_in, panel, quad_offsets, safe, steps, tile); break;
              case 2: tile_product<2>(a_tile, k_in, panel, quad_offsets, safe, steps, tile); break;
              default: tile_product<1>(a_tile, k_in, panel, quad_offsets, safe, steps, tile);
            }
          }
          for (int64_t j = 0; j < num_entry_columns; ++j) {
            const int64_t c = entry_columns[j];
            for (int64_t r = 0; r < tile_rows; ++r) tile[r * kBlockCols + c] += extra[c * kChunkRows + m - m0 + r];
          }
          for (int64_t r = 0; r < tile_rows; ++r) {
            float* dst = o + (m + r) * n_out + n0;
            if (cols == kBlockCols) {
              for (int h = 0; h < 2; ++h) {
                const __m256i sum = _mm256_sub_epi32(
                    _mm256_load_si256(reinterpret_cast<const __m256i*>(tile + r * kBlockCols + 8 * h)),
                    _mm256_load_si256(reinterpret_cast<const __m256i*>(zero_point_terms + 8 * h)));
                __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), _mm256_loadu_ps(s + n0 + 8 * h));
                if (bias_data) y = _mm256_add_ps(y, _mm256_loadu_ps(bias_data + n0 + 8 * h));
                _mm256_storeu_ps(dst + 8 * h, y);
              }
            } else {
              for (int64_t c = 0; c < cols; ++c) {
                float y = static_cast<float>(tile[r * kBlockCols + c] - zero_point_terms[c]) * s[n0 + c];
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

namespace {

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// round(x / scale) of `count` floats as int16 (saturating): the grid steps of activations on a grid
// with that scale. Computed as round(x * (1 / scale)): on the grid both are within float rounding of
// the same integer (|step| < 2^15), so they round to it alike, at a fraction of the division's cost.
inline void grid_steps(const float* x, int64_t count, float scale, int16_t* dst) {
  const float inverse = 1.0f / scale;
  const __m256 vi = _mm256_set1_ps(inverse);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi), kRound));
    const __m256i hi = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vi), kRound));
    // packs works per 128-bit lane: (lo 0-3, hi 0-3, lo 4-7, hi 4-7) -> reorder the quarters
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
  }
  for (; i < count; ++i) {
    const float v = std::nearbyint(x[i] * inverse);
    dst[i] = static_cast<int16_t>(std::max(-32768.0f, std::min(32767.0f, v)));
  }
}

// R rows of int16 steps (`a`, row stride `lda`, pairs of k) times 16 columns of packed pairs (`b`:
// [pairs][ldb] int32, each two int16 of consecutive k), summed in int32 by `vpmaddwd`; written to
// `dst` (row stride `ldo`, the first `cols` columns) as float times `scale`.
template <int R>
inline void pair_tile(const int16_t* a, int64_t lda, const int32_t* b, int64_t ldb, int64_t pairs, float scale,
                      float* dst, int64_t ldo, int64_t cols) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * ldb));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * ldb + 8));
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, 4);
      const __m256i av = _mm256_set1_epi32(pair);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, b0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, b1));
    }
  }
  const __m256 vs = _mm256_set1_ps(scale);
  alignas(32) float tail[16];
  for (int r = 0; r < R; ++r) {
    const __m256 y0 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][0]), vs);
    const __m256 y1 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][1]), vs);
    if (cols == 16) {
      _mm256_storeu_ps(dst + r * ldo, y0);
      _mm256_storeu_ps(dst + r * ldo + 8, y1);
    } else {
      _mm256_store_ps(tail, y0);
      _mm256_store_ps(tail + 8, y1);
      std::memcpy(dst + r * ldo, tail, cols * sizeof(float));
    }
  }
}

}  // namespace

// out [B, H, M, N] = (round(a / a_scale) @ round(b / b_scale)) * out_scale for a [B, H, M, K] and
// b [B, H, K, N] on per-tensor grids (the attention products): the integer sum exact in int32, then
// converted to float and multiplied by `out_scale` as the simulation does. a is read with unit stride
// along K; b with unit stride along K (keys, transposed) or along N (values); out needs unit stride
// along N, any other strides (the context is written with the heads next to each other).
void grid_matmul_into(const torch::Tensor& a, double a_scale, const torch::Tensor& b, double b_scale, double out_scale,
                 const torch::Tensor& out) {
  TORCH_CHECK(a.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32 &&
                  out.scalar_type() == torch::kFloat32, "grid_matmul takes float32 tensors");
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4 && out.dim() == 4 && a.size(0) == b.size(0) && a.size(1) == b.size(1) &&
                  out.size(0) == a.size(0) && out.size(1) == a.size(1) && a.size(3) == b.size(2) &&
                  out.size(2) == a.size(2) && out.size(3) == b.size(3),
              "grid_matmul takes a [B, H, M, K], b [B, H, K, N] and out [B, H, M, N]");
  const int64_t heads = a.size(1), groups = a.size(0) * heads, m_rows = a.size(2), k_in = a.size(3), n_out = b.size(3);
  TORCH_CHECK(a.stride(3) == 1 && (b.stride(2) == 1 || b.stride(3) == 1) && out.stride(3) == 1,
              "grid_matmul: a needs unit stride along K, b along K or N, out along N");
  const bool b_k_major = b.stride(3) != 1;
  const int64_t pairs = (k_in + 1) / 2, k_even = 2 * pairs, n_padded = (n_out + 15) / 16 * 16;
  const float sa = static_cast<float>(a_scale), sb = static_cast<float>(b_scale), so = static_cast<float>(out_scale);
  const float* a_data = a.data_ptr<float>();
  const float* b_data = b.data_ptr<float>();
  float* o_data = out.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    std::vector<int16_t> a_steps(m_rows * k_even, 0), row(std::max(k_even, n_padded) * 2, 0);
    std::vector<int32_t> b_pairs(pairs * n_padded, 0);
    for (int64_t g = first; g < last; ++g) {
      const int64_t batch = g / heads, head = g % heads;
      const float* ag = a_data + batch * a.stride(0) + head * a.stride(1);
      const float* bg = b_data + batch * b.stride(0) + head * b.stride(1);
      for (int64_t m = 0; m < m_rows; ++m) grid_steps(ag + m * a.stride(2), k_in, sa, a_steps.data() + m * k_even);
      if (b_k_major) {  // column n of b is contiguous along k: its pairs are consecutive int32
        for (int64_t n = 0; n < n_out; ++n) {
          row[k_in] = 0;
          grid_steps(bg + n * b.stride(3), k_in, sb, row.data());
          const int32_t* row_pairs = reinterpret_cast<const int32_t*>(row.data());
          for (int64_t p = 0; p < pairs; ++p) b_pairs[p * n_padded + n] = row_pairs[p];
        }
      } else {  // rows k and k + 1 of b, interleaved
        int16_t* even = row.data();
        int16_t* odd = row.data() + n_padded;
        for (int64_t p = 0; p < pairs; ++p) {
          grid_steps(bg + 2 * p * b.stride(2), n_out, sb, even);
          if (2 * p + 1 < k_in) grid_steps(bg + (2 * p + 1) * b.stride(2), n_out, sb, odd);
          else std::fill(odd, odd + n_padded, 0);
          int32_t* dst = b_pairs.data() + p * n_padded;
          for (int64_t n = 0; n < n_out; ++n)
            dst[n] = static_cast<int32_t>(static_cast<uint16_t>(even[n]) | (static_cast<uint32_t>(static_cast<uint16_t>(odd[n])) << 16));
        }
      }
      float* og = o_data + batch * out.stride(0) + head * out.stride(1);
      for (int64_t n0 = 0; n0 < n_out; n0 += 16) {
        const int64_t cols = std::min<int64_t>(16, n_out - n0);
        for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
          const int16_t* at = a_steps.data() + m0 * k_even;
          const int32_t* bt = b_pairs.data() + n0;
          float* dst = og + m0 * out.stride(2) + n0;
          switch (std::min<int64_t>(4, m_rows - m0)) {
            case 4: pair_tile<4>(at, k_even, bt, n_padded, pairs, so, dst, out.stride(2), cols); break;
            case 3: pair_tile<3>(at, k_even, bt, n_padded, pairs, so, dst, out.stride(2), cols); break;
            case 2: pair_tile<2>(at, k_even, bt, n_padded, pairs, so, dst, out.stride(2), cols); break;
            default: pair_tile<1>(at, k_even, bt, n_padded, pairs, so, dst, out.stride(2), cols);
          }
        }
      }
    }
  });
}


// The ops, as `torch.ops.hf_quantizable.*` (functional: each returns new tensors).

torch::Tensor fake_quantize(const torch::Tensor& x, double scale, int64_t zero_point, int64_t levels) {
  return fake_quantize_into(x, scale, zero_point, levels, c10::nullopt, c10::nullopt);
}

std::tuple<torch::Tensor, torch::Tensor> fake_quantize_with_codes(const torch::Tensor& x, double scale,
                                                                  int64_t zero_point, int64_t levels) {
  auto codes = torch::empty(x.sizes(), x.options().dtype(torch::kUInt8));
  auto out = fake_quantize_into(x, scale, zero_point, levels, c10::nullopt, codes);
  return std::make_tuple(out, codes);
}

torch::Tensor linear(const torch::Tensor& codes, int64_t zero_point, const torch::Tensor& packed,
                     const torch::Tensor& step_offsets, const torch::Tensor& safe_steps, int64_t n_out,
                     const torch::Tensor& column_sums, const torch::Tensor& entry_offsets,
                     const torch::Tensor& used_inputs, const torch::Tensor& entry_inputs,
                     const torch::Tensor& entry_values, const torch::Tensor& scale,
                     const c10::optional<torch::Tensor>& bias, bool vnni) {
  return linear_into(codes, zero_point, packed, step_offsets, safe_steps, n_out, column_sums, entry_offsets,
                     used_inputs, entry_inputs, entry_values, scale, bias, vnni, c10::nullopt);
}

// With `heads_last`, the output's memory is [B, M, H, N] (the context once its heads are merged),
// returned as its [B, H, M, N] view.
torch::Tensor grid_matmul_output(const torch::Tensor& a, const torch::Tensor& b, bool heads_last) {
  const auto options = a.options().dtype(torch::kFloat32);
  return heads_last ? torch::empty({a.size(0), a.size(2), a.size(1), b.size(3)}, options).transpose(1, 2)
                    : torch::empty({a.size(0), a.size(1), a.size(2), b.size(3)}, options);
}

torch::Tensor grid_matmul(const torch::Tensor& a, double a_scale, const torch::Tensor& b, double b_scale,
                          double out_scale, bool heads_last) {
  auto out = grid_matmul_output(a, b, heads_last);
  grid_matmul_into(a, a_scale, b, b_scale, out_scale, out);
  return out;
}

// Meta kernels: the outputs' shapes, dtypes and strides, no data.

torch::Tensor fake_quantize_meta(const torch::Tensor& x, double, int64_t, int64_t) { return torch::empty_like(x); }

std::tuple<torch::Tensor, torch::Tensor> fake_quantize_with_codes_meta(const torch::Tensor& x, double, int64_t,
                                                                       int64_t) {
  return std::make_tuple(torch::empty_like(x), torch::empty(x.sizes(), x.options().dtype(torch::kUInt8)));
}

torch::Tensor linear_meta(const torch::Tensor& codes, int64_t, const torch::Tensor&, const torch::Tensor&,
                          const torch::Tensor&, int64_t n_out, const torch::Tensor&, const torch::Tensor&,
                          const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                          const c10::optional<torch::Tensor>&, bool) {
  return torch::empty({codes.size(0), n_out}, codes.options().dtype(torch::kFloat32));
}

torch::Tensor grid_matmul_meta(const torch::Tensor& a, double, const torch::Tensor& b, double, double,
                               bool heads_last) {
  return grid_matmul_output(a, b, heads_last);
}

TORCH_LIBRARY(hf_quantizable, m) {
  m.def("fake_quantize(Tensor x, float scale, int zero_point, int levels) -> Tensor");
  m.def("fake_quantize_with_codes(Tensor x, float scale, int zero_point, int levels) -> (Tensor, Tensor)");
  m.def("pack_weight(Tensor weight, int limit) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear(Tensor codes, int zero_point, Tensor packed, Tensor step_offsets, Tensor safe_steps, int n_out, "
      "Tensor column_sums, Tensor entry_offsets, Tensor used_inputs, Tensor entry_inputs, Tensor entry_values, "
      "Tensor scale, Tensor? bias, bool vnni=False) -> Tensor");
  m.def("vnni_available() -> bool", &cpu_vnni);
  m.def("grid_matmul(Tensor a, float a_scale, Tensor b, float b_scale, float out_scale, bool heads_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_quantizable, CPU, m) {
  m.impl("fake_quantize", &fake_quantize);
  m.impl("fake_quantize_with_codes", &fake_quantize_with_codes);
  m.impl("pack_weight", &pack_weight);
  m.impl("linear", &linear);
  m.impl("grid_matmul", &grid_matmul);
}

TORCH_LIBRARY_IMPL(hf_quantizable, Meta, m) {
  m.impl("fake_quantize", &fake_quantize_meta);
  m.impl("fake_quantize_with_codes", &fake_quantize_with_codes_meta);
  m.impl("linear", &linear_meta);
  m.impl("grid_matmul", &grid_matmul_meta);
}
