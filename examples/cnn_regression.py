"""Measure a small CNN trained for regression: the loss is any callable, here the mean squared error.

    python examples/cnn_regression.py

Trains a two-layer CNN for a few steps to predict each image's mean brightness, then measures the Hessian of the
MSE loss (in float64: small enough to be exact to many digits) and a 1D random slice.
"""

import torch
from torch import nn
from torch.nn.functional import mse_loss

import landscape as ls


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 1)).double()
    images = torch.rand(48, 1, 8, 8, dtype=torch.float64)
    targets = images.mean(dim=(1, 2, 3)).unsqueeze(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        optimizer.zero_grad()
        mse_loss(model(images), targets).backward()
        optimizer.step()

    hessian = ls.hessian(model, (images, targets), loss=mse_loss, top_k=3, which="both", tol=1e-6)
    print(f"MSE {float(hessian['loss']):.2e}; largest eigenvalues", hessian["eigenvalue_largest"].values.round(5),
          "smallest", hessian["eigenvalue_smallest"].values.round(6))
    surface = ls.surface(model, (images, targets), loss=mse_loss, dims=1, points=11, range=(-0.5, 0.5))
    print("MSE along a random direction:", surface["loss"].values.round(5))


if __name__ == "__main__":
    main()
