"""The six command lines (`main`, `predict`, `convert`, `export`, `browse`, `benchmark`) and what
they share (`common`). `python -m unet_jax.<name>` runs `unet_jax.cli.<name>.run`."""
