"""Randomized smoothing and certified L2 robustness.

Cohen, Rosenfeld & Kolter 2019, "Certified Adversarial Robustness via Randomized Smoothing",
https://arxiv.org/abs/1902.02918. The smoothed classifier of a base classifier f is

    g(x) = argmax_c P(f(x + e) = c),   e ~ N(0, sigma^2 I)

and if the top class has probability pA >= lower bound pA_ > 1/2, then g predicts it everywhere in
the L2 ball of radius sigma * Phi^-1(pA_) around x (their Theorem 1 with pB = 1 - pA). PREDICT and
CERTIFY below are the paper's Monte Carlo algorithms; sampling and vote counting run in the C++
core (a compiled loop with the model's parameters and each chunk's PRNG key as inputs), the
statistics too (Clopper-Pearson bound, binomial test, normal quantile; no SciPy at run time).

Randomness: every input gets its own PRNG key (row i of ``mx.random.split(key, N)``, or an (N, 2)
array of keys you pass), so an input's result never depends on the other inputs of the batch or on
how a data set is sharded across processes. Noise is added in input space without clipping.

Non-finite logits: a noisy draw on which the model returns a NaN or an infinity votes for no class.
It still counts in CERTIFY's n (so it can only lower the bound pA_: the certificate stays sound),
PREDICT's binomial test sees only the votes, and an input without any vote abstains. The number of
such draws is reported (``Certification.nonfinite``, ``CertifiedAccuracy.nonfinite``,
``smoothed_predict(..., return_nonfinite=True)``) and a ``RuntimeWarning`` names it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from mlx_robust import _functional
from mlx_robust._compat import moved
from mlx_robust._files import write_replacing
from mlx_robust._checks import finite32, float32_note
from mlx_robust.validation import as_labels

if TYPE_CHECKING:  # pragma: no cover
    from mlx_robust.robust_model import RobustModel

__all__ = [
    "Certification",
    "CertifiedAccuracy",
    "Smoothing",
    "binomial_test_pvalue",
    "certified_accuracy",
    "certified_accuracy_table",
    "certify",
    "clopper_pearson_lower",
    "distributed_group",
    "normal_ppf",
    "plot_certified_accuracy",
    "sample_keys",
    "smoothed_predict",
]

ABSTAIN = -1


# ---------------------------------------------------------------------------------------------
# Statistics (C++; see csrc/stats.h)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower confidence bound of a binomial proportion.

    The largest p0 with P(Binomial(n, p0) >= k) <= alpha, i.e. the alpha-quantile of
    Beta(k, n - k + 1) (``scipy.stats.beta.ppf(alpha, k, n - k + 1)``); 0 for k = 0 and
    ``alpha ** (1 / n)`` for k = n. CERTIFY's bound on pA (Cohen et al. 2019,
    https://arxiv.org/abs/1902.02918). Double precision, ~1e-12 relative for n up to 1e7.

    Raises:
        ValueError: n < 1, k outside [0, n], or alpha outside (0, 1).
    """
    return _functional.clopper_pearson_lower(_int(k, "k"), _int(n, "n"), float(alpha))


def binomial_test_pvalue(k: int, n: int, p: float = 0.5) -> float:
    """Two-sided exact binomial test p-value, as ``scipy.stats.binomtest(k, n, p).pvalue``.

    PREDICT (Cohen et al. 2019, https://arxiv.org/abs/1902.02918) abstains when the test of the top
    two vote counts (k = nA, n = nA + nB, p = 1/2) gives a p-value above alpha.

    Raises:
        ValueError: n < 1, k outside [0, n], or p outside [0, 1].
    """
    return _functional.binomial_test_pvalue(_int(k, "k"), _int(n, "n"), float(p))


def normal_ppf(p: float) -> float:
    """Standard normal quantile Phi^-1(p) (Wichura 1988, Algorithm AS 241; ~1e-16 relative).

    Raises:
        ValueError: p outside [0, 1] (p = 0 and 1 give -inf and inf).
    """
    return _functional.normal_ppf(float(p))


# ---------------------------------------------------------------------------------------------
# Configuration


def _int(v: Any, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    return int(v)


def _check_count(v: Any, name: str, minimum: int = 1) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    if v > 2**31 - 1:
        raise ValueError(f"{name} must be at most 2**31 - 1, got {v!r}")
    return int(v)


def _check_sigma(v: Any, name: str = "sigma") -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if not finite32(float(v)) or float(v) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}{float32_note(float(v))}")
    return float(v)


def _check_alpha(v: Any) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)) or not 0 < float(v) < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {v!r}")
    return float(v)


def _warn_if_hopeless(n: int, alpha: float, what: str) -> None:
    """Warn when ``n`` samples can never give an answer at level ``alpha``."""
    if what == "certify" and clopper_pearson_lower(n, n, alpha) <= 0.5:
        need = math.floor(math.log2(1 / alpha)) + 1
        warnings.warn(
            f"n={n} samples can never certify at alpha={alpha:g}: even if every sample votes for the "
            f"top class, the lower bound alpha**(1/n) = {alpha ** (1 / n):.3f} is <= 1/2, so every input "
            f"abstains; use n >= {need}",
            stacklevel=3,
        )
    if what == "predict" and binomial_test_pvalue(n, n) > alpha:
        need = math.floor(math.log2(2 / alpha)) + 1
        warnings.warn(
            f"n={n} samples can never predict at alpha={alpha:g}: even a unanimous vote has binomial "
            f"test p-value {2 * 0.5 ** n:.3g} > alpha, so every input abstains; use n >= {need}",
            stacklevel=3,
        )


@dataclass(frozen=True)
class Smoothing:
    """Randomized-smoothing settings (Cohen, Rosenfeld & Kolter 2019, https://arxiv.org/abs/1902.02918).

    Pass to ``RobustModel(model, smoothing=Smoothing(sigma=0.25))``: ``predict`` then returns the
    smoothed prediction (PREDICT) and ``certify`` a certified L2 radius (CERTIFY).

    Args:
        sigma: standard deviation of the Gaussian noise, in input units (> 0). Larger sigma
            certifies larger radii but lowers accuracy; the base model should be trained with the
            same noise (``mlx_robust.training.fit(..., noise_std=sigma)``).
        n: noise samples per input used to estimate (PREDICT and CERTIFY's second stage; paper:
            100,000). Needs n >= log2(1/alpha) + 1 to ever certify; a warning says so.
        n0: noise samples per input that select the class in CERTIFY (paper: 100).
        alpha: failure probability: a certificate is wrong with probability <= alpha (paper: 0.001).
        batch_size: noisy copies per model call; bounds memory whatever n is.

    Example:
        >>> robust = mr.RobustModel(model, bounds=(0, 1), smoothing=mr.Smoothing(sigma=0.25))
        >>> cls, radius = robust.certify(x, n0=100, n=100_000, alpha=1e-3, key=mr.key(0))
    """

    sigma: float
    n: int = 100_000
    n0: int = 100
    alpha: float = 0.001
    batch_size: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _check_sigma(self.sigma))
        object.__setattr__(self, "n", _check_count(self.n, "n"))
        object.__setattr__(self, "n0", _check_count(self.n0, "n0"))
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))
        object.__setattr__(self, "batch_size", _check_count(self.batch_size, "batch_size"))
        _warn_if_hopeless(self.n, self.alpha, "certify")

    def replace(self, **changes: Any) -> "Smoothing":
        """A copy with some fields changed (validated again); None values are ignored."""
        fields = {k: v for k, v in changes.items() if v is not None}
        if not fields:
            return self
        values = dict(sigma=self.sigma, n=self.n, n0=self.n0, alpha=self.alpha, batch_size=self.batch_size)
        values.update(fields)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # callers warn for the stage they run
            return Smoothing(**values)


class _CertificationFields(NamedTuple):
    prediction: mx.array
    radius: mx.array


class Certification(_CertificationFields):
    """CERTIFY's answer per input; unpacks as ``cls, radius = robust.certify(x)``.

    Attributes:
        prediction: (N,) int32 class of the smoothed classifier, -1 where CERTIFY abstains.
        radius: (N,) float32 certified L2 radius sigma * Phi^-1(pA_), 0 where abstained.
        nonfinite: (N,) int32 noisy draws (of the n0 + n) on which the model returned non-finite
            logits; they voted for no class. An attribute, not a tuple field, so that the tuple
            still unpacks into two.
    """

    nonfinite: mx.array

    def __new__(
        cls, prediction: mx.array, radius: mx.array, nonfinite: Optional[mx.array] = None
    ) -> "Certification":
        self = super().__new__(cls, prediction, radius)
        self.nonfinite = mx.zeros(prediction.shape, mx.int32) if nonfinite is None else nonfinite
        return self

    def __getnewargs__(self) -> tuple[mx.array, mx.array, mx.array]:
        return (self.prediction, self.radius, self.nonfinite)

    @classmethod
    def _make(cls, iterable: Any) -> "Certification":
        return cls(*iterable)

    def _replace(self, **changes: Any) -> "Certification":
        values = dict(prediction=self.prediction, radius=self.radius, nonfinite=self.nonfinite)
        values.update(changes)
        return Certification(**values)


# ---------------------------------------------------------------------------------------------
# Keys


def sample_keys(key: Optional[mx.array], num: int) -> mx.array:
    """One PRNG key per input, (num, 2) uint32.

    ``key`` of shape (2,) (``mr.key(seed)``) gives row i of ``mx.random.split(key, num)``; an
    (num, 2) uint32 array is used as is (e.g. a slice of a larger set's keys, so that a subset or a
    shard gets exactly the keys it had in the whole); None draws a key from ``mx.random`` (so
    ``mx.random.seed`` makes it repeatable).
    """
    if key is None:
        key = mx.random.key(int(mx.random.randint(0, 2**31 - 1, shape=()).item()))
    if not isinstance(key, mx.array):
        raise TypeError(f"key must be a PRNG key from mr.key(seed), got {type(key).__name__}")
    if key.dtype != mx.uint32 or key.shape not in ((2,), (num, 2)):
        raise ValueError(
            f"key must be a PRNG key from mr.key(seed) (shape (2,)) or one key per input (shape ({num}, 2)), "
            f"uint32; got shape {tuple(key.shape)} and dtype {key.dtype}"
        )
    if key.shape == (2,):
        return mx.random.split(key, num)
    return key


def _warn_nonfinite(nonfinite: mx.array, draws: int, what: str) -> None:
    """Warn when some noisy draws gave non-finite logits (``nonfinite``: (N,) per input)."""
    bad = np.array(nonfinite)
    total = int(bad.sum())
    if total == 0:
        return
    inputs = int(np.count_nonzero(bad))
    every = int(np.count_nonzero(bad >= draws))
    warnings.warn(
        f"[{what}] {total} of {bad.size * draws} noisy draws ({inputs} of {bad.size} inputs; all {draws} "
        f"draws on {every}) gave non-finite logits (NaN or inf): they voted for no class, which can only "
        f"lower pA and makes inputs without a vote abstain. Does the model's forward accept inputs "
        f"outside the bounds (Gaussian noise is not clipped)?",
        RuntimeWarning,
        stacklevel=3,
    )


def _split_each(keys: mx.array) -> tuple[mx.array, mx.array]:
    """Per input, (selection key, estimation key) = split(key_i)."""
    pairs = mx.vmap(lambda k: mx.random.split(k, 2))(keys)
    return pairs[:, 0], pairs[:, 1]


# ---------------------------------------------------------------------------------------------
# PREDICT and CERTIFY


def _resolve(robust: "RobustModel", **overrides: Any) -> Smoothing:
    """The model's Smoothing with the call's overrides, each validated with a message naming it."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if "sigma" in values:
        values["sigma"] = _check_sigma(values["sigma"])
    for name in ("n", "n0", "batch_size"):
        if name in values:
            values[name] = _check_count(values[name], name)
    if "alpha" in values:
        values["alpha"] = _check_alpha(values["alpha"])
    base = robust.smoothing
    if base is None:
        if "sigma" not in values:
            raise ValueError(
                "randomized smoothing needs a noise level: pass sigma=..., or build the model with "
                "RobustModel(..., smoothing=mr.Smoothing(sigma=...))"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller warns for the stage it runs
            base = Smoothing(sigma=values["sigma"])
    return base.replace(**values)


def _progress_bar(show: Optional[bool], total: int, draws: int, desc: str):
    if show is False or (show is None and total * draws < 2_000_000):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="input", leave=False, disable=None if show is None else False)


def _groups(total: int, draws: int, batch_size: int, bar: Any) -> list[tuple[int, int]]:
    # Without a bar: one call (the core pipelines across inputs). With one: calls of >= ~64 model
    # batches each, so the pipeline drains rarely.
    if bar is None:
        return [(0, total)]
    per = max(1, (64 * batch_size) // max(draws, 1))
    return [(s, min(s + per, total)) for s in range(0, total, per)]


def smoothed_predict(
    robust: "RobustModel",
    x: Any,
    *,
    n: Optional[int] = None,
    alpha: Optional[float] = None,
    sigma: Optional[float] = None,
    batch_size: Optional[int] = None,
    key: Optional[mx.array] = None,
    progress: Optional[bool] = None,
    return_nonfinite: bool = False,
) -> Union[mx.array, tuple[mx.array, mx.array]]:
    """PREDICT (Cohen et al. 2019, https://arxiv.org/abs/1902.02918): the smoothed class or -1.

    Draws ``n`` noisy copies per input, counts the base model's votes and returns the top class
    unless the two-sided binomial test of the top two counts (nA vs nB at 1/2) has p-value > alpha,
    then -1 (abstain). Returns a wrong class with probability at most alpha. A draw with non-finite
    logits votes for no class (a ``RuntimeWarning`` gives their number); an input without any vote
    abstains.

    Args:
        robust: the wrapped model; settings default to ``robust.smoothing``.
        x: inputs (N, *input_shape) inside ``robust.bounds``.
        n, alpha, sigma, batch_size: override the ``Smoothing`` settings.
        key: ``mr.key(seed)``, or (N, 2) per-input keys (see ``sample_keys``).
        progress: progress bar; None shows one on long runs (in a terminal).
        return_nonfinite: also return the (N,) int32 number of draws with non-finite logits.

    Returns:
        (N,) int32 classes, -1 where PREDICT abstains; with ``return_nonfinite``,
        ``(classes, nonfinite)``.
    """
    s = _resolve(robust, n=n, alpha=alpha, sigma=sigma, batch_size=batch_size)
    _warn_if_hopeless(s.n, s.alpha, "predict")
    x, _ = robust.validate(x)
    num = x.shape[0]
    keys = sample_keys(key, num)
    num_classes = robust.infer_num_classes(x)
    bar = _progress_bar(progress, num, s.n, "smoothed predict")
    counts, bad = [], []
    try:
        for lo, hi in _groups(num, s.n, s.batch_size, bar):
            c, b = robust.smoothing_engine.vote_counts(
                x[lo:hi], keys[lo:hi], n=s.n, sigma=s.sigma, batch_size=s.batch_size, num_classes=num_classes,
                with_nonfinite=True,
            )
            counts.append(c)
            bad.append(b)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
    nonfinite = mx.concatenate(bad, axis=0)
    pred = _functional.smoothed_predict(mx.concatenate(counts, axis=0), s.alpha, nonfinite)
    _warn_nonfinite(nonfinite, s.n, "predict")
    return (pred, nonfinite) if return_nonfinite else pred


def certify(
    robust: "RobustModel",
    x: Any,
    *,
    n0: Optional[int] = None,
    n: Optional[int] = None,
    alpha: Optional[float] = None,
    sigma: Optional[float] = None,
    batch_size: Optional[int] = None,
    key: Optional[mx.array] = None,
    progress: Optional[bool] = None,
) -> Certification:
    """CERTIFY (Cohen et al. 2019, https://arxiv.org/abs/1902.02918): class and certified L2 radius.

    Per input: select cA = the top class of ``n0`` noisy votes; estimate its probability with ``n``
    fresh votes; pA_ = one-sided Clopper-Pearson lower bound at level 1 - alpha. Abstain (-1,
    radius 0) when pA_ <= 1/2, else return cA and radius sigma * Phi^-1(pA_). With probability at
    least 1 - alpha, the smoothed classifier predicts cA at every x' with ||x' - x||_2 < radius.
    Noise is not clipped to the input bounds (as in the paper). The model runs in eval mode and
    is left unchanged. A draw with non-finite logits votes for no class but counts in n (so it can
    only lower pA_); their number is ``Certification.nonfinite`` and a ``RuntimeWarning`` names it.

    Args:
        robust: the wrapped model; settings default to ``robust.smoothing``.
        x: inputs (N, *input_shape) inside ``robust.bounds``.
        n0, n, alpha, sigma, batch_size: override the ``Smoothing`` settings.
        key: ``mr.key(seed)``, or (N, 2) per-input keys (see ``sample_keys``); input i's selection
            and estimation draws use ``mx.random.split(key_i)``.
        progress: progress bar; None shows one on long runs (in a terminal).

    Returns:
        Certification(prediction (N,) int32, radius (N,) float32), with ``.nonfinite`` (N,) int32.
    """
    pred, radius, _, nonfinite, draws = _certify(robust, x, n0=n0, n=n, alpha=alpha, sigma=sigma,
                                                 batch_size=batch_size, key=key, progress=progress)
    _warn_nonfinite(nonfinite, draws, "certify")
    return Certification(pred, radius, nonfinite)


def _certify(robust, x, *, n0, n, alpha, sigma, batch_size, key, progress, validated=False):
    """CERTIFY: (prediction, radius, p_lower, nonfinite, draws per input = n0 + n)."""
    s = _resolve(robust, n0=n0, n=n, alpha=alpha, sigma=sigma, batch_size=batch_size)
    _warn_if_hopeless(s.n, s.alpha, "certify")
    if not validated:
        x, _ = robust.validate(x)
    num = x.shape[0]
    keys = sample_keys(key, num)
    if num == 0:
        empty = mx.zeros((0,), mx.int32)
        return empty, mx.zeros((0,), mx.float32), mx.zeros((0,), mx.float32), empty, s.n0 + s.n
    num_classes = robust.infer_num_classes(x)
    sel_keys, est_keys = _split_each(keys)
    bar = _progress_bar(progress, num, s.n0 + s.n, "certify")
    fn = robust.smoothing_engine
    c0, c1, b0, b1 = [], [], [], []
    try:
        for lo, hi in _groups(num, s.n0 + s.n, s.batch_size, bar):
            common = dict(sigma=s.sigma, batch_size=s.batch_size, num_classes=num_classes, with_nonfinite=True)
            counts, bad = fn.vote_counts(x[lo:hi], sel_keys[lo:hi], n=s.n0, **common)
            c0.append(counts)
            b0.append(bad)
            counts, bad = fn.vote_counts(x[lo:hi], est_keys[lo:hi], n=s.n, **common)
            c1.append(counts)
            b1.append(bad)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
    bad0, bad1 = mx.concatenate(b0, axis=0), mx.concatenate(b1, axis=0)
    pred, radius, p_lower = _functional.certify_from_counts(
        mx.concatenate(c0, axis=0), mx.concatenate(c1, axis=0), s.sigma, s.alpha, bad0, bad1
    )
    return pred, radius, p_lower, bad0 + bad1, s.n0 + s.n


# ---------------------------------------------------------------------------------------------
# Certified accuracy


@dataclass(frozen=True)
class CertifiedAccuracy:
    """Certified accuracy of a smoothed classifier at several L2 radii (Cohen et al. 2019, Fig. 1).

    The certified accuracy at radius r is the fraction of inputs that CERTIFY classifies correctly
    with a certified radius >= r (abstentions count as wrong).

    Attributes:
        radii: the radii of the table.
        accuracy: certified accuracy at each radius.
        prediction: (N,) int32 CERTIFY classes, -1 = abstain.
        radius: (N,) float32 certified radii (0 where abstained).
        labels: (N,) int32 true labels.
        sigma, n0, n, alpha: the settings used.
        seconds: wall time of the certification.
        nonfinite: (N,) int32 noisy draws (of the n0 + n per input) with non-finite logits, which
            voted for no class; None when not measured.
    """

    radii: tuple[float, ...]
    accuracy: tuple[float, ...]
    prediction: mx.array
    radius: mx.array
    labels: mx.array
    sigma: float
    n0: int
    n: int
    alpha: float
    seconds: float = 0.0
    nonfinite: Optional[mx.array] = None

    @property
    def abstain_rate(self) -> float:
        """Fraction of inputs on which CERTIFY abstained."""
        return float(np.mean(np.array(self.prediction) == ABSTAIN))

    def accuracy_at(self, radius: float) -> float:
        """Certified accuracy at any radius: mean of (prediction == label and radius_i >= radius)."""
        pred, rad, y = np.array(self.prediction), np.array(self.radius), np.array(self.labels)
        return float(np.mean((pred == y) & (rad >= radius)))

    def table(self) -> str:
        """A markdown table: one row, one column per radius (see ``certified_accuracy_table``)."""
        return certified_accuracy_table([self])

    @property
    def nonfinite_draws(self) -> int:
        """Total noisy draws with non-finite logits (0 when not measured)."""
        return 0 if self.nonfinite is None else int(np.array(self.nonfinite).sum())

    def __str__(self) -> str:
        bad = self.nonfinite_draws
        note = f", {bad} noisy draws with non-finite logits" if bad else ""
        return (
            f"Certified L2 accuracy (sigma={self.sigma:g}, n0={self.n0}, n={self.n}, alpha={self.alpha:g}; "
            f"{len(np.array(self.labels))} inputs, {self.abstain_rate:.1%} abstained{note})\n{self.table()}"
        )

    def plot(self, path: Union[str, Path], *, title: Optional[str] = None) -> Path:
        """Save certified accuracy vs radius (the paper's Figure 1 style) to ``path``.

        Needs matplotlib (``pip install 'mlx-robust[plot]'``).
        """
        return plot_certified_accuracy([self], path, title=title)


def certified_accuracy_table(reports: Sequence[CertifiedAccuracy]) -> str:
    """Markdown table of certified accuracy: one row per report (e.g. per sigma), one column per
    radius of the first report, plus the abstention rate and the wall time.

    Raises:
        ValueError: no reports.
    """
    if not reports:
        raise ValueError("reports must hold at least one CertifiedAccuracy")
    radii = reports[0].radii
    head = "| sigma | " + " | ".join(f"r={r:g}" for r in radii) + " | abstain | seconds |"
    rule = "|---|" + "---|" * (len(radii) + 2)
    rows = [
        f"| {r.sigma:g} | " + " | ".join(f"{r.accuracy_at(rr):.1%}" for rr in radii)
        + f" | {r.abstain_rate:.1%} | {r.seconds:.1f} |"
        for r in reports
    ]
    return "\n".join([head, rule, *rows])


def plot_certified_accuracy(
    reports: Sequence[CertifiedAccuracy], path: Union[str, Path], *, title: Optional[str] = None
) -> Path:
    """Save one curve of certified accuracy vs L2 radius per report (e.g. one per sigma) to ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'mlx-robust[plot]'``).
        ValueError: no reports.
    """
    if not reports:
        raise ValueError("reports must hold at least one CertifiedAccuracy")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plotting certified accuracy needs matplotlib: pip install 'mlx-robust[plot]' "
            "(or pip install matplotlib)"
        ) from exc
    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max(max(float(np.max(np.array(r.radius), initial=0.0)) for r in reports), max(max(r.radii) for r in reports))
    grid = np.linspace(0.0, max(top, 1e-6) * 1.05, 300)
    for r in reports:
        ax.plot(grid, [r.accuracy_at(g) for g in grid], label=f"sigma = {r.sigma:g}")
        ax.plot(r.radii, r.accuracy, "o", color=ax.lines[-1].get_color(), markersize=4)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    first = reports[0]
    ax.set_title(title or f"Randomized smoothing (n={first.n}, alpha={first.alpha:g})")
    path = Path(path)
    write_replacing(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    return path


def distributed_group(group: Any = None) -> Any:
    """``group`` if given, else the ``mx.distributed`` group of an ``mlx.launch`` run of more than
    one process, else None (a single process)."""
    if group is not None:
        return group
    if not mx.distributed.is_available():
        return None
    g = mx.distributed.init()
    return g if g.size() > 1 else None


def certified_accuracy(
    robust: "RobustModel",
    x: Any,
    y: Any,
    radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    n0: Optional[int] = None,
    n: Optional[int] = None,
    alpha: Optional[float] = None,
    sigma: Optional[float] = None,
    batch_size: Optional[int] = None,
    key: Optional[mx.array] = None,
    group: Any = None,
    progress: Optional[bool] = None,
) -> CertifiedAccuracy:
    """Certified L2 accuracy of the smoothed classifier at each radius (Cohen et al. 2019,
    https://arxiv.org/abs/1902.02918, Section 4): CERTIFY every input, then count, per radius r,
    the inputs classified correctly with certified radius >= r.

    Sharded across processes when launched with ``mlx.launch`` (or given ``group``): each rank
    certifies a contiguous shard with the keys that inputs have in the whole set, and all ranks
    receive every result (all_gather), so the report is the same as from one process.

    Args:
        robust: the wrapped model; settings default to ``robust.smoothing``.
        x, y: inputs (N, *input_shape) and labels (N,).
        radii: L2 radii of the table (>= 0).
        n0, n, alpha, sigma, batch_size: override the ``Smoothing`` settings.
        key: ``mr.key(seed)``, or (N, 2) per-input keys; None draws one from ``mx.random`` (pass a
            key when running in several processes, so that all ranks agree).
        group: an ``mx.distributed`` group; None uses ``mx.distributed.init()`` when its size > 1.
        progress: progress bar; None shows one on long runs (in a terminal).

    Returns:
        CertifiedAccuracy (print it for a table; ``.plot(path)`` for the curve).
    """
    radii_t = tuple(float(r) for r in radii)
    if not radii_t or any(not math.isfinite(r) or r < 0 for r in radii_t):
        raise ValueError(f"radii must be a non-empty sequence of finite numbers >= 0, got {radii!r}")
    s = _resolve(robust, n0=n0, n=n, alpha=alpha, sigma=sigma, batch_size=batch_size)
    x, _ = robust.validate(x)
    num = x.shape[0]
    num_classes = robust.infer_num_classes(x)
    labels = as_labels(y, num, num_classes, "y")
    group = distributed_group(group)
    if group is not None and key is None:
        raise ValueError("key is required when certifying across processes (every rank must use the same keys)")
    keys = sample_keys(key, num)
    mx.eval(keys)
    settings = dict(n0=s.n0, n=s.n, alpha=s.alpha, sigma=s.sigma, batch_size=s.batch_size, progress=progress)
    t0 = time.perf_counter()
    if group is None:
        pred, radius, _, nonfinite, draws = _certify(robust, x, key=keys, validated=True, **settings)
    else:
        size, rank = group.size(), group.rank()
        per = -(-num // size)
        lo, hi = min(num, rank * per), min(num, rank * per + per)
        pred, radius, _, nonfinite, draws = _certify(robust, x[lo:hi], key=keys[lo:hi], validated=True, **settings)
        pad = per - (hi - lo)
        if pad:
            pred = mx.concatenate([pred, mx.full((pad,), ABSTAIN, mx.int32)])
            radius = mx.concatenate([radius, mx.zeros((pad,), mx.float32)])
            nonfinite = mx.concatenate([nonfinite, mx.zeros((pad,), mx.int32)])
        pred = mx.distributed.all_gather(pred, group=group)[:num]
        radius = mx.distributed.all_gather(radius, group=group)[:num]
        nonfinite = mx.distributed.all_gather(nonfinite, group=group)[:num]
        mx.eval(pred, radius, nonfinite)
    seconds = time.perf_counter() - t0
    _warn_nonfinite(nonfinite, draws, "certified_accuracy")
    p, r, yy = np.array(pred), np.array(radius), np.array(labels)
    accuracy = tuple(float(np.mean((p == yy) & (r >= rr))) for rr in radii_t)
    return CertifiedAccuracy(
        radii_t, accuracy, pred, radius, labels, s.sigma, s.n0, s.n, s.alpha, seconds, nonfinite
    )


# Deprecated: moved to the CLI package (the demo and the command are not library code).
_MOVED = {"certified_demo_line": "mlx_robust.cli", "certify_command": "mlx_robust.cli"}


def __getattr__(name: str) -> Any:
    return moved(__name__, name, _MOVED)
