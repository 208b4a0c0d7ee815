"""Export a model with mmseg's test pipeline as a TensorFlow SavedModel.

    python -m unet_jax.export --config configs/drive.py:fcn,ce --checkpoint CKPT --output DIR \\
        [--platforms cpu,cuda] [--config.model.base_channels=8 ...]

CKPT is anything `unet_jax.io.weights.load` reads (mmseg .pth, weights folder, training workdir).
DIR must not exist or be empty. Its `serving_default` signature takes

    image:  uint8 [H, W, 3], RGB, any size

and returns

    labels: uint8 [H, W]      the argmax of scores (ties: the lowest class id); a binary model
                              (model.out_channels=1): 1 where the sigmoid > eval.threshold
    scores: float32 [H, W, C] what `unet_jax.predict --save_logits` writes: the window-averaged
                              logits at the image's size; with --config.eval.tta=True the
                              view-averaged probabilities

Serve it with TensorFlow alone (no JAX, no unet_jax):

    model = tf.saved_model.load(DIR)
    out = model.signatures["serving_default"](image=tf.constant(rgb_uint8))

Design. The SavedModel runs the JAX code that predict runs, converted with `jax2tf` (native
serialization: StableHLO in an XlaCallModule op, the weights as TensorFlow variables):
`unet_jax.inference.view_scores` after `normalise`, i.e. slide or whole inference per
`config.eval` (window grid, batches and per-pixel count computed in the program), the logits
flipped back (TTA) and resized, torch-bilinear, to the image's size, all shape-polymorphic in
the view's and the image's H and W (`jax.core.min_dim`/`max_dim` carry the window size min(crop,
H) and the window count; floor division by constants is polynomial). Only the keep-ratio resize
is TensorFlow (`unet_jax.serving`): its size, min(long / max(H, W), short / min(H, W)) rounded,
is not a dimension polynomial; besides it TensorFlow takes only the argmax and, with
`eval.tta`, the loop that runs the converted function once per view and averages the softmax. Each new image size compiles the converted program once
(XLA's shape refinement). Measured on a 2-core CPU with the tiny DRIVE test model against the
previous export (TensorFlow ops for everything but the forward): first call of a size 2-3 s
(was 2-6 s), then 0.75 s per 584x565 image (was 2.2 s); scores within 3e-5 relative of
predict's at 1x5000, 7x3, 601x599, 2000x40. The program is lowered for each of --platforms;
the SavedModel runs on those only (default: cpu and cuda).

Beside the SavedModel, `DIR/assets.extra/unet_jax.json` records the classes, the palette, the
checkpoint and the whole config.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from unet_jax.cli import common
from unet_jax.io import paths
from unet_jax.errors import InputError, storage_error

PLATFORMS = ("cpu", "cuda", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda")
META_FILE = Path("assets.extra") / "unet_jax.json"


def tf_scores(config: Any, model: Any, platforms: Sequence[str] = DEFAULT_PLATFORMS,
              ) -> tuple[Any, list]:
    """predict's JAX test pipeline as a TensorFlow callable, and the variables it reads.

    `scores(view, image, flip)`: uint8 view (h, w, 3) -> `inference.view_scores` of the
    normalised view at `image`'s size (H, W, C) float32, flipped back if `flip`; h, w, H, W
    symbolic. The weights become non-trainable `tf.Variable`s named by their state path.
    """
    import jax
    import numpy as np
    import tensorflow as tf
    from jax.experimental import jax2tf

    from unet_jax.inference import make_apply_fn, view_scores
    from unet_jax.io.weights import flat_paths
    from unet_jax.preprocess import normalise

    apply = dataclasses.replace(make_apply_fn(model), mesh=None)
    leaves, treedef = jax.tree.flatten(apply.state)
    names = list(flat_paths(apply.state))
    if len(names) != len(leaves):
        raise ValueError(f"model state: {len(leaves)} arrays but {len(names)} paths")
    variables = [tf.Variable(np.asarray(leaf), trainable=False, name=name.replace("/", "."))
                 for name, leaf in zip(names, leaves)]
    data = config.data

    def scores_jax(state: Any, view: Any, image: Any, flip: Any) -> Any:
        view = normalise(view, data.mean, data.std)
        return view_scores(dataclasses.replace(apply, state=state), view, config,
                           image.shape[:2], flip=flip)

    converted = jax2tf.convert(
        scores_jax, polymorphic_shapes=[None, "(h, w, 3)", "(H, W, 3)", "()"],
        with_gradient=False, native_serialization_platforms=tuple(platforms))

    # One traced function, however often the serving graph calls it (TTA: twice per scale),
    # so the pipeline is lowered and stored once.
    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8),
                                  tf.TensorSpec([None, None, 3], tf.uint8),
                                  tf.TensorSpec([], tf.bool)], autograph=False)
    def scores(view: Any, image: Any, flip: Any) -> Any:
        return converted(jax.tree.unflatten(treedef, variables), view, image, flip)

    return scores, variables


def make_module(config: Any, model: Any, platforms: Sequence[str] = DEFAULT_PLATFORMS) -> Any:
    """A `tf.Module` holding the weights and `serve(image)`: `unet_jax.serving.segment` of one
    uint8 RGB image -> {labels, scores}."""
    import tensorflow as tf

    from unet_jax import serving

    scores_fn, variables = tf_scores(config, model, platforms)
    module = tf.Module()
    module.model_weights = variables

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")],
                 autograph=False)
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        scores, labels = serving.segment(scores_fn, image, config)
        return {"labels": labels, "scores": scores}

    module.serve = serve
    return module


def check_output(output: str | Path) -> Path:
    """--output as an absolute path; an `InputError` if it exists and is not an empty folder."""
    out = paths.to_path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--output {out}: already exists and is not an empty folder; choose a "
                         "new one (an export never overwrites)")
    return out


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """The --platforms list, checked against what jax2tf lowers for."""
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in platforms if p.strip()))
    unknown = [p for p in chosen if p not in PLATFORMS]
    if not chosen or unknown:
        raise InputError(f"--platforms: expected a comma-separated subset of "
                         f"{', '.join(PLATFORMS)}; found {','.join(platforms) or 'nothing'}")
    return chosen


def save_module(module: Any, output: str | Path, meta: dict[str, Any]) -> Path:
    """Write the SavedModel (signature `serving_default`) and `assets.extra/unet_jax.json`.

    It is written into a temporary sibling folder and renamed into place, so an interrupted
    export leaves no half-written --output.
    """
    import tensorflow as tf

    out = check_output(output)
    try:
        with paths.staged(out) as target:  # a bucket: written locally, uploaded when complete
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=target.parent))
            try:
                tf.saved_model.save(module, str(partial),
                                    signatures={"serving_default": module.serve})
                (partial / META_FILE).parent.mkdir(parents=True, exist_ok=True)
                (partial / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
                check_output(out)
                if target.exists():
                    target.rmdir()
                os.replace(partial, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    except Exception as err:
        reason = storage_error(err)
        if reason is None:
            raise
        raise InputError(f"{out}: cannot write the SavedModel: {reason}") from err
    return out


def check_exportable(config: Any) -> None:
    """Refuse (InputError) a config whose TTA the SavedModel would not run:
    `unet_jax.serving.segment` implements mmseg's TTA (scales x flip) only, so `eval.tta_mode`
    "dihedral" (the original U-Net's 8 rotations/flips) with `eval.tta` on would silently
    export another computation."""
    if config.eval.tta and config.eval.get("tta_mode", "mmseg") != "mmseg":
        raise InputError(f"eval.tta_mode {config.eval.tta_mode!r}: export runs mmseg's TTA "
                         "(scales x flip) only; export with --config.eval.tta=False and average "
                         "the 8 rotations/flips around the SavedModel, or use unet_jax.predict")


def export_checkpoint(config: Any, checkpoint: str | Path, output: str | Path, *,
                      platforms: Sequence[str] = DEFAULT_PLATFORMS,
                      overridden: Collection[str] = ()) -> Path:
    """Build the model --checkpoint records (`weights.use_recorded_model`), load it, write the
    SavedModel to --output."""
    from unet_jax.io import weights
    from unet_jax.models import build_model

    check_exportable(config)
    out = check_output(output)
    platforms = check_platforms(platforms)
    weights.use_recorded_model(config, checkpoint, overridden)
    model = build_model(config.model)
    info = weights.load(model, checkpoint)
    meta = {"classes": list(info.get("classes") or config.data.classes),
            "palette": [list(p) for p in (info.get("palette") or config.data.palette)],
            "checkpoint": info["source"], "platforms": list(platforms),
            "signature": {"inputs": {"image": "uint8 [H, W, 3] RGB"},
                          "outputs": {"labels": "uint8 [H, W]",
                                      "scores": ("float32 [H, W, C] "
                                                 + ("TTA probabilities" if config.eval.tta
                                                    else "logits"))}},
            "config": config.to_dict()}
    return save_module(make_module(config, model, platforms), out, meta)


def main(config: Any, argv: Sequence[str]) -> None:
    """Export --checkpoint with `config` to the SavedModel --output."""
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    from ml_collections import config_flags
    out = export_checkpoint(config, f.checkpoint, f.output, platforms=f.platforms,
                            overridden=config_flags.get_override_values(f["config"]))
    print(f"wrote SavedModel (serving_default: image uint8 [H, W, 3] -> labels, scores) to {out}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None,
                        "mmseg .pth, weights folder (unet_jax.convert) or training workdir")
    flags.DEFINE_string("output", None, "SavedModel folder to create (must not exist, or be "
                        "empty)")
    flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                      f"platforms the model forward is lowered for, a subset of "
                      f"{','.join(PLATFORMS)}")
    flags.mark_flags_as_required(["checkpoint", "output"])
    flags.register_validator("platforms", lambda p: bool(p) and set(p) <= set(PLATFORMS),
                             f"expected a comma-separated subset of {','.join(PLATFORMS)}")


def run() -> None:
    """`python -m unet_jax.export` / the `unet-jax-export` console entry."""
    common.run(main, prog="unet_jax.export", define_flags=_define_flags)


if __name__ == "__main__":
    run()
