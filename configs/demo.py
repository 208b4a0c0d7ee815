"""The embedded default: a narrow UNet-S5-D16 + FCN on the synthetic vessel set (no download).

Run:
    python -m unet_jax.main                       # same as --config configs/demo.py
    python -m unet_jax.main --config configs/demo.py:pspnet --workdir runs/demo_psp
Argument: "<head>,<loss>" as for the zoo configs (default fcn,ce_dice). The first run builds the
synthetic set (20 train / 8 validation fundus-like 192 x 192 images) into data/tfds.
Model: base_channels 8 (the zoo uses 64), 64 x 64 crops, global batch 8, 600 SGD steps at lr 0.1
with mmseg's poly decay; whole-image evaluation every 200 steps.
Expected runtime: about 1.5-3 minutes on a 2-core CPU, data preparation and compilation
included (measured 113 s at load 1.1 with the grain workers, 146 s on a loaded machine, 74 s on
a faster 2-core AVX-512 VM).
Expected score (synthetic validation split, 8 images), seed 0: mDice 91.16, vessel Dice 83.78
(aAcc 97.30, mIoU 84.60) measured with the grain sampler; 90.50-90.80 / 83.13 on other 2-core
VMs: float32 rounding differs between CPUs and 600 steps amplify it (see
tests/test_train_step.py on ReLU gates), so expect mDice 90-92 and vessel Dice 82-84.
"""
from unet_jax import recipe

ROWS = [(head, loss) for head in recipe.HEADS for loss in recipe.LOSSES]


def get_config(arg=None):
    """The demo: synthetic data, base_channels 8, 600 steps of batch 8."""
    head, loss = recipe.parse_arg(arg, ROWS, "configs/demo.py", default_loss="ce_dice")
    config = recipe.cpu_small(recipe.unet_s5_d16(head, loss))
    config.model.num_classes = 2
    config.data.name = "synthetic"
    config.data.manual_dir = ""            # generated, nothing to download
    config.data.synthetic = dict(image_size=192, num_train=20, num_validation=8, seed=0)
    config.data.image_size = (192, 192)
    config.data.img_scale = (192, 192)
    config.data.crop_size = (64, 64)
    config.data.classes = ("background", "vessel")
    config.data.palette = ((120, 120, 120), (6, 230, 230))
    config.data.host_shard = False
    config.eval.mode = "whole"
    config.eval.crop_size = (64, 64)
    config.eval.stride = (42, 42)
    config.eval.metric = "mDice"
    return config
