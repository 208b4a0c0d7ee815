"""Slide / whole inference, mmseg's test pipeline and multi-scale + flip TTA, as mmseg's
EncoderDecoder (mmseg/models/segmentors/encoder_decoder.py: slide_inference, whole_inference;
seg_tta.py: SegTTAModel.merge_preds).

Layout: images are HWC float32, already normalised ((x - mean) / std, RGB); logits are
(H, W, C) float32. `apply_fn` maps a normalised batch (N, h, w, 3) to decode-head logits
(N, h, w, C); `make_apply_fn(model)` builds one around an NNX model, jit-compiled and cached per
input shape (and per model structure), so the same compiled forward serves every image.

Slide mode (mmseg `slide_inference`): a ceil-divided window grid whose last row/column is aligned
to the bottom/right edge; the windows are cut out on device in batches of a fixed size (the last
one filled up with dummy windows), the model runs on each batch, and the raw logits are summed
into a canvas and divided by the per-pixel window count. The model is its own program, compiled
once per batch shape, so images of 20 sizes compile it once (a folder of mixed sizes through
predict); only the model-free cutting, adding and dividing compile per image size. The grid,
the batches and the count are computed from the image's height and width inside those
programs, so the same steps also run with symbolic H and W, in one loop: `unet_jax.cli.export`
puts exactly this pipeline into a SavedModel through jax2tf shape polymorphism.

Deliberate differences from mmseg, both only for inputs mmseg rejects (its UNet asserts that
every forward is divisible by 16, issue #389):
* a slide window smaller than the crop (the image is smaller than the crop) whose side is not a
  multiple of 16 is padded bottom/right with 0 (in normalised space) to the next multiple and its
  logits are cropped back;
* whole mode pads the whole image the same way and crops the logits back.

Test pipeline (`segment`): `unet_jax.preprocess.test_image` (mmseg's keep-ratio resize to
data.img_scale and normalise), slide/whole inference, bilinear resize of the logits back to the
original size (align_corners=False, torch-exact), argmax. With `eval.tta` the 12 views of
mmseg's TTA pipeline (`tta_views`: eval.tta_scales x no-flip/flip, each view resized from the
original uint8 image) are run, each view's logits flipped back, resized to the original size and
soft-maxed, and the probabilities averaged over the views. A binary model (one output channel,
`model.out_channels=1`) takes the sigmoid instead of the softmax and labels 1 where it exceeds
`eval.threshold`, as mmseg's decode head `threshold`.

Inputs are trusted: images are checked where they enter (`Segmenter.predict`, the image readers,
the data builders) and the config by `check_config`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.core import max_dim, min_dim

from unet_jax.models.layers import resize_bilinear
from unet_jax.models.segmentor import output_channels
from unet_jax.preprocess import normalise, resize_uint8, test_image, tta_view_hw

ApplyFn = Callable[[jax.Array], jax.Array]
Window = tuple[int, int, int, int]  # (y1, y2, x1, x2), end exclusive


# ------------------------------------------------------------------------------ the model
def _forward(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).predict(x).astype(jnp.float32)


_predict = jax.jit(_forward, static_argnums=0)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelApply:
    """A model's inference forward: (N, h, w, 3) normalised -> (N, h, w, C) float32 logits.

    Compiled once per input shape; the cache is keyed by the model structure, so building a new
    `ModelApply` from the same model with new weights (e.g. at every evaluation of a training
    run) reuses the compiled code. `mesh` (this process's devices, axis `data`) is where slide
    windows are spread; the state lives replicated on it.
    """

    graphdef: nnx.GraphDef
    state: nnx.State
    size_divisor: int = 16
    mesh: jax.sharding.Mesh | None = None

    def __call__(self, x: Any) -> jax.Array:
        return _predict(self.graphdef, self.state, jnp.asarray(x, jnp.float32))


def local_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh (axis `data`) over this process's devices."""
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def _on_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """`tree` replicated on `mesh`, reusing the buffers a replicated array already has there."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    local = set(mesh.devices.flat)

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            shards = {s.device: s.data for s in x.addressable_shards}
            if local <= set(shards):
                return jax.make_array_from_single_device_arrays(
                    x.shape, sharding, [shards[d] for d in mesh.devices.flat])
        return jax.device_put(x, sharding)
    return jax.tree.map(one, tree)


def make_apply_fn(model: nnx.Module, mesh: jax.sharding.Mesh | None = None) -> ModelApply:
    """Wrap `model` for inference: an eval view (BN running stats, no dropout), jit-compiled.

    The view shares the model's arrays (no copy; a training state replicated over all devices
    is used in place) and leaves `model` as it is (a training model stays in train mode); the
    current arrays are captured, so call this again after the weights change. Slide windows
    are spread over `mesh` (default: this process's devices).
    """
    view = nnx.view(model, deterministic=True, use_running_average=True,
                    raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    mesh = mesh or local_mesh()
    backbone = getattr(model, "backbone", None)
    divisor = int(getattr(backbone, "downsample_rate", 16) or 1)
    return ModelApply(graphdef, _on_mesh(state, mesh), divisor, mesh)


def _divisor(apply_fn: ApplyFn, size_divisor: int | None) -> int:
    if size_divisor is not None:
        return int(size_divisor)
    return int(getattr(apply_fn, "size_divisor", 16))


def _round_up(n: Any, divisor: int) -> Any:
    """`n` rounded up to a multiple of `divisor` (an int, or a symbolic dimension)."""
    return (n + divisor - 1) // divisor * divisor


# ------------------------------------------------------------------------------ slide mode
def window_starts(length: Any, crop: int, stride: int) -> Any:
    """Start offsets (int32) of mmseg's slide windows along one axis of `length`: (max(L - crop,
    0) + stride - 1) // stride + 1 windows, the last one shifted back to end at the edge. A numpy
    array for an int `length` (no device work), a JAX one for a symbolic dimension."""
    xp = np if isinstance(length, int) else jnp
    grids = max_dim(length - crop + stride - 1, 0) // stride + 1
    ends = xp.minimum(xp.arange(grids, dtype=np.int32) * stride + crop, length)
    return xp.maximum(ends - crop, 0).astype(np.int32)


def slide_windows(height: int, width: int, crop: Sequence[int], stride: Sequence[int],
                  ) -> list[Window]:
    """mmseg's window grid of an image, row-major (`window_starts` along each axis).

    Every window has size (min(hc, H), min(wc, W)).
    """
    wh, ww = min(int(crop[0]), height), min(int(crop[1]), width)
    ys = window_starts(int(height), int(crop[0]), int(stride[0])).tolist()
    xs = window_starts(int(width), int(crop[1]), int(stride[1])).tolist()
    return [(y, y + wh, x, x + ww) for y in ys for x in xs]


def window_count(height: int, width: int, windows: Sequence[Window]) -> np.ndarray:
    """How many windows cover each pixel (mmseg's `count_mat`), int32 (H, W)."""
    count = np.zeros((height, width), np.int32)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    return count


def _coverage(length: Any, starts: jax.Array, size: Any) -> jax.Array:
    """How many windows [start, start + size) cover each index of range(length), float32."""
    i = jnp.arange(length, dtype=jnp.int32)[:, None]
    inside = (i >= starts[None, :]) & (i < starts[None, :] + size)
    return jnp.sum(inside, axis=1, dtype=jnp.int32).astype(jnp.float32)


# On CPU a slide batch holds at most this many window pixels: HRF's 294 windows of 256 x 256
# took 156 s per image in batches of 16 against 208 s in batches of 64 (2 cores, AVX-512);
# DRIVE's 64 x 64 windows keep their batch of 64. Accelerators take `batch_windows` as it is.
CPU_WINDOW_PIXELS = 16 * 256 * 256


# The last batch of an image is rounded up to a multiple of this many windows, not to a full
# batch: DRIVE's 182 windows run as 64 + 64 + 56 (184 forwards, not 192), an image of 140 as
# 64 + 64 + 16; the model compiles at most batch / TAIL_WINDOWS times, for any number of sizes.
TAIL_WINDOWS = 8


def slide_batch(num_windows: int, batch_windows: int, devices: int) -> tuple[int, int]:
    """(windows per forward, windows in the last forward): full batches of `batch_windows` (a
    whole number per device) and a last one of the remaining windows rounded up to a multiple
    of `TAIL_WINDOWS` (and of the device count), filled up with dummy windows. The batch
    shapes do not depend on the image size, so the model compiles once per shape, not per
    size."""
    batch = _round_up(max(1, batch_windows), devices)
    rest = num_windows - (-(-num_windows // batch) - 1) * batch
    return batch, min(batch, _round_up(_round_up(rest, TAIL_WINDOWS), devices))


def _replicated(mesh: jax.sharding.Mesh | None) -> Any:
    return (None if mesh is None
            else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _spread(crops: jax.Array, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """A batch of windows split over the mesh's devices (as the training batch is)."""
    if mesh is not None and mesh.devices.size > 1:
        crops = jax.lax.with_sharding_constraint(
            crops, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    return crops


class _Grid(NamedTuple):
    """The slide windows of one image, row-major, followed by a batch of dummy windows at (0, 0):
    starts (win_y, win_x) and `valid`; the window size (wh, ww), the padded size
    (ph, pw) the model sees, the per-axis starts (ys, xs) and the number of batches."""

    win_y: Any
    win_x: Any
    valid: Any
    wh: Any
    ww: Any
    ph: Any
    pw: Any
    ys: Any
    xs: Any
    steps: Any


def _grid(height: Any, width: Any, crop: tuple[int, int], stride: tuple[int, int], batch: int,
          divisor: int) -> _Grid:
    """The window plan of an H x W image (H and W may be symbolic; traced inside a program)."""
    wh, ww = min_dim(crop[0], height), min_dim(crop[1], width)
    ys, xs = window_starts(height, crop[0], stride[0]), window_starts(width, crop[1], stride[1])
    ys, xs = jnp.asarray(ys), jnp.asarray(xs)
    rows, cols = ys.shape[0], xs.shape[0]
    n = rows * cols
    steps = (n + batch - 1) // batch
    # `batch` dummies at (0, 0), their logits not added: a batch starting at a real window
    # ends within them
    win_y = jnp.pad(jnp.broadcast_to(ys[:, None], (rows, cols)).reshape(n), (0, batch))
    win_x = jnp.pad(jnp.broadcast_to(xs[None, :], (rows, cols)).reshape(n), (0, batch))
    valid = jnp.arange(n + batch) < n
    return _Grid(win_y, win_x, valid, wh, ww, _round_up(wh, divisor), _round_up(ww, divisor),
                 ys, xs, steps)


def _batch_starts(grid: _Grid, start: Any, batch: int) -> tuple[jax.Array, ...]:
    return tuple(jax.lax.dynamic_slice_in_dim(v, start, batch)
                 for v in (grid.win_y, grid.win_x, grid.valid))


def _slide_cut(image: jax.Array, start: Any, *, crop: tuple[int, int], stride: tuple[int, int],
               batch: int, divisor: int, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Windows start ... start + batch - 1 of the image (batch, ph, pw, 3), each zero-padded to
    the divisor."""
    g = _grid(image.shape[0], image.shape[1], crop, stride, batch, divisor)
    bys, bxs, _ = _batch_starts(g, start, batch)

    def cut(y: jax.Array, x: jax.Array) -> jax.Array:
        win = jax.lax.dynamic_slice(image, (y, x, 0), (g.wh, g.ww, image.shape[-1]))
        return jnp.pad(win, ((0, g.ph - g.wh), (0, g.pw - g.ww), (0, 0)))

    return _spread(jax.vmap(cut)(bys, bxs), mesh)


def _slide_add(canvas: jax.Array, logits: jax.Array, start: Any, *, crop: tuple[int, int],
               stride: tuple[int, int], batch: int) -> jax.Array:
    """`canvas` (H, W, C) plus the logits of the real windows among start ... start + batch - 1,
    added one window at a time in row-major order (mmseg's order: the sums round as its do)."""
    g = _grid(canvas.shape[0], canvas.shape[1], crop, stride, batch, 1)
    bys, bxs, bvalid = _batch_starts(g, start, batch)

    def add(i: jax.Array, canvas: jax.Array) -> jax.Array:
        start = (bys[i], bxs[i], 0)
        current = jax.lax.dynamic_slice(canvas, start, (g.wh, g.ww, canvas.shape[-1]))
        update = jnp.where(bvalid[i], current + logits[i, :g.wh, :g.ww], current)
        return jax.lax.dynamic_update_slice(canvas, update, start)

    return jax.lax.fori_loop(0, batch, add, canvas)


def _slide_mean(canvas: jax.Array, *, crop: tuple[int, int], stride: tuple[int, int]
                ) -> jax.Array:
    """The summed logits divided by the per-pixel window count."""
    g = _grid(canvas.shape[0], canvas.shape[1], crop, stride, 1, 1)
    count = _coverage(canvas.shape[0], g.ys, g.wh)[:, None] * _coverage(canvas.shape[1], g.xs,
                                                                         g.ww)[None, :]
    return canvas / count[:, :, None]


# The per-size programs: cheap (no model inside), one each per image size.
_slide_cut_jit = jax.jit(_slide_cut, static_argnames=("crop", "stride", "batch", "divisor",
                                                      "mesh"))
_slide_add_jit = jax.jit(_slide_add, static_argnames=("crop", "stride", "batch"))
_slide_mean_jit = jax.jit(_slide_mean, static_argnames=("crop", "stride"))


def _slide(forward: ApplyFn, image: jax.Array, crop: tuple[int, int], stride: tuple[int, int],
           num_classes: int, batch: int, tail: int, divisor: int,
           mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Cut a batch of windows, run the model on it, add its logits into the canvas; repeat;
    divide by the window count. For concrete sizes a Python loop over small per-size programs
    around `forward`, compiled once per batch shape whatever the image size; for symbolic H
    and W (an export) the same steps in one `fori_loop`."""
    height, width = image.shape[0], image.shape[1]
    if jax.export.is_symbolic_dim(height) or jax.export.is_symbolic_dim(width):
        steps = _grid(height, width, crop, stride, batch, divisor).steps
        where = dict(crop=crop, stride=stride, batch=batch)

        def step(k: jax.Array, canvas: jax.Array) -> jax.Array:
            crops = _slide_cut(image, k * batch, divisor=divisor, mesh=mesh, **where)
            return _slide_add(canvas, forward(crops), k * batch, **where)

        canvas = jnp.zeros((height, width, num_classes), jnp.float32)
        canvas = jax.lax.fori_loop(0, steps, step, canvas)
        return _slide_mean(canvas, crop=crop, stride=stride)
    steps = -(-len(slide_windows(height, width, crop, stride)) // batch)
    canvas = jax.device_put(np.zeros((height, width, num_classes), np.float32),
                            _replicated(mesh))
    for k in range(steps):
        where = dict(crop=crop, stride=stride, batch=tail if k == steps - 1 else batch)
        crops = _slide_cut_jit(image, k * batch, divisor=divisor, mesh=mesh, **where)
        canvas = _slide_add_jit(canvas, forward(crops), k * batch, **where)
    return _slide_mean_jit(canvas, crop=crop, stride=stride)


def slide_inference(apply_fn: ApplyFn, image: Any, crop: Sequence[int], stride: Sequence[int],
                    num_classes: int, *, batch_windows: int = 64,
                    size_divisor: int | None = None) -> jax.Array:
    """mmseg slide inference of one normalised image (H, W, 3) -> (H, W, C) logits.

    Raw logits of overlapping windows are averaged (not probabilities). The model runs on
    batches of a fixed number of windows (`slide_batch`: `batch_windows`, on CPU also at most
    `CPU_WINDOW_PIXELS`; the last batch a multiple of `TAIL_WINDOWS`), so it is compiled a
    few times at most for images of every size; only the cheap cutting and adding is
    compiled per size. A `ModelApply`'s windows are spread over its mesh.
    With symbolic H, W (an export) the batches hold `batch_windows` windows.
    The per-pixel window count is `window_count(H, W, slide_windows(...))`.
    """
    x = jnp.asarray(image, jnp.float32)
    height, width = x.shape[0], x.shape[1]
    crop, stride = (int(crop[0]), int(crop[1])), (int(stride[0]), int(stride[1]))
    devices, batch = _window_budget(apply_fn, batch_windows, crop)
    tail = batch
    if not (jax.export.is_symbolic_dim(height) or jax.export.is_symbolic_dim(width)):
        batch, tail = slide_batch(len(slide_windows(height, width, crop, stride)), batch,
                                  devices)
    forward, mesh, x = _model_and_mesh(apply_fn, x)
    return _slide(forward, x, crop, stride, int(num_classes), batch, tail,
                  _divisor(apply_fn, size_divisor), mesh)


def _window_budget(apply_fn: ApplyFn, batch_windows: int, window: tuple[int, int]
                   ) -> tuple[int, int]:
    """(devices the windows are spread over, windows per batch at most): `batch_windows`, on
    a CPU also at most `CPU_WINDOW_PIXELS` (big batches of big windows run out of cache)."""
    mesh = apply_fn.mesh if isinstance(apply_fn, ModelApply) else None
    devices = mesh.devices.size if mesh is not None else 1
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform == "cpu":
        batch_windows = min(int(batch_windows),
                            max(1, CPU_WINDOW_PIXELS // (window[0] * window[1])))
    return devices, int(batch_windows)


def _model_and_mesh(apply_fn: ApplyFn, x: jax.Array
                    ) -> tuple[ApplyFn, jax.sharding.Mesh | None, jax.Array]:
    """(the batch forward, the mesh windows are spread over, the image): a `ModelApply` as it
    is (its own jitted forward) with the image replicated on its mesh; a plain function
    jit-compiled (traced once per batch shape), no mesh."""
    if isinstance(apply_fn, ModelApply):
        mesh = apply_fn.mesh
        if mesh is not None and not isinstance(x, jax.core.Tracer):
            x = jax.device_put(x, _replicated(mesh))
        return apply_fn, mesh, x
    return jax.jit(apply_fn), None, x


# ------------------------------------------------------------------------------ whole mode
def whole_inference(apply_fn: ApplyFn, image: Any, num_classes: int, *,
                    size_divisor: int | None = None) -> jax.Array:
    """One forward on the whole normalised image (H, W, 3) -> (H, W, C) logits.

    A side that is not a multiple of the divisor is zero-padded bottom/right and the logits
    cropped back (mmseg would raise instead). H and W may be symbolic.
    """
    x = jnp.asarray(image, jnp.float32)
    height, width = x.shape[0], x.shape[1]
    divisor = _divisor(apply_fn, size_divisor)
    x = jnp.pad(x, ((0, _round_up(height, divisor) - height),
                    (0, _round_up(width, divisor) - width), (0, 0)))
    return apply_fn(x[None])[0, :height, :width, :num_classes]


# ------------------------------------------------------------------------------ overlap-tile
def tile_grid(height: int, width: int, out_tile: int) -> tuple[int, int]:
    """(rows, cols) of output tiles of side `out_tile` that cover an H x W image."""
    return -(-height // out_tile), -(-width // out_tile)


def _tile_pad(image: jax.Array, *, tile: tuple[int, int], out_tile: tuple[int, int]
              ) -> jax.Array:
    """The image mirror-padded (numpy's "reflect") so that every input tile lies inside."""
    height, width = image.shape[0], image.shape[1]
    (th, tw), (oh, ow) = tile, out_tile
    rows, cols = tile_grid(height, width, oh)[0], tile_grid(height, width, ow)[1]
    top, left = (th - oh) // 2, (tw - ow) // 2
    return jnp.pad(image, ((top, rows * oh - height + th - oh - top),
                           (left, cols * ow - width + tw - ow - left), (0, 0)), mode="reflect")


def _tile_cut(padded: jax.Array, start: Any, *, tile: tuple[int, int], out_tile: tuple[int, int],
              batch: int, rows: int, cols: int, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Input tiles start ... start + batch - 1 of the padded image, row-major (past the last
    tile: the first ones again, dummies), spread over `mesh`."""
    index = (start + jnp.arange(batch)) % (rows * cols)
    ys, xs = index // cols * out_tile[0], index % cols * out_tile[1]
    crops = jax.vmap(lambda y, x: jax.lax.dynamic_slice(
        padded, (y, x, 0), (tile[0], tile[1], padded.shape[-1])))(ys, xs)
    return _spread(crops, mesh)


def _tile_join(outputs: tuple[jax.Array, ...], *, rows: int, cols: int, num_classes: int,
               height: int, width: int) -> jax.Array:
    """The output tiles of every batch put side by side, cropped to the image."""
    out = jnp.concatenate(outputs)[:rows * cols, ..., :num_classes]
    oh, ow = out.shape[1], out.shape[2]
    out = out.reshape(rows, cols, oh, ow, num_classes).transpose(0, 2, 1, 3, 4)
    return out.reshape(rows * oh, cols * ow, num_classes)[:height, :width]


_tile_pad_jit = jax.jit(_tile_pad, static_argnames=("tile", "out_tile"))
_tile_cut_jit = jax.jit(_tile_cut, static_argnames=("tile", "out_tile", "batch", "rows",
                                                    "cols", "mesh"))
_tile_join_jit = jax.jit(_tile_join, static_argnames=("rows", "cols", "num_classes", "height",
                                                      "width"))


def overlap_tile_inference(apply_fn: ApplyFn, image: Any, tile: Sequence[int],
                           num_classes: int, *, batch_windows: int = 64) -> jax.Array:
    """The original U-Net's overlap-tile strategy (Ronneberger et al. 2015, Fig. 2) on one
    normalised image (H, W, 3) -> (H, W, C) logits, any H and W.

    The net maps an input tile of `tile` (valid sides, see `models.unet2015`) to an output tile
    184 px smaller; output tiles sit side by side without overlap, and the context beyond the
    image border is its mirror image (numpy's "reflect"). Tiles are batched and spread over a
    `ModelApply`'s mesh as slide windows are (`slide_batch`, `CPU_WINDOW_PIXELS`): the model
    compiles once per tile batch, only padding, cutting and joining once per image size.
    """
    from unet_jax.models.unet2015 import output_size

    x = jnp.asarray(image, jnp.float32)
    if any(jax.export.is_symbolic_dim(d) for d in x.shape[:2]):
        raise ValueError("overlap-tile inference needs concrete image sizes: a SavedModel "
                         "export of model.name unet2015 is not supported")
    height, width = int(x.shape[0]), int(x.shape[1])
    tile = (int(tile[0]), int(tile[1]))
    out_tile = (output_size(tile[0]), output_size(tile[1]))
    devices, batch = _window_budget(apply_fn, batch_windows, tile)
    rows, cols = tile_grid(height, width, out_tile[0])[0], tile_grid(height, width,
                                                                     out_tile[1])[1]
    batch, tail = slide_batch(rows * cols, batch, devices)
    forward, mesh, x = _model_and_mesh(apply_fn, x)
    padded = _tile_pad_jit(x, tile=tile, out_tile=out_tile)
    steps = -(-(rows * cols) // batch)
    outputs = tuple(forward(_tile_cut_jit(padded, k * batch, tile=tile, out_tile=out_tile,
                                          batch=tail if k == steps - 1 else batch, rows=rows,
                                          cols=cols, mesh=mesh))
                    for k in range(steps))
    return _tile_join_jit(outputs, rows=rows, cols=cols, num_classes=int(num_classes),
                          height=height, width=width)


def inference(apply_fn: ApplyFn, image: Any, eval_cfg: Any, num_classes: int) -> jax.Array:
    """Slide, whole or overlap-tile inference per `eval_cfg.mode` (config.eval) -> (H, W, C)
    logits."""
    if eval_cfg.mode == "overlap_tile":
        return overlap_tile_inference(apply_fn, image, tuple(eval_cfg.crop_size), num_classes,
                                      batch_windows=eval_cfg.batch_windows)
    if eval_cfg.mode == "slide":
        return slide_inference(apply_fn, image, tuple(eval_cfg.crop_size),
                               tuple(eval_cfg.stride), num_classes,
                               batch_windows=eval_cfg.batch_windows)
    return whole_inference(apply_fn, image, num_classes)


# ------------------------------------------------------------------------------ test pipeline
def _postprocess(logits: jax.Array, flip: Any, out_hw: tuple[Any, Any]) -> jax.Array:
    """A view's logits flipped back horizontally (if `flip`) and resized to out_hw."""
    logits = jnp.where(flip, logits[:, ::-1], logits)
    return resize_bilinear(logits[None], out_hw)[0]


_postprocess_jit = jax.jit(_postprocess, static_argnames="out_hw")


def view_scores(apply_fn: ApplyFn, image: Any, config: Any, out_hw: tuple[Any, Any], *,
                flip: Any = False) -> jax.Array:
    """The logits of one normalised test view (H, W, 3) by slide or whole inference per
    config.eval, flipped back horizontally if `flip` (a bool, or a traced one), resized (torch
    bilinear) to `out_hw` -> (out_h, out_w, C). The JAX part of every test pipeline: predict,
    evaluation, TTA, and the exported SavedModel (with symbolic sizes)."""
    logits = inference(apply_fn, image, config.eval, output_channels(config.model))
    if any(jax.export.is_symbolic_dim(d) for d in (*logits.shape, *out_hw)):
        return _postprocess(logits, flip, out_hw)
    return _postprocess_jit(logits, jnp.asarray(flip), out_hw=tuple(int(d) for d in out_hw))


def tta_views(apply_fn: ApplyFn, image_rgb: np.ndarray, config: Any) -> Iterator[jax.Array]:
    """mmseg's TTA views of one uint8 RGB image, one at a time: for r in eval.tta_scales, for
    flip in (False, True), the logits (H, W, C) of the image resized keep-ratio by r (cv2
    bilinear), optionally flipped, normalised (`view_scores`: flipped back, resized to H x W)."""
    height, width = image_rgb.shape[:2]
    data = config.data
    for ratio in config.eval.tta_scales:
        resized = resize_uint8(image_rgb, tta_view_hw(height, width, float(ratio)))
        for flip in (False, True):
            view = normalise(resized[:, ::-1] if flip else resized, data.mean, data.std)
            yield view_scores(apply_fn, view, config, (height, width), flip=flip)


def probabilities(logits: jax.Array) -> jax.Array:
    """Class probabilities of (..., C) logits: the softmax, or for one channel (a binary model)
    the sigmoid, the foreground's probability (mmseg's postprocess_result and TTA)."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


def labels_of(scores: jax.Array, *, probs: bool, threshold: float) -> jax.Array:
    """(H, W) int32 class ids of (H, W, C) scores (logits, or probabilities when `probs`): the
    argmax, or for one channel 1 where the foreground probability exceeds `threshold`
    (config.eval.threshold; mmseg's decode head `threshold`)."""
    if scores.shape[-1] == 1:
        fg = scores[..., 0] if probs else jax.nn.sigmoid(scores[..., 0])
        return (fg > threshold).astype(jnp.int32)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


# The original U-Net's test-time augmentation (Ronneberger et al. 2015, §4: "averaged over 7
# rotated versions of the input data" besides the identity): (quarter turns, then flip).
DIHEDRAL = tuple((turns, flip) for turns in range(4) for flip in (False, True))


@functools.partial(jax.jit, static_argnames=("turns", "flip"))
def _undo_dihedral(logits: jax.Array, turns: int, flip: bool) -> jax.Array:
    """A view's logits mapped back onto the original image (flip undone, then the turns)."""
    return jnp.rot90(logits[:, ::-1] if flip else logits, -turns, axes=(0, 1))


def dihedral_views(apply_fn: ApplyFn, image_rgb: np.ndarray, config: Any
                   ) -> Iterator[jax.Array]:
    """The 8 views of one uint8 RGB image (`DIHEDRAL`: np.rot90 by 0-3 quarter turns, each
    without and with a horizontal flip), one at a time: the logits of the test image
    (`preprocess.test_image`) so transformed, mapped back and resized to H x W."""
    height, width = image_rgb.shape[:2]
    image = test_image(image_rgb, config.data)
    for turns, flip in DIHEDRAL:
        view = np.rot90(image, turns)
        view = np.ascontiguousarray(view[:, ::-1] if flip else view)
        logits = inference(apply_fn, view, config.eval, output_channels(config.model))
        yield _postprocess_jit(_undo_dihedral(logits, turns=turns, flip=flip),
                               jnp.asarray(False), out_hw=(height, width))


@jax.jit
def _add_probabilities(total: jax.Array, logits: jax.Array) -> jax.Array:
    return total + probabilities(logits)


def tta_inference(apply_fn: ApplyFn, image_rgb: np.ndarray, config: Any) -> jax.Array:
    """Test-time augmentation of one uint8 RGB image -> the probabilities of its views averaged
    (H, W, C) (softmax, or sigmoid for one channel): mmseg's multi-scale + flip `tta_views`, or
    with `eval.tta_mode` "dihedral" the original U-Net's 8 rotations/flips (`dihedral_views`)."""
    height, width = image_rgb.shape[:2]
    total = jnp.zeros((height, width, output_channels(config.model)), jnp.float32)
    dihedral = config.eval.get("tta_mode", "mmseg") == "dihedral"
    views = (dihedral_views if dihedral else tta_views)(apply_fn, image_rgb, config)
    for logits in views:
        total = _add_probabilities(total, logits)
    return total / (len(DIHEDRAL) if dihedral else 2 * len(config.eval.tta_scales))


def segment(apply_fn: ApplyFn, image_rgb: np.ndarray, config: Any, *, resize: bool = True,
            ) -> tuple[jax.Array, jax.Array]:
    """mmseg's test pipeline on one uint8 RGB image -> (scores (H, W, C) float32, pred (H, W)).

    scores are the logits at the original size, or with `config.eval.tta` the averaged
    probabilities. `resize=False` skips the keep-ratio resize to `config.data.img_scale` (an
    identity at the zoo datasets' native sizes); TTA resizes the original image per view.
    """
    height, width = image_rgb.shape[:2]
    if config.eval.tta:
        scores = tta_inference(apply_fn, image_rgb, config)
    else:
        data = config.data
        image = (test_image(image_rgb, data) if resize
                 else normalise(image_rgb, data.mean, data.std))
        scores = view_scores(apply_fn, image, config, (height, width))
    return scores, _labels_jit(scores, probs=bool(config.eval.tta),
                               threshold=float(config.eval.threshold))


_labels_jit = jax.jit(labels_of, static_argnames=("probs", "threshold"))
