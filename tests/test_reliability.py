"""No leaks, no cross-thread corruption, deterministic results."""

from __future__ import annotations

import gc
import weakref

import mlx.core as mx
import numpy as np

import mlx_robust as mr
from mlx_robust.training import fit
from conftest import mlx_thread, digits_robust as _robust


def test_deleted_wrapper_and_model_are_collected(batch):
    x, y = batch
    model = mr.models.MLP(64, hidden=(16,), num_classes=10)
    robust = _robust(model)
    robust.attack(x, y, mr.PGD(eps=0.1, steps=3), key=mr.key(0))  # traced: compiled entries exist
    refs = weakref.ref(model), weakref.ref(robust), weakref.ref(robust._fn)
    del model, robust
    gc.collect()
    assert all(r() is None for r in refs), "the model or its wrapper is kept alive after use"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_repeated_attacks_do_not_grow_memory(mlp, batch):
    x, y = batch
    robust = _robust(mlp)
    attack = mr.PGD(eps=0.1, steps=4)
    for i in range(30):  # warm-up: traces, allocator caches
        robust.attack(x, y, attack, key=mr.key(i))
    gc.collect()
    before = _rss_bytes()
    for i in range(300):
        robust.attack(x, y, attack, key=mr.key(i))
    gc.collect()
    growth = (_rss_bytes() - before) / before
    assert growth < 0.05, f"resident memory grew {growth:.1%} over 300 attacks"


def test_two_threads_attack_two_models(digits):
    x, y = digits[2][:64], digits[3][:64]
    models = []
    for seed in (11, 12):
        mx.random.seed(seed)
        models.append(fit(mr.models.MLP(64, hidden=(16,), num_classes=10), digits[0], digits[1], epochs=3, seed=seed))
    attack = mr.PGD(eps=0.1, steps=6, early_stop=False)
    expected = [np.array(_robust(m).attack(x, y, attack, key=mr.key(5)).x_adv) for m in models]
    results, errors = [None, None], []

    def work(i):
        try:
            robust = _robust(models[i])
            for _ in range(5):
                results[i] = np.array(robust.attack(x, y, attack, key=mr.key(5)).x_adv)
        except Exception as exc:  # reported below, with the thread's exception
            errors.append(exc)

    threads = [mlx_thread(work, i, daemon=False) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_same_key_bit_identical_across_runs_and_batch_splits(mlp, digits):
    x, y = digits[2][:96], digits[3][:96]
    robust = _robust(mlp)
    attack = mr.PGD(eps=0.1, steps=5, restarts=2, early_stop=False)
    a = robust.attack(x, y, attack, key=mr.key(9))
    b = robust.attack(x, y, attack, key=mr.key(9))
    halves = robust.attack(x, y, attack, key=mr.key(9), batch_size=48)
    assert mx.array_equal(a.x_adv, b.x_adv) and mx.array_equal(a.success, b.success)
    np.testing.assert_allclose(np.array(halves.x_adv), np.array(a.x_adv), atol=1e-6)
    assert np.array_equal(np.array(halves.success), np.array(a.success))


def test_core_rejects_out_of_range_labels_instead_of_corrupting_memory():
    # Found by the long fuzz run: labels outside [0, C) reached the loss's gather and its gradient's
    # scatter and corrupted the heap. The core now checks them; run in a subprocess so a regression
    # shows as a crash, not as a hung test session.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import mlx.core as mx, mlx_robust as mr
        from mlx_robust import _functional
        m = mr.models.MLP(4, hidden=(), num_classes=3)
        fn = _functional.ModelFunction(m)
        names, params = fn.flat_parameters()
        fwd = fn._forward(names, params)
        x = mx.random.uniform(shape=(3, 4))
        errors = 0
        for labels in ([5000000, -7000000, 2], [3, 0, 1], [-1, 0, 1]):
            for targeted in (False, True):
                try:
                    mr._core.AttackEngine().run(fwd, params, x, mx.array(labels, mx.int32), mx.full((3,), 0.1),
                                                mx.full((3,), 0.1), mx.array(0.), mx.array(1.), num_classes=3,
                                                steps=2, targeted=targeted, key=mr.key(0))
                except ValueError as exc:
                    assert "y must lie in [0, 3)" in str(exc), exc
                    errors += 1
        print(errors)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "6"


def test_short_leak_run_over_attacks_and_certifications():
    # The long run (1,000 calls each) is tests/fuzz/leak_run.py --calls 1000; CI runs 100.
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "fuzz", "leak_run.py")
    proc = subprocess.run([sys.executable, script, "--calls", "100", "--warmup", "20"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "attack" in proc.stdout and "certify" in proc.stdout


def test_accuracy_helper_restores_each_modules_own_mode(mlp, digits):
    from conftest import assert_unchanged, snapshot

    from mlx_robust.training import accuracy

    mlp.train()
    mlp.layers[0].eval()  # a mixed state that model.train(flag) would flatten
    snap = snapshot(mlp)
    acc = accuracy(mlp, digits[2][:50], digits[3][:50])
    assert 0.5 < acc <= 1.0
    assert_unchanged(mlp, snap)
    mlp.eval()
