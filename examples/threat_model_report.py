"""Measure every claim of docs/threat-model.md on the embedded digits, in one run.

    python examples/threat_model_report.py              # ~5-10 min on a 2-core CPU
    python examples/threat_model_report.py --quick      # fewer images and epochs

Prints Markdown sections: the undefended model under FGSM/PGD/APGD/C&W; adversarial training;
input noise judged without and with EOT; defensive distillation under PGD-CE vs margin/C&W;
randomized smoothing's certified accuracy; what input validation does and does not stop; and the
numerical-stability checks (gradients at the bounds, float16 vs float32, softmax saturation).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlx_robust as mr
from mlx_robust.defences.distillation import defensive_distillation
from mlx_robust.training import accuracy, fit


def cnn() -> nn.Module:
    return mr.models.SmallCNN(image_size=8, channels=(16, 32))


def wrap(model, **kw):
    return mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10, **kw)


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t_start = time.perf_counter()
    n_test = 120 if args.quick else 360
    epochs = 8 if args.quick else 15
    at_epochs = 5 if args.quick else 15

    mx.random.seed(args.seed)
    xt, yt = mr.datasets.load_digits("train")
    x, y = mr.datasets.load_digits("test")
    x, y = x[:n_test], y[:n_test]
    key = mr.key(args.seed)
    print(f"# Threat-model measurements (mlx-robust {mr.__version__}, {mx.default_device()}, "
          f"digits test images: {n_test}, seed {args.seed})")

    # 1. Undefended model.
    section("1. Undefended model")
    base = fit(cnn(), xt, yt, epochs=epochs, seed=args.seed)
    robust = wrap(base)
    rep = mr.evaluate(robust, x, y, attacks=["fgsm", "pgd", "apgd-ce", "apgd-t"], eps=[0.05, 0.1, 0.2],
                      key=key, progress=False)
    print(rep.to_markdown().split("\n\n| attack |")[0])
    cw = robust.attack(x, y, mr.CW(), key=key)
    norms = np.array(cw.norms)[np.array(cw.success)]
    print(f"\nC&W L2: broke {cw.success_rate:.1%} of the images; median L2 of its perturbations "
          f"{np.median(norms):.3f} (an 8x8 image has L2 norm up to 8)")

    # 2. Adversarial training.
    section("2. Adversarial training (PGD-AT, Madry et al. 2018) at L-inf eps 0.2")
    at = cnn()
    mr.train(at, xt, yt, epochs=at_epochs, method="pgd-at", attack=mr.PGD(eps=0.2, steps=7),
             learning_rate=3e-3, progress=False, seed=args.seed)
    at.eval()
    r_at = wrap(at)
    rows = []
    for name, model in (("standard", base), ("PGD-AT", at)):
        rr = wrap(model)
        pgd = rr.attack(x, y, mr.PGD(eps=0.2, steps=20), key=key).robust_accuracy
        apgd = rr.attack(x, y, mr.APGDT(eps=0.2, steps=50, n_target_classes=3), key=key).robust_accuracy
        rows.append(f"| {name} | {accuracy(model, x, y):.1%} | {pgd:.1%} | {apgd:.1%} |")
    print("| training | clean | PGD-20 (eps 0.2) | APGD-T-50 (eps 0.2) |\n|---|---|---|---|")
    print("\n".join(rows))
    del r_at

    # 3. Input noise: the false sense of security of a plain attack.
    section("3. Input-noise defence (std 0.25): plain PGD vs PGD with EOT")
    noisy = wrap(base, noise=mr.GaussianNoise(0.25))
    lines = []
    for eot in (1, 16):
        r = mr.evaluate(noisy, x, y, attacks=[mr.PGD(eps=0.1, steps=20, eot_samples=eot)], eps=[0.1], key=key,
                        progress=False, checks=False)
        lines.append(f"| PGD-20, {'no EOT (one draw per step)' if eot == 1 else 'EOT-16'} | "
                     f"{r.clean_accuracy:.1%} | {r.robust_accuracy(0.1):.1%} |")
    print("| attack on the noisy model (eps 0.1) | clean | robust accuracy (judged on fresh draws) |")
    print("|---|---|---|\n" + "\n".join(lines))

    # 4. Defensive distillation.
    section("4. Defensive distillation (Papernot et al. 2016) at T=100")
    student = defensive_distillation(cnn(), cnn(), xt, yt, temperature=100.0, epochs=epochs,
                                     seed=args.seed)
    student.eval()
    rs = wrap(student)
    ce = rs.attack(x, y, mr.PGD(eps=0.1, steps=40, loss="ce"), key=key).robust_accuracy
    margin = rs.attack(x, y, mr.PGD(eps=0.1, steps=40, loss="margin"), key=key).robust_accuracy
    cw_s = rs.attack(x, y, mr.CW(), key=key)
    print("| attack on the distilled model | robust accuracy (eps 0.1 L-inf) |\n|---|---|")
    print(f"| clean | {accuracy(student, x, y):.1%} |\n| PGD-40, cross-entropy | {ce:.1%} |\n"
          f"| PGD-40, margin (C&W loss) | {margin:.1%} |")
    print(f"\nC&W L2 on the distilled model: broke {cw_s.success_rate:.1%} of the images.")

    # 5. Randomized smoothing.
    section("5. Randomized smoothing (Cohen et al. 2019), model trained with noise")
    smooth_model = fit(cnn(), xt, yt, epochs=epochs, seed=args.seed, noise_std=0.25)
    sm = wrap(smooth_model, smoothing=mr.Smoothing(sigma=0.25, n0=100, n=1000, alpha=0.001))
    cert = mr.certified_accuracy(sm, x, y, [0.0, 0.25, 0.5], key=key, progress=False)
    print("| radius (L2) | 0 | 0.25 | 0.5 | abstain |\n|---|---|---|---|---|")
    print("| certified accuracy (sigma 0.25, n 1000, alpha 0.001) | "
          + " | ".join(f"{a:.1%}" for a in cert.accuracy) + f" | {cert.abstain_rate:.1%} |")

    # 6. Input validation.
    section("6. Input validation: malformed inputs, not adversarial ones")
    bad = np.array(x)
    bad[0, 0, 0, 0] = np.nan
    bad[1, 2, 2, 0] = 7.0
    caught = []
    for name, batch in (("NaN pixel", bad[:1]), ("value 7 in a [0, 1] model", bad[1:2])):
        try:
            robust(batch)
            caught.append(f"| {name} | accepted |")
        except ValueError as exc:
            caught.append(f"| {name} | rejected: {str(exc)[:70]}... |")
    adv = robust.attack(x, y, mr.PGD(eps=0.1, steps=20), key=key)
    _, report = robust.validate(adv.x_adv)
    caught.append(f"| PGD adversarial examples (eps 0.1) | all {report.num_samples} pass validation "
                  f"(ok={report.ok}); {adv.success_rate:.1%} of them fool the model |")
    print("| input | validation |\n|---|---|\n" + "\n".join(caught))

    # 7. Numerical stability.
    section("7. Numerical stability")
    corner = mx.ones_like(x)
    g = mx.grad(lambda z: nn.losses.cross_entropy(base(z), y, reduction="sum"))(corner)
    half = cnn()
    half.update(base.parameters())
    half.set_dtype(mx.float16)
    diff = float(mx.max(mx.abs(half(x.astype(mx.float16)).astype(mx.float32) - base(x))).item())
    agree = float(mx.mean(mx.argmax(half(x.astype(mx.float16)), -1) == mx.argmax(base(x), -1)).item())

    class Scaled(nn.Module):
        def __init__(self, inner, scale):
            super().__init__()
            self.inner, self.scale = inner, scale

        def __call__(self, z):
            return self.inner(z) * self.scale

    hot = wrap(Scaled(base, 1e4))
    ce_hot = hot.attack(x, y, mr.PGD(eps=0.1, steps=20, loss="ce"), key=key).robust_accuracy
    m_hot = hot.attack(x, y, mr.PGD(eps=0.1, steps=20, loss="margin"), key=key).robust_accuracy
    m_base = robust.attack(x, y, mr.PGD(eps=0.1, steps=20, loss="margin"), key=key).robust_accuracy
    print(f"- input gradients at the upper bound (all pixels 1): finite = {bool(mx.all(mx.isfinite(g)))}")
    print(f"- float16 vs float32 model: max |logit difference| {diff:.3f}, same prediction on {agree:.1%}")
    print(f"- logits x 1e4 (saturated softmax): PGD-20 with CE leaves {ce_hot:.1%} robust accuracy, with the "
          f"margin loss {m_hot:.1%} (unscaled model, margin loss: {m_base:.1%})")
    print(f"\n_total {time.perf_counter() - t_start:.0f} s_")


if __name__ == "__main__":
    main()
