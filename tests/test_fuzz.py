"""The short fuzz profile, in a subprocess: a crash (segfault/abort) shows as its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_fuzz_short_profile(tmp_path):
    report = tmp_path / "fuzz.json"
    script = os.path.join(os.path.dirname(__file__), "fuzz", "run.py")
    proc = subprocess.run([sys.executable, script, "--examples", "60", "--report", str(report)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"fuzz exited with {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads(report.read_text())
    assert set(summary) >= {"validate", "attack", "core_engine", "core_helpers", "loaders", "evaluate",
                            "suite_attacks", "smoothing", "stats", "training", "core_apgd", "core_cw",
                            "core_square", "core_smoothing", "loss_helpers", "stochastic", "reentrancy",
                            "threads", "signals", "mutable_state", "oversized_files"}
    for name, entry in summary.items():
        assert entry["status"] == "ok", (name, entry)
        # Both sides of the contract were exercised: valid results and clear errors.
        assert entry["outcomes"].get("ok", 0) > 0, (name, entry)
        assert sum(entry["outcomes"].values()) >= 60, (name, entry)
