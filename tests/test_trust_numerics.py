"""Issue 12 (Trust), items 3 and 4: low-precision results are exact; random defences are reproducible.

3. float16/bfloat16 inputs: the returned x_adv lies inside the eps-ball and the bounds in its own
   dtype, and norms/success/logits/loss describe exactly that array.
4. GaussianNoise: the same key gives the same result whatever batch_size or early_stop, and
   evaluate(key=...) never draws from MLX's global generator.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_robust as mr

LOW = {"bfloat16": mx.bfloat16, "float16": mx.float16}


def _ce(z, y):
    z = z - z.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]


def _margin(z, y):
    other = z.copy()
    other[np.arange(len(y)), y] = -np.inf
    return other.max(axis=1) - z[np.arange(len(y)), y]


# (attack, norm, eps (None: minimum-norm), the result's loss from float32 logits and labels)
ATTACKS = {
    "pgd-linf": (lambda: mr.PGD(eps=0.1, steps=8), "linf", 0.1, _ce),
    "pgd-l2": (lambda: mr.PGD(eps=0.9, steps=8, norm="l2"), "l2", 0.9, _ce),
    "apgd-linf": (lambda: mr.APGD(eps=0.1, steps=8), "linf", 0.1, _ce),
    "apgd-l2": (lambda: mr.APGD(eps=0.9, steps=8, norm="l2"), "l2", 0.9, _ce),
    "fgsm": (lambda: mr.FGSM(eps=0.1), "linf", 0.1, _ce),
    "cw": (lambda: mr.CW(steps=20, binary_search_steps=2, lr=0.05), "l2", None, _margin),
    "square-linf": (lambda: mr.Square(eps=0.1, n_queries=30), "linf", 0.1, _margin),
    "square-l2": (lambda: mr.Square(eps=0.9, n_queries=30, norm="l2"), "l2", 0.9, _margin),
}


@pytest.mark.parametrize("dtype", sorted(LOW))
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_low_precision_result_is_exact_on_the_returned_array(mlp, batch, dtype, name):
    make, norm, eps, loss_of = ATTACKS[name]
    x, y = batch
    x = x.astype(LOW[dtype])
    robust = mr.RobustModel(mlp, bounds=(0.0, 1.0), num_classes=10)
    res = robust.attack(x, y, make(), key=mr.key(0))
    assert res.x_adv.dtype == x.dtype and res.x_adv.shape == x.shape

    xa = np.array(res.x_adv.astype(mx.float32)).reshape(x.shape[0], -1)
    x0 = np.array(x.astype(mx.float32)).reshape(x.shape[0], -1)
    d = xa - x0
    size = np.abs(d).max(axis=1) if norm == "linf" else np.sqrt((d.astype(np.float64) ** 2).sum(axis=1))
    if eps is not None:
        assert size.max() <= eps * (1 + 1e-6), f"x_adv leaves the eps-ball in {dtype}: {size.max()} > {eps}"
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    np.testing.assert_allclose(np.array(res.norms), size, rtol=1e-6, atol=1e-7)

    # A fresh forward of the model (eval mode) on exactly the returned array.
    z = np.array(mlp(res.x_adv).astype(mx.float32))
    np.testing.assert_array_equal(np.array(res.logits), z)
    yy = np.array(y)
    np.testing.assert_array_equal(np.array(res.success), z.argmax(axis=1) != yy)
    np.testing.assert_allclose(np.array(res.loss), loss_of(z, yy), rtol=1e-5, atol=1e-5)
    assert res.x_adv.dtype == x.dtype


def test_round_toward_never_leaves_the_float32_perturbation():
    from mlx_robust.model import round_toward

    rng = np.random.default_rng(0)
    for dtype in LOW.values():
        x = mx.array(rng.uniform(-1, 1, 4000).astype(np.float32)).astype(dtype)
        # float32 points near x, many not representable in the low dtype; zeros included.
        xa = x.astype(mx.float32) + mx.array(rng.normal(0, 0.01, 4000).astype(np.float32))
        xa = mx.where(mx.arange(4000) % 97 == 0, mx.array(0.0), xa)
        out = round_toward(xa, x)
        assert out.dtype == dtype
        x32, o32 = np.array(x.astype(mx.float32)), np.array(out.astype(mx.float32))
        assert np.all(np.abs(o32 - x32) <= np.abs(np.array(xa) - x32))
        # and it is the plain cast, or one ulp from it (never further)
        cast = np.array(xa.astype(dtype).astype(mx.float32))
        assert np.mean(o32 == cast) > 0.5


NOISE = mr.GaussianNoise(0.2, eot_samples=2)


def _noisy(mlp):
    return mr.RobustModel(mlp, bounds=(0.0, 1.0), num_classes=10, noise=NOISE)


@pytest.mark.parametrize(
    "make",
    [
        lambda es: mr.PGD(eps=0.1, steps=6, early_stop=es),
        lambda es: mr.APGD(eps=0.1, steps=6, early_stop=es),
        lambda es: mr.Square(eps=0.1, n_queries=12, early_stop=es),
    ],
    ids=["pgd", "apgd", "square"],
)
def test_random_defence_result_depends_only_on_the_key(mlp, digits, make, bitwise_device):
    x, y = digits[2][:48], digits[3][:48]
    robust = _noisy(mlp)
    ref = robust.attack(x, y, make(True), key=mr.key(3))
    for batch_size in (None, 7, 32):
        for early_stop in (True, False):
            res = robust.attack(x, y, make(early_stop), key=mr.key(3), batch_size=batch_size)
            what = f"batch_size={batch_size}, early_stop={early_stop}"
            np.testing.assert_array_equal(np.array(res.x_adv), np.array(ref.x_adv), err_msg=what)
            np.testing.assert_array_equal(np.array(res.success), np.array(ref.success), err_msg=what)
            np.testing.assert_array_equal(np.array(res.logits), np.array(ref.logits), err_msg=what)


def test_noisy_predict_with_key_is_per_sample(mlp, batch):
    x, _ = batch
    robust = _noisy(mlp)
    whole = np.array(robust.predict(x, key=mr.key(1)))
    mx.random.seed(5)
    again = np.array(robust.predict(x, key=mr.key(1)))
    np.testing.assert_array_equal(whole, again)
    np.testing.assert_array_equal(np.array(robust(x, key=mr.key(1))), np.array(robust(x, key=mr.key(1))))
    # the first rows draw the same noise alone as in the whole batch
    head = np.array(robust(x[:5], key=mr.key(1)))
    np.testing.assert_array_equal(head, np.array(robust(x, key=mr.key(1)))[:5])


def test_evaluate_with_key_ignores_the_global_generator(mlp, batch):
    x, y = batch
    robust = _noisy(mlp)
    reports = []
    for seed in (1, 2):
        mx.random.seed(seed)
        rep = mr.evaluate(robust, x[:32], y[:32], attacks=["fgsm", "pgd"], eps=[0.1], key=mr.key(0),
                          progress=False)
        reports.append(rep)
    a, b = reports
    assert a.clean_accuracy == b.clean_accuracy
    for att in a.attacks:
        assert a.robust_accuracy(0.1, att) == b.robust_accuracy(0.1, att)
    assert a.checks == b.checks
