"""Issue 12 ("Trust"): files, loaders, checkpoints and the command line.

Decompression bombs and size caps in the loaders, planted symlinks at the checkpoint's and the
CLI's output names, what ``--model`` imports and calls, resuming with the user's optimizer, and
scalar settings that are finite in float64 but not in float32.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import mlx.core as mx
import numpy as np
import pytest

from mlx_robust._files import write_replacing, write_text

from mlx_robust.datasets import load_mnist_idx, load_npz

# --------------------------------------------------------------------------------------------
# Loaders: sizes from the headers, streamed payloads, max_bytes


def _idx_header(n, r=28, c=28):
    return struct.pack(">IIII", 0x00000803, n, r, c)


def _labels(n):
    return struct.pack(">II", 0x00000801, n) + bytes(n)


def _gz_bomb(header: bytes, megabytes: int) -> bytes:
    """A gzip file of ``header`` then ``megabytes`` MiB of zeros, about 1 KiB per MiB: gzip
    members concatenate, so one compressed MiB of zeros repeated is a valid stream."""
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9)
    return gzip.compress(header) + zeros * megabytes


def _npy_bytes(shape, dtype, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)})
    return buf.getvalue() + payload


def _npz(path, members: dict, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)


def _peak_rss_delta_mib(code: str) -> tuple[float, str]:
    """Run ``code`` (which defines ``load()``) in a fresh interpreter; the growth of the peak
    RSS during ``load()`` in MiB, and what ``load()`` raised."""
    script = textwrap.dedent(
        """
        import resource, sys
        import mlx_robust.datasets as d
        {code}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load()
            outcome = "no error"
        except Exception as exc:
            outcome = type(exc).__name__ + ": " + str(exc)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024.0)
        print(outcome)
        """
    ).format(code=textwrap.dedent(code))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    delta, outcome = out.stdout.strip().split("\n", 1)
    return float(delta), outcome


def test_idx_gzip_bomb_is_refused_quickly_in_bounded_memory(tmp_path):
    # 256 MiB of zeros after a header that declares 10 images of 28 x 28: a 270 KB file.
    bomb, labels = tmp_path / "bomb-idx3-ubyte.gz", tmp_path / "labels-idx1-ubyte"
    bomb.write_bytes(_gz_bomb(_idx_header(10), 256))
    labels.write_bytes(_labels(10))
    assert bomb.stat().st_size < 400_000
    t0 = time.perf_counter()
    delta, outcome = _peak_rss_delta_mib(
        f"def load():\n    d.load_mnist_idx({str(bomb)!r}, {str(labels)!r})\n")
    assert outcome.startswith("ValueError") and str(bomb) in outcome and "trailing" in outcome, outcome
    assert delta < 48, f"peak RSS grew by {delta:.0f} MiB reading a 270 KB file"
    assert time.perf_counter() - t0 < 30


def test_idx_declared_size_over_max_bytes_is_refused_before_reading(tmp_path):
    # The header declares 4096 x 4096 x 4096 = 64 GiB; the file holds nothing else.
    big, labels = tmp_path / "big-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    big.write_bytes(_idx_header(4096, 4096, 4096))
    labels.write_bytes(_labels(4096))
    with pytest.raises(ValueError, match="max_bytes") as ei:
        load_mnist_idx(big, labels)
    assert str(big) in str(ei.value)
    # an honest file over a lowered cap is refused; the default cap loads it
    imgs = np.arange(5 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(5, 28, 28)
    honest = tmp_path / "honest.gz"
    honest.write_bytes(gzip.compress(_idx_header(5) + imgs.tobytes()))
    labels.write_bytes(_labels(5))
    with pytest.raises(ValueError, match="max_bytes=1000") as ei:
        load_mnist_idx(honest, labels, max_bytes=1000)
    assert str(honest) in str(ei.value)
    x, y = load_mnist_idx(honest, labels, max_bytes=5 * 28 * 28)
    np.testing.assert_array_equal(np.array(x)[..., 0], imgs.astype(np.float32) / np.float32(255))
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_bytes"):
            load_mnist_idx(honest, labels, max_bytes=bad)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_loads_identically(tmp_path, compress):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    lab = rng.integers(0, 10, size=7, dtype=np.uint8)
    ib = struct.pack(">IIII", 0x803, 7, 5, 3) + imgs.tobytes()
    lb = struct.pack(">II", 0x801, 7) + lab.tobytes()
    ip, lp = tmp_path / "i", tmp_path / "l"
    ip.write_bytes(gzip.compress(ib) if compress else ib)
    lp.write_bytes(gzip.compress(lb) if compress else lb)
    x, y = load_mnist_idx(ip, lp)
    assert x.dtype == mx.float32 and x.shape == (7, 5, 3, 1)
    np.testing.assert_array_equal(np.array(x), (imgs.astype(np.float32)[..., None] / np.float32(255.0)))
    np.testing.assert_array_equal(np.array(y), lab.astype(np.int32))


def test_npz_declaring_a_4_tib_array_is_a_value_error_naming_the_file(tmp_path):
    p = tmp_path / "huge.npz"
    _npz(p, {"x": _npy_bytes((1 << 20, 1 << 20), np.float32, b""),
             "y": _npy_bytes((1 << 20,), np.int64, b"")})
    assert p.stat().st_size < 1000
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="max_bytes") as ei:
        load_npz(p)
    assert str(p) in str(ei.value) and time.perf_counter() - t0 < 5
    # the labels array is checked the same way
    _npz(p, {"x": _npy_bytes((1 << 40, 1), np.uint8, b""), "y": _npy_bytes((1 << 40,), np.int64, b"")})
    with pytest.raises(ValueError, match="max_bytes") as ei:
        load_npz(p)
    assert str(p) in str(ei.value)


def test_npz_bomb_is_refused_in_bounded_memory(tmp_path):
    # x declares 4 x 3 float32 (48 bytes) but its member holds 64 MiB of zeros: a 65 KB file.
    p = tmp_path / "bomb.npz"
    _npz(p, {"x": _npy_bytes((4, 3), np.float32, bytes(64 << 20)),
             "y": _npy_bytes((4,), np.int64, bytes(32))})
    assert p.stat().st_size < 200_000
    delta, outcome = _peak_rss_delta_mib(f"def load():\n    d.load_npz({str(p)!r})\n")
    assert outcome.startswith("ValueError") and str(p) in outcome and "trailing" in outcome, outcome
    assert delta < 32, f"peak RSS grew by {delta:.0f} MiB"


def test_npz_honest_large_array_over_max_bytes(tmp_path):
    p = tmp_path / "d.npz"
    x = np.linspace(0, 1, 6 * 10, dtype=np.float32).reshape(6, 10)
    np.savez_compressed(p, x=x, y=np.arange(6))
    with pytest.raises(ValueError, match="max_bytes=100") as ei:
        load_npz(p, max_bytes=100)
    assert str(p) in str(ei.value)
    xa, ya = load_npz(p, max_bytes=240)
    np.testing.assert_array_equal(np.array(xa), x)
    with pytest.raises(ValueError, match="max_bytes"):
        load_npz(p, max_bytes=0)


def test_npz_truncated_payload_and_trailing_garbage(tmp_path):
    p = tmp_path / "cut.npz"
    y = _npy_bytes((4,), np.int64, np.arange(4, dtype=np.int64).tobytes())
    _npz(p, {"x": _npy_bytes((4, 3), np.float32, bytes(40)), "y": y})
    with pytest.raises(ValueError, match="truncated") as ei:
        load_npz(p)
    assert str(p) in str(ei.value)
    p = tmp_path / "trailing.npz"
    _npz(p, {"x": _npy_bytes((4, 3), np.float32, bytes(48) + b"garbage"), "y": y})
    with pytest.raises(ValueError, match="trailing") as ei:
        load_npz(p)
    assert str(p) in str(ei.value)
    _npz(p, {"x": _npy_bytes((4, 3), np.float32, bytes(48)), "y": y + b"\0"}, zipfile.ZIP_STORED)
    with pytest.raises(ValueError, match="trailing") as ei:
        load_npz(p)
    assert str(p) in str(ei.value)
    # a damaged .npy header
    _npz(p, {"x": b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}", "y": y})
    with pytest.raises(ValueError) as ei:
        load_npz(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("x", [np.zeros(3, np.float32), np.zeros((3, 0), np.float32),
                               np.zeros((3, 4, 0, 1), np.uint8)])
def test_npz_needs_samples_with_features(tmp_path, x):
    p = tmp_path / "shape.npz"
    np.savez(p, x=x, y=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="feature") as ei:
        load_npz(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4", np.float16, np.uint8, np.int16])
def test_npz_loads_identically(tmp_path, compressed, dtype):
    rng = np.random.default_rng(0)
    x = (rng.random((5, 4, 3)) * 255).astype(dtype)
    y = rng.integers(0, 10, size=5).astype(np.uint16)
    p = tmp_path / "ok.npz"
    (np.savez_compressed if compressed else np.savez)(p, x=x, y=y, other=np.zeros(3))
    xa, ya = load_npz(p)
    if np.dtype(dtype).kind == "f":
        want = x.astype(np.float32)
    else:
        want = x.astype(np.float32) / np.float32(255.0)
    assert xa.dtype == mx.float32 and ya.dtype == mx.int32
    np.testing.assert_array_equal(np.array(xa), want)
    np.testing.assert_array_equal(np.array(ya), y.astype(np.int32))
    # Fortran-ordered arrays keep their values
    np.savez(p, x=np.asfortranarray(x), y=y)
    np.testing.assert_array_equal(np.array(load_npz(p)[0]), want)


# --------------------------------------------------------------------------------------------
# Checkpoints: unique temporary names, planted links, stale temporary files; resume


import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

import mlx_robust as mr  # noqa: E402


def _tiny(seed=0):
    mx.random.seed(seed)
    model = mr.models.MLP(64, hidden=(8,), num_classes=10)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def small_data():
    x, y = mr.datasets.load_digits("train")
    return x[:64], y[:64]


def _train(data, **kw):
    kw = {"epochs": 1, "batch_size": 32, "method": "standard", "progress": False, "compile": False, **kw}
    return mr.train(kw.pop("model", None) or _tiny(), *data, **kw)


def test_checkpoint_never_writes_through_a_planted_link(small_data, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    ckpt = tmp_path / "run.safetensors"
    (tmp_path / "run.tmp.safetensors").symlink_to(victim)  # the old fixed temporary name
    _train(small_data, checkpoint=ckpt)
    assert victim.read_text() == "precious"
    assert (tmp_path / "run.tmp.safetensors").is_symlink()
    assert ckpt.is_file() and not ckpt.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors", "run.tmp.safetensors",
                                                          "victim.txt"]


def test_checkpoint_removes_temporary_files_of_a_killed_save(small_data, tmp_path):
    ckpt = tmp_path / "run.safetensors"
    _train(small_data, checkpoint=ckpt)
    stale = tmp_path / "run.k1ll3d_x.tmp.safetensors"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / "run.notours.safetensors"  # not a name of ours: left alone
    other.write_bytes(b"user file")
    _train(small_data, checkpoint=ckpt)  # finished run: resumes to nothing, still cleans up
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.notours.safetensors", "run.safetensors"]


def test_checkpoint_save_error_leaves_no_temporary_file(small_data, tmp_path, monkeypatch):
    def boom(file, arrays, metadata=None):
        if isinstance(file, (str, os.PathLike)):
            file = open(file, "wb")
        file.write(b"partial")
        file.flush()
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        _train(small_data, checkpoint=tmp_path / "run.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_resume_keeps_the_users_learning_rate_and_restores_the_step_count(small_data, tmp_path):
    ckpt = tmp_path / "run.safetensors"
    _train(small_data, checkpoint=ckpt, optimizer=optim.Adam(learning_rate=1e-3))
    opt = optim.Adam(learning_rate=1e-4)
    hist = _train(small_data, model=_tiny(5), epochs=2, checkpoint=ckpt, optimizer=opt)
    assert hist[0].learning_rate == pytest.approx(1e-3) and hist[1].learning_rate == pytest.approx(1e-4)
    assert float(opt.learning_rate) == pytest.approx(1e-4)
    assert int(opt.state["step"]) == 4  # 2 batches per epoch, the first epoch's restored
    # a schedule continues from the restored step count, as in the uninterrupted run
    sched = optim.exponential_decay(1e-2, 0.5)
    straight = _train(small_data, epochs=2, learning_rate=sched)
    ckpt2 = tmp_path / "sched.safetensors"
    _train(small_data, checkpoint=ckpt2, learning_rate=sched)
    resumed = _train(small_data, epochs=2, checkpoint=ckpt2, learning_rate=sched)
    assert resumed[1].learning_rate == straight[1].learning_rate == pytest.approx(1e-2 * 0.5**3)


def test_resume_refuses_another_optimizer_type(small_data, tmp_path):
    ckpt = tmp_path / "run.safetensors"
    _train(small_data, checkpoint=ckpt, optimizer=optim.Adam(learning_rate=1e-3))
    with pytest.raises(ValueError, match="Adam.*SGD") as ei:
        _train(small_data, epochs=2, checkpoint=ckpt, optimizer=optim.SGD(learning_rate=0.1))
    assert str(ckpt) in str(ei.value)
    # a checkpoint without the optimizer's name (older files): its state's layout is compared
    arrays, meta = mx.load(str(ckpt), return_metadata=True)
    meta.pop("optimizer", None)
    mx.save_safetensors(str(ckpt), arrays, metadata=meta)
    with pytest.raises(ValueError, match="optimizer state"):
        _train(small_data, epochs=2, checkpoint=ckpt, optimizer=optim.SGD(learning_rate=0.1))
    assert len(_train(small_data, epochs=2, checkpoint=ckpt)) == 2  # default Adam resumes


# --------------------------------------------------------------------------------------------
# Command line: report files, --model, integer options


from mlx_robust import cli  # noqa: E402


def test_cli_report_files_replace_planted_links(tmp_path, capsys):
    x, y = mr.datasets.load_digits("test")
    model = _tiny(1)
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1))
    report = mr.evaluate(robust, x[:8], y[:8], attacks=["fgsm"], eps=[0.1], key=mr.key(0), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("report.md", "report.json", "robust_accuracy.png"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("precious")
        (out / name).symlink_to(victims[name])
    (out / "report.0ld0ld0l.tmp.md").write_text("left by a killed run")
    cli._write_report(report, str(out))
    for name, victim in victims.items():
        assert victim.read_text() == "precious", name
        if name != "robust_accuracy.png" or cli._have_matplotlib():
            assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert (out / "report.md").read_text() == report.to_markdown()
    assert not any(".tmp" in p.name for p in out.iterdir())


def test_write_replacing_cleans_up_after_an_error(tmp_path):
    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError):
        write_replacing(str(tmp_path / "a.png"), fail)
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    # mkstemp creates 0600 files; a report or checkpoint is an ordinary file (0666 less the umask).
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "r.md", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644


def test_library_writers_never_follow_a_planted_link(tmp_path, mlp, digits):
    # RobustnessReport.to_json/plot and plot_certified_accuracy are public: they write safely too.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    robust = mr.RobustModel(mlp, input_shape=(8, 8, 1), num_classes=10)
    report = mr.evaluate(robust, digits[2][:8], digits[3][:8], attacks=["fgsm"], eps=[0.1], key=mr.key(0),
                         progress=False, checks=False)
    for name in ("r.json", "r.png"):
        (tmp_path / name).symlink_to(victim)
    report.to_json(str(tmp_path / "r.json"))
    report.plot(str(tmp_path / "r.png"))
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "r.json").is_symlink() and not (tmp_path / "r.png").is_symlink()


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    (tmp_path / "trust_cwd_mod.py").write_text(textwrap.dedent(f"""
        import os
        open({str(tmp_path / 'ran')!r}, 'w').close()
        import mlx_robust as mr
        VALUE = 3
        def make():
            return mr.models.MLP(64, hidden=(8,), num_classes=10)
        def not_a_model():
            return "model"
    """))
    monkeypatch.chdir(tmp_path)
    for name in ("trust_cwd_mod",):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    sys.modules.pop("trust_cwd_mod", None)


def test_model_from_the_current_directory_is_not_imported(module_dir):
    assert "" not in sys.path and os.getcwd() not in sys.path
    with pytest.raises(ValueError, match="cannot load --model"):
        cli.load_model("trust_cwd_mod:make")
    assert not (module_dir / "ran").exists()


def test_model_target_must_be_callable_and_return_a_module(module_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(module_dir))
    assert isinstance(cli.load_model("trust_cwd_mod:make"), nn.Module)
    with pytest.raises(ValueError, match="must name a callable.*got int"):
        cli.load_model("trust_cwd_mod:VALUE")
    with pytest.raises(ValueError, match="must return an mlx.nn.Module, got str"):
        cli.load_model("trust_cwd_mod:not_a_model")


def test_model_help_says_it_runs_code(capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs" in text.lower() or "running" in text.lower()
    assert "python -m" in text and "PYTHONPATH" in text


@pytest.mark.parametrize("option", ["--limit", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-8", "x"])
@pytest.mark.parametrize("command", ["evaluate", "certify"])
def test_cli_integer_options_must_be_positive(capsys, option, value, command):
    extra = ["--sigma", "0.25"] if command == "certify" else []
    with pytest.raises(SystemExit) as ei:
        cli.main([command, "--model", "m:f", "--data", "d.npz", *extra, option, value])
    assert ei.value.code == 2
    assert option in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Scalar settings finite in float64 but infinite in float32


@pytest.mark.parametrize("make, name", [
    (lambda: mr.PGD(eps=1e39), "eps"),
    (lambda: mr.PGD(eps=np.array([0.1, 1e39])), "eps"),
    (lambda: mr.PGD(eps=0.1, step_size=1e39), "step_size"),
    (lambda: mr.PGD(eps=np.float64(-1e39)), "eps"),
    (lambda: mr.FGSM(eps=1e39), "eps"),
    (lambda: mr.APGD(eps=1e39), "eps"),
    (lambda: mr.APGDT(eps=1e39), "eps"),
    (lambda: mr.CW(c=1e39), "c"),
    (lambda: mr.CW(lr=1e39), "lr"),
    (lambda: mr.CW(kappa=1e39), "kappa"),
    (lambda: mr.Square(eps=1e39), "eps"),
    (lambda: mr.GaussianNoise(std=1e39), "std"),
    (lambda: mr.Smoothing(sigma=1e39), "sigma"),
])
def test_settings_must_be_finite_in_float32(make, name):
    with pytest.raises(ValueError, match=rf"^{name} must be .*float32"):
        make()


def test_settings_at_the_float32_limit_are_accepted():
    big = float(np.finfo(np.float32).max)
    assert mr.PGD(eps=big, step_size=big).eps == big
    assert mr.CW(c=big).c == big
