"""UNet-S5-D16 on HRF (256x256 crops, slide 256/170), mmsegmentation's recipe.

Run:
    python -m unet_jax.main --config configs/hrf.py:fcn,ce --workdir runs/hrf_fcn
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice.
Expected runtime: about 1 day on one A100-class GPU (40k steps, batch 16).
Expected score (mmseg published, validation split): fcn,ce mDice 88.92 (vessel Dice 79.45); ce_dice 89.64; pspnet 89.24 / 89.69; deeplabv3 89.32 / 89.56.
"""
from unet_jax.zoo import base_config


def get_config(arg: str | None = None):
    """Config of the HRF zoo row selected by `arg` ("<head>,<loss>")."""
    return base_config("hrf", arg)
