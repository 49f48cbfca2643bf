"""Per-block curvature, the preconditioned sharpness and the top subspace, each against a dense float64 answer."""

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from landscape.analyses.blocks import group_indices, parameter_groups
from landscape.curvature.trace import deflated_group_traces
from landscape.curvature.loss import LossFunction
from landscape.curvature.operators import HessianOperator
from landscape.analyses.hessian import HessianSettings, hessian_analysis
from landscape.curvature.lanczos import top_eigenvalues
from landscape.curvature.trace import deflated_trace
from landscape.analyses.stability import (Preconditioner, edge_of_stability_data, load_preconditioner,
                                          optimizer_preconditioner, save_preconditioner, stability_threshold)
from landscape.analyses.subspace import gradient_subspace_fraction, subspace_overlap
from landscape.curvature.products import dense_hessian
from tiny_models import data, tiny_mlp, tiny_vit


def tiny_grouped_vit() -> torch.nn.Module:
    torch.manual_seed(3)
    import landscape.models  # noqa: F401  (registers the variants)

    return timm.create_model("vit_pico_patch4_32_grouped_mlp", img_size=8, patch_size=4, in_chans=1, num_classes=3,
                             embed_dim=4, depth=2, num_heads=1, mlp_ratio=1, group_size=2).double()


def dense_blocks(model):
    x, y = data(10)
    loss = LossFunction(model, x, y)
    H = dense_hessian(loss)
    groups = parameter_groups(model, loss.names)
    return loss, H, groups, group_indices(loss.shapes, groups)


def test_parameter_groups_partition_the_parameters_and_count_a_shared_mlp_once():
    model = tiny_grouped_vit()
    x, y = data(4)
    loss = LossFunction(model, x, y)
    groups = parameter_groups(model, loss.names)
    indices = group_indices(loss.shapes, groups)
    assert "blocks.0+1.mlp" in groups and "blocks.1.mlp" not in groups and "blocks.0.mlp" not in groups
    assert list(groups) == ["patch_embed", "blocks.0.attn", "blocks.0+1.mlp", "blocks.1.attn", "norms", "head"]
    covered = torch.sort(torch.cat(list(indices.values()))).values
    assert torch.equal(covered, torch.arange(loss.num_parameters))  # every parameter in exactly one group


def test_layer_scale_goes_with_the_branch_it_scales():
    # timm's ls1.gamma and ls2.gamma fell into an "other" group of their own
    import timm

    from landscape.analyses.blocks import parameter_groups

    model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, num_classes=3,
                              embed_dim=8, depth=2, num_heads=2, init_values=0.1)
    groups = parameter_groups(model, [n for n, _ in model.named_parameters()])
    assert "other" not in groups
    assert {"blocks.0.ls1.gamma", "blocks.0.attn.qkv.weight"} <= set(groups["blocks.0.attn"])
    assert {"blocks.1.ls2.gamma", "blocks.1.mlp.fc1.weight"} <= set(groups["blocks.1.mlp"])


@pytest.mark.parametrize("make", [tiny_vit, tiny_grouped_vit])
def test_block_eigenvalues_and_traces_match_the_dense_hessian_blocks(make):
    model = make()
    loss, H, groups, indices = dense_blocks(model)
    x, y = data(10)
    settings = HessianSettings(top_k=2, trace=True, per_block=True, samples=10, dtype="float64", tol=1e-8,
                               trace_matvecs=64)
    ds = hessian_analysis(model, x, y, settings)
    assert list(ds["group"].values) == list(groups)
    for g, i in indices.items():
        block = H[i][:, i]
        top = float(torch.linalg.eigvalsh(block).max())
        assert float(ds["block_eigenvalue_largest"].sel(group=g)) == pytest.approx(top, rel=1e-6, abs=1e-9)
        exact = float(block.trace())
        estimate = float(ds["block_trace"].sel(group=g))
        se = float(ds["block_trace_standard_error"].sel(group=g))
        assert abs(estimate - exact) <= 5 * se + 1e-9 * abs(exact) + 1e-12
        assert int(ds["group_num_parameters"].sel(group=g)) == len(i)
    # the group traces split the whole-model estimate exactly, sample by sample
    assert float(ds["block_trace"].sum()) == pytest.approx(float(ds["trace"]), rel=1e-10)
    assert ds["block_trace"].attrs["units"] == ds["block_eigenvalue_largest"].attrs["units"] == "nats per squared weight"


def _dense_problem(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([50.0, 30.0, 20.0]), torch.randn(n - 3, generator=g, dtype=torch.float64)])
    A = Q @ torch.diag(values) @ Q.T
    perm = torch.randperm(n, generator=g)
    indices = {"a": perm[:10], "b": perm[10:25], "c": perm[25:]}
    return A, indices


def test_group_traces_are_exact_when_the_basis_spans_the_space():
    A, indices = _dense_problem(12)
    indices = {"a": torch.arange(0, 5), "b": torch.arange(5, 12)}
    result = top_eigenvalues(A, 3, basis_size=12, return_basis=True, tol=1e-12)
    assert len(result.basis) == 12
    whole, estimates, errors = deflated_group_traces(A, indices, 10, basis=result.basis,
                                                     basis_matrix=result.basis_matrix)
    for j, i in enumerate(indices.values()):
        assert estimates[j] == pytest.approx(float(A[i][:, i].trace()), abs=1e-9)
    assert whole.estimate == pytest.approx(float(A.trace()), abs=1e-9)


def test_group_traces_share_the_whole_trace_probes_and_are_unbiased():
    A, indices = _dense_problem(600)  # a budget under the dimension: random probes (at or over it, unit vectors)
    result = top_eigenvalues(A, 2, tol=1e-3, return_basis=True, seed=1)
    assert len(result.basis) < len(A)
    whole, estimates, errors = deflated_group_traces(A, indices, 500, basis=result.basis,
                                                     basis_matrix=result.basis_matrix, seed=7, block_size=16)
    reference = deflated_trace(A, result.basis, 500, basis_trace=result.basis_trace, seed=7, block_size=16)
    assert whole.method == reference.method == "deflated" and errors.min() > 0
    assert whole.estimate == pytest.approx(reference.estimate, rel=1e-12)  # the same products, number for number
    assert whole.matvecs == reference.matvecs
    for j, i in enumerate(indices.values()):
        exact = float(A[i][:, i].trace())
        assert abs(estimates[j] - exact) <= 4.5 * errors[j]
    assert float(np.sum(estimates)) == pytest.approx(whole.estimate, rel=1e-10)


def test_group_traces_have_the_exact_expectation(monkeypatch):
    # probes sqrt(n) e_1 ... sqrt(n) e_n have E[z z^T] = I exactly over the n of them, so each group's mean is the
    # estimator's expectation: with the cross term counted twice it was off by tr(P_g Pi A R) (50.33 for 50.74)
    import landscape.curvature.trace as trace

    A, indices = _dense_problem(60, seed=3)
    n = len(A)
    result = top_eigenvalues(A, 2, tol=0.1, return_basis=True, seed=1)
    assert len(result.basis) < n
    columns = iter(range(n))

    def unit_probes(size, count, generator, *, distribution="rademacher", dtype=torch.float32):
        picked = [next(columns) for _ in range(count)]
        return math.sqrt(size) * torch.eye(size, dtype=dtype)[:, picked]

    monkeypatch.setattr(trace, "random_probes", unit_probes)
    whole, estimates, _ = deflated_group_traces(A, indices, n, basis=result.basis, basis_matrix=result.basis_matrix,
                                                block_size=7)
    for j, i in enumerate(indices.values()):
        assert estimates[j] == pytest.approx(float(A[i][:, i].trace()), rel=1e-10, abs=1e-10)
    assert whole.estimate == pytest.approx(float(A.trace()), rel=1e-10)


def test_plain_hutchinson_group_traces_without_a_basis():
    A, indices = _dense_problem(600, seed=2)
    whole, estimates, errors = deflated_group_traces(A, indices, 500, seed=3)
    assert whole.method == "hutchinson" and errors.min() > 0
    for j, i in enumerate(indices.values()):
        assert abs(estimates[j] - float(A[i][:, i].trace())) <= 4.5 * errors[j]


@pytest.mark.parametrize("deflate", [False, True])
def test_group_traces_are_exact_when_the_budget_covers_every_parameter(deflate):
    # unit vectors instead of random probes: n products give every group's trace exactly, standard errors 0
    A, indices = _dense_problem(seed=4)
    n = len(A)
    basis = top_eigenvalues(A, 2, tol=1e-3, return_basis=True, seed=1) if deflate else None
    options = dict(basis=basis.basis, basis_matrix=basis.basis_matrix) if deflate else {}
    whole, estimates, errors = deflated_group_traces(A, indices, n + 5, block_size=7, **options)
    assert whole.method == "exact" and whole.matvecs == n and whole.standard_error == 0.0
    assert whole.estimate == pytest.approx(float(A.trace()), rel=1e-10)
    for j, i in enumerate(indices.values()):
        assert estimates[j] == pytest.approx(float(A[i][:, i].trace()), rel=1e-10, abs=1e-10)
    assert not errors.any()
    below, _, below_errors = deflated_group_traces(A, indices, n - 1, seed=3, **options)
    assert below.method != "exact" and below.matvecs == n - 1 and below_errors.min() > 0


# -- the edge of stability -----------------------------------------------------------------------------------------
def _adam_state(loss, seed=0, step=10):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g, dtype=torch.float64) * 1e-3 for n, s in loss.shapes.items()}


def test_preconditioned_sharpness_matches_the_dense_preconditioned_hessian():
    model = tiny_mlp()
    x, y = data(10)
    loss = LossFunction(model, x, y)
    H = dense_hessian(loss)
    v = _adam_state(loss)
    pre = Preconditioner(exp_avg_sq=v, optimizer="AdamW", step=7, lr=2e-3, betas=(0.9, 0.99), eps=1e-6)
    P = torch.cat([((1 - 0.9 ** 7) * ((v[n] / (1 - 0.99 ** 7)).sqrt() + 1e-6)).reshape(-1) for n in loss.names])
    dense = torch.diag(P.rsqrt()) @ H @ torch.diag(P.rsqrt())
    expected = float(torch.linalg.eigvalsh(dense).max())
    assert expected == pytest.approx(float(torch.linalg.eigvals(torch.diag(1 / P) @ H).real.max()), rel=1e-8)
    out = edge_of_stability_data(HessianOperator(loss), loss.shapes, pre, tol=1e-9, seed=0)
    assert out["preconditioned_sharpness"][1] == pytest.approx(expected, rel=1e-7)
    assert out["stability_threshold"][1] == pytest.approx(38 / 2e-3)


def test_stability_thresholds_of_sgd_and_adam():
    adam = Preconditioner({}, "AdamW", 5, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    assert stability_threshold(adam)[0] == pytest.approx(3800.0)
    assert stability_threshold(Preconditioner({}, "SGD", 5, lr=0.1))[0] == pytest.approx(20.0)
    assert stability_threshold(Preconditioner({}, "SGD", 5, lr=0.1, momentum=0.9))[0] == pytest.approx(38.0)
    assert stability_threshold(Preconditioner({}, "SGD", 5, lr=0.1, momentum=0.9, nesterov=True))[0] == \
        pytest.approx(3.8 / 0.28)


def test_saved_adamw_preconditioner_reproduces_the_update_it_took(tmp_path):
    """The stated conventions are AdamW's: its last update equals -lr P^-1 m with P from the saved state."""
    model = tiny_mlp()
    x, y = data(10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0)
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    tensors, meta = optimizer_preconditioner(model, opt)
    save_preconditioner(tmp_path / "p.safetensors", tensors, meta, checkpoint_step=4, config_hash="h")
    pre = load_preconditioner(tmp_path / "p.safetensors")
    assert (pre.step, pre.lr, pre.betas, pre.eps) == (4, 1e-2, (0.8, 0.95), 1e-3)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    scale = pre.inverse_sqrt_diagonal(shapes)
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()]).double()
    update = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in model.named_parameters()]).double()
    assert torch.allclose(update, -1e-2 * scale ** 2 * m, rtol=1e-4, atol=1e-9)


def test_an_optimizer_without_a_step_count_records_the_trainers_updates():
    # SGD keeps no "step" in its state: the saved preconditioner said optimizer step 0 after 44 updates
    model = tiny_mlp()
    x, y = data(10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    tensors, meta = optimizer_preconditioner(model, opt, updates=3)
    assert tensors == {} and meta["step"] == 3 and meta["nesterov"] and meta["momentum"] == 0.9
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    adam.step()
    assert optimizer_preconditioner(model, adam, updates=99)[1]["step"] == 1  # its own count wins


# -- the top subspace ----------------------------------------------------------------------------------------------
def test_subspace_overlap_and_gradient_fraction_match_dense_eigenvectors():
    x, y = data(10)
    first = tiny_vit()
    second = tiny_vit()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.05 * torch.randn_like(p))
    settings = HessianSettings(top_k=3, samples=10, dtype="float64", tol=1e-10)
    k = 3
    dense_vectors, lanczos_vectors = [], []
    for model in (first, second):
        ds, vectors, _ = hessian_analysis(model, x, y, settings, return_eigenvectors=True)
        loss = LossFunction(model, x, y)
        values, U = torch.linalg.eigh(dense_hessian(loss))
        top = U[:, -k:].T
        dense_vectors.append(top)
        lanczos_vectors.append(vectors["largest"])
        g = loss.gradient()
        expected = float((top @ g).square().sum() / g.square().sum())
        assert float(ds["gradient_top_subspace_fraction"]) == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert gradient_subspace_fraction(g, top) == pytest.approx(expected, rel=1e-12)
    expected = float((dense_vectors[0] @ dense_vectors[1].T).square().sum()) / k
    assert subspace_overlap(*lanczos_vectors) == pytest.approx(expected, rel=1e-6)
    assert subspace_overlap(dense_vectors[0], dense_vectors[0]) == pytest.approx(1.0)
    assert 0.0 <= expected < 1.0


# -- from the trainer to the figures and the report ----------------------------------------------------------------
def test_preconditioned_on_a_run_without_saved_preconditioner_is_one_sentence(tmp_path):
    from click.testing import CliRunner

    from landscape.cli import cli
    from tiny_models import tiny_run

    run = tiny_run(tmp_path / "run")
    result = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), "--samples", "8", "--top-k", "1",
                                      "--preconditioned", "--device", "cpu"])
    assert result.exit_code != 0
    assert "save_preconditioner=true" in result.output and "Traceback" not in result.output
    refused = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), "--samples", "8", "--top-k", "0",
                                       "--trace", "--per-block", "--device", "cpu"])
    assert refused.exit_code != 0 and "--per-block" in refused.output and "Traceback" not in refused.output


@pytest.mark.slow
def test_trained_run_gives_block_curvature_edge_of_stability_and_subspace_results(tmp_path):
    from click.testing import CliRunner

    from landscape.analyses.stability import load_preconditioner, preconditioner_path
    from landscape.cli import cli
    from landscape.figures import write_figures
    from landscape.report import curvature_through_training_blocks
    from landscape.summary import load_results
    from landscape.trainers import build_config, train

    config = build_config("digits", overrides=[
        "epochs=2", "data.train_size=64", "batch_size=32", "model.kwargs.depth=1", "model.kwargs.embed_dim=8",
        "save_preconditioner=true", "checkpoint.initial=true"])
    result = train(config, tmp_path / "run", progress=False)
    run = result.run
    names = [p.stem for p in result.checkpoints]
    assert names == ["epoch-0000", "epoch-0001", "epoch-0002"]
    assert load_preconditioner(preconditioner_path(run.root, "epoch-0000")).exp_avg_sq == {}  # before any update
    saved = load_preconditioner(preconditioner_path(run.root, "epoch-0002"))
    assert saved.step == 4 and saved.betas is not None and saved.exp_avg_sq
    out = CliRunner().invoke(cli, ["analyze", "hessian", str(run.root), "--samples", "16", "--top-k", "2", "--trace",
                                   "--tol", "1e-2", "--per-block", "--preconditioned",
                                   "--save-eigenvectors", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    results = load_results([run.root])
    ds = results[0].hessian
    assert "blocks.0.mlp" in list(ds["group"].values)
    assert np.isnan(ds["preconditioned_sharpness"].values[0]) and np.isfinite(ds["preconditioned_sharpness"].values[1:]).all()
    assert ds["stability_threshold"].values[-1] == pytest.approx(38 / saved.lr)
    overlap = ds["top_subspace_overlap"].values
    assert np.isnan(overlap[0]) and ((overlap[1:] >= 0) & (overlap[1:] <= 1 + 1e-9)).all()
    written = write_figures(results, tmp_path / "figures", formats=("png",),
                            names=["block_curvature", "edge_of_stability", "subspace_dynamics"])
    assert set(written) == {"block_curvature", "edge_of_stability", "subspace_dynamics"}
    text = " ".join(str(b) for b in curvature_through_training_blocks(results))
    assert "Where the curvature sits" in text and "Edge of stability" in text and "top subspace" in text


def test_study_analysis_switches_and_the_preconditioner_they_need(tmp_path):
    from landscape.errors import ConfigError
    from landscape.study import check_study, load_study

    demo_file = Path(__file__).parents[1] / "landscape" / "studies" / "demo-digits.yaml"
    demo = load_study(demo_file)  # the demo keeps them off (time) but saves what they need
    assert not (demo.analysis.per_block or demo.analysis.preconditioned or demo.analysis.subspace)
    assert demo.overrides["save_preconditioner"] is True
    text = demo_file.read_text()
    for switch in ("per_block", "preconditioned", "subspace"):
        text = text.replace(f"  {switch}: false", f"  {switch}: true")
    switched = tmp_path / "switched.yaml"
    switched.write_text(text)
    on = load_study(switched)
    assert on.analysis.per_block and on.analysis.preconditioned and on.analysis.subspace
    check_study(on)
    broken = tmp_path / "study.yaml"
    broken.write_text(text.replace("  save_preconditioner: true", "  save_preconditioner: false"))
    with pytest.raises(ConfigError, match="save_preconditioner: true"):
        check_study(load_study(broken))


def test_the_keep_policy_removes_the_optimizer_state_saved_beside_each_deleted_checkpoint(tmp_path):
    from landscape.trainers import build_config, train

    config = build_config("digits", overrides=[
        "epochs=3", "data.train_size=64", "batch_size=32", "model.kwargs.depth=1", "model.kwargs.embed_dim=8",
        "save_preconditioner=true", "checkpoint.keep=last:2"])
    result = train(config, tmp_path / "run", progress=False)
    kept = sorted(p.stem for p in (tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    beside = sorted(p.stem for p in (tmp_path / "run" / "preconditioner").glob("*.safetensors"))
    assert kept == ["epoch-0002", "epoch-0003"] and [p.stem for p in result.checkpoints][-2:] == kept
    assert beside == kept
