"""Issue 12 (trust), the model items: stale compiled graphs, the user's model never modified (not even
while a trace runs, with another thread serving it), robust(x) never updating BatchNorm statistics."""

from __future__ import annotations

import collections
import threading
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_robust as mr
from mlx_robust import _functional
from conftest import mlx_thread, digits_robust as _robust


class Net(nn.Module):
    """The trained MLP's layers plus what a compiled graph could freeze: a plain attribute, a
    private array (not a parameter in MLX) and a parameter-free layer."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.l1 = mlp.layers[0]
        self.head = mlp.head
        self.act = nn.ReLU()
        self.temperature = 1.0
        self._shift = mx.zeros((10,))

    def __call__(self, x: mx.array) -> mx.array:
        x = x.reshape(x.shape[0], -1)
        return self.head(self.act(self.l1(x))) * self.temperature + self._shift


def _set_temperature(net: Net) -> None:
    net.temperature = -1.0


def _set_private_array(net: Net) -> None:
    net._shift = mx.array(np.eye(10, dtype=np.float32)[3] * 100.0)  # same shape, new value


def _swap_layer(net: Net) -> None:
    net.act = nn.Sigmoid()


CHANGES = {"attribute": _set_temperature, "private_array": _set_private_array, "swapped_layer": _swap_layer}


SMOOTHING = mr.Smoothing(sigma=0.25, n=100, n0=10, alpha=0.01, batch_size=100)


def _results(robust: mr.RobustModel, smoothed: mr.RobustModel, x: mx.array, y: mx.array) -> dict:
    """Every entry point's result on (x, y), with fixed keys."""
    pgd = robust.attack(x, y, mr.PGD(eps=0.1, steps=5), key=mr.key(1))
    apgd = robust.attack(x, y, mr.APGD(eps=0.1, steps=5), key=mr.key(2))
    cert = smoothed.certify(x, key=mr.key(3))
    report = mr.evaluate(robust, x, y, attacks=[mr.PGD(eps=0.1, steps=5)], eps=[0.1], key=mr.key(4), checks=False, progress=False)
    return {
        "pgd.x_adv": np.array(pgd.x_adv),
        "pgd.success": np.array(pgd.success),
        "apgd.x_adv": np.array(apgd.x_adv),
        "predict": np.array(robust.predict(x)),
        "smoothed.predict": np.array(smoothed.predict(x, key=mr.key(5))),
        "certify.prediction": np.array(cert.prediction),
        "certify.radius": np.array(cert.radius),
        "evaluate.clean": report.clean_accuracy,
        "evaluate.robust": report.ensemble[0.1],
    }


def _assert_same(got: dict, want: dict) -> None:
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)


@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_model_is_retraced_by_every_entry_point(mlp, digits, change):
    x, y = digits[2][:24], digits[3][:24]
    net = Net(mlp)
    robust, smoothed = _robust(net), _robust(net, smoothing=SMOOTHING)
    before = _results(robust, smoothed, x, y)  # traces every engine on the unchanged model
    CHANGES[change](net)
    after = _results(robust, smoothed, x, y)
    fresh = _results(_robust(net), _robust(net, smoothing=SMOOTHING), x, y)
    _assert_same(after, fresh)
    # The change matters (else the test would prove nothing).
    assert any(not np.allclose(before[k], fresh[k]) for k in ("predict", "smoothed.predict", "pgd.x_adv"))


def test_unchanged_model_is_not_retraced(mlp, digits):
    x, y = digits[2][:16], digits[3][:16]
    net = Net(mlp)
    robust = _robust(net)
    attack = mr.PGD(eps=0.1, steps=5, early_stop=False, unroll=5)
    robust.attack(x, y, attack, key=mr.key(0))
    traces = robust.trace_count
    net._shift = mx.zeros((10,))  # a new array object of the same shape: an input, not a retrace
    net.train(not net.training)  # the modes of the user's model do not reach the traced copy
    net.temperature = 1.0
    robust.attack(x, y, attack, key=mr.key(0))
    assert robust.trace_count == traces


def test_clear_drops_every_compiled_graph(mlp, digits):
    x, y = digits[2][:16], digits[3][:16]

    class Configured(Net):
        # State the fingerprint cannot see: a mutable object compared by identity.
        def __init__(self, mlp):
            super().__init__(mlp)
            self.config = types.SimpleNamespace(scale=1.0)

        def __call__(self, x):
            return super().__call__(x) * self.config.scale

    net = Configured(mlp)
    robust, smoothed = _robust(net), _robust(net, smoothing=SMOOTHING)
    _results(robust, smoothed, x, y)
    traces, smooth_traces = robust.trace_count, smoothed._smooth_fn.trace_count
    net.config.scale = -1.0
    robust.clear()
    smoothed.clear()
    after = _results(robust, smoothed, x, y)
    assert robust.trace_count > traces and smoothed._smooth_fn.trace_count > smooth_traces
    _assert_same(after, _results(_robust(net), _robust(net, smoothing=SMOOTHING), x, y))


# --- the user's model is never modified ------------------------------------------------------------


def _snapshot(model: nn.Module) -> list:
    """Every module's items and __dict__ entries, with the objects themselves (compared by identity)."""
    return [(name, dict(m.items()), dict(m.__dict__)) for name, m in model.named_modules()]


def _assert_untouched(model: nn.Module, snapshot: list) -> None:
    now = _snapshot(model)
    assert [n for n, _, _ in now] == [n for n, _, _ in snapshot]
    for (name, items, attrs), (_, items0, attrs0) in zip(now, snapshot):
        assert items.keys() == items0.keys(), name
        assert attrs.keys() == attrs0.keys(), name
        for k in items0:
            assert items[k] is items0[k], f"{name}.{k}"
        for k in attrs0:
            # The sets of frozen keys are the module's own objects; compare them by value.
            assert attrs[k] is attrs0[k] or (isinstance(attrs0[k], set) and attrs[k] == attrs0[k]), f"{name}.{k}"


def test_forward_that_sets_an_attribute_leaves_the_model_untouched(mlp, digits):
    x, y = digits[2][:16], digits[3][:16]

    class Caching(Net):
        def __call__(self, x):
            out = super().__call__(x)
            self.cache = out  # an array attribute: a tracer while the attack traces
            self.calls = getattr(self, "calls", 0) + 1
            return out

    net = Caching(mlp)
    net.eval()
    snapshot = _snapshot(net)
    robust, smoothed = _robust(net), _robust(net, smoothing=SMOOTHING)
    robust(x)
    robust.predict(x)
    robust.attack(x, y, mr.PGD(eps=0.1, steps=3), key=mr.key(0))
    robust.attack(x, y, mr.APGD(eps=0.1, steps=3), key=mr.key(0))
    robust.attack(x, y, mr.Square(eps=0.1, n_queries=10), key=mr.key(0))
    smoothed.certify(x, key=mr.key(0))
    mr.evaluate(robust, x, y, attacks=[mr.FGSM(eps=0.1)], eps=[0.1], key=mr.key(0), progress=False)
    assert "cache" not in net and "calls" not in net.__dict__
    _assert_untouched(net, snapshot)
    assert not net.training


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm(32)
        self.head = nn.Linear(32, 10)

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(nn.relu(self.bn(self.l1(x.reshape(x.shape[0], -1)))))


def test_robust_call_in_train_mode_leaves_batchnorm_statistics(digits):
    x = digits[2][:32]
    mx.random.seed(7)
    model = BNNet()
    mx.eval(model.parameters())
    mean0, var0 = model.bn.running_mean, model.bn.running_var
    values0 = np.array(mean0), np.array(var0)
    assert model.training
    robust = _robust(model)
    out = robust(x)
    assert model.bn.running_mean is mean0 and model.bn.running_var is var0
    np.testing.assert_array_equal(np.array(model.bn.running_mean), values0[0])
    np.testing.assert_array_equal(np.array(model.bn.running_var), values0[1])
    assert model.training and model.bn.training
    # It ran in the model's mode (train: batch statistics), as documented.
    reference = BNNet()
    reference.update(model.parameters())
    np.testing.assert_allclose(np.array(out), np.array(reference(x)), atol=1e-5)
    model.eval()
    assert not np.allclose(np.array(robust(x)), np.array(out), atol=1e-3)


class ModeScale(nn.Module):
    """Deterministic, but different in train and eval mode (a flipped mode shows in the output)."""

    def __call__(self, x: mx.array) -> mx.array:
        return 2.0 * x if self.training else x


def test_serving_thread_while_attacking_the_same_model(mlp, digits):
    x = digits[2][:32]
    y = digits[3][:32]
    model = Net(mlp)
    model.act = nn.Sequential(nn.ReLU(), ModeScale())
    model.train()  # served in train mode; attacks run in eval mode
    modes = [m.training for _, m in model.named_modules()]
    serve_x = x[:8]
    expected = np.array(model(serve_x))
    stop = threading.Event()
    outcome = {"calls": 0, "failures": []}

    def serve():
        while not stop.is_set():
            try:
                out = np.array(model(serve_x))
                if not np.array_equal(out, expected):
                    outcome["failures"].append("different output")
            except Exception as exc:  # noqa: BLE001 - every failure counts
                outcome["failures"].append(repr(exc))
            outcome["calls"] += 1

    server = mlx_thread(serve)
    server.start()
    try:
        for i in range(3):
            # A new RobustModel traces again: every trace is a window for the serving thread.
            robust = _robust(model)
            robust.attack(x, y, mr.PGD(eps=0.1, steps=2), key=mr.key(i))
            robust.attack(x, y, mr.APGD(eps=0.1, steps=2), key=mr.key(i))
            _robust(model, smoothing=SMOOTHING).certify(x[:4], key=mr.key(i))
    finally:
        stop.set()
        server.join(timeout=60)
    assert not server.is_alive()
    assert outcome["calls"] > 0
    assert outcome["failures"] == [], f"{len(outcome['failures'])} of {outcome['calls']}: {outcome['failures'][:3]}"
    assert [m.training for _, m in model.named_modules()] == modes


def test_model_copy_shares_arrays_and_keeps_shared_modules_shared(mlp):
    net = Net(mlp)
    net.tied = [net.l1, {"again": net.l1}]
    net.extra = collections.OrderedDict(w=mx.ones((3,)))  # a dict subclass: still copied, still inputs
    copy = _functional.model_copy(net, training=False)
    assert type(copy.extra) is collections.OrderedDict and copy.extra is not net.extra
    assert type(copy) is Net and copy is not net and copy.l1 is not net.l1
    assert copy.l1.weight is net.l1.weight and copy._shift is net._shift
    assert copy.tied[0] is copy.l1 and copy.tied[1]["again"] is copy.l1
    assert not copy.training and not copy.l1.training and net.training
    arrays, _ = _functional.model_arrays(net)
    assert any(a is net._shift for a in arrays)  # private arrays are inputs too
    replaced = _functional.model_copy(net, [mx.zeros(a.shape, a.dtype) for a in arrays])
    assert float(mx.abs(replaced.l1.weight).sum()) == 0.0 and float(mx.abs(net.l1.weight).sum()) > 0
    assert float(replaced.extra["w"].sum()) == 0.0 and float(net.extra["w"].sum()) == 3.0
    with pytest.raises(ValueError, match="arrays must match"):
        _functional.model_copy(net, arrays[:-1])


def test_a_fresh_model_built_in_one_thread_is_attacked_in_another():
    # MLX evaluates a lazy array only in the thread whose stream built it: RobustModel materialises
    # the model's arrays when it wraps it, so a server thread can attack a freshly initialised model.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # lazy initial weights
    robust = mr.RobustModel(model, input_shape=(4,), num_classes=3)
    x = mx.array(np.random.default_rng(0).uniform(0, 1, (5, 4)).astype(np.float32))
    out: dict = {}

    def work():
        try:
            out["res"] = robust.attack(x, None, mr.PGD(eps=0.1, steps=2), key=mr.key(0))
            out["pred"] = robust.predict(x)
            mx.eval(out["res"].x_adv, out["pred"])
        except Exception as exc:  # noqa: BLE001 - reported below
            out["exc"] = exc

    t = mlx_thread(work)
    t.start()
    t.join(timeout=60)
    assert "exc" not in out, out.get("exc")
    want = robust.attack(x, None, mr.PGD(eps=0.1, steps=2), key=mr.key(0))
    assert np.array_equal(np.array(out["res"].x_adv), np.array(want.x_adv))
