"""Convert mmsegmentation checkpoints to unet_jax weights checkpoints, and back.

    python -m unet_jax.convert --config configs/drive.py:fcn,ce --checkpoint IN.pth --output CKPT_DIR
    python -m unet_jax.convert --to-mmseg --config configs/drive.py:fcn,ce \\
        --checkpoint CKPT_DIR --output OUT.pth

Reading needs no torch: `unet_jax.pth_reader` unpickles with a strict allowlist and never
executes code from the file. Writing a .pth (--to-mmseg) needs torch (`pip install -e .[torch]`).
Both mmseg 1.x training checkpoints and the released 0.x files (`state_dict` inside or bare,
optional `module.` prefix) are accepted; any key mismatch is reported in full.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import cli
from unet_jax.checkpoint_io import read_meta, save_weights
from unet_jax.models import build_model
from unet_jax.errors import InputError
from unet_jax.models.mmseg import extract_state_dict, load_state_dict, model_state_dict
from unet_jax.models.pth import load_pth

TORCH_HINT = ("writing a .pth needs PyTorch: install the converter extra with "
              "`pip install -e .[torch]` (or `pip install torch==2.13.0`)")


def _dataset_meta(obj: Any, config: Any) -> dict[str, Any]:
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    meta = meta if isinstance(meta, dict) else {}
    ds = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    classes = ds.get("classes", meta.get("CLASSES", tuple(config.data.classes)))
    palette = ds.get("palette", meta.get("PALETTE", [list(p) for p in config.data.palette]))
    return {"classes": [str(c) for c in classes],
            "palette": [[int(v) for v in p] for p in palette],
            "iter": int(meta["iter"]) if isinstance(meta.get("iter"), (int, np.integer)) else None,
            "layout": "mmseg-1.x" if "message_hub" in obj or "dataset_meta" in meta
            else "mmseg-0.x" if "state_dict" in obj else "bare state_dict"}


def import_mmseg(config: Any, checkpoint: str | Path, output: str | Path) -> Path:
    """Read an mmseg .pth, load it strictly into the config's model, save a weights folder."""
    obj = load_pth(checkpoint)
    sd = extract_state_dict(obj, checkpoint)
    model = build_model(config.model)
    load_state_dict(model, sd, source=str(checkpoint))
    meta = _dataset_meta(obj, config)
    meta.update(source=str(Path(checkpoint).absolute()), model=config.model.to_dict())
    return save_weights(output, model, meta)


def export_mmseg(config: Any, checkpoint: str | Path, output: str | Path) -> Path:
    """Write a weights folder (or training workdir) as a .pth that mmseg's init_model loads."""
    try:
        import torch
    except ImportError as err:
        raise InputError(f"--to-mmseg: {TORCH_HINT}") from err
    model = build_model(config.model)
    ckpt = Path(checkpoint)
    meta = read_meta(ckpt) if ckpt.is_dir() else {}
    from unet_jax.checkpoint import load_any_weights
    load_any_weights(model, ckpt)
    sd = model_state_dict(model, num_batches_tracked=int(meta.get("iter") or 0))
    state_dict = OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())
    classes = meta.get("classes", list(config.data.classes))
    palette = meta.get("palette", [list(p) for p in config.data.palette])
    out = {"meta": {"dataset_meta": {"classes": tuple(classes), "palette": palette},
                    "CLASSES": tuple(classes), "PALETTE": palette,
                    "exported_by": "unet_jax"},
           "state_dict": state_dict}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    torch.save(out, tmp)
    tmp.replace(output)
    return output


def main(config: Any, argv: list[str]) -> None:
    """Convert --checkpoint to --output in the direction --to_mmseg says."""
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if f.to_mmseg:
        out = export_mmseg(config, f.checkpoint, f.output)
    else:
        out = import_mmseg(config, f.checkpoint, f.output)
    print(f"wrote {out}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "input: mmseg .pth (or weights folder with --to_mmseg)")
    flags.DEFINE_string("output", None, "output: weights folder (or .pth with --to_mmseg)")
    flags.DEFINE_bool("to_mmseg", False, "export a unet_jax checkpoint to an mmseg .pth")
    flags.mark_flags_as_required(["checkpoint", "output"])


def run() -> None:
    """`python -m unet_jax.convert` / `unet-jax-convert`; --to-mmseg spells --to_mmseg too."""
    argv = [a.replace("--to-mmseg", "--to_mmseg") for a in sys.argv]
    cli.run(main, prog="unet_jax.convert", define_flags=_define_flags, argv=argv)


if __name__ == "__main__":
    run()
