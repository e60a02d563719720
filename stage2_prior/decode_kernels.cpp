// The kernels of one KV-cached decode step on a CPU: the matmuls (y = act(x @ W^T + bias) for a few
// rows of x), single-query attention over the cache, and the top-k of the sampler.
//
// A decode step multiplies 4-8 rows by every weight of the prior, so it is bound by how fast the
// weights stream from memory, not by arithmetic. oneDNN's and MKL's GEMMs are tuned for large M and
// leave much of the bandwidth unused at M = 4 (docs/performance.md). This kernel keeps the weight
// stream saturated:
//   * W is packed once into 64-output tiles, [ceil(N/64)][steps][64 outputs][pair] (pair = 2 for
//     bf16, the VDPBF16PS layout; 1 for fp32), so each step of a tile is 256 contiguous bytes;
//   * each tile's steps are walked as SEGMENTS interleaved runs, so every core keeps several memory
//     streams in flight, plus a software prefetch PREFETCH_BYTES ahead in each run. A single
//     sequential stream per core reaches about half of the machine's DRAM bandwidth;
//   * the 64 outputs x 4 rows accumulate in 16 zmm registers (fp32); the layer norm of the input
//     rows, the bias, the exact-erf GELU and the residual add are applied once, before and after,
//     and tiles are split across the OpenMP threads torch already runs.
// Attention of one new token (decode_attention) is a few thousand multiply-adds per head, but
// torch's SDPA spends ~200 us per layer on it at batch 4 (setup, not arithmetic); here the rotary
// embedding, the cache write, the scores, the softmax and the weighted sum are one call.
// Built at first use by stage2_prior/native_kernels.py, once for fp32 (AVX-512F) and once for bf16
// (AVX-512 BF16, -DGEMV_BF16); loaded through ctypes, so it needs no torch headers.
#include <immintrin.h>
#include <algorithm>
#include <functional>
#include <math.h>
#include <string.h>
#include <stdint.h>
#include <vector>

#ifndef SEGMENTS
#define SEGMENTS 4
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

namespace {

constexpr int kTile = 64;         // outputs per tile: 4 zmm of fp32 accumulators per row
constexpr int kStepBytes = 256;   // one step of a tile: 64 outputs x (2 bf16 | 1 fp32)

#ifdef GEMV_BF16
using Elem = uint16_t;            // bf16 bits
constexpr int kPerStep = 2;       // k values per step
inline __m512 fma_step(__m512 acc, const Elem* x, __m512i w) {
  __m512i pair = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x));  // (x[k], x[k+1]) everywhere
  return _mm512_dpbf16_ps(acc, (__m512bh)pair, (__m512bh)w);
}
inline __m512 load16(const Elem* p) {  // 16 bf16 -> fp32 (exact: bf16 is fp32's top half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store16(Elem* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
#else
using Elem = float;
constexpr int kPerStep = 1;
inline __m512 fma_step(__m512 acc, const Elem* x, __m512i w) {
  return _mm512_fmadd_ps(_mm512_set1_ps(*x), _mm512_castsi512_ps(w), acc);
}
inline __m512 load16(const Elem* p) { return _mm512_loadu_ps(p); }
inline void store16(Elem* p, __m512 v) { _mm512_storeu_ps(p, v); }
#endif

// exp(y) for y <= 0 (Cephes' expf: Cody-Waite reduction, degree-6 polynomial; relative error ~1e-7)
inline __m512 exp_nonpositive(__m512 y) {
  y = _mm512_max_ps(y, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// x * Phi(x), Phi the normal CDF through erfc (Abramowitz & Stegun 7.1.26, absolute error 1.5e-7):
// torch's exact GELU (approximate="none") up to fp32 rounding
inline __m512 gelu_erf(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f),
                                                                       _mm512_set1_ps(1.0f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_mul_ps(poly, t)),
                                         exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-1.0f), _mm512_mul_ps(z, z))));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 phi = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), half_erfc), negative, half_erfc);
  return _mm512_mul_ps(x, phi);
}

template <int MR>
inline void one_step(const Elem* x, int64_t ldx, int64_t s, const char* tile, __m512 (&acc)[MR][4]) {
  const char* w = tile + s * kStepBytes;
#if PREFETCH_BYTES > 0
  _mm_prefetch(w + PREFETCH_BYTES, _MM_HINT_T0);
  _mm_prefetch(w + PREFETCH_BYTES + 64, _MM_HINT_T0);
  _mm_prefetch(w + PREFETCH_BYTES + 128, _MM_HINT_T0);
  _mm_prefetch(w + PREFETCH_BYTES + 192, _MM_HINT_T0);
#endif
  const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
  const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const Elem* xm = x + m * ldx + s * kPerStep;
    acc[m][0] = fma_step(acc[m][0], xm, w0);
    acc[m][1] = fma_step(acc[m][1], xm, w1);
    acc[m][2] = fma_step(acc[m][2], xm, w2);
    acc[m][3] = fma_step(acc[m][3], xm, w3);
  }
}

struct Epilogue {
  const float* bias;  // (N) or null
  int gelu;           // exact-erf GELU after the bias
  int accumulate;     // y += result (fp32 y) instead of y = result: the residual add
  int out_fp32;       // y is fp32, else the build's dtype
};

// MR rows of x against one tile; writes outputs [n0, n0 + valid) of those rows
template <int MR>
void tile_rows(const Elem* x, int64_t ldx, int64_t steps, const char* tile, const Epilogue& epi,
               void* y, int64_t ldy, int64_t n0, int valid) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t run = steps / SEGMENTS;
  for (int64_t i = 0; i < run; ++i) {
#pragma GCC unroll 8
    for (int q = 0; q < SEGMENTS; ++q) one_step<MR>(x, ldx, q * run + i, tile, acc);
  }
  for (int64_t s = run * SEGMENTS; s < steps; ++s) one_step<MR>(x, ldx, s, tile, acc);

  for (int j = 0; j < 4; ++j) {
    const int count = valid - 16 * j;
    if (count <= 0) break;
    const __mmask16 mask = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
    const int64_t n = n0 + 16 * j;
    const __m512 b = epi.bias ? _mm512_maskz_loadu_ps(mask, epi.bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) {
      __m512 v = _mm512_add_ps(acc[m][j], b);
      if (epi.gelu) v = gelu_erf(v);
#ifdef GEMV_BF16
      if (!epi.out_fp32) {  // round to nearest even, as torch's float -> bfloat16
        const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + m * ldy + n, mask, bits);
        continue;
      }
#endif
      float* out = static_cast<float*>(y) + m * ldy + n;
      if (epi.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, out));
      _mm512_mask_storeu_ps(out, mask, v);
    }
  }
}

inline __mmask16 head_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

// fp32 rows -> the build's dtype, optionally layer-normed first: (x - mean) / sqrt(var + eps) * weight
// (biased variance, as F.layer_norm); bf16 rounds to nearest even, as a torch cast does
void prepare_rows(const float* x, int64_t rows, int64_t k, int64_t ldx, const float* norm_weight, float eps, Elem* out) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = x + m * ldx;
    float mean = 0.0f, rstd = 1.0f;
    if (norm_weight) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < k; c += 16) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(head_mask(k - c), row + c));
      mean = _mm512_reduce_add_ps(sum) / float(k);
      __m512 squares = _mm512_setzero_ps();
      for (int64_t c = 0; c < k; c += 16) {
        const __mmask16 mask = head_mask(k - c);
        const __m512 d = _mm512_maskz_sub_ps(mask, _mm512_maskz_loadu_ps(mask, row + c), _mm512_set1_ps(mean));
        squares = _mm512_fmadd_ps(d, d, squares);
      }
      rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / float(k) + eps);
    }
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 mask = head_mask(k - c);
      __m512 v = _mm512_maskz_loadu_ps(mask, row + c);
      if (norm_weight)
        v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(mean)), _mm512_set1_ps(rstd)),
                          _mm512_maskz_loadu_ps(mask, norm_weight + c));
#ifdef GEMV_BF16
      _mm256_mask_storeu_epi16(out + m * k + c, mask, (__m256i)_mm512_cvtneps_pbh(v));
#else
      _mm512_mask_storeu_ps(out + m * k + c, mask, v);
#endif
    }
  }
}

}  // namespace

extern "C" {

// Packed size in elements of an (N, K) weight: ceil(N / 64) tiles x steps x 64 x kPerStep.
int64_t gemv_packed_numel(int64_t n, int64_t k) {
  return (n + kTile - 1) / kTile * ((k + kPerStep - 1) / kPerStep) * kTile * kPerStep;
}

// W (N, K) row-major -> tiles; outputs past N and the odd k past K (bf16) are zero
void gemv_pack(const Elem* w, int64_t n, int64_t k, Elem* packed) {
  const int64_t tiles = (n + kTile - 1) / kTile, steps = (k + kPerStep - 1) / kPerStep;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t s = 0; s < steps; ++s)
      for (int o = 0; o < kTile; ++o)
        for (int p = 0; p < kPerStep; ++p) {
          const int64_t row = t * kTile + o, col = s * kPerStep + p;
          packed[((t * steps + s) * kTile + o) * kPerStep + p] = (row < n && col < k) ? w[row * k + col] : Elem(0);
        }
}

// y (M, N; row stride ldy) = act(x (M, K; row stride ldx) @ W^T + bias), or y += that (accumulate).
// x: the build's dtype, or fp32 when x_fp32; norm_weight (K, fp32, needs x_fp32) layer-norms the rows
// first. The bf16 build rounds fp32 rows to bf16, as a cast would. y: fp32 when out_fp32, else the
// build's dtype; accumulate needs out_fp32. For bf16, K must be even (x is read in pairs).
void gemv_linear(const void* x_in, int64_t m_rows, int64_t k, int64_t ldx, const Elem* packed, int64_t n,
                 const float* bias, int gelu, void* y, int64_t ldy, int out_fp32, int accumulate, int x_fp32,
                 const float* norm_weight, float norm_eps, int threads) {
  const int64_t tiles = (n + kTile - 1) / kTile, steps = k / kPerStep;
  const Elem* x = static_cast<const Elem*>(x_in);
  static thread_local std::vector<Elem> prepared;  // reused across calls
  if (norm_weight || (x_fp32 && sizeof(Elem) != sizeof(float))) {
    prepared.resize(m_rows * k);
    prepare_rows(static_cast<const float*>(x_in), m_rows, k, ldx, norm_weight, norm_eps, prepared.data());
    x = prepared.data();
    ldx = k;
  }
  const Epilogue epi{bias, gelu, accumulate, out_fp32};
  const int64_t tile_bytes = steps * kStepBytes;
  const size_t out_size = out_fp32 ? sizeof(float) : sizeof(Elem);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const char* tile = reinterpret_cast<const char*>(packed) + t * tile_bytes;
    const int64_t n0 = t * kTile;
    const int valid = n - n0 < kTile ? int(n - n0) : kTile;
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4)
      tile_rows<4>(x + m * ldx, ldx, steps, tile, epi, static_cast<char*>(y) + m * ldy * out_size, ldy, n0, valid);
    char* rest_y = static_cast<char*>(y) + m * ldy * out_size;
    switch (m_rows - m) {
      case 3: tile_rows<3>(x + m * ldx, ldx, steps, tile, epi, rest_y, ldy, n0, valid); break;
      case 2: tile_rows<2>(x + m * ldx, ldx, steps, tile, epi, rest_y, ldy, n0, valid); break;
      case 1: tile_rows<1>(x + m * ldx, ldx, steps, tile, epi, rest_y, ldy, n0, valid); break;
      default: break;
    }
  }
}

// One new token's attention for every (sequence, head), writing its key and value into the cache.
// qkv: (B, 3, H, Dh) fp32, the fused projection's output. cos/sin: (rot_dim / 2) fp32 for this
// position, or null; rotary turns the first rot_dim features of queries and keys by interleaved
// pairs, (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as x-transformers does. cache: this layer's
// (2, B, H, L, Dh) keys and values. out: (B, H * Dh), fp32 or the build's dtype: softmax(q k^T * scale) v
// over positions 0..pos. Dh must be a multiple of 16 and at most 256.
void decode_attention(const float* qkv, int64_t batch, int64_t heads, int64_t dh, const float* cos_, const float* sin_,
                      int64_t rot_dim, Elem* cache, int64_t max_len, int64_t pos, float scale, void* out,
                      int out_fp32, int threads) {
  const int64_t chunks = dh / 16, length = pos + 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t bh = 0; bh < batch * heads; ++bh) {
    const int64_t b = bh / heads, h = bh % heads;
    float q[256], k[256];
    const float* q_in = qkv + ((b * 3 + 0) * heads + h) * dh;
    const float* k_in = qkv + ((b * 3 + 1) * heads + h) * dh;
    const float* v_in = qkv + ((b * 3 + 2) * heads + h) * dh;
    for (int64_t d = 0; d < dh; ++d) { q[d] = q_in[d]; k[d] = k_in[d]; }
    if (cos_) {
      for (int64_t i = 0; i < rot_dim / 2; ++i) {
        const float c = cos_[i], s = sin_[i];
        const float q0 = q[2 * i], q1 = q[2 * i + 1], k0 = k[2 * i], k1 = k[2 * i + 1];
        q[2 * i] = q0 * c - q1 * s; q[2 * i + 1] = q1 * c + q0 * s;
        k[2 * i] = k0 * c - k1 * s; k[2 * i + 1] = k1 * c + k0 * s;
      }
    }
    Elem* keys = cache + ((0 * batch + b) * heads + h) * max_len * dh;
    Elem* values = cache + ((1 * batch + b) * heads + h) * max_len * dh;
    for (int64_t c = 0; c < chunks; ++c) {
      store16(keys + pos * dh + 16 * c, _mm512_loadu_ps(k + 16 * c));
      store16(values + pos * dh + 16 * c, _mm512_loadu_ps(v_in + 16 * c));
    }
    __m512 qv[16];
    for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
    static thread_local std::vector<float> scores;
    scores.resize(length + 16);
    float top = -INFINITY;
    // the cache rows come from DRAM (the weights' stream evicts them every step): prefetch keys
    // ahead, and the values alongside, so each core has more than one stream in flight
    const int64_t row_bytes = dh * int64_t(sizeof(Elem));
    for (int64_t j = 0; j < length; ++j) {
      const Elem* key = keys + j * dh;
      for (int64_t line = 0; line < row_bytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(key + 8 * dh) + line, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(values + j * dh) + line, _MM_HINT_T0);
      }
      __m512 dot = _mm512_mul_ps(qv[0], load16(key));
      for (int64_t c = 1; c < chunks; ++c) dot = _mm512_fmadd_ps(qv[c], load16(key + 16 * c), dot);
      scores[j] = _mm512_reduce_add_ps(dot);
      top = scores[j] > top ? scores[j] : top;
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; j += 16) {
      const __mmask16 mask = length - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (length - j)) - 1u);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores.data() + j), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(scores.data() + j, mask, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
    }
    __m512 acc[16];
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; ++j) {
      const __m512 p = _mm512_set1_ps(scores[j]);
      const Elem* value = values + j * dh;
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(p, load16(value + 16 * c), acc[c]);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 o = _mm512_mul_ps(acc[c], inverse);
      const int64_t offset = (b * heads + h) * dh + 16 * c;
      if (out_fp32) _mm512_storeu_ps(static_cast<float*>(out) + offset, o);
      else store16(static_cast<Elem*>(out) + offset, o);
    }
  }
}

}  // extern "C"
namespace {

// a float's bits as an unsigned key in the same order (NaN above +inf, as torch.topk ranks it)
inline uint32_t order_key(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// descending LSD radix sort of 64-bit keys, 8 bits a pass; passes whose digit is constant are skipped
void radix_sort_descending(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch) {
  const size_t count = keys.size();
  scratch.resize(count);
  for (int shift = 0; shift < 64; shift += 8) {
    size_t histogram[256] = {0};
    for (uint64_t key : keys) ++histogram[255 - ((key >> shift) & 0xFF)];
    if (histogram[255 - ((keys[0] >> shift) & 0xFF)] == count) continue;
    size_t offset = 0;
    for (size_t& slot : histogram) { const size_t c = slot; slot = offset; offset += c; }
    for (uint64_t key : keys) scratch[histogram[255 - ((key >> shift) & 0xFF)]++] = key;
    keys.swap(scratch);
  }
}

}  // namespace

extern "C" {

// The k largest values of each row of x (rows, V) fp32, largest first, with their column indices;
// equal values come in column order. This is torch.topk(x, k, sorted=True) up to the order of ties,
// in O(V + k) per row: a histogram of the top 11 key bits finds the bucket holding the k-th value,
// only that bucket is partially sorted, and the k winners are radix sorted.
void topk_rows(const float* x, int64_t rows, int64_t v, int64_t k, float* out_values, int64_t* out_indices,
               int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * v;
    static thread_local std::vector<uint64_t> chosen, boundary, scratch;
    // key = value order in the high 32 bits, then the reversed column, so every key is distinct
    // and a larger key is a larger value or, for equal values, an earlier column
    auto full_key = [&](int64_t c) { return (uint64_t(order_key(row[c])) << 32) | (0xFFFFFFFFu - uint32_t(c)); };
    uint32_t histogram[2048] = {0};
    for (int64_t c = 0; c < v; ++c) ++histogram[order_key(row[c]) >> 21];
    int64_t above = 0;
    int bucket = 2047;
    for (; bucket > 0 && above + histogram[bucket] < k; --bucket) above += histogram[bucket];
    chosen.clear();
    boundary.clear();
    for (int64_t c = 0; c < v; ++c) {
      const int b = int(order_key(row[c]) >> 21);
      if (b > bucket) chosen.push_back(full_key(c));
      else if (b == bucket) boundary.push_back(full_key(c));
    }
    const size_t need = size_t(k - above);
    if (boundary.size() > need)
      std::nth_element(boundary.begin(), boundary.begin() + need, boundary.end(), std::greater<uint64_t>());
    chosen.insert(chosen.end(), boundary.begin(), boundary.begin() + need);
    radix_sort_descending(chosen, scratch);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t c = int64_t(0xFFFFFFFFu - uint32_t(chosen[i] & 0xFFFFFFFFu));
      out_indices[r * k + i] = c;
      out_values[r * k + i] = row[c];
    }
  }
}

}  // extern "C"
