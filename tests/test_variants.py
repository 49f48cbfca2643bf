"""What variant a run is (landscape.models.variants): one identity for study, summary, figures, report, compare,
dynamics and import."""

import subprocess
import sys

import pytest
import torch

from landscape.models.variants import describe_variant, unique_labels

TINY = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=4, class_token=False, global_pool="avg")


def _variant(name, **kwargs):
    return describe_variant({"model": {"name": name, "kwargs": kwargs}})


def test_variants_are_recognised_from_the_model_name_and_knobs():
    base = _variant("vit_pico_patch4_32", **TINY)
    grouped = _variant("vit_pico_patch4_32_grouped_mlp", **TINY, group_size=3)
    random = _variant("vit_pico_patch4_32_shallow_mlp", **TINY, mlp_init="random")
    mlit = _variant("mlit_xxs")
    assert (base.family, base.group_size, base.label) == ("baseline", 1, "ViT baseline")
    assert (grouped.family, grouped.group_size, grouped.label) == ("grouped", 3, "GroupedMLP g=3")
    assert (random.family, random.mlp_init, random.width_ratio) == ("shallow", "random", 0.5)
    assert mlit.family == "mlit"
    # a variant is compared with the baseline of the same architecture only
    assert base.base == grouped.base == random.base
    other_size = _variant("vit_pico_patch4_32", **dict(TINY, embed_dim=32))
    assert other_size.base != base.base and other_size.key != base.key


def test_grouped_runs_differing_only_in_init_scale_are_two_variants_with_two_labels():
    default = _variant("vit_pico_patch4_32_grouped_mlp", **TINY, group_size=2)
    scaled = _variant("vit_pico_patch4_32_grouped_mlp", **TINY, group_size=2, init_scale=0.25)
    assert default.key != scaled.key
    assert scaled.init_scale == 0.25 and scaled.label == "GroupedMLP g=2 s=0.25"
    labels = unique_labels([default, scaled])
    assert len(set(labels.values())) == 2


def test_training_only_arguments_do_not_make_another_variant():
    assert _variant("vit_pico_patch4_32", **TINY).key == _variant("vit_pico_patch4_32", **TINY, drop_path_rate=0.1).key


def test_labels_that_would_clash_fall_back_to_the_base_then_the_key():
    a = _variant("vit_pico_patch4_32", **TINY)
    b = _variant("vit_pico_patch4_32", **dict(TINY, embed_dim=32))
    labels = unique_labels([a, b])
    assert labels[a.key] == f"ViT baseline ({a.base})" and labels[b.key] == f"ViT baseline ({b.base})"


def test_imported_architectures_without_a_registered_name_are_their_own_variants(tmp_path):
    """Two imported ViTs of widths no registered name has are built as vit_base_patch16_224 with explicit shape
    arguments: each is its own variant, named after its shape, and neither is taken for ViT-B/16."""
    import timm

    from landscape.importers import import_checkpoint

    variants = []
    for width in (16, 24):
        torch.manual_seed(0)
        source = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, num_classes=10,
                                   embed_dim=width, depth=2, num_heads=2)
        torch.save(source.state_dict(), tmp_path / f"vit{width}.pth")
        result = import_checkpoint(tmp_path / f"vit{width}.pth", tmp_path / f"run{width}",
                                   model_args={"num_heads": 2})
        variants.append(describe_variant(result.run.load_config()))
    narrow, wide = variants
    vit_b = describe_variant({"model": {"name": "vit_base_patch16_224", "kwargs": {}}, "source": {"file": "x"}})
    assert len({narrow.key, wide.key, vit_b.key}) == 3
    assert narrow.label == "vit(D=16,depth=2,heads=2,patch=2)" and narrow.name == narrow.label
    assert wide.label == "vit(D=24,depth=2,heads=2,patch=2)"
    assert vit_b.label == "ViT baseline"


def test_an_imported_vit_b_keeps_its_registered_name():
    config = {"model": {"name": "vit_base_patch16_224",
                        "kwargs": {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16}},
              "source": {"file": "x"}}
    assert describe_variant(config).label == "ViT baseline"


def _module_level_imports() -> dict[str, set[str]]:
    """``{module: landscape modules it imports at module level}`` for every module of the package (imports inside
    functions run later and cannot close a cycle at import time)."""
    import ast
    from pathlib import Path

    import landscape

    root = Path(landscape.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m.startswith("landscape")}
    # A submodule importing its own package finds it already being initialised: not a cycle that can break.
    return {name: {m for m in deps if m in graph and m != name and not name.startswith(m + ".")}
            for name, deps in graph.items()}


def test_the_package_has_no_import_cycle_at_module_level():
    graph = _module_level_imports()
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])
    assert "landscape.summary" in graph and "landscape.models.variants" in graph


@pytest.mark.slow
@pytest.mark.parametrize("module", ["landscape.summary", "landscape.figures", "landscape.report", "landscape.compare",
                                    "landscape.study", "landscape.models.variants", "landscape.analyses.dynamics"])
def test_every_reading_module_imports_first_in_a_fresh_interpreter(module):
    """An import cycle shows as an ImportError when the module that closes the cycle is imported first."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_nothing_in_the_package_imports_the_study():
    from pathlib import Path

    import landscape

    root = Path(landscape.__file__).parent
    importers = [p.relative_to(root) for p in root.rglob("*.py")
                 if p.name not in ("study.py", "cli.py") and "landscape.study" in p.read_text()]
    assert importers == []
