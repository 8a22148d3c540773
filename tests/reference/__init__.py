"""The plain-MLX oracles the C++ core is tested against, one file per paper (not shipped in the
wheel). Each is the obvious Python loop with the core's semantics: same keys, same order, no
compilation, no early stop."""

from .common import (
    objective,
    project,
    ascent_step,
    random_start,
    row_keys,
)
from .pgd import (
    pgd_reference,
)
from .apgd import (
    dlr_loss,
    apgd_checkpoints,
    apgd_start,
    apgd_reference,
)
from .cw import (
    cw_margin_loss,
    cw_reference,
)
from .square import (
    square_mix32,
    square_sample_ids,
    square_draws,
    square_p_selection,
    square_window_size,
    square_pattern,
    square_reference,
)
from .smoothing import (
    vote_counts_reference,
    smoothed_predict_reference,
    certify_reference,
)

__all__ = [
    "objective",
    "project",
    "ascent_step",
    "random_start",
    "row_keys",
    "pgd_reference",
    "dlr_loss",
    "apgd_checkpoints",
    "apgd_start",
    "apgd_reference",
    "cw_margin_loss",
    "cw_reference",
    "square_mix32",
    "square_sample_ids",
    "square_draws",
    "square_p_selection",
    "square_window_size",
    "square_pattern",
    "square_reference",
    "vote_counts_reference",
    "smoothed_predict_reference",
    "certify_reference",
]
