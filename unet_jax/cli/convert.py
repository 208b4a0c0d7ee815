"""Convert mmsegmentation checkpoints to unet_jax weights folders, and back.

    python -m unet_jax.convert --config configs/drive.py:fcn,ce --checkpoint IN.pth --output CKPT_DIR
    python -m unet_jax.convert --to-mmseg --config configs/drive.py:fcn,ce \\
        --checkpoint CKPT_DIR --output OUT.pth

Reading needs no torch: `unet_jax.io.pth` unpickles with a strict allowlist and never
executes code from the file. Writing a .pth (--to-mmseg) needs torch (`pip install -e .[torch]`).
Both mmseg 1.x training checkpoints and the released 0.x files (`state_dict` inside or bare,
optional `module.` prefix) are accepted; any key mismatch is reported in full. The checkpoint of
--to-mmseg may be a weights folder, a training workdir or a step folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

from unet_jax.io import paths
from collections.abc import Collection
from typing import Any

from unet_jax.cli import common
from unet_jax.io import weights
from unet_jax.errors import InputError
from unet_jax.models import build_model


def _dataset_meta(info: dict[str, Any], config: Any) -> dict[str, Any]:
    """Classes and palette stored with the weights, else the config's."""
    return {"classes": info.get("classes") or list(config.data.classes),
            "palette": info.get("palette") or [list(p) for p in config.data.palette]}


def import_mmseg(config: Any, checkpoint: str | Path, output: str | Path) -> Path:
    """Read an mmseg .pth, load it strictly into the config's model, save a weights folder."""
    checkpoint = paths.to_path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(f"--checkpoint {checkpoint}: expected an mmseg .pth file")
    model = build_model(config.model)
    info = weights.load(model, checkpoint)
    meta = {**_dataset_meta(info, config), "source": str(checkpoint),
            "layout": info["layout"], "iter": info["iter"], "model": config.model.to_dict()}
    return weights.save(output, model, meta)


def export_mmseg(config: Any, checkpoint: str | Path, output: str | Path, *,
                 overridden: Collection[str] = ()) -> Path:
    """Write a weights folder (or training workdir) as a .pth that mmseg's init_model loads; the
    model is the one the checkpoint records (`weights.use_recorded_model`)."""
    weights.require_torch()
    weights.use_recorded_model(config, checkpoint, overridden)
    model = build_model(config.model)
    info = weights.load(model, checkpoint)
    meta = {**_dataset_meta(info, config), "iter": info.get("iter") or info.get("step")}
    return weights.export_pth(model, output, meta)


def main(config: Any, argv: list[str]) -> None:
    """Convert --checkpoint to --output in the direction --to_mmseg says."""
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if f.to_mmseg:
        from ml_collections import config_flags
        out = export_mmseg(config, f.checkpoint, f.output,
                           overridden=config_flags.get_override_values(f["config"]))
    else:
        out = import_mmseg(config, f.checkpoint, f.output)
    print(f"wrote {out}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "input: mmseg .pth (or, with --to_mmseg, a weights "
                        "folder or training workdir)")
    flags.DEFINE_string("output", None, "output: weights folder (or .pth with --to_mmseg)")
    flags.DEFINE_bool("to_mmseg", False, "export a unet_jax checkpoint to an mmseg .pth")
    flags.mark_flags_as_required(["checkpoint", "output"])


def run() -> None:
    """`python -m unet_jax.convert` / `unet-jax-convert`; --to-mmseg spells --to_mmseg too."""
    argv = [a.replace("--to-mmseg", "--to_mmseg") for a in sys.argv]
    common.run(main, prog="unet_jax.convert", define_flags=_define_flags, argv=argv)


if __name__ == "__main__":
    run()
