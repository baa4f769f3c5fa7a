"""ADP's step size alpha and one ADP chain (T=10) with the EBM field (scaled and raw) and the DSM
score net, on the first 256 Fashion-MNIST test images (numbers in fmnist_ebm.md).

    PYTHONPATH=src python experiments/results/fmnist_ebm_check.py ARTIFACTS_DIR
"""

import sys

import torch

from advpure.config.compose import compose as C
from advpure.data import ImageDataModule
from advpure.nets import make_score_net, score_arch
from advpure.nets.ebm import load_energy_field
from advpure.nets.weights import load_weights
from advpure.purify.adp import adp_chain, screen, step_size
from advpure.training.losses import psnr

art = sys.argv[1]
cfg = C.load("fmnist", [f"paths.artifacts={art}"])
dm = ImageDataModule(cfg.data, cfg.paths)
dm.setup()
x = dm.test_x[:256].float() / 255
ebm = load_energy_field(cfg.ebm.weights)
fields = {"EBM c*(-grad E)": ebm, "EBM raw -grad E": load_energy_field(cfg.ebm.weights)}
fields["EBM raw -grad E"].scale = 1.0
arch = score_arch(cfg, dm.spec)
dsm = make_score_net(arch)
load_weights(cfg.score.weights, "score", arch, dsm)
fields["DSM f"] = dsm.eval().requires_grad_(False)
print(f"field scale c = {ebm.scale:.4g}")
for sigma in (0.1, 0.25):
    x0 = screen(x, sigma, torch.randn(x.shape, generator=torch.Generator().manual_seed(123)))
    for name, f in fields.items():
        with torch.no_grad():
            g = f(x0)
            a = step_size(g, f(x0 + 1e-3 * g), 0.05, 1e-3)
            out = adp_chain(x0, f, lam=0.05, delta=1e-3, tau=1e-3, steps=10)
        q = [f"{v:.3g}" for v in torch.quantile(a, torch.tensor([0.1, 0.5, 0.9])).tolist()]
        print(
            f"sigma {sigma} {name:16s} median ||g|| {g.flatten(1).norm(dim=1).median():6.3g}  alpha q10/50/90 {q}"
            f"  at 1e-1 clamp {(a >= 0.1).float().mean():.2f}  <= tau {(a <= 1e-3).float().mean():.2f}"
            f"  PSNR {psnr(x0, x).mean():.2f} -> {psnr(out.x, x).mean():.2f} dB"
        )
