"""UNet-S5-D16 on HRF: 256x256 crops, slide inference 256/170 (mmseg's 4xb4-40k_hrf-256x256).

Run:
    python -m unet_jax.main --config configs/hrf.py:fcn,ce --workdir runs/hrf_fcn \
        --config.data.manual_dir=/path/to/HRF
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice.
Expected runtime: about 1 day on one A100-class GPU (40k steps, batch 16).
Expected score (mmseg's published weights, validation = 30 images): see PUBLISHED;
fcn,ce mDice 88.92 (vessel Dice 79.45).
"""
from unet_jax import recipe

# configs/unet/metafile.yaml: mDice and vessel Dice of each published row.
PUBLISHED = {
    ("fcn", "ce"): dict(mDice=88.92, Dice=79.45),
    ("fcn", "ce_dice"): dict(mDice=89.64, Dice=80.87),
    ("pspnet", "ce"): dict(mDice=89.24, Dice=80.07),
    ("pspnet", "ce_dice"): dict(mDice=89.69, Dice=80.96),
    ("deeplabv3", "ce"): dict(mDice=89.32, Dice=80.21),
    ("deeplabv3", "ce_dice"): dict(mDice=89.56, Dice=80.71),
}


def get_config(arg=None):
    """The HRF zoo row selected by `arg` ("<head>,<loss>")."""
    head, loss = recipe.parse_arg(arg, PUBLISHED, "configs/hrf.py")
    config = recipe.unet_s5_d16(head, loss)
    config.model.num_classes = 2
    config.train.num_steps = 40_000
    config.train.eval_every = 4_000
    config.train.checkpoint_every = 4_000
    config.data.name = "hrf"
    config.data.manual_dir = "data/hrf"
    config.data.image_size = (2336, 3504)
    config.data.img_scale = (2336, 3504)   # the native size 2336 x 3504
    config.data.crop_size = (256, 256)
    config.data.classes = ("background", "vessel")
    config.data.palette = ((120, 120, 120), (6, 230, 230))
    config.data.host_shard = False
    config.eval.mode = "slide"
    config.eval.crop_size = (256, 256)
    config.eval.stride = (170, 170)        # 14 x 21 = 294 windows
    config.eval.metric = "mDice"
    config.published = PUBLISHED[head, loss]
    return config
