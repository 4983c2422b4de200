"""Clipping speed: ``gradguard.clip_grad_norm_`` against ``torch.nn.utils.clip_grad_norm_``.

    python benchmarks/clip_bench.py                 # the default sets of this device
    python benchmarks/clip_bench.py --device cpu --sets gpt2-124M:float32 --repeats 21
    python benchmarks/clip_bench.py --device cpu --small   # only the many-small-tensors table
    gradguard bench ...                             # the same, from a checkout

For each parameter set and dtype, in one process and on one device:

* ``torch`` / ``gradguard``: the median time of one ``clip_grad_norm_`` call, in two regimes:
  ``clip`` (max_norm = half the gradients' norm, so every call scales them) and ``no-clip``
  (max_norm = twice the norm; torch still multiplies by 1, gradguard does not when it can
  tell without a host synchronisation). Candidates run interleaved, alternating which goes
  first, so load on a shared machine hits both alike.
* ``floor``: the memory floor of clipping, ``3 B / BW`` (B = gradient bytes: one read for the
  norm, one read and one write for the scale), BW the measured copy bandwidth (bytes read
  plus written per second: ``dst.copy_(src)``, and on the CPU also an in-place scale, which
  has no write-allocate reads; the faster counts). ``B / BW`` = the norm's share of it.
* ``read floor`` (CPU): the fastest pure read of B bytes measured between the norms: the
  faster of ``torch.sum`` and a four-stream C read loop, on the bench's threads. ``B / BW``
  is no floor for a read alone: a core with a read and a write stream in flight moves more
  bytes per second than with reads alone (on the 2-core Xeon: 33.6 GB/s read + write in
  place, at most 23.6 GB/s pure read).
* ``err``: relative error of each library's total norm against a float64 reference, and the
  largest difference between the two libraries' clipped gradients.
* On CUDA also: the norm alone (``torch._foreach_norm`` + ``vector_norm`` vs
  ``gradguard.grad_norm``) and a fused AdamW step alone and inside ``Guard.step`` with the clip
  folded into ``grad_scale`` (the extra over the bare step, in units of the norm pass).

* ``--small`` (and by default on the CPU) a second table, the many-small-tensors case:
  ``grad_norm`` of 4000 x 16-element gradients, random and all zero, against torch's
  ``get_total_norm``; ``clip_grad_norm_`` of them; and a 2000-layer ``Guard(NormClip)`` step
  with SGD against torch's clip + step. Per-tensor overheads, not memory, decide these.

CUDA times come from CUDA events around each call, median of ``repeats`` runs after
``warmup``; every set is far larger than the L2 cache. CPU times come from
``time.perf_counter`` (the calls are synchronous there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

try:
    import gradguard  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- parameter sets


def gpt2_shapes(d: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024,
                mlp: int = 4) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 style model in ``named_parameters`` order.

    wte (vocab, d), wpe (ctx, d), then per block: ln_1 w, b (d), attn c_attn (d, 3d) + bias,
    attn c_proj (d, d) + bias, ln_2 w, b, mlp c_fc (d, mlp*d) + bias, mlp c_proj (mlp*d, d)
    + bias; then ln_f w, b. 4 + 12 * layers tensors. GPT-2 small: 148 tensors, 124,439,808
    parameters.
    """
    s: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        s += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
              (d, mlp * d), (mlp * d,), (mlp * d, d), (d,)]
    return s + [(d,), (d,)]


SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-124M": lambda: gpt2_shapes(),
    # GPT-3 XL layout (d 2048, 24 blocks, context 2048): 292 tensors, 1.316e9 parameters
    "gpt-1.3B": lambda: gpt2_shapes(d=2048, layers=24, ctx=2048),
    # the same 292 tensors at a quarter of the width, for machines without a GPU (1.02e8)
    "gpt-1.3B/4": lambda: gpt2_shapes(d=512, layers=24, ctx=2048),
    # thousands of small tensors (biases, norm scales): per-tensor overhead decides
    "small-4000x16": lambda: [(16,)] * 4000,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_CONFIGS = {
    "cuda": [("gpt2-124M", "float32"), ("gpt-1.3B", "float32"), ("gpt-1.3B", "bfloat16")],
    "cpu": [("gpt2-124M", "float32"), ("gpt2-124M", "bfloat16"), ("gpt2-124M", "float16"),
            ("gpt-1.3B/4", "float32"), ("small-4000x16", "float32")],
}


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: str,
                seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters with random gradients of typical size (N(0, 1e-3)), on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g))
        p.grad = torch.empty(s, dtype=dtype, device=device).normal_(0.0, 1e-3, generator=g)
        params.append(p)
    return params


# ----------------------------------------------------------------------------- timing


class Timer:
    """Times one call: CUDA events on CUDA, ``perf_counter`` on the CPU; milliseconds.

    On CUDA a ~2 ms spin kernel is queued before the start event, so the device time is
    measured with the host's Python work (launches, checks) already overlapped, as in a
    training step where the host runs ahead of the GPU. Host work longer than the spin would
    still show up in the time."""

    SPIN_CYCLES = 4_000_000  # ~2 ms at 2 GHz

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            spin = getattr(torch.cuda, "_sleep", None)  # private API: time host work too if gone
            if spin is not None:
                spin(self.SPIN_CYCLES)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def interleaved(cands: dict[str, Callable[[], object]], timer: Timer, repeats: int, warmup: int,
                before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median ms of each candidate; one round runs each once, the order alternating."""
    names = list(cands)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            if before is not None:
                before()
            t = timer(cands[n])
            if r >= warmup:
                times[n].append(t)
    return {n: statistics.median(v) for n, v in times.items()}


def copy_bandwidth(nbytes: int, device: str, timer: Timer, repeats: int) -> tuple[float, str]:
    """Bytes read + written per second, best of a copy and (CPU) an in-place scale."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    cands: dict[str, Callable[[], object]] = {"copy": lambda: dst.copy_(src)}
    if not device.startswith("cuda"):
        cands["in-place scale"] = lambda: src.mul_(1.0)
    ms = interleaved(cands, timer, repeats, warmup=2)
    best = min(ms, key=ms.__getitem__)
    return 2 * n * 4 / (ms[best] * 1e-3), best


_READ_PROBE = r"""
#include <stdint.h>
#include <string.h>
typedef float vf __attribute__((vector_size(32)));
/* sum of n floats read as four sequential streams (two accumulators each): the fastest pure
   read of memory we know on one core (faster than one stream; the sum is only a sink) */
float probe_read(const float* x, int64_t n) {
  int64_t q = (n / 4) / 16 * 16; vf a[4] = {{0}}, b[4] = {{0}}, v;
  for (int64_t k = 0; k < q; k += 16)
    for (int s = 0; s < 4; s++) {
      memcpy(&v, x + s * q + k, 32); a[s] += v; memcpy(&v, x + s * q + k + 8, 32); b[s] += v; }
  vf t = (a[0] + b[0]) + (a[1] + b[1]) + (a[2] + b[2]) + (a[3] + b[3]); float r = 0.0f;
  for (int j = 0; j < 8; j++) r += t[j];
  for (int64_t i = 4 * q; i < n; i++) r += x[i];
  return r;
}
"""


def read_floor_candidates(nbytes: int) -> dict[str, Callable[[], object]]:
    """Pure reads of ``nbytes`` on the CPU with the bench's thread count: ``torch.sum`` of a
    float32 buffer, and (with a C compiler) a four-stream read loop, each thread reading its
    contiguous part in 1 MiB pieces. The faster of the two is the norm pass's read floor: no
    norm can read its gradients faster than memory can be read."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    buf = torch.ones(max(1, nbytes // 4))
    cands: dict[str, Callable[[], object]] = {"read_torch_sum": lambda: buf.sum()}
    try:
        from gradguard.kernels import _native
        lib = ctypes.CDLL(_native.compile_source(_READ_PROBE, "gradguard_read_probe"))
    except Exception:  # noqa: BLE001  (no compiler: torch.sum alone)
        return cands
    fn = lib.probe_read
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_void_p, ctypes.c_int64]
    n, base, piece = buf.numel(), buf.data_ptr(), 1 << 18
    k = max(1, torch.get_num_threads())
    bounds = [(n * i // k, n * (i + 1) // k) for i in range(k)]
    pool = ThreadPoolExecutor(max_workers=k)

    def part(lo: int, hi: int) -> None:
        for s in range(lo, hi, piece):
            fn(base + 4 * s, min(piece, hi - s))

    def read() -> None:
        for f in [pool.submit(part, lo, hi) for lo, hi in bounds]:
            f.result()

    cands["read_streams"] = read  # (buf stays alive in the torch.sum candidate)
    return cands


# ----------------------------------------------------------------------------- one row


@dataclass
class Row:
    set: str
    dtype: str
    device: str
    tensors: int
    params: int
    grad_bytes: int
    torch_clip_ms: float
    gg_clip_ms: float
    torch_noclip_ms: float
    gg_noclip_ms: float
    floor_clip_ms: float
    floor_norm_ms: float
    torch_norm_err: float
    gg_norm_err: float
    clip_max_abs_diff: float
    gg_backend: str
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def speedup_clip(self) -> float:
        return self.torch_clip_ms / self.gg_clip_ms

    @property
    def speedup_noclip(self) -> float:
        return self.torch_noclip_ms / self.gg_noclip_ms


def _ref_norm(grads: list[Tensor]) -> float:
    return math.sqrt(sum(float(torch.dot(g.reshape(-1).double(), g.reshape(-1).double()))
                         for g in grads))


def bench_set(name: str, dtype_name: str, device: str, repeats: int, warmup: int,
              bw: float) -> Row:
    import gradguard as gg
    from gradguard import kernels

    shapes = SETS[name]()
    dtype = DTYPES[dtype_name]
    params = make_params(shapes, dtype, device)
    grads = [p.grad for p in params]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    timer = Timer(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    # correctness on identical copies, before any timing
    ref = _ref_norm(grads)
    saved = [g.clone() for g in grads]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_norm = float(torch.nn.utils.clip_grad_norm_(params, ref / 2))
    t_grads = [g.clone() for g in grads]
    for g, s in zip(grads, saved):
        g.copy_(s)
    g_norm = float(gg.clip_grad_norm_(params, ref / 2))
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads, t_grads))
    for g, s in zip(grads, saved):
        g.copy_(s)
    del saved, t_grads
    sync()

    n0 = float(gg.grad_norm(params).total)
    clip_max = n0 / 2

    def refresh() -> None:  # undo the last clip: x2 is exact, so every call sees the same norm
        torch._foreach_mul_(grads, 2.0)

    def torch_clip(m: float) -> Callable[[], object]:
        return lambda: torch.nn.utils.clip_grad_norm_(params, m)

    def gg_clip(m: float) -> Callable[[], object]:
        return lambda: gg.clip_grad_norm_(params, m)

    clip = interleaved({"torch": torch_clip(clip_max), "gg": gg_clip(clip_max)}, timer,
                       repeats, warmup, before=refresh)
    noclip = interleaved({"torch": torch_clip(4 * n0), "gg": gg_clip(4 * n0)}, timer,
                         repeats, warmup)
    extra: dict[str, float] = {}
    if device.startswith("cuda") or dtype == torch.float32:
        extra.update(_extras(params, grads, timer, repeats, warmup, clip_max, refresh))
    row = Row(name, dtype_name, device, len(shapes), sum(g.numel() for g in grads), nbytes,
              clip["torch"], clip["gg"], noclip["torch"], noclip["gg"],
              3 * nbytes / bw * 1e3, nbytes / bw * 1e3,
              abs(t_norm / ref - 1), abs(g_norm / ref - 1), diff,
              kernels.backend(device), extra)
    return row


def _extras(params, grads, timer, repeats, warmup, clip_max, refresh) -> dict[str, float]:
    """Norm alone, and the clip folded into a fused AdamW step by ``Guard.step``."""
    import gradguard as gg

    def torch_norm():
        norms = torch._foreach_norm(grads, 2.0)
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    cands = {"torch_norm_ms": torch_norm, "gg_norm_ms": lambda: gg.grad_norm(params)}
    if grads[0].device.type == "cpu":
        # the read floor measured between the norms, so that load on a shared machine hits
        # it alike
        cands.update(read_floor_candidates(sum(g.numel() * g.element_size() for g in grads)))
    out = interleaved(cands, timer, repeats, warmup)
    if "read_torch_sum" in out:
        out["read_floor_ms"] = min(v for k, v in out.items() if k.startswith("read_"))
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    guard = gg.Guard(params, gg.NormClip(clip_max), max_consecutive_skips=None)
    dev = grads[0].device
    one, no = torch.ones((), device=dev), torch.zeros((), device=dev)

    def adamw_grad_scale():
        # what the fold hands torch: with grad_scale set, torch's fused kernels also store the
        # unscaled gradient back, one extra write of every gradient
        opt.grad_scale, opt.found_inf = one, no
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf

    steps = interleaved({"adamw_ms": opt.step, "adamw_grad_scale_ms": adamw_grad_scale,
                         "guard_step_adamw_ms": lambda: guard.step(opt)},
                        timer, repeats, warmup, before=refresh)
    out.update(steps)
    out["folded_extra_over_norm"] = (steps["guard_step_adamw_ms"] - steps["adamw_ms"]) / out["gg_norm_ms"]
    return out


# ----------------------------------------------------------------------------- report


def machine(device: str) -> str:
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        return (f"{p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, "
                f"triton {_triton_version()}")
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def cpu_kernel() -> str:
    """Which CPU kernel gradguard's norm pass runs: the native C kernel (and its build) or
    the numpy/BLAS fallback (with numpy's BLAS)."""
    from gradguard.kernels import _native

    blas = "unknown BLAS"
    try:
        import numpy as np
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = cfg["Build Dependencies"]["blas"]["name"]
    except Exception:  # noqa: BLE001
        pass
    return f"{_native.describe()}; numpy BLAS {blas}"


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001
        return "absent"


def table(rows: list[Row]) -> str:
    head = ("| set | dtype | tensors | params | torch clip ms | gradguard clip ms | speed-up | "
            "floor ms | gradguard / floor | torch no-clip ms | gradguard no-clip ms | speed-up | "
            "norm rel. err torch / gradguard | max diff of clipped grads |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.set} | {r.dtype} | {r.tensors} | {r.params / 1e6:.1f}M | {r.torch_clip_ms:.2f} | "
            f"{r.gg_clip_ms:.2f} | {r.speedup_clip:.2f}x | {r.floor_clip_ms:.2f} | "
            f"{r.gg_clip_ms / r.floor_clip_ms:.2f}x | {r.torch_noclip_ms:.2f} | {r.gg_noclip_ms:.2f} | "
            f"{r.speedup_noclip:.2f}x | {r.torch_norm_err:.1e} / {r.gg_norm_err:.1e} | "
            f"{r.clip_max_abs_diff:.1e} |")
    extras = [r for r in rows if r.extra]
    if extras:
        lines += ["", "| set | dtype | torch norm ms | gradguard norm ms | B / BW ms | "
                  "read floor ms | gradguard norm / read floor | "
                  "fused AdamW ms | same with grad_scale ms | Guard.step + fused AdamW ms | "
                  "extra / norm pass |",
                  "|" + " --- |" * 11]
        for r in extras:
            e = r.extra
            fl = e.get("read_floor_ms", math.nan)
            lines.append(
                f"| {r.set} | {r.dtype} | {e['torch_norm_ms']:.3f} | {e['gg_norm_ms']:.3f} | "
                f"{r.floor_norm_ms:.3f} | {fl:.3f} | {e['gg_norm_ms'] / fl:.2f}x | "
                f"{e['adamw_ms']:.3f} | {e['adamw_grad_scale_ms']:.3f} | "
                f"{e['guard_step_adamw_ms']:.3f} | "
                f"{e['folded_extra_over_norm']:.2f}x |")
    return "\n".join(lines)


def run(device: str = "auto", configs: list[tuple[str, str]] | None = None, repeats: int | None = None,
        warmup: int | None = None, json_path: str | None = None, quiet: bool = False) -> list[Row]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    configs = configs or DEFAULT_CONFIGS[kind]
    repeats = repeats or (50 if kind == "cuda" else 15)
    warmup = warmup if warmup is not None else (5 if kind == "cuda" else 2)
    timer = Timer(device)
    biggest = max(sum(math.prod(s) for s in SETS[n]()) * DTYPES[d].itemsize for n, d in configs)
    bw, how = copy_bandwidth(min(biggest, 2 << 30), device, timer, max(5, repeats // 3))
    say = (lambda *a: None) if quiet else print
    say(f"# {machine(device)}")
    if kind == "cpu":
        say(f"# CPU norm/scale kernel: {cpu_kernel()}")
    say(f"# copy bandwidth {bw / 1e9:.1f} GB/s ({how}, read + write); "
        f"medians of {repeats} runs after {warmup} warm-up")
    rows = []
    for name, dt in configs:
        rows.append(bench_set(name, dt, device, repeats, warmup, bw))
        if kind == "cuda":
            torch.cuda.empty_cache()
        say(f"# done {name} {dt}: torch {rows[-1].torch_clip_ms:.2f} ms, "
            f"gradguard {rows[-1].gg_clip_ms:.2f} ms")
    say(table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": machine(device), "bw_GBs": bw / 1e9, "bw_probe": how,
                       "repeats": repeats, "warmup": warmup,
                       "rows": [asdict(r) | {"speedup_clip": r.speedup_clip,
                                             "speedup_noclip": r.speedup_noclip} for r in rows]},
                      f, indent=1)
    return rows


def small_tensors(device: str = "cpu", repeats: int = 15, warmup: int = 2, n: int = 4000,
                  layers: int = 2000, quiet: bool = False) -> list[tuple[str, float, float]]:
    """The many-small-tensors table: ``(case, torch ms, gradguard ms)`` rows, interleaved."""
    import gradguard as gg

    timer = Timer(device)
    rows = []
    for case, zero in (("grad_norm 4000x16", False), ("grad_norm 4000x16 zeros", True)):
        params = make_params([(16,)] * n, torch.float32, device)
        if zero:
            for p in params:
                p.grad.zero_()
        grads = [p.grad for p in params]
        got = interleaved({"torch": lambda gs=grads: torch.nn.utils.get_total_norm(gs),
                           "gg": lambda ps=params: gg.grad_norm(ps).total}, timer, repeats, warmup)
        rows.append((case, got["torch"], got["gg"]))
    params = make_params([(16,)] * n, torch.float32, device)
    grads = [p.grad for p in params]
    m = float(gg.grad_norm(params).total) / 2
    saved = [g.clone() for g in grads]

    def refresh() -> None:  # every call sees the same gradients
        torch._foreach_copy_(grads, saved)

    got = interleaved({"torch": lambda: torch.nn.utils.clip_grad_norm_(params, m),
                       "gg": lambda: gg.clip_grad_norm_(params, m)}, timer, repeats, warmup,
                      before=refresh)
    rows.append(("clip_grad_norm_ 4000x16 (clips)", got["torch"], got["gg"]))
    params = make_params([(16,)] * layers, torch.float32, device)
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    opt = torch.optim.SGD(params, lr=1e-6)
    guard = gg.Guard(params, clipper=gg.NormClip(1e-3))

    def torch_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1e-3)
        opt.step()

    got = interleaved({"torch": torch_step, "gg": lambda: guard.step(opt)}, timer, repeats,
                      warmup, before=refresh)
    rows.append((f"{layers}-layer step: torch clip + SGD vs Guard(NormClip) + SGD",
                 got["torch"], got["gg"]))
    guard.close()
    if not quiet:
        print(f"# {machine(device)}; {len(rows)} cases, medians of {repeats} runs after {warmup} warm-up")
        print("| many small tensors | torch ms | gradguard ms | speed-up |")
        print("| --- | ---: | ---: | ---: |")
        for case, t, g in rows:
            print(f"| {case} | {t:.2f} | {g:.2f} | {t / g:.2f}x |")
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--sets", default=None,
                    help="comma-separated SET:DTYPE pairs, e.g. gpt2-124M:float32,gpt-1.3B:bfloat16 "
                         f"(sets: {', '.join(SETS)}; dtypes: {', '.join(DTYPES)})")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per candidate")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--quick", action="store_true", help="gpt2-124M float32 only, 5 repeats")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both libraries (default: torch's default)")
    ap.add_argument("--small", action="store_true",
                    help="only the many-small-tensors table (also printed after the CPU defaults)")


def main_from_args(args: argparse.Namespace) -> int:
    configs = None
    if args.sets:
        configs = []
        for item in args.sets.split(","):
            name, _, dt = item.partition(":")
            if name not in SETS or (dt or "float32") not in DTYPES:
                raise SystemExit(f"unknown set or dtype {item!r}; sets {list(SETS)}, dtypes {list(DTYPES)}")
            configs.append((name, dt or "float32"))
    repeats = args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        configs = configs or [("gpt2-124M", "float32")]
        repeats = repeats or 5
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not getattr(args, "small", False):
        run(device, configs, repeats, args.warmup, args.json)
    if getattr(args, "small", False) or (device == "cpu" and configs is None and not args.quick):
        small_tensors(device, repeats or 15, args.warmup if args.warmup is not None else 2)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return main_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
