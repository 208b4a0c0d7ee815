"""`python -m unet_jax.browse`: the public command name; the command lives in `unet_jax.cli.browse`."""
from unet_jax.cli.browse import run

if __name__ == "__main__":
    run()
