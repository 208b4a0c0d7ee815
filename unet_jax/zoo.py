"""The mmsegmentation UNet-S5-D16 model zoo as data: dataset constants and published scores.

Values come from mmsegmentation 1.2.2's `configs/_base_/datasets/*.py`, `configs/unet/*.py` and
`configs/unet/metafile.yaml` (spec §0, §5, §6.1, §8). Config files build on `base_config`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

HEADS = ("fcn", "pspnet", "deeplabv3")
LOSSES = ("ce", "ce_dice")

RETINAL_CLASSES = ("background", "vessel")
RETINAL_PALETTE = ((120, 120, 120), (6, 230, 230))
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# name: img_scale (w-like, h-like tuple as in mmseg), crop (h, w), slide stride (h, w), steps,
# eval interval, native image size (h, w), classes, palette, metric.
DATASETS: dict[str, dict[str, Any]] = {
    "drive": dict(img_scale=(584, 565), crop=(64, 64), stride=(42, 42), steps=40000,
                  eval_every=4000, image_size=(584, 565), mode="slide"),
    "stare": dict(img_scale=(605, 700), crop=(128, 128), stride=(85, 85), steps=40000,
                  eval_every=4000, image_size=(605, 700), mode="slide"),
    "chase_db1": dict(img_scale=(960, 999), crop=(128, 128), stride=(85, 85), steps=40000,
                      eval_every=4000, image_size=(960, 999), mode="slide"),
    "hrf": dict(img_scale=(2336, 3504), crop=(256, 256), stride=(170, 170), steps=40000,
                eval_every=4000, image_size=(2336, 3504), mode="slide"),
    # The no-download demo set of `unet_jax.data.synthetic` (192 x 192 fundus-like images).
    "synthetic": dict(img_scale=(192, 192), crop=(64, 64), stride=(42, 42), steps=2000,
                      eval_every=500, image_size=(192, 192), mode="slide"),
    "cityscapes": dict(img_scale=(2048, 1024), crop=(512, 1024), stride=(512, 1024),
                       steps=160000, eval_every=16000, image_size=(1024, 2048), mode="whole"),
}

# Published scores of configs/unet/metafile.yaml: (mDice, vessel Dice) for the retinal rows,
# (mIoU, mIoU ms+flip) for Cityscapes. Keyed by (dataset, head, loss).
PUBLISHED: dict[tuple[str, str, str], tuple[float, float]] = {
    ("drive", "fcn", "ce"): (88.38, 78.67), ("drive", "fcn", "ce_dice"): (88.71, 79.32),
    ("drive", "pspnet", "ce"): (88.35, 78.62), ("drive", "pspnet", "ce_dice"): (88.76, 79.42),
    ("drive", "deeplabv3", "ce"): (88.38, 78.69), ("drive", "deeplabv3", "ce_dice"): (88.84, 79.56),
    ("stare", "fcn", "ce"): (89.78, 81.02), ("stare", "fcn", "ce_dice"): (90.65, 82.70),
    ("stare", "pspnet", "ce"): (89.89, 81.22), ("stare", "pspnet", "ce_dice"): (90.72, 82.84),
    ("stare", "deeplabv3", "ce"): (89.73, 80.93), ("stare", "deeplabv3", "ce_dice"): (90.65, 82.71),
    ("chase_db1", "fcn", "ce"): (89.46, 80.24), ("chase_db1", "fcn", "ce_dice"): (89.52, 80.40),
    ("chase_db1", "pspnet", "ce"): (89.52, 80.36), ("chase_db1", "pspnet", "ce_dice"): (89.45, 80.28),
    ("chase_db1", "deeplabv3", "ce"): (89.57, 80.47),
    ("chase_db1", "deeplabv3", "ce_dice"): (89.49, 80.37),
    ("hrf", "fcn", "ce"): (88.92, 79.45), ("hrf", "fcn", "ce_dice"): (89.64, 80.87),
    ("hrf", "pspnet", "ce"): (89.24, 80.07), ("hrf", "pspnet", "ce_dice"): (89.69, 80.96),
    ("hrf", "deeplabv3", "ce"): (89.32, 80.21), ("hrf", "deeplabv3", "ce_dice"): (89.56, 80.71),
    ("cityscapes", "fcn", "ce"): (69.10, 71.05),
}


_REQUIRED = object()


def cfg_get(node: Any, name: str, default: Any = _REQUIRED) -> Any:
    """`node.name` for a ConfigDict, dict or object; `default` if absent (KeyError if none given)."""
    has = name in node if isinstance(node, Mapping) else hasattr(node, name)
    if has:
        return node[name] if isinstance(node, Mapping) else getattr(node, name)
    if default is _REQUIRED:
        raise KeyError(f"config has no field {name!r}")
    return default


def parse_arg(arg: str | None, dataset: str) -> tuple[str, str]:
    """Split a config argument "<head>,<loss>" (either part optional) and validate it."""
    head, loss = "fcn", "ce"
    for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
        if part in HEADS:
            head = part
        elif part in LOSSES:
            loss = part
        else:
            raise ValueError(
                f"config argument {arg!r}: unknown part {part!r}; expected a head in {HEADS} "
                f"and/or a loss in {LOSSES}, e.g. 'pspnet,ce_dice'")
    if (dataset, head, loss) not in PUBLISHED and dataset != "synthetic":
        rows = sorted(f"{h},{l}" for d, h, l in PUBLISHED if d == dataset)
        raise ValueError(
            f"configs/{dataset}.py has no zoo row {head},{loss}; available: {', '.join(rows)}")
    return head, loss


def base_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
    """The full config of one zoo row with mmseg's exact values (global batch 16, SGD, poly)."""
    head, loss = parse_arg(arg, dataset)
    ds = DATASETS[dataset]
    is_city = dataset == "cityscapes"
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        head=head,
        base_channels=64,        # backbone width; head channels follow (see models/segmentor.py)
        head_channels=0,         # decode-head width; 0 = follow base_channels (FCN x1, PSP/ASPP x1/4)
        num_classes=19 if is_city else 2,
        in_channels=3,
        num_stages=5,
        strides=(1, 1, 1, 1, 1),
        enc_num_convs=(2, 2, 2, 2, 2),
        dec_num_convs=(2, 2, 2, 2),
        downsamples=(True, True, True, True),
        enc_dilations=(1, 1, 1, 1, 1),
        dec_dilations=(1, 1, 1, 1),
        with_cp=False,           # activation checkpointing (memory only, same maths)
        norm_eval=False,         # freeze backbone BatchNorm statistics during training
        dropout_ratio=0.1,
        pool_scales=(1, 2, 3, 6),
        dilations=(1, 12, 24, 36),
        aux=True,
        dtype="float32",         # compute dtype: float32 (parity) or bfloat16 (speed)
    ))
    c.loss = ml_collections.ConfigDict(dict(
        name=loss,
        ce_weight=1.0,
        dice_weight=3.0,
        dice_form="legacy",      # legacy (0.x, trained the published weights) | v1 (mmseg 1.x)
        aux_weight=0.4,
        avg_non_ignore=False,
        ignore_index=255,
    ))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=ds["steps"],
        batch_size=16,           # global: 4 GPUs x 4 images in mmseg
        eval_every=ds["eval_every"],
        checkpoint_every=ds["eval_every"],
        keep_checkpoints=3,
        log_every=50,
        seed=0,
        lr=0.01,
        lr_min=1e-4,
        power=0.9,
        momentum=0.9,
        weight_decay=5e-4,
        num_overlays=4,
    ))
    c.data = ml_collections.ConfigDict(dict(
        name=dataset,
        manual_dir=f"data/{dataset}",
        tfds_data_dir="data/tfds",
        img_scale=ds["img_scale"],
        crop_size=ds["crop"],
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip_prob=0.5,
        photometric=True,
        mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375),
        classes=CITYSCAPES_CLASSES if is_city else RETINAL_CLASSES,
        palette=CITYSCAPES_PALETTE if is_city else RETINAL_PALETTE,
        # Each host reads only its shard of the training split (batches then depend on the
        # number of hosts). Off for the small retinal sets: every host caches all 15-30 images
        # and a run gives the same batches on any number of hosts.
        host_shard=is_city,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        mode=ds["mode"],
        crop_size=ds["crop"],
        stride=ds["stride"],
        tta=False,
        tta_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
        batch_windows=64,        # slide windows per compiled call
        max_images=0,            # 0 = the whole validation split
        metric="mIoU" if is_city else "mDice",
    ))
    c.init_from = ""
    return c
