"""Measure a timm Vision Transformer made from scratch: Hessian, sharpness and a 2D surface in three calls.

    python examples/timm_vit.py [--out figures.png]

Runs in seconds on a CPU: a one-block ViT of width 16 on 32 random 16x16 images.
"""

import argparse

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import landscape as ls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Also draw the surface into this image file.")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=3, num_classes=10,
                              embed_dim=16, depth=1, num_heads=2, mlp_ratio=2)
    images, labels = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)

    hessian = ls.hessian(model, loader, top_k=3, trace=True, trace_matvecs=12)
    print("top eigenvalues:", hessian["eigenvalue_largest"].values.round(3),
          f"trace {float(hessian['trace']):.3g} ± {float(hessian['trace_standard_error']):.2g}")

    sharpness = ls.sharpness(model, loader, rho=[0.01, 0.05], steps=3, draws=2, m=16)
    print("worst-case sharpness:", sharpness["worst_case"].values.round(4),
          "m-sharpness:", sharpness["m_sharpness"].values.round(4))

    surface = ls.surface(model, loader, dims=2, points=5)
    print(f"surface: loss {float(surface['loss'].min()):.3f} to {float(surface['loss'].max()):.3f} on a "
          f"{surface.sizes['a']}x{surface.sizes['b']} grid")
    if args.out:
        ls.figure("surface_2d", ls.results(surface, label="ViT")).savefig(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
