"""UNet-S5-D16 on CHASE_DB1 (128x128 crops, slide 128/85), mmsegmentation's recipe.

Run:
    python -m unet_jax.main --config configs/chase_db1.py:fcn,ce --workdir runs/chase_db1_fcn
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice.
Expected runtime: about 12 h on one A100-class GPU (40k steps, batch 16).
Expected score (mmseg published, validation split): fcn,ce mDice 89.46 (vessel Dice 80.24); ce_dice 89.52; pspnet 89.52 / 89.45; deeplabv3 89.57 / 89.49.
"""
from unet_jax.zoo import base_config


def get_config(arg: str | None = None):
    """Config of the CHASE_DB1 zoo row selected by `arg` ("<head>,<loss>")."""
    return base_config("chase_db1", arg)
