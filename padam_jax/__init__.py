"""padam_jax: Padam and partially adaptive optimizers as Optax transformations."""

from padam_jax._adabound import ScaleByAdaboundState as ScaleByAdaboundState
from padam_jax._adabound import adabound as adabound
from padam_jax._adabound import amsbound as amsbound
from padam_jax._adabound import scale_by_adabound as scale_by_adabound
from padam_jax._padam import ScaleByPartialAmsgradState as ScaleByPartialAmsgradState
from padam_jax._padam import padam as padam
from padam_jax._padam import scale_by_partial_amsgrad as scale_by_partial_amsgrad
from padam_jax._padamw import padamw as padamw
from padam_jax._partial_adadelta import ScaleByPartialAdadeltaState as ScaleByPartialAdadeltaState
from padam_jax._partial_adadelta import partial_adadelta as partial_adadelta
from padam_jax._partial_adadelta import scale_by_partial_adadelta as scale_by_partial_adadelta
from padam_jax._partial_adagrad import ScaleByPartialRssState as ScaleByPartialRssState
from padam_jax._partial_adagrad import partial_adagrad as partial_adagrad
from padam_jax._partial_adagrad import scale_by_partial_rss as scale_by_partial_rss
from padam_jax._partial_adam import ScaleByPartialAdamState as ScaleByPartialAdamState
from padam_jax._partial_adam import partial_adam as partial_adam
from padam_jax._partial_adam import scale_by_partial_adam as scale_by_partial_adam
from padam_jax._partial_adamax import ScaleByPartialAdamaxState as ScaleByPartialAdamaxState
from padam_jax._partial_adamax import partial_adamax as partial_adamax
from padam_jax._partial_adamax import scale_by_partial_adamax as scale_by_partial_adamax
from padam_jax._partial_rmsprop import ScaleByPartialRmsState as ScaleByPartialRmsState
from padam_jax._partial_rmsprop import partial_rmsprop as partial_rmsprop
from padam_jax._partial_rmsprop import scale_by_partial_rms as scale_by_partial_rms
from padam_jax._quantized import QuantizedArray as QuantizedArray
from padam_jax._quantized import QuantizedState as QuantizedState
from padam_jax._quantized import with_quantized_state as with_quantized_state
from padam_jax._schedules import anneal_p as anneal_p

__version__ = "0.1.0"

__all__ = [
  "QuantizedArray",
  "QuantizedState",
  "ScaleByAdaboundState",
  "ScaleByPartialAdadeltaState",
  "ScaleByPartialAdamState",
  "ScaleByPartialAdamaxState",
  "ScaleByPartialAmsgradState",
  "ScaleByPartialRmsState",
  "ScaleByPartialRssState",
  "__version__",
  "adabound",
  "amsbound",
  "anneal_p",
  "padam",
  "padamw",
  "partial_adadelta",
  "partial_adagrad",
  "partial_adam",
  "partial_adamax",
  "partial_rmsprop",
  "scale_by_adabound",
  "scale_by_partial_adadelta",
  "scale_by_partial_adam",
  "scale_by_partial_adamax",
  "scale_by_partial_amsgrad",
  "scale_by_partial_rms",
  "scale_by_partial_rss",
  "with_quantized_state",
]
