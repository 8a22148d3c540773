"""``mr.train``: a small ready-made (adversarial) training loop.

Epochs of shuffled full batches, one compiled update step per batch (the attack runs before it,
outside ``mx.compile``), clean and PGD robust accuracy after every epoch, a tqdm progress bar,
a ``.safetensors`` checkpoint after every epoch that a later call resumes from, learning-rate
schedules from ``mlx.optimizers``, and data-parallel training over ``mx.distributed``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_robust._checks import check_int, is_int
from mlx_robust._compat import moved
from mlx_robust._files import remove_stale_temps, write_replacing
from mlx_robust.training.objectives import METHODS, AdversarialValueAndGrad, adversarial_value_and_grad
from mlx_robust.attacks import PGD
from mlx_robust.robust_model import RobustModel
from mlx_robust.validation import as_labels, check_bounds

__all__ = ["EpochLog", "TrainHistory", "train", "robust_accuracy", "clean_accuracy"]

TRAIN_METHODS = ("standard",) + METHODS
_FORMAT = "mlx-robust-train/1"


def cross_entropy_loss(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """Mean cross-entropy of ``model(x)`` against labels ``y`` (the default ``loss_fn``)."""
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


@dataclasses.dataclass(frozen=True)
class EpochLog:
    """One epoch of :func:`train`.

    Attributes:
        epoch: 1-based epoch number.
        loss: mean training loss (the method's objective) over the epoch's updates.
        clean_accuracy: accuracy on the evaluation set (None without one).
        robust_accuracy: accuracy under the evaluation attack (None without one).
        seconds: wall time of the epoch's training (evaluation excluded).
        learning_rate: the optimizer's learning rate after the epoch.
    """

    epoch: int
    loss: float
    clean_accuracy: Optional[float]
    robust_accuracy: Optional[float]
    seconds: float
    learning_rate: float


@dataclasses.dataclass
class TrainHistory:
    """What :func:`train` returns: the method, the evaluation attack and one :class:`EpochLog` per epoch
    (including epochs restored from a checkpoint)."""

    method: str
    eval_attack: Optional[str]
    epochs: list[EpochLog] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i: int) -> EpochLog:
        return self.epochs[i]

    @property
    def last(self) -> EpochLog:
        """The last epoch's log."""
        if not self.epochs:
            raise ValueError("no epoch has been trained")
        return self.epochs[-1]

    def to_json(self) -> str:
        """The history as JSON (stored in checkpoints)."""
        return json.dumps({"method": self.method, "eval_attack": self.eval_attack,
                           "epochs": [dataclasses.asdict(e) for e in self.epochs]})

    @classmethod
    def from_json(cls, text: str) -> "TrainHistory":
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        return cls(d["method"], d["eval_attack"], [EpochLog(**e) for e in d["epochs"]])


def clean_accuracy(robust: RobustModel, x: mx.array, y: mx.array, batch_size: int = 512) -> float:
    """Fraction of ``x`` that ``robust.predict`` (eval mode; its defence if any) classifies as ``y``."""
    correct = 0
    for s in range(0, x.shape[0], batch_size):
        correct += int(mx.sum(robust.base_predict(x[s : s + batch_size]) == y[s : s + batch_size]).item())
    return correct / x.shape[0]


def robust_accuracy(robust: RobustModel, x: mx.array, y: mx.array, attack: PGD, *, seed: int = 0,
                    batch_size: int = 512) -> float:
    """Fraction of ``x`` still classified as ``y`` under ``attack`` (e.g. PGD-20; Madry et al. 2018)."""
    return robust.attack(x, y, attack, key=mx.random.key(seed), batch_size=batch_size).robust_accuracy


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _save_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer, history: TrainHistory,
                     epoch: int, method: str, seed: int) -> None:
    arrays = {f"model/{k}": v for k, v in tree_flatten(model.parameters())}
    arrays.update({f"optimizer/{k}": v for k, v in tree_flatten(optimizer.state)})
    meta = {"format": _FORMAT, "epoch": str(epoch), "method": method, "seed": str(seed),
            "optimizer": type(optimizer).__name__, "history": history.to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, exclusively created name in the target folder (never a planted link), renamed
    # over the checkpoint once complete: never a half-written checkpoint, never a stray file.
    write_replacing(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=meta))


def _load_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer, method: str,
                     seed: int) -> tuple[int, TrainHistory]:
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # MLX raises RuntimeError/ValueError for damaged files
        raise ValueError(f"{path}: cannot read the checkpoint ({exc})") from exc
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an mr.train checkpoint (format {meta.get('format')!r})")
    if meta.get("method") != method or meta.get("seed") != str(seed):
        raise ValueError(
            f"{path}: checkpoint of method {meta.get('method')!r} seed {meta.get('seed')}, but this run is "
            f"method {method!r} seed {seed}; use another checkpoint path or resume=False"
        )
    params = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    expected = dict(tree_flatten(model.parameters()))
    if params.keys() != expected.keys() or any(params[k].shape != expected[k].shape for k in params):
        raise ValueError(f"{path}: the checkpoint's parameters do not match the model's names and shapes")
    saved_type, this_type = meta.get("optimizer"), type(optimizer).__name__
    if saved_type is not None and saved_type != this_type:
        raise ValueError(
            f"{path}: checkpoint was written with optimizer {saved_type}, but this run passes "
            f"{this_type}; resume with a {saved_type} optimizer, or use another checkpoint path or "
            f"resume=False"
        )
    # Restore the optimizer's state (moments, step count), not its hyper-parameters: the scalar
    # entries at the top of the state other than "step" (learning_rate, ...) stay the user's.
    optimizer.init(model.trainable_parameters())
    saved = {k[len("optimizer/"):]: v for k, v in arrays.items() if k.startswith("optimizer/")}
    current = dict(tree_flatten(optimizer.state))
    hyper = {k for k in current if "." not in k and k != "step"}
    saved_hyper = {k for k in saved if "." not in k and k != "step"}
    restored = {k: v for k, v in saved.items() if k not in saved_hyper}
    if (saved_hyper != hyper or restored.keys() != current.keys() - hyper
            or any(restored[k].shape != current[k].shape for k in restored)):
        raise ValueError(
            f"{path}: the checkpoint's optimizer state does not match this run's {this_type} "
            f"(was it written with another optimizer?); use another checkpoint path or resume=False"
        )
    model.update(tree_unflatten(list(params.items())))
    state = tree_unflatten(list(restored.items()))
    for k in hyper:
        state[k] = optimizer.state[k]
    optimizer.state = state
    optimizer.init(model.trainable_parameters())
    return int(meta["epoch"]), TrainHistory.from_json(meta["history"])


def train(
    model: Union[nn.Module, RobustModel],
    x_train: Any,
    y_train: Any,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    method: str = "pgd-at",
    attack: Optional[PGD] = None,
    loss_fn: Optional[Callable[..., mx.array]] = None,
    optimizer: Optional[optim.Optimizer] = None,
    learning_rate: Union[float, Callable[[mx.array], mx.array], None] = None,
    beta: Optional[float] = None,
    clean_weight: Optional[float] = None,
    sigma: Optional[float] = None,
    replays: Optional[int] = None,
    x_test: Any = None,
    y_test: Any = None,
    eval_attack: Optional[PGD] = None,
    eval_samples: Optional[int] = None,
    bounds: Optional[tuple[float, float]] = None,
    checkpoint: Union[str, os.PathLike, None] = None,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    compile: bool = True,
    distributed: bool = False,
) -> TrainHistory:
    """Train ``model`` in place with a robust-training method; returns the per-epoch history.

    Each epoch shuffles the training set (from ``seed`` and the epoch number), runs one update per
    full batch (the last partial batch is dropped so the compiled step sees one shape), then
    evaluates clean accuracy and robust accuracy under ``eval_attack`` if ``x_test`` is given. The
    inner attack runs before each compiled update, on the current parameters, in eval mode; the
    update runs in train mode. Methods and their parameters are those of
    :func:`mlx_robust.adversarial_value_and_grad` (PGD-AT, Madry et al. 2018; TRADES, Zhang et al.
    2019; MART, Wang et al. 2020; fast FGSM-RS, Wong et al. 2020; Free AT, Shafahi et al. 2019;
    Gaussian noise, Cohen et al. 2019; mix) plus ``"standard"`` (no adversary). Free AT replays
    each batch ``replays`` times (divide ``epochs`` by ``replays`` for the cost of standard training).

    Args:
        model: the ``nn.Module`` to train (the same object is updated), or a :class:`RobustModel`.
        x_train, y_train: training inputs (N, ...) inside the bounds and integer labels (N,).
        epochs: total number of epochs (including any restored from ``checkpoint``).
        batch_size: global batch size (split across processes when ``distributed``).
        method: "standard" or one of :data:`mlx_robust.training.objectives.METHODS`.
        attack: the inner attack, e.g. ``mr.PGD(eps=0.1, steps=7)`` (not used by "standard").
        loss_fn: ``loss_fn(model, x, y)``; default mean cross-entropy.
        optimizer: any ``mlx.optimizers`` optimizer; default ``Adam(learning_rate)``.
        learning_rate: a number or a schedule from ``mlx.optimizers`` (e.g.
            ``optim.cosine_decay(1e-3, steps)``) for the default Adam; default 1e-3.
        beta, clean_weight, sigma, replays: method parameters (see ``adversarial_value_and_grad``).
        x_test, y_test: evaluation set, evaluated after every epoch.
        eval_attack: the attack for robust accuracy; default PGD-20 at the training attack's eps
            and norm (none for "standard"/"noise" without an ``attack``).
        eval_samples: evaluate on the first this many test samples (default all).
        bounds: input range when ``model`` is an ``nn.Module`` (default (0, 1)).
        checkpoint: a ``.safetensors`` path written after every epoch (model, optimizer state,
            history); with ``resume`` (default) an existing file is loaded and training continues
            after its last epoch. Resuming reproduces the uninterrupted run (same shuffles, keys).
            Resuming restores the optimizer's state (moments, step count) but not its
            hyper-parameters: the learning rate or schedule of this call's ``optimizer`` /
            ``learning_rate`` applies (a schedule continues from the restored step count). A
            checkpoint written with another optimizer type is refused (ValueError naming both).
            The file is written under a fresh temporary name in its folder and renamed over
            ``checkpoint``; temporary files left by an interrupted save are removed.
        seed: seeds the shuffling, the attack keys and ``mx.random`` (reseeded every epoch from
            ``seed`` and the epoch, for dropout and noise inside the compiled step).
        progress: tqdm bar per epoch and one summary line per epoch (rank 0 only).
        compile: compile the update step with ``mx.compile`` (model, optimizer and random state
            as its state). False runs it eagerly.
        distributed: data-parallel over ``mx.distributed.init()`` (run under ``mlx.launch``): every
            process sees the same shuffled global batch, attacks its own shard of
            ``batch_size / size`` samples, and gradients are averaged with
            ``nn.average_gradients``; only rank 0 writes the checkpoint.

    Returns:
        A :class:`TrainHistory`; the trained model is ``model`` itself (left in the train/eval mode
        it had before the call).

    Raises:
        ValueError / TypeError naming the argument for bad settings or data.

    Example:
        >>> hist = mr.train(model, x_train, y_train, attack=mr.PGD(eps=0.1, steps=7), epochs=15,
        ...                 x_test=x_test, y_test=y_test, checkpoint="run.safetensors")
        >>> hist.last.robust_accuracy
    """
    if not isinstance(method, str) or method not in TRAIN_METHODS:
        raise ValueError(f"method must be one of {TRAIN_METHODS}, got {method!r}")
    for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        check_int(value, name, low=low)
    if eval_samples is not None and (not is_int(eval_samples) or eval_samples < 1):
        raise ValueError(f"eval_samples must be a positive integer, got {eval_samples!r}")
    if optimizer is not None and not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer must be an mlx.optimizers.Optimizer, got {type(optimizer).__name__}")
    if optimizer is not None and learning_rate is not None:
        raise ValueError("pass learning_rate to your optimizer, not to train() as well")
    if learning_rate is not None and not callable(learning_rate) and (
        isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))
        or not math.isfinite(learning_rate) or learning_rate <= 0
    ):
        raise ValueError(f"learning_rate must be a number > 0 or a schedule, got {learning_rate!r}")
    if (x_test is None) != (y_test is None):
        raise ValueError("pass both x_test and y_test, or neither")
    if eval_attack is not None and not isinstance(eval_attack, PGD):
        raise TypeError(f"eval_attack must be an attack configuration such as mr.PGD(...), got {type(eval_attack).__name__}")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if checkpoint.suffix != ".safetensors":
            raise ValueError(f"checkpoint must be a .safetensors path, got {str(checkpoint)!r}")

    if isinstance(model, RobustModel):
        if bounds is not None:
            raise ValueError("bounds is taken from the RobustModel: do not pass it as well")
        robust = model
    elif isinstance(model, nn.Module):
        robust = RobustModel(model, bounds=check_bounds((0.0, 1.0) if bounds is None else bounds))
    else:
        raise TypeError(f"model must be an mlx.nn.Module or an mr.RobustModel, got {type(model).__name__}")
    net = robust.model
    loss_fn = cross_entropy_loss if loss_fn is None else loss_fn

    x_train, _ = robust.validate(x_train, name="x_train")
    robust.infer_num_classes(x_train, check=True)
    y_train = as_labels(y_train, x_train.shape[0], robust.num_classes, "y_train")
    if x_test is not None:
        x_test, _ = robust.validate(x_test, name="x_test")
        y_test = as_labels(y_test, x_test.shape[0], robust.num_classes, "y_test")
        if eval_samples is not None:
            x_test, y_test = x_test[:eval_samples], y_test[:eval_samples]

    if method == "standard":
        for name, value in (("beta", beta), ("clean_weight", clean_weight), ("sigma", sigma), ("replays", replays)):
            if value is not None:
                raise ValueError(f"{name} does not apply to method 'standard'")
        if attack is not None and not isinstance(attack, PGD):
            raise TypeError(f"attack must be an attack configuration such as mr.PGD(...), got {type(attack).__name__}")
        lag: Any = nn.value_and_grad(net, loss_fn)
    else:
        lag = adversarial_value_and_grad(robust, loss_fn, attack=attack, method=method, beta=beta,
                                         clean_weight=clean_weight, sigma=sigma, replays=replays)
    if eval_attack is None and attack is not None and x_test is not None:
        eval_attack = PGD(eps=attack.eps, steps=20, norm=attack.norm)

    group = mx.distributed.init() if distributed else None
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    if batch_size % size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {size}")
    n = x_train.shape[0]
    if n < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} samples)")
    local = batch_size // size

    if optimizer is None:
        optimizer = optim.Adam(learning_rate=1e-3 if learning_rate is None else learning_rate)
    optimizer.init(net.trainable_parameters())

    history = TrainHistory(method, None if eval_attack is None else eval_attack.name)
    start = 0
    if checkpoint is not None and rank == 0:
        remove_stale_temps(checkpoint)
    if checkpoint is not None and resume and checkpoint.exists():
        start, history = _load_checkpoint(checkpoint, net, optimizer, method, seed)

    def reduce(loss: mx.array, grads: Any) -> tuple[mx.array, Any]:
        if size == 1:
            return loss, grads
        return mx.distributed.all_sum(loss, group=group) / size, nn.average_gradients(grads, group=group)

    attacking = isinstance(lag, AdversarialValueAndGrad) and not lag.compiles
    state: list[Any] = [net.state, optimizer.state, mx.random.state]
    if isinstance(lag, AdversarialValueAndGrad) and lag.method == "free":
        state.append(lag.state)

    if attacking:
        def step(xb: mx.array, xa: mx.array, yb: mx.array) -> mx.array:
            loss, grads = reduce(*lag.value_and_grad(net, xb, xa, yb))
            optimizer.update(net, grads)
            return loss
    else:
        def step(xb: mx.array, yb: mx.array) -> mx.array:  # type: ignore[misc]
            loss, grads = reduce(*lag(net, xb, yb))
            optimizer.update(net, grads)
            return loss
    if compile:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    replay = lag.replays if isinstance(lag, AdversarialValueAndGrad) and lag.method == "free" else 1

    show = progress and rank == 0
    if show:
        from tqdm.auto import tqdm
    modes = [(m, m.training) for _, m in net.named_modules()]
    try:
        for epoch in range(start, epochs):
            order = np.random.default_rng([seed, epoch]).permutation(n)
            mx.random.seed(_derived_seed(seed, epoch, 1))
            starts = range(0, n - batch_size + 1, batch_size)
            bar = tqdm(starts, desc=f"{method} {epoch + 1}/{epochs}", unit="batch", leave=False) if show else starts
            net.train()
            t0 = time.perf_counter()
            total, count = mx.array(0.0), 0
            for b, s in enumerate(bar):
                idx = mx.array(order[s + rank * local : s + (rank + 1) * local])
                xb, yb = x_train[idx], y_train[idx]
                if attacking:
                    key = mx.random.key(_derived_seed(seed, epoch, b, rank, 2))
                    xa = lag.perturb(net, xb, yb, key=key)
                    losses = [step(xb, xa, yb)]
                else:
                    losses = [step(xb, yb) for _ in range(replay)]
                for loss in losses:
                    total = total + loss
                count += len(losses)
                mx.eval(state, total)
                if show and b % 5 == 0:
                    bar.set_postfix(loss=f"{float(losses[-1].item()):.3f}")
            seconds = time.perf_counter() - t0
            clean = robust_acc = None
            if x_test is not None:
                clean = clean_accuracy(robust, x_test, y_test)
                if eval_attack is not None:
                    robust_acc = robust_accuracy(robust, x_test, y_test, eval_attack, seed=seed)
            lr = float(np.asarray(optimizer.learning_rate)) if "learning_rate" in optimizer.state else float("nan")
            history.epochs.append(EpochLog(epoch + 1, float(total.item()) / max(count, 1), clean, robust_acc, seconds, lr))
            if show:
                tqdm.write(_epoch_line(history.last, epochs, history.eval_attack))
            if checkpoint is not None and rank == 0:
                _save_checkpoint(checkpoint, net, optimizer, history, epoch + 1, method, seed)
    finally:
        for module, mode in modes:
            module._training = mode
    return history


def _epoch_line(log: EpochLog, epochs: int, attack_name: Optional[str]) -> str:
    line = f"epoch {log.epoch}/{epochs}: loss {log.loss:.4f}, {log.seconds:.1f} s"
    if log.clean_accuracy is not None:
        line += f", clean {log.clean_accuracy:.1%}"
    if log.robust_accuracy is not None:
        line += f", {attack_name} {log.robust_accuracy:.1%}"
    return line


# Deprecated: moved to the CLI package (the demo and the command are not library code).
_MOVED = {"adversarial_training_demo": "mlx_robust.cli"}


def __getattr__(name: str) -> Any:
    return moved(__name__, name, _MOVED)
