"""UNet-S5-D16 + FCN on Cityscapes: 512x1024 crops, whole-image inference (4xb4-160k).

Run:
    python -m unet_jax.main --config configs/cityscapes.py --workdir runs/cityscapes_fcn \
        --config.data.manual_dir=/path/to/cityscapes_zips
Argument: "fcn,ce", the only Cityscapes row of the zoo.
Expected runtime: several days on 4 GPUs (160k steps, batch 16).
Expected score (mmseg's published weights, val split): mIoU 69.10; 71.05 with multi-scale + flip
TTA (--config.eval.tta=True).
"""
from unet_jax import recipe

# configs/unet/metafile.yaml.
PUBLISHED = {("fcn", "ce"): dict(mIoU=69.10, mIoU_ms_flip=71.05)}
CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32))


def get_config(arg=None):
    """The Cityscapes zoo row (`arg` may only be "fcn", "ce" or "fcn,ce")."""
    head, loss = recipe.parse_arg(arg, PUBLISHED, "configs/cityscapes.py")
    config = recipe.unet_s5_d16(head, loss)
    config.model.num_classes = 19
    config.train.num_steps = 160_000
    config.train.eval_every = 16_000
    config.train.checkpoint_every = 16_000
    config.data.name = "cityscapes"
    config.data.manual_dir = "data/cityscapes"
    config.data.image_size = (1024, 2048)
    config.data.img_scale = (2048, 1024)   # the native size 1024 x 2048
    config.data.crop_size = (512, 1024)
    config.data.classes = CLASSES
    config.data.palette = PALETTE
    config.data.host_shard = True          # 2975 images: each host reads only its shard
    config.eval.mode = "whole"
    config.eval.crop_size = (512, 1024)    # unused in whole mode
    config.eval.stride = (512, 1024)
    config.eval.metric = "mIoU"
    config.published = PUBLISHED[head, loss]
    return config
