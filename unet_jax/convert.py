"""`python -m unet_jax.convert`: the public command name; the command lives in `unet_jax.cli.convert`."""
from unet_jax.cli.convert import run

if __name__ == "__main__":
    run()
