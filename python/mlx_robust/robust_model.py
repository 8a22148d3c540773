"""RobustModel: one-line wrapper for defended inference and attacks."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_robust import _functional
from mlx_robust._checks import fresh_key, is_int
from mlx_robust._compat import deprecated_call
from mlx_robust.attacks import PGD, Attack, AttackResult
from mlx_robust.attacks.base import merge_results
from mlx_robust.defences.noise import GaussianNoise
from mlx_robust.defences.smoothing import Certification, Smoothing, certify, smoothed_predict
from mlx_robust.validation import POLICIES, ValidationReport, as_labels, check_bounds, validate, validate_deferred


def key(seed: int) -> mx.array:
    """An explicit PRNG key (``mx.random.key``); attacks given the same key give the same result."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return mx.random.key(seed)


class RobustModel:
    """Wrap an ``mlx.nn.Module`` classifier for validated inference and attacks.

    The wrapped model is never changed by this class, not even while a call runs (another thread
    may serve it meanwhile): every call runs a shallow copy of its module tree (new Module objects
    sharing its arrays), so its parameters, attributes, child modules and train/eval modes stay as
    they were, and a forward that assigns attributes (BatchNorm's running statistics in train mode,
    a cached tensor) assigns them on the copy. Attacks, ``predict`` and smoothing run the model in
    eval mode; ``robust(x)`` runs it in the mode each module is in.

    Compiled attack and smoothing graphs are reused across calls; each call checks that the model
    is still the one traced (module types and structure, non-array attribute values, names, shapes
    and dtypes of its arrays) and traces again if not. Every array, private ``_name`` ones included,
    is an input of the compiled graphs, so new values are always seen. ``clear()`` drops them all.

    Args:
        model: classifier mapping a batch (N, *input_shape) to logits (N, num_classes).
        bounds: valid input range (lo, hi); inputs and adversarial examples stay inside it.
        input_shape: shape of one sample, e.g. (28, 28, 1); None accepts any shape.
        num_classes: number of classes; None infers it from the first forward pass.
        on_invalid: "raise" (default) or "clip" for inputs outside ``bounds`` (NaN/Inf always raise).
        noise: a random input defence (``mr.GaussianNoise(std)``) applied before the model in
            ``robust(x)``, ``predict`` and attacks; attacks then use EOT by default.
        smoothing: randomized smoothing (``mr.Smoothing(sigma)``, Cohen et al. 2019): ``predict``
            returns the smoothed class (-1 = abstain) and ``certify`` a certified L2 radius.
            ``robust(x)`` and attacks still see the base model.

    Example:
        >>> robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
        >>> logits = robust(x)
        >>> res = robust.attack(x, y, mr.PGD(eps=0.1, steps=20), key=mr.key(0))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bounds: tuple[float, float] = (0.0, 1.0),
        input_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        on_invalid: str = "raise",
        noise: Optional[GaussianNoise] = None,
        smoothing: Optional[Smoothing] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}")
        lo, hi = check_bounds(bounds)
        if input_shape is not None:
            input_shape = tuple(input_shape)
            if not input_shape or not all(isinstance(d, int) and d > 0 for d in input_shape):
                raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if on_invalid not in POLICIES:
            raise ValueError(f"on_invalid must be one of {POLICIES}, got {on_invalid!r}")
        if noise is not None and not isinstance(noise, GaussianNoise):
            raise TypeError(f"noise must be an mr.GaussianNoise, got {type(noise).__name__}")
        if smoothing is not None and not isinstance(smoothing, Smoothing):
            raise TypeError(f"smoothing must be an mr.Smoothing, got {type(smoothing).__name__}")
        if smoothing is not None and noise is not None:
            raise ValueError("pass either noise= (a random input defence) or smoothing= (randomized smoothing), not both")
        self.noise = noise
        self.smoothing = smoothing
        # Materialise the model's arrays here: MLX evaluates a lazy array only in the thread whose
        # stream built it, and this lets any thread attack, predict or certify a freshly built model.
        mx.eval(_functional.model_arrays(model)[0])
        self._smooth_fn = _functional.SmoothedFunction(model)
        self._fn = _functional.ModelFunction(model, transform=None if noise is None else noise.apply)
        self.bounds = (lo, hi)
        self.input_shape = input_shape
        self._num_classes = num_classes
        self.on_invalid = on_invalid

    @property
    def model(self) -> nn.Module:
        """The wrapped model (never modified by this wrapper)."""
        return self._fn.model

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            raise ValueError("num_classes is not known yet: pass it to RobustModel or call the model once")
        return self._num_classes

    @property
    def known_num_classes(self) -> Optional[int]:
        """The number of classes if given or already seen in an output, else None."""
        return self._num_classes

    def infer_num_classes(self, x: mx.array, *, check: bool = False) -> int:
        """The number of classes, running the model once on ``x[:1]`` (in eval mode) if it is not
        known yet. ``check``: validate that input and require finite logits, as ``predict`` does."""
        if self._num_classes is None:
            if check:
                self.base_predict(x[:1])
            else:
                self.forward(x[:1], training=False)
        return self.num_classes

    @property
    def engine(self) -> "_functional.ModelFunction":
        """The compiled engine the attacks run this model on (``run_attack``, ``run_apgd``,
        ``run_cw``, ``run_square``): the interface between ``attacks/`` and the model."""
        return self._fn

    @property
    def smoothing_engine(self) -> "_functional.SmoothedFunction":
        """The engine randomized smoothing samples and counts votes with (``vote_counts``)."""
        return self._smooth_fn

    @property
    def trace_count(self) -> int:
        """How often the attack core traced the model (Python ran inside a step)."""
        return self._fn.trace_count

    @property
    def is_random(self) -> bool:
        """True when a random defence makes the wrapped prediction random (attacks use EOT)."""
        return self.noise is not None

    def eot_samples(self, requested: Optional[int] = None) -> int:
        """Draws per attack step: ``requested``, else the defence's default, 1 if deterministic."""
        if not self.is_random:
            return 1
        return requested if requested is not None else self.noise.eot_samples

    def validate(self, x: Any, *, name: str = "x") -> tuple[mx.array, ValidationReport]:
        """Validate a batch with this model's bounds, input shape and policy (see ``validate``)."""
        return validate(x, bounds=self.bounds, input_shape=self.input_shape, policy=self.on_invalid, name=name)

    def clear(self) -> None:
        """Drop every compiled graph of this model (attacks and smoothing); the next call traces it
        again. Not needed after changing the model: each call detects a changed model by itself
        (types, structure, attribute values, array shapes); useful to free memory, or after changing
        state that is not visible from the module tree (e.g. a global read by the forward)."""
        self._fn.clear()
        self._smooth_fn.clear()

    def forward(
        self,
        x: mx.array,
        key: Optional[mx.array] = None,
        rows: Optional[mx.array] = None,
        training: Optional[bool] = None,
    ) -> mx.array:
        """The defended model's logits on a validated batch ``x``, on a shallow copy of the model (the model is never touched),
        in ``training`` mode; None: each module's own mode. A random defence draws row i from
        row_keys(key, rows)[i] (rows: global sample indices, default 0..N-1), as in the attack
        engines; without a key, from MLX's global generator."""
        if self.noise is not None:
            if key is not None:
                rows = mx.arange(x.shape[0], dtype=mx.uint32) if rows is None else rows
                x = self.noise.apply(x, _functional.row_keys(key, rows))
            else:
                x = self.noise.apply(x)
        logits = _functional.model_forward(self.model, x, training)
        if not isinstance(logits, mx.array) or not mx.issubdtype(logits.dtype, mx.floating):
            got = logits.dtype if isinstance(logits, mx.array) else type(logits).__name__
            raise ValueError(f"the model must return an mx.array of floating-point logits, got {got}")
        expected_c = self._num_classes if self._num_classes is not None else "C"
        if logits.ndim != 2 or logits.shape[0] != x.shape[0] or (
            self._num_classes is not None and logits.shape[1] != self._num_classes
        ):
            raise ValueError(
                f"the model's output must have shape ({x.shape[0]}, {expected_c}), got {tuple(logits.shape)}"
            )
        if self._num_classes is None:
            if logits.shape[1] < 2:
                raise ValueError(f"the model must output at least 2 logits per sample, got {logits.shape[1]}")
            self._num_classes = int(logits.shape[1])
        return logits

    def __call__(self, x: Any, *, key: Optional[mx.array] = None) -> mx.array:
        """Validated forward pass: logits (N, num_classes). Differentiable with respect to x.

        Runs the model in the train/eval mode each of its modules is in (a model in train mode runs
        as in training, e.g. BatchNorm on batch statistics), but never changes it: what the forward
        assigns (BatchNorm's running statistics) lands on a copy and is dropped. With ``noise``,
        ``key`` (``mr.key(seed)``) makes the draw reproducible: sample i's noise depends only on
        ``key`` and i; None draws from MLX's global generator.
        """
        x, _ = self.validate(x)
        if key is not None:
            _check_key(key)
        return self.forward(x, key)

    def defended_logits(self, x: mx.array, key: Optional[mx.array], rows: Optional[mx.array], draws: int) -> mx.array:
        """float32 logits (N, C) in eval mode: the model's, or with ``noise`` the mean over ``draws``
        draws keyed per sample by ``key`` and ``rows`` (what an attack's logits mean: EOT)."""
        if self.noise is None or key is None:
            return self.forward(x, training=False).astype(mx.float32)
        keys = mx.random.split(key, max(draws, 1))
        total = sum(self.forward(x, keys[e], rows, training=False).astype(mx.float32) for e in range(max(draws, 1)))
        return total / max(draws, 1)

    def clean_probabilities(self, x: mx.array) -> mx.array:
        """Softmax of the model on a validated batch, in eval mode, without noise (a constant)."""
        logits = _functional.model_forward(self.model, x, training=False)
        return mx.stop_gradient(mx.softmax(logits.astype(mx.float32), axis=-1))

    def predict(self, x: Any, *, key: Optional[mx.array] = None) -> mx.array:
        """Predicted classes (N,) int32 of a validated batch, computed in eval mode.

        With ``smoothing``: the smoothed classifier's PREDICT (Cohen et al. 2019,
        https://arxiv.org/abs/1902.02918), -1 where it abstains; ``key`` (``mr.key(seed)`` or (N, 2)
        per-input keys) makes it reproducible. With ``noise``, ``key`` (``mr.key(seed)``) keys each
        sample's draw by the key and its index (reproducible, independent of batching); None draws
        from MLX's global generator. Deterministic models ignore ``key``.
        """
        if self.smoothing is not None:
            return smoothed_predict(self, x, key=key)
        if key is not None and self.noise is not None:
            _check_key(key)
            return self.base_predict(x, key)
        return self.base_predict(x)

    def base_predict(self, x: Any, key: Optional[mx.array] = None) -> mx.array:
        """Predicted classes (N,) int32 of the model itself (with ``noise`` if configured, never
        smoothing): validates ``x``, eval mode, requires finite logits."""
        x, _ = self.validate(x)
        logits = self.forward(x, key, training=False)
        _check_finite_logits(logits)
        return mx.argmax(logits, axis=-1).astype(mx.int32)

    def attack(
        self,
        x: Any,
        y: Any = None,
        attack: Optional[Attack] = None,
        *,
        y_target: Any = None,
        key: Optional[mx.array] = None,
        batch_size: Optional[int] = None,
        progress: bool = False,
    ) -> AttackResult:
        """Attack a batch; the model is left exactly as it was.

        Args:
            x: clean inputs (N, *input_shape) inside ``bounds``.
            y: true labels (N,); None attacks the model's own predictions.
            attack: an attack configuration, e.g. ``PGD(...)`` or ``FGSM(...)``; default ``PGD()``.
            y_target: (N,) target classes for a targeted attack (success = predicted as target).
            key: PRNG key for random starts (``mr.key(seed)``); None draws one from ``mx.random``.
            batch_size: attack in chunks of this many samples (bounded memory); None = all at once.
            progress: show a progress bar over chunks.

        Returns:
            AttackResult with x_adv, success, norms, logits and loss per sample.
        """
        attack = PGD() if attack is None else attack
        if not isinstance(attack, Attack):
            raise TypeError(f"attack must be an attack configuration such as mr.PGD(...), got {type(attack).__name__}")
        # The counts are read after the attack is queued (no device round trip before it); a bad
        # batch still raises validate's error, before any error the attack itself ran into.
        x, finish_validation = validate_deferred(
            x, bounds=self.bounds, input_shape=self.input_shape, policy=self.on_invalid, name="x"
        )
        try:
            result = self._attack(x, y, attack, y_target, key, batch_size, progress)
        except Exception:
            finish_validation()
            raise
        finish_validation()
        return result

    def _attack(self, x, y, attack, y_target, key, batch_size, progress) -> AttackResult:
        n = x.shape[0]
        self.infer_num_classes(x)
        y = self.base_predict(x) if y is None else as_labels(y, n, self.num_classes, "y")
        targets = None if y_target is None else as_labels(y_target, n, self.num_classes, "y_target")
        if key is None:
            key = fresh_key()
        else:
            _check_key(key)
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        step = n if batch_size is None else batch_size
        starts = range(0, n, step)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=attack.name, unit="batch", leave=False)
        per_sample = _per_sample_fields(attack)
        for field, value in per_sample.items():
            if value.shape != (n,):
                raise ValueError(f"{field} must be a number or have shape ({n},) (one per sample), got shape {value.shape}")
        # Low precision (float16/bfloat16): the attack runs in float32 (as the engines do inside);
        # _low_precision_result then rounds x_adv toward x into x's dtype and recomputes every
        # field on exactly that array.
        low = x.dtype in LOW_PRECISION
        x_run = x.astype(mx.float32) if low else x
        parts = []
        for s in starts:
            sl = slice(s, min(s + step, n))
            chunk = dataclasses.replace(attack, **{f: v[sl] for f, v in per_sample.items()}) if per_sample else attack
            # Global sample indices: a random defence's draws are keyed per sample by them, so the
            # result does not depend on batch_size (nor on early stop, inside the engines).
            rows = mx.arange(sl.start, sl.stop, dtype=mx.uint32)
            t = None if targets is None else targets[sl]
            part = chunk.run(self, x_run[sl], y[sl], t, key, rows=rows)
            if low:
                part = self._low_precision_result(chunk, x[sl], part, t, key, rows)
            parts.append(part)
        for part in parts:
            _check_finite_logits(part.logits)
        if len(parts) == 1:
            return parts[0]
        return merge_results(parts, y=y, y_target=targets)

    def _low_precision_result(
        self, attack: Attack, x: mx.array, res: AttackResult, y_target: Optional[mx.array], key: mx.array,
        rows: mx.array,
    ) -> AttackResult:
        """``res`` (attacked in float32) with x_adv rounded toward ``x`` in x's dtype, and success,
        norms, logits and loss recomputed on exactly that array: logits by a final forward in eval
        mode (with ``noise``: the mean over the attack's EOT draws, keyed per sample as in the
        engines from a stream of ``key`` the attack does not use), loss by the attack's own
        objective, norms in the attack's norm."""
        x_adv = round_toward(res.x_adv, x)
        final_key = _functional.row_keys(key, mx.array([_FINAL_STREAM], dtype=mx.uint32))[0]
        logits = self.defended_logits(x_adv, final_key, rows, res.eot_samples)
        pred = mx.argmax(logits, axis=-1)
        success = pred == y_target if y_target is not None else pred != res.y
        loss = attack.result_loss(self, x, logits, res.y, y_target, rows=rows, key=final_key)
        delta = (x_adv.astype(mx.float32) - x.astype(mx.float32)).reshape(x.shape[0], -1)
        norm = getattr(attack, "norm", "linf")
        norms = mx.max(mx.abs(delta), axis=1) if norm == "linf" else mx.sqrt(mx.sum(delta * delta, axis=1))
        mx.eval(x_adv, success, norms, logits, loss)
        return dataclasses.replace(
            res, x_adv=x_adv, success=success, norms=norms, logits=logits, loss=loss.astype(mx.float32)
        )

    def certify(
        self,
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
        """CERTIFY (Cohen et al. 2019, https://arxiv.org/abs/1902.02918): smoothed class and certified
        L2 radius per input; -1 and radius 0 where it abstains. Settings default to ``smoothing``
        (``sigma=`` is required without it). See :func:`mlx_robust.defences.smoothing.certify`.

        Example:
            >>> cls, radius = robust.certify(x, n0=100, n=100_000, alpha=1e-3, key=mr.key(0))
        """
        return certify(self, x, n0=n0, n=n, alpha=alpha, sigma=sigma, batch_size=batch_size, key=key,
                       progress=progress)

    def adversarial_value_and_grad(self, loss_fn: Any, *, attack: Optional[PGD] = None, method: str = "pgd-at", **params: Any) -> Any:
        """Deprecated alias of ``mr.adversarial_value_and_grad(self, ...)`` (a DeprecationWarning;
        removed in the next release: ``RobustModel`` holds no training, as ``nn.Module`` does not).

        The same object then serves training and defended inference; its bounds, input shape and
        validation apply to the training batches. Methods and parameters (``beta``,
        ``clean_weight``, ``sigma``, ``replays``): see :func:`mlx_robust.adversarial_value_and_grad`
        (PGD-AT, Madry et al. 2018; TRADES, Zhang et al. 2019; MART, Wang et al. 2020; ...).

        Example:
            >>> loss_and_grad = robust.adversarial_value_and_grad(loss_fn, attack=mr.PGD(eps=0.1, steps=7))
            >>> loss, grads = loss_and_grad(robust.model, x, y)
        """
        free = deprecated_call("RobustModel.adversarial_value_and_grad", "mlx_robust", "adversarial_value_and_grad")
        return free(self, loss_fn, attack=attack, method=method, **params)


LOW_PRECISION = (mx.float16, mx.bfloat16)
_FINAL_STREAM = 0x9E3779B9  # mixed into the call's key for the low-precision final forward's draws


def _check_key(key: Any) -> None:
    if not isinstance(key, mx.array):
        raise TypeError(f"key must be a PRNG key from mr.key(seed), got {type(key).__name__}")
    if key.shape != (2,) or key.dtype != mx.uint32:
        raise ValueError("key must be a PRNG key from mr.key(seed) or mx.random.key(seed)")


def round_toward(x_adv: mx.array, x: mx.array) -> mx.array:
    """``x_adv`` (float32) cast to ``x``'s dtype (float16/bfloat16), rounding toward ``x``.

    Where the cast rounded away from ``x`` past the float32 value, the result steps one ulp back
    toward ``x`` (``x`` is representable, so it never passes it): elementwise
    ``|out - x| <= |x_adv - x|``, so an L-inf or L2 ball around ``x`` and the bounds (which hold
    both ``x`` and ``x_adv``) still hold for the returned array in its own dtype.
    """
    if x.dtype not in LOW_PRECISION:
        return x_adv.astype(x.dtype)
    x32 = x.astype(mx.float32)
    low = x_adv.astype(x.dtype)
    back = low.astype(mx.float32)
    away = mx.abs(back - x32) > mx.abs(x_adv - x32)
    bits = mx.view(low, mx.uint16)
    one = mx.array(1, dtype=mx.uint16)
    inc, dec = bits + one, bits - one
    # Sign-magnitude neighbours; from zero, the smallest subnormal of either sign.
    larger = mx.where(back > 0, inc, mx.where(back < 0, dec, mx.array(0x0001, dtype=mx.uint16)))
    smaller = mx.where(back > 0, dec, mx.where(back < 0, inc, mx.array(0x8001, dtype=mx.uint16)))
    stepped = mx.where(back > x32, smaller, larger)
    return mx.view(mx.where(away, stepped, bits), x.dtype)


def _check_finite_logits(logits: mx.array) -> None:
    # On the host: the logits are already evaluated, so this costs a copy, not a device round trip.
    host = np.array(logits if logits.dtype == mx.float32 else logits.astype(mx.float32))
    bad = np.flatnonzero(~np.isfinite(host).all(axis=-1))
    if bad.size:
        raise ValueError(
            f"the model returned NaN/Inf logits for {bad.size} sample(s); first offending samples: "
            f"{bad[:10].tolist()}"
        )


def _per_sample_fields(attack: Attack) -> dict[str, np.ndarray]:
    """The attack's per-sample (vector) settings, to be sliced with the batch."""
    out = {}
    for field in attack.per_sample_fields:
        value = getattr(attack, field)
        if value is not None and np.ndim(value) != 0:
            out[field] = np.asarray(value, dtype=np.float32)
    return out
