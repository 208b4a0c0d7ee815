"""The original U-Net (Ronneberger et al. 2015) on ISBI 2012 EM segmentation: the paper's recipe.

Run (accelerator; the paper's net and tile):
    python -m unet_jax.main --config configs/isbi2012.py --workdir runs/isbi2012
  or on these 2 CPU cores, the same pipeline sized down (argument "cpu"):
    python -m unet_jax.main --config configs/isbi2012.py:cpu --workdir runs/isbi2012_cpu
  CPU measured on 2026-12-03 (this command, records already prepared, compilation cache off;
  2-core AMD EPYC, quiet: load 1.4-2.4): 4 min 37 s wall for 700 steps, compilation and the
  final evaluation included. Scores on slices 20-23 at step 700 (no TTA), each at its best
  threshold on P(cell): pixel error 0.0924 (threshold 0.1), Rand error 0.556 (0.6), V_rand
  0.714 (0.6), V_info 0.855 (0.6); at the argmax mDice 66.55 (membrane 56.26, cell 76.85), aAcc
  69.72. With --mode eval --config.eval.tta=True (36 s): pixel error 0.0911, Rand error 0.527,
  V_rand 0.734, V_info 0.871, mDice 66.26. The same run with 2000 steps (12 min 17 s) scored no
  better on the challenge's metrics (pixel error 0.1087, Rand error 0.551, V_rand 0.686, V_info
  0.854; mDice 68.77), so 700 stays. An earlier run at load 4.7-11.9 on an Intel Xeon took 15
  min 4 s (pixel error 0.0927, V_rand 0.694; initial weights drawn before the up-convolution
  became layers.ConvTranspose). A few hundred steps of a 16-wide net: far from the paper's
  Table 1 (pixel error 0.0611, Rand error 0.0382).
  Accelerator: not measured here (no GPU). Expected: 10 h on a 6 GB Titan in the paper (§5).

Data: the folder dataset (`configs/folder.py`) on `data.root` = ../shared/data/ISBI2012 (relative
to the directory the command runs in: the repo root; pass --config.data.root=/abs/path for
another place): train/image and train/label, 512 x 512 grey PNGs of slices 0-23, label 0 =
membrane, 255 = cell; slices 20-23 are the validation split (the end of the stack: neighbouring
slices overlap, a random split would leak). Scores: the challenge's pixel error, Rand error,
V_rand and V_info on P(cell) at the best of the thresholds 0.0..0.9 (`eval.isbi`); the best
checkpoint is picked by V_rand.

Choices, each with its source ("paper" = §2-§4 of arXiv 1505.04597, "release-derived" = the 2015
Caffe release as ported by third parties, "ours" = what the paper leaves open; see
../shared/docs/research/original_unet.md and `recipe.unet2015` for the recipe's own):
  - net: unpadded 64 -> 1024, 1x1 classifier, 2 classes (paper); dropout 0.5 at the ends of
    levels 3 and 4 (release-derived);
  - tile 572 -> 388, batch 1, SGD momentum 0.99 (paper); weight decay 0 (ours);
  - weighted CE with w0 = 10, sigma = 5 px (paper); w_c = class balance (ours, see recipe);
  - elastic 3x3 grid, std 10 px (paper); any rotation, flips, grey gain 0.8-1.2 and offset
    +-20 (ours);
  - lr 0.002 with poly decay (power 0.9) to 1e-4 (ours: the paper gives none; with momentum
    0.99 the effective step is 100 lr on the pixel-mean loss; on the cpu net lr 0.01 collapsed
    to "all membrane" within 200 steps (training accuracy 22 %), 0.05 diverged; not tried at
    full width);
  - 20,000 steps (ours: the paper trains 10 h on a Titan; at ~1 TFLOP per 572 step that is
    of the order of 10^4-10^5 steps), evaluation and checkpoints every 1,000;
  - evaluation: overlap-tile with 700 -> 516 tiles (one tile covers a 512 slice, ours; tile
    size does not change the result beyond float rounding), mirrored context (paper);
    `--config.eval.tta=True` averages the 8 rotations/flips (paper §4: "averaged over 7 rotated
    versions"), off during training evaluations to keep them cheap (ours).
"cpu" (ours throughout): base_channels 16 (a quarter of the width, 1/16 of the FLOPs), training
tiles 316 -> 132 (valid sides are 60 + 16 b, b >= 8: 188, 204, ..., 572; measured at load 9:
252 -> 68 takes 0.75 s a step, 380 -> 196 2.4 s, so 316 is the compromise between pixels per
second and steps), the same lr, CPU_STEPS steps, one evaluation at the end.
"""
import importlib.util
import pathlib

from unet_jax import recipe


def _folder_config(arg: str):
    """configs/folder.py's get_config (loaded by path: configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "configs_folder", pathlib.Path(__file__).with_name("folder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)

ROOT = "../shared/data/ISBI2012"
CPU_STEPS = 700


def get_config(arg=None):
    """ISBI 2012 through the folder dataset with `recipe.unet2015`; arg "cpu": sized for 2 cores."""
    arg, cpu = recipe.take_word(arg, "cpu")
    if arg:
        raise ValueError(f"configs/isbi2012.py: unknown argument {arg!r} (expected none or 'cpu')")
    config = _folder_config("fcn,ce")
    config.data.update(dict(
        root=ROOT, train_images="train/image", train_labels="train/label",
        val_stems=(20, 21, 22, 23), classes=("membrane", "cell"), label_values=(0, 255),
        image_size=(512, 512), img_scale=(512, 512)))
    config.model.num_classes = 2
    recipe.unet2015(config)
    config.train.update(dict(lr=0.002, lr_min=1e-4, power=0.9, num_steps=20_000,
                             eval_every=1_000, checkpoint_every=1_000, log_every=50))
    config.eval.update(dict(crop_size=(700, 700), stride=(516, 516), batch_windows=1))
    if cpu:
        config.model.base_channels = 16
        config.data.crop_size = (316, 316)
        config.train.update(dict(num_steps=CPU_STEPS, eval_every=CPU_STEPS,
                                 checkpoint_every=350, log_every=50))
    return config
