"""Training: the robust objectives (``adversarial_value_and_grad``, a drop-in for
``nn.value_and_grad``), the one training loop (``train``), the plain ``fit`` and ``accuracy``
helpers, and data parallelism over ``mx.distributed``."""

from mlx_robust.training.fit import accuracy, fit
from mlx_robust.training.loop import EpochLog, TrainHistory, clean_accuracy, robust_accuracy, train
from mlx_robust.training.objectives import AdversarialValueAndGrad, adversarial_value_and_grad

__all__ = [
    "AdversarialValueAndGrad",
    "EpochLog",
    "TrainHistory",
    "accuracy",
    "adversarial_value_and_grad",
    "clean_accuracy",
    "fit",
    "robust_accuracy",
    "train",
]
