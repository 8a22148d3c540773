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

and, to show what bounds each framework, each model's own forward+backward (gradient w.r.t. the
input) at that batch. Both frameworks run in float32 with their default kernel settings (PyTorch:
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


def run_mlx(args) -> None:
    import mlx.core as mx
    import mlx.nn as nn

    import mlx_robust as mr

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
            robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=SHAPES[kind], num_classes=10)
            for steps in args.steps:
                eps = EPS[kind]
                attack = mr.PGD(eps=eps, steps=steps, step_size=2.5 * eps / steps, random_start=False,
                                early_stop=False)
                t = median_time(lambda: mx.eval(robust.attack(x, y, attack, key=mr.key(0)).x_adv), args.reps)
                print(json.dumps({"framework": "mlx", "model": kind, "batch": batch, "steps": steps,
                                  "fwd_bwd": fb, "attack": t,
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
                print(json.dumps({"framework": "torch", "model": kind, "batch": batch, "steps": steps,
                                  "fwd_bwd": fb, "attack": t}), flush=True)
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
    args = parser.parse_args()
    if args.framework == "mlx":
        return run_mlx(args)
    if args.framework == "torch":
        return run_torch(args)

    argv = ["--models", *args.models, "--batch", *map(str, args.batch), "--steps", *map(str, args.steps),
            "--reps", str(args.reps)]
    results = {fw: collect(fw, argv) for fw in ("torch", "mlx")}
    for fw, rows in results.items():
        print(f"{fw}: {rows[0]['version']} on {rows[0]['device']}")
    print(f"PGD L-inf, no random start, every step run; median of {args.reps}\n")
    print("| model | batch | PGD | torch fwd+bwd ms | MLX fwd+bwd ms | torchattacks ms | mlx-robust ms "
          "| speedup (torchattacks / mlx-robust) | unroll |")
    print("|---|---|---|---|---|---|---|---|---|")
    key = lambda r: (r["model"], r["batch"], r["steps"])  # noqa: E731
    torch_rows = {key(r): r for r in results["torch"][1:]}
    for m in results["mlx"][1:]:
        t = torch_rows[key(m)]
        print(f"| {m['model']} | {m['batch']} | {m['steps']} | {t['fwd_bwd'] * 1e3:.2f} | {m['fwd_bwd'] * 1e3:.2f} "
              f"| {t['attack'] * 1e3:.1f} | {m['attack'] * 1e3:.1f} | {t['attack'] / m['attack']:.2f}x "
              f"| {m['unroll']} |", flush=True)


if __name__ == "__main__":
    main()
