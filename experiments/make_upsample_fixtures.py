"""mmseg 1.2.2's UNet with each decoder upsampling option unet_jax offers (`model.upsample`,
`model.upsample_conv_first`, `model.deconv_kernel_size`), on a small fixed input, into
`tests/data/mmseg_upsample_<option>.pth` (its state_dict) and `tests/data/mmseg_upsample.npz`
(the input and its outputs; read by `tests/test_upsample_options.py`).

CI has no mmseg, so the real modules run here once and their outputs are committed. Regenerate
with the reference venv (`../shared/tools/mmseg_ref/README.md`), from the repository root:

    bash ../shared/tools/mmseg_ref/setup.sh /tmp/mmseg-ref-venv
    /tmp/mmseg-ref-venv/bin/python experiments/make_upsample_fixtures.py

Each option builds mmseg's own `UNet` backbone (base_channels 2, 3 stages: small enough for a
committed state_dict of ~35 KB) and the zoo's FCN decode head (1 conv, 2 channels, 2 classes)
from the registry, with seeded random weights and BatchNorm running statistics (so that eval mode
uses non-trivial ones), and runs them in eval mode on one 1x3x16x16 input: in float64 (the
reference) and in float32; the file keeps the float64 backbone maps and logits (rounded to
float32) and the largest float32-vs-float64 difference of each, from which the test derives its
tolerance.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared/tools/mmseg_ref"))
import mmcv_ext_shim  # noqa: E402,F401  (lets mmseg.models import without mmcv's compiled ops)
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

register_all_modules()

DATA = Path(__file__).resolve().parents[1] / "tests/data"
BASE, STAGES, CLASSES = 2, 3, 2

# option name: (mmseg upsample_cfg, our model.* overrides)
OPTIONS = {
    "bilinear": (dict(type="InterpConv"), dict(upsample="bilinear")),
    "bilinear_conv_first": (dict(type="InterpConv", conv_first=True),
                            dict(upsample="bilinear", upsample_conv_first=True)),
    "nearest": (dict(type="InterpConv", upsample_cfg=dict(scale_factor=2, mode="nearest")),
                dict(upsample="nearest")),
    "nearest_conv_first": (dict(type="InterpConv", conv_first=True,
                                upsample_cfg=dict(scale_factor=2, mode="nearest")),
                           dict(upsample="nearest", upsample_conv_first=True)),
    "deconv": (dict(type="DeconvModule"), dict(upsample="deconv")),
    "deconv_k2": (dict(type="DeconvModule", kernel_size=2),
                  dict(upsample="deconv", deconv_kernel_size=2)),
}


def build(upsample_cfg: dict, seed: int) -> torch.nn.Module:
    """mmseg's UNet + FCN head (as `backbone`, `decode_head`), seeded random weights, eval mode."""
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.backbone = MODELS.build(dict(
        type="UNet", in_channels=3, base_channels=BASE, num_stages=STAGES, strides=(1,) * STAGES,
        enc_num_convs=(2,) * STAGES, dec_num_convs=(2,) * (STAGES - 1),
        downsamples=(True,) * (STAGES - 1), enc_dilations=(1,) * STAGES,
        dec_dilations=(1,) * (STAGES - 1), norm_cfg=dict(type="BN"),
        upsample_cfg=upsample_cfg))
    model.decode_head = MODELS.build(dict(
        type="FCNHead", in_channels=BASE, in_index=STAGES - 1, channels=BASE, num_convs=1,
        concat_input=False, dropout_ratio=0.1, num_classes=CLASSES, norm_cfg=dict(type="BN"),
        align_corners=False))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t) * (0.5 if name.endswith("weight") else 0.1))
    return model.eval()


def run(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """Backbone maps (deepest first) and the decode head's logits, NCHW."""
    with torch.no_grad():
        feats = model.backbone(x)
        return [f.numpy() for f in feats] + [model.decode_head(feats).numpy()]


def main() -> None:
    x = np.random.default_rng(20240517).normal(0.0, 1.0, (1, 3, 16, 16))
    arrays, meta = {"x": x.astype(np.float32)}, {}
    for i, (name, (cfg, ours)) in enumerate(OPTIONS.items()):
        model = build(cfg, seed=i)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(sd, DATA / f"mmseg_upsample_{name}.pth")
        out32 = run(model, torch.from_numpy(x.astype(np.float32)))
        out64 = run(model.double(), torch.from_numpy(x))
        errs = [float(np.abs(a - b).max()) for a, b in zip(out32, out64)]
        for j, ref in enumerate(out64):
            arrays[f"{name}/out{j}"] = ref.astype(np.float32)  # rounding: <= 1/2 ulp
        meta[name] = dict(mmseg_cfg=cfg, ours=ours, errs=errs,
                          scales=[float(np.abs(r).max()) for r in out64])
        print(name, [o.shape for o in out64], "f32-f64:", errs)
    arrays["meta"] = np.array(json.dumps(dict(options=meta, stages=STAGES, base=BASE)))
    np.savez_compressed(DATA / "mmseg_upsample.npz", **arrays)


if __name__ == "__main__":
    main()
