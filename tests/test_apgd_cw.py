"""APGD (Croce & Hein 2020) and Carlini-Wagner L2 (2017): properties, C++ core vs the plain-MLX
reference, the compiled loops' contracts, strength against PGD, and bad settings."""

from __future__ import annotations

import types

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import assert_unchanged, snapshot, digits_robust as _robust, clean_correct as _clean_correct

import mlx_robust as mr
from mlx_robust import _core
from reference import apgd_checkpoints, apgd_reference, cw_margin_loss, cw_reference, dlr_loss

# eps-bounded attacks, made from a base L-inf radius (L2 radii are 4x, as in test_attacks.py).
APGD_ATTACKS = {
    "apgd-ce-linf": lambda eps: mr.APGD(eps=eps, steps=10, early_stop=False, unroll=1),
    "apgd-dlr-linf-restarts": lambda eps: mr.APGD(eps=eps, steps=8, loss="dlr", restarts=2, unroll=1),
    "apgdt-l2": lambda eps: mr.APGDT(eps=eps * 4, steps=6, norm="l2", n_target_classes=3, unroll=1),
    "apgdt-linf-ce": lambda eps: mr.APGDT(eps=eps, steps=6, loss="ce", n_target_classes=2, unroll=1),
}
# Most tests compile one step per call (unroll=1): on the CPU backend a cold kernel cache makes every
# compiled graph cost seconds; unrolled graphs are covered by the trace and reference tests.
CW_SMALL = mr.CW(c=1.0, steps=50, binary_search_steps=2, unroll=1)


def _norms(delta, norm):
    d = np.array(delta).reshape(delta.shape[0], -1)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt((d**2).sum(1))


# --- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", APGD_ATTACKS)
def test_apgd_inside_ball_and_bounds(mlp, batch, name):
    x, y = batch
    attack = APGD_ATTACKS[name](0.1)
    res = _robust(mlp).attack(x, y, attack, key=mr.key(0))
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    norms = _norms(res.x_adv - x, attack.norm)
    assert np.all(norms <= float(attack.eps) + 1e-5)
    np.testing.assert_allclose(np.array(res.norms), norms, rtol=1e-5, atol=1e-6)
    xa = np.array(res.x_adv)
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    # The reported logits and success describe x_adv itself.
    np.testing.assert_allclose(np.array(res.logits), np.array(mlp(res.x_adv)), rtol=1e-4, atol=1e-4)
    assert np.array_equal(np.array(res.success), np.array(res.predictions != y))
    assert res.attack.startswith("APGD")


@pytest.mark.parametrize("name", APGD_ATTACKS)
def test_apgd_eps_zero_changes_nothing(mlp, batch, name):
    x, y = batch
    res = _robust(mlp).attack(x, y, APGD_ATTACKS[name](0.0), key=mr.key(1))
    assert mx.array_equal(res.x_adv, x)
    # no success beyond the samples misclassified already
    assert np.array_equal(np.array(res.success), ~_clean_correct(mlp, x, y))


@pytest.mark.parametrize("name", [*APGD_ATTACKS, "cw"])
def test_robust_at_most_clean_input_and_model_untouched(mlp, batch, name):
    x, y = batch
    attack = CW_SMALL if name == "cw" else APGD_ATTACKS[name](0.1)
    x_copy, y_copy = mx.array(x), mx.array(y)
    mlp.train()  # a mode the attack must switch away from and back to
    snap = snapshot(mlp)
    res = _robust(mlp).attack(x, y, attack, key=mr.key(2))
    assert_unchanged(mlp, snap)
    mlp.eval()
    clean = _clean_correct(mlp, x, y)
    robust_correct = ~np.array(res.success)
    assert np.all(robust_correct <= clean)  # per sample
    assert robust_correct.mean() < clean.mean()
    assert mx.array_equal(x, x_copy) and mx.array_equal(y, y_copy)


def test_apgd_per_sample_eps(mlp, batch):
    x, y = batch
    eps = np.linspace(0.0, 0.2, x.shape[0]).astype(np.float32)
    res = _robust(mlp).attack(x, y, mr.APGD(eps=eps, steps=10, early_stop=False, unroll=1), key=mr.key(8))
    delta = _norms(res.x_adv - x, "linf")
    assert np.all(delta <= eps + 1e-6)
    assert delta[0] == 0.0 and delta[-1] > 0.1


def test_deleted_wrapper_and_model_are_collected(batch):
    import gc
    import weakref

    x, y = batch
    model = mr.models.MLP(64, hidden=(16,), num_classes=10)
    robust = _robust(model)
    robust.attack(x, y, mr.APGD(eps=0.1, steps=3, unroll=1), key=mr.key(0))  # compiled entries exist
    robust.attack(x, y, mr.CW(steps=3, binary_search_steps=1, unroll=1), key=mr.key(0))
    refs = weakref.ref(model), weakref.ref(robust), weakref.ref(robust._fn)
    del model, robust
    gc.collect()
    assert all(r() is None for r in refs), "the model or its wrapper is kept alive after use"


def test_cw_result_properties(mlp, batch):
    x, y = batch
    res = _robust(mlp).attack(x, y, CW_SMALL, key=mr.key(3))
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype and res.attack.startswith("CW-L2")
    xa = np.array(res.x_adv)
    assert xa.min() >= 0.0 and xa.max() <= 1.0  # the tanh box
    np.testing.assert_allclose(np.array(res.norms), _norms(res.x_adv - x, "l2"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(res.logits), np.array(mlp(res.x_adv)), rtol=1e-4, atol=1e-4)
    success, clean = np.array(res.success), _clean_correct(mlp, x, y)
    assert np.array_equal(success, np.array(res.predictions != y))
    norms = np.array(res.norms)
    # No success found: x itself. Misclassified already: x itself (the smallest perturbation).
    assert np.all(norms[~success] == 0.0) and np.all(norms[~clean] == 0.0)
    assert np.all(norms[success & clean] > 0.0)
    assert success.mean() > 0.5
    # loss = logit margin max_{j!=y} Z_j - Z_y at x_adv
    np.testing.assert_allclose(np.array(res.loss), np.array(-cw_margin_loss(res.logits, y, kappa=1e9)), atol=1e-5)


def test_cw_confidence_kappa_is_reached(mlp, batch):
    x, y = batch
    kappa = 2.0
    attack = mr.CW(c=5.0, kappa=kappa, steps=100, binary_search_steps=2, unroll=1)
    res = _robust(mlp).attack(x, y, attack, key=mr.key(4))
    found = np.array(res.success) & _clean_correct(mlp, x, y)
    assert found.sum() > 10
    assert np.all(np.array(res.loss)[found] >= kappa - 1e-4)  # margin of every success >= kappa
    plain = _robust(mlp).attack(x, y, mr.CW(c=5.0, steps=100, binary_search_steps=2, unroll=1), key=mr.key(4))
    both = found & np.array(plain.success)
    assert np.array(res.norms)[both].mean() > np.array(plain.norms)[both].mean()  # confidence costs L2


@pytest.mark.parametrize(
    "attack",
    [mr.APGD(eps=0.1, steps=6, restarts=2, loss="dlr", early_stop=False, unroll=1),
     mr.APGDT(eps=0.1, steps=5, n_target_classes=2, unroll=1), mr.CW(c=1.0, steps=12, binary_search_steps=2, unroll=1)],
    ids=["apgd", "apgdt", "cw"],
)
def test_batch_equals_per_sample_with_same_key(bitwise_device, mlp, batch, attack):
    x, y = batch
    robust = _robust(mlp)
    whole = robust.attack(x[:6], y[:6], attack, key=mr.key(5))
    for i in range(6):
        one = robust.attack(x[i : i + 1], y[i : i + 1], attack, key=mr.key(5))
        np.testing.assert_allclose(np.array(one.x_adv), np.array(whole.x_adv[i : i + 1]), atol=1e-6)
        assert bool(one.success[0]) == bool(whole.success[i])
    halves = robust.attack(x[:6], y[:6], attack, key=mr.key(5), batch_size=3)
    np.testing.assert_allclose(np.array(halves.x_adv), np.array(whole.x_adv), atol=1e-6)


def test_apgd_early_stop_gives_same_result(mlp, digits):
    x, y = digits[2][:100], digits[3][:100]
    robust = _robust(mlp)
    slow = robust.attack(x, y, mr.APGD(eps=0.08, steps=16, early_stop=False, unroll=1), key=mr.key(6))
    fast = robust.attack(x, y, mr.APGD(eps=0.08, steps=16, early_stop=True, unroll=1), key=mr.key(6))
    assert np.array_equal(np.array(slow.success), np.array(fast.success))
    np.testing.assert_allclose(np.array(fast.x_adv), np.array(slow.x_adv), atol=1e-5)
    assert 0 < fast.success_rate < 1


@pytest.mark.parametrize("cls", [mr.APGD, mr.APGDT, mr.CW])
def test_targeted(mlp, digits, cls):
    x, y = digits[2][:64], digits[3][:64]
    target = (y + 1) % 10
    if cls is mr.CW:
        attack = mr.CW(c=10.0, steps=100, binary_search_steps=1, unroll=1)
    else:
        attack = cls(eps=0.2, steps=10, unroll=1)
    res = _robust(mlp).attack(x, y, attack, y_target=target, key=mr.key(7))
    hit = np.array(res.predictions == target)
    assert np.array_equal(np.array(res.success), hit)
    assert hit.mean() > 0.3  # chance is 0.1
    assert res.y_target is not None


# --- C++ core vs the plain-MLX reference ---------------------------------------------------------

APGD_CASES = [
    dict(norm="linf", loss="ce", steps=12, restarts=1),
    dict(norm="l2", loss="ce", steps=10, restarts=2),
    dict(norm="linf", loss="dlr", steps=10, restarts=1),
    dict(norm="l2", loss="dlr", steps=7, restarts=1, n_target_classes=3),
    dict(norm="linf", loss="ce", steps=7, restarts=2, n_target_classes=2),
    dict(norm="linf", loss="dlr", steps=8, restarts=1, targeted=True),
    dict(norm="linf", loss="ce", steps=9, restarts=1, rho=0.4, targeted=True),
]


# Every case one step per call; two also unrolled, with early stop (which must not change the result).
APGD_RUNS = [(c, 1, False) for c in APGD_CASES] + [(APGD_CASES[0], 2, True), (APGD_CASES[3], 2, True)]


def _case_id(v: object) -> str:
    return "-".join(f"{x}" for x in v.values()) if isinstance(v, dict) else f"{v}"


@pytest.mark.parametrize("case,unroll,early_stop", APGD_RUNS, ids=_case_id)
def test_apgd_core_matches_reference(mlp, batch, case, unroll, early_stop):
    x, y = batch
    case = dict(case)
    targeted = case.pop("targeted", False)
    eps = mx.full((x.shape[0],), 0.06 if case["norm"] == "linf" else 0.5)
    target = (y + 3) % 10 if targeted else None
    mlp.eval()
    ref_x, ref_s, ref_l, ref_z = apgd_reference(mlp, x, y, eps, 0.0, 1.0, y_target=target, key=mr.key(10), **case)
    x_adv, success, loss, logits, norms = _robust(mlp)._fn.run_apgd(
        x, y, eps, (0.0, 1.0), num_classes=10, norm=case["norm"], loss=case["loss"], steps=case["steps"],
        restarts=case["restarts"], n_target_classes=case.get("n_target_classes", 0), target=target,
        rho=case.get("rho", 0.75), early_stop=early_stop, unroll=unroll, key=mr.key(10),
    )
    # Same ops in the same order: identical up to float rounding of fused kernels.
    np.testing.assert_allclose(np.array(x_adv), np.array(ref_x), atol=1e-5)
    assert np.array_equal(np.array(success), np.array(ref_s))
    np.testing.assert_allclose(np.array(loss), np.array(ref_l), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(logits), np.array(ref_z), rtol=1e-4, atol=1e-4)
    assert 0 < float(mx.mean(success.astype(mx.float32))) < 1  # a case that tests something


CW_CASES = [
    dict(c=1.0, kappa=0.0, steps=25, binary_search_steps=3, early_abort=True),
    dict(c=0.5, kappa=1.0, steps=20, binary_search_steps=2, early_abort=False),
    dict(c=3.0, kappa=0.0, steps=80, binary_search_steps=1, early_abort=True, targeted=True),
    dict(c=0.01, kappa=0.0, steps=3, binary_search_steps=10, early_abort=True),  # x10 search and last-round repeat
]


@pytest.mark.parametrize("case,unroll", [(c, 1) for c in CW_CASES] + [(CW_CASES[0], 2)], ids=_case_id)
def test_cw_core_matches_reference(mlp, batch, case, unroll):
    x, y = batch
    targeted = case.get("targeted", False)
    labels = (y + 1) % 10 if targeted else y
    mlp.eval()
    ref_x, ref_s, _, ref_z = cw_reference(mlp, x, labels, 0.0, 1.0, **case)
    x_adv, success, loss, logits, norms = _robust(mlp)._fn.run_cw(
        x, labels, (0.0, 1.0), num_classes=10, targeted=targeted, c=case["c"], kappa=case["kappa"],
        steps=case["steps"], lr=0.01, binary_search_steps=case["binary_search_steps"],
        early_abort=case["early_abort"], unroll=unroll, key=mr.key(11),
    )
    np.testing.assert_allclose(np.array(x_adv), np.array(ref_x), atol=1e-5)
    assert np.array_equal(np.array(success), np.array(ref_s))
    np.testing.assert_allclose(np.array(logits), np.array(ref_z), rtol=1e-4, atol=1e-4)
    assert float(mx.mean(success.astype(mx.float32))) > float(np.mean(~_clean_correct(mlp, x, y)))


def test_losses_match_their_formulas(mlp, batch):
    x, y = batch
    z = mlp(x)
    zn, yn = np.array(z, dtype=np.float64), np.array(y)
    rows = np.arange(len(yn))
    s = np.sort(zn, axis=1)
    other = np.where(np.arange(10)[None] == yn[:, None], -np.inf, zn).max(1)
    dlr = -(zn[rows, yn] - other) / (s[:, -1] - s[:, -3] + 1e-12)
    t = (yn + 2) % 10
    dlr_t = -(zn[rows, yn] - zn[rows, t]) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + 1e-12)
    np.testing.assert_allclose(np.array(_core.dlr_loss(z, y)), dlr, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(_core.dlr_loss(z, y, mx.array(t))), dlr_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(dlr_loss(z, y)), dlr, rtol=1e-4, atol=1e-5)
    # DLR is invariant to shifting and scaling the logits (Croce & Hein 2020, §3.2)
    np.testing.assert_allclose(np.array(_core.dlr_loss(3.0 * z + 7.0, y)), dlr, rtol=1e-3, atol=1e-4)
    for kappa, targeted in [(0.0, False), (1.5, False), (0.5, True)]:
        gap = (other - zn[rows, yn]) if not targeted else None
        if targeted:
            other_t = np.where(np.arange(10)[None] == t[:, None], -np.inf, zn).max(1)
            gap = other_t - zn[rows, t]
            want = np.maximum(gap, -kappa)
            got = _core.cw_margin_loss(z, mx.array(t), kappa=kappa, targeted=True)
        else:
            want = np.maximum(-gap, -kappa)
            got = _core.cw_margin_loss(z, y, kappa=kappa)
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 5, 10, 37, 100, 1000])
def test_apgd_checkpoints_follow_the_paper(steps):
    got = _core.apgd_checkpoints(steps)
    assert got == apgd_checkpoints(steps)
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), w_j = p_j * steps
    p = [0.0, 0.22]
    while p[-1] <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    paper = [round(q * steps) for q in p[1:] if round(q * steps) <= steps]
    if steps == 100:
        assert got == paper == [22, 41, 57, 70, 80, 87, 93, 99]
    elif steps >= 37:  # integer rounding of the intervals drifts by at most a step per checkpoint
        assert len(got) == len(paper) and max(abs(a - b) for a, b in zip(got, paper, strict=True)) <= len(got)
    assert got == sorted(set(got)) and all(1 <= w <= steps for w in got)
    gaps = np.diff([0, *got])
    assert np.all(np.diff(gaps) <= 0) and gaps[-1] >= max(int(0.06 * steps), 1)


# --- strength -------------------------------------------------------------------------------------


def test_apgd_at_least_as_strong_as_pgd_on_the_cnn(cnn, digits):
    x, y = digits[2][:200], digits[3][:200]
    robust = _robust(cnn)
    for eps in (0.1, 0.15):
        pgd = robust.attack(x, y, mr.PGD(eps=eps, steps=20), key=mr.key(12))
        apgd = robust.attack(x, y, mr.APGD(eps=eps, steps=20), key=mr.key(12))
        assert apgd.robust_accuracy <= pgd.robust_accuracy
        assert apgd.robust_accuracy < float(np.mean(_clean_correct(cnn, x, y)))


def test_cw_finds_smaller_l2_perturbations_than_pgd(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    robust = _robust(mlp)
    cw = robust.attack(x, y, mr.CW(c=1.0, steps=100, binary_search_steps=5, unroll=1), key=mr.key(13))
    pgd = robust.attack(x, y, mr.PGD(eps=1.5, steps=20, norm="l2", unroll=1), key=mr.key(13))
    clean = _clean_correct(mlp, x, y)
    both = np.array(cw.success) & np.array(pgd.success) & clean
    assert both.sum() >= 0.7 * clean.sum()
    assert np.array(cw.norms)[both].mean() < 0.8 * np.array(pgd.norms)[both].mean()


# --- the compiled loops' contracts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [mr.APGD(eps=0.1, steps=10, unroll=2, early_stop=False),
     mr.APGDT(eps=0.4, steps=6, norm="l2", n_target_classes=2, unroll=2, early_stop=False),
     mr.CW(steps=10, binary_search_steps=2, unroll=2)],
    ids=["apgd", "apgdt", "cw"],
)
def test_trace_count_constant_and_model_not_called_per_step(mlp, batch, attack):
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
    robust.attack(x, y, attack, key=mr.key(14))
    traces, calls = robust._fn.suite_trace_count, model.calls
    assert traces >= 1 and calls >= 1
    for seed in range(3):
        robust.attack(x, y, attack, key=mr.key(15 + seed))
    assert robust._fn.suite_trace_count == traces  # no Python ran per step after the first trace
    assert model.calls == calls
    robust._fn.clear_suite()  # dropping the compiled functions makes the next call trace again
    robust.attack(x, y, attack, key=mr.key(14))
    assert robust._fn.suite_trace_count > traces


def test_unroll_is_chosen_per_shape(mlp, batch):
    x, y = batch
    robust = _robust(mlp)
    assert robust._fn.apgd_engine.chosen_unroll(list(x.shape)) == 0
    robust.attack(x, y, mr.APGD(eps=0.1, steps=5), key=mr.key(16))
    assert robust._fn.apgd_engine.chosen_unroll(list(x.shape)) in (1, 4, 10)
    assert robust._fn.cw_engine.chosen_unroll(list(x.shape)) == 0
    robust.attack(x, y, mr.CW(steps=5, binary_search_steps=1), key=mr.key(16))
    assert robust._fn.cw_engine.chosen_unroll(list(x.shape)) in (1, 4, 10)


@pytest.mark.parametrize("kind", ["apgd", "cw"])
def test_optimizer_updates_are_seen_by_next_attack(digits, kind):
    x, y = digits[0][:64], digits[1][:64]
    mx.random.seed(3)
    model = mr.models.MLP(64, hidden=(16,), num_classes=10)
    robust = _robust(model)
    if kind == "apgd":
        attack = mr.APGD(eps=0.1, steps=6, early_stop=False, unroll=1)
    else:
        attack = mr.CW(c=1.0, steps=8, binary_search_steps=2, unroll=1)
    opt = optim.SGD(learning_rate=0.5)
    loss_and_grad = nn.value_and_grad(model, lambda m, a, b: nn.losses.cross_entropy(m(a), b, reduction="mean"))
    robust.attack(x, y, attack, key=mr.key(17))  # traced with the initial weights
    for _ in range(3):
        _, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters())
    res = robust.attack(x, y, attack, key=mr.key(17))
    model.eval()
    if kind == "apgd":
        ref_x = apgd_reference(model, x, y, mx.full((64,), 0.1), 0.0, 1.0, steps=6, key=mr.key(17))[0]
    else:
        ref_x = cw_reference(model, x, y, 0.0, 1.0, c=1.0, steps=8, binary_search_steps=2)[0]
    np.testing.assert_allclose(np.array(res.x_adv), np.array(ref_x), atol=1e-5)
    np.testing.assert_allclose(np.array(res.logits), np.array(model(res.x_adv)), atol=1e-4)


@pytest.mark.parametrize("attack", [mr.APGD(eps=0.1, steps=4, unroll=1, early_stop=False),
                                    mr.CW(steps=6, binary_search_steps=1, unroll=1)], ids=["apgd", "cw"])
def test_random_defence_uses_eot_and_noise_is_an_input(mlp, batch, attack):
    x, y = batch
    robust = _robust(mlp, noise=mr.GaussianNoise(0.2, eot_samples=3))
    a = robust.attack(x, y, attack, key=mr.key(18))
    assert a.eot_samples == 3 and "EOT-3" in a.attack
    traces = robust._fn.suite_trace_count
    b = robust.attack(x, y, attack, key=mr.key(18))
    c = robust.attack(x, y, attack, key=mr.key(19))
    assert robust._fn.suite_trace_count == traces
    assert mx.array_equal(a.x_adv, b.x_adv)  # same key: same draws
    assert not mx.array_equal(a.logits, c.logits)  # new key: new draws, without retracing


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
    for attack in (mr.APGD(eps=0.1, steps=3), mr.CW(steps=3, binary_search_steps=1)):
        model.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            robust.attack(x, y, attack, key=mr.key(20))
        assert_unchanged(model, snap)
        model.fail = False
        assert robust.attack(x, y, attack, key=mr.key(20)).x_adv.shape == x.shape
        assert_unchanged(model, snap)
    mlp.eval()


# --- bad settings ---------------------------------------------------------------------------------

BAD_CONFIGS = [
    (mr.APGD, dict(eps=-0.1), r"eps must be"),
    (mr.APGD, dict(steps=0), r"steps must be an integer >= 1"),
    (mr.APGD, dict(steps=2.5), r"steps must be an integer >= 1"),
    (mr.APGD, dict(restarts=0), r"restarts must be an integer >= 1"),
    (mr.APGD, dict(norm="l1"), r"norm must be one of"),
    (mr.APGD, dict(loss="kl"), r"loss must be one of \('ce', 'dlr'\)"),
    (mr.APGD, dict(rho=0.0), r"rho must be a number in \(0, 1\]"),
    (mr.APGD, dict(rho=1.5), r"rho must be"),
    (mr.APGD, dict(unroll=0), r"unroll must be None or an integer >= 1"),
    (mr.APGD, dict(eot_samples=0), r"eot_samples must be"),
    (mr.APGDT, dict(n_target_classes=0), r"n_target_classes must be an integer >= 1"),
    (mr.APGDT, dict(loss="margin"), r"loss must be one of"),
    (mr.CW, dict(c=0.0), r"c must be a finite number > 0"),
    (mr.CW, dict(c=-1.0), r"c must be a finite number > 0"),
    (mr.CW, dict(c=[1.0, 2.0]), r"c must be a finite number > 0"),
    (mr.CW, dict(c=float("nan")), r"c must be a finite number > 0"),
    (mr.CW, dict(kappa=-1.0), r"kappa must be a finite number >= 0"),
    (mr.CW, dict(lr=0.0), r"lr must be a finite number > 0"),
    (mr.CW, dict(steps=0), r"steps must be an integer >= 1"),
    (mr.CW, dict(binary_search_steps=0), r"binary_search_steps must be an integer >= 1"),
    (mr.CW, dict(early_abort="yes"), r"early_abort must be True or False"),
    (mr.CW, dict(unroll=-2), r"unroll must be None"),
]


@pytest.mark.parametrize(
    "cls,kwargs,match", BAD_CONFIGS, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD_CONFIGS]
)
def test_bad_config_raises_value_error_naming_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_apgdt_too_many_target_classes(mlp, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"n_target_classes must be <= num_classes - 1 = 9"):
        _robust(mlp).attack(x, y, mr.APGDT(eps=0.1, steps=2, n_target_classes=10))


def _linear(params, x):
    return x.reshape(x.shape[0], -1) @ params[0] + params[1]


def _core_apgd(engine, n=4, classes=10, **over):
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(size=(64, classes)).astype(np.float32))
    args = dict(forward=_linear, params=[w, mx.zeros((classes,))],
                x0=mx.full((n, 8, 8, 1), 0.5), y=mx.zeros((n,), mx.int32), eps=mx.full((n,), 0.1), lo=mx.array(0.0),
                hi=mx.array(1.0), num_classes=classes, steps=3, key=mx.random.key(0))
    args.update(over)
    positional = [args.pop(k) for k in ("forward", "params", "x0", "y", "eps", "lo", "hi")]
    return engine.run(*positional, **args)


def _core_cw(engine, n=4, **over):
    args = dict(forward=_linear, params=[mx.ones((64, 10)) * 0.01, mx.zeros((10,))], x0=mx.full((n, 8, 8, 1), 0.5),
                y=mx.zeros((n,), mx.int32), lo=mx.array(0.0), hi=mx.array(1.0), num_classes=10, steps=3,
                binary_search_steps=1, key=mx.random.key(0))
    args.update(over)
    positional = [args.pop(k) for k in ("forward", "params", "x0", "y", "lo", "hi")]
    return engine.run(*positional, **args)


CORE_BAD = [
    ("apgd", dict(steps=0), r"\[apgd\] steps must be >= 1, got 0"),
    ("apgd", dict(restarts=0), r"\[apgd\] restarts must be >= 1"),
    ("apgd", dict(norm="l7"), r"\[apgd\] norm must be 'linf' or 'l2', got 'l7'"),
    ("apgd", dict(loss="margin"), r"\[apgd\] loss must be 'ce' or 'dlr', got 'margin'"),
    ("apgd", dict(rho=0.0), r"\[apgd\] rho must be in \(0, 1\]"),
    ("apgd", dict(n_target_classes=10), r"\[apgd\] n_target_classes must be in \[0, num_classes - 1\]"),
    ("apgd", dict(n_target_classes=2, target=mx.zeros((4,), mx.int32)), r"\[apgd\] give either targets"),
    ("apgd", dict(target=mx.zeros((3,), mx.int32)), r"\[apgd\] a targeted attack needs targets of shape \(N,\)"),
    ("apgd", dict(eps=mx.full((3,), 0.1)), r"\[apgd\] eps must have shape \(N,\)"),
    ("apgd", dict(y=mx.zeros((3,), mx.int32)), r"\[apgd\] y must have shape \(N,\) matching x"),
    ("apgd", dict(x0=mx.zeros((4, 8, 8, 1), mx.int32)), r"\[apgd\] x must be floating point"),
    ("apgd", dict(eot_samples=0), r"\[apgd\] eot_samples must be >= 1"),
    ("apgd", dict(unroll=-1), r"\[apgd\] unroll must be >= 0"),
    ("apgd", dict(forward=3), r"\[apgd\] forward must be callable"),
    ("apgd", dict(forward=lambda p, x: _linear(p, x)[:, :5]), r"\[apgd\] model output must have shape \(4, 10\)"),
    ("apgd", dict(forward=lambda p, x: "nope"), r"\[apgd\] the model must return an mx.array"),
    ("apgd-3-classes", dict(loss="dlr", n_target_classes=2), r"\[apgd\] loss 'dlr' needs num_classes >= 4"),
    ("apgd-2-classes", dict(loss="dlr"), r"\[apgd\] loss 'dlr' needs num_classes >= 3"),
    ("cw", dict(steps=0), r"\[cw\] steps must be >= 1, got 0"),
    ("cw", dict(binary_search_steps=0), r"\[cw\] binary_search_steps must be >= 1"),
    ("cw", dict(c=0.0), r"\[cw\] c must be a finite number > 0"),
    ("cw", dict(kappa=-1.0), r"\[cw\] kappa must be a finite number >= 0"),
    ("cw", dict(lr=float("inf")), r"\[cw\] lr must be a finite number > 0"),
    ("cw", dict(hi=mx.array(0.0)), r"\[cw\] the input bounds must satisfy lo < hi"),
    ("cw", dict(num_classes=1), r"\[cw\] num_classes must be >= 2"),
    ("cw", dict(forward=lambda p, x: _linear(p, x).astype(mx.int32)), r"\[cw\] model output must be floating point"),
]


@pytest.mark.parametrize("kind,over,match", CORE_BAD, ids=[f"{k}-{next(iter(o))}" for k, o, _ in CORE_BAD])
def test_core_bad_arguments_raise_and_engine_recovers(kind, over, match):
    if kind.startswith("apgd"):
        engine, call = _core.ApgdEngine(), _core_apgd
        classes = {"apgd-3-classes": 3, "apgd-2-classes": 2}.get(kind, 10)
        kw = dict(classes=classes) if classes != 10 else {}
    else:
        engine, call, kw = _core.CwEngine(), _core_cw, {}
    with pytest.raises(ValueError, match=match):
        call(engine, **kw, **over)
    x_adv, _, _, logits, norms = call(engine)  # the engine still works
    assert x_adv.shape == (4, 8, 8, 1) and logits.shape == (4, 10) and norms.shape == (4,)
    assert engine.trace_count > 0


def test_core_losses_reject_too_few_classes():
    z, y = mx.zeros((2, 3)), mx.zeros((2,), mx.int32)
    with pytest.raises(ValueError, match=r"\[apgd\] the DLR loss needs .* C >= 3"):
        _core.dlr_loss(z[:, :2], y)
    with pytest.raises(ValueError, match=r"\[apgd\] the targeted DLR loss needs .* C >= 4"):
        _core.dlr_loss(z, y, y)
