"""Honest robustness evaluation: an attack ensemble over several eps, a report, and masking checks.

``evaluate`` runs every attack at every eps on the samples the model classifies correctly, keeps
per sample the worst case over all attacks (the "robust accuracy under the ensemble", as
AutoAttack reports it, Croce & Hein 2020), and computes the gradient-masking checks recommended by
Athalye et al. 2018 and Carlini et al. 2019 ("On Evaluating Adversarial Robustness",
https://arxiv.org/abs/1902.06705): each warning in the report is measured, never assumed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_robust import _functional
from mlx_robust import attacks as _attacks
from mlx_robust._files import write_replacing, write_text
from mlx_robust.attacks import FGSM, PGD, Attack
from mlx_robust._checks import fresh_key
from mlx_robust.robust_model import RobustModel
from mlx_robust.validation import as_labels

AttackSpec = Union[str, Attack]

# Attack names accepted by `evaluate(attacks=[...])` and the CLI; each builds the attack at one eps.
# Classes are looked up when used, so the registry names attacks that other modules provide.
_REGISTRY: dict[str, Callable[[float, str, int], Attack]] = {
    "fgsm": lambda e, norm, c: FGSM(eps=e, norm=norm),
    "pgd": lambda e, norm, c: PGD(eps=e, steps=40, norm=norm),
    "pgd-margin": lambda e, norm, c: PGD(eps=e, steps=40, norm=norm, loss="margin"),
    "apgd-ce": lambda e, norm, c: _attacks.APGD(eps=e, norm=norm, loss="ce"),
    "apgd-dlr": lambda e, norm, c: _attacks.APGD(eps=e, norm=norm, loss="dlr"),
    "apgd-t": lambda e, norm, c: _attacks.APGDT(eps=e, norm=norm, n_target_classes=min(9, c - 1)),
    "square": lambda e, norm, c: _attacks.Square(eps=e, norm=norm, n_queries=5000),
    "cw": lambda e, norm, c: _cw(norm),
}


def _cw(norm: str) -> Attack:
    if norm != "l2":
        raise ValueError("attack 'cw' (Carlini-Wagner L2) needs norm='l2'")
    return _attacks.CW()
DEFAULT_ENSEMBLE = ("apgd-ce", "apgd-t", "square")
BLACK_BOX = ("Square",)


def attack_names() -> list[str]:
    """Names accepted in ``evaluate(attacks=...)``."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class AttackStats:
    """One attack at one eps. Accuracies are over all N samples (clean errors count as broken)."""

    robust_accuracy: float
    success_rate: float
    mean_norm: float
    max_norm: float
    seconds: float
    attacked: int


@dataclass
class RobustnessReport:
    """Result of :func:`evaluate`.

    Attributes:
        clean_accuracy: accuracy on the clean inputs.
        eps: the radii evaluated, ascending.
        attacks: attack names, in the order they ran.
        norm: threat model of the eps ("linf" or "l2").
        num_samples: N.
        stats: ``stats[(attack, eps)]`` -> :class:`AttackStats`.
        ensemble: ``ensemble[eps]`` -> robust accuracy under the per-sample worst case.
        cumulative: True if each attack only attacked the samples that all earlier attacks left
            robust (AutoAttack's early stop); its ``robust_accuracy`` is then cumulative.
        eot_samples: draws averaged per attack step (> 1 against a random defence).
        warnings: gradient-masking warnings, each backed by a measurement.
        checks: the measurements behind the warnings.
    """

    clean_accuracy: float
    eps: list[float]
    attacks: list[str]
    norm: str
    num_samples: int
    stats: dict[tuple[str, float], AttackStats]
    ensemble: dict[float, float]
    cumulative: bool
    eot_samples: int = 1
    warnings: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def robust_accuracy(self, eps: float, attack: Optional[str] = None) -> float:
        """Robust accuracy at ``eps`` under ``attack``, or under the ensemble if None."""
        e = self._eps_key(eps)
        if attack is None:
            return self.ensemble[e]
        if attack not in self.attacks:
            raise ValueError(f"attack {attack!r} is not in this report; it has {self.attacks}")
        return self.stats[(attack, e)].robust_accuracy

    def _eps_key(self, eps: float) -> float:
        for e in self.eps:
            if math.isclose(e, float(eps), rel_tol=1e-9, abs_tol=1e-12):
                return e
        raise ValueError(f"eps {eps} is not in this report; it has {self.eps}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "norm": self.norm,
            "num_samples": self.num_samples,
            "eps": self.eps,
            "attacks": self.attacks,
            "cumulative": self.cumulative,
            "eot_samples": self.eot_samples,
            "ensemble_robust_accuracy": {str(e): a for e, a in self.ensemble.items()},
            "per_attack": [
                {"attack": a, "eps": e, **dataclasses.asdict(self.stats[(a, e)])}
                for a in self.attacks
                for e in self.eps
            ],
            "warnings": self.warnings,
            "checks": self.checks,
        }

    def to_json(self, path: Optional[str] = None) -> str:
        """The report as JSON (also written to ``path`` if given)."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text(path, text + "\n")  # a fresh file renamed over path: never through a planted link
        return text

    def to_markdown(self) -> str:
        """The report as Markdown: accuracy table (attacks x eps), details, warnings."""
        eps_cols = " | ".join(f"eps={e:g}" for e in self.eps)
        lines = [
            f"Clean accuracy: {self.clean_accuracy:.1%} on {self.num_samples} samples; "
            f"threat model {self.norm}"
            + (f"; random defence evaluated with EOT-{self.eot_samples}" if self.eot_samples > 1 else ""),
            "",
            f"| robust accuracy{' (cumulative)' if self.cumulative else ''} | {eps_cols} |",
            "|---|" + "---|" * len(self.eps),
        ]
        for a in self.attacks:
            lines.append(f"| {a} | " + " | ".join(f"{self.stats[(a, e)].robust_accuracy:.1%}" for e in self.eps) + " |")
        lines.append("| **worst case (ensemble)** | " + " | ".join(f"**{self.ensemble[e]:.1%}**" for e in self.eps) + " |")
        lines += ["", "| attack | eps | success rate | mean norm | max norm | attacked | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for a in self.attacks:
            for e in self.eps:
                s = self.stats[(a, e)]
                lines.append(f"| {a} | {e:g} | {s.success_rate:.1%} | {s.mean_norm:.4f} | {s.max_norm:.4f} | "
                             f"{s.attacked} | {s.seconds:.2f} |")
        lines.append("")
        if self.warnings:
            lines.append("**Gradient-masking warnings**")
            lines += [f"- {w}" for w in self.warnings]
        else:
            lines.append("No gradient-masking warning: " + ", ".join(sorted(self.checks)) + " checked.")
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> None:
        """Robust accuracy vs eps, one curve per attack plus the ensemble (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("report.plot needs matplotlib: pip install 'mlx-robust[plot]'") from exc
        fig, ax = plt.subplots(figsize=(6, 4))
        for a in self.attacks:
            ax.plot(self.eps, [self.stats[(a, e)].robust_accuracy for e in self.eps], marker="o", label=a)
        ax.plot(self.eps, [self.ensemble[e] for e in self.eps], marker="s", color="black", linewidth=2,
                label="worst case (ensemble)")
        ax.set_xlabel(f"eps ({self.norm})")
        ax.set_ylabel("robust accuracy" + (" (cumulative)" if self.cumulative else ""))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"clean accuracy {self.clean_accuracy:.1%}")
        ax.legend()
        fig.tight_layout()
        try:
            write_replacing(path, lambda tmp: fig.savefig(tmp, dpi=120))
        finally:
            plt.close(fig)


def _resolve(spec: AttackSpec, eps: float, norm: str, num_classes: int = 10) -> Attack:
    if isinstance(spec, Attack):
        if "eps" not in {f.name for f in dataclasses.fields(spec)}:
            return spec
        return dataclasses.replace(spec, eps=eps)
    if not isinstance(spec, str):
        raise TypeError(f"attacks must hold attack names or attack configurations, got {type(spec).__name__}")
    if spec not in _REGISTRY:
        raise ValueError(f"unknown attack {spec!r}; known: {attack_names()}")
    try:
        return _REGISTRY[spec](eps, norm, num_classes)
    except AttributeError as exc:
        raise ValueError(f"attack {spec!r} is not available in this build: {exc}") from exc


def _has_budget(attack: Attack) -> bool:
    return "eps" in {f.name for f in dataclasses.fields(attack)}


def _spec_name(spec: AttackSpec, norm: str) -> str:
    if isinstance(spec, str):
        return spec
    return spec.name


def _check_eps_list(eps: Sequence[float]) -> list[float]:
    try:
        values = [float(e) for e in eps]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"eps must be a list of numbers, got {eps!r}") from exc
    if not values:
        raise ValueError("eps must hold at least one radius")
    if any(not math.isfinite(e) or e < 0 for e in values):
        raise ValueError(f"eps must be finite and >= 0, got {values}")
    return sorted(set(values))


def _attack_once(robust, x, y, idx, attack, key, batch_size, eot) -> tuple[np.ndarray, np.ndarray]:
    """Attack samples ``idx``; (success, norms) per attacked sample."""
    sel = mx.array(idx.astype(np.int32))
    res = robust.attack(x[sel], y[sel], attack, key=key, batch_size=batch_size)
    succ = np.array(res.success)
    if robust.is_random:
        # A success seen under one lucky draw is not a success: re-judge x_adv on the mean logits
        # of fresh draws.
        succ &= np.array(_mean_prediction(robust, res.x_adv, eot, _stream(key, _JUDGE), sel) != y[sel])
    return succ, np.array(res.norms)


def evaluate(
    robust: RobustModel,
    x: Any,
    y: Any,
    *,
    attacks: Optional[Sequence[AttackSpec]] = None,
    eps: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
    norm: str = "linf",
    early_stop: Optional[bool] = None,
    batch_size: Optional[int] = None,
    key: Optional[mx.array] = None,
    checks: bool = True,
    progress: bool = True,
) -> RobustnessReport:
    """Evaluate ``robust`` under an attack ensemble at several eps.

    Args:
        robust: the wrapped model (a random defence is attacked with EOT by default).
        x, y: inputs (N, ...) inside the model's bounds and their true labels (N,).
        attacks: attack names (see :func:`attack_names`) or configurations (their ``eps`` is set
            to each radius). Default: APGD-CE, APGD-T and Square — AutoAttack's standard ensemble
            (Croce & Hein 2020) minus FAB.
        eps: radii to evaluate.
        norm: threat model for attacks given by name.
        early_stop: attack each sample only while it is still robust to every earlier attack (the
            report is then cumulative; the ensemble result is the same and much cheaper). Default:
            True for the default ensemble, False when ``attacks`` is given (per-attack numbers).
        batch_size: attack in chunks of this many samples.
        key: PRNG key (``mr.key(seed)``); None draws one from ``mx.random``.
        checks: run the gradient-masking checks (a few cheap extra attacks on up to 100 samples).
        progress: show a progress bar.

    Returns:
        A :class:`RobustnessReport`.
    """
    if not isinstance(robust, RobustModel):
        raise TypeError(f"robust must be an mr.RobustModel, got {type(robust).__name__}")
    eps_list = _check_eps_list(eps)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    specs = list(DEFAULT_ENSEMBLE if attacks is None else attacks)
    if not specs:
        raise ValueError("attacks must name at least one attack")
    for spec in specs:  # fail fast, before any attack runs
        _resolve(spec, eps_list[0], norm, robust.known_num_classes or 10)
    names = [_spec_name(s, norm) for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks must have distinct names, got {names}")
    cumulative = (attacks is None) if early_stop is None else bool(early_stop)
    key = fresh_key() if key is None else key

    xv, _ = robust.validate(x)
    n = xv.shape[0]
    robust.infer_num_classes(xv, check=True)
    yv = as_labels(y, n, robust.num_classes, "y")
    if robust.is_random:
        # A random defence's clean prediction is judged like its adversarial ones: on the mean
        # logits of fresh draws, not on one draw.
        clean_pred = _mean_prediction(robust, xv, robust.eot_samples(), _stream(key, _CLEAN))
    else:
        clean_pred = _predict_batched(robust, xv, batch_size)
    clean_correct = np.array(clean_pred == yv)
    clean_accuracy = float(clean_correct.mean())

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(eps_list) * len(specs), desc="evaluating", unit="attack", leave=False)
    stats: dict[tuple[str, float], AttackStats] = {}
    ensemble: dict[float, float] = {}
    eot = robust.eot_samples()
    minimal: dict[str, dict[int, tuple[bool, float]]] = {}
    try:
        for e in eps_list:
            still = clean_correct.copy()  # robust to every attack so far
            for spec, name in zip(specs, names):
                attack = _resolve(spec, e, norm, robust.num_classes)
                eot = max(eot, robust.eot_samples(getattr(attack, "eot_samples", None)))
                idx = np.flatnonzero(still if cumulative else clean_correct)
                t0 = time.perf_counter()
                broken = np.zeros(n, dtype=bool)
                norms = np.zeros(0)
                if idx.size and (e > 0 or robust.is_random):  # eps 0 cannot move a deterministic model
                    if _has_budget(attack):
                        succ, norms_all = _attack_once(robust, xv, yv, idx, attack, key, batch_size, eot)
                    else:
                        # A minimal-perturbation attack (C&W) runs once on every clean-correct sample;
                        # at each eps it counts only where it stayed within eps.
                        if name not in minimal:
                            all_idx = np.flatnonzero(clean_correct)
                            minimal[name] = dict(zip(all_idx.tolist(), zip(*_attack_once(
                                robust, xv, yv, all_idx, attack, key, batch_size, eot))))
                        pairs = [minimal[name][i] for i in idx.tolist()]
                        succ = np.array([p[0] for p in pairs], dtype=bool)
                        norms_all = np.array([p[1] for p in pairs], dtype=np.float32)
                        succ &= norms_all <= e * (1 + 1e-6)
                    broken[idx[succ]] = True
                    norms = norms_all[succ]
                seconds = time.perf_counter() - t0
                robust_mask = (still if cumulative else clean_correct) & ~broken
                still &= ~broken
                stats[(name, e)] = AttackStats(
                    robust_accuracy=float(robust_mask.mean()),
                    success_rate=float(broken[idx].mean()) if idx.size else 0.0,
                    mean_norm=float(norms.mean()) if norms.size else 0.0,
                    max_norm=float(norms.max()) if norms.size else 0.0,
                    seconds=seconds,
                    attacked=int(idx.size),
                )
                if bar is not None:
                    bar.update(1)
            ensemble[e] = float(still.mean())
    finally:
        if bar is not None:
            bar.close()

    report = RobustnessReport(clean_accuracy, eps_list, names, norm, n, stats, ensemble, cumulative, eot)
    if checks:
        _masking_checks(report, robust, xv, yv, clean_correct, norm, key, batch_size)
    return report


# Streams of evaluate's key for its own draws (mixed in by row_keys; the attacks use the key itself).
_CLEAN, _JUDGE, _GRADIENT = 0xC1EA0001, 0xC1EA0002, 0xC1EA0003


def _stream(key: mx.array, tag: int) -> mx.array:
    return _functional.row_keys(key, mx.array([tag], dtype=mx.uint32))[0]


def _mean_prediction(
    robust: RobustModel, x: mx.array, draws: int, key: mx.array, rows: Optional[mx.array] = None
) -> mx.array:
    """argmax of the defended model's logits averaged over ``draws`` random draws (eval mode),
    keyed per sample by ``key`` and ``rows`` (global sample indices, default 0..N-1)."""
    return mx.argmax(robust.defended_logits(x, key, rows, draws), axis=-1)


def _predict_batched(robust: RobustModel, x: mx.array, batch_size: Optional[int]) -> mx.array:
    step = x.shape[0] if batch_size is None else batch_size
    return mx.concatenate([robust.base_predict(x[s : s + step]) for s in range(0, x.shape[0], step)])


def _masking_checks(
    report: RobustnessReport,
    robust: RobustModel,
    x: mx.array,
    y: mx.array,
    clean_correct: np.ndarray,
    norm: str,
    key: mx.array,
    batch_size: Optional[int],
) -> None:
    """Fill ``report.checks`` and ``report.warnings`` (Carlini et al. 2019, section 5)."""
    warn, checks = report.warnings, report.checks
    tol = max(2.0 / max(report.num_samples, 1), 0.01)  # two samples or one point

    # 1. Robust accuracy must not increase with eps (per attack and for the ensemble).
    rising = []
    for a in report.attacks + [None]:
        accs = [report.robust_accuracy(e, a) for e in report.eps]
        for e0, e1, a0, a1 in zip(report.eps, report.eps[1:], accs, accs[1:]):
            if a1 > a0 + tol:
                rising.append(f"{a or 'ensemble'}: {a0:.1%} at eps={e0:g} -> {a1:.1%} at eps={e1:g}")
    checks["monotone_in_eps"] = not rising
    if rising:
        warn.append("robust accuracy grows with eps (" + "; ".join(rising) + "): a sign of gradient masking "
                    "or a too-weak attack")

    # 2. Black-box beating white-box: the score-based attack breaks what gradient attacks did not.
    white = [a for a in report.attacks if not any(a.lower().startswith(b.lower()) for b in BLACK_BOX)]
    black = [a for a in report.attacks if a not in white]
    if white and black:
        beaten = []
        for e in report.eps:
            if report.cumulative:
                # The black-box attack only saw samples every earlier (white-box) attack left robust.
                for b in black:
                    s = report.stats[(b, e)]
                    extra = s.success_rate * s.attacked
                    if extra >= max(2, 0.01 * report.num_samples):
                        beaten.append(f"eps={e:g}: {b} broke {int(extra)} samples the gradient attacks did not")
            else:
                best_white = min(report.robust_accuracy(e, a) for a in white)
                for b in black:
                    if report.robust_accuracy(e, b) < best_white - tol:
                        beaten.append(f"eps={e:g}: {b} {report.robust_accuracy(e, b):.1%} < "
                                      f"white-box {best_white:.1%}")
        checks["black_box_not_better"] = not beaten
        if beaten:
            warn.append("a black-box attack beats the white-box attacks (" + "; ".join(beaten) + "): gradients "
                        "are likely masked")

    # Diagnostics on up to 100 correctly classified samples.
    idx = np.flatnonzero(clean_correct)[:100]
    if idx.size == 0:
        return
    sel = mx.array(idx.astype(np.int32))
    xs, ys = x[sel], y[sel]
    lo, hi = robust.bounds
    e_mid = report.eps[len(report.eps) // 2] if report.eps[len(report.eps) // 2] > 0 else report.eps[-1]

    # 3. One step beating many steps at the same eps.
    if e_mid > 0:
        one = robust.attack(xs, ys, FGSM(eps=e_mid, norm=norm), key=key, batch_size=batch_size)
        many = robust.attack(xs, ys, PGD(eps=e_mid, steps=20, norm=norm), key=key, batch_size=batch_size)
        checks["fgsm_vs_pgd"] = {"eps": e_mid, "fgsm": one.robust_accuracy, "pgd20": many.robust_accuracy}
        if one.robust_accuracy < many.robust_accuracy - tol:
            warn.append(f"FGSM ({one.robust_accuracy:.1%}) beats PGD-20 ({many.robust_accuracy:.1%}) at "
                        f"eps={e_mid:g}: a one-step attack should never win; gradients are likely masked")

    # 4. An unbounded attack must reach 0%: eps covering the whole input range.
    huge = (hi - lo) if norm == "linf" else (hi - lo) * math.sqrt(float(np.prod(x.shape[1:])))
    big = robust.attack(xs, ys, PGD(eps=huge, steps=50, norm=norm, step_size=huge / 10, restarts=1),
                        key=key, batch_size=batch_size)
    checks["huge_eps_accuracy"] = big.robust_accuracy
    if big.robust_accuracy > 0:
        warn.append(f"PGD with eps={huge:g} (the whole input range) leaves {big.robust_accuracy:.1%} accuracy: an "
                    "unbounded attack should reach 0%; gradients are likely masked or the model is degenerate")

    # 5. Zero or non-finite input gradients.
    zero, nonfinite = _gradient_health(robust, xs, ys, _stream(key, _GRADIENT))
    checks["zero_gradient_fraction"] = zero
    checks["nonfinite_gradient_fraction"] = nonfinite
    if zero > 0.1 or nonfinite > 0:
        warn.append(f"input gradients are zero on {zero:.1%} and NaN/Inf on {nonfinite:.1%} of samples: "
                    "gradient attacks are blind there (shattered or vanishing gradients)")


def _gradient_health(robust: RobustModel, x: mx.array, y: mx.array, key: mx.array) -> tuple[float, float]:
    """Fractions of samples whose cross-entropy input gradient is all zero / has NaN or Inf
    (a random defence: one draw keyed per sample by ``key``)."""

    def loss(xx):
        return nn.losses.cross_entropy(robust.forward(xx, key, training=False), y, reduction="sum")

    g = mx.grad(loss)(x)
    mx.eval(g)
    g = np.array(g).reshape(x.shape[0], -1)
    finite = np.isfinite(g).all(axis=1)
    zero = finite & (np.abs(g).max(axis=1) == 0)
    return float(zero.mean()), float((~finite).mean())
