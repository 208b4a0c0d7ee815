"""UNet-S5-D16 on CHASE_DB1: 128x128 crops, slide 128/85 (mmseg's 4xb4-40k_chase-db1-128x128).

Run:
    python -m unet_jax.main --config configs/chase_db1.py:fcn,ce --workdir runs/chase_fcn \
        --config.data.manual_dir=/path/to/CHASE_DB1
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice.
Expected runtime: about 12 h on one A100-class GPU (40k steps, batch 16).
Expected score (mmseg's published weights, validation = Image_11L..Image_14R): see PUBLISHED;
fcn,ce mDice 89.46 (vessel Dice 80.24).
"""
from unet_jax import recipe

# configs/unet/metafile.yaml: mDice and vessel Dice of each published row.
PUBLISHED = {
    ("fcn", "ce"): dict(mDice=89.46, Dice=80.24),
    ("fcn", "ce_dice"): dict(mDice=89.52, Dice=80.40),
    ("pspnet", "ce"): dict(mDice=89.52, Dice=80.36),
    ("pspnet", "ce_dice"): dict(mDice=89.45, Dice=80.28),
    ("deeplabv3", "ce"): dict(mDice=89.57, Dice=80.47),
    ("deeplabv3", "ce_dice"): dict(mDice=89.49, Dice=80.37),
}


def get_config(arg=None):
    """The CHASE_DB1 zoo row selected by `arg` ("<head>,<loss>")."""
    head, loss = recipe.parse_arg(arg, PUBLISHED, "configs/chase_db1.py")
    config = recipe.unet_s5_d16(head, loss)
    config.model.num_classes = 2
    config.train.num_steps = 40_000
    config.train.eval_every = 4_000
    config.train.checkpoint_every = 4_000
    config.data.name = "chase_db1"
    config.data.manual_dir = "data/chase_db1"
    config.data.image_size = (960, 999)
    config.data.img_scale = (960, 999)     # the native size 960 x 999
    config.data.crop_size = (128, 128)
    config.data.classes = ("background", "vessel")
    config.data.palette = ((120, 120, 120), (6, 230, 230))
    config.data.host_shard = False
    config.eval.mode = "slide"
    config.eval.crop_size = (128, 128)
    config.eval.stride = (85, 85)          # 11 x 12 = 132 windows
    config.eval.metric = "mDice"
    config.published = PUBLISHED[head, loss]
    return config
