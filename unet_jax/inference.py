"""Slide / whole inference and multi-scale + flip TTA, as mmseg's EncoderDecoder
(mmseg/models/segmentors/encoder_decoder.py: slide_inference, whole_inference;
seg_tta.py: SegTTAModel.merge_preds).

Layout: images are NHWC (or HWC) float32, already normalised ((x - mean) / std, RGB); logits are
(H, W, C) float32. `apply_fn` maps a normalised batch (N, h, w, 3) to decode-head logits
(N, h, w, C); `make_apply_fn(model)` builds one around an NNX model, jit-compiled and cached per
input shape (and per model structure), so the same compiled forward serves every image.

Slide mode (mmseg `slide_inference`): a ceil-divided window grid whose last row/column is aligned
to the bottom/right edge; every window of an image is cut out on device, stacked into evenly
filled batches of at most `batch_windows` (the last one padded with dummy windows, so one compiled
forward serves every call), and the raw logits are summed into a canvas and divided by the
per-pixel window count.

Deliberate differences from mmseg, both only for inputs mmseg rejects (its UNet asserts that
every forward is divisible by 16, issue #389):
* a slide window smaller than the crop (the image is smaller than the crop) whose side is not a
  multiple of 16 is padded bottom/right with 0 (in normalised space) to the next multiple and its
  logits are cropped back;
* whole mode pads the whole image the same way and crops the logits back.

Test pipeline (`segment`): mmseg's `Resize(scale=data.img_scale, keep_ratio=True)` on the uint8
image (cv2 INTER_LINEAR; an identity for the zoo datasets at their native size), normalise,
slide/whole inference, bilinear resize of the logits back to the original size
(align_corners=False, torch-exact), argmax. With `eval.tta` the 12 views of mmseg's TTA pipeline
(`eval.tta_scales` x no-flip/flip, each view resized from the original uint8 image) are run, each
view's logits are flipped back, resized to the original size and soft-maxed, and the
probabilities are averaged over the views.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax.losses import resize_logits_to
from unet_jax.preprocess import normalise, rescale_size, resize_uint8, tta_view_hw

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


def _as_hwc(image: Any) -> jax.Array:
    x = jnp.asarray(image, jnp.float32)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"image: expected one image (1, H, W, 3) or (H, W, 3), found "
                             f"shape {tuple(x.shape)}")
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"image: expected (1, H, W, 3) or (H, W, 3), found shape {tuple(x.shape)}")
    return x


def _round_up(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


# ------------------------------------------------------------------------------ slide mode
def slide_windows(height: int, width: int, crop: Sequence[int], stride: Sequence[int],
                  ) -> list[Window]:
    """mmseg's window grid, row-major: ceil grid, last row/column shifted back to the edge.

    Every window has size (min(hc, H), min(wc, W)).
    """
    hc, wc = int(crop[0]), int(crop[1])
    hs, ws = int(stride[0]), int(stride[1])
    if min(hc, wc, hs, ws) < 1:
        raise ValueError(f"crop and stride must be positive; found crop {tuple(crop)}, "
                         f"stride {tuple(stride)}")
    h_grids = max(height - hc + hs - 1, 0) // hs + 1
    w_grids = max(width - wc + ws - 1, 0) // ws + 1
    windows = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * hs + hc, height)
            x2 = min(wi * ws + wc, width)
            windows.append((max(y2 - hc, 0), y2, max(x2 - wc, 0), x2))
    return windows


def window_count(height: int, width: int, windows: Sequence[Window]) -> np.ndarray:
    """How many windows cover each pixel (mmseg's `count_mat`), int32 (H, W)."""
    count = np.zeros((height, width), np.int32)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    return count


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Everything static about one slide-inference program: sizes, windows, batching."""
    height: int
    width: int
    windows: tuple[Window, ...]
    pad_hw: tuple[int, int]
    batch: int                # windows per compiled step; the last step filled with dummies
    num_classes: int


# On CPU a slide batch holds at most this many window pixels: HRF's 294 windows of 256 x 256
# took 156 s per image in batches of 16 against 208 s in batches of 64 (2 cores, AVX-512);
# DRIVE's 64 x 64 windows keep their batch of 64. Accelerators take `batch_windows` as it is.
CPU_WINDOW_PIXELS = 16 * 256 * 256


@functools.lru_cache(maxsize=64)
def _geometry(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int],
              divisor: int, batch_windows: int, devices: int, num_classes: int) -> _Geometry:
    windows = slide_windows(height, width, crop, stride)
    wh, ww = windows[0][1] - windows[0][0], windows[0][3] - windows[0][2]
    # as few compiled steps as `batch_windows` allows, then windows spread evenly over them
    # (294 HRF windows: 5 steps of 59, not of 64 with 26 dummies); whole windows per device
    steps = -(-len(windows) // max(1, min(batch_windows, len(windows))))
    batch = _round_up(-(-len(windows) // steps), devices)
    pad_hw = (_round_up(wh, divisor), _round_up(ww, divisor))
    return _Geometry(height, width, tuple(windows), pad_hw, batch, num_classes)


def _slide(forward: Callable[[jax.Array], jax.Array], image: jax.Array, g: _Geometry,
           mesh: jax.sharding.Mesh | None) -> jax.Array:
    """The whole slide inference of one image as one program: every batch of windows cut out,
    run (spread over `mesh`), added into the canvas; the canvas divided by the window count."""
    y1, y2, x1, x2 = g.windows[0]
    (wh, ww), (ph, pw) = (y2 - y1, x2 - x1), g.pad_hw
    n = len(g.windows)
    dummies = _round_up(n, g.batch) - n
    ys = jnp.asarray([w[0] for w in g.windows] + [0] * dummies, jnp.int32).reshape(-1, g.batch)
    xs = jnp.asarray([w[2] for w in g.windows] + [0] * dummies, jnp.int32).reshape(-1, g.batch)
    valid = jnp.asarray([True] * n + [False] * dummies).reshape(-1, g.batch)

    def cut(y: jax.Array, x: jax.Array) -> jax.Array:
        win = jax.lax.dynamic_slice(image, (y, x, 0), (wh, ww, image.shape[-1]))
        return jnp.pad(win, ((0, ph - wh), (0, pw - ww), (0, 0)))

    def step(canvas: jax.Array, batch: tuple[jax.Array, jax.Array, jax.Array]):
        bys, bxs, bvalid = batch
        crops = jax.vmap(cut)(bys, bxs)
        if mesh is not None and mesh.devices.size > 1:
            crops = jax.lax.with_sharding_constraint(
                crops, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        logits = forward(crops)

        def add(i: jax.Array, canvas: jax.Array) -> jax.Array:
            start = (bys[i], bxs[i], 0)
            current = jax.lax.dynamic_slice(canvas, start, (wh, ww, g.num_classes))
            update = jnp.where(bvalid[i], current + logits[i, :wh, :ww], current)
            return jax.lax.dynamic_update_slice(canvas, update, start)

        return jax.lax.fori_loop(0, g.batch, add, canvas), None

    canvas = jnp.zeros((g.height, g.width, g.num_classes), jnp.float32)
    canvas, _ = jax.lax.scan(step, canvas, (ys, xs, valid))
    count = window_count(g.height, g.width, g.windows)
    return canvas / jnp.asarray(count, jnp.float32)[:, :, None]


@functools.partial(jax.jit, static_argnames=("graphdef", "geometry", "mesh"))
def _slide_model(graphdef: nnx.GraphDef, state: nnx.State, image: jax.Array, *,
                 geometry: _Geometry, mesh: jax.sharding.Mesh | None) -> jax.Array:
    return _slide(lambda x: _forward(graphdef, state, x), image, geometry, mesh)


@functools.partial(jax.jit, static_argnames=("forward", "geometry"))
def _slide_fn(forward: ApplyFn, image: jax.Array, *, geometry: _Geometry) -> jax.Array:
    return _slide(forward, image, geometry, None)


def slide_inference(apply_fn: ApplyFn, image: Any, crop: Sequence[int], stride: Sequence[int],
                    num_classes: int, *, batch_windows: int = 64,
                    size_divisor: int | None = None, return_count: bool = False,
                    ) -> jax.Array | tuple[jax.Array, np.ndarray]:
    """mmseg slide inference of one normalised image (1, H, W, 3) or (H, W, 3) -> (H, W, C).

    Raw logits of overlapping windows are averaged (not probabilities). One compiled program
    per image size does it all; a `ModelApply`'s windows are spread over its mesh, in as few
    batches as `batch_windows` allows (on CPU also `CPU_WINDOW_PIXELS`), evenly filled (a
    multiple of the device count; the last batch filled up with dummy windows). With
    `return_count`, also returns the per-pixel window count (H, W) int32.
    """
    if int(batch_windows) < 1:
        raise ValueError(f"batch_windows must be >= 1; found {batch_windows}")
    x = _as_hwc(image)
    height, width = int(x.shape[0]), int(x.shape[1])
    mesh = apply_fn.mesh if isinstance(apply_fn, ModelApply) else None
    devices = mesh.devices.size if mesh is not None else 1
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform == "cpu":  # big batches of big windows run out of cache on a CPU
        batch_windows = min(int(batch_windows),
                            max(1, CPU_WINDOW_PIXELS // (int(crop[0]) * int(crop[1]))))
    g = _geometry(height, width, (int(crop[0]), int(crop[1])), (int(stride[0]), int(stride[1])),
                  _divisor(apply_fn, size_divisor), int(batch_windows), devices,
                  int(num_classes))
    if isinstance(apply_fn, ModelApply):
        if mesh is not None:
            x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        logits = _slide_model(apply_fn.graphdef, apply_fn.state, x, geometry=g, mesh=mesh)
    else:
        logits = _slide_fn(apply_fn, x, geometry=g)
    if return_count:
        return logits, window_count(height, width, g.windows)
    return logits


# ------------------------------------------------------------------------------ whole mode
def whole_inference(apply_fn: ApplyFn, image: Any, num_classes: int, *,
                    size_divisor: int | None = None) -> jax.Array:
    """One forward on the whole normalised image -> (H, W, C) logits.

    A side that is not a multiple of the divisor is zero-padded bottom/right and the logits
    cropped back (mmseg would raise instead).
    """
    x = _as_hwc(image)
    height, width = int(x.shape[0]), int(x.shape[1])
    divisor = _divisor(apply_fn, size_divisor)
    ph, pw = _round_up(height, divisor), _round_up(width, divisor)
    if (ph, pw) != (height, width):
        x = jnp.pad(x, ((0, ph - height), (0, pw - width), (0, 0)))
    logits = apply_fn(x[None])
    if logits.shape != (1, ph, pw, num_classes):
        raise ValueError(f"apply_fn: expected logits of shape {(1, ph, pw, num_classes)}, "
                         f"found {tuple(logits.shape)}")
    return logits[0, :height, :width]


def inference(apply_fn: ApplyFn, image: Any, eval_cfg: Any, num_classes: int) -> jax.Array:
    """Slide or whole inference per `eval_cfg.mode` (config.eval) -> (H, W, C) logits."""
    if eval_cfg.mode == "slide":
        return slide_inference(apply_fn, image, tuple(eval_cfg.crop_size),
                               tuple(eval_cfg.stride), num_classes,
                               batch_windows=eval_cfg.batch_windows)
    return whole_inference(apply_fn, image, num_classes)


# ------------------------------------------------------------------------------ test pipeline
@functools.partial(jax.jit, static_argnames=("out_hw",))
def _tta_postprocess(logits: jax.Array, flip: jax.Array, *, out_hw: tuple[int, int],
                     ) -> tuple[jax.Array, jax.Array]:
    """A view's logits flipped back (if `flip`), resized to out_hw; and their softmax."""
    logits = jnp.where(flip, logits[:, ::-1], logits)
    logits = resize_logits_to(logits[None], out_hw)[0]
    return logits, jax.nn.softmax(logits, axis=-1)


def tta_inference(apply_fn: ApplyFn, image_rgb: np.ndarray, eval_cfg: Any, num_classes: int,
                  mean: Sequence[float], std: Sequence[float], *, return_views: bool = False,
                  ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """mmseg multi-scale + flip TTA of one uint8 RGB image -> averaged probabilities (H, W, C).

    Views: for r in eval_cfg.tta_scales, for flip in (False, True): the uint8 image resized
    keep-ratio by r (cv2 bilinear), optionally flipped horizontally, normalised, then slide/whole
    inference; its logits flipped back and resized (torch bilinear) to (H, W). With
    `return_views` also returns each view's logits after that postprocess.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image_rgb: expected uint8 H x W x 3, found {image_rgb.dtype} "
                         f"{image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    total = jnp.zeros((height, width, int(num_classes)), jnp.float32)
    views = []
    scales = tuple(eval_cfg.tta_scales)
    for ratio in scales:
        resized = resize_uint8(image_rgb, tta_view_hw(height, width, float(ratio)))
        for flip in (False, True):
            view = resized[:, ::-1] if flip else resized
            logits = inference(apply_fn, normalise(view, mean, std), eval_cfg, num_classes)
            logits, probs = _tta_postprocess(logits, np.bool_(flip), out_hw=(height, width))
            if return_views:
                views.append(logits)
            total = total + probs
    probs = total / (2 * len(scales))
    return (probs, views) if return_views else probs


def segment(apply_fn: ApplyFn, image_rgb: np.ndarray, config: Any, *,
            image_normalised: Any = None, resize: bool = True) -> tuple[jax.Array, jax.Array]:
    """mmseg's test pipeline on one uint8 RGB image -> (scores (H, W, C) float32, pred (H, W)).

    scores are the logits at the original size, or with `config.eval.tta` the averaged
    probabilities. `image_normalised` (the resized + normalised image, e.g. from the eval input
    pipeline) skips the host-side resize and normalisation. `resize=False` skips the keep-ratio
    resize to `config.data.img_scale` (which is an identity at the zoo datasets' native sizes).
    With TTA both are ignored: mmseg's TTA pipeline resizes the original image per view.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image: expected H x W x 3 RGB uint8, found shape {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    num_classes = int(config.model.num_classes)
    data = config.data
    if config.eval.tta:
        scores = tta_inference(apply_fn, image_rgb, config.eval, num_classes, data.mean, data.std)
    else:
        if image_normalised is None:
            hw = rescale_size(height, width, data.img_scale) if resize else (height, width)
            image_normalised = normalise(resize_uint8(image_rgb, hw), data.mean, data.std)
        logits = inference(apply_fn, image_normalised, config.eval, num_classes)
        scores = resize_logits_to(logits[None], (height, width))[0]
    return scores, jnp.argmax(scores, axis=-1).astype(jnp.int32)
