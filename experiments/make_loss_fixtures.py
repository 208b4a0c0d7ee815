"""mmseg 1.2.2's loss values and logit gradients for every loss option unet_jax offers, on
small fixed random inputs, into `tests/data/mmseg_loss_options.npz` (read by
`tests/test_loss_options.py`).

CI has no mmseg, so the real losses run here once and their outputs are committed. Regenerate with
the reference venv (`../shared/tools/mmseg_ref/README.md`), from the repository root:

    bash ../shared/tools/mmseg_ref/setup.sh /tmp/mmseg-ref-venv
    /tmp/mmseg-ref-venv/bin/python experiments/make_loss_fixtures.py

Each case calls mmseg's own loss module as `BaseDecodeHead.loss_by_feat` does
(`loss(logits, label, weight=w, ignore_index=255)`) on NCHW logits, in float64 (the reference the
test compares against) and in float32; the file keeps the float64 value, the gradient (rounded
to float32) and the largest float32-vs-float64 difference of each, from which the test derives
its tolerance.

The per-sample weight `w` (one value per image) goes in as mmseg's loss functions take a weight:
broadcast over the pixels (N, H, W) for the cross-entropies, as it is (N,) for Dice.

The `head_*` cases run `BaseDecodeHead.loss_by_feat` itself on logits at a lower resolution than
the labels (resize, ignore_index 255, the loss list summed), against `losses.segmentation_loss`.

One case has no mmseg reference: softmax CE with `class_weight` on labels holding ignored pixels.
mmseg 1.2.2 raises IndexError there (it looks up `class_weight[255]` to build its denominator),
with or without `avg_non_ignore`; its reference is torch's own `F.cross_entropy(weight=...,
reduction='mean')` (ignored pixels weigh 0 in the denominator), which unet_jax implements.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared/tools/mmseg_ref"))
import mmcv_ext_shim  # noqa: E402,F401  (lets mmseg.models import without mmcv's compiled ops)
from mmseg.models.losses import CrossEntropyLoss, DiceLoss  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

register_all_modules()  # the decode head builds its losses from the registry

OUT = Path(__file__).resolve().parents[1] / "tests/data/mmseg_loss_options.npz"
N, H, W = 2, 4, 5     # W differs from every channel count (mmseg's BCE pos_weight broadcasts on W)
IGNORE = 255


def inputs() -> dict[str, np.ndarray]:
    """Logits (NHWC, float64) for 3, 2 and 1 channels, labels with and without ignored pixels,
    per-sample weights."""
    rng = np.random.default_rng(20240516)
    out = {}
    for c in (3, 2, 1):
        out[f"logits{c}"] = rng.normal(0.0, 2.0, (N, H, W, c))
    labels3 = rng.integers(0, 3, (N, H, W))
    out["labels3"] = labels3
    out["labels3_ignore"] = np.where(rng.random((N, H, W)) < 0.2, IGNORE, labels3)
    labels2 = rng.integers(0, 2, (N, H, W))
    out["labels2"] = labels2
    out["labels2_ignore"] = np.where(rng.random((N, H, W)) < 0.2, IGNORE, labels2)
    out["sample_weight"] = np.array([0.25, 1.5])
    for c in (3, 1):  # decode-head logits at a lower resolution than the labels
        out[f"logits{c}_half"] = rng.normal(0.0, 2.0, (N, H // 2 + 1, W // 2 + 1, c))
    return out


# name: (loss module kwargs, logits key, labels key, per-sample weight?, our options)
# `ours` are the keyword arguments of the unet_jax function named by `fn`.
CASES = {
    "ce":                 ("ce", dict(), "logits3", "labels3_ignore", False),
    "ce_avg_non_ignore":  ("ce", dict(avg_non_ignore=True), "logits3", "labels3_ignore", False),
    "ce_class_weight":    ("ce", dict(class_weight=[0.5, 1.0, 3.0]), "logits3", "labels3", False),
    "ce_class_weight_avg": ("ce", dict(class_weight=[0.5, 1.0, 3.0], avg_non_ignore=True),
                            "logits3", "labels3", False),
    "ce_class_weight_ignore": ("torch_ce", dict(class_weight=[0.5, 1.0, 3.0]),
                               "logits3", "labels3_ignore", False),
    "ce_weight":          ("ce", dict(), "logits3", "labels3_ignore", True),
    "ce_weight_avg":      ("ce", dict(avg_non_ignore=True), "logits3", "labels3_ignore", True),
    "ce_class_weight_weight": ("ce", dict(class_weight=[0.5, 1.0, 3.0]), "logits3", "labels3",
                               True),
    "ce_binary":          ("ce", dict(class_weight=[1.0, 4.0]), "logits2", "labels2", False),
    "bce3":               ("bce", dict(), "logits3", "labels3_ignore", False),
    "bce3_avg":           ("bce", dict(avg_non_ignore=True), "logits3", "labels3_ignore", False),
    "bce3_weight":        ("bce", dict(), "logits3", "labels3_ignore", True),
    "bce2":               ("bce", dict(), "logits2", "labels2_ignore", False),
    "bce1":               ("bce", dict(), "logits1", "labels2_ignore", False),
    "bce1_avg":           ("bce", dict(avg_non_ignore=True), "logits1", "labels2_ignore", False),
    "bce1_pos_weight":    ("bce", dict(class_weight=[2.5]), "logits1", "labels2_ignore", False),
    "bce1_pos_weight_avg": ("bce", dict(class_weight=[2.5], avg_non_ignore=True),
                            "logits1", "labels2_ignore", False),
    "bce1_weight":        ("bce", dict(), "logits1", "labels2_ignore", True),
    "dice":               ("dice", dict(), "logits3", "labels3_ignore", False),
    "dice_naive":         ("dice", dict(naive_dice=True), "logits3", "labels3_ignore", False),
    "dice_weight":        ("dice", dict(), "logits3", "labels3_ignore", True),
    "dice_naive_weight":  ("dice", dict(naive_dice=True), "logits3", "labels3_ignore", True),
    "dice2":              ("dice", dict(), "logits2", "labels2_ignore", False),
    "dice1":              ("dice", dict(), "logits1", "labels2_ignore", False),
    "dice1_naive":        ("dice", dict(naive_dice=True), "logits1", "labels2_ignore", False),
    # BaseDecodeHead.loss_by_feat: logits resized (bilinear) to the labels, every loss summed;
    # "ours" are the config.loss fields of the same objective, "head" mmseg's decode-head args.
    "head_softmax": ("head", dict(
        head=dict(num_classes=3, loss_decode=[
            dict(type="CrossEntropyLoss", class_weight=[0.5, 1.0, 3.0], avg_non_ignore=True),
            dict(type="DiceLoss", naive_dice=True, loss_weight=3.0, loss_name="loss_dice")]),
        ours=dict(name="ce_dice", class_weight=[0.5, 1.0, 3.0], avg_non_ignore=True,
                  dice_form="v1", naive_dice=True)), "logits3_half", "labels3", False),
    "head_sigmoid": ("head", dict(
        head=dict(num_classes=3, loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=True,
                                                  avg_non_ignore=True)),
        ours=dict(name="ce", use_sigmoid=True, avg_non_ignore=True)),
        "logits3_half", "labels3_ignore", False),
    "head_binary": ("head", dict(
        head=dict(num_classes=2, out_channels=1, threshold=0.3, loss_decode=[
            dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[2.5]),
            dict(type="DiceLoss", loss_weight=3.0, loss_name="loss_dice")]),
        ours=dict(name="ce_dice", class_weight=[2.5], dice_form="v1")),
        "logits1_half", "labels2_ignore", False),
}


def mmseg_loss(kind: str, opts: dict, logits: torch.Tensor, labels: torch.Tensor,
               weight: torch.Tensor | None) -> torch.Tensor:
    """One loss of mmseg as its decode head calls it (NCHW logits, (N, H, W) int64 labels)."""
    if kind == "head":  # the sum of the decode head's losses (its acc_seg is only logged)
        from mmengine.structures import PixelData
        from mmseg.models.decode_heads import FCNHead
        from mmseg.structures import SegDataSample
        head = FCNHead(in_channels=4, channels=4, num_convs=1, concat_input=False,
                       **opts["head"])
        samples = [SegDataSample(gt_sem_seg=PixelData(data=y[None])) for y in labels]
        terms = head.loss_by_feat(logits, samples)
        return sum(v for k, v in terms.items() if k.startswith("loss"))
    if kind == "dice":
        return DiceLoss(**opts)(logits, labels, weight=weight, ignore_index=IGNORE)
    if weight is not None:
        weight = weight[:, None, None].expand(labels.shape)
    if kind == "torch_ce":  # mmseg raises here; torch's own weighted mean is the reference
        cw = torch.tensor(opts["class_weight"], dtype=logits.dtype)
        return F.cross_entropy(logits, labels, weight=cw, ignore_index=IGNORE)
    loss = CrossEntropyLoss(use_sigmoid=kind == "bce", **opts)
    return loss(logits, labels, weight=weight, ignore_index=IGNORE)


def run_case(kind, opts, logits, labels, weight, dtype):
    x = torch.tensor(logits.transpose(0, 3, 1, 2), dtype=dtype, requires_grad=True)
    y = torch.tensor(labels, dtype=torch.int64)
    w = None if weight is None else torch.tensor(weight, dtype=dtype)
    value = mmseg_loss(kind, opts, x, y, w)
    value.backward()
    return value.item(), x.grad.numpy().transpose(0, 2, 3, 1).astype(np.float64)


def main() -> None:
    data = inputs()
    out = {k: v for k, v in data.items()}
    values, value_errs, grads, grad_errs, meta = [], [], [], [], {}
    for name, (kind, opts, lk, yk, weighted) in CASES.items():
        weight = data["sample_weight"] if weighted else None
        v64, g64 = run_case(kind, opts, data[lk], data[yk], weight, torch.float64)
        v32, g32 = run_case(kind, opts, data[lk].astype(np.float32), data[yk],
                            None if weight is None else weight.astype(np.float32), torch.float32)
        values.append(v64)
        value_errs.append(abs(v32 - v64))
        grads.append(g64.astype(np.float32).ravel())  # storage rounding: half a float32 ulp
        grad_errs.append(np.max(np.abs(g32 - g64)))
        meta[name] = dict(kind=kind, opts=opts, logits=lk, labels=yk, weighted=weighted)
        print(f"{name:26s} {v64: .8f}  f32 err {abs(v32 - v64):.2e} "
              f"grad err {np.max(np.abs(g32 - g64)):.2e}")
    # one array per quantity, cases in the order of meta["cases"] (per-array zip headers would
    # be most of the file); the gradients flattened one after the other.
    out.update(values=np.array(values), value_errs=np.array(value_errs),
               grads=np.concatenate(grads), grad_errs=np.array(grad_errs))
    import mmseg
    out["meta"] = np.array(json.dumps(dict(cases=meta, mmseg=mmseg.__version__,
                                           torch=torch.__version__)))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
