"""Measure a Hugging Face ViTForImageClassification: dict inputs (pixel_values=) and outputs with .logits.

    python examples/huggingface_vit.py

A tiny config built locally (nothing is downloaded); needs `pip install transformers`.
"""

import torch
from transformers import ViTConfig, ViTForImageClassification

import landscape as ls


def main() -> None:
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=5)
    model = ViTForImageClassification(config)
    pixel_values, labels = torch.randn(32, 3, 16, 16), torch.randint(0, 5, (32,))
    # batches as a Hugging Face data collator makes them: the inputs by keyword, the targets under "labels"
    batches = [{"pixel_values": pixel_values[i:i + 16], "labels": labels[i:i + 16]} for i in range(0, 32, 16)]

    hessian = ls.hessian(model, batches, top_k=2, params="*attention*")
    print(f"attention Hessian over {int(hessian['num_parameters'])} parameters: top eigenvalues",
          hessian["eigenvalue_largest"].values.round(3))
    sharpness = ls.sharpness(model, batches, rho=0.05, steps=3, draws=2)
    print(f"loss {float(sharpness['loss']):.3f}, worst-case sharpness at rho 0.05: "
          f"{float(sharpness['worst_case'][0]):.4f}")


if __name__ == "__main__":
    main()
