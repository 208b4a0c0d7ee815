"""A tiny, fast config for the training tests: synthetic 64 x 64 images, base_channels 4.

`--config tests/tiny_config.py` (CLI) or `get_config()`; the prepared data go to
$UNET_JAX_TEST_TFDS (default data/tfds) unless `--config.data.tfds_data_dir` says otherwise.
"""
import os
from pathlib import Path

from unet_jax.config import load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def get_config(arg: str | None = None):
    """6 steps of batch 2 on 32 x 32 crops; logs every step, evaluates at 3 and 6."""
    config = load_config(f"{DEMO}:{arg or 'ce'}")
    config.model.base_channels = 4
    config.train.num_steps = 6
    config.train.batch_size = 2
    config.train.log_every = 1
    config.train.eval_every = 3
    config.train.checkpoint_every = 2
    config.train.num_overlays = 1
    config.train.lr = 0.01
    config.data.synthetic = dict(image_size=64, num_train=4, num_validation=2, seed=0)
    config.data.tfds_data_dir = os.environ.get("UNET_JAX_TEST_TFDS", "data/tfds")
    config.data.image_size = (64, 64)
    config.data.img_scale = (64, 64)
    config.data.crop_size = (32, 32)
    config.data.workers = 0  # in-process augmentation (tests/test_pipeline.py runs workers)
    config.eval.mode = "whole"
    config.eval.crop_size = (32, 32)
    config.eval.stride = (21, 21)
    return config
