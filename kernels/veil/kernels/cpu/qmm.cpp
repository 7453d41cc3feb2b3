// Veil CPU kernels: block-quantized matmul on AVX-512 BF16 (vdpbf16ps).
//
//   y[M, N] (+)= x[M, K] · W[N, K]ᵀ      x bf16, y fp32, W block-quantized (groups of 32 along K)
//
// Why this is exact: every weight code is a small integer (Q4: 0..15, Q8: -127..127), which bf16
// represents exactly, and x is bf16, so each product code·x is exact in fp32 and the group's dot
// product is an fp32 sum. The group scale (and Q4's offset) are applied once per group, in fp32.
// The result is the fp32 matmul with the file's dequantized weights, up to fp32 summation order.
//
// Packed layout (see veil/kernels/cpu_ext.py, which builds it): for every block of 16 output
// channels and every group g of 32 inputs, one record:
//   Q4: 8 chunks of 32 bytes. Byte j of chunk c holds channel n = j/2, input k = 2c + j%2 in its low
//       nibble and k = 16 + 2c + j%2 in its high nibble. Zero-extended to 16-bit lanes, each chunk
//       gives two vectors of 16 (channel, 2 inputs) bf16 pairs: vdpbf16ps's operand layout.
//       Then d[16], m[16] (fp16 or fp32): w = d·q + m.
//   Q8: 16 chunks of 32 bytes, byte j of chunk c = code of channel j/2, input 2c + j%2; then d[16].
// A nibble q becomes the bf16 number 128 + q by OR-ing in 0x4300 (the bits of 128.0: the 7 mantissa
// bits count units), so the group sum is Σ(128+q)·x = Σq·x + 128·Σx, and
//   y += d·acc + (m − 128·d)·Σx.
// (Σx per row and group is precomputed; the extra cancellation costs ~16× fp32 rounding.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kQ4 = 0, kQ8 = 1;  // weight kinds
constexpr int kMaxTile = 12;         // rows per micro-tile: 2·12 accumulators + 8 others ≤ 32 zmm
constexpr int64_t kChunkBytes = 512 * 1024;  // bf16 activation rows per pass (L2 is 1-2 MiB)

int64_t record_bytes(int64_t kind, bool f16) {
  const int64_t codes = kind == kQ4 ? 256 : 512;
  const int64_t nscales = kind == kQ4 ? 32 : 16;
  return codes + nscales * (f16 ? 2 : 4);
}

// Weights stream from DRAM at small batches: ask for the records a few groups ahead (records of
// consecutive channel blocks are contiguous, so this runs on into the next block).
constexpr int64_t kPrefetchGroups = 6;

inline void prefetch_record(const uint8_t* p, int64_t rec) {
  for (int64_t off = 0; off < rec; off += 64) _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T0);
}

template <bool F16>
VEIL_TARGET inline __m512 load_scales(const uint8_t* p) {
  if constexpr (F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

VEIL_TARGET inline __m512i bcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Write (or add) a finished tile's MT rows of 16 outputs.
template <int MT>
VEIL_TARGET inline void store_tile(__m512* tot, float* y, int64_t ldy, bool accumulate) {
  for (int r = 0; r < MT; ++r) {
    float* out = y + r * ldy;
    if (accumulate) tot[r] = _mm512_add_ps(tot[r], _mm512_loadu_ps(out));
    _mm512_storeu_ps(out, tot[r]);
  }
}

// One tile: MT rows × 16 channels over all G groups.
template <int MT, bool F16>
VEIL_TARGET void q4_tile(const uint16_t* x, int64_t ldx, const float* sums, int64_t G,
                         const uint8_t* w, int64_t rec, float* y, int64_t ldy, bool accumulate) {
  __m512 tot[MT];
  for (int r = 0; r < MT; ++r) tot[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  const __m512 k128 = _mm512_set1_ps(128.0f);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = w + g * rec;
    prefetch_record(b + kPrefetchGroups * rec, rec);
    __m512 acc[MT];
    for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m512i raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * c)));
      // (raw & 0xF) | 0x4300: ternary-logic table for (A & B) | C is 0xEA
      const __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(raw, low4, bias, 0xEA);
      const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(raw, 4), bias);
      const uint16_t* xg = x + g * 32 + 2 * c;
#pragma GCC unroll 12
      for (int r = 0; r < MT; ++r) {
        acc[r] = _mm512_dpbf16_ps(acc[r], lo, (__m512bh)bcast_pair(xg + r * ldx));
        acc[r] = _mm512_dpbf16_ps(acc[r], hi, (__m512bh)bcast_pair(xg + r * ldx + 16));
      }
    }
    const __m512 d = load_scales<F16>(b + 256);
    const __m512 m = load_scales<F16>(b + 256 + (F16 ? 32 : 64));
    const __m512 off = _mm512_fnmadd_ps(k128, d, m);  // m − 128·d
#pragma GCC unroll 12
    for (int r = 0; r < MT; ++r) {
      tot[r] = _mm512_fmadd_ps(acc[r], d, tot[r]);
      tot[r] = _mm512_fmadd_ps(off, _mm512_set1_ps(sums[r * G + g]), tot[r]);
    }
  }
  store_tile<MT>(tot, y, ldy, accumulate);
}

template <int MT, bool F16>
VEIL_TARGET void q8_tile(const uint16_t* x, int64_t ldx, const float*, int64_t G, const uint8_t* w,
                         int64_t rec, float* y, int64_t ldy, bool accumulate) {
  __m512 tot[MT];
  for (int r = 0; r < MT; ++r) tot[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = w + g * rec;
    prefetch_record(b + kPrefetchGroups * rec, rec);
    __m512 acc[MT];
    for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int c = 0; c < 16; ++c) {
      const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 * c));
      const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 * c + 16));
      const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
      const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
      const __m512bh wv = _mm512_cvtne2ps_pbh(f1, f0);  // exact: |code| ≤ 127
      const uint16_t* xg = x + g * 32 + 2 * c;
#pragma GCC unroll 12
      for (int r = 0; r < MT; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)bcast_pair(xg + r * ldx));
    }
    const __m512 d = load_scales<F16>(b + 512);
#pragma GCC unroll 12
    for (int r = 0; r < MT; ++r) tot[r] = _mm512_fmadd_ps(acc[r], d, tot[r]);
  }
  store_tile<MT>(tot, y, ldy, accumulate);
}

VEIL_TARGET void group_sums(const uint16_t* x, int64_t ldx, int64_t r0, int64_t r1, int64_t G, float* sums) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* p = x + r * ldx + g * 32;
      sums[r * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(veil::load_bf16(p), veil::load_bf16(p + 16)));
    }
}

using TileFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, const uint8_t*, int64_t, float*,
                        int64_t, bool);

template <int MT>
TileFn pick(int64_t kind, bool f16) {
  if (kind == kQ4) return f16 ? q4_tile<MT, true> : q4_tile<MT, false>;
  return f16 ? q8_tile<MT, true> : q8_tile<MT, false>;
}

TileFn tile_fn(int rows, int64_t kind, bool f16) {
  switch (rows) {
    case 1: return pick<1>(kind, f16);
    case 2: return pick<2>(kind, f16);
    case 3: return pick<3>(kind, f16);
    case 4: return pick<4>(kind, f16);
    case 5: return pick<5>(kind, f16);
    case 6: return pick<6>(kind, f16);
    case 7: return pick<7>(kind, f16);
    case 8: return pick<8>(kind, f16);
    case 9: return pick<9>(kind, f16);
    case 10: return pick<10>(kind, f16);
    case 11: return pick<11>(kind, f16);
    default: return pick<12>(kind, f16);
  }
}

}  // namespace

bool veil::cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

namespace {

using veil::cpu_supported;

// x [M, K] bf16 (rows contiguous), packed [NB, G, rec] uint8 → y [M, n_out] fp32.
// `out`, if given, is an fp32 [M, n_out] tensor the product is added into.
at::Tensor qmm_impl(const at::Tensor& x, const at::Tensor& packed, int64_t kind, bool f16, int64_t n_out,
                    const std::optional<at::Tensor>& out) {
  TORCH_CHECK(cpu_supported(), "veil_cpu.qmm needs AVX-512 BF16");
  TORCH_CHECK(kind == kQ4 || kind == kQ8, "unknown weight kind ", kind);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x must be bf16 [M, K] with unit column stride");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed weight must be uint8 [NB, G, record]");
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), G = packed.size(1), rec = packed.size(2);
  TORCH_CHECK(G * 32 == K, "x has ", K, " features, weight has ", G, " groups of 32");
  TORCH_CHECK(rec == record_bytes(kind, f16), "record size ", rec, " does not match the kind");
  TORCH_CHECK(n_out > 16 * (NB - 1) && n_out <= 16 * NB, "n_out ", n_out, " does not fit ", NB, " blocks");
  at::Tensor y;
  const bool accumulate = out.has_value();
  if (accumulate) {
    y = *out;
    TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(0) == M && y.size(1) == n_out && y.stride(1) == 1,
                "out must be fp32 [M, n_out] with unit column stride");
  } else {
    y = at::empty({M, n_out}, x.options().dtype(at::kFloat));
  }
  if (M == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const int64_t ldx = x.stride(0);
  const auto* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t ldy = y.stride(0);
  // Σx per row and group (Q4's offset term), in fp32 from the bf16 values.
  std::vector<float> sums;
  if (kind == kQ4) {
    sums.resize(M * G);
    at::parallel_for(0, M, 64, [&](int64_t a, int64_t b) { group_sums(xp, ldx, a, b, G, sums.data()); });
  }
  // Rows in chunks whose activations stay in L2 while every channel block passes over them;
  // within a chunk, balanced tiles of at most kMaxTile rows.
  const bool ragged = n_out != 16 * NB;
  const int64_t chunk_rows = std::max<int64_t>(kMaxTile, (kChunkBytes / (K * 2)) / kMaxTile * kMaxTile);
  for (int64_t c0 = 0; c0 < M; c0 += chunk_rows) {
  const int64_t cm = std::min(chunk_rows, M - c0);
  const int64_t ntiles = (cm + kMaxTile - 1) / kMaxTile;
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    float scratch[kMaxTile * 16];
    for (int64_t nb = b0; nb < b1; ++nb) {
      const uint8_t* wb = wp + nb * G * rec;
      int64_t r0 = c0;
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t rows = (c0 + cm - r0) / (ntiles - t);
        const TileFn fn = tile_fn(static_cast<int>(rows), kind, f16);
        const float* s = kind == kQ4 ? sums.data() + r0 * G : nullptr;
        if (ragged && nb == NB - 1) {  // the last block is partial: compute into scratch, copy the valid part
          fn(xp + r0 * ldx, ldx, s, G, wb, rec, scratch, 16, false);
          const int64_t valid = n_out - 16 * nb;
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < valid; ++j) {
              float& dst = yp[(r0 + r) * ldy + 16 * nb + j];
              dst = accumulate ? dst + scratch[r * 16 + j] : scratch[r * 16 + j];
            }
        } else {
          fn(xp + r0 * ldx, ldx, s, G, wb, rec, yp + r0 * ldy + 16 * nb, ldy, accumulate);
        }
        r0 += rows;
      }
    }
  });
  }
  return y;
}

at::Tensor qmm(const at::Tensor& x, const at::Tensor& packed, int64_t kind, bool f16, int64_t n_out) {
  return qmm_impl(x, packed, kind, f16, n_out, std::nullopt);
}

void qmm_add_(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, int64_t kind, bool f16) {
  qmm_impl(x, packed, kind, f16, out.size(1), out);
}

}  // namespace

TORCH_LIBRARY(veil_cpu, m) {
  m.def("supported() -> bool", [] { return cpu_supported(); });
  m.def("qmm(Tensor x, Tensor packed, int kind, bool f16, int n_out) -> Tensor", &qmm);
  m.def("qmm_add_(Tensor(a!) out, Tensor x, Tensor packed, int kind, bool f16) -> ()", &qmm_add_);
}
