"""UNet-S5-D16 on STARE: 128x128 crops, slide inference 128/85 (mmseg's 4xb4-40k_stare-128x128).

Run:
    python -m unet_jax.main --config configs/stare.py:fcn,ce --workdir runs/stare_fcn \
        --config.data.manual_dir=/path/to/STARE
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice.
Expected runtime: about 12 h on one A100-class GPU (40k steps, batch 16).
Expected score (mmseg's published weights, validation = the last 10 images): see PUBLISHED;
fcn,ce mDice 89.78 (vessel Dice 81.02).
"""
from unet_jax import recipe

# configs/unet/metafile.yaml: mDice and vessel Dice of each published row.
PUBLISHED = {
    ("fcn", "ce"): dict(mDice=89.78, Dice=81.02),
    ("fcn", "ce_dice"): dict(mDice=90.65, Dice=82.70),
    ("pspnet", "ce"): dict(mDice=89.89, Dice=81.22),
    ("pspnet", "ce_dice"): dict(mDice=90.72, Dice=82.84),
    ("deeplabv3", "ce"): dict(mDice=89.73, Dice=80.93),
    ("deeplabv3", "ce_dice"): dict(mDice=90.65, Dice=82.71),
}


def get_config(arg=None):
    """The STARE zoo row selected by `arg` ("<head>,<loss>")."""
    head, loss = recipe.parse_arg(arg, PUBLISHED, "configs/stare.py")
    config = recipe.unet_s5_d16(head, loss)
    config.model.num_classes = 2
    config.train.num_steps = 40_000
    config.train.eval_every = 4_000
    config.train.checkpoint_every = 4_000
    config.data.name = "stare"
    config.data.manual_dir = "data/stare"
    config.data.image_size = (605, 700)
    config.data.img_scale = (605, 700)     # the native size 605 x 700
    config.data.crop_size = (128, 128)
    config.data.classes = ("background", "vessel")
    config.data.palette = ((120, 120, 120), (6, 230, 230))
    config.data.host_shard = False
    config.eval.mode = "slide"
    config.eval.crop_size = (128, 128)
    config.eval.stride = (85, 85)          # 7 x 8 = 56 windows
    config.eval.metric = "mDice"
    config.published = PUBLISHED[head, loss]
    return config
