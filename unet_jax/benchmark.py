"""`python -m unet_jax.benchmark`: the public command name; the command lives in `unet_jax.cli.benchmark`."""
from unet_jax.cli.benchmark import run

if __name__ == "__main__":
    run()
