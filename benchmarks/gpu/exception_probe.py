"""Each C++ error path of _core, in its own subprocess: prints how each one ends (diagnostics)."""
import subprocess
import sys

CASES = {
    "mlx_own_error": "mx.reshape(mx.zeros(3), (2,))",
    "structure_gil_held": "_core.check_batch_structure(mx.zeros((64,)), None, 'x')",
    "validate_gil_released": "_core.validate_batch(mx.zeros((64,)), None, lo=mx.array(0.), hi=mx.array(1.))",
    "dtype_translator": "_core.check_batch_structure(mx.zeros((4, 2), mx.int32), None, 'x')",
    "parse_norm_in_binding": "_core.project(mx.zeros((2,2)), mx.zeros((2,2)), mx.zeros((2,)), mx.array(0.), mx.array(1.), 'l7')",
    "engine_bad_y": "_core.AttackEngine().run(lambda p, x: x, [], mx.zeros((4,2)), mx.zeros((3,), mx.int32), mx.zeros((4,)), mx.zeros((4,)), mx.array(0.), mx.array(1.), num_classes=2, key=mx.random.key(0))",
    "engine_forward_raises": "_core.AttackEngine().run(lambda p, x: 1/0, [], mx.zeros((4,2)), mx.zeros((4,), mx.int32), mx.zeros((4,)), mx.zeros((4,)), mx.array(0.), mx.array(1.), num_classes=2, key=mx.random.key(0))",
}
for name, expr in CASES.items():
    code = f"import mlx.core as mx\nfrom mlx_robust import _core\ntry:\n    {expr}\n    print('no error')\nexcept Exception as e:\n    print(type(e).__name__, str(e)[:80])\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(f"{name:24s} rc={r.returncode:4d} {r.stdout.strip()} {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
