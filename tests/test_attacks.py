"""Attack properties, C++ core vs the plain-MLX reference, and the compiled loop's contracts."""

from __future__ import annotations

import os
import types

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import assert_unchanged, snapshot, digits_robust as _robust, clean_correct as _clean_correct

import mlx_robust as mr
from reference import pgd_reference

ATTACKS = {
    "fgsm": lambda eps: mr.FGSM(eps=eps),
    "fgm-l2": lambda eps: mr.FGSM(eps=eps * 4, norm="l2"),
    "pgd-linf": lambda eps: mr.PGD(eps=eps, steps=8),
    "pgd-l2": lambda eps: mr.PGD(eps=eps * 4, steps=8, norm="l2"),
    "pgd-margin-restarts": lambda eps: mr.PGD(eps=eps, steps=5, loss="margin", restarts=2),
    "pgd-kl": lambda eps: mr.PGD(eps=eps, steps=5, loss="kl"),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_inside_ball_and_bounds(mlp, batch, name):
    x, y = batch
    attack = ATTACKS[name](0.1)
    res = _robust(mlp).attack(x, y, attack, key=mr.key(0))
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    delta = np.array(res.x_adv - x).reshape(x.shape[0], -1)
    norms = np.abs(delta).max(1) if attack.norm == "linf" else np.sqrt((delta**2).sum(1))
    assert np.all(norms <= float(attack.eps) + 1e-5)
    np.testing.assert_allclose(np.array(res.norms), norms, rtol=1e-5, atol=1e-6)
    xa = np.array(res.x_adv)
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    # The reported success and logits describe x_adv itself.
    np.testing.assert_allclose(np.array(res.logits), np.array(mlp(res.x_adv)), rtol=1e-4, atol=1e-4)
    assert np.array_equal(np.array(res.success), np.array(res.predictions != y))


@pytest.mark.parametrize("name", ATTACKS)
def test_eps_zero_is_identity(mlp, batch, name):
    x, y = batch
    res = _robust(mlp).attack(x, y, ATTACKS[name](0.0), key=mr.key(1))
    assert mx.array_equal(res.x_adv, x)
    assert np.array_equal(np.array(res.success), ~_clean_correct(mlp, x, y))


@pytest.mark.parametrize("name", ATTACKS)
def test_robust_accuracy_at_most_clean_and_input_not_mutated(mlp, batch, name):
    x, y = batch
    x_copy, y_copy = mx.array(x), mx.array(y)
    res = _robust(mlp).attack(x, y, ATTACKS[name](0.1), key=mr.key(2))
    clean = _clean_correct(mlp, x, y)
    robust_correct = ~np.array(res.success)
    assert np.all(robust_correct <= clean)  # per sample, not only on average
    assert robust_correct.mean() < clean.mean()  # and the attack does something at eps=0.1
    assert mx.array_equal(x, x_copy) and mx.array_equal(y, y_copy)


@pytest.mark.parametrize("name", ATTACKS)
def test_model_untouched(mlp, batch, name):
    x, y = batch
    mlp.train()  # a mode the attack must switch away from and back to
    snap = snapshot(mlp)
    _robust(mlp).attack(x, y, ATTACKS[name](0.1), key=mr.key(3))
    assert_unchanged(mlp, snap)
    mlp.eval()


def test_batch_equals_per_sample_with_same_key(mlp, batch):
    x, y = batch
    robust = _robust(mlp)
    attack = mr.PGD(eps=0.1, steps=5, early_stop=False)
    whole = robust.attack(x[:8], y[:8], attack, key=mr.key(4))
    for i in range(8):
        one = robust.attack(x[i : i + 1], y[i : i + 1], attack, key=mr.key(4))
        np.testing.assert_allclose(np.array(one.x_adv), np.array(whole.x_adv[i : i + 1]), atol=1e-6)
    halves = robust.attack(x[:8], y[:8], attack, key=mr.key(4), batch_size=4)
    np.testing.assert_allclose(np.array(halves.x_adv), np.array(whole.x_adv), atol=1e-6)


def test_pgd_at_least_as_strong_as_fgsm(cnn, digits):
    x, y = digits[2][:200], digits[3][:200]
    robust = _robust(cnn)
    for eps in (0.1, 0.2):
        fgsm = robust.attack(x, y, mr.FGSM(eps=eps), key=mr.key(5))
        pgd = robust.attack(x, y, mr.PGD(eps=eps, steps=10), key=mr.key(5))
        assert pgd.robust_accuracy <= fgsm.robust_accuracy


def test_targeted_hits_target_more_often_than_chance(mlp, digits):
    x, y = digits[2][:100], digits[3][:100]
    target = (y + 1) % 10
    res = _robust(mlp).attack(x, y, mr.PGD(eps=0.2, steps=10), y_target=target, key=mr.key(6))
    hit = np.array(res.predictions == target)
    assert np.array_equal(np.array(res.success), hit)
    assert hit.mean() > 0.5  # chance is 0.1
    # The untargeted attack at the same budget does not aim at `target`.
    untargeted = _robust(mlp).attack(x, y, mr.PGD(eps=0.2, steps=10), key=mr.key(6))
    assert hit.mean() > float(mx.mean(untargeted.predictions == target))


def test_y_none_attacks_own_predictions(mlp, batch):
    x, _ = batch
    res = _robust(mlp).attack(x, None, mr.PGD(eps=0.0, steps=2), key=mr.key(7))
    assert mx.array_equal(res.y, mx.argmax(mlp(x), axis=-1).astype(mx.int32))
    assert not bool(mx.any(res.success))  # at eps 0 nothing changes the model's own prediction


def test_per_sample_eps(mlp, batch):
    x, y = batch
    eps = np.linspace(0.0, 0.2, x.shape[0]).astype(np.float32)
    res = _robust(mlp).attack(x, y, mr.PGD(eps=eps, steps=5), key=mr.key(8))
    delta = np.abs(np.array(res.x_adv - x)).reshape(x.shape[0], -1).max(1)
    assert np.all(delta <= eps + 1e-6)
    assert delta[0] == 0.0 and delta[-1] > 0.1


def test_numpy_inputs_accepted(mlp, batch):
    x, y = batch
    a = _robust(mlp).attack(np.array(x, dtype=np.float64), np.array(y), mr.FGSM(eps=0.1), key=mr.key(9))
    b = _robust(mlp).attack(x, y, mr.FGSM(eps=0.1), key=mr.key(9))
    assert a.x_adv.dtype == mx.float32
    assert mx.array_equal(a.x_adv, b.x_adv)


# --- C++ core vs the plain-MLX reference ------------------------------------------------------

REFERENCE_CASES = [
    dict(norm="linf", loss="ce", steps=6, restarts=1, random_start_=False, targeted=False),
    dict(norm="linf", loss="ce", steps=6, restarts=2, random_start_=True, targeted=False),
    dict(norm="l2", loss="ce", steps=6, restarts=1, random_start_=True, targeted=False),
    dict(norm="linf", loss="margin", steps=4, restarts=1, random_start_=True, targeted=True),
    dict(norm="l2", loss="margin", steps=5, restarts=2, random_start_=False, targeted=False),
    dict(norm="linf", loss="ce", steps=5, restarts=1, random_start_=True, targeted=False, track_best=False),
    dict(norm="linf", loss="kl", steps=5, restarts=1, random_start_=True, targeted=False, track_best=False),
    dict(norm="l2", loss="kl", steps=4, restarts=2, random_start_=True, targeted=False),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("unroll", [1, 3])
def test_core_matches_reference(mlp, batch, case, unroll):
    x, y = batch
    eps_val = 0.1 if case["norm"] == "linf" else 0.8
    eps = mx.full((x.shape[0],), eps_val)
    alpha = eps * 0.25
    labels = (y + 3) % 10 if case["targeted"] else y
    mlp.eval()
    probs = mx.softmax(mlp(x), axis=-1) if case["loss"] == "kl" else None
    ref_x, ref_s, ref_l, _ = pgd_reference(mlp, x, labels, eps, alpha, 0.0, 1.0, key=mr.key(10), probs=probs, **case)
    robust = _robust(mlp)
    x_adv, success, loss, logits, norms = robust._fn.run_attack(
        x, labels, eps, alpha, (0.0, 1.0), num_classes=10, norm=case["norm"], loss=case["loss"],
        steps=case["steps"], restarts=case["restarts"], random_start=case["random_start_"],
        targeted=case["targeted"], track_best=case.get("track_best", True), early_stop=False,
        unroll=unroll, key=mr.key(10), probs=probs,
    )
    # Same ops in the same order: identical up to float rounding of fused kernels.
    np.testing.assert_allclose(np.array(x_adv), np.array(ref_x), atol=1e-5)
    assert np.array_equal(np.array(success), np.array(ref_s))
    np.testing.assert_allclose(np.array(loss), np.array(ref_l), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("restarts", [1, 2])
def test_early_stop_gives_same_result(cnn, digits, restarts):
    x, y = digits[2][:128], digits[3][:128]
    robust = _robust(cnn)
    cfg = dict(eps=0.15, steps=12, restarts=restarts, unroll=2)
    slow = robust.attack(x, y, mr.PGD(**cfg, early_stop=False), key=mr.key(11))
    fast = robust.attack(x, y, mr.PGD(**cfg, early_stop=True), key=mr.key(11))
    same_success = np.array(slow.success) == np.array(fast.success)
    same_x = np.all(np.isclose(np.array(fast.x_adv), np.array(slow.x_adv), atol=1e-5).reshape(128, -1), axis=1)
    if mx.default_device() == mx.cpu:
        # Same kernels whatever the batch size: identical (the loss of samples that left the batch
        # early is derived from their kept logits, as at the end of a restart).
        assert same_success.all() and same_x.all()
        np.testing.assert_allclose(np.array(fast.loss), np.array(slow.loss), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(fast.logits), np.array(slow.logits), rtol=1e-5, atol=1e-5)
    else:
        # GPU GEMMs round differently at other batch sizes, which can flip a sign step of a
        # sample still being attacked; the results may differ only in such rare samples.
        assert same_success.mean() >= 0.97 and same_x.mean() >= 0.95
    assert fast.success.sum().item() > 0


def test_result_is_scored_at_the_returned_x_adv(cnn, digits):
    # Without early stop a deterministic model's samples stop at their first success and are
    # scored at the end; with it, kept iterates carry their logits. Either way logits, loss and
    # success are those of x_adv itself -- also when both modes alternate on one model (their
    # compiled steps differ and must not be mixed up).
    x, y = digits[2][:128], digits[3][:128]
    robust = _robust(cnn)
    cnn.eval()
    # On a GPU the eager forward may pick other (TF32) convolution kernels than the compiled step;
    # a stale result (the bug this guards against) was off by 0.33.
    tol = 1e-4 if mx.default_device() == mx.cpu else 5e-3
    for early_stop in (False, True, False):
        res = robust.attack(x, y, mr.PGD(eps=0.15, steps=12, restarts=2, unroll=2, early_stop=early_stop),
                            key=mr.key(5))
        z = cnn(res.x_adv)
        np.testing.assert_allclose(np.array(res.logits), np.array(z), rtol=tol, atol=tol)
        pred = np.array(mx.argmax(res.logits, axis=-1))
        assert np.array_equal(np.array(res.success), pred != np.array(y))
        ce = np.array(nn.losses.cross_entropy(res.logits, mx.array(y), reduction="none"))
        np.testing.assert_allclose(np.array(res.loss), ce, rtol=tol, atol=tol)
        assert 0 < res.success.sum().item() < 128


# --- the compiled loop's contracts -------------------------------------------------------------


def test_profile_env_prints_phase_times():
    # MLX_ROBUST_PROFILE=1: the core reports where a call's time goes (setup, steps, finish, eval).
    import subprocess
    import sys

    code = ("import mlx.core as mx, mlx_robust as mr\n"
            "m = mr.models.MLP(16, hidden=(8,), num_classes=4)\n"
            "r = mr.RobustModel(m, input_shape=(4, 4, 1), num_classes=4)\n"
            "r.attack(mx.random.uniform(shape=(3, 4, 4, 1)), mx.array([0, 1, 2]), mr.PGD(eps=0.1, steps=3))\n")
    for env, expect in (({"MLX_ROBUST_PROFILE": "1"}, True), ({"MLX_ROBUST_PROFILE": "0"}, False)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-2000:]
        phases = [ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("[mlx-robust]")]
        assert phases == (["setup", "steps", "finish", "eval"] if expect else []), proc.stderr[-2000:]


def test_trace_count_constant_across_calls(mlp, batch):
    x, y = batch
    robust = _robust(mlp)
    attack = mr.PGD(eps=0.1, steps=10, unroll=5, early_stop=False)
    robust.attack(x, y, attack, key=mr.key(12))
    traces = robust.trace_count
    assert traces >= 1
    for seed in range(3):
        robust.attack(x, y, attack, key=mr.key(13 + seed))
    assert robust.trace_count == traces  # no Python ran per step after the first trace


def test_model_traced_not_called_per_step(mlp, batch):
    x, y = batch

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            # Not a plain int attribute: the library runs a shallow copy of the model, which shares
            # this object (an int would count on the copy).
            self.counter = types.SimpleNamespace(calls=0)

        @property
        def calls(self):
            return self.counter.calls

        def __call__(self, x):
            self.counter.calls += 1
            return self.inner(x)

    model = Counting(mlp)
    robust = _robust(model)
    attack = mr.PGD(eps=0.1, steps=20, unroll=5, early_stop=False)
    robust.attack(x, y, attack, key=mr.key(14))
    first = model.calls
    assert first >= 1  # the model was traced
    robust.attack(x, y, attack, key=mr.key(15))
    assert model.calls == first  # 20 steps ran without calling the Python model


def test_optimizer_updates_are_seen_by_next_attack(digits):
    x, y = digits[0][:64], digits[1][:64]
    mx.random.seed(3)
    model = mr.models.MLP(64, hidden=(16,), num_classes=10)
    robust = _robust(model)
    attack = mr.PGD(eps=0.1, steps=4, random_start=False, early_stop=False, unroll=2)
    opt = optim.SGD(learning_rate=0.5)
    loss_and_grad = nn.value_and_grad(model, lambda m, a, b: nn.losses.cross_entropy(m(a), b, reduction="mean"))
    robust.attack(x, y, attack, key=mr.key(16))  # traced with the initial weights
    for _ in range(3):
        _, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters())
    res = robust.attack(x, y, attack, key=mr.key(16))
    model.eval()
    ref_x, _, _, _ = pgd_reference(
        model, x, y, mx.full((64,), 0.1), mx.full((64,), 2.5 * 0.1 / 4), 0.0, 1.0,
        steps=4, random_start_=False, key=mr.key(16),
    )
    np.testing.assert_allclose(np.array(res.x_adv), np.array(ref_x), atol=1e-5)
    np.testing.assert_allclose(np.array(res.logits), np.array(model(res.x_adv)), atol=1e-4)


def test_same_key_same_result_and_different_key_differs(mlp, batch):
    x, y = batch
    robust = _robust(mlp)
    attack = mr.PGD(eps=0.1, steps=3)
    a = robust.attack(x, y, attack, key=mr.key(17))
    b = robust.attack(x, y, attack, key=mr.key(17))
    c = robust.attack(x, y, attack, key=mr.key(18))
    assert mx.array_equal(a.x_adv, b.x_adv)
    assert not mx.array_equal(a.x_adv, c.x_adv)


def test_model_raising_mid_trace_is_restored(mlp, batch):
    x, y = batch

    class Flaky(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.fail = True

        def __call__(self, x):
            out = self.inner(x)
            if self.fail:
                raise RuntimeError("boom")
            return out

    model = Flaky(mlp)
    model.train()
    snap = snapshot(model)
    robust = _robust(model)
    with pytest.raises(RuntimeError, match="boom"):
        robust.attack(x, y, mr.PGD(eps=0.1, steps=3), key=mr.key(19))
    assert_unchanged(model, snap)
    model.fail = False
    res = robust.attack(x, y, mr.PGD(eps=0.1, steps=3), key=mr.key(19))
    assert res.x_adv.shape == x.shape
    assert_unchanged(model, snap)
