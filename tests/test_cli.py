"""The command line: demo and evaluate on user files."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from mlx_robust.cli import main


@pytest.fixture
def user_files(tmp_path, monkeypatch, mlp, digits):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import mlx_robust as mr

        def make():
            return mr.models.MLP(64, hidden=(32,), num_classes=10)

        def wrong():
            return mr.models.MLP(64, hidden=(16,), num_classes=10)
    """))
    mlp.save_weights(str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "data.npz", x=np.array(digits[2][:40]), y=np.array(digits[3][:40]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_evaluate_writes_report(user_files, capsys):
    rc = main(["evaluate", "--model", "my_models:make", "--weights", "w.safetensors", "--data", "data.npz",
               "--eps", "0", "0.1", "--attacks", "fgsm", "pgd", "--out", "out"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| pgd |" in out
    data = json.loads((user_files / "out" / "report.json").read_text())
    assert data["attacks"] == ["fgsm", "pgd"] and data["num_samples"] == 40
    assert (user_files / "out" / "report.md").exists()
    assert (user_files / "out" / "robust_accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,match", [
    (["--model", "my_models:wrong", "--weights", "w.safetensors"], "do not match the model"),
    (["--model", "my_models:nope", "--weights", "w.safetensors"], "cannot load --model"),
    (["--model", "no_colon", "--weights", "w.safetensors"], "must look like 'package.module:factory'"),
    (["--model", "my_models:make", "--weights", "missing.safetensors"], "does not exist"),
])
def test_evaluate_bad_model_or_weights(user_files, capsys, args, match):
    rc = main(["evaluate", *args, "--data", "data.npz", "--eps", "0.1", "--attacks", "fgsm"])
    assert rc == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_demo_runs(tmp_path, capsys, monkeypatch, with_matplotlib):
    if not with_matplotlib:  # the README's demo command installs no plotting library
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["demo", "--epochs", "2", "--at-epochs", "1", "--eps", "0", "0.1", "--out", str(tmp_path / "demo")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "clean test accuracy" in out and "worst case (ensemble)" in out
    assert "PGD-AT" in out and "certified L2 accuracy" in out
    assert (tmp_path / "demo" / "report.json").exists()
    assert (tmp_path / "demo" / "robust_accuracy.png").exists() == with_matplotlib
    assert (tmp_path / "demo" / "certified_accuracy.png").exists() == with_matplotlib


@pytest.mark.parametrize("module, name", [
    ("mlx_robust.smoothing", "certify_command"),
    ("mlx_robust.smoothing", "certified_demo_line"),
    ("mlx_robust.trainer", "adversarial_training_demo"),
])
def test_moved_demo_names_still_work_with_a_warning(module, name):
    import importlib

    import mlx_robust.cli as cli

    with pytest.warns(DeprecationWarning, match=rf"\.{name} moved to mlx_robust\.cli\.{name}"):
        old = getattr(importlib.import_module(module), name)
    assert old is getattr(cli, name)
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(module), "no_such_name")


def test_python_dash_m_cli_runs(capsys):
    import runpy

    with pytest.raises(SystemExit) as exit_info:
        sys.argv = ["mlx-robust", "--version"]
        runpy.run_module("mlx_robust.cli", run_name="__main__")
    assert exit_info.value.code == 0
    assert "mlx-robust" in capsys.readouterr().out
