"""UNet-S5-D16 on Cityscapes (512x1024 crops, whole-image inference), mmsegmentation's recipe.

Run:
    python -m unet_jax.main --config configs/cityscapes.py:fcn,ce --workdir runs/cityscapes_fcn
Argument: "<head>,<loss>" with head in fcn and loss in ce.
Expected runtime: several days on 4 GPUs (160k steps, batch 16).
Expected score (mmseg published, validation split): fcn,ce mIoU 69.10 (71.05 with multi-scale + flip TTA).
"""
from unet_jax.zoo import base_config


def get_config(arg: str | None = None):
    """Config of the Cityscapes zoo row selected by `arg` ("<head>,<loss>")."""
    return base_config("cityscapes", arg)
