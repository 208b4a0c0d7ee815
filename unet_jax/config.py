"""Configs: load `configs/<name>.py[:arg]`, override dotted fields, and `check_config` at start-up.

A config is an ml_collections `ConfigDict` with the sections of `unet_jax.recipe.unet_s5_d16`
(model, loss, train, data, eval; init_from, published). Library code reads `config.a.b`
directly; `check_config` is the one place that says what each field may hold, and every entry
point calls it before preparing data or compiling anything, so a wrong value costs nothing.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from unet_jax.errors import ConfigError, UserError, one_line
from unet_jax.recipe import DATASET_FIELDS, HEADS, LOSSES, MODELS, UPSAMPLES

DATASET_NAMES = ("drive", "stare", "chase_db1", "hrf", "cityscapes", "synthetic", "folder")
# Datasets whose builder takes options from a section of `data` (unet_jax.data.loading.DATASETS).
DATASET_OPTIONS = {"synthetic": ("image_size", "num_train", "num_validation", "seed")}
DTYPE_NAMES = ("float32", "bfloat16", "float64")
SUMMARY_METRICS = ("aAcc", "mIoU", "mDice", "mAcc")
SECTIONS = ("model", "loss", "train", "data", "eval")


# ------------------------------------------------------------------------------ loading
def check_config_file(spec: str) -> Path:
    """The Python file of `spec` ("path/to/config.py[:arg]"); a `ConfigError` if it is none.

    The command lines call it before `ml_collections.config_flags` loads the file, which would
    defer a missing file into an error object and run a run's `config.json` as Python.
    """
    file = Path(str(spec).partition(":")[0])
    example = "e.g. configs/drive.py[:pspnet,ce_dice]"
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist (expected {example})")
    if file.suffix != ".py":
        raise ConfigError(f"--config {file}: not a Python config file (expected {example}; a "
                          "run's config.json is a record of a run, not a config)")
    return file


def load_config(spec: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
    """`spec` is "path/to/config.py[:arg]"; `overrides` map dotted names to values (`override`).

    What `--config` (ml_collections.config_flags) gives the command lines, for library code and
    tests, with the same override parser. Each file is loaded as a fresh module of its own name:
    config_flags loads every file into one module ("config_config"), so a config file that
    itself calls `load_config` (tests/tiny_config.py) would run inside its caller's namespace.
    """
    file = check_config_file(spec)
    arg = str(spec).partition(":")[2]
    module_spec = importlib.util.spec_from_file_location(f"unet_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"{file}: not a valid Python config file: {err}") from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file}: get_config must return an ml_collections.ConfigDict, "
                          f"found {type(config).__name__}")
    return override(config, overrides or {})


def override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
             ) -> ml_collections.ConfigDict:
    """Set the dotted fields of `overrides` in `config` (in place; returned): a string is
    parsed as `--config.<field>=<string>` would be, any other value assigned as it is."""
    for dotted, value in overrides.items():
        set_field(config, dotted, value)
    return config


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Set `config.<dotted>` to `value` (a string is parsed by config_flags as on the command
    line, unless the field holds a string)."""
    node, leaf = _parent(config, dotted)
    current = node[leaf]
    if isinstance(value, str) and not isinstance(current, str):
        _parse_override(config, dotted, value)
        return
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--config.{dotted}={value!r}: expected a value like "
                          f"{current!r} ({type(current).__name__})") from err


def _parent(config: ml_collections.ConfigDict, dotted: str
            ) -> tuple[ml_collections.ConfigDict, str]:
    """(the section holding field `dotted`, the field's name); a ConfigError naming the first
    missing part and the fields there are."""
    *parents, leaf = dotted.split(".")
    node = config
    for k, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(f"--config.{dotted}: the config has no field "
                              f"{'.'.join(parents[:k + 1])!r}")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"--config.{dotted}: the config has no field {dotted!r}"
                          + (f"; {'.'.join(parents) or 'it'} has {', '.join(fields)}"
                             if fields else ""))
    return node, leaf


def _parse_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """`--config.<dotted>=<text>` applied to `config` by ml_collections.config_flags, the parser
    of the command lines (typed by the field: tuples `(0,0,0),(200,30,30)`, booleans, ...)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["unet_jax", f"--config.{dotted}={text}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=False,
                                    sys_argv=argv)
    try:
        values(argv)
    except flags.Error as err:
        raise ConfigError(flag_error_message(err)) from err


def flag_error_message(err: BaseException, argv: Sequence[str] = ()) -> str:
    """One line for an error raised while absl/config_flags parse a command line: the message
    of a `UserError` raised inside `get_config` (config_flags wraps it with a traceback), the
    override naming a field the config lacks, else absl's own message."""
    chain, cause = [], err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in reversed(chain):
        if isinstance(cause, UserError):
            return one_line(cause)
    missing = next((c for c in chain if isinstance(c, KeyError) and c.args
                    and isinstance(c.args[0], str)), None)
    if missing is not None:  # ml_collections: KeyError("'num_stepz'\nDid you mean ...?")
        name, _, hint = missing.args[0].partition("\n")
        name = name.strip("'")
        flag = next((a.split("=")[0] for a in argv if a.startswith("-")
                     and name in a.split("=")[0].split(".")[1:]), "--config")
        return f"{flag}: the config has no field {name!r}" + (f"; {one_line(hint)}" if hint
                                                                   else "")
    return one_line(err)


# ------------------------------------------------------------------------------ checking
def _fail(field: str, expected: str, found: Any) -> ConfigError:
    return ConfigError(f"config field {field}: expected {expected}, found {found!r}")


def _int(c: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _get(c, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, "an integer", value)
    if minimum is not None and value < minimum:
        raise _fail(field, f"an integer >= {minimum}", value)
    if maximum is not None and value > maximum:
        raise _fail(field, f"an integer <= {maximum}", value)
    return value


def _float(c: Any, field: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> float:
    value = _get(c, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field, "a finite number", value)
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise _fail(field, f"a number {' and '.join(p for p in (lo, hi) if p)}", value)
    return float(value)


def _bool(c: Any, field: str) -> bool:
    value = _get(c, field)
    if not isinstance(value, bool):
        raise _fail(field, "True or False", value)
    return value


def _choice(c: Any, field: str, choices: Sequence[str]) -> str:
    value = _get(c, field)
    if value not in choices:
        raise _fail(field, f"one of {', '.join(choices)}", value)
    return value


def _str(c: Any, field: str, allow_empty: bool = True) -> str:
    value = _get(c, field)
    if not isinstance(value, str) or (not allow_empty and not value):
        raise _fail(field, "a non-empty string" if not allow_empty else "a string", value)
    return value


def _ints(c: Any, field: str, length: int | None = None, minimum: int = 1) -> tuple[int, ...]:
    value = _get(c, field)
    ok = (isinstance(value, (tuple, list)) and (length is None or len(value) == length)
          and len(value) > 0
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                  for v in value))
    if not ok:
        size = f"{length} " if length is not None else ""
        raise _fail(field, f"a tuple of {size}integers >= {minimum}", value)
    return tuple(value)


def _floats(c: Any, field: str, length: int | None = None) -> tuple[float, ...]:
    value = _get(c, field)
    ok = (isinstance(value, (tuple, list)) and (length is None or len(value) == length)
          and len(value) > 0
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in value))
    if not ok:
        raise _fail(field, f"a tuple of {length or ''} finite numbers".replace("  ", " "), value)
    return tuple(float(v) for v in value)


def _get(c: Any, field: str) -> Any:
    node = c
    for name in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(f"config field {field} is missing (every config starts from "
                              "unet_jax.recipe.unet_s5_d16; see configs/drive.py)")
        node = node[name]
    return node


def check_config(config: Any) -> ml_collections.ConfigDict:
    """Validate every field of `config` (types, ranges, enums, consistency); returns it.

    Raises one `ConfigError` naming the first bad field, what it expects and what it holds.
    A folder dataset's fields left to the data are filled first (`data.folder.complete_config`).
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config: expected an ml_collections.ConfigDict, found "
                          f"{type(config).__name__}")
    for section in SECTIONS:
        if section not in config or not isinstance(config[section], ml_collections.ConfigDict):
            raise ConfigError(f"config: expected a `{section}` section (every config starts "
                              f"from unet_jax.recipe.unet_s5_d16); found sections "
                              f"{sorted(config.keys())}")
    for field in DATASET_FIELDS:
        if _get(config, field) is None:
            raise ConfigError(f"config field {field} is not set: a dataset config must give it "
                              "(see configs/drive.py)")
    if config.data.name == "folder":
        _check_folder(config)
    _check_model(config)
    _check_loss(config)
    _check_train(config)
    _check_data(config)
    _check_eval(config)
    _str(config, "init_from")
    published = _get(config, "published")
    if not isinstance(published, (Mapping, ml_collections.ConfigDict)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in published.values()):
        raise _fail("published", "a dict of metric name -> published score", published)
    return config


def _original(c: Any) -> bool:
    """Whether the config's model is the original 2015 U-Net (`model.name` "unet2015")."""
    return c.model.get("name", "unet_s5_d16") == "unet2015"


def _tile(c: Any, field: str) -> None:
    """An input tile of the original U-Net: both sides 60 + 16 b (b >= 8), else one line
    naming the nearest valid sides."""
    from unet_jax.models.unet2015 import check_input_size

    size = _ints(c, field, 2)
    try:
        check_input_size(*size)
    except ValueError as err:
        raise ConfigError(f"config field {field}: {err}") from err


def _check_model(c: Any) -> None:
    if "name" in c.model:
        _choice(c, "model.name", MODELS)
    _choice(c, "model.head", HEADS)
    _int(c, "model.base_channels", 1)
    _int(c, "model.head_channels", 0)
    num_classes = _int(c, "model.num_classes", 2, 255)
    out_channels = _int(c, "model.out_channels", 0, 255)
    if out_channels not in (0, 1, num_classes) or (out_channels == 1 and num_classes != 2):
        raise _fail("model.out_channels", "0 (= model.num_classes), model.num_classes, or 1 "
                    "with model.num_classes=2 (binary: one sigmoid channel)", out_channels)
    if _original(c):
        if out_channels not in (0, num_classes):
            raise _fail("model.out_channels", "0 for model.name unet2015 (softmax over "
                        "model.num_classes)", out_channels)
        _int(c, "model.in_channels", 1, 3)  # 1: the grey channel of an RGB-decoded image
        if _get(c, "model.aux"):
            raise _fail("model.aux", "False for model.name unet2015 (it has no auxiliary "
                        "head)", True)
    else:
        _int(c, "model.in_channels", 3, 3)
    stages = _int(c, "model.num_stages", 2)
    for field, length in (("strides", stages), ("enc_num_convs", stages),
                          ("enc_dilations", stages), ("dec_num_convs", stages - 1),
                          ("dec_dilations", stages - 1)):
        _ints(c, f"model.{field}", length)
    if any(s not in (1, 2) for s in _get(c, "model.strides")):
        raise _fail("model.strides", "strides of 1 or 2", _get(c, "model.strides"))
    downsamples = _get(c, "model.downsamples")
    if (not isinstance(downsamples, (tuple, list)) or len(downsamples) != stages - 1
            or not all(isinstance(v, bool) for v in downsamples)):
        raise _fail("model.downsamples", f"a tuple of {stages - 1} booleans", downsamples)
    for field in ("with_cp", "norm_eval", "aux", "upsample_conv_first"):
        _bool(c, f"model.{field}")
    upsample = _choice(c, "model.upsample", UPSAMPLES)
    kernel = _int(c, "model.deconv_kernel_size", 2)
    if kernel % 2:
        raise _fail("model.deconv_kernel_size", "an even kernel size >= 2 (the transposed conv "
                    "doubles the map: stride 2, padding (kernel - 2) / 2)", kernel)
    if upsample == "deconv" and _get(c, "model.upsample_conv_first"):
        raise _fail("model.upsample_conv_first", "False with model.upsample='deconv' (conv_first "
                    "is an InterpConv option: upsample 'bilinear' or 'nearest')", True)
    _float(c, "model.dropout_ratio", 0.0, 1.0, high_open=True)
    _ints(c, "model.pool_scales")
    _ints(c, "model.dilations")
    dtype = _choice(c, "model.dtype", DTYPE_NAMES)
    if dtype == "float64":
        import jax
        if not jax.config.jax_enable_x64:
            raise ConfigError("config field model.dtype: float64 needs 64-bit JAX; set "
                              "JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True))")


def _check_loss(c: Any) -> None:
    _choice(c, "loss.name", LOSSES)
    dice_form = _choice(c, "loss.dice_form", ("legacy", "v1"))
    for field in ("ce_weight", "dice_weight", "aux_weight"):
        _float(c, f"loss.{field}", 0.0)
    _bool(c, "loss.avg_non_ignore")
    _int(c, "loss.ignore_index", 0, 255)
    _choice(c, "loss.dice_binary_target", ("background", "foreground"))
    # One channel (binary) is always the sigmoid CE and the v1 Dice (a softmax over one channel
    # is 1 everywhere), whatever loss.use_sigmoid and loss.dice_form say; commands that take a
    # binary checkpoint then work with the config file the model was trained from.
    binary = _get(c, "model.out_channels") == 1
    sigmoid = _bool(c, "loss.use_sigmoid") or binary
    if _bool(c, "loss.naive_dice") and dice_form == "legacy" and not binary:
        raise _fail("loss.naive_dice", "False with loss.dice_form='legacy' (mmseg's legacy Dice "
                    "has no naive form; set --config.loss.dice_form=v1)", True)
    weights = _get(c, "loss.class_weight")
    if weights is None or (isinstance(weights, (tuple, list)) and len(weights) == 0):
        return
    if sigmoid and not binary:
        raise _fail("loss.class_weight", "() with loss.use_sigmoid and one channel per class "
                    "(mmseg applies it as BCE pos_weight broadcast over the image width: an "
                    "error or wrong weights); use model.out_channels=1 and one value", weights)
    length = 1 if sigmoid else _get(c, "model.num_classes")
    what = ("one value (the foreground's pos_weight)" if sigmoid
            else f"{length} values, one per class (model.num_classes)")
    if (not isinstance(weights, (tuple, list)) or len(weights) != length or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
            and w >= 0 for w in weights) or not any(w > 0 for w in weights)):
        raise _fail("loss.class_weight", f"() or {what}, finite, >= 0, not all 0", weights)


def _check_train(c: Any) -> None:
    _int(c, "train.num_steps", 1)
    _int(c, "train.batch_size", 1)
    for field in ("eval_every", "checkpoint_every", "keep_checkpoints", "log_every",
                  "seed", "num_overlays"):
        _int(c, f"train.{field}", 0)
    if _get(c, "train.keep_checkpoints") == 1:  # the newest may lead into a divergence
        raise _fail("train.keep_checkpoints", "0 (all) or at least 2", 1)
    lr = _float(c, "train.lr", 0.0, low_open=True)
    _float(c, "train.lr_min", 0.0, lr)
    _float(c, "train.power", 0.0, low_open=True)
    _float(c, "train.momentum", 0.0, 1.0, high_open=True)
    _float(c, "train.weight_decay", 0.0)


def _rate(c: Any) -> int:
    rate = 1
    strides, downsamples = _get(c, "model.strides"), _get(c, "model.downsamples")
    for i in range(1, len(strides)):
        if strides[i] == 2 or downsamples[i - 1]:
            rate *= 2
    return rate


def _check_data(c: Any) -> None:
    _choice(c, "data.name", DATASET_NAMES)
    _str(c, "data.manual_dir")
    _str(c, "data.tfds_data_dir", allow_empty=False)
    _ints(c, "data.image_size", 2)
    _ints(c, "data.img_scale", 2)
    crop = _ints(c, "data.crop_size", 2)
    rate = _rate(c)
    if _original(c):
        _tile(c, "data.crop_size")
    elif crop[0] % rate or crop[1] % rate:
        raise _fail("data.crop_size", f"training crop sides that are multiples of the UNet's "
                    f"downsample rate {rate}", crop)
    lo, hi = _floats(c, "data.ratio_range", 2)
    if not 0 < lo <= hi:
        raise _fail("data.ratio_range", "(low, high) with 0 < low <= high", (lo, hi))
    _float(c, "data.cat_max_ratio", 0.0, 1.0, low_open=True)
    _float(c, "data.flip_prob", 0.0, 1.0)
    _bool(c, "data.photometric")
    _floats(c, "data.mean", 3)
    if any(s <= 0 for s in _floats(c, "data.std", 3)):
        raise _fail("data.std", "3 positive numbers", _get(c, "data.std"))
    classes = _get(c, "data.classes")
    num_classes = _get(c, "model.num_classes")
    if (not isinstance(classes, (tuple, list)) or len(classes) != num_classes
            or not all(isinstance(n, str) and n for n in classes)):
        raise _fail("data.classes", f"{num_classes} class names (model.num_classes)", classes)
    palette = _get(c, "data.palette")
    if (not isinstance(palette, (tuple, list)) or len(palette) != num_classes or not all(
            isinstance(p, (tuple, list)) and len(p) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in p) for p in palette)):
        raise _fail("data.palette", f"{num_classes} RGB colours of 0..255", palette)
    _bool(c, "data.host_shard")
    _int(c, "data.workers", 0)
    if "weight_map" in c.data:  # the original U-Net's weighted cross-entropy (optional section)
        if not _original(c) or _get(c, "loss.name") != "ce" or "elastic" not in c.data:
            raise _fail("data.weight_map", "a section only with model.name unet2015, loss.name "
                        "ce and a data.elastic section", dict(c.data.weight_map))
        _int(c, "data.weight_map.cell_class", 0, _get(c, "model.num_classes") - 1)
        _float(c, "data.weight_map.w0", 0.0)
        _float(c, "data.weight_map.sigma", 0.0, low_open=True)
    if "elastic" in c.data:  # the original U-Net's augmentation (optional section)
        _int(c, "data.elastic.grid_points", 2)
        _float(c, "data.elastic.sigma", 0.0)
        _float(c, "data.elastic.max_angle", 0.0, 180.0)
        for field in ("gain", "offset"):
            lo, hi = _floats(c, f"data.elastic.{field}", 2)
            if lo > hi or (field == "gain" and lo <= 0):
                raise _fail(f"data.elastic.{field}", "(low, high) with low <= high"
                            + (" and low > 0" if field == "gain" else ""), (lo, hi))
    name = c.data.name
    for key in DATASET_OPTIONS.get(name, ()):
        _int(c, f"data.{name}.{key}", 0 if key == "seed" else 1)


def _check_folder(c: Any) -> None:
    """The folder dataset's own fields, then what `configs/folder.py` leaves to the data."""
    _str(c, "data.root", allow_empty=False)  # a local folder or a bucket URL (copied locally)
    for field in ("train_images", "train_labels", "val_images", "val_labels", "image_suffix",
                  "label_suffix", "fov_labels"):
        _str(c, f"data.{field}")
    if _str(c, "data.sample_weights") and c.data.get("weight_map") is not None:
        raise _fail("data.sample_weights", "empty with data.weight_map (the original U-Net's "
                    "weighted loss takes no per-sample weight)", c.data.sample_weights)
    for field in ("train_images", "train_labels"):
        _str(c, f"data.{field}", allow_empty=False)
    stems = _get(c, "data.val_stems")
    if not isinstance(stems, (tuple, list)) or not all(
            isinstance(s, (str, int)) and not isinstance(s, bool) for s in stems):
        raise _fail("data.val_stems", "a tuple of file stems, e.g. ('20', '21')", stems)
    if not stems:
        _str(c, "data.val_images", allow_empty=False)
        _str(c, "data.val_labels", allow_empty=False)
    classes = _get(c, "data.classes")
    if (not isinstance(classes, (tuple, list)) or len(classes) < 2
            or not all(isinstance(n, str) and n for n in classes)):
        raise _fail("data.classes", "2 or more class names", classes)
    values = _get(c, "data.label_values")
    ints = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535
               for v in values) if isinstance(values, (tuple, list)) else False
    rgbs = isinstance(values, (tuple, list)) and all(
        isinstance(v, (tuple, list)) and len(v) == 3
        and all(isinstance(x, int) and 0 <= x <= 255 for x in v) for v in values)
    if not (ints or rgbs) or (values and len(values) != len(classes)) or len(
            {tuple(v) if isinstance(v, (tuple, list)) else v for v in values}) != len(values):
        raise _fail("data.label_values", f"{len(classes)} distinct class values (data.classes), "
                    "each an int (grey or palette index) or an (R, G, B) triple", values)
    _int(c, "data.ignore_value", -1, 65535)
    if c.data.fov_labels and len(classes) != 2:
        raise _fail("data.fov_labels", "no field-of-view masks unless there are 2 classes "
                    "(background, foreground: the vessel metrics)", c.data.fov_labels)
    for field in ("data.image_size", "data.img_scale", "data.crop_size", "eval.crop_size",
                  "eval.stride"):
        _ints(c, field, 2, minimum=0)  # (0, 0): derived from the images
    from unet_jax.data import folder  # pylint: disable=import-outside-toplevel  # reads files
    folder.complete_config(c)


def _check_eval(c: Any) -> None:
    # the original U-Net's output is smaller than its input: overlap-tile inference only
    mode = _choice(c, "eval.mode", ("overlap_tile",) if _original(c) else ("slide", "whole"))
    _ints(c, "eval.crop_size", 2)
    if mode == "overlap_tile":
        _tile(c, "eval.crop_size")  # the input tile; its output tile is 184 px smaller
    _ints(c, "eval.stride", 2)
    _bool(c, "eval.tta")
    if "tta_mode" in c.eval:
        _choice(c, "eval.tta_mode", ("mmseg", "dihedral"))
    if "isbi" in c.eval:  # the ISBI 2012 challenge's metrics of P(cell class) (optional)
        _int(c, "eval.isbi.cell_class", 0, _get(c, "model.num_classes") - 1)
    scales = _floats(c, "eval.tta_scales")
    if any(s <= 0 for s in scales):
        raise _fail("eval.tta_scales", "positive scale factors", scales)
    _float(c, "eval.threshold", 0.0, 1.0, low_open=True, high_open=True)
    _int(c, "eval.batch_windows", 1)
    _int(c, "eval.max_images", 0)
    _choice(c, "eval.metric", SUMMARY_METRICS + (("v_rand",) if "isbi" in c.eval else ()))
