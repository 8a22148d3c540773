"""Adversarial training objectives that slot into an ordinary MLX training loop.

``adversarial_value_and_grad(model, loss_fn, attack=..., method=...)`` returns a drop-in
replacement for ``nn.value_and_grad(model, loss_fn)``: same call ``(model, x, y)``, same result
``(loss, grads)``, but the loss is the chosen robust-training objective, and the inner attack runs
in the C++ core on the model's *current* parameters (in eval mode; the update then runs in the
mode the user chose).

Attacks evaluate arrays, which MLX forbids inside an ``mx.compile`` trace. For a compiled training
step, split the call in two: ``x_adv = loss_and_grad.perturb(model, x, y)`` outside the compiled
step, and ``loss_and_grad.value_and_grad(model, x, x_adv, y)`` inside it. The "noise" and "free"
methods run no attack and work entirely inside ``mx.compile`` (with ``mx.random.state`` and, for
"free", ``loss_and_grad.state`` in the compiled state).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_robust import _functional
from mlx_robust._checks import fresh_key
from mlx_robust.attacks import PGD
from mlx_robust.robust_model import RobustModel
from mlx_robust.validation import as_labels, check_bounds

__all__ = ["METHODS", "AdversarialValueAndGrad", "adversarial_value_and_grad", "kl_divergence"]

LossFn = Callable[..., mx.array]

#: Training methods understood by :func:`adversarial_value_and_grad`.
METHODS = ("pgd-at", "trades", "mart", "fgsm-rs", "free", "noise", "mix")

# Methods whose perturbation comes from the C++ attack (cannot run inside an mx.compile trace).
_ATTACK_METHODS = ("pgd-at", "trades", "mart", "fgsm-rs", "mix")

_COMPILE_HINT = (
    "the adversarial attack evaluates arrays, which MLX does not allow inside mx.compile (or vmap). "
    "Run the attack outside the compiled step and pass its result in:\n"
    "    x_adv = loss_and_grad.perturb(model, x, y)          # outside mx.compile\n"
    "    loss, grads = loss_and_grad.value_and_grad(model, x, x_adv, y)  # inside the compiled step\n"
    "(methods 'noise' and 'free' run no attack and work inside mx.compile as they are)"
)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_trace(*arrays: mx.array) -> bool:
    """True inside an mx.compile / vmap trace (where these arrays cannot be evaluated)."""
    try:
        mx.eval(*arrays)
    except ValueError as exc:
        if "function transformations" in str(exc):
            return True
        raise
    return False


def kl_divergence(clean_logits: mx.array, adv_logits: mx.array) -> mx.array:
    """Per-sample ``KL(softmax(clean_logits) || softmax(adv_logits))``, shape (N,).

    TRADES' robust regulariser (Zhang et al. 2019, https://arxiv.org/abs/1901.08573); computed from
    log-softmax so it is finite for saturated predictions. Differentiable in both arguments.
    """
    log_p = nn.log_softmax(clean_logits.astype(mx.float32), axis=-1)
    log_q = nn.log_softmax(adv_logits.astype(mx.float32), axis=-1)
    return mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)


def _mart_terms(clean_logits: mx.array, adv_logits: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
    """MART's margin term and misclassification-weighted KL (Wang et al. 2020, official code)."""
    adv_probs = mx.softmax(adv_logits.astype(mx.float32), axis=-1)
    classes = mx.arange(adv_logits.shape[-1])[None, :]
    is_y = classes == y[:, None]
    # The most likely wrong class on x_adv (the second of the top two when the top one is y).
    other = mx.stop_gradient(mx.argmax(mx.where(is_y, -mx.inf, adv_logits), axis=-1))
    p_other = mx.take_along_axis(adv_probs, other[:, None], axis=-1)[:, 0]
    margin = mx.mean(-mx.log(1.0001 - p_other + 1e-12))
    clean_probs = mx.softmax(clean_logits.astype(mx.float32), axis=-1)
    p_true = mx.take_along_axis(clean_probs, y[:, None], axis=-1)[:, 0]
    weighted_kl = mx.mean(kl_divergence(clean_logits, adv_logits) * (1.0000001 - p_true))
    return margin, weighted_kl


class AdversarialValueAndGrad:
    """``nn.value_and_grad(model, loss_fn)`` with a robust-training objective (see
    :func:`adversarial_value_and_grad`, which builds it).

    Call it as ``loss, grads = loss_and_grad(model, x, y, *args, **kwargs)``; extra arguments go to
    ``loss_fn``. For a compiled step use :meth:`perturb` outside and :meth:`value_and_grad` inside.

    Attributes:
        robust: the :class:`RobustModel` whose bounds, input shape and validation apply.
        method: the training method (one of :data:`METHODS`).
        attack: the inner attack actually run (None for "noise"), with early stop off.
        beta, clean_weight, sigma, replays: the method's parameters (None where unused).
        state: mutable state to list in ``mx.compile(inputs=..., outputs=...)``: Free-AT's
            persistent perturbation ``{"delta": ...}``; empty for the other methods.
    """

    def __init__(
        self,
        robust: RobustModel,
        loss_fn: LossFn,
        *,
        method: str,
        attack: Optional[PGD],
        beta: Optional[float],
        clean_weight: Optional[float],
        sigma: Optional[float],
        replays: Optional[int],
    ) -> None:
        self.robust = robust
        self.loss_fn = loss_fn
        self.method = method
        self.attack = attack
        self.beta = beta
        self.clean_weight = clean_weight
        self.sigma = sigma
        self.replays = replays
        self.state: dict[str, mx.array] = {}
        self._value_and_grad = nn.value_and_grad(robust.model, self._objective)

    def __repr__(self) -> str:
        params = {k: getattr(self, k) for k in ("beta", "clean_weight", "sigma", "replays")}
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items() if v is not None)
        return f"AdversarialValueAndGrad(method={self.method!r}, attack={self.attack!r}{', ' + shown if shown else ''})"

    @property
    def model(self) -> nn.Module:
        """The model being trained (the user's object, updated in place by the optimizer)."""
        return self.robust.model

    @property
    def compiles(self) -> bool:
        """True if the whole call can run inside ``mx.compile`` (methods "noise" and "free")."""
        return self.method not in _ATTACK_METHODS

    # ---- checks -------------------------------------------------------------------------------

    def _check_model(self, model: Any) -> None:
        if model is not self.model:
            raise ValueError(
                "model is not the model this loss_and_grad was made for: "
                "pass the same nn.Module given to adversarial_value_and_grad"
            )

    def _check_structure(self, x: Any, y: Any, x_adv: Any = None) -> None:
        """Shapes and dtypes only (works on traced arrays)."""
        for name, a in (("x", x), ("y", y)) + ((("x_adv", x_adv),) if x_adv is not None else ()):
            if not isinstance(a, mx.array):
                raise TypeError(f"{name} must be an mx.array inside a compiled step, got {type(a).__name__}")
        _functional.check_batch_structure(x, self.robust.input_shape, "x")
        if x_adv is not None and (x_adv.shape != x.shape):
            raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        if not mx.issubdtype(y.dtype, mx.integer):
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")

    def _prepare(self, x: Any, y: Any) -> tuple[mx.array, mx.array]:
        """Validate a training batch with the RobustModel's bounds, shape and policy."""
        x, _ = self.robust.validate(x)
        robust = self.robust
        robust.infer_num_classes(x)
        return x, as_labels(y, x.shape[0], robust.num_classes, "y")

    # ---- the perturbation ---------------------------------------------------------------------

    def perturb(self, model: nn.Module, x: Any, y: Any, *, key: Optional[mx.array] = None) -> mx.array:
        """The training input for this batch, as a plain evaluated array (outside mx.compile).

        "pgd-at", "mix", "mart": the last PGD iterate (CE or the attack's loss; Madry et al. 2018).
        "trades": PGD on ``KL(f(x) || f(x'))`` (Zhang et al. 2019). "fgsm-rs": one signed step of
        1.25 eps from a uniform random start (Wong et al. 2020). "noise": ``x + sigma * N(0, I)``
        (Cohen et al. 2019). "free": ``x + delta`` with Free-AT's current persistent perturbation
        (Shafahi et al. 2019).

        The attack runs the model in eval mode on its current parameters; the model is left exactly
        as it was. ``key``: PRNG key for the random start / noise; None draws one from
        ``mx.random`` (so ``mx.random.seed`` makes runs repeatable).
        """
        self._check_model(model)
        if _in_trace(*(a for a in (x, y) if isinstance(a, mx.array))):
            raise RuntimeError(f"loss_and_grad.perturb cannot run inside mx.compile: {_COMPILE_HINT}")
        x, y = self._prepare(x, y)
        return self._perturb(x, y, key)

    def _perturb(self, x: mx.array, y: mx.array, key: Optional[mx.array]) -> mx.array:
        if key is not None and (not isinstance(key, mx.array) or key.shape != (2,) or key.dtype != mx.uint32):
            raise TypeError("key must be a PRNG key from mr.key(seed) or mx.random.key(seed)")
        if self.method == "noise":
            noise = mx.random.normal(x.shape, dtype=x.dtype, key=key)
            x_adv = x + self.sigma * noise
            mx.eval(x_adv)
            return x_adv
        if self.method == "free":
            x_adv = self._free_input(x)
            mx.eval(x_adv)
            return x_adv
        try:
            res = self.attack.run(
                self.robust, x, y, None, fresh_key() if key is None else key, training=False, track_best=False
            )
        except ValueError as exc:
            if "function transformations" in str(exc):
                raise RuntimeError(f"the attack cannot run inside mx.compile: {_COMPILE_HINT}") from exc
            raise
        return mx.stop_gradient(res.x_adv)

    # ---- the objective ------------------------------------------------------------------------

    def _objective(self, model: nn.Module, x: mx.array, x_adv: mx.array, y: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        loss_fn, method = self.loss_fn, self.method
        if method in ("pgd-at", "fgsm-rs", "noise", "free"):
            return loss_fn(model, x_adv, y, *args, **kwargs)
        if method == "mix":
            w = self.clean_weight
            return w * loss_fn(model, x, y, *args, **kwargs) + (1.0 - w) * loss_fn(model, x_adv, y, *args, **kwargs)
        if method == "trades":
            natural = loss_fn(model, x, y, *args, **kwargs)
            return natural + self.beta * mx.mean(kl_divergence(model(x), model(x_adv)))
        # mart
        adv_ce = loss_fn(model, x_adv, y, *args, **kwargs)
        margin, weighted_kl = _mart_terms(model(x), model(x_adv), y)
        return adv_ce + margin + self.beta * weighted_kl

    def loss(self, model: nn.Module, x: mx.array, x_adv: mx.array, y: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        """The method's training loss given the perturbed batch ``x_adv`` (traceable: no attack).

        "pgd-at", "fgsm-rs", "free", "noise": ``loss_fn(model, x_adv, y)``.
        "mix": ``w * loss_fn(model, x, y) + (1 - w) * loss_fn(model, x_adv, y)``, w = clean_weight.
        "trades": ``loss_fn(model, x, y) + beta * mean KL(f(x) || f(x_adv))`` (softmax outputs).
        "mart": ``loss_fn(model, x_adv, y) - mean log(1 - max_{k!=y} p_k(x_adv))
        + beta * mean KL(f(x) || f(x_adv)) (1 - p_y(x))`` (Wang et al. 2020).
        The regularisers are batch means, matching a ``reduction="mean"`` ``loss_fn``.
        """
        self._check_model(model)
        self._check_structure(x, y, x_adv)
        return self._objective(model, x, x_adv, y, *args, **kwargs)

    def value_and_grad(
        self, model: nn.Module, x: mx.array, x_adv: mx.array, y: mx.array, *args: Any, **kwargs: Any
    ) -> tuple[mx.array, Any]:
        """``(loss, grads)`` of :meth:`loss` w.r.t. the model's trainable parameters.

        Runs no attack, so it works inside ``mx.compile``: this is the compiled half of a step whose
        ``x_adv`` came from :meth:`perturb`. For "free" it does not advance the perturbation.
        """
        self._check_model(model)
        self._check_structure(x, y, x_adv)
        return self._value_and_grad(model, x, mx.stop_gradient(x_adv), y, *args, **kwargs)

    # ---- the call -----------------------------------------------------------------------------

    def __call__(self, model: nn.Module, x: Any, y: Any, *args: Any, **kwargs: Any) -> tuple[mx.array, Any]:
        """``(loss, grads)`` as from ``nn.value_and_grad(model, loss_fn)(model, x, y, ...)``.

        Runs the inner attack on the current parameters (not allowed inside ``mx.compile``: use
        :meth:`perturb` + :meth:`value_and_grad` there), then differentiates the method's loss.
        """
        self._check_model(model)
        traced = _in_trace(*(a for a in (x, y) if isinstance(a, mx.array)))
        if traced:
            if not self.compiles:
                raise RuntimeError(f"method {self.method!r} cannot run inside mx.compile: {_COMPILE_HINT}")
            self._check_structure(x, y)
        else:
            x, y = self._prepare(x, y)
        if self.method == "noise":
            x_adv = x + self.sigma * mx.random.normal(x.shape, dtype=x.dtype)
        elif self.method == "free":
            return self._free_step(model, x, y, traced, *args, **kwargs)
        else:
            x_adv = self._perturb(x, y, None)
        return self._value_and_grad(model, x, mx.stop_gradient(x_adv), y, *args, **kwargs)

    # ---- Free AT ------------------------------------------------------------------------------

    def _delta_for(self, x: mx.array, traced: bool) -> mx.array:
        delta = self.state.get("delta")
        if delta is not None and delta.shape[1:] == x.shape[1:] and delta.shape[0] >= x.shape[0]:
            return delta[: x.shape[0]] if delta.shape[0] > x.shape[0] else delta
        if delta is not None and traced:
            raise ValueError(
                f"method 'free': the batch shape {tuple(x.shape)} does not fit the stored perturbation "
                f"{tuple(delta.shape)} inside mx.compile; call loss_and_grad.reset() first"
            )
        return mx.zeros(x.shape, dtype=mx.float32)

    def _free_input(self, x: mx.array) -> mx.array:
        lo, hi = self.robust.bounds
        return mx.clip(x + self._delta_for(x, traced=False).astype(x.dtype), lo, hi)

    def _free_step(self, model: nn.Module, x: mx.array, y: mx.array, traced: bool, *args: Any, **kwargs: Any) -> tuple[mx.array, Any]:
        lo, hi = self.robust.bounds
        eps = float(self.attack.eps)
        delta = self._delta_for(x, traced)
        x_adv = mx.clip(x + delta.astype(x.dtype), lo, hi)
        loss_fn = self.loss_fn

        def inner(params: Any, xa: mx.array) -> mx.array:
            model.update(params)
            return loss_fn(model, xa, y, *args, **kwargs)

        loss, (grads, g_x) = mx.value_and_grad(inner, argnums=(0, 1))(model.trainable_parameters(), x_adv)
        # The same backward gives the input gradient: one signed step of eps, kept in the ball.
        if self.attack.norm == "linf":
            new_delta = mx.clip(delta + eps * mx.sign(g_x).astype(mx.float32), -eps, eps)
        else:
            axes = tuple(range(1, g_x.ndim))
            g = g_x.astype(mx.float32)
            g = g / mx.maximum(mx.sqrt(mx.sum(g * g, axis=axes, keepdims=True)), 1e-12)
            new_delta = delta + eps * g
            norm = mx.sqrt(mx.sum(new_delta * new_delta, axis=axes, keepdims=True))
            new_delta = new_delta * mx.minimum(1.0, eps / mx.maximum(norm, 1e-12))
        stored = self.state.get("delta")
        if stored is not None and stored.shape[0] > x.shape[0] and stored.shape[1:] == x.shape[1:]:
            new_delta = mx.concatenate([new_delta, stored[x.shape[0]:]], axis=0)
        self.state["delta"] = mx.stop_gradient(new_delta)
        return loss, grads

    def reset(self) -> None:
        """Forget Free-AT's persistent perturbation (start the next call from zero)."""
        self.state.pop("delta", None)


def adversarial_value_and_grad(
    model: Union[nn.Module, RobustModel],
    loss_fn: LossFn,
    *,
    attack: Optional[PGD] = None,
    method: str = "pgd-at",
    beta: Optional[float] = None,
    clean_weight: Optional[float] = None,
    sigma: Optional[float] = None,
    replays: Optional[int] = None,
    bounds: Optional[tuple[float, float]] = None,
) -> AdversarialValueAndGrad:
    """A drop-in ``nn.value_and_grad(model, loss_fn)`` whose loss is a robust-training objective.

    ``loss_fn(model, x, y, *args)`` is the MLX examples' convention (a scalar, e.g.
    ``nn.losses.cross_entropy(model(x), y, reduction="mean")``). The returned object is called the
    same way and returns the same ``(loss, grads)``; the inner attack runs in the C++ core on the
    parameters the model has *at that call* (after every optimizer update), in eval mode; the
    loss is then computed in the mode the user chose (Dropout/BatchNorm). The model is only changed
    by the user's optimizer.

    Methods:
        "pgd-at": ``loss_fn`` on the last iterate of PGD (Madry et al. 2018, "Towards Deep Learning
            Models Resistant to Adversarial Attacks", https://arxiv.org/abs/1706.06083).
            k attack steps cost about k + 1 forward+backward passes per batch.
        "trades": ``loss_fn(x) + beta * KL(f(x) || f(x'))`` with x' from PGD on the KL (Zhang et
            al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy",
            https://arxiv.org/abs/1901.08573). ``beta`` default 6.
        "mart": misclassification-aware adversarial training (Wang et al. 2020, "Improving
            Adversarial Robustness Requires Revisiting Misclassified Examples",
            https://openreview.net/forum?id=rklOg6EFwS): boosted CE on x' plus
            ``beta * KL(f(x) || f(x')) (1 - p_y(x))``. ``beta`` default 6.
        "fgsm-rs": "fast" FGSM training: uniform random start, one signed step of 1.25 eps (Wong,
            Rice & Kolter 2020, "Fast is better than free", https://arxiv.org/abs/2001.03994).
            Pair it with a cyclic/short schedule: long runs can overfit catastrophically.
        "free": Free AT (Shafahi et al. 2019, "Adversarial Training for Free!",
            https://arxiv.org/abs/1904.12843): one backward gives both the parameter gradient and
            the input gradient, which advances a perturbation kept across calls (``state``). Call
            it ``replays`` times per batch (``mr.train`` does). Uses ``attack.eps`` and norm only.
        "noise": ``loss_fn`` on ``x + sigma * N(0, I)``: Gaussian augmentation for randomized
            smoothing (Cohen, Rosenfeld & Kolter 2019, https://arxiv.org/abs/1902.02918). No attack.
        "mix": ``clean_weight * loss_fn(x) + (1 - clean_weight) * loss_fn(x')`` with x' from PGD
            (Goodfellow, Shlens & Szegedy 2015, https://arxiv.org/abs/1412.6572). Default 0.5.

    Args:
        model: the ``nn.Module`` to train, or a :class:`RobustModel` wrapping it (its bounds,
            input shape, class count and ``on_invalid`` policy then apply to training batches).
        loss_fn: ``loss_fn(model, x, y, *args, **kwargs) -> scalar``.
        attack: the inner attack, e.g. ``mr.PGD(eps=0.3, steps=7)`` (scalar eps, one restart); its
            ``early_stop`` is ignored (training uses the last iterate). Required except for "noise".
        method: one of :data:`METHODS`.
        beta: TRADES / MART regulariser weight (>= 0).
        clean_weight: "mix" weight of the clean loss, in [0, 1].
        sigma: "noise" standard deviation (> 0); defaults to the RobustModel's ``noise.std``.
        replays: "free" replays per batch m (>= 1), default 4; read by ``mr.train``.
        bounds: input range when ``model`` is an ``nn.Module`` (default (0, 1)).

    Returns:
        An :class:`AdversarialValueAndGrad`: ``loss, grads = loss_and_grad(model, x, y)``; for
        ``mx.compile``: ``x_adv = loss_and_grad.perturb(model, x, y)`` outside the compiled step and
        ``loss_and_grad.value_and_grad(model, x, x_adv, y)`` inside it.

    Raises:
        ValueError / TypeError naming the argument for an unknown method, a missing or invalid
        attack, parameters outside their range or given to a method that does not use them.

    Example:
        >>> def loss_fn(model, x, y):
        ...     return nn.losses.cross_entropy(model(x), y, reduction="mean")
        >>> loss_and_grad = mr.adversarial_value_and_grad(model, loss_fn, attack=mr.PGD(eps=0.3, steps=7))
        >>> loss, grads = loss_and_grad(model, x, y)
        >>> optimizer.update(model, grads)
    """
    if isinstance(model, RobustModel):
        if bounds is not None:
            raise ValueError("bounds is taken from the RobustModel: do not pass it as well")
        robust = model
    elif isinstance(model, nn.Module):
        robust = RobustModel(model, bounds=check_bounds((0.0, 1.0) if bounds is None else bounds))
    else:
        raise TypeError(f"model must be an mlx.nn.Module or an mr.RobustModel, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, x, y), got {type(loss_fn).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def reject(name: str, value: Any, users: tuple[str, ...]) -> None:
        if value is not None and method not in users:
            raise ValueError(f"{name} applies to method {' / '.join(map(repr, users))}, not {method!r}")

    reject("beta", beta, ("trades", "mart"))
    reject("clean_weight", clean_weight, ("mix",))
    reject("sigma", sigma, ("noise",))
    reject("replays", replays, ("free",))

    if method in ("trades", "mart"):
        beta = 6.0 if beta is None else beta
        if not _is_number(beta) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        beta = float(beta)
    if method == "mix":
        clean_weight = 0.5 if clean_weight is None else clean_weight
        if not _is_number(clean_weight) or not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"clean_weight must be a number in [0, 1], got {clean_weight!r}")
        clean_weight = float(clean_weight)
    if method == "free":
        replays = 4 if replays is None else replays
        if not _is_int(replays) or replays < 1:
            raise ValueError(f"replays must be an integer >= 1, got {replays!r}")
    if method == "noise":
        if sigma is None and robust.noise is not None:
            sigma = robust.noise.std
        if sigma is None:
            raise ValueError("method 'noise' needs sigma=... (the Gaussian noise standard deviation)")
        if not _is_number(sigma) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        sigma = float(sigma)
        if attack is not None and not isinstance(attack, PGD):
            raise TypeError(f"attack must be an mr.PGD / mr.FGSM configuration, got {type(attack).__name__}")
        inner = None
    else:
        inner = _inner_attack(attack, method)
    return AdversarialValueAndGrad(
        robust, loss_fn, method=method, attack=inner, beta=beta, clean_weight=clean_weight, sigma=sigma,
        replays=replays,
    )


def _inner_attack(attack: Optional[PGD], method: str) -> PGD:
    """The attack run during training: last iterate, no early stop; per method as in the papers."""
    if attack is None:
        raise ValueError(f"method {method!r} needs attack=mr.PGD(eps=..., steps=...)")
    if not isinstance(attack, PGD):
        raise TypeError(f"attack must be an mr.PGD / mr.FGSM configuration, got {type(attack).__name__}")
    if not _is_number(attack.eps):
        raise ValueError("attack.eps must be one number for training (per-sample eps is for evaluation)")
    if attack.restarts != 1:
        raise ValueError(f"attack.restarts must be 1 for training (the last iterate is used), got {attack.restarts}")
    if attack.step_size is not None and not _is_number(attack.step_size):
        raise ValueError("attack.step_size must be one number for training")
    if method == "fgsm-rs":
        step = 1.25 * attack.eps if attack.step_size is None else attack.step_size
        # Wong et al. 2020: uniform start in the ball, one signed step of 1.25 eps, projected.
        return PGD(eps=attack.eps, steps=1, step_size=step if step > 0 else None, norm=attack.norm,
                   random_start=True, loss=attack.loss if attack.loss != "kl" else "ce",
                   early_stop=False, unroll=1)
    if method == "trades":
        return dataclasses.replace(attack, loss="kl", early_stop=False)
    if method == "free":
        return attack
    if attack.loss == "kl":
        raise ValueError(f"attack.loss 'kl' is TRADES' attack: use method='trades', not {method!r}")
    return dataclasses.replace(attack, early_stop=False)
