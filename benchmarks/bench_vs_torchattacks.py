"""PGD speed: mlx-robust (MLX) vs torchattacks (PyTorch) on the same GPU, one process per framework.

Same architectures, same batch sizes, same attack (PGD L-inf, no random start, every step run):

  mlp     MLP 784-256-256-10 on 28x28x1
  cnn     conv32-relu-pool - conv64-relu-pool - linear on 28x28x1 (3x3 convs, padding 1)
  resnet  ResNet-18 (CIFAR variant: 3x3 stem, no max-pool, BasicBlocks 2-2-2-2, 64..512 channels,
          BatchNorm in eval mode, global average pool, linear) on 32x32x3

For each model, batch (default 128 and 512) and step count (default 10 and 40) it times, median of
--reps after a warm-up call:

  torchattacks   torchattacks.PGD(model, eps, alpha, steps, random_start=False)(x, y), then
                 torch.cuda.synchronize()
  mlx-robust     robust.attack(x, y, mr.PGD(..., random_start=False, early_stop=False)) and
                 mx.eval of its x_adv: the same steps on every sample, plus the forward on x_adv
                 that gives per-sample success (torchattacks does not score x_adv)

  plain loop     the loop a user writes in ten lines: one PGD step under mx.compile (the model's
                 state as compile inputs), called `steps` times with mx.async_eval, then one
                 forward on x_adv (the library's result includes that forward); the column
                 "plain+fwd" is their sum, the bound issue 16 holds the library to (<= 1.05x)
  naive loop     the same step without mx.compile, mx.eval every step
  autocast       (--autocast) torchattacks under torch.autocast(bfloat16): PyTorch's mixed precision

and, to show what bounds each framework, each model's own forward+backward (gradient w.r.t. the
input) at that batch. --compute-dtype bfloat16 runs the MLX plain loop on a bfloat16 copy of the
weights and the library with RobustModel(..., compute_dtype=...). --no-fast-pool turns off the
library's max-pooling rewrite (the CNN then runs the same graph as the plain loop).
Both frameworks run in float32 with their default kernel settings (PyTorch:
cuDNN with TF32 convolutions allowed, the default; MLX: its CUDA backend's defaults). Weights are
random (timing does not depend on them).

    python benchmarks/bench_vs_torchattacks.py                       # runs both frameworks, prints the table
    python benchmarks/bench_vs_torchattacks.py --models mlp cnn --batch 128 --steps 40
    python benchmarks/bench_vs_torchattacks.py --framework mlx       # one framework, JSON lines

The driver starts one subprocess per framework (so neither framework's allocator or threads affect
the other), one after the other, on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial

from _common import median_time

MODELS = ("mlp", "cnn", "resnet")
SHAPES = {"mlp": (28, 28, 1), "cnn": (28, 28, 1), "resnet": (32, 32, 3)}
EPS = {"mlp": 0.3, "cnn": 0.3, "resnet": 8 / 255}


# --- MLX -------------------------------------------------------------------------------------


def mlx_models():
    import mlx.core as mx
    import mlx.nn as nn

    import mlx_robust as mr

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm(cout)
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm(cout))

        def __call__(self, x):
            out = nn.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return nn.relu(out + (x if self.shortcut is None else self.shortcut(x)))

    class ResNet18(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm(64)
            blocks, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
                cin = cout
            self.blocks = blocks
            self.linear = nn.Linear(512, num_classes)

        def __call__(self, x):
            x = nn.relu(self.bn1(self.conv1(x)))
            for b in self.blocks:
                x = b(x)
            return self.linear(mx.mean(x, axis=(1, 2)))

    return {
        "mlp": lambda: mr.models.MLP(784, hidden=(256, 256), num_classes=10),
        "cnn": lambda: mr.models.SmallCNN(in_channels=1, num_classes=10, image_size=28, channels=(32, 64)),
        "resnet": ResNet18,
    }


def plain_loops(model, x, y, eps, alpha, steps, dtype=None):
    """The two user-written baselines: (compiled loop with async_eval, forward on x_adv, naive loop)."""
    import mlx.core as mx
    import mlx.nn as nn

    def loss(xa):
        xa = xa if dtype is None else xa.astype(dtype)
        return nn.losses.cross_entropy(model(xa).astype(mx.float32), y, reduction="sum")

    def one_step(xa, x0):
        g = mx.grad(loss)(xa)
        xa = xa + alpha * mx.sign(g)
        return mx.clip(mx.clip(xa - x0, -eps, eps) + x0, 0.0, 1.0)

    step = partial(mx.compile, inputs=model.state)(one_step)

    def compiled():
        xa = x
        for _ in range(steps):
            xa = step(xa, x)
            mx.async_eval(xa)
        mx.eval(xa)
        return xa

    def naive():
        xa = x
        for _ in range(steps):
            xa = one_step(xa, x)
            mx.eval(xa)
        return xa

    return compiled, naive


def run_mlx(args) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    import mlx_robust as mr

    if args.no_fast_pool:
        mr.set_fast_pooling(False)
    dtype = getattr(mx, args.compute_dtype) if args.compute_dtype else None
    builders = mlx_models()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    print(json.dumps({"framework": "mlx", "version": f"mlx {mx.__version__}, mlx-robust {mr.__version__}",
                      "device": f"{mx.default_device()} {info.get('device_name', '')}".strip()}), flush=True)
    for kind in args.models:
        for batch in args.batch:
            mx.random.seed(0)
            model = builders[kind]()
            model.eval()
            mx.eval(model.parameters())
            x = mx.random.uniform(shape=(batch, *SHAPES[kind]))
            y = mx.argmax(model(x), axis=-1)
            mx.eval(x, y)
            grad = mx.grad(lambda x: nn.losses.cross_entropy(model(x), y, reduction="sum"))
            fb = median_time(lambda: mx.eval(grad(x)), args.reps * 2)
            extra = {} if dtype is None else {"compute_dtype": dtype}
            robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=SHAPES[kind], num_classes=10, **extra)
            lp = model
            if dtype is not None:  # the plain loop's low-precision copy (the user's model stays float32)
                lp = builders[kind]()
                lp.eval()
                lp.update(tree_map(lambda a: a.astype(dtype), model.parameters()))
                mx.eval(lp.parameters())
            fwd = median_time(lambda: mx.eval(model(x)), args.reps * 2)
            for steps in args.steps:
                eps = EPS[kind]
                alpha = 2.5 * eps / steps
                attack = mr.PGD(eps=eps, steps=steps, step_size=alpha, random_start=False, early_stop=False)
                compiled, naive = plain_loops(lp, x, y, eps, alpha, steps, dtype)
                t_plain = median_time(compiled, args.reps)
                t_naive = median_time(naive, max(1, args.reps // 2))
                t = median_time(lambda: mx.eval(robust.attack(x, y, attack, key=mr.key(0)).x_adv), args.reps)
                print(json.dumps({"framework": "mlx", "model": kind, "batch": batch, "steps": steps,
                                  "fwd_bwd": fb, "attack": t, "plain": t_plain, "fwd": fwd, "naive": t_naive,
                                  "unroll": robust._fn.chosen_unroll((batch, *SHAPES[kind]))}), flush=True)
            mx.clear_cache()


# --- PyTorch ---------------------------------------------------------------------------------


def torch_models():
    import torch.nn as tnn
    import torch.nn.functional as F

    class MLP(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 256), tnn.ReLU(), tnn.Linear(256, 256),
                                      tnn.ReLU(), tnn.Linear(256, 10))

        def forward(self, x):
            return self.net(x)

    class CNN(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tnn.Sequential(
                tnn.Conv2d(1, 32, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Flatten(), tnn.Linear(64 * 7 * 7, 10))

        def forward(self, x):
            return self.net(x)

    class Block(tnn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.shortcut = tnn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                               tnn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))

    class ResNet18(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.bn1 = tnn.BatchNorm2d(64)
            blocks, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
                cin = cout
            self.blocks = tnn.Sequential(*blocks)
            self.linear = tnn.Linear(512, 10)

        def forward(self, x):
            x = self.blocks(F.relu(self.bn1(self.conv1(x))))
            return self.linear(x.mean(dim=(2, 3)))

    return {"mlp": MLP, "cnn": CNN, "resnet": ResNet18}


def run_torch(args) -> None:
    import torch
    import torch.nn.functional as F
    import torchattacks

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(json.dumps({"framework": "torch", "version": f"torch {torch.__version__}, torchattacks "
                      f"{torchattacks.__version__}", "device": f"{dev} {name}"}), flush=True)
    builders = torch_models()
    for kind in args.models:
        for batch in args.batch:
            torch.manual_seed(0)
            model = builders[kind]().to(dev).eval()
            h, w, c = SHAPES[kind]
            x = torch.rand(batch, c, h, w, device=dev)
            with torch.no_grad():
                y = model(x).argmax(-1)

            def fwd_bwd():
                xr = x.clone().requires_grad_(True)
                loss = F.cross_entropy(model(xr), y, reduction="sum")
                torch.autograd.grad(loss, xr)
                sync()

            fb = median_time(fwd_bwd, args.reps * 2)
            for steps in args.steps:
                eps = EPS[kind]
                atk = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=False)

                def attack():
                    atk(x, y)
                    sync()

                t = median_time(attack, args.reps)
                row = {"framework": "torch", "model": kind, "batch": batch, "steps": steps, "fwd_bwd": fb,
                       "attack": t}
                if args.autocast and dev.type == "cuda":
                    def attack_amp():
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            atk(x, y)
                        sync()

                    row["autocast"] = median_time(attack_amp, args.reps)
                print(json.dumps(row), flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


# --- driver ----------------------------------------------------------------------------------


def collect(framework: str, argv: list[str]) -> list[dict]:
    cmd = [sys.executable, __file__, "--framework", framework, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{framework} run failed (exit {proc.returncode})")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=["mlx", "torch"], help="run one framework (JSON lines)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 40])
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    parser.add_argument("--compute-dtype", choices=["bfloat16", "float16"], default=None,
                        help="MLX side: low-precision compute (plain loop on a cast copy, the library's compute_dtype)")
    parser.add_argument("--autocast", action="store_true", help="also time torchattacks under torch.autocast(bfloat16)")
    parser.add_argument("--no-fast-pool", action="store_true", help="turn off the library's max-pooling rewrite")
    args = parser.parse_args()
    if args.framework == "mlx":
        return run_mlx(args)
    if args.framework == "torch":
        return run_torch(args)

    argv = ["--models", *args.models, "--batch", *map(str, args.batch), "--steps", *map(str, args.steps),
            "--reps", str(args.reps)]
    argv += (["--compute-dtype", args.compute_dtype] if args.compute_dtype else [])
    argv += (["--autocast"] if args.autocast else []) + (["--no-fast-pool"] if args.no_fast_pool else [])
    results = {fw: collect(fw, argv) for fw in ("torch", "mlx")}
    for fw, rows in results.items():
        print(f"{fw}: {rows[0]['version']} on {rows[0]['device']}")
    print(f"PGD L-inf, no random start, every step run; median of {args.reps}; MLX compute dtype "
          f"{args.compute_dtype or 'float32'}; fast pooling {'off' if args.no_fast_pool else 'on'}\n")
    amp = " torchattacks autocast ms |" if args.autocast else ""
    print("| model | batch | PGD | torch fwd+bwd ms | MLX fwd+bwd ms | torchattacks ms |" + amp +
          " naive loop ms | plain compiled loop ms | plain+fwd ms | mlx-robust ms | lib / (plain+fwd) "
          "| torchattacks / mlx-robust | unroll |")
    print("|---" * (13 + bool(args.autocast)) + "|")
    key = lambda r: (r["model"], r["batch"], r["steps"])  # noqa: E731
    torch_rows = {key(r): r for r in results["torch"][1:]}
    for m in results["mlx"][1:]:
        t = torch_rows[key(m)]
        ms = lambda v: f"{v * 1e3:.1f}"  # noqa: E731
        bound = m["plain"] + m["fwd"]
        amp_col = f" {ms(t['autocast'])} |" if args.autocast else ""
        print(f"| {m['model']} | {m['batch']} | {m['steps']} | {t['fwd_bwd'] * 1e3:.2f} | {m['fwd_bwd'] * 1e3:.2f} "
              f"| {ms(t['attack'])} |{amp_col} {ms(m['naive'])} | {ms(m['plain'])} | {ms(bound)} | {ms(m['attack'])} "
              f"| {m['attack'] / bound:.2f} | {t['attack'] / m['attack']:.2f}x | {m['unroll']} |", flush=True)


if __name__ == "__main__":
    main()
