"""UNet-S5-D16 on DRIVE: 64x64 crops, slide inference 64/42 (mmseg's 4xb4-40k_drive-64x64).

Run:
    python -m unet_jax.main --config configs/drive.py:fcn,ce --workdir runs/drive_fcn \
        --config.data.manual_dir=/path/to/DRIVE
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice, and
optionally ",small": the CPU recipe (`recipe.cpu_small`, the demo's):
    python -m unet_jax.main --config configs/drive.py:fcn,ce_dice,small --workdir runs/drive_small \
        --config.data.manual_dir=/path/to/DRIVE
  measured 4 min 3 s on a 2-core CPU (load 1.5-3; preparation and compilation included),
  vessel Dice 69.95, mDice 83.65.
Expected runtime: about 10 h on one A100-class GPU (40k steps, batch 16); days on a CPU.
Expected score (mmseg's published weights, validation = the 20 test images): see PUBLISHED;
fcn,ce mDice 88.38 (vessel Dice 78.67).
"""
from unet_jax import recipe

# configs/unet/metafile.yaml: mDice and vessel Dice of each published row.
PUBLISHED = {
    ("fcn", "ce"): dict(mDice=88.38, Dice=78.67),
    ("fcn", "ce_dice"): dict(mDice=88.71, Dice=79.32),
    ("pspnet", "ce"): dict(mDice=88.35, Dice=78.62),
    ("pspnet", "ce_dice"): dict(mDice=88.76, Dice=79.42),
    ("deeplabv3", "ce"): dict(mDice=88.38, Dice=78.69),
    ("deeplabv3", "ce_dice"): dict(mDice=88.84, Dice=79.56),
}


def get_config(arg=None):
    """The DRIVE zoo row selected by `arg` ("<head>,<loss>")."""
    arg, small = recipe.take_word(arg, "small")
    head, loss = recipe.parse_arg(arg, PUBLISHED, "configs/drive.py")
    config = recipe.unet_s5_d16(head, loss)
    config.model.num_classes = 2
    config.train.num_steps = 40_000
    config.train.eval_every = 4_000
    config.train.checkpoint_every = 4_000
    config.data.name = "drive"
    config.data.manual_dir = "data/drive"
    config.data.image_size = (584, 565)
    config.data.img_scale = (584, 565)     # the native size: the test resize is an identity
    config.data.crop_size = (64, 64)
    config.data.classes = ("background", "vessel")
    config.data.palette = ((120, 120, 120), (6, 230, 230))
    config.data.host_shard = False         # 20 images: every host caches all of them
    config.eval.mode = "slide"
    config.eval.crop_size = (64, 64)
    config.eval.stride = (42, 42)          # 14 x 13 = 182 windows per 584 x 565 image
    config.eval.metric = "mDice"
    config.published = PUBLISHED[head, loss]
    if small:  # no published score applies
        recipe.cpu_small(config)
        config.published = {}
    return config

