"""jaxmetric: deep metric learning in JAX/Flax.

The core needs only JAX and is imported with the package: :mod:`~jaxmetric.distances`,
:mod:`~jaxmetric.mining` (the triplet selection and the lecture's masks) and the
:mod:`~jaxmetric.losses` package. The other packages are imported on demand and need
the optional extras: :mod:`~jaxmetric.models` (Flax networks), :mod:`~jaxmetric.data`
(CIFAR-10, image folders, tfds), :mod:`~jaxmetric.train` (data-parallel training),
:mod:`~jaxmetric.evaluate` (FAISS retrieval metrics) and :mod:`~jaxmetric.report`
(re-evaluation, pictures and ``report.md``).
"""

from jaxmetric import distances, losses, mining
from jaxmetric.losses import contrastive_loss, triplet_loss

__version__ = "0.1.0"
__all__ = ["distances", "losses", "mining", "contrastive_loss", "triplet_loss"]
