"""The ``mlx-robust`` command line (``demo``, ``evaluate``, ``certify``, ``--version``).

The only part of the package that prints for a user, and the only one that imports the package
root. ``main`` is the console-script entry point (``mlx_robust.cli:main``).
"""

from mlx_robust.cli.commands import (
    _have_matplotlib,
    _write_report,
    certify_command,
    evaluate_cmd,
    load_model,
    positive_int,
)
from mlx_robust.cli.demo import (
    DEMO_AT_EPS,
    adversarial_training_demo,
    certified_demo_line,
    demo,
    demo_ensemble,
)
from mlx_robust.cli.main import build_parser, main

__all__ = [
    "DEMO_AT_EPS",
    "adversarial_training_demo",
    "build_parser",
    "certified_demo_line",
    "certify_command",
    "demo",
    "demo_ensemble",
    "evaluate_cmd",
    "load_model",
    "main",
    "positive_int",
    "_have_matplotlib",
    "_write_report",
]
