// Veil CPU kernels: the small per-layer ops of the Llama forward, fused, so that a decode step is a
// handful of calls per layer instead of dozens (at batch 1 the per-op overhead, not the math, was
// most of the step).
//
//   rms_norm_bf16   y = bf16(x · rsqrt(mean(x²) + eps) · w)                          x fp32 [T, H]
//   rope_store      q = rope(qkv's q) → fp32 [T, nh, hd]; k = rope(qkv's k) → k cache (fp32) at the
//                   row's slot; v → v cache (bf16) at the slot.      (rotate-half RoPE, cos/sin tables)
//   decode_attention  one query row per sequence over its paged cache (block table, context length):
//                   softmax(q·Kᵀ·scale)·V per query head, GQA by head index; → bf16 or fp32 rows.
//   silu_mul_bf16   y = bf16(silu(a) · b) for gu = [a | b] fp32 [T, 2I]
//
// Every row is computed the same way whatever else is in the batch (no cross-row reductions), so
// these ops keep the engine's batch invariance.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"

namespace {

using veil::exp512;
using veil::load_bf16;
using veil::store_bf16;

void check_cpu() { TORCH_CHECK(veil::cpu_supported(), "veil_cpu kernels need AVX-512 BF16"); }

void check(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == dim && t.is_contiguous(), what, " must be a contiguous ",
              dim, "-d ", c10::toString(dtype), " tensor");
}

void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check(k_cache, at::kFloat, 3, "k cache");
  check(v_cache, at::kBFloat16, 3, "v cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "k and v caches must have the same shape");
}

VEIL_TARGET void rms_row(const float* x, const float* w, uint16_t* y, int64_t H, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(H) + eps);
  const __m512 s = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < H; i += 16)
    store_bf16(y + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), s), _mm512_loadu_ps(w + i)));
}

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_cpu();
  check(x, at::kFloat, 2, "x");
  check(w, at::kFloat, 1, "weight");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.size(0) == H && H % 16 == 0, "rms_norm_bf16: hidden size must match and be a multiple of 16");
  at::Tensor y = at::empty({T, H}, x.options().dtype(at::kBFloat16));
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) rms_row(xp + t * H, wp, yp + t * H, H, static_cast<float>(eps));
  });
  return y;
}

// rotate-half RoPE of one head: out = x·cos + [−x₂, x₁]·sin
VEIL_TARGET inline void rope_head(const float* x, const float* c, const float* s, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 x1 = _mm512_loadu_ps(x + i), x2 = _mm512_loadu_ps(x + half + i);
    _mm512_storeu_ps(out + i, _mm512_fnmadd_ps(x2, _mm512_loadu_ps(s + i), _mm512_mul_ps(x1, _mm512_loadu_ps(c + i))));
    _mm512_storeu_ps(out + half + i,
                     _mm512_fmadd_ps(x1, _mm512_loadu_ps(s + half + i), _mm512_mul_ps(x2, _mm512_loadu_ps(c + half + i))));
  }
}

VEIL_TARGET void rope_row(const float* row, const float* c, const float* s, float* q_out, float* k_cache,
                          uint16_t* v_cache, int64_t nh, int64_t nkv, int64_t hd, int64_t slot, int64_t cache_stride) {
  for (int64_t h = 0; h < nh; ++h) rope_head(row + h * hd, c, s, q_out + h * hd, hd);
  const float* k = row + nh * hd;
  const float* v = k + nkv * hd;
  for (int64_t h = 0; h < nkv; ++h) {
    rope_head(k + h * hd, c, s, k_cache + h * cache_stride + slot * hd, hd);
    for (int64_t i = 0; i < hd; i += 16)
      store_bf16(v_cache + h * cache_stride + slot * hd + i, _mm512_loadu_ps(v + h * hd + i));
  }
}

// qkv fp32 [T, (nh + 2·nkv)·hd]; cos, sin fp32 [P, hd]; positions, slots int64 [T];
// k_cache fp32 / v_cache bf16 [nkv, S, hd] (one layer). Returns q fp32 [T, nh, hd].
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache, int64_t nh, int64_t nkv) {
  check_cpu();
  check(qkv, at::kFloat, 2, "qkv");
  check(cos, at::kFloat, 2, "cos");
  check(sin, at::kFloat, 2, "sin");
  check(positions, at::kLong, 1, "positions");
  check(slots, at::kLong, 1, "slots");
  check_cache(k_cache, v_cache);
  const int64_t T = qkv.size(0), hd = k_cache.size(2), S = k_cache.size(1);
  TORCH_CHECK(qkv.size(1) == (nh + 2 * nkv) * hd && hd % 32 == 0 && cos.size(1) == hd && sin.sizes() == cos.sizes(),
              "rope_store: shapes do not match");
  TORCH_CHECK(k_cache.size(0) == nkv && v_cache.sizes() == k_cache.sizes(), "rope_store: cache shapes do not match");
  TORCH_CHECK(positions.size(0) == T && slots.size(0) == T, "rope_store: one position and slot per row");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0) && sl[t] >= 0 && sl[t] < S, "rope_store: position or slot out of range");
  at::Tensor q = at::empty({T, nh, hd}, qkv.options());
  const float* in = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  auto* vc = reinterpret_cast<uint16_t*>(v_cache.data_ptr());
  const int64_t width = qkv.size(1);
  at::parallel_for(0, T, 8, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t)
      rope_row(in + t * width, cp + pos[t] * hd, sp + pos[t] * hd, qp + t * nh * hd, kc, vc, nh, nkv, hd, sl[t], S * hd);
  });
  return q;
}

// One query head of one sequence: softmax(q·Kᵀ·scale)·V over positions [0, ctx).
VEIL_TARGET void attend_one(const float* q, const float* kc, const uint16_t* vc, const int64_t* table, int64_t ctx,
                            int64_t bs, int64_t hd, float scale, float* scores, float* out) {
  // scores
  __m512 qv[16];  // hd ≤ 256
  const int64_t nv = hd / 16;
  for (int64_t i = 0; i < nv; ++i) qv[i] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * i), _mm512_set1_ps(scale));
  float mx = -INFINITY;
  for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
    const float* kb = kc + table[j0 / bs] * bs * hd;
    const int64_t n = std::min(bs, ctx - j0);
    for (int64_t j = 0; j < n; ++j) {
      const float* kr = kb + j * hd;
      __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
      for (int64_t i = 1; i < nv; ++i) acc = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(kr + 16 * i), acc);
      const float sc = _mm512_reduce_add_ps(acc);
      scores[j0 + j] = sc;
      mx = std::max(mx, sc);
    }
  }
  // exp and sum
  const __m512 mxv = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= ctx; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), mxv));
    _mm512_storeu_ps(scores + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < ctx) {
    const __mmask16 m = static_cast<__mmask16>((1u << (ctx - j)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), mxv));
    _mm512_mask_storeu_ps(scores + j, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(sum);
  // weighted values
  __m512 o[16];
  for (int64_t i = 0; i < nv; ++i) o[i] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
    const uint16_t* vb = vc + table[j0 / bs] * bs * hd;
    const int64_t n = std::min(bs, ctx - j0);
    for (int64_t jj = 0; jj < n; ++jj) {
      const __m512 p = _mm512_set1_ps(scores[j0 + jj]);
      const uint16_t* vr = vb + jj * hd;
      for (int64_t i = 0; i < nv; ++i) o[i] = _mm512_fmadd_ps(p, load_bf16(vr + 16 * i), o[i]);
    }
  }
  const __m512 iv = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(out + 16 * i, _mm512_mul_ps(o[i], iv));
}

VEIL_TARGET void store_bf16_row(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) store_bf16(dst + i, _mm512_loadu_ps(src + i));
}

// q fp32 [B, nh, hd]; k_cache fp32 / v_cache bf16 [nkv, S, hd]; tables int64 [B, W] block ids;
// ctx int64 [B] context lengths (the query is the last position). Returns [B, nh·hd] in out_dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& tables, const at::Tensor& ctx, int64_t block_size, double scale,
                            bool bf16_out) {
  check_cpu();
  check(q, at::kFloat, 3, "q");
  check_cache(k_cache, v_cache);
  check(tables, at::kLong, 2, "block tables");
  check(ctx, at::kLong, 1, "context lengths");
  const int64_t B = q.size(0), nh = q.size(1), hd = q.size(2), nkv = k_cache.size(0), S = k_cache.size(1);
  TORCH_CHECK(hd % 16 == 0 && hd <= 256 && k_cache.size(2) == hd && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: head size must be a multiple of 16, at most 256, and match the cache");
  TORCH_CHECK(nkv > 0 && nh % nkv == 0 && tables.size(0) == B && ctx.size(0) == B && S % block_size == 0,
              "decode_attention: shapes do not match");
  const int64_t W = tables.size(1), nblocks = S / block_size;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* cp = ctx.data_ptr<int64_t>();
  int64_t max_ctx = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cp[b] >= 1 && cp[b] <= W * block_size, "decode_attention: context length outside the block table");
    for (int64_t i = 0; i < (cp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tp[b * W + i] >= 0 && tp[b * W + i] < nblocks, "decode_attention: block id out of range");
    max_ctx = std::max(max_ctx, cp[b]);
  }
  at::Tensor out = at::empty({B, nh * hd}, q.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  const float* qp = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const auto* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  const int64_t rep = nh / nkv;
  at::parallel_for(0, B * nh, 1, [&](int64_t a, int64_t b) {
    std::vector<float> scores(max_ctx + 16);
    float row[256];
    for (int64_t item = a; item < b; ++item) {
      const int64_t s = item / nh, h = item % nh, kvh = h / rep;
      attend_one(qp + item * hd, kc + kvh * S * hd, vc + kvh * S * hd, tp + s * W, cp[s], block_size, hd,
                 static_cast<float>(scale), scores.data(), row);
      if (bf16_out) {
        store_bf16_row(reinterpret_cast<uint16_t*>(out.data_ptr()) + item * hd, row, hd);
      } else {
        std::memcpy(out.data_ptr<float>() + item * hd, row, hd * sizeof(float));
      }
    }
  });
  return out;
}

VEIL_TARGET void silu_mul_row(const float* a, const float* b, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 x = _mm512_loadu_ps(a + i);
    const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    store_bf16(y + i, _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_loadu_ps(b + i)));
  }
}

at::Tensor silu_mul_bf16(const at::Tensor& gu) {
  check_cpu();
  check(gu, at::kFloat, 2, "gate_up");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  TORCH_CHECK(gu.size(1) == 2 * I && I % 16 == 0, "silu_mul_bf16: width must be 2·I with I a multiple of 16");
  at::Tensor y = at::empty({T, I}, gu.options().dtype(at::kBFloat16));
  const float* p = gu.data_ptr<float>();
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, T, 4, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) silu_mul_row(p + t * 2 * I, p + t * 2 * I + I, yp + t * I, I);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(veil_cpu, m) {
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm_bf16);
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor slots, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int nh, int nkv) -> Tensor",
        &rope_store);
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor ctx, int block_size, "
        "float scale, bool bf16_out) -> Tensor",
        &decode_attention);
  m.def("silu_mul_bf16(Tensor gate_up) -> Tensor", &silu_mul_bf16);
}
