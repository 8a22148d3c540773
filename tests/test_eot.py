"""Random defences: GaussianNoise in RobustModel and EOT inside the compiled attack step."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_unchanged, snapshot, digits_robust as _robust

import mlx_robust as mr
from reference import pgd_reference


def test_eot_on_deterministic_model_equals_plain_attack(mlp, batch):
    x, y = batch
    robust = _robust(mlp)
    plain = robust.attack(x, y, mr.PGD(eps=0.1, steps=5), key=mr.key(0))
    eot = robust.attack(x, y, mr.PGD(eps=0.1, steps=5, eot_samples=8), key=mr.key(0))
    assert eot.eot_samples == 1  # nothing random to average
    assert mx.array_equal(plain.x_adv, eot.x_adv)


def test_random_defence_uses_eot_by_default_and_says_so(mlp, batch):
    x, y = batch
    robust = _robust(mlp, noise=mr.GaussianNoise(0.2, eot_samples=6))
    assert robust.is_random
    res = robust.attack(x, y, mr.PGD(eps=0.1, steps=3), key=mr.key(1))
    assert res.eot_samples == 6 and "EOT-6" in res.attack
    one = robust.attack(x, y, mr.PGD(eps=0.1, steps=3, eot_samples=1), key=mr.key(1))
    assert one.eot_samples == 1 and "EOT" not in one.attack


@pytest.mark.parametrize("eot", [1, 4])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eot_core_matches_reference(mlp, batch, eot, norm):
    x, y = batch
    noise = mr.GaussianNoise(0.3)
    eps_val = 0.1 if norm == "linf" else 0.8
    eps = mx.full((x.shape[0],), eps_val)
    alpha = eps * 0.25
    mlp.eval()
    ref_x, ref_s, ref_l, _ = pgd_reference(
        lambda xx, k: mlp(noise.apply(xx, k)), x, y, eps, alpha, 0.0, 1.0, norm=norm, steps=4,
        restarts=2, random_start_=True, key=mr.key(2), eot_samples=eot,
    )
    robust = _robust(mlp, noise=noise)
    x_adv, success, loss, _, _ = robust._fn.run_attack(
        x, y, eps, alpha, (0.0, 1.0), num_classes=10, norm=norm, loss="ce", steps=4, restarts=2,
        random_start=True, targeted=False, track_best=True, early_stop=False, unroll=3,
        key=mr.key(2), eot_samples=eot,
    )
    np.testing.assert_allclose(np.array(x_adv), np.array(ref_x), atol=1e-5)
    assert np.array_equal(np.array(success), np.array(ref_s))
    np.testing.assert_allclose(np.array(loss), np.array(ref_l), rtol=1e-4, atol=1e-4)


def test_noise_is_an_input_of_the_compiled_step_not_a_constant(mlp, batch):
    x, y = batch
    robust = _robust(mlp, noise=mr.GaussianNoise(0.3, eot_samples=2))
    attack = mr.PGD(eps=0.1, steps=4, unroll=2, early_stop=False)
    a = robust.attack(x, y, attack, key=mr.key(3))
    traces = robust.trace_count
    b = robust.attack(x, y, attack, key=mr.key(3))
    c = robust.attack(x, y, attack, key=mr.key(4))
    assert robust.trace_count == traces
    assert mx.array_equal(a.x_adv, b.x_adv)  # same key: same draws
    assert not mx.array_equal(a.loss, c.loss)  # new key: new draws, without retracing


def test_unroll_does_not_change_the_draws(mlp, batch):
    x, y = batch
    robust = _robust(mlp, noise=mr.GaussianNoise(0.3, eot_samples=2))
    a = robust.attack(x, y, mr.PGD(eps=0.1, steps=6, unroll=1, early_stop=False), key=mr.key(5))
    b = robust.attack(x, y, mr.PGD(eps=0.1, steps=6, unroll=4, early_stop=False), key=mr.key(5))
    np.testing.assert_allclose(np.array(a.x_adv), np.array(b.x_adv), atol=1e-6)


def test_eot_is_not_weaker_than_single_draw_pgd(cnn, digits):
    # The point of EOT: against a noisy model a single-draw attack overrates the defence.
    x, y = digits[2][:200], digits[3][:200]
    robust = _robust(cnn, noise=mr.GaussianNoise(0.25))
    single = robust.attack(x, y, mr.PGD(eps=0.15, steps=10, eot_samples=1), key=mr.key(6))
    eot = robust.attack(x, y, mr.PGD(eps=0.15, steps=10, eot_samples=16), key=mr.key(6))
    # Judge both adversarial sets the same way: the defended model's majority vote over 64 draws.
    def vote_accuracy(xa):
        votes = sum(mx.argmax(robust(xa), axis=-1) == y for _ in range(64))
        return float(mx.mean(votes > 32).item())

    # Measured: about 0.55-0.62 after single-draw PGD vs 0.20 after EOT-16 (clean 0.91).
    assert vote_accuracy(eot.x_adv) <= vote_accuracy(single.x_adv) - 0.15


def test_noise_defence_leaves_model_untouched(mlp, batch):
    x, y = batch
    snap = snapshot(mlp)
    robust = _robust(mlp, noise=mr.GaussianNoise(0.2, eot_samples=2))
    robust.attack(x, y, mr.PGD(eps=0.1, steps=3), key=mr.key(7))
    robust.predict(x)
    assert_unchanged(mlp, snap)


def test_noisy_forward_is_random_and_centred(mlp, batch):
    x, _ = batch
    robust = _robust(mlp, noise=mr.GaussianNoise(0.05))
    a, b = robust(x), robust(x)
    assert not mx.array_equal(a, b)
    # Small noise: the noisy logits stay close to the clean ones on average.
    mean = sum(robust(x) for _ in range(32)) / 32
    assert float(mx.mean(mx.abs(mean - mlp(x))).item()) < 0.5 * float(mx.mean(mx.abs(mlp(x))).item())


@pytest.mark.parametrize("kwargs,match", [
    (dict(std=0.0), "std must be a finite number > 0"),
    (dict(std=-1.0), "std must be a finite number > 0"),
    (dict(std=float("nan")), "std must be a finite number > 0"),
    (dict(std=0.1, eot_samples=0), "eot_samples must be an integer >= 1"),
])
def test_bad_noise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mr.GaussianNoise(**kwargs)


def test_bad_eot_samples_and_noise_type(mlp):
    with pytest.raises(ValueError, match="eot_samples must be None or an integer >= 1"):
        mr.PGD(eps=0.1, eot_samples=0)
    with pytest.raises(TypeError, match="noise must be an mr.GaussianNoise"):
        mr.RobustModel(mlp, noise=0.1)
