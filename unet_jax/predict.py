"""`python -m unet_jax.predict`: the public command name; the command lives in `unet_jax.cli.predict`."""
from unet_jax.cli.predict import run

if __name__ == "__main__":
    run()
