"""Adversarial training helpers (mr.adversarial_value_and_grad), mr.train, checkpoints, the demo."""

from __future__ import annotations

import types
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import assert_unchanged, snapshot
from mlx.utils import tree_flatten

import mlx_robust as mr
from mlx_robust.adversarial import METHODS, kl_divergence
from mlx_robust.cli import adversarial_training_demo
from mlx_robust.trainer import clean_accuracy, robust_accuracy

ATTACK = mr.PGD(eps=0.1, steps=3)
PARAMS = {"trades": {"beta": 6.0}, "mart": {"beta": 6.0}, "mix": {"clean_weight": 0.5},
          "noise": {"sigma": 0.1}, "free": {"replays": 2}}


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def fresh_mlp(seed: int = 0) -> nn.Module:
    mx.random.seed(seed)
    model = mr.models.MLP(64, hidden=(32,), num_classes=10)
    mx.eval(model.parameters())
    return model


def make(model, method, attack=ATTACK, **kw):
    params = {**PARAMS.get(method, {}), **kw}
    return mr.adversarial_value_and_grad(model, loss_fn, attack=None if method == "noise" else attack,
                                         method=method, **params)


def flat(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def clone(model: nn.Module) -> nn.Module:
    other = mr.models.MLP(64, hidden=(32,), num_classes=10)
    other.update(model.parameters())
    return other


# ---- the drop-in contract ------------------------------------------------------------------------


def test_same_call_and_result_as_nn_value_and_grad_at_eps_zero(batch):
    """PGD-AT with eps=0 is standard training: identical loss and gradient tree."""
    x, y = batch
    model = fresh_mlp()
    lag = mr.adversarial_value_and_grad(model, loss_fn, attack=mr.PGD(eps=0.0, steps=2))
    loss, grads = lag(model, x, y)
    ref_loss, ref_grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    assert loss.shape == () and np.isclose(loss.item(), ref_loss.item(), rtol=1e-6)
    ref = dict(tree_flatten(ref_grads))
    got = dict(tree_flatten(grads))
    assert got.keys() == ref.keys() == dict(tree_flatten(model.trainable_parameters())).keys()
    for k in ref:
        np.testing.assert_allclose(np.array(got[k]), np.array(ref[k]), rtol=1e-5, atol=1e-7)


def test_extra_arguments_reach_loss_fn(batch):
    x, y = batch
    model = fresh_mlp()

    def weighted(model, x, y, scale, *, shift=0.0):
        return scale * nn.losses.cross_entropy(model(x), y, reduction="mean") + shift

    lag = mr.adversarial_value_and_grad(model, weighted, attack=mr.PGD(eps=0.0, steps=1))
    one, _ = lag(model, x, y, 1.0)
    two, _ = lag(model, x, y, 2.0, shift=1.0)
    assert np.isclose(two.item(), 2 * one.item() + 1.0, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_decreases_its_own_loss(digits, method):
    x, y = digits[0][:128], digits[1][:128]
    model = fresh_mlp(1)
    lag = make(model, method)
    optimizer = optim.Adam(learning_rate=1e-2)
    mx.random.seed(5)
    losses = []
    for _ in range(20):
        loss, grads = lag(model, x, y)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:2]), (method, losses)


@pytest.mark.parametrize("method", ["pgd-at", "trades", "mart", "fgsm-rs", "mix"])
def test_perturbation_stays_in_ball_and_bounds(batch, method):
    x, y = batch
    model = fresh_mlp()
    eps = 0.1
    x_adv = make(model, method, attack=mr.PGD(eps=eps, steps=3)).perturb(model, x, y, key=mr.key(0))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(mx.max(mx.abs(x_adv - x))) <= eps + 1e-6
    assert float(mx.min(x_adv)) >= 0.0 and float(mx.max(x_adv)) <= 1.0
    assert float(mx.max(mx.abs(x_adv - x))) > 0.5 * eps  # it moved


def test_attack_leaves_the_model_unchanged(mlp, batch):
    x, y = batch
    mlp.train()
    try:
        snap = snapshot(mlp)
        for method in ("pgd-at", "trades", "fgsm-rs"):
            make(mlp, method).perturb(mlp, x, y, key=mr.key(0))
            assert_unchanged(mlp, snap)
    finally:
        mlp.eval()


def test_the_attack_sees_updated_parameters(batch):
    """After optimizer steps the attack runs on the new weights (not compile-time constants)."""
    x, y = batch
    model = fresh_mlp(2)
    lag = make(model, "pgd-at")
    before = lag.perturb(model, x, y, key=mr.key(3))
    optimizer = optim.SGD(learning_rate=0.5)
    for _ in range(3):
        _, grads = lag(model, x, y)
        optimizer.update(model, grads)
        mx.eval(model.parameters())
    after = lag.perturb(model, x, y, key=mr.key(3))
    # A fresh engine on a copy of the updated model is the oracle.
    copy = clone(model)
    ref = mr.PGD(eps=0.1, steps=3, early_stop=False).run(
        mr.RobustModel(copy, bounds=(0.0, 1.0), num_classes=10), x, y, None, mr.key(3), track_best=False)
    assert mx.array_equal(after, ref.x_adv)
    assert not mx.array_equal(after, before)


class _ModeRecorder(nn.Module):
    """An MLP with dropout that records the mode of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mr.models.MLP(64, hidden=(32,), num_classes=10)
        self.drop = nn.Dropout(0.5)
        # Held by a shared object, not a list attribute: the library runs a shallow copy of the
        # model, which copies lists (a list attribute would record on the copy).
        self.log = types.SimpleNamespace(modes=[])

    @property
    def modes(self) -> list[bool]:
        return self.log.modes

    def __call__(self, x):
        self.log.modes.append(self.training)
        return self.net(self.drop(x))


def test_attack_runs_in_eval_mode_and_update_in_the_users_mode(batch):
    x, y = batch
    mx.random.seed(0)
    model = _ModeRecorder()
    model.train()
    lag = make(model, "pgd-at")
    a = lag.perturb(model, x, y, key=mr.key(1))
    assert model.modes and not any(model.modes)  # traced (and run) in eval mode
    b = lag.perturb(model, x, y, key=mr.key(1))
    assert mx.array_equal(a, b)  # eval mode: dropout off, the attack is deterministic
    assert model.training and model.drop.training
    model.modes.clear()
    lag(model, x, y)
    assert model.modes[-1] is True  # the loss ran in train mode (the attack's trace is cached)
    assert model.training


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.bn = nn.BatchNorm(32)
        self.head = nn.Linear(32, 10)

    def __call__(self, x):
        return self.head(nn.relu(self.bn(self.fc(x.reshape(x.shape[0], -1)))))


def test_batchnorm_statistics_move_only_in_the_update(digits):
    x, y = digits[0][:128], digits[1][:128]
    mx.random.seed(0)
    model = _BNNet()
    model.train()
    lag = make(model, "pgd-at")
    mean0 = np.array(model.bn.running_mean)
    lag.perturb(model, x, y, key=mr.key(0))  # eval mode: running statistics untouched
    assert np.array_equal(np.array(model.bn.running_mean), mean0)
    mr.train(model, x, y, epochs=1, batch_size=64, attack=ATTACK, progress=False)
    assert not np.array_equal(np.array(model.bn.running_mean), mean0)
    assert model.training  # the mode the user had is restored


def test_users_model_object_is_the_one_trained(digits):
    x, y = digits[0][:128], digits[1][:128]
    model = fresh_mlp(3)
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    before = flat(model)
    lag = robust.adversarial_value_and_grad(loss_fn, attack=ATTACK)
    assert lag.model is model and lag.robust is robust
    opt = optim.SGD(learning_rate=0.1)
    _, grads = lag(model, x, y)
    opt.update(model, grads)
    assert any(not np.array_equal(before[k], v) for k, v in flat(model).items())
    before = flat(model)
    hist = mr.train(robust, x, y, epochs=1, batch_size=64, attack=ATTACK, progress=False)
    assert len(hist) == 1 and robust.model is model
    assert any(not np.array_equal(before[k], v) for k, v in flat(model).items())


def test_robust_model_bounds_and_validation_apply_to_training_batches(batch):
    x, y = batch
    model = fresh_mlp()
    robust = mr.RobustModel(model, bounds=(0.0, 0.5), input_shape=(8, 8, 1), num_classes=10, on_invalid="raise")
    lag = robust.adversarial_value_and_grad(loss_fn, attack=ATTACK)
    with pytest.raises(ValueError, match="outside the bounds"):
        lag(model, x, y)
    clipping = mr.RobustModel(model, bounds=(0.0, 0.5), num_classes=10, on_invalid="clip")
    x_adv = clipping.adversarial_value_and_grad(loss_fn, attack=ATTACK).perturb(model, x, y, key=mr.key(0))
    assert float(mx.max(x_adv)) <= 0.5
    with pytest.raises(ValueError, match="shape"):
        lag(model, x.reshape(x.shape[0], 64), y)


# ---- the objectives match the papers -------------------------------------------------------------


def test_trades_attacks_the_kl_and_adds_beta_kl(batch):
    x, y = batch
    model = fresh_mlp()
    lag = make(model, "trades", beta=3.0)
    assert lag.attack.loss == "kl" and not lag.attack.early_stop
    x_adv = lag.perturb(model, x, y, key=mr.key(0))
    expected = loss_fn(model, x, y) + 3.0 * mx.mean(kl_divergence(model(x), model(x_adv)))
    assert np.isclose(lag.loss(model, x, x_adv, y).item(), expected.item(), rtol=1e-6)
    # the attack increased the KL from the clean prediction
    assert float(mx.mean(kl_divergence(model(x), model(x_adv)))) > 1e-3


def test_kl_divergence_is_zero_on_itself_and_positive_elsewhere():
    z = mx.random.normal((5, 10), key=mr.key(0))
    assert float(mx.max(mx.abs(kl_divergence(z, z)))) < 1e-6
    assert float(mx.min(kl_divergence(z, z + mx.random.normal((5, 10), key=mr.key(1))))) > 0


def _mart_reference(clean, adv, y, beta):
    """The official MART loss (Wang et al. 2020, github.com/YisenWang/MART), in numpy."""
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    n = len(y)
    adv_p, nat_p = softmax(adv), softmax(clean)
    top2 = np.argsort(adv_p, axis=1)[:, -2:]
    new_y = np.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    ce = -np.log(adv_p[np.arange(n), y]).mean()
    margin = -np.log(1.0001 - adv_p[np.arange(n), new_y] + 1e-12).mean()
    kl = (nat_p * (np.log(nat_p) - np.log(adv_p + 1e-12))).sum(1)
    robust = (kl * (1.0000001 - nat_p[np.arange(n), y])).sum() / n
    return ce + margin + beta * robust


def test_mart_loss_matches_the_official_formula(batch):
    x, y = batch
    model = fresh_mlp()
    lag = make(model, "mart", beta=5.0)
    x_adv = lag.perturb(model, x, y, key=mr.key(0))
    ref = _mart_reference(np.array(model(x), np.float64), np.array(model(x_adv), np.float64), np.array(y), 5.0)
    assert np.isclose(lag.loss(model, x, x_adv, y).item(), ref, rtol=1e-4)


def test_mix_weights_clean_and_adversarial(batch):
    x, y = batch
    model = fresh_mlp()
    lag = make(model, "mix", clean_weight=0.25)
    x_adv = lag.perturb(model, x, y, key=mr.key(0))
    expected = 0.25 * loss_fn(model, x, y) + 0.75 * loss_fn(model, x_adv, y)
    assert np.isclose(lag.loss(model, x, x_adv, y).item(), expected.item(), rtol=1e-6)


def test_fgsm_rs_is_one_step_of_1_25_eps_from_a_random_start(batch):
    x, y = batch
    model = fresh_mlp()
    lag = make(model, "fgsm-rs", attack=mr.PGD(eps=0.08, steps=10))
    a = lag.attack
    assert (a.steps, a.random_start, a.step_size) == (1, True, pytest.approx(0.1))
    one = lag.perturb(model, x, y, key=mr.key(0))
    two = lag.perturb(model, x, y, key=mr.key(1))
    assert not mx.array_equal(one, two)  # the random start


def test_free_replays_advance_a_persistent_perturbation(batch):
    x, y = batch
    model = fresh_mlp()
    lag = make(model, "free", attack=mr.PGD(eps=0.05, steps=1))
    assert lag.replays == 2 and lag.state == {}
    lag(model, x, y)
    d1 = lag.state["delta"]
    lag(model, x, y)
    d2 = lag.state["delta"]
    assert float(mx.max(mx.abs(d2))) <= 0.05 + 1e-7 and not mx.array_equal(d1, d2)
    assert mx.allclose(lag.perturb(model, x, y), mx.clip(x + d2, 0.0, 1.0))
    lag.reset()
    assert lag.state == {}


def test_noise_adds_gaussian_noise_of_sigma(batch):
    x, y = batch
    model = fresh_mlp()
    x_noisy = make(model, "noise", sigma=0.2).perturb(model, x, y, key=mr.key(0))
    assert abs(float(mx.std(x_noisy - x)) - 0.2) < 0.01
    # sigma defaults to a noise-defended RobustModel's own std
    robust = mr.RobustModel(model, noise=mr.GaussianNoise(0.3), num_classes=10)
    assert robust.adversarial_value_and_grad(loss_fn, method="noise").sigma == 0.3


# ---- mx.compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pgd-at", "trades"])
def test_calling_inside_mx_compile_raises_a_clear_error(batch, method):
    x, y = batch
    model = fresh_mlp()
    lag = make(model, method)

    @mx.compile
    def step(xb, yb):
        return lag(model, xb, yb)[0]

    with pytest.raises(RuntimeError, match=r"perturb\(model, x, y\)"):
        step(x, y)

    @mx.compile
    def perturb(xb, yb):
        return lag.perturb(model, xb, yb)

    with pytest.raises(RuntimeError, match="outside"):
        perturb(x, y)


@pytest.mark.parametrize("method", ["pgd-at", "trades", "mart", "mix"])
def test_compiled_step_with_perturb_outside_matches_eager(bitwise_device, digits, method):
    x, y = digits[0][:64], digits[1][:64]
    results = []
    for compiled in (False, True):
        model = fresh_mlp(4)
        lag = make(model, method)
        optimizer = optim.Adam(learning_rate=1e-2)
        optimizer.init(model.trainable_parameters())
        state = [model.state, optimizer.state, mx.random.state]

        def step(xb, xa, yb):
            loss, grads = lag.value_and_grad(model, xb, xa, yb)
            optimizer.update(model, grads)
            return loss

        if compiled:
            step = partial(mx.compile, inputs=state, outputs=state)(step)
        for i in range(3):
            x_adv = lag.perturb(model, x, y, key=mr.key(i))
            step(x, x_adv, y)
            mx.eval(state)
        results.append(flat(model))
    for k in results[0]:
        np.testing.assert_allclose(results[1][k], results[0][k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("method", ["noise", "free"])
def test_noise_and_free_run_entirely_inside_mx_compile(digits, method):
    x, y = digits[0][:64], digits[1][:64]
    model = fresh_mlp(5)
    lag = make(model, method)
    optimizer = optim.Adam(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state, lag.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(xb, yb):
        loss, grads = lag(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    mx.random.seed(0)
    losses = []
    for _ in range(12):
        losses.append(step(x, y).item())
        mx.eval(state)
    assert losses[-1] < losses[0]
    if method == "free":
        assert float(mx.max(mx.abs(lag.state["delta"]))) > 0
    else:
        # the noise comes from mx.random.state in the compiled state: a reseed repeats it
        model2 = fresh_mlp(5)
        lag2 = make(model2, method)
        eager = lambda: lag2(model2, x, y)[0].item()  # noqa: E731
        mx.random.seed(0)
        first = eager()
        mx.random.seed(0)
        assert eager() == first


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "pgd"}, ValueError, "method must be one of"),
        ({"method": "trades", "beta": -1.0}, ValueError, "beta must be"),
        ({"method": "mart", "beta": float("nan")}, ValueError, "beta must be"),
        ({"method": "pgd-at", "beta": 1.0}, ValueError, "beta applies to"),
        ({"method": "mix", "clean_weight": 1.5}, ValueError, "clean_weight must be"),
        ({"method": "free", "replays": 0}, ValueError, "replays must be"),
        ({"method": "noise", "attack": None}, ValueError, "needs sigma"),
        ({"method": "noise", "sigma": -0.1, "attack": None}, ValueError, "sigma must be"),
        ({"method": "pgd-at", "attack": None}, ValueError, "needs attack"),
        ({"attack": "pgd"}, TypeError, "attack must be"),
        ({"attack": mr.PGD(eps=0.1, restarts=2)}, ValueError, "restarts"),
        ({"attack": mr.PGD(eps=[0.1, 0.2])}, ValueError, "one number"),
        ({"attack": mr.PGD(eps=0.1, loss="kl")}, ValueError, "method='trades'"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, error, match):
    model = fresh_mlp()
    kwargs = {"attack": ATTACK, **kwargs}
    with pytest.raises(error, match=match):
        mr.adversarial_value_and_grad(model, loss_fn, **kwargs)


def test_bad_model_loss_eps_and_batches_raise_clear_errors(batch):
    x, y = batch
    model = fresh_mlp()
    with pytest.raises(ValueError, match="eps must be"):
        mr.adversarial_value_and_grad(model, loss_fn, attack=mr.PGD(eps=-0.1))
    with pytest.raises(TypeError, match="model must be"):
        mr.adversarial_value_and_grad("net", loss_fn, attack=ATTACK)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        mr.adversarial_value_and_grad(model, None, attack=ATTACK)
    lag = mr.adversarial_value_and_grad(model, loss_fn, attack=ATTACK)
    with pytest.raises(ValueError, match="y has 63 labels but x has 64"):
        lag(model, x, y[:63])
    with pytest.raises(ValueError, match=r"y must have shape \(64,\)"):
        lag.value_and_grad(model, x, x, y[:63])
    with pytest.raises(ValueError, match="x_adv must have the shape"):
        lag.loss(model, x, x[:10], y)
    with pytest.raises(TypeError, match="integer class labels"):
        lag(model, x, y.astype(mx.float32))
    with pytest.raises(ValueError, match="not the model"):
        lag(fresh_mlp(1), x, y)
    with pytest.raises(ValueError, match="outside"):
        lag(model, x + 2.0, y)
    with pytest.raises(TypeError, match="key"):
        lag.perturb(model, x, y, key=3)


# ---- mr.train ------------------------------------------------------------------------------------


def test_train_evaluates_every_epoch_with_a_schedule_and_progress(digits, capsys):
    x, y, xt, yt = digits
    model = fresh_mlp(6)
    schedule = optim.cosine_decay(1e-2, 2 * (256 // 64))
    hist = mr.train(model, x[:256], y[:256], epochs=2, batch_size=64, attack=ATTACK, learning_rate=schedule,
                    x_test=xt[:64], y_test=yt[:64], progress=True)
    assert [e.epoch for e in hist] == [1, 2]
    assert hist.eval_attack == "PGD-20 linf"
    assert all(0 <= e.robust_accuracy <= e.clean_accuracy <= 1 for e in hist)
    assert hist[1].learning_rate < hist[0].learning_rate < 1e-2
    out = capsys.readouterr()
    assert "epoch 2/2" in out.out + out.err and "PGD-20" in out.out + out.err


def test_train_checkpoint_resume_reproduces_the_uninterrupted_run(digits, tmp_path):
    x, y = digits[0][:192], digits[1][:192]
    kw = dict(batch_size=64, attack=ATTACK, progress=False, seed=4)
    straight = fresh_mlp(7)
    mr.train(straight, x, y, epochs=2, **kw)

    ckpt = tmp_path / "run.safetensors"
    resumed = fresh_mlp(7)
    first = mr.train(resumed, x, y, epochs=1, checkpoint=ckpt, **kw)
    assert ckpt.exists() and len(first) == 1
    again = fresh_mlp(99)  # different start: everything must come from the checkpoint
    hist = mr.train(again, x, y, epochs=2, checkpoint=ckpt, **kw)
    assert [e.epoch for e in hist] == [1, 2] and hist[0] == first[0]
    a, b = flat(straight), flat(again)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # a finished run resumes to nothing; a different method refuses the file
    assert len(mr.train(fresh_mlp(7), x, y, epochs=2, checkpoint=ckpt, **kw)) == 2
    with pytest.raises(ValueError, match="method 'pgd-at'"):
        mr.train(fresh_mlp(7), x, y, epochs=3, checkpoint=ckpt, method="trades", **kw)
    with pytest.raises(ValueError, match="do not match"):
        mr.train(mr.models.MLP(64, hidden=(16,)), x, y, epochs=3, checkpoint=ckpt, **kw)


@pytest.mark.parametrize("method", ["standard", "noise", "free", "fgsm-rs"])
def test_train_runs_every_kind_of_method(digits, method):
    x, y = digits[0][:128], digits[1][:128]
    model = fresh_mlp(8)
    extra = {"sigma": 0.1} if method == "noise" else {}
    attack = None if method in ("standard", "noise") else ATTACK
    hist = mr.train(model, x, y, epochs=2, batch_size=64, method=method, attack=attack,
                    learning_rate=1e-2, progress=False, **extra)
    assert hist[1].loss < hist[0].loss


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "fast"}, ValueError, "method must be one of"),
        ({"epochs": -1}, ValueError, "epochs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 1000}, ValueError, "larger than the training set"),
        ({"checkpoint": "run.npz"}, ValueError, ".safetensors"),
        ({"optimizer": optim.SGD(learning_rate=0.1), "learning_rate": 0.1}, ValueError, "learning_rate"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"optimizer": "adam"}, TypeError, "optimizer"),
        ({"x_test": "only x"}, ValueError, "both x_test and y_test"),
        ({"method": "standard", "beta": 1.0}, ValueError, "beta"),
        ({"eval_attack": 0.1}, TypeError, "eval_attack"),
    ],
)
def test_train_bad_settings(digits, kwargs, error, match):
    x, y = digits[0][:128], digits[1][:128]
    kwargs = {"attack": ATTACK, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        mr.train(fresh_mlp(), x, y, **kwargs)


def test_train_rejects_mismatched_data(digits):
    x, y = digits[0][:128], digits[1][:100]
    with pytest.raises(ValueError, match="y_train has 100 labels"):
        mr.train(fresh_mlp(), x, y, attack=ATTACK, progress=False)


# ---- end to end ----------------------------------------------------------------------------------


def test_pgd_at_raises_robust_accuracy_of_the_digits_cnn(digits):
    """PGD-AT vs standard training of the demo CNN at the demo's eps (fixed seed, short run)."""
    x, y, xt, yt = digits
    eps, accs = 0.1, {}
    for method in ("standard", "pgd-at"):
        mx.random.seed(0)
        model = mr.models.SmallCNN(image_size=8, channels=(16, 32))
        mr.train(model, x, y, epochs=6, batch_size=64, method=method,
                 attack=None if method == "standard" else mr.PGD(eps=eps, steps=5),
                 learning_rate=optim.cosine_decay(5e-3, 6 * 22), progress=False, seed=0)
        robust = mr.RobustModel(model, bounds=(0.0, 1.0), num_classes=10)
        accs[method] = (clean_accuracy(robust, xt, yt), robust_accuracy(robust, xt, yt, mr.PGD(eps=eps, steps=20)))
    (std_clean, std_rob), (at_clean, at_rob) = accs["standard"], accs["pgd-at"]
    assert at_rob >= std_rob + 0.12, accs
    assert at_clean >= std_clean - 0.05, accs


def test_demo_returns_the_table(digits):
    x, y, xt, yt = digits
    text = adversarial_training_demo(x[:256], y[:256], xt[:64], yt[:64], eps=0.1, steps=2, epochs=1, seed=0,
                                     train_steps=1)
    lines = text.splitlines()
    assert any(line.startswith("| standard |") for line in lines)
    assert any(line.startswith("| PGD-AT |") for line in lines)
    assert "PGD-2 robust accuracy" in text


def test_robust_model_method_is_a_deprecated_alias(mlp):
    robust = mr.RobustModel(mlp, bounds=(0.0, 1.0), num_classes=10)
    with pytest.warns(DeprecationWarning, match=r"RobustModel\.adversarial_value_and_grad is deprecated"):
        lag = robust.adversarial_value_and_grad(loss_fn, method="noise", sigma=0.3)
    assert type(lag) is type(mr.adversarial_value_and_grad(robust, loss_fn, method="noise", sigma=0.3))
    assert lag.sigma == 0.3
