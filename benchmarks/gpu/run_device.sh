#!/usr/bin/env bash
# Build mlx-robust in place on a machine with MLX's CUDA wheel installed, run the test suite with the
# GPU as MLX's default device and every benchmark, and write the results to OUTDIR.
#
#   bash benchmarks/gpu/run_device.sh [OUTDIR] [all|tests|bench]   (default: $OUT, else ./gpu-results; all)
#
# On a fresh machine MLX's CUDA backend JIT-compiles every fused kernel the first time it meets it:
# the whole suite then takes over 10 minutes (about 4 once the kernels are cached), so under the
# device tool's 10-minute limit run "tests" and "bench" as separate calls on the same warm machine.
#
# Getting mlx-cuda-13 onto the device tool's machine takes two calls: see ARCHITECTURE §7 and
# ../shared/tools/prepare-gpu-wheels.sh. With a CPU-built wheel in .cpuwheel/, it also checks that
# a wheel built against mlx[cpu] headers imports and attacks on the GPU.
set -uo pipefail
out=${1:-${OUT:-gpu-results}}
mode=${2:-all}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}

{
  $py -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info())"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
} | tee "$out/device.txt"

if ls .cpuwheel/mlx_robust-*.whl >/dev/null 2>&1; then
  echo "== wheel built on the CPU machine against mlx[cpu], used with mlx-cuda-13 ==" | tee "$out/cpu_wheel.txt"
  $py -m pip install -q --no-deps --force-reinstall .cpuwheel/mlx_robust-*.whl 2>&1 | tee -a "$out/cpu_wheel.txt"
  (cd /tmp && $py - <<'PY' 2>&1 | tee -a "$out/cpu_wheel.txt"
import mlx.core as mx, mlx_robust as mr
x, y = mr.datasets.load_digits("test")
model = mr.models.MLP(64, hidden=(32,), num_classes=10)
res = mr.RobustModel(model, input_shape=(8, 8, 1), num_classes=10).attack(x, y, mr.PGD(eps=0.1, steps=10), key=mr.key(0))
print("device", mx.default_device(), "PGD ok:", res.x_adv.shape, "success rate", res.success_rate)
PY
  )
fi

$py -m pip install -q --no-build-isolation --no-deps --force-reinstall . 2>&1 | tail -5
(cd /tmp && $py -c "import mlx_robust, mlx.core as mx; print('built in place:', mlx_robust.__version__, mx.default_device())")
(cd /tmp && $py "$OLDPWD/benchmarks/gpu/exception_probe.py") 2>&1 | tee "$out/exception_probe.txt"
if [ "$mode" != bench ]; then
  $py -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest.txt" | tail -15
fi
if [ "$mode" != tests ]; then
  for b in benchmarks/bench_*.py benchmarks/gpu/profile_layers.py benchmarks/gpu/profile_pool.py; do
    echo "== $b =="
    $py "$b" 2>&1 | tee "$out/$(basename "$b" .py).txt"
  done
fi
