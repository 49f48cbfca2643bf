"""FLOPs per image and kernels per update of the Fashion-MNIST GPU study's variants, stacked and alone (CPU).

Run: python experiments/fashion-mnist-gpu-count.py   (prints one line per variant; see fashion-mnist-gpu.md)
"""
import time, torch
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode
from landscape.models import create_model
from landscape.trainers.stacked import StackedModel
torch.set_num_threads(1)
vit = dict(embed_dim=48, depth=6, num_heads=3, mlp_ratio=4.0, patch_size=7, img_size=28, class_token=False, global_pool="avg", num_classes=10, in_chans=1)
variants = {"baseline": ("vit_pico_patch4_32", vit), "grouped-g2": ("vit_pico_patch4_32_grouped_mlp", {**vit, "group_size": 2}),
 "shallow": ("vit_pico_patch4_32_shallow_mlp", {**vit, "width_ratio": 0.5, "mlp_init": "sliced"}),
 "mlit": ("mlit_xxs", dict(embed_dim=48, depth=6, num_heads=4, num_kv_heads=2, hidden_first=96, hidden_last=48, patch_size=7, img_size=28, class_token=False, global_pool="avg", num_classes=10, in_chans=1))}
class Count(TorchDispatchMode):
    def __init__(self): super().__init__(); self.n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__ not in ("detach", "_to_copy") : self.n += 1
        return func(*args, **(kwargs or {}))
K, B = 5, 32
for name, (model, kw) in variants.items():
    mods = []
    for k in range(K):
        torch.manual_seed(k); mods.append(create_model(model, **kw))
    x1 = torch.randn(B, 1, 28, 28); y1 = torch.randint(0, 10, (B,))
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(mods[0](x1), y1).backward()
    flops = fc.get_total_flops() / B
    nparams = sum(p.numel() for p in mods[0].parameters())
    x = torch.randn(K, B, 1, 28, 28); y = torch.randint(0, 10, (K, B))
    res = {}
    for strat in ("vmap", "loop"):
        if name == "mlit" and strat == "vmap": continue
        m = StackedModel(mods, None, strat)
        opt = torch.optim.AdamW(m.trainable(), lr=1e-3)
        def step():
            logits, aux = m(x); l = torch.func.vmap(torch.nn.functional.cross_entropy)(logits, y)
            (l + aux if aux is not None else l).sum().backward(); opt.step(); opt.zero_grad()
        step()
        c = Count()
        with c: step()
        t = time.perf_counter(); step(); dt = time.perf_counter() - t
        res[strat] = (c.n, dt)
    # one run alone: ops of one step
    o1 = torch.optim.AdamW(mods[0].parameters(), lr=1e-3)
    def s1():
        torch.nn.functional.cross_entropy(mods[0](x1), y1).backward(); o1.step(); o1.zero_grad()
    s1(); c = Count()
    with c: s1()
    print(f"{name}: params {nparams}, fwd+bwd FLOPs/image {flops/1e6:.2f} M, ops/step alone {c.n}, " +
          ", ".join(f"{s} K={K}: {n} ops, {dt*1e3:.0f} ms CPU (B={B})" for s, (n, dt) in res.items()))
