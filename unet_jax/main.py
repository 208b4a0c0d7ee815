"""`python -m unet_jax.main`: the public command name; the command lives in `unet_jax.cli.main`."""
from unet_jax.cli.main import run

if __name__ == "__main__":
    run()
