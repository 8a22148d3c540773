"""Randomized smoothing under issue 12 ("Trust"): non-finite logits vote for no class, any thread
works, and memory does not grow with n."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_robust as mr
from mlx_robust import _functional
from reference import vote_counts_reference
from mlx_robust.smoothing import _split_each, sample_keys
from conftest import mlx_thread

SIGMA = 0.25


class AlwaysNaN(nn.Module):
    """Logits that are NaN for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin(x) * float("nan")


class SqrtModel(nn.Module):
    """Predicts class 2 on every valid input (pixels in [0, 1]); NaN once noise makes a pixel < 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = mx.full((4,), 1e-3)

    def __call__(self, x: mx.array) -> mx.array:
        s = mx.sum(mx.sqrt(x) * self.w, axis=-1, keepdims=True)
        return mx.array([0.0, 0.0, 1.0]) + s


class NaNWhenLow(nn.Module):
    """Class 1, but NaN logits when pixel 0 falls below 0.3: ~21% of draws at x = 0.5, sigma 0.25."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def __call__(self, x: mx.array) -> mx.array:
        logits = mx.array([0.0, 1.0, 0.0]) + 0.0 * self.lin(x)
        return mx.where(x[:, :1] < 0.3, float("nan"), logits)


@contextmanager
def _records() -> Iterator[list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _warned_nonfinite(caught: list) -> bool:
    return any(issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message) for w in caught)


def _robust(model: nn.Module, **smoothing) -> mr.RobustModel:
    return mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(4,), smoothing=mr.Smoothing(sigma=SIGMA, **smoothing))


def test_always_nan_model_abstains_and_reports_every_draw():
    robust = _robust(AlwaysNaN(), n0=50, n=400, batch_size=128)
    x = mx.full((3, 4), 0.5)
    with _records() as caught:
        cert = robust.certify(x, key=mr.key(0))
    cls, radius = cert  # still a pair
    assert np.array(cls).tolist() == [-1, -1, -1]
    assert np.array(radius).tolist() == [0.0, 0.0, 0.0]
    assert np.array(cert.nonfinite).tolist() == [450, 450, 450]
    assert _warned_nonfinite(caught)

    with _records() as caught:
        assert np.array(robust.predict(x, key=mr.key(0))).tolist() == [-1, -1, -1]
    assert _warned_nonfinite(caught)
    with _records() as caught:
        pred, bad = mr.smoothing.smoothed_predict(robust, x, key=mr.key(0), return_nonfinite=True)
    assert np.array(pred).tolist() == [-1, -1, -1]
    assert np.array(bad).tolist() == [400, 400, 400]
    assert _warned_nonfinite(caught)

    with _records() as caught:
        report = mr.certified_accuracy(robust, x, mx.array([0, 0, 0]), key=mr.key(0))
    assert report.accuracy == (0.0,) * len(report.radii)
    assert report.abstain_rate == 1.0
    assert np.array(report.nonfinite).tolist() == [450, 450, 450]
    assert "1350 noisy draws with non-finite logits" in str(report)
    assert _warned_nonfinite(caught)


def test_sqrt_model_is_never_certified_as_class_0():
    model = SqrtModel()
    robust = _robust(model, n0=100, n=1000, batch_size=500)
    # Valid inputs: at 0 most noisy draws have a negative pixel (NaN), at 0.9 almost none.
    x = mx.concatenate([mx.zeros((2, 4)), mx.full((2, 4), 0.9), mx.full((1, 4), 0.3)])
    assert np.array(mx.argmax(model(x), axis=-1)).tolist() == [2] * 5
    with _records() as caught:
        cert = robust.certify(x, key=mr.key(1))
    cls, radius = np.array(cert.prediction), np.array(cert.radius)
    assert not np.any(cls == 0)
    assert np.all((cls == 2) | (cls == -1))
    assert np.all(radius[cls == -1] == 0)
    assert cls[2] == 2 and cls[3] == 2 and radius[2] > 0  # not vacuous: confident inputs certify
    assert cls[0] == -1 and cls[1] == -1
    bad = np.array(cert.nonfinite)
    assert bad[0] > 900 and bad[1] > 900  # of 1100 draws
    assert _warned_nonfinite(caught)

    with _records() as caught:
        pred = np.array(robust.predict(x, key=mr.key(1)))
    assert not np.any(pred == 0)
    assert _warned_nonfinite(caught)
    with _records() as caught:
        report = mr.certified_accuracy(robust, x, mx.array([2] * 5), key=mr.key(1))
    assert not np.any(np.array(report.prediction) == 0)
    assert np.array_equal(np.array(report.prediction), cls)
    assert np.array_equal(np.array(report.nonfinite), bad)
    assert _warned_nonfinite(caught)


def test_nan_on_some_draws_counts_in_n_and_lowers_pA():
    model = NaNWhenLow()
    robust = _robust(model, n0=50, n=2000, batch_size=256)
    x = mx.full((2, 4), 0.5)
    with _records() as caught:
        cert = robust.certify(x, key=mr.key(2))
    assert _warned_nonfinite(caught)
    # Recount the estimation stage with the same keys.
    _, est = _split_each(sample_keys(mr.key(2), 2))
    counts, bad = robust._smooth_fn.vote_counts(x, est, n=2000, sigma=SIGMA, batch_size=256, num_classes=3,
                                                with_nonfinite=True)
    counts, bad = np.array(counts), np.array(bad)
    assert np.all(counts.sum(1) + bad == 2000)
    assert np.all(bad > 200) and np.all(counts[:, 0] == 0) and np.all(counts[:, 2] == 0)
    for i in range(2):
        assert int(cert.prediction[i]) == 1
        k = int(counts[i, 1])
        counted = SIGMA * mr.smoothing.normal_ppf(mr.smoothing.clopper_pearson_lower(k, 2000, 1e-3))
        ignored = SIGMA * mr.smoothing.normal_ppf(mr.smoothing.clopper_pearson_lower(k, 2000 - int(bad[i]), 1e-3))
        assert float(cert.radius[i]) == pytest.approx(counted, rel=1e-5)
        assert float(cert.radius[i]) < ignored
    assert np.all(np.array(cert.nonfinite) >= bad)


def test_counts_statistics_take_nonfinite_draws():
    counts = mx.array([[0, 0, 0], [0, 30, 0], [0, 30, 0]], mx.int32)
    bad = mx.array([10, 0, 30], mx.int32)
    assert np.array(_functional.smoothed_predict(counts, 1e-3, bad)).tolist() == [-1, 1, 1]
    pred, radius, p_lower = _functional.certify_from_counts(counts, counts, SIGMA, 1e-3, bad, bad)
    assert np.array(pred).tolist() == [-1, 1, -1]
    assert float(radius[0]) == 0 and float(p_lower[0]) == 0
    assert float(p_lower[1]) == pytest.approx(mr.smoothing.clopper_pearson_lower(30, 30, 1e-3), rel=1e-6)
    assert float(p_lower[2]) == pytest.approx(mr.smoothing.clopper_pearson_lower(30, 60, 1e-3), rel=1e-6)
    with pytest.raises(ValueError, match="nonfinite"):
        _functional.smoothed_predict(counts, 1e-3, mx.array([1, -1, 0], mx.int32))
    with pytest.raises(ValueError, match="at least one"):
        _functional.smoothed_predict(counts, 1e-3, mx.array([0, 0, 0], mx.int32))


def test_finite_model_reports_no_nonfinite_and_keys_match_split():
    mx.random.seed(3)
    model = mr.models.MLP(4, hidden=(8,), num_classes=3)
    robust = _robust(model)
    x = mx.random.uniform(shape=(2, 4))
    keys = sample_keys(mr.key(3), 2)
    # 143 chunks (odd, a remainder): each chunk's key is row c of mx.random.split(key_i, 143).
    counts, bad = robust._smooth_fn.vote_counts(x, keys, n=999, sigma=SIGMA, batch_size=7, num_classes=3,
                                                with_nonfinite=True)
    want = vote_counts_reference(model, x, keys, n=999, sigma=SIGMA, batch_size=7, num_classes=3)
    assert mx.array_equal(counts, want)
    assert np.array(bad).tolist() == [0, 0]
    cert = robust.certify(x, n0=20, n=100, key=mr.key(3))
    assert np.array(cert.nonfinite).tolist() == [0, 0]


def _thread_results(robust: mr.RobustModel, x: mx.array, workers: int) -> list:
    out: list = [None] * workers

    def work(i: int) -> None:
        try:
            out[i] = robust.certify(x, key=mr.key(4))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            out[i] = exc

    threads = [mlx_thread(work, i) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "certify did not finish in a thread"
    return out


def test_certify_in_other_threads_matches_main_thread():
    mx.random.seed(4)
    robust = _robust(mr.models.MLP(4, hidden=(8,), num_classes=3), n0=30, n=300, batch_size=64)
    x = mx.random.uniform(shape=(3, 4))
    base = robust.certify(x, key=mr.key(4))
    for workers in (1, 2):  # a new thread, then two at once
        for got in _thread_results(robust, x, workers):
            assert not isinstance(got, Exception), repr(got)
            assert mx.array_equal(got.prediction, base.prediction)
            assert mx.array_equal(got.radius, base.radius)


_BIG_N = textwrap.dedent(
    """
    import os, resource, sys, threading, time
    import mlx.core as mx
    import mlx_robust as mr

    mx.random.seed(0)
    robust = mr.RobustModel(mr.models.MLP(4, hidden=(8,), num_classes=3), bounds=(0, 1), input_shape=(4,))
    x = mx.full((1, 4), 0.5)
    robust.certify(x, sigma=0.25, n0=10, n=20, batch_size=1, key=mr.key(0))  # compile first
    with open("/proc/self/status") as f:
        vm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize")][0]
    # Cap the address space, so that a version asking for gigabytes fails fast instead of swapping.
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**31, resource.RLIM_INFINITY))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop():
        time.sleep(2.0)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
        print("GROWN_KB", grown, flush=True)
        os._exit(0)

    threading.Thread(target=stop, daemon=True).start()
    try:
        robust.certify(x, sigma=0.25, n0=10, n=2**31 - 1, batch_size=1, key=mr.key(0))
        print("FINISHED", flush=True)
    except BaseException as exc:
        print("ERROR", type(exc).__name__, exc, flush=True)
    os._exit(0)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and caps RLIMIT_AS")
def test_huge_n_memory_stays_bounded():
    proc = subprocess.run([sys.executable, "-c", _BIG_N], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert "ERROR" not in out and "FINISHED" not in out, out
    grown = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("GROWN_KB")]
    assert grown, out
    assert grown[0] < 100 * 1024, f"peak RSS grew by {grown[0] / 1024:.0f} MiB in 2 s of certify(n=2**31-1)"


def test_engine_equals_the_reference_on_a_model_with_nonfinite_draws():
    # The plain-MLX oracle follows the same rule (a non-finite draw votes for no class), so the
    # engine's counts equal it exactly, and the missing votes are the non-finite draws.
    model = NaNWhenLow()
    x = mx.full((3, 4), 0.5)
    keys = mx.random.split(mr.key(3), 3)
    fn = _functional.SmoothedFunction(model)
    counts, nonfinite = fn.vote_counts(x, keys, n=300, sigma=SIGMA, batch_size=64, num_classes=3, with_nonfinite=True)
    want = vote_counts_reference(model, x, keys, n=300, sigma=SIGMA, batch_size=64, num_classes=3)
    assert np.array_equal(np.array(counts), np.array(want))
    assert np.array_equal(np.array(counts).sum(axis=1) + np.array(nonfinite), [300, 300, 300])
    assert np.array(nonfinite).min() > 0


def test_chunk_rows_refuses_to_list_billions_of_chunks():
    with pytest.raises(ValueError, match="at most 2\\*\\*24 chunks"):
        _functional.chunk_rows(2**31 - 1, 1)
    assert _functional.chunk_rows(450, 200) == [200, 200, 50]
