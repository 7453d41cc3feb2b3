// Shared by Veil's CPU kernels: the instruction-set target and small AVX-512 helpers.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define VEIL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512dq,fma,f16c")))

namespace veil {

bool cpu_supported();

// e^x for fp32 lanes: range reduction by ln 2 and a degree-6 Taylor polynomial on |r| ≤ ln2/2
// (truncation error ≤ 1.2e-7 relative, about one ulp); 2^n is applied by vscalefps, which also
// underflows very negative inputs to exactly 0.
VEIL_TARGET inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 → 16 fp32 (exact)
VEIL_TARGET inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// 16 fp32 → 16 bf16, round to nearest even (what torch's .to(torch.bfloat16) does for finite values)
VEIL_TARGET inline void store_bf16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

}  // namespace veil
