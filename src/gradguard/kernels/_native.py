"""A small C kernel for the CPU passes, compiled on first use (optional).

numpy has no fused "widen and square" for bfloat16 / float16: widening a chunk into a float32
buffer and then taking a BLAS dot reads and writes it three times (bfloat16 clip 0.35-0.66x of
torch's). This module holds four loops in C, written with the compiler's vector extensions
(8-wide float32 vectors, four independent accumulators):

``sumsq(kind, ptr, n)`` / ``sumsq_max(kind, ptr, n)``
    ``sum x**2`` of ``n`` contiguous float32 / bfloat16 / float16 values, widened to float32
    in registers (bfloat16: a shift; float16: F16C ``vcvtph2ps``, or an exact bit
    conversion without F16C), squared and accumulated in float32, every 1024 elements added
    into a float64 sum (so the float32 part never adds more than 32 terms per lane).
    ``sumsq_max`` also returns ``max |x|``, taken on the magnitude bits as integers: the same
    order as the floats, and NaN (whose bits are above inf's) propagates.
``sumsq_many(kind, ptrs, lens, sums, maxes)``
    the same for many chunks in one call (a small model's tensors on one thread).
``scale(kind, ptr, n, c)``
    ``x <- x * c`` for bfloat16 / float16: float32 multiply, rounded to nearest even, the
    bits ``torch.mul_`` writes on the CPU for a float32 factor (float16 only with F16C).

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
#if defined(__F16C__)
#include <immintrin.h>
#endif
typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
#define W 8
#define FLUSH 1024

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

#define SUMSQ(NAME, T, LD, SC, MAX)                                                        \
double NAME(const T* x, int64_t n, float* maxabs) {                                        \
  double tot = 0.0; vi m0 = {0}, m1 = {0}, m2 = {0}, m3 = {0}; int64_t i = 0;               \
  for (; i + FLUSH <= n; i += FLUSH) {                                                     \
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                             \
    for (int64_t k = i; k < i + FLUSH; k += 4 * W) {                                       \
      vf v0 = LD(x + k), v1 = LD(x + k + W), v2 = LD(x + k + 2 * W), v3 = LD(x + k + 3 * W); \
      a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;                          \
      if (MAX) { m0 = v_max(m0, v_abs(v0)); m1 = v_max(m1, v_abs(v1));                     \
                 m2 = v_max(m2, v_abs(v2)); m3 = v_max(m3, v_abs(v3)); }                   \
    }                                                                                      \
    vf a = (a0 + a1) + (a2 + a3); double s = 0.0;                                          \
    for (int j = 0; j < W; j++) s += (double)a[j];                                         \
    tot += s;                                                                              \
  }                                                                                        \
  float acc = 0.0f; int32_t m = 0;                                                         \
  for (; i < n; i++) { float v = SC(x[i]); acc += v * v;                                   \
                       if (MAX) { int32_t b = s_abs(v); m = b > m ? b : m; } }             \
  tot += (double)acc;                                                                      \
  if (MAX) { vi mm = v_max(v_max(m0, m1), v_max(m2, m3));                                  \
             for (int j = 0; j < W; j++) m = mm[j] > m ? mm[j] : m;                        \
             memcpy(maxabs, &m, 4); }                                                      \
  return tot;                                                                              \
}

SUMSQ(gg_sumsq_f32, float, v_f, s_f, 0)
SUMSQ(gg_sumsq_bf16, uint16_t, v_bf, s_bf, 0)
SUMSQ(gg_sumsq_f16, uint16_t, v_h, s_h, 0)
SUMSQ(gg_sumsqmax_f32, float, v_f, s_f, 1)
SUMSQ(gg_sumsqmax_bf16, uint16_t, v_bf, s_bf, 1)
SUMSQ(gg_sumsqmax_f16, uint16_t, v_h, s_h, 1)

/* chunks j < k: s[j] = sum of squares of lens[j] elements at ptrs[j] (and m[j] = max |x|
   when m is not NULL); kind 0 float32, 1 bfloat16, 2 float16. One call for many chunks. */
void gg_sumsq_many(int kind, const int64_t* ptrs, const int64_t* lens, int64_t k, double* s, float* m) {
  for (int64_t j = 0; j < k; j++) {
    const void* p = (const void*)(intptr_t)ptrs[j];
    if (m) {
      s[j] = kind == 0 ? gg_sumsqmax_f32(p, lens[j], m + j)
           : kind == 1 ? gg_sumsqmax_bf16(p, lens[j], m + j) : gg_sumsqmax_f16(p, lens[j], m + j);
    } else {
      s[j] = kind == 0 ? gg_sumsq_f32(p, lens[j], 0)
           : kind == 1 ? gg_sumsq_bf16(p, lens[j], 0) : gg_sumsq_f16(p, lens[j], 0);
    }
  }
}

/* float32 -> bfloat16, round to nearest even; NaN -> a quiet NaN (torch's scalar rule) */
void gg_scale_bf16(uint16_t* x, int64_t n, float c) {
  for (int64_t i = 0; i < n; i++) {
    float f = s_bf(x[i]) * c; uint32_t u; memcpy(&u, &f, 4);
    uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    x[i] = (f != f) ? (uint16_t)0x7fc0u : r;
  }
}
#if defined(__F16C__)
int gg_has_scale_f16(void) { return 1; }
void gg_scale_f16(uint16_t* x, int64_t n, float c) {
  int64_t i = 0; __m256 cc = _mm256_set1_ps(c);
  for (; i + 8 <= n; i += 8) {
    __m128i q; memcpy(&q, x + i, 16);
    __m256 f = _mm256_mul_ps(_mm256_cvtph_ps(q), cc);
    q = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT); memcpy(x + i, &q, 16);
  }
  for (; i < n; i++) {
    __m128i q = _mm_cvtsi32_si128(x[i]);
    __m128 f = _mm_mul_ps(_mm_cvtph_ps(q), _mm_set1_ps(c));
    x[i] = (uint16_t)_mm_cvtsi128_si32(_mm_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
  }
}
#else
int gg_has_scale_f16(void) { return 0; }
void gg_scale_f16(uint16_t* x, int64_t n, float c) { (void)x; (void)n; (void)c; }
#endif
"""

_lock = threading.Lock()
_lib: Native | None = None
_error: str | None = None


class Native:
    """The loaded kernels: ``sumsq``, ``sumsq_max``, ``scale`` (see the module docstring)."""

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
        self._many = cdll.gg_sumsq_many
        self._many.restype = None
        self._many.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_void_p]
        self._scale = {}
        for kind in (BF16, F16):
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

    def sumsq_many(self, kind: str, ptrs, lens, sums, maxes=None) -> None:
        """``sums[j]`` (and ``maxes[j]``) of the chunks ``ptrs[j], lens[j]`` in one call: int64,
        float64 (float32) numpy arrays, contiguous, written in place."""
        self._many(_CODE[kind], ptrs.ctypes.data, lens.ctypes.data, len(ptrs), sums.ctypes.data,
                   None if maxes is None else maxes.ctypes.data)

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


def _build() -> Native:
    cc = os.environ.get("CC", "cc")
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno"]
    key = hashlib.sha256("\0".join([SOURCE, exe, " ".join(flags), _cpu_key(), sys.platform,
                                    platform.machine()]).encode()).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else (".dylib" if sys.platform == "darwin" else ".so")
    folder = _cache_dir()
    path = os.path.join(folder, f"gradguard_native_{key}{suffix}")
    if not os.path.exists(path):
        fd, src = tempfile.mkstemp(suffix=".c", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(SOURCE)
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
