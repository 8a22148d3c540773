"""mr.validate / RobustModel.validate: per-sample reports checked against an independent numpy
reference, error messages, the 'clip' policy, dtypes, and differentiability of robust(x)."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

import mlx_robust as mr
from conftest import assert_unchanged, snapshot

NAN = float("nan")
INF = float("inf")


# --------------------------------------------------------------------------
# Independent reference


def reference(a: np.ndarray, lo: float, hi: float):
    """Per-sample NaN/Inf counts and finite-out-of-range counts, plus first-10 index lists."""
    a = np.asarray(a, dtype=np.float64)
    flat = a.reshape(a.shape[0], -1)
    nonfinite = np.zeros(a.shape[0], np.int64)
    out_of_range = np.zeros(a.shape[0], np.int64)
    for i, row in enumerate(flat):  # deliberately a plain loop, unlike the fused implementation
        for v in row:
            if not np.isfinite(v):
                nonfinite[i] += 1
            elif v < lo or v > hi:
                out_of_range[i] += 1
    return {
        "nonfinite": nonfinite,
        "out_of_range": out_of_range,
        "total_nonfinite": int(nonfinite.sum()),
        "total_out_of_range": int(out_of_range.sum()),
        "nonfinite_samples": [int(i) for i in np.flatnonzero(nonfinite)[:10]],
        "out_of_range_samples": [int(i) for i in np.flatnonzero(out_of_range)[:10]],
    }


def random_batch(shape, seed, lo=0.0, hi=1.0, p_nonfinite=0.03, p_out=0.05, dtype=np.float32):
    """Values in [lo, hi] with NaN/+Inf/-Inf and values above/below the bounds at random positions."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(lo, hi, size=shape)
    size = a.size
    flat = a.reshape(-1)
    pos = rng.permutation(size)
    # at least one of each kind asked for, so that even a (1, 3) batch has something to find
    k_nf = max(1, rng.binomial(size, p_nonfinite)) if p_nonfinite else 0
    k_out = min(size - k_nf, max(1, rng.binomial(size, p_out))) if p_out else 0
    nf_pos, out_pos = pos[:k_nf], pos[k_nf:k_nf + k_out]
    flat[nf_pos] = rng.choice([np.nan, np.inf, -np.inf], size=k_nf)
    span = hi - lo
    above = rng.uniform(hi + 0.01 * span, hi + 3 * span, size=k_out)
    below = rng.uniform(lo - 3 * span, lo - 0.01 * span, size=k_out)
    flat[out_pos] = np.where(rng.random(k_out) < 0.5, above, below)
    return flat.reshape(shape).astype(dtype)


def assert_report_matches(report, ref, n):
    nf, oor = np.array(report.nonfinite), np.array(report.out_of_range)
    assert report.nonfinite.dtype == mx.int32 and report.out_of_range.dtype == mx.int32
    assert nf.shape == (n,) and oor.shape == (n,)
    np.testing.assert_array_equal(nf, ref["nonfinite"])
    np.testing.assert_array_equal(oor, ref["out_of_range"])
    assert report.num_samples == n
    assert report.total_nonfinite == ref["total_nonfinite"]
    assert report.total_out_of_range == ref["total_out_of_range"]
    assert list(report.nonfinite_samples) == ref["nonfinite_samples"]
    assert list(report.out_of_range_samples) == ref["out_of_range_samples"]
    assert report.ok == (ref["total_nonfinite"] == 0 and ref["total_out_of_range"] == 0)


SHAPES = [(1, 3), (5, 8, 8, 1), (300, 4), (7, 2, 3), (64, 8, 8, 1), (12, 1)]
SEEDS = [0, 1, 2]


def report_of(a, lo=0.0, hi=1.0):
    """The report itself, also for batches that validate() refuses (it raises before returning one).
    Same call validate() makes: the bridge to the C++ pass."""
    from mlx_robust import _functional

    arr = mx.array(a) if not isinstance(a, mx.array) else a
    return _functional.validate_batch(arr, None, lo, hi, "x")


# --------------------------------------------------------------------------
# Reports against the reference


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_report_matches_reference(shape, seed):
    a = random_batch(shape, seed)
    ref = reference(a, 0.0, 1.0)
    assert_report_matches(report_of(a), ref, shape[0])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(300, 4), (5, 8, 8, 1)], ids=str)
def test_report_matches_reference_out_of_range_only(shape, seed):
    """Without NaN/Inf the public validate returns the report under the clip policy."""
    a = random_batch(shape, seed, p_nonfinite=0.0)
    ref = reference(a, 0.0, 1.0)
    assert ref["total_out_of_range"] > 0
    x, report = mr.validate(a, bounds=(0.0, 1.0), policy="clip")
    assert_report_matches(report, ref, shape[0])
    np.testing.assert_array_equal(np.array(x), np.clip(a, 0.0, 1.0))


@pytest.mark.parametrize("bounds", [(-1.0, 2.0), (0.2, 0.8), (-255.0, -1.0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_report_with_other_bounds(bounds, seed):
    lo, hi = bounds
    a = random_batch((40, 3, 3), seed, lo=lo, hi=hi)
    assert_report_matches(report_of(a, lo, hi), reference(a, lo, hi), 40)
    # values exactly on the bounds are inside
    edge = np.full((2, 3), lo, np.float32)
    edge[1] = hi
    assert report_of(edge, lo, hi).ok


LAYOUTS = {
    "transposed": lambda a: (mx.array(np.ascontiguousarray(a.T)).T, a),
    "strided_batch": lambda a: (mx.array(a)[::3], a[::3]),
    "reversed_batch": lambda a: (mx.array(a)[::-1], a[::-1]),
    "broadcast_batch": lambda a: (mx.broadcast_to(mx.array(a)[:1], a.shape), np.broadcast_to(a[:1], a.shape)),
    "broadcast_feature": lambda a: (mx.broadcast_to(mx.array(a)[:, :1], a.shape), np.broadcast_to(a[:, :1], a.shape)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seed", SEEDS)
def test_report_for_non_contiguous_inputs(layout, seed):
    a = random_batch((60, 5), seed, p_nonfinite=0.05, p_out=0.1)
    a[0, 0] = NAN  # sample 0 offends, so a broadcast batch is all offending
    a[0, 1] = 7.0
    x, na = LAYOUTS[layout](a)
    assert_report_matches(report_of(x), reference(na, 0.0, 1.0), na.shape[0])


@pytest.mark.parametrize("value,field", [(2.0, "out_of_range_samples"), (NAN, "nonfinite_samples")])
@pytest.mark.parametrize("shape", [(100, 1), (100, 1, 1)], ids=str)
def test_report_for_broadcast_single_element_samples(shape, value, field):
    x = mx.broadcast_to(mx.array(value), shape)
    report = report_of(x)
    assert np.array(getattr(report, field.replace("_samples", ""))).tolist() == [1] * 100  # counts are right
    assert list(getattr(report, field)) == list(range(10))  # ...the index list is not


# --------------------------------------------------------------------------
# Error messages


def expected_message_parts(ref, name="x"):
    if ref["total_nonfinite"]:
        k = int((ref["nonfinite"] > 0).sum())
        return (f"{name} contains {ref['total_nonfinite']} NaN/Inf value(s) in {k} sample(s); "
                f"first offending samples: {ref['nonfinite_samples']}")
    k = int((ref["out_of_range"] > 0).sum())
    return (f"{name} has {ref['total_out_of_range']} value(s) outside the bounds [0.0, 1.0] in {k} sample(s); "
            f"first offending samples: {ref['out_of_range_samples']}")


@pytest.mark.parametrize("p_nonfinite", [0.0, 0.03], ids=["out_of_range", "nonfinite"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 3), (5, 8, 8, 1), (300, 4)], ids=str)
def test_error_message_has_count_and_first_indices(shape, seed, p_nonfinite):
    a = random_batch(shape, seed, p_nonfinite=p_nonfinite, p_out=0.1)
    if shape == (1, 3):  # make sure the single sample offends
        a[0, 1] = NAN if p_nonfinite else 1.5
    ref = reference(a, 0.0, 1.0)
    assert ref["total_nonfinite"] or ref["total_out_of_range"]
    with pytest.raises(ValueError) as info:
        mr.validate(a, bounds=(0.0, 1.0))
    assert str(info.value).startswith(expected_message_parts(ref))


def test_nonfinite_is_reported_before_out_of_range():
    a = np.full((4, 2), 0.5, np.float32)
    a[0, 0] = 5.0
    a[2, 1] = NAN
    with pytest.raises(ValueError, match=r"^x contains 1 NaN/Inf value\(s\) in 1 sample\(s\); first offending samples: \[2\]$"):
        mr.validate(a)


def test_message_uses_the_given_name():
    a = np.full((3, 2), 0.5, np.float32)
    a[1, 0] = -1.0
    with pytest.raises(ValueError, match=r"^images has 1 value\(s\) outside the bounds \[0\.0, 1\.0\] in 1 sample\(s\); first offending samples: \[1\]"):
        mr.validate(a, name="images")
    with pytest.raises(TypeError, match=r"^images must be"):
        mr.validate(np.zeros((3, 2), np.int32), name="images")
    with pytest.raises(ValueError, match=r"images has shape \(3, 2\) but the model expects \(N, 4\)"):
        mr.validate(np.zeros((3, 2), np.float32), input_shape=(4,), name="images")


@pytest.mark.parametrize("n_bad", [1, 9, 10, 11, 57])
@pytest.mark.parametrize("kind", ["nonfinite", "out_of_range"])
def test_more_than_ten_offenders_lists_exactly_the_first_ten(n_bad, kind):
    rng = np.random.default_rng(n_bad)
    n = 200
    a = rng.uniform(0, 1, (n, 6)).astype(np.float32)
    bad = np.sort(rng.choice(n, size=n_bad, replace=False))
    a[bad, rng.integers(0, 6, n_bad)] = NAN if kind == "nonfinite" else 1.25
    report = report_of(a)
    first = bad[:10].tolist()
    assert list(getattr(report, f"{kind}_samples")) == first
    assert len(getattr(report, f"{kind}_samples")) == min(n_bad, 10)
    with pytest.raises(ValueError) as info:
        mr.validate(a)
    msg = str(info.value)
    listed = re.search(r"first offending samples: \[([0-9, ]*)\]", msg).group(1)
    assert [int(s) for s in listed.split(",")] == first
    assert f"in {n_bad} sample(s)" in msg


# --------------------------------------------------------------------------
# The clip policy


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-0.5, 0.25)])
def test_clip_equals_numpy_clip(seed, bounds):
    lo, hi = bounds
    a = random_batch((50, 4, 4), seed, lo=lo, hi=hi, p_nonfinite=0.0, p_out=0.2)
    ref = reference(a, lo, hi)
    x, report = mr.validate(a, bounds=bounds, policy="clip")
    assert x.dtype == mx.float32 and x.shape == a.shape
    np.testing.assert_array_equal(np.array(x), np.clip(a, lo, hi))
    # the report describes the input as given (before clipping)
    assert not report.ok
    assert report.total_out_of_range == ref["total_out_of_range"] > 0
    # and the raise policy refuses the same batch
    with pytest.raises(ValueError, match=rf"^x has {ref['total_out_of_range']} value\(s\) outside the bounds"):
        mr.validate(a, bounds=bounds)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_clip_still_raises_on_nonfinite(bad):
    a = np.full((6, 3), 2.0, np.float32)  # also out of range everywhere
    a[4, 2] = bad
    with pytest.raises(ValueError, match=r"^x contains 1 NaN/Inf value\(s\) in 1 sample\(s\); first offending samples: \[4\]"):
        mr.validate(a, policy="clip")


def test_robust_validate_uses_the_models_settings(mlp):
    a = np.full((3, 8, 8, 1), 0.5, np.float32)
    a[1, 0, 0, 0] = 3.0
    strict = mr.RobustModel(mlp, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    loose = mr.RobustModel(mlp, bounds=(0.0, 4.0), input_shape=(8, 8, 1), num_classes=10)
    clip = mr.RobustModel(mlp, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10, on_invalid="clip")
    with pytest.raises(ValueError, match=r"^x has 1 value\(s\) outside the bounds \[0\.0, 1\.0\] in 1 sample\(s\); first offending samples: \[1\]"):
        strict.validate(a)
    x, report = loose.validate(a)
    assert report.ok and np.array_equal(np.array(x), a)
    x, report = clip.validate(a)
    assert report.out_of_range.tolist() == [0, 1, 0] and np.array(x).max() == 1.0
    with pytest.raises(ValueError, match=r"x has shape \(3, 64\) but the model expects \(N, 8, 8, 1\)"):
        strict.validate(a.reshape(3, 64))


# --------------------------------------------------------------------------
# Clean batches and dtypes


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_clean_batch_is_ok_and_unchanged(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.uniform(0, 1, shape).astype(np.float32)
    xm = mx.array(a)
    for given in (a, xm):
        x, report = mr.validate(given, bounds=(0.0, 1.0), input_shape=shape[1:])
        assert report.ok
        assert report.total_nonfinite == 0 and report.total_out_of_range == 0
        assert list(report.nonfinite_samples) == [] and list(report.out_of_range_samples) == []
        assert np.array(report.nonfinite).tolist() == [0] * shape[0]
        assert np.array(report.out_of_range).tolist() == [0] * shape[0]
        assert x.dtype == mx.float32 and x.shape == shape
        np.testing.assert_array_equal(np.array(x), a)
    x, _ = mr.validate(xm, policy="clip")
    assert mx.array_equal(x, xm)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "np_float16", "np_float64"])
def test_low_precision_and_float64_inputs(dtype):
    a = np.full((6, 4), 0.5, np.float32)
    a[1, 0] = 1.5
    a[3, 2] = -2.0
    a[3, 3] = 4.0
    a[5, 1] = NAN
    want_dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16, "np_float16": mx.float16, "np_float64": mx.float32}[dtype]
    if dtype.startswith("np_"):
        given = a.astype(getattr(np, dtype[3:]))
        clean = given[:5]
    else:
        given = mx.array(a).astype(want_dtype)
        clean = given[:5]
    report = report_of(given)
    assert np.array(report.nonfinite).tolist() == [0, 0, 0, 0, 0, 1]
    assert np.array(report.out_of_range).tolist() == [0, 1, 0, 2, 0, 0]
    with pytest.raises(ValueError, match=r"^x contains 1 NaN/Inf value\(s\) in 1 sample\(s\); first offending samples: \[5\]"):
        mr.validate(given)
    with pytest.raises(ValueError, match=r"^x has 3 value\(s\) outside the bounds \[0\.0, 1\.0\] in 2 sample\(s\); first offending samples: \[1, 3\]"):
        mr.validate(clean)
    x, report = mr.validate(clean, policy="clip")
    assert x.dtype == want_dtype
    np.testing.assert_array_equal(np.array(x.astype(mx.float32)), np.clip(a[:5], 0.0, 1.0))
    ok = given[:1]
    x, report = mr.validate(ok)
    assert report.ok and x.dtype == want_dtype
    assert np.array(x.astype(mx.float32)).tolist() == [[0.5] * 4]


def test_low_precision_through_the_model(mlp, batch):
    robust = mr.RobustModel(mlp, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    x = batch[0][:8]
    ref = np.array(mlp(x))
    for dt in (mx.float16, mx.bfloat16):
        logits = robust(x.astype(dt))
        assert logits.shape == (8, 10)
        np.testing.assert_allclose(np.array(logits.astype(mx.float32)), ref, atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------
# Bad arguments to validate itself


@pytest.mark.parametrize("policy", ["ignore", "CLIP", None])
def test_bad_policy(policy):
    with pytest.raises(ValueError, match=r"^policy must be one of \('raise', 'clip'\)"):
        mr.validate(np.zeros((2, 2), np.float32), policy=policy)


@pytest.mark.parametrize("bounds", [(NAN, 1.0), (0.0, NAN), (NAN, NAN), (0.5, 0.5)], ids=str)
def test_validate_rejects_invalid_bounds(bounds):
    # a batch that is inside any sensible bounds: today it passes silently with these
    with pytest.raises(ValueError, match=r"bounds"):
        mr.validate(np.full((2, 3), 0.5, np.float32), bounds=bounds)


# --------------------------------------------------------------------------
# Differentiability


def _grad_check(model, x):
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=tuple(x.shape[1:]), num_classes=10)
    snap = snapshot(model)
    g_robust = mx.grad(lambda xx: mx.sum(robust(xx)))(x)
    g_raw = mx.grad(lambda xx: mx.sum(model(xx)))(x)
    assert g_robust.shape == x.shape
    assert float(mx.max(mx.abs(g_raw)).item()) > 0  # a real, non-trivial gradient
    np.testing.assert_allclose(np.array(g_robust), np.array(g_raw), rtol=1e-6, atol=1e-7)

    # a per-sample loss too, and value_and_grad
    y = mx.array(np.arange(x.shape[0]) % 10, mx.int32)

    def loss(fn):
        return lambda xx: mx.mean(mx.logsumexp(fn(xx), axis=-1) - mx.take_along_axis(fn(xx), y[:, None], -1)[:, 0])

    v1, g1 = mx.value_and_grad(loss(robust))(x)
    v2, g2 = mx.value_and_grad(loss(model))(x)
    assert abs(v1.item() - v2.item()) <= 1e-6
    np.testing.assert_allclose(np.array(g1), np.array(g2), rtol=1e-6, atol=1e-7)
    assert_unchanged(model, snap)


def test_robust_call_is_differentiable_mlp(mlp, batch):
    _grad_check(mlp, batch[0][:16])


def test_robust_call_is_differentiable_cnn(cnn, batch):
    _grad_check(cnn, batch[0][:8])


def test_gradient_through_validation_still_rejects_nan(mlp, batch):
    robust = mr.RobustModel(mlp, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    a = np.array(batch[0][:4])
    a[2, 1, 1, 0] = NAN
    with pytest.raises(ValueError, match=r"^x contains 1 NaN/Inf value\(s\) in 1 sample\(s\); first offending samples: \[2\]"):
        mx.grad(lambda xx: mx.sum(robust(xx)))(mx.array(a))


# --- attack(): the counts are read after the attack is queued ---------------------------------


def test_attack_reports_the_batch_error_before_the_attacks_own(mlp, batch):
    x, y = batch
    robust = mr.RobustModel(mlp, input_shape=(8, 8, 1), num_classes=10)
    bad = np.array(x).copy()
    bad[3, 0, 0, 0] = np.nan
    snap = snapshot(mlp)
    with pytest.raises(ValueError, match=r"x contains 1 NaN/Inf value\(s\) in 1 sample\(s\); first offending samples: \[3\]"):
        robust.attack(bad, y, mr.PGD(eps=0.1, steps=3))
    # NaN and a bad key at once: the batch is named first, as when validation ran before
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        robust.attack(bad, y, mr.PGD(eps=0.1, steps=3), key=mx.array([1, 2, 3], mx.uint32))
    assert_unchanged(mlp, snap)
    # the same key error alone is the key's
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        robust.attack(x, y, mr.PGD(eps=0.1, steps=3), key=mx.array([1, 2, 3], mx.uint32))


def test_attack_with_clip_policy_equals_attack_on_the_clipped_batch(mlp, batch):
    x, y = batch
    robust = mr.RobustModel(mlp, input_shape=(8, 8, 1), num_classes=10, on_invalid="clip")
    noisy = np.array(x).copy()
    noisy[0, 1, 1, 0], noisy[5, 2, 2, 0] = 1.7, -0.4
    a = robust.attack(noisy, y, mr.PGD(eps=0.1, steps=3), key=mr.key(0))
    b = robust.attack(np.clip(noisy, 0.0, 1.0), y, mr.PGD(eps=0.1, steps=3), key=mr.key(0))
    assert mx.array_equal(a.x_adv, b.x_adv).item()
