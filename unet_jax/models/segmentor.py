"""EncoderDecoder: UNet backbone + decode head + auxiliary FCN head, built from a config.

Head widths follow `model.base_channels` as in the zoo: FCN decode head and auxiliary head
use `base_channels` channels, PSP and ASPP heads `base_channels // 4` (64 -> 64 / 16).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unet_jax.errors import ConfigError
from unet_jax.models.heads import ASPPHead, FCNHead, PSPHead
from unet_jax.models.unet import UNet
from unet_jax.models.unet2015 import UNet2015

# Compute dtypes. float64 (parameters and statistics in float64 too) needs jax_enable_x64; it is
# a reference for precision checks, not a training setting.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class EncoderDecoder(nnx.Module):
    """mmseg's EncoderDecoder without the data preprocessor: NHWC normalised input -> logits."""

    def __init__(self, backbone: UNet, decode_head: nnx.Module,
                 auxiliary_head: nnx.Module | None):
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head

    def extract_feat(self, x: jax.Array) -> list[jax.Array]:
        """Backbone maps from deepest (1/16) to shallowest (full resolution)."""
        return self.backbone(x)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """Decode logits (N, H, W, C) and auxiliary logits (N, H/2, W/2, C) or None.

        In train mode the heads' Dropout2d masks are drawn from `dropout_key`: the auxiliary
        head's from fold_in(fold_in(key, 0), 0), the decode head's from fold_in(fold_in(key, 1),
        0) (one stream per head, in the order of the heads' names).
        """
        feats = self.extract_feat(x)
        keys = [None, None]
        if dropout_key is not None:
            keys = [jax.random.fold_in(jax.random.fold_in(dropout_key, i), 0) for i in (0, 1)]
        aux = (self.auxiliary_head(feats, keys[0]) if self.auxiliary_head is not None
               else None)
        return self.decode_head(feats, keys[1]), aux

    def predict(self, x: jax.Array) -> jax.Array:
        """Decode-head logits only, as mmseg's inference (the auxiliary head is skipped)."""
        return self.decode_head(self.extract_feat(x))


class Original2015(nnx.Module):
    """The 2015 U-Net behind the segmentor's interface: `__call__` -> (logits, None) in training,
    `predict` -> logits. Its logits are smaller than the input (92 px of context each side).

    The pipeline hands every model an RGB image; a grey dataset (ISBI 2012) decodes to three
    equal channels, so with `in_channels` 1 the net reads channel 0 alone, which is the grey
    image exactly, and keeps the paper's single-channel first layer (31,030,658 parameters).
    """

    def __init__(self, net: UNet2015, in_channels: int):
        self.net = net
        self.in_channels = in_channels

    def _input(self, x: jax.Array) -> jax.Array:
        return x[..., :self.in_channels]

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None
                 ) -> tuple[jax.Array, None]:
        """Logits (N, H - 184, W - 184, C); dropout masks from `dropout_key` (None: none)."""
        return self.net(self._input(x), dropout_key), None

    def predict(self, x: jax.Array) -> jax.Array:
        """Logits without dropout (N, H - 184, W - 184, C)."""
        return self.net(self._input(x))


def head_channels(head: str, base_channels: int) -> int:
    """Decode-head width for a backbone width: FCN = base, PSP/ASPP = base // 4."""
    return base_channels if head == "fcn" else max(base_channels // 4, 1)


def output_channels(model_cfg: Any) -> int:
    """The logits per pixel of `config.model`: num_classes, or 1 for a binary model (one
    sigmoid channel; mmseg's decode head `out_channels=1`)."""
    return int(model_cfg.get("out_channels", 0) or model_cfg.num_classes)


def build_model(model_cfg: Any, *, rngs: nnx.Rngs | None = None, seed: int = 0
                ) -> EncoderDecoder | Original2015:
    """Build the segmentor described by `config.model` (see `unet_jax.recipe`): mmseg's UNet
    with its heads, or with `model.name` "unet2015" the original U-Net."""
    rngs = rngs if rngs is not None else nnx.Rngs(params=seed)
    m = model_cfg
    dtype = DTYPES[m.dtype]
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError(
            "model.dtype 'float64' needs 64-bit JAX: call jax.config.update('jax_enable_x64', "
            "True) (or set JAX_ENABLE_X64=1) before building the model; with jax_enable_x64 off "
            "JAX silently computes float64 arrays in float32")
    if m.get("name", "unet_s5_d16") == "unet2015":
        net = UNet2015(m.in_channels, m.num_classes, dropout_rate=m.dropout_ratio,
                       base_channels=m.base_channels, dtype=dtype, rngs=rngs)
        return Original2015(net, m.in_channels)
    base = m.base_channels
    backbone = UNet(
        in_channels=m.in_channels, base_channels=base, num_stages=m.num_stages,
        strides=tuple(m.strides), enc_num_convs=tuple(m.enc_num_convs),
        dec_num_convs=tuple(m.dec_num_convs), downsamples=tuple(m.downsamples),
        enc_dilations=tuple(m.enc_dilations), dec_dilations=tuple(m.dec_dilations),
        with_cp=m.with_cp, norm_eval=m.norm_eval, upsample=m.upsample,
        upsample_conv_first=m.upsample_conv_first, deconv_kernel_size=m.deconv_kernel_size,
        dtype=dtype, rngs=rngs)
    channels = m.head_channels or head_channels(m.head, base)
    out = output_channels(m)
    decode_index = m.num_stages - 1
    common = dict(in_index=decode_index, dropout_ratio=m.dropout_ratio, dtype=dtype, rngs=rngs)
    if m.head == "fcn":
        decode = FCNHead(base, channels, out, num_convs=1, concat_input=False,
                         **common)
    elif m.head == "pspnet":
        decode = PSPHead(base, channels, out, pool_scales=tuple(m.pool_scales),
                         **common)
    else:
        decode = ASPPHead(base, channels, out, dilations=tuple(m.dilations), **common)
    aux = None
    if m.aux:
        aux = FCNHead(base * 2, base, out, in_index=decode_index - 1, num_convs=1,
                      concat_input=False, dropout_ratio=m.dropout_ratio, dtype=dtype, rngs=rngs)
    return EncoderDecoder(backbone, decode, aux)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameter values (BatchNorm running statistics excluded)."""
    state = nnx.state(model, nnx.Param)
    return sum(int(v.size) for v in jax.tree_util.tree_leaves(state))
