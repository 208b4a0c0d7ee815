"""UNet-S5-D16 on DRIVE (64x64 crops, slide 64/42), mmsegmentation's recipe.

Run:
    python -m unet_jax.main --config configs/drive.py:fcn,ce --workdir runs/drive_fcn
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice.
Expected runtime: about 10 h on one A100-class GPU (40k steps, batch 16); days on CPU.
Expected score (mmseg published, validation split): fcn,ce mDice 88.38 (vessel Dice 78.67); ce_dice 88.71; pspnet 88.35 / 88.76; deeplabv3 88.38 / 88.84.
"""
from unet_jax.zoo import base_config


def get_config(arg: str | None = None):
    """Config of the DRIVE zoo row selected by `arg` ("<head>,<loss>")."""
    return base_config("drive", arg)
