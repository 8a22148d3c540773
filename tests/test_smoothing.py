"""Randomized smoothing: C++ sampling vs the plain-MLX reference, PREDICT/CERTIFY semantics and
closed forms, key/shard independence, memory, bad input, the CLI and the training option."""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx_robust as mr
import numpy as np
import pytest
from conftest import assert_unchanged, snapshot
from mlx_robust import smoothing as S
from reference import (
    certify_reference,
    smoothed_predict_reference,
    vote_counts_reference,
)
from mlx_robust.training import fit

scipy_stats = pytest.importorskip("scipy.stats")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _robust(model, sigma=0.25, n=1000, n0=100, batch_size=400, **kw):
    return mr.RobustModel(model, bounds=kw.pop("bounds", (0.0, 1.0)), input_shape=kw.pop("input_shape", (8, 8, 1)),
                          num_classes=kw.pop("num_classes", 10),
                          smoothing=mr.Smoothing(sigma, n=n, n0=n0, batch_size=batch_size, **kw))


class Constant(nn.Module):
    """Ignores its input: always the same logits (class 3 wins)."""

    def __init__(self):
        super().__init__()
        self.bias = mx.array([0.0, 0.1, 0.2, 2.0, 0.0])

    def __call__(self, x):
        return mx.zeros((x.shape[0], 5)) + self.bias + 0.0 * mx.sum(x.reshape(x.shape[0], -1), axis=1, keepdims=True)


class Linear2(nn.Module):
    """Binary linear classifier: logits (0, w.x + b), class 1 iff w.x + b > 0."""

    def __init__(self, w, b):
        super().__init__()
        self.w = mx.array(w, dtype=mx.float32)
        self.b = mx.array(b, dtype=mx.float32)

    def __call__(self, x):
        z = x.reshape(x.shape[0], -1) @ self.w + self.b
        return mx.stack([mx.zeros_like(z), z], axis=1)


# --- the sampling core against the reference ---------------------------------------------------


@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize("n,batch_size", [(1000, 1000), (250, 100), (7, 64)])
def test_vote_counts_equal_reference(request, batch, which, n, batch_size):
    model = request.getfixturevalue(which)
    x = batch[0][:4]
    keys = S.sample_keys(mr.key(11), 4)
    robust = _robust(model)
    got = robust._smooth_fn.vote_counts(x, keys, n=n, sigma=0.3, batch_size=batch_size, num_classes=10)
    model.eval()
    want = vote_counts_reference(model, x, keys, n=n, sigma=0.3, batch_size=batch_size, num_classes=10)
    assert got.dtype == mx.int32 and got.shape == (4, 10)
    assert mx.array_equal(got, want)
    assert np.all(np.array(got).sum(axis=1) == n)


@pytest.mark.parametrize("overlap", [False, True])
def test_grouped_chunks_equal_reference(cnn, batch, overlap):
    # 11 chunks of 100: without the overlapping noise stream (the GPU default) they run as one
    # compiled group of 8 and 3 single chunks; with it, one by one. Same counts either way.
    x = batch[0][:3]
    keys = S.sample_keys(mr.key(4), 3)
    got = _robust(cnn)._smooth_fn.vote_counts(x, keys, n=1100, sigma=0.3, batch_size=100, num_classes=10,
                                              overlap=overlap)
    cnn.eval()
    want = vote_counts_reference(cnn, x, keys, n=1100, sigma=0.3, batch_size=100, num_classes=10)
    assert mx.array_equal(got, want)


def test_overlapped_noise_stream_gives_the_same_counts(mlp, batch):
    x = batch[0][:3]
    keys = S.sample_keys(mr.key(5), 3)
    fn = _robust(mlp)._smooth_fn
    a = fn.vote_counts(x, keys, n=300, sigma=0.25, batch_size=128, num_classes=10, overlap=True)
    b = fn.vote_counts(x, keys, n=300, sigma=0.25, batch_size=128, num_classes=10, overlap=False)
    assert mx.array_equal(a, b)


def test_whole_pipeline_matches_reference_with_scipy_statistics(mlp, batch):
    x = batch[0][:6]
    robust = _robust(mlp, sigma=0.25, n=500, n0=50, batch_size=200)
    keys = S.sample_keys(mr.key(2), 6)
    cls, radius = robust.certify(x, key=keys)
    pairs = [mx.random.split(keys[i]) for i in range(6)]  # input i: (selection, estimation) keys
    sel, est = mx.stack([p[0] for p in pairs]), mx.stack([p[1] for p in pairs])
    mlp.eval()
    c0 = vote_counts_reference(mlp, x, sel, n=50, sigma=0.25, batch_size=200, num_classes=10)
    c1 = vote_counts_reference(mlp, x, est, n=500, sigma=0.25, batch_size=200, num_classes=10)
    lower = lambda k, n, a: 0.0 if k == 0 else scipy_stats.beta.ppf(a, k, n - k + 1)  # noqa: E731
    want_cls, want_r = certify_reference(c0, c1, 0.25, 1e-3, lower, scipy_stats.norm.ppf)
    assert np.array(cls).tolist() == want_cls
    np.testing.assert_allclose(np.array(radius), want_r, rtol=1e-6, atol=1e-7)

    pred = robust.predict(x, key=keys)
    counts = vote_counts_reference(mlp, x, keys, n=500, sigma=0.25, batch_size=200, num_classes=10)
    pvalue = lambda k, n: scipy_stats.binomtest(k, n, 0.5).pvalue  # noqa: E731
    assert np.array(pred).tolist() == smoothed_predict_reference(counts, 1e-3, pvalue)


# --- keys: batch = each input alone, shards, repeatability ----------------------------------------


def test_batch_equals_each_input_alone(mlp, batch):
    x = batch[0][:5]
    robust = _robust(mlp, n=300, n0=40, batch_size=128)
    keys = S.sample_keys(mr.key(7), 5)
    cls, radius = robust.certify(x, key=keys)
    pred = robust.predict(x, key=keys)
    for i in range(5):
        c1, r1 = robust.certify(x[i : i + 1], key=keys[i : i + 1])
        assert c1.item() == cls[i].item() and r1.item() == radius[i].item()
        assert robust.predict(x[i : i + 1], key=keys[i : i + 1]).item() == pred[i].item()


def test_progress_grouping_does_not_change_results(mlp, batch):
    x = batch[0][:10]
    robust = _robust(mlp, n=200, n0=20, batch_size=16)  # small groups under a progress bar
    a = robust.certify(x, key=mr.key(1), progress=False)
    b = robust.certify(x, key=mr.key(1), progress=True)
    assert mx.array_equal(a.prediction, b.prediction) and mx.array_equal(a.radius, b.radius)


def test_same_key_same_result_other_key_other_counts(mlp, batch):
    x = batch[0][:4]
    fn = _robust(mlp)._smooth_fn
    k1, k2 = S.sample_keys(mr.key(1), 4), S.sample_keys(mr.key(2), 4)
    a = fn.vote_counts(x, k1, n=400, sigma=0.5, batch_size=400, num_classes=10)
    assert mx.array_equal(a, fn.vote_counts(x, k1, n=400, sigma=0.5, batch_size=400, num_classes=10))
    assert not mx.array_equal(a, fn.vote_counts(x, k2, n=400, sigma=0.5, batch_size=400, num_classes=10))


def test_seed_makes_calls_without_key_repeatable(mlp, batch):
    robust = _robust(mlp, n=200, n0=20)
    mx.random.seed(4)
    a = robust.certify(batch[0][:3])
    mx.random.seed(4)
    b = robust.certify(batch[0][:3])
    assert mx.array_equal(a.radius, b.radius)


def test_traced_once_per_shape(mlp, batch):
    robust = _robust(mlp, n=300, n0=50, batch_size=128)
    robust.certify(batch[0][:3], key=mr.key(0))
    traces = robust._smooth_fn.trace_count
    assert traces >= 1
    robust.certify(batch[0][3:6], key=mr.key(1))
    assert robust._smooth_fn.trace_count == traces


# --- PREDICT / CERTIFY semantics --------------------------------------------------------------


@pytest.mark.parametrize("sigma,n,alpha", [(0.25, 1000, 1e-3), (0.5, 100, 0.01), (1.0, 5000, 1e-5)])
def test_constant_model_gets_its_class_and_the_maximal_radius(sigma, n, alpha):
    robust = mr.RobustModel(Constant(), bounds=(0.0, 1.0), num_classes=5,
                            smoothing=mr.Smoothing(sigma, n=n, n0=10, alpha=alpha, batch_size=256))
    x = mx.random.uniform(shape=(3, 4, 4, 1), key=mr.key(0))
    cls, radius = robust.certify(x, key=mr.key(1))
    want = sigma * scipy_stats.norm.ppf(scipy_stats.beta.ppf(alpha, n, 1))
    assert np.array(cls).tolist() == [3, 3, 3]
    np.testing.assert_allclose(np.array(radius), want, rtol=1e-6)
    assert want == pytest.approx(sigma * scipy_stats.norm.ppf(alpha ** (1 / n)), rel=1e-12)
    assert np.array(robust.predict(x, key=mr.key(2))).tolist() == [3, 3, 3]


@pytest.mark.parametrize("margin", [0.3, 0.6, -0.45])
def test_linear_classifier_radius_matches_closed_form(margin):
    # g(x) = 1 iff w.x + b > 0; pA = Phi(|w.x + b| / (sigma ||w||)), so the exact radius is
    # sigma * Phi^-1(pA) = |w.x + b| / ||w||; CERTIFY's is that minus the Clopper-Pearson slack.
    w = np.array([0.6, -0.8, 0.0, 1.0], np.float32)
    norm_w = float(np.linalg.norm(w))
    b = 0.1
    x0 = np.array([0.2, 0.1, -0.3, 0.0], np.float32)
    x = x0 + (margin * norm_w - (w @ x0 + b)) * w / norm_w**2  # w.x + b = margin * ||w||
    sigma, n, alpha = 0.5, 20_000, 1e-3
    model = Linear2(w, b)
    robust = mr.RobustModel(model, bounds=(-5.0, 5.0), num_classes=2,
                            smoothing=mr.Smoothing(sigma, n=n, n0=100, alpha=alpha, batch_size=5000))
    cls, radius = robust.certify(mx.array(x[None]), key=mr.key(3))
    exact = abs(margin)
    p_a = scipy_stats.norm.cdf(exact / sigma)
    k_low = int(n * p_a - 5 * math.sqrt(n * p_a * (1 - p_a)))  # a 5-sd unlucky count
    slack_low = sigma * scipy_stats.norm.ppf(scipy_stats.beta.ppf(alpha, k_low, n - k_low + 1))
    assert cls.item() == (1 if margin > 0 else 0)
    assert slack_low <= radius.item() <= exact
    assert exact - radius.item() < 0.1  # the bound is tight at n = 20,000


def test_close_calls_abstain():
    model = Linear2([1.0, 0.0], 0.0)
    robust = mr.RobustModel(model, bounds=(-5.0, 5.0), num_classes=2,
                            smoothing=mr.Smoothing(0.5, n=1000, n0=100, batch_size=500))
    x = mx.array([[0.0, 0.3], [0.001, -1.0], [2.0, 0.0]])  # on the boundary, nearly on it, far
    pred = robust.predict(x, key=mr.key(0))
    cls, radius = robust.certify(x, key=mr.key(0))
    assert np.array(pred).tolist()[:2] == [-1, -1] and pred[2].item() == 1
    assert np.array(cls).tolist()[:2] == [-1, -1] and np.array(radius).tolist()[:2] == [0.0, 0.0]
    assert cls[2].item() == 1 and radius[2].item() > 1.0


def test_smoothed_prediction_agrees_with_base_model_at_small_sigma(mlp, digits):
    x = digits[2][:40]
    robust = _robust(mlp, sigma=0.05, n=200)
    base = np.array(mr.RobustModel(mlp, bounds=(0.0, 1.0), num_classes=10).predict(x))
    pred = np.array(robust.predict(x, key=mr.key(0)))
    assert np.mean(pred == base) > 0.9
    assert set(np.unique(pred)) <= set(range(-1, 10))


def test_predict_without_smoothing_is_unchanged(mlp, batch):
    x = batch[0]
    robust = mr.RobustModel(mlp, bounds=(0.0, 1.0), num_classes=10)
    mlp.eval()
    assert mx.array_equal(robust.predict(x), mx.argmax(mlp(x), axis=-1).astype(mx.int32))


def test_attack_with_smoothing_configured_attacks_the_base_model(mlp, batch):
    x, _ = batch
    robust = _robust(mlp)
    res = robust.attack(x[:8], None, mr.PGD(eps=0.05, steps=2), key=mr.key(0))
    assert np.array(res.y).min() >= 0  # base predictions as labels, never an abstention


def test_sigma_override(mlp, batch):
    x = batch[0][:4]
    a = _robust(mlp, sigma=0.25, n=300, n0=30).certify(x, sigma=0.5, key=mr.key(0))
    b = _robust(mlp, sigma=0.5, n=300, n0=30).certify(x, key=mr.key(0))
    plain = mr.RobustModel(mlp, bounds=(0.0, 1.0), num_classes=10)
    c = plain.certify(x, sigma=0.5, n=300, n0=30, batch_size=400, key=mr.key(0))
    assert mx.array_equal(a.radius, b.radius) and mx.array_equal(a.radius, c.radius)


# --- memory --------------------------------------------------------------------------------------


def test_memory_is_bounded_by_batch_size_not_n(mlp):
    x = mx.random.uniform(shape=(2, 8, 8, 1), key=mr.key(0))
    keys = S.sample_keys(mr.key(1), 2)
    fn = _robust(mlp)._smooth_fn
    peaks = {}
    for n in (400, 400, 1600, 6400, 25600):
        mx.eval(x, keys)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        fn.vote_counts(x, keys, n=n, sigma=0.25, batch_size=200, num_classes=10)
        peaks[n] = mx.get_peak_memory() - base
    # Flat in n once chunks run in full groups: on a GPU (no overlapping noise stream) up to 8
    # chunks of batch_size rows run per compiled call, so n = 1600 (8 chunks) already holds a
    # whole group (measured on an H100: 0.36 MB at n = 400, at most 2.1 MB for n = 1600 ... 25,600)
    # while n = 400 (2 chunks) runs them singly; on the CPU chunks run singly, flat within a few percent. A GPU's
    # allocator frees asynchronously, so its peak also wanders (H200: 0.25-0.9 MB, no trend) ...
    assert max(peaks[n] for n in (6400, 25600)) <= 2 * peaks[1600] + 262144
    assert peaks[1600] <= 8 * 4 * peaks[400] + 262144
    # ... and far below the noisy copies of even one input at n = 25,600 (25600 x 64 floats).
    assert peaks[25600] < 0.5 * 25600 * 64 * 4
    assert mr.smoothing._functional.chunk_rows(6400, 200) == [200] * 32
    assert mr.smoothing._functional.chunk_rows(450, 200) == [200, 200, 50]


# --- the model is left alone ----------------------------------------------------------------------


def test_model_unchanged_and_mode_restored(cnn, batch):
    x, y = batch[0][:4], batch[1][:4]
    cnn.train()
    try:
        snap = snapshot(cnn)
        robust = _robust(cnn, n=100, n0=20)
        robust.predict(x, key=mr.key(0))
        robust.certify(x, key=mr.key(0))
        mr.certified_accuracy(robust, x, y, key=mr.key(0))
        assert_unchanged(cnn, snap)
        assert cnn.training
    finally:
        cnn.eval()


def test_model_unchanged_when_the_model_raises():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = mx.ones((4, 3))

        def __call__(self, x):
            raise RuntimeError("boom")

    model = Broken()
    snap = snapshot(model)
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), num_classes=3, smoothing=mr.Smoothing(0.2, n=100))
    with pytest.raises(RuntimeError, match="boom"):
        robust.certify(mx.zeros((2, 4)), key=mr.key(0))
    assert_unchanged(model, snap)


def test_wrong_model_output_shape_is_reported():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = mx.ones((4, 3))

        def __call__(self, x):
            return x @ self.w

    robust = mr.RobustModel(Wide(), bounds=(0.0, 1.0), num_classes=5, smoothing=mr.Smoothing(0.2, n=100))
    with pytest.raises(ValueError, match=r"model output must have shape \(100, 5\)"):
        robust.certify(mx.zeros((2, 4)), key=mr.key(0))


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigma=0.0), "sigma must be a finite number > 0"),
        (dict(sigma=-0.25), "sigma must be a finite number > 0"),
        (dict(sigma=float("nan")), "sigma must be a finite number > 0"),
        (dict(sigma="0.25"), "sigma must be a finite number > 0"),
        (dict(sigma=0.25, n=0), "n must be an integer >= 1"),
        (dict(sigma=0.25, n=10.5), "n must be an integer >= 1"),
        (dict(sigma=0.25, n0=0), "n0 must be an integer >= 1"),
        (dict(sigma=0.25, alpha=0.0), r"alpha must be a number in \(0, 1\)"),
        (dict(sigma=0.25, alpha=1.0), r"alpha must be a number in \(0, 1\)"),
        (dict(sigma=0.25, alpha=-1e-3), r"alpha must be a number in \(0, 1\)"),
        (dict(sigma=0.25, batch_size=0), "batch_size must be an integer >= 1"),
        (dict(sigma=0.25, n=2**31), r"n must be at most 2\*\*31 - 1"),
    ],
)
def test_bad_smoothing_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mr.Smoothing(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n0=0), "n0 must be"),
        (dict(n=-5), "n must be"),
        (dict(alpha=2.0), "alpha must be"),
        (dict(sigma=-1.0), "sigma must be"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(key=mx.zeros((3, 2), mx.uint32)), r"one key per input \(shape \(4, 2\)\)"),
        (dict(key=mx.zeros((2,), mx.int32)), "key must be a PRNG key"),
    ],
)
def test_bad_certify_arguments(mlp, batch, kwargs, match):
    robust = _robust(mlp, n=100, n0=10)
    with pytest.raises(ValueError, match=match):
        robust.certify(batch[0][:4], **kwargs)


def test_bad_inputs_to_certify_and_predict(mlp, batch):
    robust = _robust(mlp, n=100, n0=10)
    with pytest.raises(ValueError, match="outside the bounds"):
        robust.certify(batch[0][:2] + 2.0, key=mr.key(0))
    with pytest.raises(ValueError, match="NaN"):
        robust.predict(mx.full((1, 8, 8, 1), float("nan")), key=mr.key(0))
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        robust.predict(batch[0][:2], key=3)
    plain = mr.RobustModel(mlp, bounds=(0.0, 1.0), num_classes=10)
    with pytest.raises(ValueError, match="needs a noise level: pass sigma"):
        plain.certify(batch[0][:2])
    with pytest.raises(TypeError, match="smoothing must be an mr.Smoothing"):
        mr.RobustModel(mlp, smoothing=0.25)
    with pytest.raises(ValueError, match="not both"):
        mr.RobustModel(mlp, smoothing=mr.Smoothing(0.25), noise=mr.GaussianNoise(0.25))


def test_too_few_samples_warn():
    with pytest.warns(UserWarning, match="can never certify at alpha=0.001"):
        mr.Smoothing(0.25, n=9, alpha=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mr.Smoothing(0.25, n=10, alpha=1e-3)  # 0.001 ** (1 / 10) = 0.501 > 1/2: fine
    robust = mr.RobustModel(Constant(), bounds=(0.0, 1.0), num_classes=5, smoothing=mr.Smoothing(0.25, n=100))
    x = mx.zeros((1, 4))
    with pytest.warns(UserWarning, match="can never predict"):
        S.smoothed_predict(robust, x, n=10, key=mr.key(0))
    with pytest.warns(UserWarning, match="can never certify"):
        cls, radius = robust.certify(x, n=5, key=mr.key(0))
    assert cls.item() == -1 and radius.item() == 0.0


def test_bad_certified_accuracy_arguments(mlp, batch):
    x, y = batch[0][:4], batch[1][:4]
    robust = _robust(mlp, n=100, n0=10)
    with pytest.raises(ValueError, match="radii must be"):
        mr.certified_accuracy(robust, x, y, radii=[-0.1], key=mr.key(0))
    with pytest.raises(ValueError, match="y has 3 labels but x has 4"):
        mr.certified_accuracy(robust, x, y[:3], key=mr.key(0))


# --- certified accuracy report ----------------------------------------------------------------------


def test_certified_accuracy_report(mlp, digits, tmp_path):
    x, y = digits[2][:30], digits[3][:30]
    robust = _robust(mlp, sigma=0.25, n=300, n0=30)
    radii = [0.0, 0.1, 0.25, 0.5]
    rep = mr.certified_accuracy(robust, x, y, radii, key=mr.key(0))
    cls, radius = robust.certify(x, key=mr.key(0))
    assert mx.array_equal(rep.prediction, cls) and mx.array_equal(rep.radius, radius)
    p, r, yy = np.array(cls), np.array(radius), np.array(y)
    assert list(rep.accuracy) == [float(np.mean((p == yy) & (r >= rr))) for rr in radii]
    assert list(rep.accuracy) == sorted(rep.accuracy, reverse=True)
    assert rep.accuracy[0] > 0.5  # a trained model, mild noise
    assert rep.accuracy_at(0.1) == rep.accuracy[1]
    text = str(rep)
    assert "| sigma | r=0 | r=0.1 | r=0.25 | r=0.5 |" in text and "sigma=0.25" in text
    if _has_matplotlib():
        out = rep.plot(tmp_path / "cert.png")
        assert out.exists() and out.stat().st_size > 1000
    else:  # matplotlib is the optional extra `plot`
        with pytest.raises(ImportError, match="mlx-robust\\[plot\\]"):
            rep.plot(tmp_path / "cert.png")


def test_plot_without_matplotlib_says_how_to_install(mlp, batch, tmp_path, monkeypatch):
    rep = mr.certified_accuracy(_robust(mlp, n=100, n0=10), batch[0][:3], batch[1][:3], key=mr.key(0))
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'mlx-robust\[plot\]'"):
        rep.plot(tmp_path / "x.png")


def test_certified_demo_line(mlp, digits):
    from mlx_robust.cli import certified_demo_line

    line = certified_demo_line(mlp, digits[2], digits[3], n=200, n0=20, limit=20)
    assert line.startswith("randomized smoothing (sigma=0.25, n=200") and "at r=0.25" in line
    assert "first 20 test images" in line


# --- scale-out: two processes give the one-process answer -----------------------------------------


_DIST_SCRIPT = """
import sys, numpy as np, mlx.core as mx, mlx_robust as mr
x, y = mr.datasets.load_digits("test")
x, y = x[:13], y[:13]
model = mr.models.MLP(64, hidden=(32,), num_classes=10)
model.load_weights(sys.argv[1])
robust = mr.RobustModel(model, bounds=(0, 1), input_shape=(8, 8, 1), num_classes=10,
                        smoothing=mr.Smoothing(0.25, n=300, n0=30, batch_size=128))
rep = mr.certified_accuracy(robust, x, y, key=mr.key(3), progress=False)
group = mx.distributed.init()
np.savez(sys.argv[2] + f".{group.rank()}.npz", pred=np.array(rep.prediction),
         radius=np.array(rep.radius), size=group.size())
"""


def _free_port_pair() -> int:
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    pytest.skip("no free port pair for the ring backend")


def test_two_processes_match_one(mlp, tmp_path):
    launch = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    if not os.path.exists(launch):
        pytest.skip("mlx.launch is not installed next to this Python")
    weights = str(tmp_path / "w.safetensors")
    mlp.save_weights(weights)
    script = tmp_path / "dist_certify.py"
    script.write_text(_DIST_SCRIPT)
    out = str(tmp_path / "res")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, str(script), weights, out + "_one"], check=True, env=env, timeout=120)
    proc = subprocess.run(
        [launch, "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair()), "--",
         sys.executable, str(script), weights, out + "_two"],
        env=env, timeout=180, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = np.load(out + "_one.0.npz")
    two = [np.load(out + f"_two.{r}.npz") for r in (0, 1)]
    assert int(one["size"]) == 1 and all(int(t["size"]) == 2 for t in two)
    for t in two:  # every rank holds every result
        assert np.array_equal(t["pred"], one["pred"]) and np.array_equal(t["radius"], one["radius"])


# --- CLI and training --------------------------------------------------------------------------------


def test_cli_certify_on_user_files(mlp, digits, tmp_path, monkeypatch, capsys):
    from mlx_robust.cli import main

    (tmp_path / "user_model.py").write_text(
        "import mlx_robust as mr\n\ndef make():\n    return mr.models.MLP(64, hidden=(32,), num_classes=10)\n"
    )
    mlp.save_weights(str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "data.npz", x=np.array(digits[2][:12]), y=np.array(digits[3][:12]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # --model imports like `python -m`: the folder must be on the path
    rc = main(["certify", "--model", "user_model:make", "--weights", "w.safetensors", "--data", "data.npz",
               "--sigma", "0.12", "0.25", "--n", "200", "--n0", "20", "--radii", "0", "0.25", "--out", "outdir"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "| sigma | r=0 | r=0.25 | abstain | seconds |" in text
    assert "| 0.12 |" in text and "| 0.25 |" in text
    assert (tmp_path / "outdir" / "certified_accuracy.png").exists() == _has_matplotlib()
    assert (tmp_path / "outdir" / "certified_accuracy.md").exists()
    rc = main(["certify", "--model", "user_model", "--data", "data.npz", "--sigma", "0.25"])
    assert rc == 2 and "--model must look like" in capsys.readouterr().err
    rc = main(["certify", "--model", "user_model:make", "--data", "data.npz", "--sigma", "-1"])
    assert rc == 2 and "sigma must be" in capsys.readouterr().err


def test_fit_noise_std_trains_with_fresh_repeatable_noise(digits):
    x, y = digits[0][:256], digits[1][:256]

    def train(noise_std, seed=0):
        mx.random.seed(0)
        model = mr.models.MLP(64, hidden=(16,), num_classes=10)
        fit(model, x, y, epochs=2, batch_size=64, seed=seed, noise_std=noise_std)
        return np.array(model.head.weight)

    clean, noisy, again, other = train(0.0), train(0.3), train(0.3), train(0.3, seed=1)
    assert np.array_equal(noisy, again)
    assert not np.allclose(clean, noisy)
    assert not np.allclose(noisy, other)
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        train(-0.1)
