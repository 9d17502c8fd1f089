"""padam_jax: Padam and partially adaptive optimizers as Optax transformations."""

from padam_jax._padam import ScaleByPartialAmsgradState as ScaleByPartialAmsgradState
from padam_jax._padam import padam as padam
from padam_jax._padam import scale_by_partial_amsgrad as scale_by_partial_amsgrad

__version__ = "0.1.0"

__all__ = [
    "ScaleByPartialAmsgradState",
    "__version__",
    "padam",
    "scale_by_partial_amsgrad",
]
