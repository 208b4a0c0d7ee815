"""The 25 zoo rows hold mmsegmentation's exact values; check_config names every bad field."""
import importlib.util

import pytest

from conftest import REPO
from unet_jax.config import check_config, check_config_file, load_config, override, set_field
from unet_jax.errors import ConfigError

DATASETS = ("drive", "stare", "chase_db1", "hrf", "cityscapes")
CROP = {"drive": (64, 64), "stare": (128, 128), "chase_db1": (128, 128), "hrf": (256, 256),
        "cityscapes": (512, 1024)}
STRIDE = {"drive": (42, 42), "stare": (85, 85), "chase_db1": (85, 85), "hrf": (170, 170),
          "cityscapes": (512, 1024)}
SCALE = {"drive": (584, 565), "stare": (605, 700), "chase_db1": (960, 999),
         "hrf": (2336, 3504), "cityscapes": (2048, 1024)}
# mmseg's configs/unet/metafile.yaml: a few rows spelled out again.
SOME_PUBLISHED = {("drive", "fcn", "ce"): {"mDice": 88.38, "Dice": 78.67},
                  ("stare", "pspnet", "ce_dice"): {"mDice": 90.72, "Dice": 82.84},
                  ("chase_db1", "deeplabv3", "ce"): {"mDice": 89.57, "Dice": 80.47},
                  ("hrf", "deeplabv3", "ce_dice"): {"mDice": 89.56, "Dice": 80.71},
                  ("cityscapes", "fcn", "ce"): {"mIoU": 69.10, "mIoU_ms_flip": 71.05}}


def _rows():
    rows = []
    for dataset in DATASETS:
        spec = importlib.util.spec_from_file_location(dataset, REPO / "configs" / f"{dataset}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rows += [(dataset, head, loss) for head, loss in module.PUBLISHED]
    return sorted(rows)


ROWS = _rows()


def test_there_are_25_rows():
    assert len(ROWS) == 25
    assert sum(1 for d, _, _ in ROWS if d != "cityscapes") == 24
    assert {(h, l) for d, h, l in ROWS if d == "drive"} == {
        (h, l) for h in ("fcn", "pspnet", "deeplabv3") for l in ("ce", "ce_dice")}


@pytest.mark.parametrize("dataset,head,loss", ROWS)
def test_row_values(dataset, head, loss):
    c = check_config(load_config(f"configs/{dataset}.py:{head},{loss}"))
    assert (c.model.head, c.loss.name, c.data.name) == (head, loss, dataset)
    assert tuple(c.data.crop_size) == CROP[dataset]
    assert tuple(c.data.img_scale) == SCALE[dataset]
    assert tuple(c.eval.crop_size) == CROP[dataset] and tuple(c.eval.stride) == STRIDE[dataset]
    assert c.train.batch_size == 16
    assert (c.train.lr, c.train.lr_min, c.train.power) == (0.01, 1e-4, 0.9)
    assert (c.train.momentum, c.train.weight_decay) == (0.9, 5e-4)
    assert c.model.base_channels == 64 and c.model.dropout_ratio == 0.1
    assert c.model.head_channels == 0 and c.model.aux and c.model.dtype == "float32"
    assert c.loss.aux_weight == 0.4 and c.loss.ce_weight == 1.0
    assert c.loss.dice_weight == 3.0 and c.loss.dice_form == "legacy"
    assert not c.loss.avg_non_ignore and c.loss.ignore_index == 255
    assert tuple(c.model.pool_scales) == (1, 2, 3, 6)
    assert tuple(c.model.dilations) == (1, 12, 24, 36)
    assert tuple(c.data.ratio_range) == (0.5, 2.0) and c.data.cat_max_ratio == 0.75
    assert c.data.flip_prob == 0.5 and c.data.photometric
    assert tuple(c.data.mean) == (123.675, 116.28, 103.53)
    assert tuple(c.data.std) == (58.395, 57.12, 57.375)
    assert tuple(c.eval.tta_scales) == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and not c.eval.tta
    if dataset == "cityscapes":
        assert c.model.num_classes == 19 and len(c.data.classes) == 19
        assert c.data.classes[0] == "road" and tuple(c.data.palette[0]) == (128, 64, 128)
        assert c.eval.mode == "whole" and c.eval.metric == "mIoU" and c.data.host_shard
        assert (c.train.num_steps, c.train.eval_every) == (160000, 16000)
        assert set(c.published) == {"mIoU", "mIoU_ms_flip"}
    else:
        assert c.model.num_classes == 2 and tuple(c.data.classes) == ("background", "vessel")
        assert [tuple(p) for p in c.data.palette] == [(120, 120, 120), (6, 230, 230)]
        assert c.eval.mode == "slide" and c.eval.metric == "mDice" and not c.data.host_shard
        assert (c.train.num_steps, c.train.eval_every) == (40000, 4000)
        assert set(c.published) == {"mDice", "Dice"}
        assert 88 < c.published["mDice"] < 91 and 78 < c.published["Dice"] < 83
    assert c.train.checkpoint_every == c.train.eval_every
    if (dataset, head, loss) in SOME_PUBLISHED:
        assert dict(c.published) == SOME_PUBLISHED[dataset, head, loss]


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="unknown part 'unet'.*expected a head"):
        load_config("configs/drive.py:unet")
    with pytest.raises(ConfigError, match="no zoo row pspnet,ce.*available: fcn,ce"):
        load_config("configs/cityscapes.py:pspnet")
    with pytest.raises(ConfigError, match="nowhere.py does not exist"):
        load_config("configs/nowhere.py")


def test_overrides_are_parsed_and_typed():
    """Strings are parsed by ml_collections.config_flags as on the command line, typed by the
    field; other values are assigned as they are."""
    c = load_config("configs/hrf.py:deeplabv3,ce_dice",
                    {"model.base_channels": "8", "data.crop_size": "(32, 32)",
                     "eval.tta": "True", "data.manual_dir": "123", "train.lr": "1",
                     "data.palette": "((0,0,0),(200,30,30))", "eval.stride": "21,21",
                     "model.dropout_ratio": 0.25})
    assert c.model.base_channels == 8 and c.model.head == "deeplabv3"
    assert tuple(c.data.crop_size) == (32, 32) and c.eval.tta is True
    assert c.data.manual_dir == "123" and c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.data.palette == ((0, 0, 0), (200, 30, 30)) and c.eval.stride == (21, 21)
    assert c.model.dropout_ratio == 0.25
    override(c, {"eval.tta": "false", "data.crop_size": [64, 64]})
    assert c.eval.tta is False and c.data.crop_size == (64, 64)
    with pytest.raises(ConfigError, match="no field 'train.num_stepz'; train has .*num_steps"):
        set_field(c, "train.num_stepz", 3)
    with pytest.raises(ConfigError, match="no field 'trainz'"):
        set_field(c, "trainz.num_steps", "3")
    with pytest.raises(ConfigError, match="base_channels=wide: invalid literal for int"):
        set_field(c, "model.base_channels", "wide")
    with pytest.raises(ConfigError, match="eval.tta=yes"):
        set_field(c, "eval.tta", "yes")
    with pytest.raises(ConfigError, match="expected a value like 8 \\(int\\)"):
        set_field(c, "model.base_channels", (8,))


def test_a_config_file_must_be_python(tmp_path):
    record = tmp_path / "config.json"
    record.write_text("{}\n")
    with pytest.raises(ConfigError, match="config.json: not a Python config file"):
        load_config(str(record))
    with pytest.raises(ConfigError, match="nowhere.py does not exist"):
        check_config_file("configs/nowhere.py:fcn")
    assert check_config_file("configs/drive.py:fcn").name == "drive.py"


@pytest.mark.parametrize("field,value,message", [
    ("eval.mode", "foo", "eval.mode: expected one of slide, whole, found 'foo'"),
    ("train.lr", -0.1, "train.lr: expected a number > 0.0"),
    ("train.lr_min", 0.5, "train.lr_min: expected a number >= 0.0 and <= 0.01"),
    ("model.base_channels", 0, "model.base_channels: expected an integer >= 1"),
    ("data.crop_size", (60, 64), "data.crop_size: expected training crop sides that are "
     "multiples of the UNet's downsample rate 16"),
    ("train.batch_size", 0, "train.batch_size: expected an integer >= 1"),
    ("loss.name", "focal", "loss.name: expected one of ce, ce_dice"),
    ("loss.dice_form", "v2", "loss.dice_form: expected one of legacy, v1"),
    ("model.head", "unet", "model.head: expected one of fcn, pspnet, deeplabv3"),
    ("model.dtype", "float16", "model.dtype: expected one of float32, bfloat16, float64"),
    ("eval.stride", (0, 42), "eval.stride: expected a tuple of 2 integers >= 1"),
    ("eval.metric", "Dice", "eval.metric: expected one of aAcc, mIoU, mDice, mAcc"),
    ("data.palette", ((1, 2, 3),), "data.palette: expected 2 RGB colours"),
    ("model.dec_num_convs", (2, 2, 2), "model.dec_num_convs: expected a tuple of 4 integers"),
    ("train.momentum", 1.0, "train.momentum: expected a number >= 0.0 and < 1.0"),
    ("data.ratio_range", (2.0, 0.5), "data.ratio_range: expected (low, high)"),
    ("train.keep_checkpoints", 1, "train.keep_checkpoints: expected 0 (all) or at least 2"),
])
def test_check_config_names_the_bad_field(field, value, message):
    c = load_config("configs/drive.py")
    check_config(c)  # the row itself is valid
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError) as err:
        check_config(c)
    assert message in str(err.value)


def test_unset_dataset_field_is_refused():
    from unet_jax import recipe
    c = recipe.unet_s5_d16("fcn", "ce")
    with pytest.raises(ConfigError, match="model.num_classes is not set"):
        check_config(c)


def test_demo_and_test_configs_are_valid():
    for spec in ("configs/demo.py", "configs/demo.py:pspnet", "tests/tiny_config.py"):
        c = check_config(load_config(str(REPO / spec)))
        assert c.data.name == "synthetic" and not c.published


def test_drive_small_is_the_zoo_row_with_the_cpu_recipe():
    """`configs/drive.py:<head>,<loss>,small` changes width, lr, batch and schedule only."""
    row = check_config(load_config(f"{REPO}/configs/drive.py:pspnet,ce_dice"))
    small = check_config(load_config(f"{REPO}/configs/drive.py:pspnet,ce_dice,small"))
    assert (small.model.head, small.loss.name) == ("pspnet", "ce_dice")
    assert (small.model.base_channels, small.train.lr, small.train.batch_size,
            small.train.num_steps, small.train.eval_every) == (8, 0.1, 8, 600, 200)
    changed = {f"{section}.{key}" for section in ("model", "loss", "train", "data", "eval")
               for key in row[section] if row[section][key] != small[section][key]}
    assert changed == {"model.base_channels", "train.lr", "train.batch_size", "train.num_steps",
                       "train.eval_every", "train.checkpoint_every", "train.log_every"}
    assert not small.published and row.published
