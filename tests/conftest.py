import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def data_dir() -> Path:
    """The folder with the official MNIST / Fashion-MNIST files; tests needing it skip when it is not set."""
    root = os.environ.get("LANDSCAPE_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("LANDSCAPE_DATA_DIR is not set to a folder with the official dataset files")
    return Path(root)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, a shared 2-core machine is oversubscribed by them,
    and the distributed and resume tests compare sums that must be formed in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- runs analysed by the real analyses, shared by the figures, report, compare and summary tests -----------------
TINY_VIT = dict(img_size=8, in_chans=1, num_classes=10, patch_size=4, embed_dim=8, depth=2, num_heads=2,
                mlp_ratio=2.0, class_token=False, global_pool="avg")
TINY_MLIT = dict(img_size=8, in_chans=1, num_classes=10, patch_size=4, embed_dim=8, depth=3, num_heads=2,
                 num_kv_heads=1, hidden_first=16, hidden_last=8, class_token=False, global_pool="avg")
STUDY_VARIANTS = [
    ("baseline", "vit_pico_patch4_32", TINY_VIT),
    ("grouped", "vit_pico_patch4_32_grouped_mlp", dict(TINY_VIT, group_size=2)),
    ("sliced", "vit_pico_patch4_32_shallow_mlp", dict(TINY_VIT, width_ratio=0.5, mlp_init="sliced")),
    ("random", "vit_pico_patch4_32_shallow_mlp", dict(TINY_VIT, width_ratio=0.5, mlp_init="random")),
    ("mlit", "mlit_xxs", TINY_MLIT),
]
STUDY_EPOCHS = (1, 2, 3)


def make_tiny_run(root: Path, name: str, model: str, kwargs: dict, seed: int):
    """A run of ``model`` on digits with a made-up training history and three checkpoints of random weights (the
    EMA weights a little off the raw ones): what the analyses need, in well under a second."""
    import numpy as np

    from landscape.analyses.stability import preconditioner_path, save_preconditioner
    from landscape.checkpoints import save_checkpoint
    from landscape.config import config_hash
    from landscape.models import create_model
    from landscape.runs import Run

    run = Run.create(root / f"{name}-s{seed}")
    config = {"model": {"name": model, "kwargs": kwargs}, "data": {"name": "digits"}, "seed": seed, "epochs": 3}
    run.save_config(config)
    rng = np.random.default_rng(seed + 10 * len(name))
    rows = []
    for epoch in STUDY_EPOCHS:
        top1 = float(90 - 60 * np.exp(-epoch) - 2 * (epoch == STUDY_EPOCHS[-1]) + rng.normal(0, 0.2))
        rows.append({"epoch": epoch, "step": 10 * epoch, "train_loss": float(np.exp(-epoch / 2)),
                     "val_loss": float(np.exp(-epoch / 2) + 0.05 * epoch), "val_top1": top1,
                     "ema_val_top1": top1 + 0.3})
        torch.manual_seed(1000 * seed + 10 * len(name) + epoch)
        state = create_model(model, **kwargs).state_dict()
        ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
        save_checkpoint(run.checkpoint_path(epoch=epoch), state, model=model, model_kwargs=kwargs, epoch=epoch,
                        step=10 * epoch, metrics=rows[-1], config_hash=config_hash(config), ema_state_dict=ema)
        second_moment = {k: 1e-4 * v.square() + 1e-8 for k, v in state.items() if v.is_floating_point()}
        save_preconditioner(preconditioner_path(run.root, f"epoch-{epoch:04d}"), second_moment, {
            "optimizer": "AdamW", "step": 10 * epoch, "lr": 1e-3 / epoch, "lr_uniform": True, "betas": [0.9, 0.999],
            "eps": 1e-8, "momentum": 0.0, "nesterov": False}, checkpoint_step=10 * epoch, config_hash=config_hash(config))
    run.write_metrics(rows)
    return run


def analyse_tiny_run(run, *, adaptive: bool = True) -> None:
    """Every analysis the study runs, with the real analysis functions at tiny settings: the Hessian's top
    eigenvalues and trace at every checkpoint (per parameter group too, the preconditioned sharpness from a made-up
    Adam state, the eigenvectors kept), its density and per-batch top eigenvalues at the last, plain and adaptive
    sharpness, the random 1D and 2D surfaces and the dynamics."""
    from landscape.analyses.dynamics import write_dynamics
    from landscape.analyses.hessian import HessianSettings, run_hessian_analysis
    from landscape.analyses.sharpness import SharpnessSettings, run_sharpness_analysis
    from landscape.analyses.surface import SurfaceSettings, run_surface_analysis

    common = dict(samples=16, seed=0)
    run_hessian_analysis(run, HessianSettings(top_k=2, tol=1e-2, trace=True, trace_matvecs=4, per_block=True,
                                              preconditioned=True, **common), device="cpu",
                         save_eigenvectors_to_disk=True)
    run_hessian_analysis(run, HessianSettings(top_k=0, density=True, density_probes=1, density_steps=4,
                                              density_grid_size=50, **common), checkpoints="last", device="cpu")
    run_hessian_analysis(run, HessianSettings(top_k=1, tol=1e-2, per_batch=8, **common), checkpoints="last",
                         device="cpu")
    plain = SharpnessSettings(rhos=(0.01, 0.05, 0.1), steps=1, draws=1, **common)
    run_sharpness_analysis(run, plain, checkpoints="last", device="cpu")
    if adaptive:
        run_sharpness_analysis(run, SharpnessSettings(rhos=(0.1, 0.5, 1.0), adaptive=True, steps=1, draws=1,
                                                      **common), checkpoints="last", device="cpu")
    for dims, points in ((1, 5), (2, 3)):
        run_surface_analysis(run, SurfaceSettings(directions="random", dims=dims, range=(-1.0, 1.0), points=points,
                                                  **common), checkpoints="last", device="cpu")
    write_dynamics(run)


@pytest.fixture(scope="session")
def analysed_study(tmp_path_factory) -> list[Path]:
    """Ten run directories (five variants x two seeds) analysed once per test session by the real analyses."""
    root = tmp_path_factory.mktemp("analysed-study")
    torch.set_num_threads(1)
    paths = []
    for name, model, kwargs in STUDY_VARIANTS:
        for seed in (0, 1):
            run = make_tiny_run(root, name, model, kwargs, seed)
            analyse_tiny_run(run)
            paths.append(run.root)
    return paths
