"""What every zoo row shares: mmseg's UNet-S5-D16, its heads, SGD + PolyLR, loss weights, augmentation.

Values are mmsegmentation 1.2.2's `configs/_base_/models/*_unet_s5-d16.py`,
`configs/_base_/schedules/schedule_40k.py` and the dataset pipelines' common transforms. The
dataset configs (`configs/<dataset>.py`) start from `unet_s5_d16(head, loss)` and write their own
values (data, crop, stride, steps, classes, metric, published score) literally; every field a
dataset must set is `None` here and `unet_jax.config.check_config` refuses a config that leaves
one unset.
"""
from __future__ import annotations

import os
from collections.abc import Collection

import ml_collections

HEADS = ("fcn", "pspnet", "deeplabv3")
# model.name: mmseg's UNet with a head, or the original 2015 U-Net (unet_jax.models.unet2015)
MODELS = ("unet_s5_d16", "unet2015")
LOSSES = ("ce", "ce_dice")
# model.upsample -> mmseg's upsample_cfg of the UNet decoder (unet_jax.models.unet):
#   bilinear: dict(type='InterpConv')  (with model.upsample_conv_first: conv_first=True)
#   nearest:  dict(type='InterpConv', upsample_cfg=dict(scale_factor=2, mode='nearest'))
#   deconv:   dict(type='DeconvModule', kernel_size=model.deconv_kernel_size)
UPSAMPLES = ("bilinear", "nearest", "deconv")
# Filled in by each dataset config.
DATASET_FIELDS = (
    "model.num_classes", "train.num_steps", "train.eval_every", "train.checkpoint_every",
    "data.name", "data.manual_dir", "data.image_size", "data.img_scale", "data.crop_size",
    "data.classes",
    "data.palette", "data.host_shard", "eval.mode", "eval.crop_size", "eval.stride",
    "eval.metric")


def _cores() -> int:
    """The CPU cores this process may use (the default number of augmentation workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_arg(arg: str | None, rows: Collection[tuple[str, str]], config_name: str,
              default_loss: str = "ce") -> tuple[str, str]:
    """Split a config argument "<head>,<loss>" (either part optional) and check it is a row.

    `rows` are the (head, loss) pairs the config offers; `config_name` names it in errors.
    """
    from unet_jax.errors import ConfigError

    head, loss = "fcn", default_loss
    for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
        if part in HEADS:
            head = part
        elif part in LOSSES:
            loss = part
        else:
            raise ConfigError(
                f"{config_name}: config argument {arg!r} has an unknown part {part!r}; expected "
                f"a head in {', '.join(HEADS)} and/or a loss in {', '.join(LOSSES)}, "
                f"e.g. 'pspnet,ce_dice'")
    if (head, loss) not in rows:
        offered = ", ".join(f"{h},{l}" for h, l in sorted(rows))
        raise ConfigError(f"{config_name} has no zoo row {head},{loss}; available: {offered}")
    return head, loss


def take_word(arg: str | None, word: str) -> tuple[str, bool]:
    """(the config argument without `word`, whether it held it): "fcn,ce_dice,small" with
    word "small" -> ("fcn,ce_dice", True). For variants of a config beside "<head>,<loss>"."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    return ",".join(p for p in parts if p != word), word in parts


def cpu_small(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU recipe of the demo and of `configs/drive.py:...,small`: base_channels 8, batch 8,
    600 SGD steps at lr 0.1 (mmseg's poly decay), evaluation and checkpoints every 200 steps.

    mmseg's rows (width 64, lr 0.01, 40k steps of batch 16) need days on a CPU, and cut to a few
    hundred steps they learn nothing; this learns vessels in minutes."""
    config.model.base_channels = 8
    config.train.update(dict(batch_size=8, lr=0.1, num_steps=600, eval_every=200,
                             checkpoint_every=200, log_every=20))
    return config


def unet_s5_d16(head: str, loss: str) -> ml_collections.ConfigDict:
    """The config of one UNet-S5-D16 zoo row without its dataset values (those are None)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        name="unet_s5_d16",      # or "unet2015": the original U-Net (head/aux/stage fields unused)
        head=head,
        base_channels=64,        # backbone width; head widths follow it (see head_channels)
        head_channels=0,         # decode-head width; 0 = follow base_channels (FCN x1, PSP/ASPP x1/4)
        num_classes=None,
        out_channels=0,          # logits per pixel: 0 = num_classes; 1 = binary (2 classes: one
                                 # sigmoid channel, sigmoid CE, foreground above eval.threshold)
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
        upsample="bilinear",     # decoder x2 upsampling (mmseg upsample_cfg): bilinear | nearest
                                 # (InterpConv: interpolation + 1x1 conv) | deconv (DeconvModule)
        upsample_conv_first=False,   # InterpConv(conv_first=True): the 1x1 conv before it
        deconv_kernel_size=4,    # DeconvModule's transposed conv: kernel (even), stride 2
        dropout_ratio=0.1,       # Dropout2d before conv_seg, both heads
        pool_scales=(1, 2, 3, 6),    # PSP head
        dilations=(1, 12, 24, 36),   # ASPP head
        aux=True,                # the auxiliary FCN head on the 1/2-resolution map
        dtype="float32",         # compute dtype: float32 (parity), bfloat16 (speed), float64
    ))
    c.loss = ml_collections.ConfigDict(dict(
        name=loss,
        ce_weight=1.0,
        dice_weight=3.0,
        dice_form="legacy",      # legacy (mmseg 0.x: trained the published weights) | v1 (1.x)
        aux_weight=0.4,
        avg_non_ignore=False,    # mmseg's CE divides by all pixels, ignored ones included
        ignore_index=255,
        class_weight=(),         # CE weight per class (mmseg class_weight); () = none; with
                                 # model.out_channels 1: one value, the foreground's pos_weight
        use_sigmoid=False,       # CE as per-channel sigmoid cross entropy (mmseg use_sigmoid)
        naive_dice=False,        # Dice (dice_form v1) as (2a + eps) / (sum p + sum t + eps)
        dice_binary_target="background",  # model.out_channels 1: mmseg 1.2.2's Dice compares
                                 # the sigmoid with class 0 (a bug, kept) | foreground (label 1)
    ))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=None,
        batch_size=16,           # global: 4 GPUs x 4 images in mmseg
        eval_every=None,
        checkpoint_every=None,
        keep_checkpoints=3,      # periodic checkpoints kept (0 = all)
        log_every=50,
        seed=0,
        lr=0.01,
        lr_min=1e-4,
        power=0.9,
        momentum=0.9,
        weight_decay=5e-4,
        num_overlays=4,          # validation images drawn as image | truth | prediction
    ))
    c.data = ml_collections.ConfigDict(dict(
        name=None,
        manual_dir=None,         # the official archives or their extracted folders
        tfds_data_dir="data/tfds",
        image_size=None,         # the dataset's images (h, w): the benchmarks' default size
        img_scale=None,          # mmseg's img_scale: (long, short)-style keep-ratio target
        crop_size=None,
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip_prob=0.5,
        photometric=True,
        mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375),
        classes=None,
        palette=None,
        host_shard=None,         # each host reads only its shard of the training split
        workers=_cores(),        # augmentation processes (0: in the training process)
    ))
    c.eval = ml_collections.ConfigDict(dict(
        mode=None,               # slide | whole
        crop_size=None,
        stride=None,
        tta=False,               # test-time augmentation (eval.tta_mode says which)
        tta_mode="mmseg",        # mmseg: tta_scales x flip | dihedral: the 8 rotations/flips
        tta_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
        threshold=0.3,           # model.out_channels 1: foreground where the sigmoid exceeds it
        batch_windows=64,        # slide windows per compiled call
        max_images=0,            # 0 = the whole validation split
        metric=None,             # the summary key that picks the best checkpoint
    ))
    c.init_from = ""             # initial weights: an mmseg .pth, a weights folder or a workdir
    c.published = ml_collections.ConfigDict()  # mmseg's published scores of this row, if any
    return c


def unet2015(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` (a dataset's zoo config) turned into the original U-Net's recipe (Ronneberger et
    al. 2015), in place: the paper's net on one grey channel, SGD with momentum 0.99 on a batch of
    one 572 tile, overlap-tile evaluation, the elastic augmentation (`data.elastic`) and the
    weighted cross-entropy (`data.weight_map`). Values marked "paper" are §2-§3.1, "release"
    the 2015 Caffe release (phseg_v5), "ours" choices the paper leaves open."""
    config.model.update(dict(
        name="unet2015",
        in_channels=1,           # paper: grey EM slices (the pipeline's channel 0)
        base_channels=64,        # paper: 64 -> 1024
        dropout_ratio=0.5,       # release: 0.5 after conv_d3b-c and conv_d4b-c
        aux=False))
    config.loss.update(dict(name="ce", aux_weight=0.0))
    # the weighted cross-entropy's map, made by the sampler per record and warped per sample
    config.data.weight_map = ml_collections.ConfigDict(dict(
        cell_class=1,            # the class whose 4-connected components are the cells
        w0=10.0,                 # paper
        sigma=5.0))              # paper ("about 5 pixels")
    config.train.update(dict(batch_size=1,   # paper: one large tile per step
                             momentum=0.99,  # paper
                             weight_decay=0.0))  # ours (release: 0.0005 is not confirmed)
    config.data.crop_size = (572, 572)       # paper, Fig. 1: the input tile
    config.data.elastic = ml_collections.ConfigDict(dict(
        grid_points=3,           # paper: coarse 3 x 3 grid
        sigma=10.0,              # paper: displacements ~ N(0, 10 px)
        max_angle=180.0,         # ours: any rotation (EM sections have no orientation)
        gain=(0.8, 1.2),         # ours: grey-value contrast
        offset=(-20.0, 20.0)))   # ours: grey-value brightness (0..255 levels)
    config.eval.update(dict(mode="overlap_tile", crop_size=(572, 572), stride=(388, 388),
                            tta_mode="dihedral"))  # paper §4 (on with eval.tta)
    config.eval.isbi = ml_collections.ConfigDict(dict(cell_class=1))  # the challenge's scores
    config.eval.metric = "v_rand"  # the challenge's ranking picks the best checkpoint
    return config
