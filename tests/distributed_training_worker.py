"""One rank of tests/test_distributed_training.py (run under ``mlx.launch``), or the single-process
reference when run directly. Writes this rank's parameters after training to OUT/rank{r}.safetensors.

    mlx.launch -n 2 --backend ring -- python tests/distributed_training_worker.py OUT
"""

from __future__ import annotations

import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

import mlx_robust as mr
from mlx_robust.distributed import data_parallel, shard

GLOBAL_BATCH = 32
STEPS = 4


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def make_model() -> nn.Module:
    mx.random.seed(7)
    model = mr.models.MLP(64, hidden=(32,), num_classes=10)
    mx.eval(model.parameters())
    return model


def run(out: str) -> None:
    group = mx.distributed.init()
    x, y = mr.datasets.load_digits("train")
    # No random start: the single-process reference attacks the same samples identically.
    attack = mr.PGD(eps=0.1, steps=3, random_start=False)

    # 1. A hand-written loop: shard, attack the shard, average gradients (compiled update).
    model = make_model()
    optimizer = optim.SGD(learning_rate=0.5)
    optimizer.init(model.trainable_parameters())
    loss_and_grad = data_parallel(mr.adversarial_value_and_grad(model, loss_fn, attack=attack), group)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(xb, xa, yb):
        loss, grads = loss_and_grad.value_and_grad(model, xb, xa, yb)
        optimizer.update(model, grads)
        return loss

    for i in range(STEPS):
        xb, yb = shard(x[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH], group), shard(
            y[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH], group
        )
        xa = loss_and_grad.perturb(model, xb, yb, key=mr.key(i))
        step(xb, xa, yb)
        mx.eval(state)

    # 2. mr.train(distributed=True) on a small subset (one epoch of full batches).
    model2 = make_model()
    mr.train(
        model2, x[: 4 * GLOBAL_BATCH], y[: 4 * GLOBAL_BATCH], epochs=1, batch_size=GLOBAL_BATCH, attack=attack,
        optimizer=optim.SGD(learning_rate=0.5), progress=False, distributed=group.size() > 1, seed=3,
    )

    arrays = {f"loop/{k}": v for k, v in tree_flatten(model.parameters())}
    arrays.update({f"train/{k}": v for k, v in tree_flatten(model2.parameters())})
    mx.save_safetensors(f"{out}/rank{group.rank()}.safetensors", arrays, metadata={"size": str(group.size())})


if __name__ == "__main__":
    run(sys.argv[1])
