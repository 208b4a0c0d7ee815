"""UNet-S5-D16 on your own folder of images and label files (no code to write).

Run (the README's walk-through, "Train on your own data": ISBI 2012 EM slices, 0 = membrane,
255 = cell, slices 20-23 for validation):
    python -m unet_jax.main --config configs/folder.py:fcn,ce,small --workdir runs/isbi \
        --config.data.root=../shared/data/ISBI2012 \
        --config.data.train_images=train/image --config.data.train_labels=train/label \
        --config.data.val_stems=20,21,22,23 \
        --config.data.classes=membrane,cell --config.data.label_values=0,255
  measured 7 min 20 s on a 2-core CPU (load 5.8-9.2; preparation and compilation included),
  mDice 79.49 (membrane Dice 68.35, cell Dice 90.64, aAcc 85.55).
Argument: "<head>,<loss>" with head in fcn | pspnet | deeplabv3 and loss in ce | ce_dice, and
optionally ",small": the CPU recipe (`recipe.cpu_small`) with 64 x 64 crops, as DRIVE's.

The folder (`data.root`) holds images and labels in sub-folders (`data.train_images`,
`data.train_labels`, `data.val_images`, `data.val_labels`; or `data.val_stems` takes those
stems of the training folders as validation), paired by stem (the name without
`data.image_suffix`, default any image file, and `data.label_suffix`, default .png). A label
file holds per pixel the value of its class: `data.label_values` in `data.classes` order, ints
(grey or palette-index PNGs; e.g. (0, 255) for black/white masks) or (R, G, B) triples
(colour-coded masks); default 0..K-1. `data.ignore_value` (-1: 255 unless 255 is a class value)
marks pixels to ignore. `data.fov_labels` (optional, 2 classes): a sub-folder of field-of-view
masks named like the labels (nonzero = inside) for the vessel metrics. `model.num_classes`
follows `data.classes`; `data.palette` (display colours) is derived when empty.
`data.sample_weights` (optional): a file under `data.root` of `stem,weight` lines, each training
image's loss weight (1 for stems not listed), e.g. less weight for roughly annotated images.

Derived from the training images when left at (0, 0) (`unet_jax.data.folder.complete_config`):
`data.image_size` and `data.img_scale` (the most common image size: the test resize is an
identity), `data.crop_size` (the short side, at most 256, a multiple of 16), `eval.crop_size`
(= the training crop) and `eval.stride` (2/3 of it: slide inference as mmseg's 64/42).
Preparation checks every pair first and lists every problem, one line each (exit code 2).
Expected runtime without ",small": the zoo's 40k steps of batch 16, hours on a GPU.
"""
from unet_jax import recipe

ROWS = [(head, loss) for head in recipe.HEADS for loss in recipe.LOSSES]


def get_config(arg=None):
    """The folder dataset with the zoo's recipe (or ",small": the CPU recipe)."""
    arg, small = recipe.take_word(arg, "small")
    head, loss = recipe.parse_arg(arg, ROWS, "configs/folder.py")
    config = recipe.unet_s5_d16(head, loss)
    config.model.num_classes = 2           # follows data.classes (set when checked)
    config.train.num_steps = 40_000
    config.train.eval_every = 4_000
    config.train.checkpoint_every = 4_000
    config.data.name = "folder"
    config.data.manual_dir = ""            # unused: data.root holds the files
    config.data.root = ""
    config.data.train_images = "images/train"
    config.data.train_labels = "labels/train"
    config.data.val_images = "images/val"
    config.data.val_labels = "labels/val"
    config.data.val_stems = ()
    config.data.image_suffix = ""          # any image file
    config.data.label_suffix = ".png"
    config.data.classes = ("background", "foreground")
    config.data.palette = ()               # derived from label_values / fixed colours
    config.data.label_values = ()          # 0..K-1
    config.data.ignore_value = -1          # 255 unless 255 is a class value
    config.data.fov_labels = ""
    config.data.sample_weights = ""        # optional file of "stem,weight" lines (loss weights)
    config.data.image_size = (0, 0)        # (0, 0): derived from the images (see above)
    config.data.img_scale = (0, 0)
    config.data.crop_size = (0, 0)
    config.data.host_shard = True          # each process reads its shard of the training split
    config.eval.mode = "slide"
    config.eval.crop_size = (0, 0)
    config.eval.stride = (0, 0)
    config.eval.metric = "mDice"
    config.published = {}
    if small:
        recipe.cpu_small(config)
        config.data.crop_size = (64, 64)      # 4x cheaper than 128 on a CPU; eval slide 64/42
    return config
