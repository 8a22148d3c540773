"""The one bridge to the C++ core.

Turns an ``nn.Module`` into a pure function of ``(arrays, x)`` run on a shallow copy of the module
tree (the user's module is never modified, not even while a trace runs), owns the compiled objects,
and retraces them when the model is no longer the one traced.
Nothing else in the package imports ``_core``.
"""

from __future__ import annotations

import copy as _copy
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_robust import _core

ValidationReport = _core.ValidationReport


def check_batch_structure(x: mx.array, sample_shape: Optional[Sequence[int]], name: str) -> None:
    """Rank, batch size, dtype and per-sample shape of ``x`` (reads no data)."""
    _core.check_batch_structure(x, None if sample_shape is None else list(sample_shape), name)


def _validation_args(x: mx.array, sample_shape: Optional[Sequence[int]], lo: float, hi: float, name: str) -> dict:
    return dict(
        x=x,
        sample_shape=None if sample_shape is None else list(sample_shape),
        lo=mx.array(lo, mx.float32),
        hi=mx.array(hi, mx.float32),
        name=name,
    )


def validate_batch(
    x: mx.array, sample_shape: Optional[Sequence[int]], lo: float, hi: float, name: str
) -> ValidationReport:
    """One fused C++ pass: structure, NaN/Inf and out-of-range counts per sample."""
    return _core.validate_batch(**_validation_args(x, sample_shape, lo, hi, name))


def start_validation(
    x: mx.array, sample_shape: Optional[Sequence[int]], lo: float, hi: float, name: str
) -> "_core.PendingValidation":
    """validate_batch's first half: structure checked now, the counts queued on the device."""
    return _core.start_validation(**_validation_args(x, sample_shape, lo, hi, name))


def finish_validation(pending: "_core.PendingValidation") -> ValidationReport:
    """validate_batch's second half: read the queued counts into the report."""
    return _core.finish_validation(pending)


# --- the model as a pure function: every array an input, traced on a shallow copy -------------
#
# The user's module object is never modified, not even while a trace runs (a serving thread may
# call it meanwhile): every run of the model for a result runs a shallow copy of the module tree
# (new Module objects of the same classes, sharing the arrays), and a trace sets its tracer arrays
# and its train/eval mode on that copy only. Every array of the tree (private ``_name`` ones
# included) is an input of the traced function, so a compiled graph never bakes in an array's
# value; what it does bake in (types, structure, non-array attributes) is the fingerprint.

_PLAIN = frozenset((int, float, complex, str, bytes, bool, type(None)))
# Ignored by the fingerprint: the copy's modes are set by the caller, and freezing only selects
# which parameters get gradients (the engines differentiate with respect to x).
_FINGERPRINT_SKIP = frozenset(("_training", "_no_grad"))
_MODULE_END = object()


class Fingerprint:
    """What a compiled trace of a module tree depends on besides its arrays' values.

    Module types and structure (keys in order, shared submodules), names, shapes and dtypes of every
    array (private ones included), and non-array attribute values: plain values (numbers, strings,
    bools, None and containers of them) by value, numpy arrays by content, other objects
    (functions, bound methods) by identity. Holds those objects, so that their ids stay unique.
    """

    __slots__ = ("key", "_objects")

    def __init__(self, key: tuple, objects: list) -> None:
        self.key = key
        self._objects = objects

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and self.key == other.key

    __hash__ = None  # type: ignore[assignment]


def model_arrays(model: nn.Module, training: Optional[bool] = None) -> tuple[list[mx.array], Fingerprint]:
    """Every array of the module tree in a fixed order (the order ``model_copy`` places them in)
    and the tree's :class:`Fingerprint` (``training``, the mode a trace runs in, is part of it).

    One walk of the tree: it runs on every engine call, so it must stay cheap.
    """
    arrays: list[mx.array] = []
    key: list = [training]
    objects: list = []
    seen: dict[int, int] = {}
    plain, skip, module_end = _PLAIN, _FINGERPRINT_SKIP, _MODULE_END
    append = key.append

    def visit(v: Any) -> None:
        t = type(v)
        if t in plain:
            append((t, "nan") if t is float and v != v else (t, v))
        elif t is mx.array:
            arrays.append(v)
            append((v.shape, v.dtype))
        elif isinstance(v, nn.Module):
            i = seen.get(id(v))
            if i is not None:
                append(("shared", i))
                return
            seen[id(v)] = len(seen)
            append(t)
            for k, c in v.items():
                append(k)
                visit(c)
            append(module_end)
            for k, c in v.__dict__.items():
                if k not in skip:
                    append(k)
                    visit(c)
            append(module_end)
        elif t is list or t is tuple or (t is not dict and isinstance(v, (list, tuple))):
            append((t, len(v)))
            for c in v:
                visit(c)
        elif isinstance(v, dict):
            append((t, len(v)))
            for k, c in v.items():
                append(k)
                visit(c)
        elif t is set or t is frozenset:
            append((t, frozenset(v)))
        elif isinstance(v, np.ndarray):
            append((np.ndarray, v.shape, v.dtype.str, v.tobytes()))
        elif isinstance(v, np.generic):
            append((t, v.item()))
        else:
            append(("object", id(v)))
            objects.append(v)

    visit(model)
    return arrays, Fingerprint(tuple(key), objects)


def model_copy(
    model: nn.Module, arrays: Optional[Sequence[mx.array]] = None, training: Optional[bool] = None
) -> nn.Module:
    """A shallow copy of the module tree: new Module objects of the same classes.

    Each module's dict items and ``__dict__`` are copied, recursively through child modules, lists,
    tuples and dicts (a submodule shared by two parents stays shared); arrays and other objects are
    shared with ``model``. ``arrays`` (from :func:`model_arrays`, or tracers in that order) replace
    the tree's arrays in the copy; ``training`` (if not None) sets every copied module's mode.
    Whatever the copy's forward assigns (BatchNorm's running statistics, a cached tensor) lands on
    the copy, never on ``model``.
    """
    source = None if arrays is None else iter(arrays)
    memo: dict[int, nn.Module] = {}
    plain = _PLAIN

    def visit(v: Any) -> Any:
        t = type(v)
        if t in plain:
            return v
        if t is mx.array:
            return v if source is None else _next_array(source)
        if isinstance(v, nn.Module):
            done = memo.get(id(v))
            if done is not None:
                return done
            new = t.__new__(t)
            memo[id(v)] = new
            for k, c in v.items():
                dict.__setitem__(new, k, visit(c))
            attrs = new.__dict__
            for k, c in v.__dict__.items():
                attrs[k] = visit(c)
            if training is not None:
                attrs["_training"] = training
            return new
        if t is list:
            return [visit(c) for c in v]
        if t is tuple:
            return tuple([visit(c) for c in v])
        if t is dict:
            return {k: visit(c) for k, c in v.items()}
        if t is set:
            return set(v)
        # Subclasses (OrderedDict, a namedtuple, ...): the same class, contents copied.
        if isinstance(v, dict):
            new_dict = _copy.copy(v)
            for k, c in v.items():
                new_dict[k] = visit(c)
            return new_dict
        if isinstance(v, list):
            new_list = _copy.copy(v)
            new_list[:] = [visit(c) for c in v]
            return new_list
        if isinstance(v, tuple):
            contents = [visit(c) for c in v]
            return t(*contents) if hasattr(t, "_fields") else t(contents)
        return v

    copy = visit(model)
    if source is not None and next(source, _MODULE_END) is not _MODULE_END:
        raise ValueError("[model] arrays must match the model's arrays one to one, got more")
    return copy


def _next_array(source: Iterator[mx.array]) -> mx.array:
    try:
        return next(source)
    except StopIteration:
        raise ValueError("[model] arrays must match the model's arrays one to one, got fewer") from None


def model_forward(model: nn.Module, x: mx.array, training: Optional[bool] = None) -> Any:
    """``model(x)`` run on a shallow copy (see :func:`model_copy`): ``model`` is left untouched.

    ``training``: the mode to run in; None keeps each module's own mode.
    """
    return model_copy(model, training=training)(x)


class ModelFunction:
    """An ``nn.Module`` seen as ``f(arrays, x) -> logits``, plus its C++ attack engine.

    The engine's compiled steps take every array of the module tree (parameters and private
    ``_name`` arrays alike) as inputs, so an optimizer update or a new value of any array between
    calls is always seen (never baked in as a constant). What a trace does bake in (module types,
    structure, non-array attributes: see :class:`Fingerprint`) is checked on every call: when it
    changed, every engine of this model drops its compiled graphs and traces again. Traces run on a
    shallow copy of the module tree (:func:`model_copy`): the user's module is never modified.
    """

    def __init__(self, model: nn.Module, transform: Optional[Callable[[mx.array, mx.array], mx.array]] = None) -> None:
        self.model = model
        # A random input transform (a defence) applied before the model: transform(x, key).
        self.transform = transform
        self.engine = _core.AttackEngine()
        # The fingerprint of the model as the engines' compiled graphs saw it (None: none traced).
        self._traced: Optional[Fingerprint] = None

    def flat_parameters(self) -> tuple[list[str], list[mx.array]]:
        """``(names, arrays)``: the arrays the traced forward takes (every array of the module tree,
        private ones included, in :func:`model_arrays`' order), named by their position."""
        arrays, _ = model_arrays(self.model)
        return [str(i) for i in range(len(arrays))], arrays

    @property
    def stochastic(self) -> bool:
        return self.transform is not None

    def _forward(self, names: Optional[list[str]] = None, originals: Optional[list[mx.array]] = None,
                 training: bool = False) -> Callable:
        """The traced forward ``(arrays, x) -> logits`` on a shallow copy of the model in ``training``
        mode. ``names`` and ``originals`` are not used (kept for callers of the old signature)."""
        model, transform = self.model, self.transform

        def forward(params: list[mx.array], x: mx.array) -> mx.array:
            if transform is not None:
                # The engine appends the draw's key to the parameters of a stochastic model.
                *params, key = params
                x = transform(x, key)
            return model_copy(model, params, training)(x)

        return forward

    def check_traced(self, training: bool = False) -> list[mx.array]:
        """The model's arrays for an engine call; drops every compiled graph of this model first
        when the model is no longer the one traced (its :class:`Fingerprint` changed)."""
        arrays, fingerprint = model_arrays(self.model, training)
        if fingerprint != self._traced:
            self.clear()
            self._traced = fingerprint
        return arrays

    @property
    def trace_count(self) -> int:
        """Model traces by every engine of this model (PGD, APGD, C&W, Square)."""
        return self.engine.trace_count + self.suite_trace_count

    def chosen_unroll(self, shape: Sequence[int]) -> int:
        return self.engine.chosen_unroll(list(shape))

    def clear(self) -> None:
        """Drop the compiled functions of every engine of this model."""
        self.engine.clear()
        self.clear_suite()
        self._traced = None

    def run_attack(
        self,
        x: mx.array,
        y: mx.array,
        eps: mx.array,
        step_size: mx.array,
        bounds: tuple[float, float],
        *,
        num_classes: int,
        norm: str,
        loss: str,
        steps: int,
        restarts: int,
        random_start: bool,
        targeted: bool,
        track_best: bool,
        early_stop: bool,
        unroll: int,
        key: mx.array,
        eot_samples: int = 1,
        probs: Optional[mx.array] = None,
        training: bool = False,
        rows: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
        """Run the compiled attack loop; returns (x_adv, success, loss, logits, norms).

        ``probs`` (N, C): clean probabilities, needed by ``loss="kl"`` (TRADES' inner attack).
        ``training`` is the mode the model runs in during the attack (eval by default).
        ``rows`` (N,): the samples' global indices, which key a random defence's per-sample draws.
        """
        return self._run_engine(
            self.engine,
            x,
            y,
            eps,
            step_size,
            mx.array(bounds[0], mx.float32),
            mx.array(bounds[1], mx.float32),
            training=training,
            num_classes=num_classes,
            norm=norm,
            loss=loss,
            steps=steps,
            restarts=restarts,
            random_start=random_start,
            targeted=targeted,
            track_best=track_best,
            early_stop=early_stop,
            unroll=unroll,
            eot_samples=eot_samples,
            key=key,
            probs=probs,
            rows=rows,
        )

    # --- attack suite: APGD and Carlini-Wagner engines, created on first use ---------------

    def _suite_engine(self, attr: str, factory: Callable[[], object]):
        engine = self.__dict__.get(attr)
        if engine is None:
            engine = factory()
            setattr(self, attr, engine)
        return engine

    @property
    def apgd_engine(self) -> "_core.ApgdEngine":
        """The compiled APGD loop of this model (created on first use)."""
        return self._suite_engine("_apgd_engine", _core.ApgdEngine)

    @property
    def cw_engine(self) -> "_core.CwEngine":
        """The compiled Carlini-Wagner loop of this model (created on first use)."""
        return self._suite_engine("_cw_engine", _core.CwEngine)

    @property
    def square_engine(self) -> "_core.SquareEngine":
        """The compiled Square attack of this model (created on first use)."""
        return self._suite_engine("_square_engine", _core.SquareEngine)

    _SUITE = ("_apgd_engine", "_cw_engine", "_square_engine")

    @property
    def suite_trace_count(self) -> int:
        """Model traces by the APGD, C&W and Square engines (constant once every shape was traced)."""
        return sum(e.trace_count for e in (self.__dict__.get(a) for a in self._SUITE) if e)

    def clear_suite(self) -> None:
        """Drop the compiled functions of the APGD, C&W and Square engines."""
        for attr in self._SUITE:
            engine = self.__dict__.get(attr)
            if engine is not None:
                engine.clear()

    def _run_engine(self, engine, *args, training: bool = False, **kwargs) -> tuple:
        """``engine.run(forward, arrays, *args, **kwargs)`` on a shallow copy of the model.

        The copy runs in ``training`` mode (eval by default); the model itself is never touched.
        Retraces when the model changed since the last trace; on any error the engine drops its
        compiled entries so that the next call traces afresh.
        """
        params = self.check_traced(training)
        forward = self._forward(training=training)
        try:
            return engine.run(forward, params, *args, stochastic=self.stochastic, **kwargs)
        except BaseException:  # an interrupt too: the next call traces afresh
            engine.clear()
            raise

    _run_suite = _run_engine

    def run_apgd(
        self,
        x: mx.array,
        y: mx.array,
        eps: mx.array,
        bounds: tuple[float, float],
        *,
        num_classes: int,
        norm: str,
        loss: str,
        steps: int,
        restarts: int,
        n_target_classes: int,
        target: Optional[mx.array],
        rho: float,
        early_stop: bool,
        unroll: int,
        key: mx.array,
        eot_samples: int = 1,
        rows: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
        """Run compiled APGD in eval mode; returns (x_adv, success, loss, logits, norms).

        ``y`` are the true labels; ``target`` (N,) makes the attack targeted;
        ``n_target_classes > 0`` runs APGD-T.
        """
        return self._run_suite(
            self.apgd_engine,
            x,
            y,
            eps,
            mx.array(bounds[0], mx.float32),
            mx.array(bounds[1], mx.float32),
            num_classes=num_classes,
            norm=norm,
            loss=loss,
            steps=steps,
            restarts=restarts,
            n_target_classes=n_target_classes,
            target=target,
            rho=rho,
            early_stop=early_stop,
            unroll=unroll,
            eot_samples=eot_samples,
            key=key,
            rows=rows,
        )

    def run_cw(
        self,
        x: mx.array,
        y: mx.array,
        bounds: tuple[float, float],
        *,
        num_classes: int,
        targeted: bool,
        c: float,
        kappa: float,
        steps: int,
        lr: float,
        binary_search_steps: int,
        early_abort: bool,
        unroll: int,
        key: mx.array,
        eot_samples: int = 1,
        rows: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
        """Run compiled Carlini-Wagner L2 in eval mode; returns (x_adv, success, loss, logits, norms)."""
        return self._run_suite(
            self.cw_engine,
            x,
            y,
            mx.array(bounds[0], mx.float32),
            mx.array(bounds[1], mx.float32),
            num_classes=num_classes,
            targeted=targeted,
            c=c,
            kappa=kappa,
            steps=steps,
            lr=lr,
            binary_search_steps=binary_search_steps,
            early_abort=early_abort,
            unroll=unroll,
            eot_samples=eot_samples,
            key=key,
            rows=rows,
        )


def row_keys(key: mx.array, rows: mx.array) -> mx.array:
    """Per-row PRNG keys (N, 2) from a key (2,) and global sample indices (N,): the keys a random
    defence receives in the attack engines (row i's draw depends only on ``key`` and ``rows[i]``)."""
    return _core.row_keys(key, rows.astype(mx.uint32))


def attack_objective(
    logits: mx.array, y: mx.array, loss: str, targeted: bool, probs: Optional[mx.array] = None
) -> mx.array:
    """The gradient attacks' per-sample objective (ce, margin or kl) at ``logits``, as the core computes it."""
    return _core.attack_objective(logits, y, loss, targeted, probs)


def dlr_loss(logits: mx.array, y: mx.array, target: Optional[mx.array] = None) -> mx.array:
    """APGD's DLR loss (with ``target``: the targeted DLR), as the core computes it."""
    return _core.dlr_loss(logits, y, target)


class SmoothedFunction:
    """An ``nn.Module`` as ``f(arrays, x)`` for randomized smoothing, plus its C++ sampling engine.

    The engine's compiled chunk function takes every array of the module tree (private ones
    included), the chunk's PRNG key and sigma as inputs, so neither an optimizer update nor a new
    key is ever baked in; a change of what is baked in (the model's :class:`Fingerprint`) makes the
    next call trace again. Traces run on a shallow copy of the model, never on the model itself.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.engine = _core.SmoothingEngine()
        self._traced: Optional[Fingerprint] = None

    @property
    def trace_count(self) -> int:
        return self.engine.trace_count

    def clear(self) -> None:
        """Drop the compiled functions of the sampling engine."""
        self.engine.clear()
        self._traced = None

    def vote_counts(
        self,
        x: mx.array,
        keys: mx.array,
        *,
        n: int,
        sigma: float,
        batch_size: int,
        num_classes: int,
        overlap: Optional[bool] = None,
        with_nonfinite: bool = False,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """(N, num_classes) int32 votes of the model (in eval mode) under N(0, sigma^2) noise.

        A draw whose logits hold a NaN or an infinity votes for no class; ``with_nonfinite``: also
        return the number (N,) int32 of such draws, as ``(counts, nonfinite)``.

        ``overlap``: draw the noise on a stream of its own. None: on the CPU only, where it runs on
        a second core while the model runs (measured: 0.86 -> 1.0 of the raw forward rate for an MLP);
        on a GPU the extra stream's synchronisation cost more than it saved (measured on an H200).
        """
        if overlap is None:
            overlap = mx.default_device().type == mx.cpu
        params, fingerprint = model_arrays(self.model, False)
        if fingerprint != self._traced:
            self.clear()
            self._traced = fingerprint
        model = self.model

        def forward(p: list[mx.array], xb: mx.array) -> mx.array:
            # On a shallow copy in eval mode: the model itself is never touched.
            return model_copy(model, p, False)(xb)

        # Concrete keys: the core slices them on its noise stream, which must not wait on lazy work.
        mx.eval(x, keys)
        try:
            counts, nonfinite = self.engine.vote_counts(
                forward, params, x, keys, n=n, sigma=sigma, batch_size=batch_size,
                num_classes=num_classes, overlap=overlap,
            )
            return (counts, nonfinite) if with_nonfinite else counts
        except BaseException:  # an interrupt too: the next call traces afresh
            self.engine.clear()
            raise


def chunk_rows(n: int, batch_size: int) -> list[int]:
    """Rows of each model batch that draws ``n`` noisy copies of one input."""
    return list(_core.chunk_rows(n, batch_size))


def smoothed_predict(counts: mx.array, alpha: float, nonfinite: Optional[mx.array] = None) -> mx.array:
    """PREDICT on vote counts (N, C): top class, or -1 where the binomial test has p > alpha (or no
    draw voted; ``nonfinite``: (N,) draws that voted for no class)."""
    return _core.smoothed_predict(counts, alpha, nonfinite)


def certify_from_counts(
    counts0: mx.array,
    counts: mx.array,
    sigma: float,
    alpha: float,
    nonfinite0: Optional[mx.array] = None,
    nonfinite: Optional[mx.array] = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """CERTIFY on selection and estimation counts: (prediction, radius, p_lower). ``nonfinite0`` /
    ``nonfinite``: (N,) draws of each stage that voted for no class (the estimation's count in n)."""
    return _core.certify_from_counts(counts0, counts, sigma, alpha, nonfinite0, nonfinite)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    return _core.clopper_pearson_lower(k, n, alpha)


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    return _core.clopper_pearson_upper(k, n, alpha)


def binomial_test_pvalue(k: int, n: int, p: float = 0.5) -> float:
    return _core.binomial_test_pvalue(k, n, p)


def normal_ppf(p: float) -> float:
    return _core.normal_ppf(p)


def normal_cdf(x: float) -> float:
    return _core.normal_cdf(x)


def betainc(a: float, b: float, x: float) -> float:
    return _core.betainc(a, b, x)


def betaincinv(a: float, b: float, p: float) -> float:
    return _core.betaincinv(a, b, p)


# --- Square attack (score-based black box; csrc/square.h) --------------------------------------

def square_engine(fn: ModelFunction) -> "_core.SquareEngine":
    """The Square attack's compiled engine for ``fn``'s model, created on first use."""
    return fn.square_engine


def square_trace_count(fn: ModelFunction) -> int:
    """How often the Square engine of ``fn`` traced the model (0 before its first run)."""
    engine = fn.__dict__.get("_square_engine")
    return 0 if engine is None else engine.trace_count


def run_square(
    fn: ModelFunction,
    x: mx.array,
    y: mx.array,
    eps: mx.array,
    bounds: tuple[float, float],
    *,
    num_classes: int,
    norm: str,
    loss: str,
    n_queries: int,
    p_init: float,
    targeted: bool,
    early_stop: bool,
    unroll: int,
    key: mx.array,
    training: bool = False,
    rows: Optional[mx.array] = None,
) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array, mx.array]:
    """Run the compiled Square attack; returns (x_adv, success, loss, logits, norms, queries).

    ``x`` is NHWC. A random defence of ``fn`` gets one draw per query (no EOT: a black-box
    attacker sees one answer per query). The model runs in ``training`` mode (eval by default).
    """
    return fn._run_engine(
        fn.square_engine,
        x,
        y,
        eps,
        mx.array(bounds[0], mx.float32),
        mx.array(bounds[1], mx.float32),
        training=training,
        num_classes=num_classes,
        norm=norm,
        loss=loss,
        n_queries=n_queries,
        p_init=p_init,
        targeted=targeted,
        early_stop=early_stop,
        unroll=unroll,
        key=key,
        rows=rows,
    )


def square_schedule(n_queries: int, p_init: float, shape: Sequence[int], norm: str) -> list[int]:
    """Window side per iteration (n_queries - 1 of them) for NHWC images of ``shape`` (H, W, C)."""
    h, w, c = shape
    return [
        _core.square_window_size(p_init / 2 ** _core.square_level(i, n_queries), h, w, c, norm)
        for i in range(n_queries - 1)
    ]


def square_pattern(s: int, transpose: bool = False) -> list[float]:
    """The core's s x s L2 update pattern of the Square attack, row-major."""
    return list(_core.square_pattern(s, transpose))


# --- the core's exact max-pooling rewrite (mlx_robust.graph is its public face) ----------------

def set_fast_pool(enabled: bool) -> None:
    _core.set_fast_pool(enabled)


def fast_pool_enabled() -> bool:
    return bool(_core.fast_pool_enabled())
