"""UNet-S5-D16 on STARE (128x128 crops, slide 128/85), mmsegmentation's recipe.

Run:
    python -m unet_jax.main --config configs/stare.py:fcn,ce --workdir runs/stare_fcn
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice.
Expected runtime: about 12 h on one A100-class GPU (40k steps, batch 16).
Expected score (mmseg published, validation split): fcn,ce mDice 89.78 (vessel Dice 81.02); ce_dice 90.65; pspnet 89.89 / 90.72; deeplabv3 89.73 / 90.65.
"""
from unet_jax.zoo import base_config


def get_config(arg: str | None = None):
    """Config of the STARE zoo row selected by `arg` ("<head>,<loss>")."""
    return base_config("stare", arg)
