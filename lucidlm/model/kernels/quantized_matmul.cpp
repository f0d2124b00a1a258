// lucidlm's CPU kernels for weight-only quantized linears: y = x · Ŵᵀ with Ŵ kept as GGUF-style blocks of 32
// input weights per output row (model/quantized_linear.py has the formulas; model/quantized_kernels.py builds this).
//
// Decoding reads every weight once per token, so a kernel is fast when it streams the integers at the memory's
// bandwidth and does little per byte. The activations are rounded once per call to 16-bit integers per block of
// 32 (error <= 1/65534 of the block's largest, finer than bfloat16's 8 bits; llama.cpp rounds them to 8), so a
// block's 32 products are two integer multiply-adds (madd: 16 int16 products summed in pairs, exact in int32)
// and one float multiply-add by d · scale_x. A weight block is unpacked once for up to four activation rows.
// Measured (2-core AVX2 EPYC, one row, 2 threads): a 49152x576 weight in L3, 4-bit 14.2 GB/s, 8-bit 13.3 GB/s of
// weights and scales; SmolLM2's small (576-wide) layers one after another from memory, 3-9 GB/s: per-call
// overhead (dispatch, OpenMP fork/join) and short streams dominate there (model/fused_projections.py stacks q/k/v
// and gate/up into one call each; prefetch_ahead below). Tried and dropped: four weight rows per activation row
// (2x faster on a layer in cache, no faster from memory, slower at 1536 inputs).
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

// One 4-bit weight row, Ŵ = d·q + m per block: byte j of a block holds q_j in its low nibble, q_{j+16} in its
// high one (GGUF's order). Pointers are the row's own, so that the loops keep them in registers.
struct Q4Row {
  static constexpr bool has_minimum = true;
  const uint8_t* q;  // (K / 2)
  const uint16_t* d;  // (K / 32) float16
  const uint16_t* m;  // (K / 32) float16

  // block b's 32 integers as int16 lanes (w0: q_0..q_15, w1: q_16..q_31); returns its scale
  inline float load(int64_t b, __m256i& w0, __m256i& w1) const {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * b)));
    w0 = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
    w1 = _mm256_srli_epi16(bytes, 4);
    return half(d[b]);
  }
  const void* bytes() const { return q; }
};

// One 8-bit weight row, Ŵ = d·q: a scale per block (Q8_0) or one for the row (d_step 0)
struct Q8Row {
  static constexpr bool has_minimum = false;
  const int8_t* q;  // (K)
  const uint16_t* d;  // (K / 32) or (1) float16
  int64_t d_step;  // 1 or 0
  const uint16_t* m = nullptr;

  inline float load(int64_t b, __m256i& w0, __m256i& w1) const {
    const int8_t* p = q + kBlock * b;
    w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    return half(d[b * d_step]);
  }
  const void* bytes() const { return q; }
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

// (Σ_j q_j · xq_j) · d · scale_x of one block and one activation row: 16 integer products summed in pairs by
// madd (exact in int32), then one float multiply-add into acc
inline __m256 add_block(__m256i w0, __m256i w1, float d, const int16_t* xq, float x_scale, __m256 acc) {
  const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
                                     _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * x_scale), acc);
}

template <typename Row>
inline float finish(const Row& w, __m256 acc, const Activations& a, int64_t t, int64_t blocks) {
  float v = hsum(acc);
  if constexpr (Row::has_minimum) v += minimum_term(w.m, a.sum.data() + t * blocks, blocks);
  return v;
}

// y[t, n] of one activation row t: even and odd blocks go to two sums, hiding the multiply-add's latency
template <typename Row>
inline void dot_one(const Row& w, const Activations& a, int64_t t, float* y) {
  const int64_t blocks = a.k / kBlock;
  const int16_t* xq = a.row(t);
  const float* xs = a.scale.data() + t * blocks;
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  __m256i w0, w1;
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    float d = w.load(b, w0, w1);
    even = add_block(w0, w1, d, xq + kBlock * b, xs[b], even);
    d = w.load(b + 1, w0, w1);
    odd = add_block(w0, w1, d, xq + kBlock * (b + 1), xs[b + 1], odd);
  }
  if (b < blocks) {
    const float d = w.load(b, w0, w1);
    even = add_block(w0, w1, d, xq + kBlock * b, xs[b], even);
  }
  *y = finish(w, _mm256_add_ps(even, odd), a, t, blocks);
}

// y[t0 .. t0 + 3, n]: the weight block is unpacked once for four activation rows (four independent sums)
template <typename Row>
inline void dot_four(const Row& w, const Activations& a, int64_t t0, float* y, int64_t ldy) {
  const int64_t blocks = a.k / kBlock, k = a.k;
  const int16_t* xq = a.row(t0);
  const float* xs = a.scale.data() + t0 * blocks;
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i w0, w1;
    const float d = w.load(b, w0, w1);
    const int16_t* x = xq + kBlock * b;
    s0 = add_block(w0, w1, d, x, xs[b], s0);
    s1 = add_block(w0, w1, d, x + k, xs[b + blocks], s1);
    s2 = add_block(w0, w1, d, x + 2 * k, xs[b + 2 * blocks], s2);
    s3 = add_block(w0, w1, d, x + 3 * k, xs[b + 3 * blocks], s3);
  }
  y[0] = finish(w, s0, a, t0, blocks);
  y[ldy] = finish(w, s1, a, t0 + 1, blocks);
  y[2 * ldy] = finish(w, s2, a, t0 + 2, blocks);
  y[3 * ldy] = finish(w, s3, a, t0 + 3, blocks);
}

// y = x · Ŵᵀ; row(n) gives weight row n. Threads split the output rows (each reads its share of the weights);
// activation rows go in passes of kRowsStep, so that a thread's weights are read from cache after the first.
// Software prefetch of the weights kAhead bytes past the row being read: a decode step's layers are short streams
// (a thread's share of a 192x576 4-bit layer is 27 KB), each started cold, which the hardware's prefetcher ramps
// up on too slowly. Measured on SmolLM2's 211 layers in sequence from memory: 4 KB ahead -7 to -10%, 1 KB -5%,
// 8-16 KB worse than none. (Prefetching past a tensor's end is harmless: prefetches never fault.)
constexpr int64_t kAhead = 4096;
inline void prefetch_ahead(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p) + kAhead;
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

template <typename RowOf>
at::Tensor linear(const at::Tensor& x, RowOf row, int64_t n_out, int64_t row_bytes) {
  const int64_t m_rows = x.size(0), k = x.size(1);
  const Activations a(x.data_ptr<float>(), m_rows, k);
  at::Tensor y = at::empty({m_rows, n_out}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / k);  // enough rows to be worth a thread
  at::parallel_for(0, n_out, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < m_rows; m0 += kRowsStep) {
      const int64_t m1 = std::min(m_rows, m0 + kRowsStep);
      for (int64_t n = n0; n < n1; ++n) {
        const auto w = row(n);
        if (m0 == 0) prefetch_ahead(w.bytes(), row_bytes);  // the first pass reads them from memory
        int64_t t = m0;
        for (; t + 4 <= m1; t += 4) dot_four(w, a, t, yp + t * n_out + n, n_out);
        for (; t < m1; ++t) dot_one(w, a, t, yp + t * n_out + n);
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

// float16 scales arrive as their int16 bit patterns (the layer's buffers: model.to(dtype) leaves them alone)
const uint16_t* float16_bits(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kShort && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows &&
                  t.size(1) == cols,
              what, " must be contiguous int16 (float16 bit patterns) of shape (", rows, ", ", cols, ")");
  return reinterpret_cast<const uint16_t*>(t.data_ptr<int16_t>());
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const at::Tensor& minimum) {
  const int64_t n = qweight.size(0), k = 2 * qweight.size(1), blocks = k / kBlock;
  check_activations(x, k);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "q4_linear: qweight must be uint8");
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const uint16_t* d = float16_bits(scale, n, blocks, "q4_linear: scale");
  const uint16_t* m = float16_bits(minimum, n, blocks, "q4_linear: minimum");
  return linear(x, [=](int64_t r) { return Q4Row{q + r * (k / 2), d + r * blocks, m + r * blocks}; }, n, k / 2);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  const int64_t n = qweight.size(0), k = qweight.size(1), blocks = k / kBlock;
  check_activations(x, k);
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous(), "q8_linear: qweight must be int8");
  TORCH_CHECK(scale.dim() == 2 && (scale.size(1) == 1 || scale.size(1) == blocks),
              "q8_linear: one scale per row or per block of 32");
  const int64_t per_row = scale.size(1);
  const uint16_t* d = float16_bits(scale, n, per_row, "q8_linear: scale");
  const int8_t* q = qweight.data_ptr<int8_t>();
  return linear(x, [=](int64_t r) { return Q8Row{q + r * k, d + r * per_row, per_row == 1 ? 0 : 1}; }, n, k);
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
