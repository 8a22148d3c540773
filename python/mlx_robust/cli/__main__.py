"""``python -m mlx_robust.cli``: the same as the ``mlx-robust`` command."""

import sys

from mlx_robust.cli.main import main

sys.exit(main())
