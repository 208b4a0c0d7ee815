"""The 25 zoo rows: every config builds and holds mmsegmentation's exact values."""
import pytest

from unet_jax.config_loading import load_config
from unet_jax.zoo import PUBLISHED

ROWS = sorted(PUBLISHED)
CROP = {"drive": (64, 64), "stare": (128, 128), "chase_db1": (128, 128), "hrf": (256, 256),
        "cityscapes": (512, 1024)}
STRIDE = {"drive": (42, 42), "stare": (85, 85), "chase_db1": (85, 85), "hrf": (170, 170)}
SCALE = {"drive": (584, 565), "stare": (605, 700), "chase_db1": (960, 999),
         "hrf": (2336, 3504), "cityscapes": (2048, 1024)}


def test_there_are_25_rows():
    assert len(ROWS) == 25
    assert sum(1 for d, _, _ in ROWS if d != "cityscapes") == 24


@pytest.mark.parametrize("dataset,head,loss", ROWS)
def test_row_values(dataset, head, loss):
    c = load_config(f"configs/{dataset}.py:{head},{loss}")
    assert (c.model.head, c.loss.name, c.data.name) == (head, loss, dataset)
    assert tuple(c.data.crop_size) == CROP[dataset]
    assert tuple(c.data.img_scale) == SCALE[dataset]
    assert c.train.batch_size == 16
    assert (c.train.lr, c.train.lr_min, c.train.power) == (0.01, 1e-4, 0.9)
    assert (c.train.momentum, c.train.weight_decay) == (0.9, 5e-4)
    assert c.model.base_channels == 64 and c.model.dropout_ratio == 0.1
    assert c.loss.aux_weight == 0.4 and c.loss.ce_weight == 1.0
    assert c.loss.dice_weight == 3.0 and c.loss.dice_form == "legacy"
    assert tuple(c.model.pool_scales) == (1, 2, 3, 6)
    assert tuple(c.model.dilations) == (1, 12, 24, 36)
    assert tuple(c.data.ratio_range) == (0.5, 2.0) and c.data.cat_max_ratio == 0.75
    assert tuple(c.data.mean) == (123.675, 116.28, 103.53)
    assert tuple(c.data.std) == (58.395, 57.12, 57.375)
    if dataset == "cityscapes":
        assert c.model.num_classes == 19 and len(c.data.classes) == 19
        assert c.eval.mode == "whole" and c.eval.metric == "mIoU"
        assert (c.train.num_steps, c.train.eval_every) == (160000, 16000)
    else:
        assert c.model.num_classes == 2 and tuple(c.data.classes) == ("background", "vessel")
        assert c.eval.mode == "slide" and c.eval.metric == "mDice"
        assert tuple(c.eval.crop_size) == CROP[dataset]
        assert tuple(c.eval.stride) == STRIDE[dataset]
        assert (c.train.num_steps, c.train.eval_every) == (40000, 4000)
    for field in ("model.head", "model.base_channels", "model.num_classes", "loss.name",
                  "train.num_steps", "train.batch_size", "train.eval_every",
                  "train.checkpoint_every", "train.seed", "train.lr", "data.name",
                  "data.manual_dir", "data.tfds_data_dir", "data.crop_size", "eval.mode",
                  "eval.crop_size", "eval.stride", "eval.tta", "eval.max_images", "init_from"):
        node = c
        for part in field.split("."):
            node = node[part]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown part 'unet'.*expected a head"):
        load_config("configs/drive.py:unet")
    with pytest.raises(ValueError, match="no zoo row pspnet,ce.*available: fcn,ce"):
        load_config("configs/cityscapes.py:pspnet")


def test_overrides():
    c = load_config("configs/hrf.py:deeplabv3,ce_dice", {"model.base_channels": 8})
    assert c.model.base_channels == 8 and c.model.head == "deeplabv3"
