"""The UNet decoder's upsampling options (mmseg's `upsample_cfg`: InterpConv bilinear or nearest,
conv_first or not, DeconvModule) against the real mmseg 1.2.2: its state_dicts and outputs,
computed by `experiments/make_upsample_fixtures.py` into `tests/data/`, go through our converter
both ways (the key map and layouts that `unet_jax.convert` uses to import and export); the config
fields; the constructor cases of mmseg's own `test_unet.py` that use them."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from unet_jax.config import check_config
from unet_jax.errors import ConfigError
from unet_jax.io.pth import load_pth
from unet_jax.models import build_model
from unet_jax.models.mmseg import (StateDictMismatchError, extract_state_dict, load_state_dict,
                                   model_state_dict)
from unet_jax.models.unet import DeconvModule, InterpConv, UNet
from unet_jax.models.layers import ConvModule, Upsample

DATA = Path(__file__).parent / "data"
FIXTURE = np.load(DATA / "mmseg_upsample.npz")
META = json.loads(str(FIXTURE["meta"]))
F32_EPS = float(np.finfo(np.float32).eps)


def _config(option: str, **extra):
    """The fixtures' model (mmseg's UNet at base 2, 3 stages, FCN head) with `option`'s fields."""
    stages = META["stages"]
    fields = {"model.base_channels": META["base"], "model.head_channels": META["base"],
              "model.num_stages": stages, "model.strides": (1,) * stages,
              "model.enc_num_convs": (2,) * stages, "model.enc_dilations": (1,) * stages,
              "model.dec_num_convs": (2,) * (stages - 1),
              "model.downsamples": (True,) * (stages - 1),
              "model.dec_dilations": (1,) * (stages - 1), "model.aux": False}
    fields.update({f"model.{k}": v for k, v in META["options"][option]["ours"].items()})
    fields.update(extra)
    return check_config(tiny_config("configs/drive.py:fcn", fields))


def _state_dict(option: str) -> dict[str, np.ndarray]:
    path = DATA / f"mmseg_upsample_{option}.pth"
    return extract_state_dict(load_pth(path), path)


def _outputs(model) -> list[np.ndarray]:
    """Backbone maps (deepest first) and decode logits, NCHW as the fixture stores them."""
    x = jnp.asarray(FIXTURE["x"].transpose(0, 2, 3, 1))
    outs = list(model.backbone(x)) + [model.predict(x)]
    return [np.asarray(o).transpose(0, 3, 1, 2) for o in outs]


def _tolerance(option: str, j: int) -> float:
    """Two float32 evaluations of the same maths differ by a few times the reference's own
    float32-vs-float64 difference; the floor (2 eps of the map's largest value) covers the
    reference's rounding to float32 in the file and maps where mmseg's float32 happened exact."""
    m = META["options"][option]
    return 4 * m["errs"][j] + 2 * F32_EPS * m["scales"][j]


@pytest.mark.parametrize("option", sorted(META["options"]))
def test_converted_mmseg_weights_give_mmseg_outputs_and_export_back(option):
    sd = _state_dict(option)
    model = build_model(_config(option).model)
    load_state_dict(model, sd, source=option)
    model.eval()
    for j, out in enumerate(_outputs(model)):
        ref = FIXTURE[f"{option}/out{j}"]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= _tolerance(option, j), (option, j)
    back = model_state_dict(model)
    assert set(back) == set(sd)
    for key, value in sd.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_options_are_told_apart():
    """Nearest weights run with bilinear upsampling (same keys: the mode has no weights) miss the
    reference by far more than the tolerance; conv_first and deconv weights do not load into the
    default model and the one-line hint names the fields."""
    model = build_model(_config("bilinear").model)
    load_state_dict(model, _state_dict("nearest"))
    model.eval()
    out = _outputs(model)[-1]
    assert np.abs(out - FIXTURE[f"nearest/out{len(out.shape) - 1}"]).max() > 100 * _tolerance(
        "nearest", 3)
    with pytest.raises(StateDictMismatchError, match="upsample_conv_first=True"):
        load_state_dict(model, _state_dict("nearest_conv_first"))
    with pytest.raises(StateDictMismatchError,
                       match="upsample=deconv --config.model.deconv_kernel_size=2") as err:
        load_state_dict(model, _state_dict("deconv_k2"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fields,message", [
    ({"model.upsample": "bicubic"}, r"model.upsample: expected one of bilinear, nearest, deconv"),
    ({"model.upsample": "deconv", "model.deconv_kernel_size": 3},
     r"model.deconv_kernel_size: expected an even kernel size >= 2"),
    ({"model.deconv_kernel_size": 0}, r"model.deconv_kernel_size: expected an integer >= 2"),
    ({"model.upsample": "deconv", "model.upsample_conv_first": True},
     r"model.upsample_conv_first: expected False with model.upsample='deconv'")])
def test_config_fields_refused_in_one_line(fields, message):
    config = tiny_config("configs/drive.py:fcn", fields)
    with pytest.raises(ConfigError, match=message) as err:
        check_config(config)
    assert "\n" not in str(err.value)


# mmseg tests/test_models/test_backbones/test_unet.py, the cases of the options above, at 4 -> 2
# channels on 8 x 8 maps (theirs: 64 -> 32 on 64..128; the shapes' rule is the same).
@pytest.mark.parametrize("kernel,scale", [(1, 2), (3, 2), (5, 4)])
def test_deconv_refuses_what_mmseg_asserts(kernel, scale):
    with pytest.raises(ConfigError, match=f"kernel_size must be >= scale_factor \\({scale}\\)"):
        DeconvModule(4, 2, kernel_size=kernel, scale_factor=scale, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kernel,scale", [(4, 2), (2, 2), (6, 2), (4, 4), (6, 4)])
def test_deconv_output_size_as_mmseg(kernel, scale):
    block = DeconvModule(4, 2, kernel_size=kernel, scale_factor=scale, rngs=nnx.Rngs(0))
    assert block(jnp.ones((1, 8, 8, 4))).shape == (1, 8 * scale, 8 * scale, 2)


def test_interp_conv_order_and_mode_as_mmseg():
    x = jnp.ones((1, 8, 8, 4))
    for conv_first, mode in ((False, "bilinear"), (True, "bilinear"), (False, "nearest")):
        block = InterpConv(4, 2, mode=mode, conv_first=conv_first, rngs=nnx.Rngs(0))
        first, second = block.interp_upsample
        assert isinstance(first, ConvModule if conv_first else Upsample)
        assert isinstance(second, Upsample if conv_first else ConvModule)
        assert block(x).shape == (1, 16, 16, 2)
        assert (second if conv_first else first).mode == mode


def test_unet_refuses_conv_first_with_deconv():
    with pytest.raises(ConfigError, match="upsample_conv_first is an InterpConv option"):
        UNet(upsample="deconv", upsample_conv_first=True, rngs=nnx.Rngs(0))
