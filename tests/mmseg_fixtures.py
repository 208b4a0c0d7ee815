"""Build the tiny-width fixture models of ../shared/fixtures/mmseg/models with their weights."""
from __future__ import annotations

from pathlib import Path

from unet_jax.models import build_model
from unet_jax.models.mmseg import extract_state_dict, load_state_dict
from unet_jax.models.pth import load_pth
from unet_jax.config import load_config

# fixture name -> (dataset, head)
MODELS = {"fcn_drive": ("drive", "fcn"), "pspnet_drive": ("drive", "pspnet"),
          "deeplabv3_drive": ("drive", "deeplabv3"), "fcn_cityscapes": ("cityscapes", "fcn")}


def tiny_config(dataset: str, arg: str):
    """The zoo config with the fixtures' widths: base 8, FCN head 8, PSP/ASPP head 4."""
    config = load_config(f"configs/{dataset}.py:{arg}")
    config.model.base_channels = 8
    config.model.head_channels = 8 if config.model.head == "fcn" else 4
    return config


def tiny_model(fixtures: Path, name: str, pth_suffix: str = "", arg_suffix: str = "",
               dtype: str = "float32"):
    """(config, eval-mode model) loaded from models/<name><pth_suffix>.pth.

    `dtype` is the model's compute dtype; "float64" (float64 parameters) needs jax_enable_x64.
    """
    dataset, head = MODELS[name]
    config = tiny_config(dataset, head + arg_suffix)
    config.model.dtype = dtype
    model = build_model(config.model)
    load_state_dict(model, extract_state_dict(load_pth(fixtures / "models" / f"{name}{pth_suffix}.pth")))
    model.eval()
    return config, model
