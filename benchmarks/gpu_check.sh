#!/usr/bin/env bash
# Issue 7's GPU check: one script, < 4 minutes on an H200, for a session lent an H100/H200.
# Needs no network: it uses the machine's own python3 (torch + triton + pytest there) and
# this checkout's src/ on PYTHONPATH; nothing is installed. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh            # writes logs and JSON under $OUT (or /tmp/gg-gpu)
#
# 1. the GPU tests (Triton kernels vs float64 references and torch, no host sync under
#    torch.cuda.set_sync_debug_mode("error"), CUDA-graph capture, the Guard's CUDA test);
# 2. the clipping benchmark on gpt2-124M fp32, gpt-1.3B fp32 and bf16 (the table for
#    docs/performance.md);
# 3. whether Guard.step itself can be captured in a CUDA graph (printed, not asserted);
# 4. if time is left, alternative kernel shapes;
# 5. the Monitor's overhead on the GPU (benchmarks/monitor_bench.py --device cuda);
# 6. the distributed (FSDP2 / DTensor) code path on one GPU over NCCL: norm vs float64, no
#    host sync in a steady-state fused step, a NaN step skipped with parameters unchanged,
#    the Monitor's layer steps on DTensor parameters (GG_DEV=cpu runs it on gloo).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-/tmp/gg-gpu}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== 1. GPU tests ($(elapsed)s)"
{ timeout 200 $PY -m pytest -p no:cacheprovider -W ignore::DeprecationWarning -rs \
      tests/test_kernels_cuda.py
  timeout 60 $PY -m pytest -p no:cacheprovider -W ignore::DeprecationWarning -rs \
      tests/test_guard.py -k cuda; } 2>&1 | tee "$OUTDIR/gpu_tests.txt" | tail -40

echo "== 2. clipping benchmark ($(elapsed)s)"
timeout 300 $PY benchmarks/clip_bench.py --device cuda --json "$OUTDIR/clip_bench_gpu.json" 2>&1 \
    | tee "$OUTDIR/clip_bench_gpu.txt"

echo "== 3. Guard.step in a CUDA graph? ($(elapsed)s)"
timeout 90 $PY - <<'PYEOF' 2>&1 | tee "$OUTDIR/guard_graph.txt"
import torch, gradguard as gg
torch.manual_seed(0)
m = torch.nn.Linear(512, 512).cuda()
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True)
guard = gg.Guard(m, gg.NormClip(0.5), max_consecutive_skips=None)
x = torch.randn(64, 512, device="cuda")
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        m(x).square().mean().backward(); guard.step(opt)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(g):
        guard.step(opt)
    steps = guard.step_count
    g.replay(); g.replay(); torch.cuda.synchronize()
    print("Guard.step captured; replays ran; host step_count after 2 replays:", guard.step_count,
          "(captured at", steps, ") -> host-side state does not advance on replay")
except Exception as e:  # noqa: BLE001
    import traceback
    print("Guard.step NOT capturable:", type(e).__name__, str(e)[:300])
    print("".join(traceback.format_exc().splitlines(keepends=True)[-14:]))
PYEOF

timeout 120 $PY - <<'PYEOF' 2>&1 | tee -a "$OUTDIR/guard_graph.txt"
import torch, gradguard as gg
# torch's CUDA multiply of bf16/fp16 by a float32 0-d tensor: is the coefficient rounded first?
for dt in (torch.bfloat16, torch.float16):
    x = torch.randn(1 << 20, device="cuda").to(dt)
    c = torch.tensor(0.3712345, device="cuda")
    w = x.clone(); torch._foreach_mul_([w], c)
    print(dt, "torch == float32 product:", torch.equal(w, (x.float() * c).to(dt)),
          "| torch == coefficient rounded first:", torch.equal(w, (x.float() * c.to(dt).float()).to(dt)))

# torch.compile (inductor) of a function that calls gradguard.clip_grad_norm_, fullgraph
try:
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(300, 200), (200,), (7,)]]
    for p in ps:
        p.grad = torch.randn_like(p) * 3
    ref = [p.grad.clone() for p in ps]
    f = torch.compile(lambda: gg.clip_grad_norm_(ps, 1.0), fullgraph=True)
    t = f()
    qs = [torch.nn.Parameter(torch.zeros_like(r)) for r in ref]
    for q, r in zip(qs, ref):
        q.grad = r.clone()
    want = torch.nn.utils.clip_grad_norm_(qs, 1.0)
    print("compiled clip grads == torch's:", all(torch.allclose(p.grad, q.grad) for p, q in zip(ps, qs)))
    print("torch.compile(fullgraph=True, inductor) of clip_grad_norm_ on CUDA: ran; total",
          float(t), "torch", float(want))
except Exception as e:  # noqa: BLE001
    print("torch.compile of clip_grad_norm_ on CUDA FAILED:", type(e).__name__, str(e)[:400])
PYEOF

if [ "$(elapsed)" -lt 330 ]; then
  echo "== 4. kernel shapes ($(elapsed)s)"
  for cfg in "GRADGUARD_TRITON_WARPS=16" \
             "GRADGUARD_TRITON_BLOCK=16384 GRADGUARD_TRITON_WARPS=16" \
             "GRADGUARD_TRITON_PROGRAMS_PER_SM=2" \
             "GRADGUARD_TRITON_PROGRAMS_PER_SM=8"; do
    echo "-- $cfg"
    env $cfg timeout 90 $PY benchmarks/clip_bench.py --device cuda \
        --sets gpt2-124M:float32,gpt-1.3B:float32,gpt-1.3B:bfloat16 \
        --repeats 20 2>&1 | grep -E "^\| gpt|copy bandwidth" | tee -a "$OUTDIR/shapes.txt"
  done
fi
echo "== 5. Monitor overhead on the GPU ($(elapsed)s)"
timeout 120 $PY benchmarks/monitor_bench.py --device cuda --overhead-steps 200 --steps 0 2>&1 \
    | tee "$OUTDIR/monitor_gpu.txt"
echo "== 6. distributed code path on one GPU: FSDP2 over NCCL, world size 1 ($(elapsed)s)"
# The DTensor path of gradguard.distributed (local shards, the plan, one all-reduce, the fused
# found_inf / grad_scale skip) on CUDA tensors and NCCL. One GPU cannot test the reduction
# across ranks (tests/test_distributed.py does, on gloo); this checks the device side: the
# Triton kernels on the shards, no host sync in a steady-state step, the norm equals torch's.
GG_DEV=${GG_DEV:-cuda} MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 RANK=0 WORLD_SIZE=1 \
timeout 120 $PY - <<'PYEOF' 2>&1 | tee "$OUTDIR/distributed_gpu.txt"
import os, torch, torch.distributed as dist, torch.nn as nn, gradguard as gg
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
dev = os.environ["GG_DEV"]
dist.init_process_group("nccl" if dev == "cuda" else "gloo")
torch.manual_seed(0)
mesh = init_device_mesh(dev, (1,))
model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.LayerNorm(4096), nn.Linear(4096, 1024)).to(dev)
fully_shard(model[0], mesh=mesh); fully_shard(model[3], mesh=mesh); fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
guard = gg.Guard(model, max_consecutive_skips=None)
x = torch.randn(256, 1024, device=dev)
def step(nan=False):
    opt.zero_grad(set_to_none=False)
    loss = model(x).square().mean()
    loss.backward()
    if nan:
        next(model.parameters()).grad.to_local().view(-1)[7] = float("nan")
    return guard.step(opt, loss=loss)
for _ in range(3):
    step()  # the optimizer's state exists from here on: the fused, sync-free path
norms = gg.grad_norm(model.parameters())
want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.full_tensor().double())
                                             for p in model.parameters()]))
print("global norm", float(norms.total), "float64 reference", float(want),
      "rel err", abs(float(norms.total) - float(want)) / float(want))
if dev == "cuda":
    torch.cuda.synchronize(); torch.cuda.set_sync_debug_mode("error")
try:
    st = step()
    before = [p.to_local().clone() for p in model.parameters()]
    st2 = step(nan=True)
    if dev == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    print("steady-state FSDP2 Guard.step: no host sync (sync_debug_mode=error passed)")
    print("NaN step skipped:", bool(st2.skipped), "params unchanged:",
          all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters())))
except Exception as e:  # noqa: BLE001
    if dev == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    import traceback; traceback.print_exc(limit=8)
    print("FSDP2 Guard.step on one GPU FAILED:", type(e).__name__, str(e)[:300])
# the Monitor's layer steps on DTensor parameters (local shards, one sum over the job; the
# non-finite counts take the device branch on CUDA): no failure noted, update ratio measured
import tempfile, numpy as np
folder = tempfile.mkdtemp() + "/run"
mon = gg.Monitor(folder, layer_every=2, flush_every=4)
guard = gg.Guard(model, monitor=mon, max_consecutive_skips=None)
for i in range(4):
    step(nan=(i == 1))  # step 2: a layer step
guard.close()
lay = gg.load_run(folder).layers
print("Monitor on FSDP2:", "notes", mon.notes, "| layer rows", len(lay), "| non-finite count",
      int(lay["nonfinite_count"].clip(lower=0).sum()), "(want 1) | update ratio measured:",
      bool(np.isfinite(lay["update_ratio"]).any()))
dist.destroy_process_group()
PYEOF
echo "== done in $(elapsed)s; files in $OUTDIR"
