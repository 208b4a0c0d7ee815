"""`python -m unet_jax.export`: the public command name; the command lives in `unet_jax.cli.export`."""
from unet_jax.cli.export import run

if __name__ == "__main__":
    run()
