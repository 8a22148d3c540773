"""evaluate(): the ensemble report, its accessors and outputs, and the gradient-masking checks."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_robust as mr
from conftest import digits_robust as _robust

EPS = [0.0, 0.1, 0.2]


@pytest.fixture(scope="module")
def report(cnn, digits):
    x, y = digits[2][:120], digits[3][:120]
    return mr.evaluate(_robust(cnn), x, y, attacks=["fgsm", "pgd", "pgd-margin"], eps=EPS, key=mr.key(0),
                       progress=False)


class Quantized(nn.Module):
    """A deliberately masked model: rounds its input (zero gradient almost everywhere)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __call__(self, x):
        return self.inner(mx.round(x * 4) / 4)


def test_report_accessors_and_worst_case(report, cnn, digits):
    x, y = digits[2][:120], digits[3][:120]
    clean = float(mx.mean(mx.argmax(cnn(x), axis=-1) == y).item())
    assert report.clean_accuracy == pytest.approx(clean)
    assert report.eps == EPS and report.attacks == ["fgsm", "pgd", "pgd-margin"]
    assert not report.cumulative
    for e in EPS:
        per_attack = [report.robust_accuracy(e, a) for a in report.attacks]
        assert report.robust_accuracy(e) <= min(per_attack) + 1e-12  # worst case over attacks
        assert all(a <= report.clean_accuracy for a in per_attack)
    assert report.robust_accuracy(0.0) == pytest.approx(report.clean_accuracy)  # eps 0 changes nothing
    assert report.robust_accuracy(0.2) < report.robust_accuracy(0.1) < report.clean_accuracy
    s = report.stats[("pgd", 0.1)]
    assert 0 < s.mean_norm <= 0.1 + 1e-6 and s.max_norm <= 0.1 + 1e-6 and s.attacked == round(clean * 120)
    with pytest.raises(ValueError, match="eps 0.3 is not in this report"):
        report.robust_accuracy(0.3)
    with pytest.raises(ValueError, match="attack 'apgd' is not in this report"):
        report.robust_accuracy(0.1, "apgd")


def test_ensemble_equals_per_sample_worst_case_of_separate_attacks(report, cnn, digits):
    x, y = digits[2][:120], digits[3][:120]
    robust = _robust(cnn)
    for e in EPS[1:]:
        broken = np.zeros(120, dtype=bool)
        for attack in (mr.FGSM(eps=e), mr.PGD(eps=e, steps=40), mr.PGD(eps=e, steps=40, loss="margin")):
            broken |= np.array(robust.attack(x, y, attack, key=mr.key(0)).success)
        assert report.robust_accuracy(e) == pytest.approx(1 - broken.mean())


def test_cumulative_mode_gives_the_same_ensemble(report, cnn, digits):
    x, y = digits[2][:120], digits[3][:120]
    cum = mr.evaluate(_robust(cnn), x, y, attacks=["fgsm", "pgd", "pgd-margin"], eps=EPS, key=mr.key(0),
                      early_stop=True, progress=False, checks=False)
    assert cum.cumulative
    for e in EPS:
        assert cum.robust_accuracy(e) == pytest.approx(report.robust_accuracy(e))
        # Later attacks only see survivors: never more samples than the first attack.
        assert cum.stats[("pgd-margin", e)].attacked <= cum.stats[("fgsm", e)].attacked


def test_outputs_markdown_json_plot(report, tmp_path):
    md = report.to_markdown()
    assert "| pgd |" in md and "worst case (ensemble)" in md and f"{report.clean_accuracy:.1%}" in md
    data = json.loads(report.to_json(str(tmp_path / "r.json")))
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert data["ensemble_robust_accuracy"]["0.1"] == pytest.approx(report.robust_accuracy(0.1))
    assert len(data["per_attack"]) == len(report.attacks) * len(report.eps)
    report.plot(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_model_raises_no_masking_warning(report):
    assert report.warnings == []
    assert report.checks["huge_eps_accuracy"] == 0.0
    assert report.checks["zero_gradient_fraction"] < 0.1


def test_masked_model_triggers_warnings(cnn, digits):
    x, y = digits[2][:60], digits[3][:60]
    rep = mr.evaluate(_robust(Quantized(cnn)), x, y, attacks=["fgsm", "pgd"], eps=[0.05, 0.1], key=mr.key(1),
                      progress=False)
    text = " ".join(rep.warnings)
    assert rep.checks["zero_gradient_fraction"] > 0.9
    assert "input gradients are zero" in text
    assert rep.checks["huge_eps_accuracy"] > 0 and "whole input range" in text


def test_rising_accuracy_is_flagged():
    rep = mr.RobustnessReport(
        clean_accuracy=0.9, eps=[0.1, 0.2], attacks=["a"], norm="linf", num_samples=100,
        stats={("a", 0.1): mr.evaluate.__globals__["AttackStats"](0.3, 0.6, 0.1, 0.1, 0.0, 90),
               ("a", 0.2): mr.evaluate.__globals__["AttackStats"](0.5, 0.4, 0.2, 0.2, 0.0, 90)},
        ensemble={0.1: 0.3, 0.2: 0.5}, cumulative=False,
    )
    from mlx_robust.evaluate import _masking_checks

    _masking_checks(rep, None, None, None, np.zeros(100, dtype=bool), "linf", mr.key(0), None)
    assert rep.checks["monotone_in_eps"] is False
    assert any("grows with eps" in w for w in rep.warnings)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(attacks=["pgd", "nope"]), ValueError, "unknown attack 'nope'"),
    (dict(attacks=[]), ValueError, "attacks must name at least one attack"),
    (dict(attacks=[3]), TypeError, "attacks must hold attack names"),
    (dict(attacks=["pgd", "pgd"]), ValueError, "distinct names"),
    (dict(attacks=["pgd"], eps=[]), ValueError, "eps must hold at least one radius"),
    (dict(attacks=["pgd"], eps=[-0.1]), ValueError, "eps must be finite and >= 0"),
    (dict(attacks=["pgd"], eps=[float("nan")]), ValueError, "eps must be finite and >= 0"),
    (dict(attacks=["pgd"], norm="l1"), ValueError, "norm must be 'linf' or 'l2'"),
    (dict(attacks=["cw"], norm="linf"), ValueError, "'cw' \\(Carlini-Wagner L2\\) needs norm='l2'"),
    (dict(attacks=["pgd"], y=np.zeros(7, np.int32)), ValueError, "y has 7 labels but x has 10 samples"),
])
def test_bad_input(mlp, digits, kwargs, exc, match):
    x, y = digits[2][:10], digits[3][:10]
    y = kwargs.pop("y", y)
    with pytest.raises(exc, match=match):
        mr.evaluate(_robust(mlp), x, y, progress=False, **kwargs)


def test_nan_logits_give_a_clear_error(digits):
    class NaNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def __call__(self, x):
            return self.lin(x.reshape(x.shape[0], -1)) * mx.array(float("nan"))

    x, y = digits[2][:10], digits[3][:10]
    with pytest.raises(ValueError, match="NaN"):
        mr.evaluate(_robust(NaNModel()), x, y, attacks=["pgd"], eps=[0.1], progress=False)


def test_random_defence_is_evaluated_with_eot(mlp, digits):
    x, y = digits[2][:40], digits[3][:40]
    rep = mr.evaluate(_robust(mlp, noise=mr.GaussianNoise(0.1, eot_samples=4)), x, y, attacks=["pgd"],
                      eps=[0.1], key=mr.key(2), progress=False, checks=False)
    assert rep.eot_samples == 4 and "EOT-4" in rep.to_markdown()


def test_minimal_perturbation_attack_counts_only_within_eps(cnn, digits):
    x, y = digits[2][:30], digits[3][:30]
    rep = mr.evaluate(_robust(cnn), x, y, attacks=["cw"], norm="l2", eps=[0.0, 0.3, 1.0, 3.0], key=mr.key(3),
                      progress=False, checks=False)
    accs = [rep.robust_accuracy(e) for e in rep.eps]
    assert accs == sorted(accs, reverse=True)  # more budget, more of C&W's successes count
    assert accs[0] == pytest.approx(rep.clean_accuracy) and accs[-1] < accs[1]
    for e in rep.eps[1:]:
        assert rep.stats[("cw", e)].max_norm <= e + 1e-6
