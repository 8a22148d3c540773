"""Data-parallel adversarial training with mx.distributed: 2 local processes, ring backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_robust.distributed import data_parallel, launch_command, shard

WORKER = Path(__file__).with_name("distributed_training_worker.py")


def _free_port_block(n: int = 4) -> int:
    """A port p such that p .. p+n-1 look free (mlx.launch's ring uses one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n >= 65535:
            continue
        try:
            socks = []
            for p in range(port, port + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no free block of local ports for the ring backend")


def _load(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cmd = launch_command([str(WORKER), str(out)], processes=2, backend="ring", starting_port=_free_port_block())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=WORKER.parent)
    files = [out / f"rank{r}.safetensors" for r in range(2)]
    # mlx.launch 0.32 exits 0 even when a rank fails: the ranks' files are the real signal.
    if not all(f.exists() for f in files):
        pytest.fail(f"a rank did not finish (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    meta = mx.load(str(files[0]), return_metadata=True)[1]
    assert meta["size"] == "2", "the ranks did not form a group of 2"
    return [_load(f) for f in files]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=240,
                          cwd=WORKER.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _load(out / "rank0.safetensors")


def test_parameters_identical_across_ranks(ranks):
    r0, r1 = ranks
    assert r0.keys() == r1.keys() and any(k.startswith("train/") for k in r0)
    for k in r0:
        assert np.array_equal(r0[k], r1[k]), f"{k} differs between ranks"


def test_data_parallel_matches_single_process_on_the_global_batch(ranks, single):
    initial = {k: np.array(v) for k, v in tree_flatten(_initial_model().parameters())}
    for k, v in single.items():
        np.testing.assert_allclose(ranks[0][k], v, rtol=1e-4, atol=1e-5, err_msg=k)
        # and training did move the parameters (the comparison is not vacuous)
        assert not np.allclose(v, initial[k.split("/", 1)[1]]), f"{k} did not change"


def _initial_model():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import distributed_training_worker as worker
    finally:
        sys.path.pop(0)
    return worker.make_model()


def test_shard_and_wrapper_in_a_single_process():
    group = mx.distributed.init()
    assert group.size() == 1
    x = mx.arange(12).reshape(6, 2)
    assert mx.array_equal(shard(x, group), x)

    def vg(model, a, b):
        return mx.array(1.5), {"w": mx.array([2.0])}

    loss, grads = data_parallel(vg, group)(None, None, None)
    assert loss.item() == 1.5 and grads["w"].item() == 2.0
    with pytest.raises(TypeError, match="value_and_grad_fn"):
        data_parallel(3)


def test_launch_command_names_the_interpreter_and_backend():
    cmd = launch_command(["w.py", "out"], processes=3, backend="ring", starting_port=4000)
    assert cmd[-3:] == [sys.executable, "w.py", "out"]
    assert ["-n", "3"] == cmd[cmd.index("-n") : cmd.index("-n") + 2]
    assert "--starting-port" in cmd and "ring" in cmd
    with pytest.raises(ValueError, match="processes"):
        launch_command(["w.py"], processes=0)


def test_shard_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="split evenly"):
        shard(mx.zeros((5, 2)), _FakeGroup())


class _FakeGroup:
    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0
