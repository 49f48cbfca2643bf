"""Warm-started eigensolves along a series of checkpoints: the same eigenvalues as cold starts and the dense
float64 answer, in fewer products; starts recorded; sharded chunks; the plan line."""

import copy

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from tiny_models import data, tiny_mlp

from landscape.curvature.loss import LossFunction
from landscape.analyses.distributed import sharded_rounds
from landscape.analyses.hessian import HessianSettings, WarmStart, describe_plan, hessian_analysis, run_hessian_analysis
from landscape.curvature.lanczos import CHECK_PRODUCTS, combined_start, ritz_start, start_block, top_eigenvalues
from landscape.curvature.products import dense_hessian

TOL = 1e-3


def close_series(count: int = 4, step: float = 1e-3):
    """The tiny MLP moved ``step`` (relative to each weight's size) further along one fixed random direction at each
    checkpoint: a dense series of close checkpoints."""
    model = tiny_mlp()
    x, y = data(24)
    generator = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) * p.detach().abs().mean()
                 for n, p in model.named_parameters()}
    series = []
    for _ in range(count):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(step * direction[n])
        series.append(copy.deepcopy(model))
    return series, x, y


@pytest.mark.slow
def test_warm_and_cold_starts_match_dense_eigh_and_warm_takes_fewer_products():
    series, x, y = close_series()
    settings = HessianSettings(top_k=3, tol=TOL, dtype="float64", batch_size=64, samples=24)
    warm = WarmStart()
    products = {"cold": [], "warm": []}
    for model in series:
        exact = np.linalg.eigvalsh(dense_hessian(LossFunction(model, x, y, batch_size=None)).numpy())[::-1][:3]
        for name, state in (("cold", None), ("warm", warm)):
            ds = hessian_analysis(model, x, y, settings, warm=state)
            found = ds["eigenvalue_largest"].values
            assert np.all(np.abs(found - exact) <= TOL * np.abs(exact)), (name, found, exact)
            assert int(ds["eigenvalue_missed"]) == 0 and int(ds["eigenvalue_converged"]) == 1
            products[name].append(int(ds["eigenvalue_matvecs"]))
    assert products["warm"][0] == products["cold"][0]  # nothing to start from at the first checkpoint
    assert sum(products["warm"][1:]) < sum(products["cold"][1:]), products


def test_a_warm_start_spanning_the_eigenvectors_converges_in_its_first_block():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    values = np.concatenate([[30.0, 20.0, 12.0, 9.0, 8.0], 0.2 * rng.standard_normal(75)])
    A = (Q * values) @ Q.T
    order = np.argsort(values)[::-1][:5]
    result = top_eigenvalues(A, 3, tol=1e-8, start=torch.from_numpy(Q[:, order].T.copy()))
    assert result.matvecs == 5 + CHECK_PRODUCTS and result.converged  # 3 wanted, 2 guards: one block, then the check
    assert np.allclose(result.eigenvalues, np.sort(values)[::-1][:3], rtol=1e-8)


def test_start_block_is_orthonormal_keeps_the_given_rows_and_replaces_dependent_ones():
    generator = torch.Generator().manual_seed(0)
    given = torch.randn(2, 30, dtype=torch.float64)
    given = torch.cat([given, given[:1] * 3.0])  # the third row depends on the first
    block = start_block(30, 5, generator, given)
    assert torch.allclose(block.T @ block, torch.eye(5, dtype=torch.float64), atol=1e-12)
    projector = block @ block.T
    assert torch.allclose(projector @ given.T, given.T, atol=1e-10)  # the given rows lie in its span


def test_contiguous_rounds_give_each_process_one_chunk_and_cover_every_checkpoint_once():
    items = list(range(7))
    rounds = sharded_rounds(items, 3, contiguous=True)
    assert [[r[p] for r in rounds if r[p] is not None] for p in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert sorted(i for r in rounds for i in r if i is not None) == items
    assert sharded_rounds(items, 3) == [[0, 1, 2], [3, 4, 5], [6]]


def make_close_run(root, count=3):
    """A run whose checkpoints are the tiny ViT nudged a little further each time (close, like a dense series)."""
    from landscape.checkpoints import save_checkpoint
    from landscape.config import save_yaml
    from landscape.models import create_model
    from landscape.runs import Run

    kwargs = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=8, depth=1, num_heads=2,
                  mlp_ratio=2)
    run = Run.create(root)
    save_yaml({"model": {"name": "vit_tiny_patch16_224", "kwargs": kwargs},
               "data": {"name": "digits", "img_size": 8}, "seed": 0}, run.config_path)
    torch.manual_seed(0)
    state = create_model("vit_tiny_patch16_224", **kwargs).state_dict()
    for epoch in range(1, count + 1):
        state = {k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
        save_checkpoint(run.checkpoint_path(epoch=epoch), state, model="vit_tiny_patch16_224", model_kwargs=kwargs,
                        epoch=epoch, step=5 * epoch)
    return run


def test_series_analysis_records_each_start_and_cold_agrees_within_tol(tmp_path):
    run = make_close_run(tmp_path / "run")
    settings = HessianSettings(top_k=2, tol=1e-4, samples=24, dtype="float64")
    planned = []
    warm = run_hessian_analysis(run, settings, on_plan=planned.append, warm_start=True)
    assert planned == [3]
    assert list(warm["eigenvalue_warm_start"].values) == [0, 1, 1]
    assert list(warm["eigenvalue_start_step"].values) == [-1, 5, 10]
    warm_values = warm["eigenvalue_largest"].values.copy()
    cold = run_hessian_analysis(run, settings, force=True, warm_start=False)
    assert list(cold["eigenvalue_warm_start"].values) == [0, 0, 0]
    assert list(cold["eigenvalue_start_step"].values) == [-1, -1, -1]
    assert np.all(np.abs(warm_values - cold["eigenvalue_largest"].values) <= 2e-4 * np.abs(warm_values))


def test_cli_prints_its_plan_before_the_table_and_cold_turns_warm_starts_off(tmp_path):
    from landscape.cli import cli

    run = make_close_run(tmp_path / "run", count=2)
    result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), "--samples", "16", "--top-k", "2",
                                      "--cold"])
    assert result.exit_code == 0, result.output
    plan = describe_plan(HessianSettings(top_k=2, samples=16), 2, warm_start=False)
    assert plan in result.output and result.output.index(plan) < result.output.index("lambda_max")
    with xr.open_dataset(run.analysis_path("hessian")) as ds:
        assert list(ds["eigenvalue_warm_start"].values) == [0, 0]


def test_the_plan_counts_one_trace_product_per_parameter_when_the_budget_passes_them(tmp_path):
    from landscape.cli import cli

    settings = HessianSettings(top_k=1, trace=True, trace_matvecs=500)
    assert describe_plan(settings, 1, parameters=10) == ("1 checkpoint x ~34 products (eigenvalues ~24, trace 10 "
                                                         "(exact: one per parameter))")
    assert describe_plan(settings, 1, parameters=5000) == "1 checkpoint x ~524 products (eigenvalues ~24, trace 500)"
    run = make_close_run(tmp_path / "run", count=1)
    result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), "--samples", "16", "--top-k", "1",
                                      "--trace", "--trace-matvecs", "500", "--params", "head.bias"])
    assert result.exit_code == 0, result.output
    assert "trace 10 (exact: one per parameter)" in result.output
    written = list(run.analysis_dir.glob("hessian*.nc"))  # named for the parameters measured
    assert len(written) == 1
    with xr.open_dataset(written[0]) as ds:
        assert int(ds["trace_matvecs"][0]) == 10 and float(ds["trace_standard_error"][0]) == 0.0
        assert ds["trace"].attrs["method"] == "exact"


def test_more_eigenvalues_than_parameters_are_refused_before_the_plan(tmp_path):
    from landscape.cli import cli

    run = make_close_run(tmp_path / "run", count=2)
    selected = "head.bias"  # the model's classes: 10 parameters
    for top_k, which, message in ((11, "largest", "Cannot find 11 eigenvalues of a 10 x 10 operator"),
                                  (6, "both", "Cannot find the 6 largest and the 6 smallest eigenvalues of a 10 x 10")):
        result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), "--samples", "16", "--top-k",
                                          str(top_k), "--which", which, "--params", selected])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "products" not in result.output  # no plan for what is refused
    assert not list(run.analysis_dir.glob("*.nc"))
    result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), "--samples", "16", "--top-k", "5",
                                      "--which", "both", "--params", selected, "--checkpoints", "last"])
    assert result.exit_code == 0, result.output  # exactly as many as there are


def test_plan_counts_the_first_checkpoint_cold_and_the_rest_warm():
    settings = HessianSettings(top_k=5, trace=True, trace_matvecs=9)
    assert describe_plan(settings, 1) == "1 checkpoint x ~49 products (eigenvalues ~40, trace 9)"  # 4k + 12 + 8
    line = describe_plan(settings, 10, warm_start=True)
    assert line.startswith("10 checkpoints x ~") and "~36 warm-started" in line  # 0.9 of a cold start's 40
    per_checkpoint = int(line.split("~")[1].split()[0])
    assert per_checkpoint == round((40 + 9 * 36) / 10 + 9)
    assert describe_plan(settings, 10, warm_start=False) == "10 checkpoints x ~49 products (eigenvalues ~40, trace 9)"


def test_plan_and_table_count_the_runs_beside_the_main_eigensolve():
    # per-block, preconditioned and per-batch top eigenvalues were left out: a plan of 163 ran to 298 products
    import xarray as xr

    from landscape.analyses.hessian import hessian_summary

    settings = HessianSettings(top_k=1, trace=True, trace_matvecs=10, per_block=True, preconditioned=True,
                               per_batch=8, samples=16)
    assert describe_plan(settings, 1, groups=9) == ("1 checkpoint x ~322 products (eigenvalues ~24, trace 10, "
                                                    "per-block 9 x ~24, preconditioned 1 x ~24, per-batch 2 x ~24)")
    ds = xr.Dataset({"loss": (("checkpoint",), [1.0]), "epoch": (("checkpoint",), [1.0]), "step": (("checkpoint",), [5]),
                     "seconds": (("checkpoint",), [1.0]), "eigenvalue_matvecs": (("checkpoint",), [20]),
                     "trace_matvecs": (("checkpoint",), [10]), "per_batch_matvecs": (("checkpoint",), [40]),
                     "block_eigenvalue_matvecs": (("checkpoint", "group"), [[15, 25, 30]]),
                     "preconditioned_matvecs": (("checkpoint",), [22])}, coords={"checkpoint": ["epoch-0001"]})
    assert hessian_summary(ds)[0]["HVPs"] == 20 + 10 + 40 + 70 + 22


def test_combined_start_is_a_unit_vector_with_equal_weight_on_each_orthonormal_row():
    rows = torch.linalg.qr(torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).Q.T
    v = combined_start(torch.cat([rows, 2.0 * rows[:1]]), 40)[0]  # a dependent row adds nothing
    assert v.shape == (40,) and abs(float(v.norm()) - 1.0) < 1e-12
    weights = rows @ v
    assert torch.allclose(weights.abs(), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-12)  # 1 / sqrt(4)


def _nearby_operators():
    """A dense symmetric matrix with separated top eigenvalues and the same matrix nudged, eigenvectors rotated."""
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    values = np.concatenate([[40.0, 25.0, 18.0, 12.0, 9.0, 7.0], rng.uniform(-1.0, 2.0, 114)])
    A = (Q * values) @ Q.T
    E = rng.standard_normal((120, 120))
    return A, A + 0.05 * (E + E.T) / 2


def test_warm_starts_single_and_block_match_dense_eigh_and_the_single_vector_saves_products():
    A, B = _nearby_operators()
    exact = np.linalg.eigvalsh(B)[::-1][:3]
    previous = top_eigenvalues(A, 3, tol=1e-10, seed=0, return_basis=True)
    start = ritz_start(previous, 3)
    cold = top_eigenvalues(B, 3, tol=TOL, seed=0)
    single = top_eigenvalues(B, 3, tol=TOL, seed=0, start=start)
    block = top_eigenvalues(B, 3, tol=TOL, seed=0, start=start, block_size=5)
    for result in (cold, single, block):
        assert result.converged
        assert np.all(np.abs(result.eigenvalues - exact) <= TOL * np.abs(exact)), result.eigenvalues
    assert single.matvecs < cold.matvecs, (single.matvecs, cold.matvecs)
    assert (block.matvecs - CHECK_PRODUCTS) % 5 == 0  # whole blocks of the five Ritz vectors' width, then the check
