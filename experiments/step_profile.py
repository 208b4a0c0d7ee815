"""Where the UNet train step's time goes on this CPU, ours beside mmseg's, piece by piece.

    python experiments/step_profile.py [--config configs/drive.py:fcn] [--batch 4] [--steps 3]
        [--mmseg_python /tmp/mmseg-ref-venv/bin/python] [--out experiments/results/step_profile.md]

Two tables (issue 19 item 1), each measured in this one run, with the load average beside it:
1. **In the step.** Ours: the train step exactly as `benchmark step` builds it, traced with
   `jax.profiler`; every thunk's time is charged to the innermost model piece its HLO op came
   from (the pieces are tagged with `jax.named_scope` by wrapping their `__call__` here, so the
   library is unchanged), forward or backward, and conv backward split into input gradient
   (dgrad) and weight gradient (wgrad) by the op's output shape. mmseg's: the same step
   (`model.loss -> parse_losses -> OptimWrapper.update_params`) under `torch.profiler`, leaf
   ops' self time by category (torch runs dgrad and wgrad in one `convolution_backward`).
   Thunk times are summed per thread, so with 2 threads a sum can exceed the wall time; the
   shares are what to read.
2. **Per conv direction and stage**, each alone: forward, dgrad and wgrad of every UNet-S5-D16
   conv shape at the crop, ours through `layers.Conv` (whatever formulation it picks) and
   `jax.vjp`, mmseg's through `torch.nn.functional.conv2d` / `aten.convolution_backward` in its
   NCHW layout, median of 5 after a warm-up, 2 threads.
Method from `../shared/docs/research/cpu_conv_speed.md` (E1, E2).
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from unet_jax.cli.common import use_cpu_xla_flags
from unet_jax.config import check_config, load_config

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO.parent / "shared" / "tools" / "mmseg_ref"
SCOPES = ("Conv", "BatchNorm", "ReLU", "MaxPool", "Upsample", "Concat", "Loss")


def shapes(batch: int, crop: int) -> list[tuple[str, int, int, int, int, int]]:
    """UNet-S5-D16's stride-1 convs at a square crop: (name, N, size, C, O, k); the heads'
    3x3 64->64 (FCN) is `head`."""
    out, c_in = [], 3
    for i in range(5):
        s, wd = crop >> i, 64 << i
        out += [(f"enc{i}.conv0", batch, s, c_in, wd, 3), (f"enc{i}.conv1", batch, s, wd, wd, 3)]
        c_in = wd
    for j in range(4):
        s, wd = crop >> j, 64 << j
        out += [(f"dec{j}.up1x1", batch, s, 2 * wd, wd, 1),
                (f"dec{j}.conv0", batch, s, 2 * wd, wd, 3), (f"dec{j}.conv1", batch, s, wd, wd, 3)]
    return out + [("head", batch, crop, 64, 64, 3)]


# ------------------------------------------------------------------------------ ours, in step
def _tag_pieces() -> None:
    """Wrap the model pieces' `__call__` in a named scope (this process only)."""
    from unet_jax import losses, step
    from unet_jax.models import layers, unet

    def scoped(fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with jax.named_scope(name):
                return fn(*args, **kwargs)
        return wrapper

    for cls, name in ((layers.Conv, "Conv"), (layers.BatchNorm, "BatchNorm"),
                      (layers.ConvModule, "ReLU"), (layers.MaxPool, "MaxPool"),
                      (layers.Upsample, "Upsample"), (unet.UpConvBlock, "Concat")):
        cls.__call__ = scoped(cls.__call__, name)
    step.segmentation_loss = scoped(losses.segmentation_loss, "Loss")


def _piece(op_name: str, out_dims: tuple[int, ...], kernels: set[tuple[int, ...]]) -> str:
    """The table row of one HLO op from its name stack and output size."""
    parts = op_name.split("/")
    found = [p for p in parts if re.sub(r"^(transpose\()?(jvp\()?|\)+$", "", p) in SCOPES]
    backward = "transpose(" in op_name
    if not found:
        return "optimiser, rest" if backward or "jvp(" not in op_name else "other forward"
    name = re.sub(r"^(transpose\()?(jvp\()?|\)+$", "", found[-1])
    if name == "Conv" and backward:
        return "conv wgrad" if tuple(sorted(out_dims)) in kernels else "conv dgrad"
    if name == "Conv":
        return "conv forward"
    label = {"ReLU": "ReLU (ConvModule rest)", "Concat": "skip concat (UpConvBlock rest)"}
    return f"{label.get(name, name)} {'backward' if backward else 'forward'}"


def _unnamed(name: str, opcode: str, out_dims: tuple[int, ...],
             kernels: set[tuple[int, ...]]) -> str:
    """The row of an op without a name stack: XLA's weight-gradient convs (lowered over
    transposed copies of x and dy) and the layout copies around them."""
    if opcode == "convolution":
        return "conv wgrad" if tuple(sorted(out_dims)) in kernels else "conv (unnamed)"
    if opcode in ("copy", "transpose") or "copy" in name or "transpose" in name:
        return "layout copies (unnamed)"
    return "unattributed"


def ours_in_step(config_arg: str, batch: int, steps: int) -> dict:
    """ms per step of every piece of our traced train step, and the step's wall time."""
    import numpy as np

    from unet_jax import parallel
    from unet_jax.models import build_model
    from unet_jax.step import create_train_state, make_train_step

    _tag_pieces()
    config = check_config(load_config(config_arg))
    h, w = config.data.crop_size
    mesh = parallel.make_mesh()
    train = create_train_state(build_model(config.model), config)
    # a weight gradient's output is the kernel, as (k, k, C, O) in some order or as the
    # (k*k*C, O) matrix of a GEMM formulation
    kernels = set()
    for leaf in jax.tree.leaves(train.state):
        if getattr(leaf, "ndim", 0) == 4:
            kernels |= {tuple(sorted(leaf.shape)),
                        tuple(sorted((int(np.prod(leaf.shape[:3])), leaf.shape[3])))}
    state = parallel.replicate(train.state, mesh)
    step = parallel.jit_step(make_train_step(train, config), state, mesh)
    rng = np.random.default_rng(0)
    data = parallel.global_batch(
        {"image": rng.standard_normal((batch, h, w, 3)).astype(np.float32),
         "label": rng.integers(0, config.model.num_classes, (batch, h, w)).astype(np.int32)}, mesh)
    compiled = step.lower(state, data).compile()
    names, debug = {}, {}
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]+)"', line)
        dims = tuple(int(d) for d in m.group(3).split(",") if d)
        if op:
            names[m.group(1)] = _piece(op.group(1), dims, kernels)
        else:  # ops XLA made itself (layout assignment) carry no name stack
            names[m.group(1)] = _unnamed(m.group(1), m.group(4), dims, kernels)
        debug[m.group(1)] = (dims, op.group(1)[-90:] if op else m.group(4))
    for _ in range(2):
        state = jax.block_until_ready(compiled(state, data))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            state = jax.block_until_ready(compiled(state, data))
        wall = (time.perf_counter() - t0) / steps
        jax.profiler.stop_trace()
        path = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]
        trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per, lost = collections.Counter(), collections.Counter()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op and not e["name"].startswith("end:"):
            per[names.get(op, "unattributed")] += e["dur"] / 1e3 / steps
            if op not in names:
                lost[op] += e["dur"] / 1e3 / steps
    print("unattributed thunks:", lost.most_common(8), flush=True)
    if os.environ.get("STEP_PROFILE_DEBUG"):
        ops = collections.Counter()
        for e in events:
            op = (e.get("args") or {}).get("hlo_op")
            if e.get("ph") == "X" and op and not e["name"].startswith("end:"):
                ops[op] += e["dur"] / 1e3 / steps
        for op, ms in ops.most_common(40):
            print(f"{ms:8.1f} {names.get(op, '?'):<24} {op:<28} {debug.get(op)}")
    # untraced step for the wall time without the profiler's overhead
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        state = jax.block_until_ready(compiled(state, data))
        ts.append(time.perf_counter() - t0)
    return {"wall_ms": statistics.median(ts) * 1e3, "traced_wall_ms": wall * 1e3,
            "pieces_ms": dict(per)}


def ours_directions(batch: int, crop: int) -> dict:
    """ms of forward / dgrad / wgrad of every conv shape alone, through `layers.Conv`."""
    import numpy as np
    from flax import nnx

    from unet_jax.models import layers

    out, rng = {}, np.random.default_rng(0)
    for name, n, s, c, o, k in shapes(batch, crop):
        conv = layers.Conv(c, o, k, padding=k // 2, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(conv)
        x = jnp.asarray(rng.standard_normal((n, s, s, c)), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((n, s, s, o)), jnp.float32)

        def apply(p, xx):
            return nnx.merge(graphdef, p)(xx)

        fns = {"forward": lambda p, xx, g: apply(p, xx),
               "dgrad": lambda p, xx, g: jax.vjp(lambda a: apply(p, a), xx)[1](g)[0],
               "wgrad": lambda p, xx, g: jax.vjp(lambda q: apply(q, xx), p)[1](g)[0]}
        row = {}
        for direction, fn in fns.items():
            exe = jax.jit(fn).lower(params, x, dy).compile()
            jax.block_until_ready(exe(params, x, dy))
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(exe(params, x, dy))
                ts.append(time.perf_counter() - t0)
            row[direction] = statistics.median(ts) * 1e3
        out[name] = row
        print(f"  ours {name:<12} " + " ".join(f"{d} {v:7.2f}" for d, v in row.items()),
              flush=True)
    return out


# ------------------------------------------------------------------------------ mmseg's side
MMSEG = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import bench_torch as bt
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
torch.set_num_threads(2)
torch.manual_seed(0)
batch, crop, steps, config = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
shapes = json.loads(sys.argv[6])
cfg, model = bt.build(config, train=True)
ow = build_optim_wrapper(model, cfg.optim_wrapper)
g = torch.Generator().manual_seed(0)
x = torch.randn(batch, 3, crop, crop, generator=g)
samples = []
for _ in range(batch):
    d = SegDataSample()
    d.gt_sem_seg = PixelData(data=torch.randint(0, 2, (1, crop, crop), generator=g))
    d.set_metainfo(dict(img_shape=(crop, crop), pad_shape=(crop, crop)))
    samples.append(d)
def step():
    losses = model.loss(x, samples)
    loss, _ = model.parse_losses(losses)
    ow.update_params(loss)
for _ in range(2):
    step()
ts = []
for _ in range(5):
    t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
wall = statistics.median(ts) * 1e3
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
        step()
self_ms, total_ms = {}, {}
for e in prof.key_averages():
    self_ms[e.key] = e.self_cpu_time_total / 1e3 / steps
    total_ms[e.key] = e.cpu_time_total / 1e3 / steps
conv_bwd = torch.ops.aten.convolution_backward
directions = {}
for name, n, s, c, o, k in shapes:
    xx = torch.randn(n, c, s, s); w = torch.randn(o, c, k, k) * 0.05; dy = torch.randn(n, o, s, s)
    p = k // 2
    args = (dy, xx, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1)
    cells = {"forward": lambda: torch.nn.functional.conv2d(xx, w, padding=p),
             "dgrad": lambda: conv_bwd(*args, [True, False, False]),
             "wgrad": lambda: conv_bwd(*args, [False, True, False])}
    row = {}
    with torch.no_grad():
        for d, fn in cells.items():
            fn(); rs = []
            for _ in range(5):
                t0 = time.perf_counter(); fn(); rs.append(time.perf_counter() - t0)
            row[d] = statistics.median(rs) * 1e3
    directions[name] = row
print(json.dumps({"wall_ms": wall, "self_ms": self_ms, "total_ms": total_ms,
                  "directions": directions}))
"""
# torch leaf op -> our row (self time); the optimiser is the inclusive time of its step.
TORCH_ROWS = (
    (r"mkldnn_convolution$|^aten::_convolution$|thnn_conv", "conv forward"),
    (r"convolution_backward", "conv dgrad + wgrad"),
    (r"native_batch_norm_backward|batch_norm_backward", "BatchNorm backward"),
    (r"native_batch_norm|_batch_norm_impl|batch_norm", "BatchNorm forward"),
    (r"threshold_backward", "ReLU (ConvModule rest) backward"),
    (r"relu|clamp_min", "ReLU (ConvModule rest) forward"),
    (r"max_pool2d_with_indices_backward", "MaxPool backward"),
    (r"max_pool2d", "MaxPool forward"),
    (r"upsample_bilinear2d_backward", "Upsample backward"),
    (r"upsample_bilinear2d", "Upsample forward"),
    (r"^aten::cat$", "skip concat (UpConvBlock rest) forward"),
    (r"nll_loss.*backward|log_softmax_backward", "Loss backward"),
    (r"nll_loss|log_softmax|cross_entropy", "Loss forward"),
)


def mmseg_side(python: str, config: str, batch: int, crop: int, steps: int) -> dict:
    """mmseg's step wall time, its profile by row, and its per-direction conv times."""
    cmd = [python, "-c", MMSEG, str(TOOL), str(batch), str(crop), str(steps), config,
           json.dumps(shapes(batch, crop))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"mmseg side failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = collections.Counter()
    optimiser = sum(v for k, v in result["total_ms"].items()
                    if k.startswith(("Optimizer.step", "Optimizer.zero_grad")))
    for op, ms in result["self_ms"].items():
        if not op.startswith("aten::"):
            continue
        for pattern, row in TORCH_ROWS:
            if re.search(pattern, op):
                rows[row] += ms
                break
    rows["optimiser, rest"] = optimiser
    result["pieces_ms"] = dict(rows)
    return result


# ------------------------------------------------------------------------------ report
def _uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def publish(text: str, out: str) -> None:
    """Print a results table and append it to `out` (if given); the experiments share it."""
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def markdown(config: str, batch: int, crop: int, ours: dict, theirs: dict | None,
             ours_dir: dict, loads: tuple[str, str]) -> str:
    lines = [f"# Train step profile: {config}, batch {batch}, crop {crop}x{crop}", "",
             f"`python experiments/step_profile.py --config {config} --batch {batch}`; "
             f"load average (1, 5, 15 min) {loads[0]} before, {loads[1]} after; fp32, 2 threads.",
             "", "## In the step (ms per step, thunk/op times summed per thread)", "",
             f"Step wall time: ours {ours['wall_ms']:.0f} ms"
             + (f", mmseg {theirs['wall_ms']:.0f} ms (ratio mmseg/ours "
                f"{theirs['wall_ms'] / ours['wall_ms']:.2f})" if theirs else "") + ".", "",
             "| piece | ours ms | ours % | mmseg ms | mmseg % |", "|---|---:|---:|---:|---:|"]
    ot = sum(ours["pieces_ms"].values())
    tt = sum(theirs["pieces_ms"].values()) if theirs else 0.0
    rows = sorted(set(ours["pieces_ms"]) | set(theirs["pieces_ms"] if theirs else ()),
                  key=lambda r: -ours["pieces_ms"].get(r, 0.0))
    for row in rows:
        o = ours["pieces_ms"].get(row)
        t = theirs["pieces_ms"].get(row) if theirs else None
        lines.append(f"| {row} | {o or 0:.1f} | {100 * (o or 0) / ot:.1f} | "
                     + (f"{t:.1f} | {100 * t / tt:.1f} |" if t is not None else "- | - |"))
    lines += [f"| **sum** | {ot:.0f} | 100 | " + (f"{tt:.0f} | 100 |" if theirs else "- | - |"),
              "", "mmseg's `convolution_backward` computes dgrad and wgrad together; compare it "
              "with the sum of our two conv backward rows."]
    if ours_dir is None:
        return "\n".join(lines) + "\n"
    lines += ["", "## Each conv alone (ms; ratio = mmseg / ours, above 1 we are faster)", "",
              "| conv | N×S×S×C→O k | ours fwd | ours dgrad | ours wgrad | mmseg fwd | "
              "mmseg dgrad | mmseg wgrad | ratio fwd | ratio dgrad | ratio wgrad |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    totals = collections.Counter()
    for name, n, s, c, o, k in shapes(batch, crop):
        ours_row = ours_dir[name]
        theirs_row = theirs["directions"][name] if theirs else {}
        cells = [f"{ours_row[d]:.2f}" for d in ("forward", "dgrad", "wgrad")]
        cells += [f"{theirs_row[d]:.2f}" if theirs_row else "-" for d in ("forward", "dgrad", "wgrad")]
        cells += [f"{theirs_row[d] / ours_row[d]:.2f}" if theirs_row else "-"
                  for d in ("forward", "dgrad", "wgrad")]
        for d in ("forward", "dgrad", "wgrad"):
            totals[f"ours {d}"] += ours_row[d]
            totals[f"mmseg {d}"] += theirs_row.get(d, 0.0)
        lines.append(f"| {name} | {n}×{s}×{s}×{c}→{o} {k}x{k} | " + " | ".join(cells) + " |")
    lines.append("| **all** | | " + " | ".join(f"{totals[f'ours {d}']:.1f}" for d in
                                               ("forward", "dgrad", "wgrad")) + " | "
                 + " | ".join(f"{totals[f'mmseg {d}']:.1f}" if theirs else "-"
                              for d in ("forward", "dgrad", "wgrad")) + " | "
                 + " | ".join(f"{totals[f'mmseg {d}'] / totals[f'ours {d}']:.2f}" if theirs
                              else "-" for d in ("forward", "dgrad", "wgrad")) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/drive.py:fcn")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mmseg_python", default="/tmp/mmseg-ref-venv/bin/python",
                    help="the mmseg venv's python; 'none' profiles ours only")
    ap.add_argument("--step_only", action="store_true", help="leave out the per-conv table")
    ap.add_argument("--out", default="", help="append the markdown tables to this file")
    a = ap.parse_args()
    use_cpu_xla_flags()  # what `python -m unet_jax.benchmark` compiles with (read at backend start)
    before = _uptime()
    config = check_config(load_config(a.config))
    crop = config.data.crop_size[0]
    dataset = Path(a.config.split(":")[0]).stem
    theirs = None
    if a.mmseg_python != "none":
        theirs = mmseg_side(a.mmseg_python, f"fcn_unet_s5-d16_{dataset}", a.batch, crop, a.steps)
    ours = ours_in_step(a.config, a.batch, a.steps)
    ours_dir = None if a.step_only else ours_directions(a.batch, crop)
    publish(markdown(a.config, a.batch, crop, ours, theirs, ours_dir, (before, _uptime())), a.out)


if __name__ == "__main__":
    main()
