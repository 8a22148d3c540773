"""The one bridge to the C++ core.

Turns an ``nn.Module`` into a pure function of ``(params, x)``, owns the compiled objects, and
saves/restores the model's parameters and train/eval mode around every call into C++.
Nothing else in the package imports ``_core``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

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


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for _, m in model.named_modules()]


@contextmanager
def preserved(
    model: nn.Module,
    training: Optional[bool] = None,
    params: Optional[list[tuple[str, mx.array]]] = None,
) -> Iterator[None]:
    """Run a block with the model's parameters and per-module train/eval flags restored after.

    ``training`` (if not None) sets the mode for the block. Restores also when the block raises,
    including when MLX left placeholder arrays in the module after a failed trace. ``params``:
    the model's ``tree_flatten(model.parameters())`` if the caller already has it.
    """
    params = tree_flatten(model.parameters()) if params is None else params
    modes = _module_modes(model)
    switch = training is not None and any(mode != training for _, mode in modes)
    try:
        if switch:
            model.train(training)
        yield
    finally:
        # Put back every parameter the block replaced (compare identities: cheaper than update()).
        now = tree_flatten(model.parameters())
        if len(now) != len(params) or any(a is not b or k != j for (k, a), (j, b) in zip(now, params)):
            model.update(tree_unflatten(params))
        if switch:
            for module, mode in modes:
                # Module.train() sets every submodule; restore each one's own flag.
                module._training = mode


class ModelFunction:
    """An ``nn.Module`` seen as ``f(params, x) -> logits``, plus its C++ attack engine.

    The engine's compiled steps take the flattened parameters as inputs, so an optimizer update
    between calls is always seen (never baked in as constants).
    """

    def __init__(self, model: nn.Module, transform: Optional[Callable[[mx.array, mx.array], mx.array]] = None) -> None:
        self.model = model
        # A random input transform (a defence) applied before the model: transform(x, key).
        self.transform = transform
        self.engine = _core.AttackEngine()

    def flat_parameters(self) -> tuple[list[str], list[mx.array]]:
        flat = tree_flatten(self.model.parameters())
        return [k for k, _ in flat], [v for _, v in flat]

    @property
    def stochastic(self) -> bool:
        return self.transform is not None

    def _forward(self, names: list[str], originals: list[mx.array]) -> Callable:
        model, transform = self.model, self.transform

        def forward(params: list[mx.array], x: mx.array) -> mx.array:
            if transform is not None:
                # The engine appends the draw's key to the parameters of a stochastic model.
                *params, key = params
                x = transform(x, key)
            model.update(tree_unflatten(list(zip(names, params))))
            try:
                return model(x)
            finally:
                model.update(tree_unflatten(list(zip(names, originals))))

        return forward

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
    ) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
        """Run the compiled attack loop; returns (x_adv, success, loss, logits, norms).

        ``probs`` (N, C): clean probabilities, needed by ``loss="kl"`` (TRADES' inner attack).
        ``training`` is the mode the model runs in during the attack (eval by default).
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
        """``engine.run(forward, params, *args, **kwargs)`` with the model restored afterwards.

        The model runs in ``training`` mode (eval by default); on any error the engine drops its
        compiled entries so that the next call traces afresh.
        """
        flat = tree_flatten(self.model.parameters())
        names, params = [k for k, _ in flat], [v for _, v in flat]
        forward = self._forward(names, params)
        with preserved(self.model, training=training, params=flat):
            try:
                return engine.run(forward, params, *args, stochastic=self.stochastic, **kwargs)
            except BaseException:  # KeyboardInterrupt too
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
        )


class SmoothedFunction:
    """An ``nn.Module`` as ``f(params, x)`` for randomized smoothing, plus its C++ sampling engine.

    The engine's compiled chunk function takes the flattened parameters, the chunk's PRNG key and
    sigma as inputs, so neither an optimizer update nor a new key is ever baked in.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.engine = _core.SmoothingEngine()

    @property
    def trace_count(self) -> int:
        return self.engine.trace_count

    def clear(self) -> None:
        self.engine.clear()

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
    ) -> mx.array:
        """(N, num_classes) int32 votes of the model (in eval mode) under N(0, sigma^2) noise.

        ``overlap``: draw the noise on a stream of its own. None: on the CPU only, where it runs on
        a second core while the model runs (measured: 0.86 -> 1.0 of the raw forward rate for an MLP);
        on a GPU the extra stream's synchronisation cost more than it saved (measured on an H200).
        """
        if overlap is None:
            overlap = mx.default_device().type == mx.cpu
        flat = tree_flatten(self.model.parameters())
        names, params = [k for k, _ in flat], [v for _, v in flat]
        model = self.model

        def forward(p: list[mx.array], xb: mx.array) -> mx.array:
            model.update(tree_unflatten(list(zip(names, p))))
            try:
                return model(xb)
            finally:
                model.update(tree_unflatten(list(zip(names, params))))

        # Concrete keys: the core slices them on its noise stream, which must not wait on lazy work.
        mx.eval(x, keys)
        with preserved(model, training=False):
            try:
                return self.engine.vote_counts(
                    forward, params, x, keys, n=n, sigma=sigma, batch_size=batch_size,
                    num_classes=num_classes, overlap=overlap,
                )
            except BaseException:  # KeyboardInterrupt too
                self.engine.clear()
                raise


def chunk_rows(n: int, batch_size: int) -> list[int]:
    """Rows of each model batch that draws ``n`` noisy copies of one input."""
    return list(_core.chunk_rows(n, batch_size))


def smoothed_predict(counts: mx.array, alpha: float) -> mx.array:
    """PREDICT on vote counts (N, C): top class, or -1 where the binomial test has p > alpha."""
    return _core.smoothed_predict(counts, alpha)


def certify_from_counts(
    counts0: mx.array, counts: mx.array, sigma: float, alpha: float
) -> tuple[mx.array, mx.array, mx.array]:
    """CERTIFY on selection and estimation counts: (prediction, radius, p_lower)."""
    return _core.certify_from_counts(counts0, counts, sigma, alpha)


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
