"""EncoderDecoder: UNet backbone + decode head + auxiliary FCN head, built from a config.

Head widths follow `model.base_channels` as in the zoo: FCN decode head and auxiliary head
use `base_channels` channels, PSP and ASPP heads `base_channels // 4` (64 -> 64 / 16).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unet_jax.models.heads import ASPPHead, FCNHead, PSPHead
from unet_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


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

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Decode logits (N, H, W, C) and auxiliary logits (N, H/2, W/2, C) or None."""
        feats = self.extract_feat(x)
        aux = self.auxiliary_head(feats) if self.auxiliary_head is not None else None
        return self.decode_head(feats), aux

    def predict(self, x: jax.Array) -> jax.Array:
        """Decode-head logits only, as mmseg's inference (the auxiliary head is skipped)."""
        return self.decode_head(self.extract_feat(x))


def head_channels(head: str, base_channels: int) -> int:
    """Decode-head width for a backbone width: FCN = base, PSP/ASPP = base // 4."""
    return base_channels if head == "fcn" else max(base_channels // 4, 1)


def build_model(model_cfg: Any, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> EncoderDecoder:
    """Build the segmentor described by `config.model` (fields as in `unet_jax.zoo`)."""
    rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
    dtype_name = model_cfg.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, found {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    base = int(model_cfg.base_channels)
    num_stages = int(model_cfg.get("num_stages", 5))
    backbone = UNet(
        in_channels=int(model_cfg.get("in_channels", 3)), base_channels=base,
        num_stages=num_stages,
        strides=tuple(model_cfg.get("strides", (1,) * num_stages)),
        enc_num_convs=tuple(model_cfg.get("enc_num_convs", (2,) * num_stages)),
        dec_num_convs=tuple(model_cfg.get("dec_num_convs", (2,) * (num_stages - 1))),
        downsamples=tuple(model_cfg.get("downsamples", (True,) * (num_stages - 1))),
        enc_dilations=tuple(model_cfg.get("enc_dilations", (1,) * num_stages)),
        dec_dilations=tuple(model_cfg.get("dec_dilations", (1,) * (num_stages - 1))),
        with_cp=bool(model_cfg.get("with_cp", False)),
        norm_eval=bool(model_cfg.get("norm_eval", False)), dtype=dtype, rngs=rngs)
    num_classes = int(model_cfg.num_classes)
    dropout = float(model_cfg.get("dropout_ratio", 0.1))
    head = model_cfg.head
    channels = int(model_cfg.get("head_channels", 0) or head_channels(head, base))
    decode_index = num_stages - 1
    if head == "fcn":
        decode = FCNHead(base, channels, num_classes, in_index=decode_index, num_convs=1,
                         concat_input=False, dropout_ratio=dropout, dtype=dtype, rngs=rngs)
    elif head == "pspnet":
        decode = PSPHead(base, channels, num_classes, in_index=decode_index,
                         pool_scales=tuple(model_cfg.get("pool_scales", (1, 2, 3, 6))),
                         dropout_ratio=dropout, dtype=dtype, rngs=rngs)
    elif head == "deeplabv3":
        decode = ASPPHead(base, channels, num_classes, in_index=decode_index,
                          dilations=tuple(model_cfg.get("dilations", (1, 12, 24, 36))),
                          dropout_ratio=dropout, dtype=dtype, rngs=rngs)
    else:
        raise ValueError(f"model.head must be one of fcn, pspnet, deeplabv3; found {head!r}")
    aux = None
    if model_cfg.get("aux", True):
        aux = FCNHead(base * 2, base, num_classes, in_index=decode_index - 1, num_convs=1,
                      concat_input=False, dropout_ratio=dropout, dtype=dtype, rngs=rngs)
    return EncoderDecoder(backbone, decode, aux)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameter values (BatchNorm running statistics excluded)."""
    state = nnx.state(model, nnx.Param)
    return sum(int(v.size) for v in jax.tree_util.tree_leaves(state))
