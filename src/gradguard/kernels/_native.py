"""A small C kernel for the CPU passes, compiled on first use (optional).

numpy has no fused "widen and square" for bfloat16 / float16: widening a chunk into a float32
buffer and then taking a BLAS dot reads and writes it three times (bfloat16 clip 0.35-0.66x of
torch's). And one core reads memory faster with several sequential streams in flight than with
one (measured in ``docs/performance.md``), which neither numpy's nor torch's loops do. This
module holds the loops in C, written with the compiler's vector extensions (8-wide float32
vectors); each reads a chunk as its four quarters at once:

``sumsq(kind, ptr, n)`` / ``sumsq_max(kind, ptr, n)``
    ``sum x**2`` of ``n`` contiguous float32 / bfloat16 / float16 values, widened to float32
    in registers (bfloat16: a shift; float16: F16C ``vcvtph2ps``, or an exact bit
    conversion without F16C), squared and accumulated in float32 (two accumulators per
    stream), every 512 elements of a stream added into a float64 sum (so the float32 part
    never adds more than 32 terms per lane); the last ``n mod 2048`` elements in one stream.
    ``sumsq_max`` also returns ``max |x|``, taken on the magnitude bits as integers: the same
    order as the floats, and NaN (whose bits are above inf's) propagates.
``sumsq_checked(kind, ptr, n, tiny)``
    ``sumsq`` of one chunk, summed again exactly in float64 when the float32 sum is inf or
    below ``n * tiny`` (underflowed squares could matter; exact zeros included).
``norms_plan(kind, bases, tensor_of, start, lens, tiny, sq, maxes, norms, total)``
    a whole norm pass over a chunk table (``kernels.cpu._Plan``) in one call: every chunk's
    checked sum, the per-tensor float32 norms and the total from the float64 sums (a small
    model on one thread: each Python-level call after a backward pass costs a cold cache).
``scale(kind, ptr, n, c)`` / ``scale_plan(kind, bases, tensor_of, start, lens, c)``
    ``x <- x * c``: float32 one IEEE multiply; bfloat16 / float16 a float32 multiply,
    rounded to nearest even: the bits ``torch.mul_`` writes on the CPU for a float32 factor
    (float16 only with F16C).

The source is compiled once per machine with ``$CC`` (default ``cc``) ``-O3 -march=native``
into ``$GRADGUARD_CACHE_DIR`` (default ``~/.cache/gradguard``; used only when it is this user's
and no one else can write it, else a fresh temporary folder of the process),
named by a hash of the source, the compiler and the CPU's flags, written to a temporary name
and renamed (concurrent processes do not collide). Calls go through ``ctypes``, which drops
the GIL, so the thread pool runs them in parallel. Without a compiler, on a failed build, or
with ``GRADGUARD_NATIVE=0``, ``lib()`` is None and ``kernels.cpu`` takes its numpy path (same
results up to float32 rounding, slower for 2-byte dtypes).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading

#: kind codes of the kernels
F32, BF16, F16 = "f32", "bf16", "f16"
_CODE = {F32: 0, BF16: 1, F16: 2}

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif
typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
#define W 8
#define FLUSH 1024
#define QB 512

static inline vf v_bf(const uint16_t* p) { vh h; memcpy(&h, p, 16);
  vu u = __builtin_convertvector(h, vu) << 16; return (vf)u; }
static inline float s_bf(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
/* float16 -> float32, exact: the magnitude bits moved into float32's place and scaled by
   2**112 (denormals included); exponent 31 (inf, NaN) gets float32's all-ones exponent */
static inline float s_h(uint16_t h) { uint32_t o = (uint32_t)(h & 0x7fffu) << 13; float f;
  memcpy(&f, &o, 4); f *= 0x1p112f;
  if ((h & 0x7c00u) == 0x7c00u) { uint32_t q = o | 0x7f800000u; memcpy(&f, &q, 4); }
  if (h & 0x8000u) f = -f;
  return f; }
#if defined(__F16C__)
static inline vf v_h(const uint16_t* p) { __m128i q; memcpy(&q, p, 16); return (vf)_mm256_cvtph_ps(q); }
#else
static inline vf v_h(const uint16_t* p) { vh h; memcpy(&h, p, 16); vu u = __builtin_convertvector(h, vu);
  vu o = (u & 0x7fffu) << 13; vf f = ((vf)o) * 0x1p112f;
  vu special = (vu)((u & 0x7c00u) == 0x7c00u); vu q = o | 0x7f800000u;
  return (vf)((((vu)f & ~special) | (q & special)) | ((u & 0x8000u) << 16)); }
#endif
static inline vf v_f(const float* p) { vf v; memcpy(&v, p, 32); return v; }
static inline float s_f(float v) { return v; }
static inline vi v_abs(vf v) { return (vi)((vu)v & 0x7fffffffu); }
static inline vi v_max(vi m, vi a) { vi g = a > m; return (a & g) | (m & ~g); }
static inline int32_t s_abs(float v) { int32_t i; memcpy(&i, &v, 4); return i & 0x7fffffff; }

static inline double v_hsum(vf a) { double s = 0.0; for (int j = 0; j < W; j++) s += (double)a[j]; return s; }

/* One stream, four accumulators, flushed every FLUSH elements: the tail of a chunk. */
#define SUMSQ1(NAME, T, LD, SC, MAX)                                                       \
static double NAME(const T* x, int64_t n, vi* mv, int32_t* ms) {                           \
  double tot = 0.0; vi m0 = *mv; int32_t m = *ms; int64_t i = 0;                           \
  for (; i + FLUSH <= n; i += FLUSH) {                                                     \
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                             \
    for (int64_t k = i; k < i + FLUSH; k += 4 * W) {                                       \
      vf v0 = LD(x + k), v1 = LD(x + k + W), v2 = LD(x + k + 2 * W), v3 = LD(x + k + 3 * W); \
      a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;                          \
      if (MAX) m0 = v_max(v_max(m0, v_abs(v0)), v_max(v_max(v_abs(v1), v_abs(v2)), v_abs(v3))); \
    }                                                                                      \
    tot += v_hsum((a0 + a1) + (a2 + a3));                                                  \
  }                                                                                        \
  float acc = 0.0f;                                                                        \
  for (; i < n; i++) { float v = SC(x[i]); acc += v * v;                                   \
                       if (MAX) { int32_t b = s_abs(v); m = b > m ? b : m; } }             \
  *mv = m0; *ms = m;                                                                       \
  return tot + (double)acc;                                                                \
}

/* Four streams (the chunk's quarters, read at once: one core's read bandwidth from memory
   is 25-30 % higher with four sequential streams in flight than with one), two accumulators
   each, flushed every QB elements per stream: 32 float32 terms per lane, as in SUMSQ1. */
#define SUMSQ(NAME, ONE, T, LD2, MAX)                                                      \
double NAME(const T* x, int64_t n, float* maxabs) {                                        \
  double tot = 0.0; vi m0 = {0}, m1 = {0}, m2 = {0}, m3 = {0};                             \
  const int64_t q = (n / (4 * QB)) * QB;                                                   \
  const T *x0 = x, *x1 = x + q, *x2 = x + 2 * q, *x3 = x + 3 * q;                          \
  for (int64_t i = 0; i < q; i += QB) {                                                    \
    vf a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};     \
    for (int64_t k = i; k < i + QB; k += 2 * W) {                                          \
      vf u0, w0, u1, w1, u2, w2, u3, w3;                                                   \
      LD2(x0 + k, u0, w0); LD2(x1 + k, u1, w1); LD2(x2 + k, u2, w2); LD2(x3 + k, u3, w3);  \
      a0 += u0 * u0; b0 += w0 * w0; a1 += u1 * u1; b1 += w1 * w1;                          \
      a2 += u2 * u2; b2 += w2 * w2; a3 += u3 * u3; b3 += w3 * w3;                          \
      if (MAX) { m0 = v_max(m0, v_max(v_abs(u0), v_abs(w0)));                              \
                 m1 = v_max(m1, v_max(v_abs(u1), v_abs(w1)));                              \
                 m2 = v_max(m2, v_max(v_abs(u2), v_abs(w2)));                              \
                 m3 = v_max(m3, v_max(v_abs(u3), v_abs(w3))); }                            \
    }                                                                                      \
    tot += (v_hsum(a0 + b0) + v_hsum(a1 + b1)) + (v_hsum(a2 + b2) + v_hsum(a3 + b3));      \
  }                                                                                        \
  vi mv = v_max(v_max(m0, m1), v_max(m2, m3)); int32_t m = 0;                              \
  tot += ONE(x + 4 * q, n - 4 * q, &mv, &m);                                               \
  if (MAX) { for (int j = 0; j < W; j++) m = mv[j] > m ? mv[j] : m;                        \
             memcpy(maxabs, &m, 4); }                                                      \
  return tot;                                                                              \
}

SUMSQ1(one_f32, float, v_f, s_f, 0)
SUMSQ1(one_bf16, uint16_t, v_bf, s_bf, 0)
SUMSQ1(one_f16, uint16_t, v_h, s_h, 0)
SUMSQ1(onemax_f32, float, v_f, s_f, 1)
SUMSQ1(onemax_bf16, uint16_t, v_bf, s_bf, 1)
SUMSQ1(onemax_f16, uint16_t, v_h, s_h, 1)
/* 2W elements at p as two float32 vectors. bfloat16: one 32-byte load, the even elements
   shifted into the high halves and the odd ones masked there (in-lane: no shuffles, which
   would make the loop compute-bound); the order of the terms is free in a sum. */
#define LD2_F32(p, u, w) do { u = v_f(p); w = v_f((p) + W); } while (0)
#define LD2_F16(p, u, w) do { u = v_h(p); w = v_h((p) + W); } while (0)
#define LD2_BF16(p, u, w) do { vu r_; memcpy(&r_, (p), 32);                                 \
  u = (vf)(r_ << 16); w = (vf)(r_ & 0xffff0000u); } while (0)
SUMSQ(gg_sumsq_f32, one_f32, float, LD2_F32, 0)
SUMSQ(gg_sumsq_bf16, one_bf16, uint16_t, LD2_BF16, 0)
SUMSQ(gg_sumsq_f16, one_f16, uint16_t, LD2_F16, 0)
SUMSQ(gg_sumsqmax_f32, onemax_f32, float, LD2_F32, 1)
SUMSQ(gg_sumsqmax_bf16, onemax_bf16, uint16_t, LD2_BF16, 1)
SUMSQ(gg_sumsqmax_f16, onemax_f16, uint16_t, LD2_F16, 1)

/* sum x**2 in float64, element by element: exact squares (a float32 square fits float64's
   range and mantissa), for the chunks whose float32 sum overflowed or may have lost
   underflowed squares */
static double exact_sumsq(int kind, const void* p, int64_t n) {
  double s = 0.0;
  if (kind == 0) { const float* x = p; for (int64_t i = 0; i < n; i++) { double v = x[i]; s += v * v; } }
  else if (kind == 1) { const uint16_t* x = p; for (int64_t i = 0; i < n; i++) { double v = s_bf(x[i]); s += v * v; } }
  else { const uint16_t* x = p; for (int64_t i = 0; i < n; i++) { double v = s_h(x[i]); s += v * v; } }
  return s;
}

/* One chunk of n elements at p: its sum of squares (and *m = max |x| when m is not NULL).
   A float32 sum that is inf (not NaN) or below n * tiny (exact zeros included: underflowed
   squares could matter) is summed again exactly in float64 (*again = 1). */
static double chunk_sumsq(int kind, const void* p, int64_t n, double tiny, float* m, int* again) {
  double s = m ? (kind == 0 ? gg_sumsqmax_f32(p, n, m) : kind == 1 ? gg_sumsqmax_bf16(p, n, m)
                  : gg_sumsqmax_f16(p, n, m))
               : (kind == 0 ? gg_sumsq_f32(p, n, 0) : kind == 1 ? gg_sumsq_bf16(p, n, 0)
                  : gg_sumsq_f16(p, n, 0));
  *again = (s == INFINITY) || s < (double)n * tiny;
  return *again ? exact_sumsq(kind, p, n) : s;
}

/* chunk_sumsq for one chunk (the thread pool's unit of work) */
double gg_sumsq_checked(int kind, const void* p, int64_t n, double tiny, float* m) {
  int again; return chunk_sumsq(kind, p, n, tiny, m, &again);
}

/* A whole norm pass from a chunk table (kernels.cpu._Plan): chunk j of tensor t = tensor_of[j]
   is lens[j] elements at bases[t] + start[j] bytes. sq[j] its chunk_sumsq (m[j] its max |x|
   when m is not NULL); norms[t] = sqrt(sum of its chunks' sq) in float32, total[0] the
   float32 sqrt of all of them (added in float64). Returns how many chunks were summed again. */
int64_t gg_norms_plan(int kind, const int64_t* bases, const int64_t* tensor_of, const int64_t* start,
                      const int64_t* lens, int64_t k, int64_t n_t, double tiny, double* sq,
                      float* m, float* norms, float* total) {
  int64_t bad = 0; double all = 0.0, acc = 0.0; int64_t cur = -1; int again;
  for (int64_t t = 0; t < n_t; t++) norms[t] = 0.0f;
  for (int64_t j = 0; j < k; j++) {
    int64_t t = tensor_of[j];
    const void* p = (const void*)(intptr_t)(bases[t] + start[j]);
    sq[j] = chunk_sumsq(kind, p, lens[j], tiny, m ? m + j : 0, &again);
    bad += again;
    if (t != cur) { if (cur >= 0) { norms[cur] = (float)sqrt(acc); all += acc; } cur = t; acc = 0.0; }
    acc += sq[j];
  }
  if (cur >= 0) { norms[cur] = (float)sqrt(acc); all += acc; }
  total[0] = (float)sqrt(all);
  return bad;
}

/* x <- x * c, W elements at p (V) or one (S), then the four-stream loop over a chunk */
static inline void v_scale_f32(float* p, float c) { vf v; memcpy(&v, p, 32); v *= c; memcpy(p, &v, 32); }
static inline void s_scale_f32(float* p, float c) { *p *= c; }
/* float32 -> bfloat16, round to nearest even, kept in the high half; NaN -> a quiet NaN
   (torch's scalar rule) */
static inline vu v_round_bf16(vf f) {
  vu u = (vu)f; vu r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  vu nan = (vu)(f != f); return (r & ~nan) | (0x7fc00000u & nan); }
/* 2W bfloat16 values: the even ones from the low halves, the odd from the high (in-lane) */
static inline void v_scale_bf16(uint16_t* p, float c) {
  vu r; memcpy(&r, p, 32);
  vu lo = v_round_bf16((vf)(r << 16) * c), hi = v_round_bf16((vf)(r & 0xffff0000u) * c);
  r = (lo >> 16) | hi; memcpy(p, &r, 32); }
static inline void s_scale_bf16(uint16_t* p, float c) {
  float f = s_bf(*p) * c; uint32_t u; memcpy(&u, &f, 4);
  uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  *p = (f != f) ? (uint16_t)0x7fc0u : r; }

/* V scales STEP elements at once, S one */
#define SCALE(NAME, T, V, S, STEP)                                                         \
void NAME(T* x, int64_t n, float c) {                                                      \
  const int64_t q = (n / (4 * STEP)) * STEP;                                               \
  T *x0 = x, *x1 = x + q, *x2 = x + 2 * q, *x3 = x + 3 * q;                                \
  for (int64_t k = 0; k < q; k += STEP) { V(x0 + k, c); V(x1 + k, c); V(x2 + k, c); V(x3 + k, c); } \
  int64_t i = 4 * q;                                                                       \
  for (; i + STEP <= n; i += STEP) V(x + i, c);                                            \
  for (; i < n; i++) S(x + i, c);                                                          \
}
SCALE(gg_scale_f32, float, v_scale_f32, s_scale_f32, W)
SCALE(gg_scale_bf16, uint16_t, v_scale_bf16, s_scale_bf16, 2 * W)

#if defined(__F16C__)
int gg_has_scale_f16(void) { return 1; }
static inline void v_scale_f16(uint16_t* p, float c) {
  __m128i q; memcpy(&q, p, 16);
  q = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_cvtph_ps(q), _mm256_set1_ps(c)), _MM_FROUND_TO_NEAREST_INT);
  memcpy(p, &q, 16); }
static inline void s_scale_f16(uint16_t* p, float c) {
  __m128i q = _mm_cvtsi32_si128(*p);
  *p = (uint16_t)_mm_cvtsi128_si32(_mm_cvtps_ph(_mm_mul_ps(_mm_cvtph_ps(q), _mm_set1_ps(c)),
                                                _MM_FROUND_TO_NEAREST_INT)); }
SCALE(gg_scale_f16, uint16_t, v_scale_f16, s_scale_f16, W)
#else
int gg_has_scale_f16(void) { return 0; }
void gg_scale_f16(uint16_t* x, int64_t n, float c) { (void)x; (void)n; (void)c; }
#endif

/* gg_scale_<kind> over a chunk table (as gg_norms_plan's), the last chunk first: those are the
   ones the norm pass read last, still in the cache */
void gg_scale_plan(int kind, const int64_t* bases, const int64_t* tensor_of, const int64_t* start,
                   const int64_t* lens, int64_t k, float c) {
  for (int64_t j = k - 1; j >= 0; j--) {
    void* p = (void*)(intptr_t)(bases[tensor_of[j]] + start[j]);
    if (kind == 0) gg_scale_f32(p, lens[j], c);
    else if (kind == 1) gg_scale_bf16(p, lens[j], c);
    else gg_scale_f16(p, lens[j], c);
  }
}
"""

_lock = threading.Lock()
_lib: Native | None = None
_error: str | None = None


class Native:
    """The loaded kernels: ``sumsq``, ``sumsq_max``, ``sumsq_checked``, ``norms_plan``,
    ``scale``, ``scale_plan`` (see the module docstring)."""

    def __init__(self, cdll: ctypes.CDLL, path: str):
        self.path = path
        self._sumsq = {}
        self._sumsq_max = {}
        f32p = ctypes.POINTER(ctypes.c_float)
        for kind in (F32, BF16, F16):
            f = getattr(cdll, f"gg_sumsq_{kind}")
            f.restype, f.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64, f32p]
            self._sumsq[kind] = f
            f = getattr(cdll, f"gg_sumsqmax_{kind}")
            f.restype, f.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64, f32p]
            self._sumsq_max[kind] = f
        self._checked = cdll.gg_sumsq_checked
        self._checked.restype = ctypes.c_double
        self._checked.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                                  f32p]
        self._norms_plan = cdll.gg_norms_plan
        self._norms_plan.restype = ctypes.c_int64
        self._norms_plan.argtypes = [ctypes.c_int, *([ctypes.c_void_p] * 4), ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_double, *([ctypes.c_void_p] * 4)]
        self._scale_plan = cdll.gg_scale_plan
        self._scale_plan.restype = None
        self._scale_plan.argtypes = [ctypes.c_int, *([ctypes.c_void_p] * 4), ctypes.c_int64,
                                     ctypes.c_float]
        self._scale = {}
        for kind in (F32, BF16, F16):
            f = getattr(cdll, f"gg_scale_{kind}")
            f.restype, f.argtypes = None, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
            self._scale[kind] = f
        cdll.gg_has_scale_f16.restype = ctypes.c_int
        if not cdll.gg_has_scale_f16():
            del self._scale[F16]
        self._null = f32p()

    def sumsq(self, kind: str, ptr: int, n: int) -> float:
        return self._sumsq[kind](ptr, n, self._null)

    def sumsq_max(self, kind: str, ptr: int, n: int) -> tuple[float, float]:
        m = ctypes.c_float()
        s = self._sumsq_max[kind](ptr, n, ctypes.byref(m))
        return s, m.value

    def sumsq_checked(self, kind: str, ptr: int, n: int, tiny: float,
                      with_max: bool = False) -> tuple[float, float]:
        """One chunk's sum of squares, summed again exactly in float64 when the float32 sum
        is inf or below ``n * tiny`` (the norm pass's unit); and its max |x| (else 0)."""
        m = ctypes.c_float()
        s = self._checked(_CODE[kind], ptr, n, tiny, ctypes.byref(m) if with_max else self._null)
        return s, m.value

    def norms_plan(self, kind: str, bases, tensor_of, start, lens, tiny: float, sq, maxes,
                   norms, total) -> int:
        """``gg_norms_plan``: a whole norm pass over a chunk table on this thread (numpy
        arrays, written in place); returns the number of suspect chunks."""
        return self._norms_plan(_CODE[kind], bases.ctypes.data, tensor_of.ctypes.data,
                                start.ctypes.data, lens.ctypes.data, len(lens), len(norms), tiny,
                                sq.ctypes.data, None if maxes is None else maxes.ctypes.data,
                                norms.ctypes.data, total.ctypes.data)

    def scale_plan(self, kind: str, bases, tensor_of, start, lens, c: float) -> None:
        """``gg_scale_plan``: ``x <- x * c`` over a chunk table, last chunk first."""
        self._scale_plan(_CODE[kind], bases.ctypes.data, tensor_of.ctypes.data,
                         start.ctypes.data, lens.ctypes.data, len(lens), c)

    def can_scale(self, kind: str) -> bool:
        return kind in self._scale

    def scale(self, kind: str, ptr: int, n: int, c: float) -> None:
        self._scale[kind](ptr, n, c)


def _private(d: str) -> bool:
    """True when ``d`` is a folder of this user that no one else can write (a library loaded
    from a folder others can write would run their code)."""
    try:
        st = os.stat(d)
    except OSError:
        return False
    if not os.access(d, os.W_OK):
        return False
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        return False
    return True


def _cache_dir() -> str:
    d = os.environ.get("GRADGUARD_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "gradguard")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError:
        pass
    if _private(d):
        return d
    # no private cache: a fresh folder of our own for this process (built again next time),
    # removed at exit (a loaded library stays mapped)
    d = tempfile.mkdtemp(prefix="gradguard-native-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def _cpu_key() -> str:
    # -march=native: a build is only valid on CPUs with the same features
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def compile_source(source: str, name: str = "gradguard_native") -> str:
    """The path of ``source`` compiled into a shared library in the cache folder (built once
    per source, compiler and CPU; see the module docstring). RuntimeError without a compiler
    or on a failed build."""
    cc = os.environ.get("CC", "cc")
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno"]
    key = hashlib.sha256("\0".join([source, exe, " ".join(flags), _cpu_key(), sys.platform,
                                    platform.machine()]).encode()).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else (".dylib" if sys.platform == "darwin" else ".so")
    folder = _cache_dir()
    path = os.path.join(folder, f"{name}_{key}{suffix}")
    if not os.path.exists(path):
        fd, src = tempfile.mkstemp(suffix=".c", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(source)
        tmp = src[:-2] + suffix
        try:
            proc = subprocess.run([exe, *flags, "-o", tmp, src], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            os.replace(tmp, path)  # atomic: a concurrent build of the same key is identical
        finally:
            for p in (src, tmp):
                if os.path.exists(p):
                    os.remove(p)
    return path


def _build() -> Native:
    path = compile_source(SOURCE)
    return Native(ctypes.CDLL(path), path)


def lib() -> Native | None:
    """The compiled kernels, built on first call; None when disabled or unavailable
    (``error()`` says why)."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("GRADGUARD_NATIVE", "1") == "0":
                _error = "disabled by GRADGUARD_NATIVE=0"
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # noqa: BLE001  (no compiler, a failed build, no ctypes)
                    _error = f"{type(exc).__name__}: {exc}"
    return _lib


def error() -> str | None:
    """Why ``lib()`` is None (None while it is not, or before the first call)."""
    return _error


def describe() -> str:
    """One line for benchmark reports: which CPU kernel runs."""
    k = lib()
    return f"native C kernel ({k.path})" if k is not None else f"numpy/BLAS ({error()})"
