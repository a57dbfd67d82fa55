"""jaxmetric: deep metric learning in JAX/Flax.

The core needs only JAX: ``distances``, ``masks``, ``mining`` and ``losses``. Training,
data and evaluation modules (``models``, ``data``, ``train``, ``evaluate``,
``visualize``) are imported on demand and need the optional extras.
"""

from jaxmetric import distances, losses, masks, mining
from jaxmetric.losses import contrastive_loss, triplet_loss

__version__ = "0.1.0"
__all__ = ["distances", "losses", "masks", "mining", "contrastive_loss", "triplet_loss"]
