"""mlx-robust: adversarial robustness for Apple's MLX.

Wrap a model in one line, attack it with compiled FGSM/PGD, validate what reaches it::

    import mlx_robust as mr
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    res = robust.attack(x, y, mr.PGD(eps=0.1, steps=20), key=mr.key(0))
"""

from importlib.metadata import PackageNotFoundError, version as _dist_version

import mlx.core as mx  # loads libmlx before our extension links against it

try:
    __version__ = _dist_version("mlx-robust")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

_REBUILD = (
    "Rebuild mlx-robust against the installed MLX: "
    "pip install --force-reinstall --no-cache-dir --no-binary mlx-robust mlx-robust "
    "(or `pip install --force-reinstall .` from a source checkout)."
)

try:
    from mlx_robust import _core
except ImportError as exc:  # a different libmlx than the one we were built against
    raise ImportError(
        f"mlx_robust's C++ extension failed to load with mlx {mx.__version__}: {exc}. {_REBUILD}"
    ) from exc

if _core.mlx_version != mx.__version__:
    raise ImportError(
        f"mlx_robust was built against mlx {_core.mlx_version} but mlx {mx.__version__} is installed; "
        f"MLX has no stable C++ ABI. {_REBUILD}"
    )

from mlx_robust import datasets, models  # noqa: E402
from mlx_robust.attacks import FGSM, PGD, Attack, AttackResult  # noqa: E402
from mlx_robust.attacks import Square, SquareResult  # noqa: E402
from mlx_robust.attacks import APGD, APGDT, CW  # noqa: E402
from mlx_robust.defences import GaussianNoise  # noqa: E402
from mlx_robust.defences import distillation  # noqa: E402
from mlx_robust.defences.smoothing import (  # noqa: E402
    Certification,
    CertifiedAccuracy,
    Smoothing,
    certified_accuracy,
)
from mlx_robust.evaluation import RobustnessReport, evaluate  # noqa: E402
from mlx_robust.graph import fast_pooling_enabled, set_fast_pooling  # noqa: E402
from mlx_robust.robust_model import RobustModel, key  # noqa: E402
from mlx_robust.training import AdversarialValueAndGrad, adversarial_value_and_grad  # noqa: E402
from mlx_robust.training import EpochLog, TrainHistory, train  # noqa: E402
from mlx_robust.training import distributed  # noqa: E402
from mlx_robust.validation import ValidationReport, validate  # noqa: E402
from mlx_robust.evaluation import ensemble as _ensemble  # noqa: E402
import sys as _sys  # noqa: E402

# The old module path mlx_robust.evaluate names the ensemble module, while the attribute
# mlx_robust.evaluate stays the function: registered here, the module is never loaded from a file,
# so importing it cannot rebind the package attribute.
_sys.modules.setdefault("mlx_robust.evaluate", _ensemble)
del _sys

from mlx_robust import _compat  # noqa: E402

# 0.1's modules that were attributes of the package (old paths, aliases of their new homes).
_OLD_SUBMODULES = frozenset({"model", "smoothing", "adversarial", "trainer", "cli"})


def __getattr__(name: str):  # noqa: ANN202 - module-level attribute hook
    return _compat.old_submodule(__name__, name, _OLD_SUBMODULES)


__all__ = [
    "Certification",
    "CertifiedAccuracy",
    "Smoothing",
    "certified_accuracy",
    "AdversarialValueAndGrad",
    "APGD",
    "APGDT",
    "CW",
    "FGSM",
    "PGD",
    "Square",
    "SquareResult",
    "Attack",
    "AttackResult",
    "GaussianNoise",
    "RobustModel",
    "RobustnessReport",
    "ValidationReport",
    "EpochLog",
    "TrainHistory",
    "adversarial_value_and_grad",
    "datasets",
    "distillation",
    "distributed",
    "evaluate",
    "fast_pooling_enabled",
    "key",
    "models",
    "set_fast_pooling",
    "train",
    "validate",
    "__version__",
]
