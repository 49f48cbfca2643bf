from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from landscape.analyses.evaluation import analysis_data_for_run
from landscape.curvature.loss import LossFunction
from landscape.analyses.surface import (
    SurfaceSettings,
    load_directions,
    normalization_policies,
    run_surface_analysis,
    surface_analysis,
    trajectory_pca,
)
from landscape.curvature.directions import (
    barrier,
    combine,
    filter_normalize,
    grid_axes,
    qkv_head_counts,
    random_directions,
)
from landscape.checkpoints import build_model, load_checkpoint, save_checkpoint
from landscape.cli import cli
from landscape.errors import LandscapeError
from landscape.models import create_model
from landscape.runs import Run

MODEL = "vit_tiny_patch16_224"
KWARGS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2)
SAMPLES = 48


def _make_run(root, seed, epochs=4):
    """A run on the embedded digits data whose checkpoints drift randomly away from a seeded init."""
    run = Run.create(root)
    run.save_config({"model": {"name": MODEL, "kwargs": KWARGS}, "data": {"name": "digits", "img_size": 8},
                     "seed": seed})
    torch.manual_seed(seed)
    model = create_model(MODEL, **KWARGS)
    for epoch in range(1, epochs + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_checkpoint(run.checkpoint_path(epoch=epoch), model.state_dict(), model=MODEL, model_kwargs=KWARGS,
                        epoch=epoch, step=10 * epoch)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("surface")
    return {name: _make_run(root / name, seed) for name, seed in (("a", 0), ("b", 1), ("c", 2))}


def _checkpoint_evaluation(run, info, x, y):
    """Loss and top-1 of a checkpoint loaded into its own model: the reference every slice must reproduce."""
    _, state = load_checkpoint(info.path)
    return LossFunction(build_model(info, state), x, y, skip_unused=False).evaluate()


# -- directions ---------------------------------------------------------------------------------------------------
def test_filter_normalisation_gives_each_filter_the_norm_of_its_weights():
    model = create_model(MODEL, **KWARGS)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    raw = random_directions(weights, 1, seed=3)[0]
    heads = qkv_head_counts(model)
    assert heads == {"blocks.0.attn.qkv.weight": 2, "blocks.1.attn.qkv.weight": 2}
    d = filter_normalize(raw, weights, qkv_heads=heads)

    def row_norms(t, rows):
        return torch.linalg.vector_norm(t.reshape(rows, -1), dim=1)

    for name in ("blocks.0.mlp.fc1.weight", "head.weight", "patch_embed.proj.weight", "blocks.1.attn.proj.weight"):
        rows = weights[name].shape[0]
        torch.testing.assert_close(row_norms(d[name], rows), row_norms(weights[name], rows), rtol=1e-5, atol=0)
    qkv = "blocks.0.attn.qkv.weight"  # (3 * heads * head_dim, D): six blocks of 8 rows, one per q/k/v and head
    torch.testing.assert_close(row_norms(d[qkv], 6), row_norms(weights[qkv], 6), rtol=1e-5, atol=0)
    assert not torch.allclose(row_norms(d[qkv], 48), row_norms(weights[qkv], 48), rtol=1e-2)
    by_row = filter_normalize(raw, weights, qkv_heads=heads, qkv="row")
    torch.testing.assert_close(row_norms(by_row[qkv], 48), row_norms(weights[qkv], 48), rtol=1e-5, atol=0)
    for name, tokens in (("pos_embed", 17), ("cls_token", 1)):  # one filter per token
        torch.testing.assert_close(row_norms(d[name], tokens), row_norms(weights[name], tokens), rtol=1e-5, atol=0)
    for name in ("blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"):
        assert torch.count_nonzero(d[name]) == 0  # Li et al.: 1-D parameters stay put
    whole = filter_normalize(raw, weights, qkv_heads=heads, one_dim="filter")
    norm = "blocks.0.norm1.weight"
    assert float(whole[norm].norm()) == pytest.approx(float(weights[norm].norm()), rel=1e-5)
    assert torch.allclose(whole[norm] / whole[norm].norm(), raw[norm] / raw[norm].norm(), atol=1e-6)


def test_li_et_al_treatments_of_token_tables_and_one_dim_tensors_are_available():
    model = create_model(MODEL, **KWARGS)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    raw = random_directions(weights, 1, seed=4)[0]
    theirs = filter_normalize(raw, weights, qkv_heads=qkv_head_counts(model), tokens="tensor", one_dim="weight")
    for name in ("pos_embed", "cls_token"):  # one filter for the whole (1, N, D) tensor: direction parallel to raw
        assert float(theirs[name].norm()) == pytest.approx(float(weights[name].norm()), rel=1e-5)
        assert torch.allclose(theirs[name] / theirs[name].norm(), raw[name] / raw[name].norm(), atol=1e-6)
    tokens = torch.linalg.vector_norm(theirs["pos_embed"].reshape(17, -1), dim=1)
    assert not torch.allclose(tokens, torch.linalg.vector_norm(weights["pos_embed"].reshape(17, -1), dim=1), rtol=1e-2)
    for name in ("blocks.0.norm1.weight", "head.bias"):  # their code's default: d = w on 1-D tensors
        assert torch.equal(theirs[name], weights[name])


def test_surface_results_attrs_name_every_normalisation_policy(runs):
    a = runs["b"]
    settings = SurfaceSettings(directions="random", dims=1, points=3, samples=SAMPLES, seed=2, qkv="row",
                               tokens="tensor", one_dim="weight")
    ds = run_surface_analysis(a, settings, checkpoints="last")
    on_disk = xr.open_dataset(next(a.analysis_dir.glob("surface-random*1d*.nc")), engine="h5netcdf")
    try:
        for attrs in (ds.attrs, on_disk.attrs):
            policies = {k: v for k, v in attrs.items() if k.startswith("normalization_")}
            assert set(policies) == {"normalization_weights", "normalization_qkv", "normalization_tokens",
                                     "normalization_one_dim", "normalization_applies_to"}
            assert "per row, as Li et al." in policies["normalization_qkv"]
            assert "whole (1, N, D) tensor, as Li et al." in policies["normalization_tokens"]
            assert "d = w, as Li et al.'s code" in policies["normalization_one_dim"]
            assert "output row" in policies["normalization_weights"]
            assert policies["normalization_applies_to"] == "random directions only"
    finally:
        on_disk.close()
    default = normalization_policies(SurfaceSettings())
    assert "per head" in default["normalization_qkv"] and "--qkv row" in default["normalization_qkv"]
    assert "per token" in default["normalization_tokens"] and "--tokens tensor" in default["normalization_tokens"]
    assert "zero" in default["normalization_one_dim"] and "--xignore biasbn" in default["normalization_one_dim"]


def test_random_directions_are_reproducible_from_the_seed():
    weights = {"w": torch.zeros(3, 4), "b": torch.zeros(3)}
    first, second = random_directions(weights, 2, seed=5), random_directions(weights, 2, seed=5)
    assert all(torch.equal(first[k][n], second[k][n]) for k in range(2) for n in weights)
    assert not torch.equal(first[0]["w"], first[1]["w"])
    assert not torch.equal(random_directions(weights, 1, seed=6)[0]["w"], first[0]["w"])


def test_trajectory_pca_matches_a_dense_svd(tmp_path):
    model = create_model(MODEL, **KWARGS)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    drift = {n: torch.randn(t.shape, generator=gen) for n, t in base.items()}
    paths = []
    for i in range(6):
        state = {n: t + 0.3 * i * drift[n] + 0.05 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        paths.append(save_checkpoint(tmp_path / f"c{i}.safetensors", state, model=MODEL, model_kwargs=KWARGS, step=i))
    shapes = {n: tuple(t.shape) for n, t in base.items()}
    # a tiny slice budget forces the streaming path through many row chunks of every parameter
    pca = trajectory_pca(paths, shapes, count=2, max_elements=64, dtype=torch.float64)

    dense = np.stack([np.concatenate([load_checkpoint(p)[1][n].double().reshape(-1).numpy() for n in shapes])
                      for p in paths])
    differences = dense[:-1] - dense[-1]
    _, s, vt = np.linalg.svd(differences - differences.mean(0), full_matrices=False)
    np.testing.assert_allclose(pca.explained_variance, s[:2] ** 2 / (s ** 2).sum(), rtol=1e-9)
    for k in range(2):
        v = np.concatenate([pca.directions[k][n].reshape(-1).numpy() for n in shapes]) / pca.scales[k]
        assert abs(v @ vt[k]) == pytest.approx(1.0, rel=1e-9)  # the same unit direction, up to sign
        np.testing.assert_allclose(pca.coordinates[:, k] * pca.scales[k], (dense - dense[-1]) @ v, atol=1e-9)
    assert np.abs(pca.coordinates).max() == pytest.approx(1.0)
    with pytest.raises(LandscapeError, match="at least 4 checkpoints"):
        trajectory_pca(paths[:3], shapes, count=2)


# -- grids ----------------------------------------------------------------------------------------------------------
def test_grid_axes_hold_the_checkpoint_coordinates_exactly():
    axis = grid_axes((-0.5, 1.5), 51, anchors=(0.0, 1.0))  # step 0.04: 0.5 / 0.04 is not an integer
    assert 0.0 in axis and 1.0 in axis and len(axis) == 53 and np.all(np.diff(axis) > 0)
    axis = grid_axes((-1.0, 1.0), 51)
    assert len(axis) == 51 and axis[25] == 0.0


def test_barrier_of_a_known_curve():
    axis = np.array([-0.5, 0.0, 0.25, 0.5, 1.0, 1.5])
    values = np.array([9.0, 1.0, 2.0, 4.0, 3.0, 9.0])  # outside [0, 1] does not count
    assert barrier(values, axis) == 2.0
    assert np.isnan(barrier(values[:3], axis[:3]))


def test_combine_is_exact_at_basis_points_and_fresh_everywhere():
    gen = torch.Generator().manual_seed(0)
    w0, w1 = {"w": torch.randn(5, generator=gen)}, {"w": torch.randn(5, generator=gen)}
    assert torch.equal(combine([w0, w1], [0.0, 1.0])["w"], w1["w"])
    assert torch.equal(combine([w0, w1], [1.0, 0.0])["w"], w0["w"])
    mid = combine([w0, w1], [0.5, 0.5])["w"]
    torch.testing.assert_close(mid, 0.5 * (w0["w"] + w1["w"]))
    before = w0["w"].clone()
    combine([w0, w1], [1.0, 0.3])
    assert torch.equal(w0["w"], before)  # the bases are never modified


def test_grid_points_equal_the_model_loaded_with_w0_plus_a_d1_plus_b_d2():
    torch.manual_seed(0)
    model = create_model(MODEL, **KWARGS).double()
    x, y = torch.randn(20, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (20,))
    closure = LossFunction(model, x, y, batch_size=8, skip_unused=False)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    d1, d2 = (filter_normalize(d, w0, qkv_heads=qkv_head_counts(model)) for d in random_directions(w0, 2, seed=1))
    axes = [np.array([-1.0, 0.0, 0.5]), np.array([0.0, 2.0])]
    ds = surface_analysis(closure, w0, [d1, d2], "random", axes)
    assert ds["loss"].dims == ("a", "b") and ds["loss"].shape == (3, 2)
    probe = create_model(MODEL, **KWARGS).double()
    for a in axes[0]:
        for b in axes[1]:
            probe.load_state_dict({n: w0[n] + a * d1[n] + b * d2[n] for n in w0})
            loss, top1 = LossFunction(probe, x, y, batch_size=8, skip_unused=False).evaluate()
            assert float(ds["loss"].sel(a=a, b=b)) == pytest.approx(loss, rel=1e-12, abs=1e-12)
            assert float(ds["top1"].sel(a=a, b=b)) == top1
    assert float(ds["loss"].sel(a=0.0, b=0.0)) == closure.evaluate()[0]  # the centre, bit for bit
    backwards = surface_analysis(closure, w0, [d1, d2], "random", [axes[0][::-1], axes[1][::-1]])
    np.testing.assert_array_equal(backwards["loss"].values[::-1, ::-1], ds["loss"].values)  # no drift


# -- runs -----------------------------------------------------------------------------------------------------------
def test_interpolation_endpoints_reproduce_each_checkpoints_own_evaluation_exactly(runs):
    a, b = runs["a"], runs["b"]
    settings = SurfaceSettings(directions=f"interpolate:{b.root}@3", points=5, samples=SAMPLES)
    ds = run_surface_analysis(a, settings, checkpoints="epochs:2,4")
    assert ds["loss"].dims == ("checkpoint", "a") and list(ds["a"].values) == [0.0, 0.25, 0.5, 0.75, 1.0]
    x, y = analysis_data_for_run(a, SAMPLES)
    end = _checkpoint_evaluation(b, b.select_checkpoints("epochs:3")[0], x, y)
    for info in a.select_checkpoints("epochs:2,4"):
        start = _checkpoint_evaluation(a, info, x, y)
        entry = ds.sel(checkpoint=info.name)
        assert float(entry["loss"].sel(a=0.0)) == start[0] and float(entry["top1"].sel(a=0.0)) == start[1]
        assert float(entry["loss"].sel(a=1.0)) == end[0] and float(entry["top1"].sel(a=1.0)) == end[1]
        curve = entry["loss"].values
        assert float(entry["loss_barrier"]) == pytest.approx(curve.max() - 0.5 * (curve[0] + curve[-1]))
    assert (a.analysis_dir / "surface-interpolate-b@3-1d.nc").exists()


def test_targets_of_one_name_in_two_folders_get_files_of_their_own_that_survive_a_move(tmp_path):
    # studyA/b and studyB/b both named the file surface-interpolate-b-1d.nc: the second was refused, and the
    # --force the refusal advised replaced the first's results
    from landscape.analyses.surface import parse_directions

    for folder in ("here", "studyA/b", "studyB/b", "here/b"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    run = tmp_path / "here" / "a"
    names = {where: parse_directions(f"interpolate:{tmp_path / where}@3").slug(run)
             for where in ("here/b", "studyA/b", "studyB/b")}
    assert names["here/b"] == "interpolate-b@3"  # a run beside the one analysed keeps its plain name
    assert len(set(names.values())) == 3 and all(n.startswith("interpolate-b_") for n in list(names.values())[1:])
    import shutil

    other = tmp_path.parent / (tmp_path.name + "-moved")  # the whole tree copied elsewhere: the same names
    shutil.copytree(tmp_path, other)
    assert parse_directions(f"interpolate:{other / 'studyA/b'}@3").slug(other / "here" / "a") == names["studyA/b"]


def test_a_line_continues_after_both_runs_move_and_is_named_by_its_target(tmp_path):
    # the settings recorded the target by its absolute path: after the runs folder moved, continuing the line
    # (one more checkpoint) was refused as "computed with other settings"
    import shutil

    from landscape.summary import load_run

    a, b = _make_run(tmp_path / "runs" / "a", 0, epochs=2), _make_run(tmp_path / "runs" / "b", 1, epochs=2)
    settings = SurfaceSettings(directions=f"interpolate:{b.root}@2", points=3, samples=SAMPLES)
    first = run_surface_analysis(a, settings, checkpoints="epochs:1")
    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(str(tmp_path / "runs"), str(moved))
    a2 = Run(moved / "a")
    continued = run_surface_analysis(a2, SurfaceSettings(directions=f"interpolate:{moved / 'b'}@2", points=3,
                                                         samples=SAMPLES), checkpoints="all")
    assert list(continued["checkpoint"].values) == ["epoch-0001", "epoch-0002"]
    np.testing.assert_array_equal(continued["loss"].isel(checkpoint=0).values, first["loss"].isel(checkpoint=0).values)
    (path,) = a2.analysis_dir.glob("surface-interpolate*.nc")
    with xr.open_dataset(path) as ds:
        assert str(tmp_path) not in ds.attrs["settings"]
    assert list(load_run(a2.root).surfaces) == ["surface-interpolate-b@epoch-0002-1d"]
    # the same weights saved again (a resume rewrites the checkpoint it stopped after; its header's timings differ)
    target = moved / "b" / "checkpoints" / "epoch-0002.safetensors"
    save_checkpoint(target, load_checkpoint(target)[1], model=MODEL, model_kwargs=KWARGS, epoch=2, step=20,
                    metrics={"wall_time": 12.5})
    run_surface_analysis(a2, SurfaceSettings(directions=f"interpolate:{moved / 'b'}@2", points=3, samples=SAMPLES),
                         checkpoints="all")
    # another run at the target's path (retrained in place, or moved there) is another line, not a continuation
    shutil.rmtree(moved / "b")
    _make_run(moved / "b", 7, epochs=2)
    with pytest.raises(LandscapeError, match=r"computed with other settings \(target_weights_sha256 "):
        run_surface_analysis(a2, SurfaceSettings(directions=f"interpolate:{moved / 'b'}@2", points=3,
                                                 samples=SAMPLES), checkpoints="all", force=False)


def test_plane_passes_through_the_three_checkpoints_exactly(runs):
    a, b, c = runs["a"], runs["b"], runs["c"]
    settings = SurfaceSettings(directions=f"plane:{b.root},{c.root}", points=3, samples=SAMPLES)
    ds = run_surface_analysis(a, settings, checkpoints="last").isel(checkpoint=0)
    assert list(ds["a"].values) == [-0.5, 0.0, 0.5, 1.0, 1.5]  # 0 and 1 inserted into the 3-point grid
    x, y = analysis_data_for_run(a, SAMPLES)
    for run, at in ((a, dict(a=0.0, b=0.0)), (b, dict(a=1.0, b=0.0)), (c, dict(a=0.0, b=1.0))):
        assert float(ds["loss"].sel(at)) == _checkpoint_evaluation(run, run.checkpoints()[-1], x, y)[0]
    states = [load_checkpoint(run.checkpoints()[-1].path)[1] for run in (a, b, c)]
    names = [n for n, _ in build_model(a.checkpoints()[-1]).named_parameters()]
    u, v = (torch.cat([(s[n] - states[0][n]).double().reshape(-1) for n in names]) for s in states[1:])
    assert float(ds["axis_cosine"]) == pytest.approx(float(u @ v / (u.norm() * v.norm())), rel=1e-6)


def test_a_line_to_itself_and_a_plane_of_one_line_are_refused_before_the_grid(runs, tmp_path):
    # they were saved as results: a line of length 0 (barrier 0) and a "plane" with axis cosine 1
    from landscape.errors import LandscapeError

    import shutil

    a, b = runs["a"], runs["b"]
    last = a.checkpoints()[-1]
    before = sorted(a.analysis_dir.glob("*.nc"))
    copy = tmp_path / "copy"  # the same weights in another file: only the weights tell
    shutil.copytree(a.root, copy, ignore=shutil.ignore_patterns("analysis", ".lock"))
    for directions, message in ((f"interpolate:{copy}", r"The line's target 1 has the very weights of the "
                                                        r"checkpoint it starts from"),
                                (f"plane:{b.root}@3,{b.root}@3", r"The plane's two targets lie on one line through "
                                                                 r"the checkpoint \(cosine 1\.000000\)")):
        settings = SurfaceSettings(directions=directions, points=3, samples=SAMPLES)
        with pytest.raises(LandscapeError, match=message):
            run_surface_analysis(a, settings, checkpoints=f"epochs:{last.epoch}")
    # a target among the checkpoints to measure is refused before the first of them, not after all before it
    settings = SurfaceSettings(directions=f"interpolate:{a.root}", points=3, samples=SAMPLES)
    with pytest.raises(LandscapeError, match=rf"The line's target .*{last.path.name} is the checkpoint {last.name} to "
                                             r"be measured, so its slice there would be one point"):
        run_surface_analysis(a, settings, checkpoints="all")
    assert sorted(a.analysis_dir.glob("*.nc")) == before


def test_random_directions_are_saved_once_and_reused_by_later_checkpoints(runs):
    a = runs["a"]
    settings = SurfaceSettings(directions="random", dims=1, points=3, samples=SAMPLES, seed=7)
    run_surface_analysis(a, settings, checkpoints="last")
    path = a.analysis_dir / "directions" / "random-seed7.safetensors"
    saved, meta = load_directions(path)
    assert meta["seed"] == 7 and len(saved) == 2
    model = create_model(MODEL, **KWARGS)
    expected = random_directions({n: p for n, p in model.named_parameters()}, 2, seed=7)
    assert all(torch.equal(saved[k][n], expected[k][n]) for k in range(2) for n in expected[0])
    stamp = path.stat().st_mtime_ns
    first = run_surface_analysis(a, settings, checkpoints="last")["seconds"].values.copy()
    ds = run_surface_analysis(a, settings, checkpoints="all")  # resumes: only the three new checkpoints run
    assert path.stat().st_mtime_ns == stamp
    assert ds.sizes["checkpoint"] == 4 and float(ds["seconds"].isel(checkpoint=-1)) == first[0]
    x, y = analysis_data_for_run(a, SAMPLES, seed=7)  # the seed chooses the evaluation set too
    for info in a.checkpoints():  # every slice is centred on its own checkpoint
        assert float(ds["loss"].sel(checkpoint=info.name, a=0.0)) == _checkpoint_evaluation(a, info, x, y)[0]


def test_pca_directions_record_the_projected_trajectory(runs):
    a = runs["a"]
    ds = run_surface_analysis(a, SurfaceSettings(directions="pca", points=3, samples=SAMPLES), checkpoints="last")
    assert ds["trajectory_coordinates"].dims == ("checkpoint", "trajectory", "axis")
    coords = ds["trajectory_coordinates"].isel(checkpoint=0).values
    np.testing.assert_array_equal(coords[-1], [0.0, 0.0])  # the centre is the last checkpoint
    assert np.abs(coords).max() == pytest.approx(1.0)
    assert 0.0 < float(ds["explained_variance"].sum()) <= 1.0 + 1e-9


def test_eigen_directions_are_the_saved_unit_hessian_eigenvectors(runs):
    from landscape.analyses.hessian import HessianSettings, run_hessian_analysis

    c = runs["c"]
    hessian = run_hessian_analysis(c, HessianSettings(top_k=2, samples=SAMPLES, tol=1e-4), checkpoints="last",
                                   save_eigenvectors_to_disk=True)
    ds = run_surface_analysis(c, SurfaceSettings(directions="eigen", dims=2, points=3, samples=SAMPLES),
                              checkpoints="last").isel(checkpoint=0)
    np.testing.assert_allclose(ds["direction_norm"].values, [1.0, 1.0], rtol=1e-5)
    np.testing.assert_array_equal(ds["eigenvalue"].values, hessian["eigenvalue_largest"].isel(checkpoint=-1).values)
    x, y = analysis_data_for_run(c, SAMPLES)
    assert float(ds["loss"].sel(a=0.0, b=0.0)) == _checkpoint_evaluation(c, c.checkpoints()[-1], x, y)[0]


@pytest.mark.slow
def test_eigenvectors_of_other_weights_and_matrices_live_apart_and_a_surface_takes_its_own(tmp_path):
    import shutil

    from conftest import make_tiny_run

    from landscape.analyses.eigenvectors import eigenvectors_path, load_eigenvectors
    from landscape.analyses.hessian import HessianSettings, run_hessian_analysis

    tiny = dict(img_size=8, in_chans=1, num_classes=10, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                mlp_ratio=2.0, class_token=False, global_pool="avg")
    run = make_tiny_run(tmp_path, "baseline", "vit_pico_patch4_32", tiny, 0)  # its EMA weights differ from the raw
    common = dict(top_k=2, samples=16, tol=1e-4)
    found = {}
    for weights, matrix in (("raw", "hessian"), ("ema", "hessian"), ("raw", "ggn")):
        ds = run_hessian_analysis(run, HessianSettings(weights=weights, matrix=matrix, **common), checkpoints="last",
                                  save_eigenvectors_to_disk=True)
        found[weights, matrix] = ds["eigenvalue_largest"].isel(checkpoint=-1).values
    folders = sorted(p.name for p in run.analysis_dir.iterdir() if p.is_dir())
    assert folders == ["hessian-eigenvectors", "hessian-ema-eigenvectors", "hessian-ggn-eigenvectors"]
    for weights in ("raw", "ema"):  # each surface runs along its own weights' Hessian eigenvectors
        ds = run_surface_analysis(run, SurfaceSettings(directions="eigen", dims=1, points=3, samples=16,
                                                       weights=weights), checkpoints="last").isel(checkpoint=0)
        np.testing.assert_array_equal(ds["eigenvalue"].values, found[weights, "hessian"][:1])
    assert not np.allclose(found["raw", "hessian"], found["ema", "hessian"])

    # a file an older version wrote into the plain folder for the EMA weights is refused, not used as the raw's
    plain = eigenvectors_path(run, "epoch-0003")
    shutil.copy(eigenvectors_path(run, "epoch-0003", {"weights": "ema"}), plain)
    assert load_eigenvectors(plain).metadata["settings"]["weights"] == "ema"
    with pytest.raises(LandscapeError, match="holds the eigenvectors of another Hessian .*weights ema.* than the "
                                             "one asked for .*weights raw"):
        run_surface_analysis(run, SurfaceSettings(directions="eigen", dims=1, points=3, samples=16), force=True,
                             checkpoints="last")
    # as the sentence says: the raw Hessian's analysis measures that checkpoint again, and the surface then runs
    run_hessian_analysis(run, HessianSettings(**common), checkpoints="last", save_eigenvectors_to_disk=True)
    ds = run_surface_analysis(run, SurfaceSettings(directions="eigen", dims=1, points=3, samples=16), force=True,
                              checkpoints="last").isel(checkpoint=0)
    np.testing.assert_allclose(ds["eigenvalue"].values, found["raw", "hessian"][:1], rtol=1e-5)


def test_interpolating_to_a_network_of_the_same_shapes_but_other_heads_is_refused(tmp_path):
    from conftest import make_tiny_run

    tiny = dict(img_size=8, in_chans=1, num_classes=10, patch_size=4, embed_dim=8, depth=1, mlp_ratio=2.0,
                class_token=False, global_pool="avg")
    two = make_tiny_run(tmp_path, "two", "vit_pico_patch4_32", {**tiny, "num_heads": 2}, 0)
    four = make_tiny_run(tmp_path, "four", "vit_pico_patch4_32", {**tiny, "num_heads": 4}, 0)
    same = make_tiny_run(tmp_path, "same", "vit_pico_patch4_32", {**tiny, "num_heads": 2}, 1)
    settings = dict(dims=1, points=3, samples=16)
    with pytest.raises(LandscapeError, match=r"is another architecture than .*blocks.0.attn: Attention "
                                             r"\{'num_heads': 4.*against Attention \{'num_heads': 2"):
        run_surface_analysis(two, SurfaceSettings(directions=f"interpolate:{four.root}", **settings))
    ds = run_surface_analysis(two, SurfaceSettings(directions=f"interpolate:{same.root}", **settings))
    assert np.isfinite(ds["loss"].values).all()
    dropping = make_tiny_run(tmp_path, "dropping", "vit_pico_patch4_32", {**tiny, "num_heads": 2,
                                                                          "drop_path_rate": 0.1}, 2)
    ds = run_surface_analysis(two, SurfaceSettings(directions=f"interpolate:{dropping.root}", **settings), force=True)
    assert np.isfinite(ds["loss"].values).all()  # drop-path does nothing when evaluating: the same network


def test_cli_surface_writes_the_file_and_refuses_bad_input_in_one_sentence(runs):
    a, b = runs["a"], runs["b"]
    runner = CliRunner()
    result = runner.invoke(cli, ["analyze", "surface", str(a.root), "--directions", "random", "--dims", "2",
                                 "--points", "2", "--samples", "16", "--range", "-0.5:0.5"])
    assert result.exit_code == 0, result.output
    assert (a.analysis_dir / "surface-random-2d.nc").exists() and "loss at checkpoint" in result.output
    for args, message in (
        (["--directions", f"interpolate:{b.root}", "--dims", "2"], "interpolate are a line"),
        (["--directions", "sideways"], "Unknown directions"),
        (["--range", "1:-1"], "START < STOP"),
        (["--directions", "eigen"], "No Hessian eigenvectors"),
        (["--directions", f"interpolate:{b.root}@99"], "No checkpoint at epoch 99"),
        # taken, recorded, then the plain rerun was refused as "computed with other settings"
        (["--directions", f"interpolate:{b.root}", "--one-dim", "weight", "--qkv", "row"],
         "--one-dim and --qkv choose how random directions are normalised"),
        (["--directions", "pca", "--tokens", "tensor"], "--tokens chooses how random directions are normalised"),
    ):
        result = runner.invoke(cli, ["analyze", "surface", str(a.root), "--samples", "16", *args])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_load_run_keeps_every_line_of_a_run_apart(tmp_path):
    # Result.name was made from the settings without the targets' checkpoints: the lines to runB@2 and runB@3
    # both became "surface-interpolate-b-1d", and ls.load_run(RUN).surfaces held one of them (the name is still
    # made from the settings, never from the file's name)
    from landscape.summary import load_run

    a, b = _make_run(tmp_path / "a", 0, epochs=2), _make_run(tmp_path / "b", 1, epochs=3)
    for epoch in (2, 3):
        run_surface_analysis(a, SurfaceSettings(directions=f"interpolate:{b.root}@{epoch}", points=3, samples=8),
                             checkpoints="last")
    surfaces = load_run(a.root).surfaces
    assert sorted(surfaces) == ["surface-interpolate-b@epoch-0002-1d", "surface-interpolate-b@epoch-0003-1d"]
    ends = [float(surfaces[f"surface-interpolate-b@epoch-{e:04d}-1d"]["loss"].isel(checkpoint=-1).sel(a=1.0))
            for e in (2, 3)]
    assert ends[0] != ends[1]
    import landscape as ls  # given in memory, from their attributes alike; a second of one name is kept too

    assert sorted(ls.results(*surfaces.values()).surfaces) == sorted(surfaces)
    twice = ls.results(surfaces["surface-interpolate-b@epoch-0002-1d"], surfaces["surface-interpolate-b@epoch-0002-1d"])
    assert sorted(twice.surfaces) == ["surface-interpolate-b@epoch-0002-1d", "surface-interpolate-b@epoch-0002-1d-2"]


def test_another_runs_checkpoint_is_refused_as_a_target_in_the_trajectory_and_mid_epoch(tmp_path):
    # only the checkpoints at the centre were checked: another run's file as a line's target, in the trajectory of
    # --directions pca, or at a mid-epoch step (no epoch in its header) was measured as the run's own
    import shutil

    from conftest import TINY_VIT, make_tiny_run

    mine = make_tiny_run(tmp_path, "mine", "vit_pico_patch4_32", TINY_VIT, 0)
    other = make_tiny_run(tmp_path, "other", "vit_pico_patch4_32", TINY_VIT, 1)  # same arguments, another seed
    centre = make_tiny_run(tmp_path, "centre", "vit_pico_patch4_32", TINY_VIT, 2)
    last, metrics = mine.checkpoints()[-1].path, mine.metrics_path.read_text()
    kept = last.read_bytes()
    shutil.copyfile(other.checkpoints()[-1].path, last)
    rows = mine.read_metrics().to_dict("records")
    mine.write_metrics([*rows[:-1], {**rows[-1], "train_loss": rows[-1]["train_loss"] + 0.01}])  # not other's
    base = ["analyze", "surface", "--dims", "1", "--points", "3", "--samples", "8", "--device", "cpu"]
    line = CliRunner().invoke(cli, [*base, str(centre.root), "--directions", f"interpolate:{mine.root}"])
    assert line.exit_code == 1 and f"In --directions, {mine.root}" in line.output, line.output
    assert "belongs to another run" in line.output and not (centre.analysis_dir).exists()
    pca = CliRunner().invoke(cli, [*base, str(mine.root), "--directions", "pca", "--checkpoints", "epochs:1"])
    assert pca.exit_code == 1 and "epoch-0003.safetensors was saved with train_loss" in pca.output, pca.output
    last.write_bytes(kept)
    mine.metrics_path.write_text(metrics)
    rows = mine.read_metrics().to_dict("records")  # a checkpoint between epochs 1 and 2:
    row = {**rows[0], "epoch": 2, "step": 15, "train_loss": 0.5, "val_loss": 0.75}
    mine.write_metrics([rows[0], row, *rows[1:]])
    model = create_model("vit_pico_patch4_32", **TINY_VIT)
    path = mine.checkpoint_path(step=15)
    save_checkpoint(path, model.state_dict(), model="vit_pico_patch4_32", model_kwargs=TINY_VIT, epoch=None, step=15,
                    metrics={**row, "train_loss": 0.625})  # saved by a run whose loss there was another
    assert [i.name for i in mine.checkpoints()][1] == "step-00000015"
    mid = CliRunner().invoke(cli, [*base, str(mine.root), "--checkpoints", "steps:15"])
    assert mid.exit_code == 1 and "step-00000015.safetensors was saved with train_loss 0.625" in mid.output, mid.output
    save_checkpoint(path, model.state_dict(), model="vit_pico_patch4_32", model_kwargs=TINY_VIT, epoch=None, step=15,
                    metrics=row)  # its own: measured
    own = CliRunner().invoke(cli, [*base, str(mine.root), "--checkpoints", "steps:15"])
    assert own.exit_code == 0, own.output


def test_surface_names_stay_when_runs_move_and_a_copy_kept_aside_does_not_take_the_name(tmp_path):
    import shutil

    from landscape.summary import load_run

    a, b = _make_run(tmp_path / "n" / "a", 0, epochs=2), _make_run(tmp_path / "n" / "b", 1, epochs=2)
    run_surface_analysis(a, SurfaceSettings(directions=f"interpolate:{b.root}@1", points=3, samples=8),
                         checkpoints="last")
    shutil.copytree(tmp_path / "n", tmp_path / "moved")
    for where in ("n", "moved"):  # the key named b by a hash of its path once the folder had moved
        assert sorted(load_run(tmp_path / where / "a").surfaces) == ["surface-interpolate-b@epoch-0001-1d"]
    # a slice kept aside under another name, then measured again wider: the file analyze wrote keeps the name
    settings = dict(directions="random", dims=1, points=3, samples=8)
    run_surface_analysis(a, SurfaceSettings(**settings, range=(-1.0, 1.0)), checkpoints="last")
    (a.analysis_dir / "surface-random-1d.nc").rename(a.analysis_dir / "surface-random-1d-narrow.nc")
    run_surface_analysis(a, SurfaceSettings(**settings, range=(-2.0, 2.0)), checkpoints="last")
    surfaces = load_run(a.root).surfaces
    assert float(surfaces["surface-random-1d"]["a"].max()) == 2.0
    assert float(surfaces["surface-random-1d-2"]["a"].max()) == 1.0
    # so does a line's (its file is named by the target as spelled, not as the name has it)
    line = dict(directions=f"interpolate:{b.root}@1", points=3, samples=8)
    (a.analysis_dir / "surface-interpolate-b@1-1d.nc").rename(a.analysis_dir / "surface-interpolate-b@1-1d-old.nc")
    run_surface_analysis(a, SurfaceSettings(**line, range=(0.0, 2.0)), checkpoints="last")
    surfaces = load_run(a.root).surfaces
    assert float(surfaces["surface-interpolate-b@epoch-0001-1d"]["a"].max()) == 2.0
    # lines to two runs of one folder name (two studies' b) are told apart by their study's folder
    other = _make_run(tmp_path / "other" / "b", 2, epochs=1)
    run_surface_analysis(a, SurfaceSettings(directions=f"interpolate:{other.root}", points=3, samples=8),
                         checkpoints="last")
    keys = sorted(load_run(a.root).surfaces)
    assert "surface-interpolate-other/b@epoch-0001-1d" in keys and "surface-interpolate-n/b@epoch-0001-1d" in keys


def test_one_line_spelled_two_ways_is_one_file(tmp_path):
    # interpolate:RUN (its last checkpoint) and interpolate:RUN@LAST name one checkpoint: the second was measured
    # again from scratch into a file of its own
    a, b = _make_run(tmp_path / "a", 0, epochs=1), _make_run(tmp_path / "b", 1, epochs=2)
    first = run_surface_analysis(a, SurfaceSettings(directions=f"interpolate:{b.root}", points=3, samples=8))
    again = run_surface_analysis(a, SurfaceSettings(directions=f"interpolate:{b.root}@2", points=3, samples=8))
    assert sorted(p.name for p in a.analysis_dir.glob("*.nc")) == ["surface-interpolate-b-1d.nc"]
    assert float(again["loss"].sum()) == float(first["loss"].sum())
    run_surface_analysis(a, SurfaceSettings(directions=f"interpolate:{b.root}@1", points=3, samples=8))
    assert sorted(p.name for p in a.analysis_dir.glob("*.nc")) == ["surface-interpolate-b-1d.nc",
                                                                   "surface-interpolate-b@1-1d.nc"]


@pytest.mark.parametrize("epoch", ["0_2", "\u0661", "-1", "", "2.0", "x"])
def test_a_target_epoch_is_ascii_digits(epoch):
    # int() read '0_2' as epoch 2 and an Arabic-Indic one as epoch 1
    from landscape.analyses.surface import parse_directions

    with pytest.raises(LandscapeError, match=r"after '@' is not an epoch number \(digits 0-9\)"):
        parse_directions(f"interpolate:runs/b@{epoch}")
    assert parse_directions("interpolate:runs/b@12").targets[0].epoch == 12
    # the space before '@' stayed in the run's name: "Run directory runs/b  does not exist"
    assert parse_directions("interpolate: runs/b @ 12").targets == parse_directions("interpolate:runs/b@12").targets


def test_runs_whose_folder_names_hold_an_at_sign_or_a_comma_can_be_targets(tmp_path, monkeypatch):
    # 'runs/lr@0.1' was read as run 'runs/lr' at epoch '0.1' (refused), and 'plane:a,b,c' could not name 'b,c'
    from landscape.analyses.surface import CheckpointRef, parse_directions

    monkeypatch.chdir(tmp_path)
    for name in ("lr@0.1", "wd,0.05", "base"):
        (tmp_path / name).mkdir()
    assert parse_directions("interpolate:lr@0.1").targets == [CheckpointRef(Path("lr@0.1"))]
    assert parse_directions("interpolate:lr@0.1@7").targets == [CheckpointRef(Path("lr@0.1"), 7)]
    assert parse_directions("interpolate:wd,0.05").targets == [CheckpointRef(Path("wd,0.05"))]
    assert parse_directions("plane:base@2,wd,0.05@3").targets == [CheckpointRef(Path("base"), 2),
                                                                 CheckpointRef(Path("wd,0.05"), 3)]
    assert parse_directions("plane:wd,0.05,lr@0.1").targets == [CheckpointRef(Path("wd,0.05")),
                                                               CheckpointRef(Path("lr@0.1"))]
    with pytest.raises(LandscapeError, match="is not an epoch number"):  # no such folder: '@' still names an epoch
        parse_directions("interpolate:other@0.1")
    # the folder 'lr@2' and epoch 2 of the run 'lr' named one results file: the second line replaced the first
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr@2").mkdir()
    run = tmp_path / "base"
    slugs = {text: parse_directions(text).slug(run) for text in ("interpolate:lr@2", "interpolate:lr/@2",
                                                                 "interpolate:lr_2")}
    assert len(set(slugs.values())) == 3, slugs
    assert slugs["interpolate:lr/@2"] == "interpolate-lr@2"  # names of runs without '@' are as they were
