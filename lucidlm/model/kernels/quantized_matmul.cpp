// lucidlm's CPU kernels for weight-only quantized linears: y = x · Ŵᵀ with Ŵ kept as GGUF-style blocks of 32
// input weights per output row (model/quantized_linear.py has the formulas; model/quantized_kernels.py builds this).
//
// Decoding reads every weight once per token, so a kernel is fast when it streams the integers at the memory's
// bandwidth and does little per byte. The activations are rounded once per call to 16-bit integers per block of
// 32 (error <= 1/65534 of the block's largest, finer than bfloat16's 8 bits; llama.cpp rounds them to 8), so a
// block's 32 products are two integer multiply-adds (madd: 16 int16 products summed in pairs, exact in int32)
// and one float multiply-add by d · scale_x. A weight block is unpacked once for up to four activation rows.
// Measured (2-core AVX2 EPYC, a 49152x576 weight, one row, 2 threads): 4-bit 14.2 GB/s, 8-bit 13.3 GB/s of
// weights and scales, against the ~15 GB/s the float32 weight's compiled product streams.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;   // input weights per block (GGUF's Q4_0 / Q4_1 / Q8_0)
constexpr int64_t kRowsStep = 32;  // activation rows per pass over a thread's weights (they stay in cache)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half(const uint16_t h) { return _cvtsh_ss(h); }

// Activation rows as 16-bit integers per block of 32: x ≈ scale[b] · q, |error| <= scale / 2 = max|x| / 65534
// (bfloat16 keeps 8 bits); sum[b] is the block's exact float sum (4-bit weights' minimum multiplies it).
struct Activations {
  std::vector<int16_t> q;  // (M, K)
  std::vector<float> scale, sum;  // (M, K / 32)
  int64_t k;

  Activations(const float* x, int64_t m_rows, int64_t k) : q(m_rows * k), scale(m_rows * (k / kBlock)),
                                                          sum(m_rows * (k / kBlock)), k(k) {
    const int64_t blocks = m_rows * (k / kBlock);
    at::parallel_for(0, blocks, 256, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float* xb = x + kBlock * b;
        float amax = 0.f, s = 0.f;
        for (int64_t j = 0; j < kBlock; ++j) { amax = std::max(amax, std::abs(xb[j])); s += xb[j]; }
        const float d = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
        for (int64_t j = 0; j < kBlock; ++j) {
          const float v = xb[j] * inv;
          q[kBlock * b + j] = static_cast<int16_t>(static_cast<int32_t>(v + (v >= 0.f ? 0.5f : -0.5f)));
        }
        scale[b] = d;
        sum[b] = s;
      }
    });
  }
  const int16_t* row(int64_t t) const { return q.data() + t * k; }
};

// 4-bit rows, Ŵ = d·q + m per block: byte j of a block holds weight j in its low nibble, j + 16 in its high
struct Q4Rows {
  static constexpr bool has_minimum = true;
  const uint8_t* q;  // (N, K / 2)
  const uint16_t* d;  // (N, K / 32) float16
  const uint16_t* m;  // (N, K / 32) float16
  int64_t blocks_per_row;

  // the block's 32 integers as int16 lanes, weights 0..15 then 16..31; returns d
  inline float block(int64_t n, int64_t b, __m256i w[2]) const {
    const __m256i bytes = _mm256_cvtepu8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (n * blocks_per_row + b) * 16)));
    w[0] = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
    w[1] = _mm256_srli_epi16(bytes, 4);
    return half(d[n * blocks_per_row + b]);
  }
  inline const uint16_t* minimum(int64_t n) const { return m + n * blocks_per_row; }
};

// 8-bit rows, Ŵ = d·q, one float16 scale per `blocks_per_scale` blocks of the row
struct Q8Rows {
  static constexpr bool has_minimum = false;
  const int8_t* q;  // (N, K)
  const uint16_t* d;  // (N, scales_per_row) float16
  int64_t k, scales_per_row, blocks_per_scale;

  inline float block(int64_t n, int64_t b, __m256i w[2]) const {
    const int8_t* p = q + n * k + kBlock * b;
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    return half(d[n * scales_per_row + b / blocks_per_scale]);
  }
  inline const uint16_t* minimum(int64_t) const { return nullptr; }
};

// Σ_b minimum[b] · sum[b] over a row's blocks (the 4-bit formula's m · Σx term)
inline float minimum_term(const uint16_t* m, const float* sum, int64_t blocks) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b))),
                          _mm256_loadu_ps(sum + b), acc);
  float s = hsum(acc);
  for (; b < blocks; ++b) s += half(m[b]) * sum[b];
  return s;
}

// y[t, n] for T activation rows from row t0 and one weight row n: per block, 16 integer products summed in
// pairs by madd (exact in int32), then scaled by d · scale_x in float. The weight block is unpacked once for
// the T rows; two sums per row alternate between blocks to hide the multiply-add's latency.
// acc[t] += (Σ_j q_j · xq_j) · d · scale_x over block b of T activation rows from row t0 and weight row n: 16
// integer products summed in pairs by madd (exact in int32), then one float multiply-add. The weight block is
// unpacked once for the T rows.
template <int T, typename Rows>
inline void add_block(const Rows& rows, int64_t n, const Activations& a, int64_t t0, int64_t b, __m256 acc[T]) {
  const int64_t blocks = a.k / kBlock;
  __m256i w[2];
  const float d = rows.block(n, b, w);
  for (int t = 0; t < T; ++t) {
    const int16_t* xq = a.row(t0 + t) + kBlock * b;
    const __m256i s = _mm256_add_epi32(
        _mm256_madd_epi16(w[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
        _mm256_madd_epi16(w[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))));
    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * a.scale[(t0 + t) * blocks + b]), acc[t]);
  }
}

// y[t, n] for T activation rows from row t0 and one weight row n. Even and odd blocks go to two sums per row
// (written out, so both stay in registers), which hides the multiply-add's latency.
template <int T, typename Rows>
inline void dot_rows(const Rows& rows, int64_t n, const Activations& a, int64_t t0, float* y, int64_t ldy) {
  const int64_t blocks = a.k / kBlock;
  __m256 even[T], odd[T];
  for (int t = 0; t < T; ++t) even[t] = odd[t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    add_block<T>(rows, n, a, t0, b, even);
    add_block<T>(rows, n, a, t0, b + 1, odd);
  }
  if (b < blocks) add_block<T>(rows, n, a, t0, b, even);
  for (int t = 0; t < T; ++t) {
    float v = hsum(_mm256_add_ps(even[t], odd[t]));
    if constexpr (Rows::has_minimum) v += minimum_term(rows.minimum(n), a.sum.data() + (t0 + t) * blocks, blocks);
    y[(t0 + t) * ldy + n] = v;
  }
}

template <typename Rows>
at::Tensor linear(const at::Tensor& x, const Rows& rows, int64_t n_out) {
  const int64_t m_rows = x.size(0), k = x.size(1);
  const Activations a(x.data_ptr<float>(), m_rows, k);
  at::Tensor y = at::empty({m_rows, n_out}, x.options());
  float* yp = y.data_ptr<float>();
  // threads split the output rows (each reads its share of the weights); grain: enough rows to be worth a thread
  const int64_t grain = std::max<int64_t>(1, 65536 / k);
  at::parallel_for(0, n_out, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < m_rows; m0 += kRowsStep) {
      const int64_t m1 = std::min(m_rows, m0 + kRowsStep);
      for (int64_t n = n0; n < n1; ++n) {
        int64_t t = m0;
        for (; t + 4 <= m1; t += 4) dot_rows<4>(rows, n, a, t, yp, n_out);
        if (t + 2 <= m1) { dot_rows<2>(rows, n, a, t, yp, n_out); t += 2; }
        if (t < m1) dot_rows<1>(rows, n, a, t, yp, n_out);
      }
    }
  });
  return y;
}

void check_activations(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "quantized linear: activations must be a contiguous float32 (rows, in) matrix");
  TORCH_CHECK(x.size(1) == k && k % kBlock == 0, "quantized linear: activations have ", x.size(1),
              " inputs, the weight ", k, " (a multiple of 32)");
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const at::Tensor& minimum) {
  const int64_t n = qweight.size(0), k = 2 * qweight.size(1);
  check_activations(x, k);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "q4_linear: qweight must be uint8");
  for (const at::Tensor* t : {&scale, &minimum})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->size(0) == n && t->size(1) == k / kBlock,
                "q4_linear: scale and minimum must be contiguous float16 (out, in / 32)");
  const Q4Rows rows{qweight.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                    reinterpret_cast<const uint16_t*>(minimum.data_ptr<at::Half>()), k / kBlock};
  return linear(x, rows, n);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  const int64_t n = qweight.size(0), k = qweight.size(1);
  check_activations(x, k);
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous(), "q8_linear: qweight must be int8");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.size(0) == n &&
                  (k / kBlock) % scale.size(1) == 0,
              "q8_linear: scale must be contiguous float16 (out, groups), each group whole blocks of 32");
  const Q8Rows rows{qweight.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()), k,
                    scale.size(1), (k / kBlock) / scale.size(1)};
  return linear(x, rows, n);
}

}  // namespace

TORCH_LIBRARY(lucidlm_quant, m) {
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor minimum) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lucidlm_quant, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
}
