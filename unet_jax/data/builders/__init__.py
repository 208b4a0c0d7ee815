"""The retinal TFDS builders; importing this registers `drive`, `stare`, `chase_db1`, `hrf`."""
from unet_jax.data.builders.chase_db1 import ChaseDb1
from unet_jax.data.builders.common import DataError
from unet_jax.data.builders.drive import Drive
from unet_jax.data.builders.hrf import Hrf
from unet_jax.data.builders.stare import Stare

__all__ = ["ChaseDb1", "DataError", "Drive", "Hrf", "Stare"]
