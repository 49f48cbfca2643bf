"""Where the curvature sits: the Hessian restricted to each parameter group (``analyze hessian --per-block``).

The parameters split into groups :math:`g` (:func:`parameter_groups`: the patch embedding with the position
embedding and class token, each block's attention, each block's MLP, an MLP shared by several blocks once under
the name of all of them, ``blocks.0+1.mlp``, every norm together, the head, and the rest). Ordering the parameter
vector by groups, the Hessian has blocks :math:`H_{gh}`; the restricted Hessian of group :math:`g` is the diagonal
block :math:`H_{gg} = \\nabla^2_{\\theta_g} L`, the Hessian of the loss as a function of :math:`\\theta_g` alone with
the rest fixed. Its trace :math:`\\operatorname{tr} H_{gg}` is the part of :math:`\\operatorname{tr} H` on the
group (the traces of the groups add up to the whole), its top eigenvalue the sharpest direction inside the group.

Cost against the whole-model analysis (``--top-k k --trace``: about :math:`4k + 12` products for the eigenvalues, 8
for their check for a missed eigenvalue, and ``trace_matvecs`` for the trace):

- The traces of all groups come from the whole-model trace's own products: no extra product. With the Krylov
  basis :math:`V` (orthonormal rows) of the eigenvalues, :math:`T = V H V^\\top` (known), the deflated probes
  :math:`w = (I - V^\\top V) z` and their products :math:`H w`, writing :math:`P_g` for the coordinate projection,

  .. math::  \\operatorname{tr} H_{gg} = \\operatorname{tr}(V_g^\\top V_g\\, T)
             + \\mathbb{E}\\big[w_g^\\top (H w)_g + (V_g w_g)^\\top (V H w)\\big],

  (:math:`V_g` the columns of :math:`V` on the group) exactly as :func:`~landscape.curvature.trace.deflated_trace`
  splits :math:`\\operatorname{tr} H`; the cross term is the expectation of :math:`z^\\top P_g V^\\top V H R z`
  (:math:`R = I - V^\\top V`), small when :math:`V` nearly spans eigenvectors. Summed over the groups the cross terms
  vanish sample by sample (:math:`V w = 0`), so the group traces add up to the whole-model estimate exactly.
  :func:`~landscape.curvature.trace.deflated_group_traces` computes the whole-model estimate and all groups' from
  one set of probes.
- Top eigenvalues need one Lanczos run per group on the restricted operator (no shared product gives
  :math:`\\lambda_1(H_{gg})`): :func:`restricted_top_eigenvalues`, each product
  :math:`H_{gg} v_g` the Hessian-vector product of the loss restricted to :math:`\\theta_g`, whose reverse pass
  computes no other parameter's gradient. For :math:`G` groups about :math:`G \\cdot 24` products more at
  ``tol=1e-3`` (a group's spectrum has fewer close outliers than the whole model's, so most converge in 10-20, and
  each run's check for a missed eigenvalue takes 8 more).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np
import torch

from landscape.errors import ConfigError

Tensor = torch.Tensor
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.([A-Za-z_][A-Za-z0-9_]*)")
_EMBEDDING = ("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


def _group_of(names: list[str]) -> str:
    """The group of one parameter from all the names it has in the model (a shared tensor has several)."""
    blocks: dict[str, set[int]] = {}
    for name in names:
        match = _BLOCK.search(name)
        if match is None:
            continue
        part = match.group(2)
        # LayerScale (timm's ls1, ls2) scales the attention's and the MLP's output: part of that branch
        kind = "attn" if part.startswith(("attn", "ls1")) else "mlp" if part.startswith(("mlp", "ls2")) else \
            "norms" if part.startswith("norm") else None
        if kind == "norms":
            return "norms"
        if kind is not None:
            blocks.setdefault(kind, set()).add(int(match.group(1)))
    if blocks:
        kind, indices = next(iter(blocks.items()))
        return f"blocks.{'+'.join(str(i) for i in sorted(indices))}.{kind}"
    first = names[0]
    leaf = first.rsplit(".", 2)[-2] if "." in first else first
    if any(first == e or first.startswith(e + ".") for e in _EMBEDDING):
        return "patch_embed"
    if first.startswith("head.") or first == "head":
        return "head"
    if "norm" in leaf:
        return "norms"
    return "other"


def _order(group: str) -> tuple:
    if group == "patch_embed":
        return (0,)
    match = re.match(r"blocks\.([\d+]+)\.(\w+)$", group)
    if match:
        return (1, int(match.group(1).split("+")[0]), match.group(2) != "attn", group)
    return (2, {"norms": 0, "head": 1}.get(group, 2), group)


def parameter_groups(model: torch.nn.Module, names: list[str]) -> dict[str, list[str]]:
    """``{group: [parameter names]}`` for the parameters ``names`` (first names, as a
    :class:`~landscape.curvature.loss.LossFunction` holds them), groups in network order: ``patch_embed``,
    ``blocks.<i>.attn``, ``blocks.<i>.mlp`` (``blocks.<i>+<j>.mlp`` for an MLP shared by blocks i and j, counted
    once), ``norms``, ``head``, ``other``."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    every = {names_[0]: names_ for names_ in aliases.values()}
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_group_of(every.get(name, [name])), []).append(name)
    return {g: groups[g] for g in sorted(groups, key=_order)}


def group_indices(shapes: Mapping[str, tuple[int, ...]], groups: Mapping[str, list[str]]) -> dict[str, Tensor]:
    """Each group's positions in the flat parameter vector ordered as ``shapes``."""
    offsets, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        offsets[name] = (start, start + size)
        start += size
    return {g: torch.cat([torch.arange(*offsets[n]) for n in names]) for g, names in groups.items()}


def restricted_top_eigenvalues(loss: Any, groups: Mapping[str, list[str]], settings: Any, *,
                               callback: Callable[[int], Any] | None = None) -> np.ndarray:
    """The largest eigenvalue of each group's restricted curvature matrix (``settings.matrix``): an ``(G, 3)`` array
    of (eigenvalue, products, converged), one Lanczos run per group to ``settings.tol``."""
    from landscape.curvature.lanczos import top_eigenvalues
    from landscape.curvature.loss import LossFunction
    from landscape.curvature.operators import curvature_operator

    rows = []
    for names in groups.values():
        part = LossFunction(loss.model, loss.data.x, loss.data.y, batch_size=loss.data.batch_size, params=list(names),
                            criterion=loss.criterion, vectors_per_pass=loss.vectors_per_pass, skip_unused=False,
                            data_parallel=loss.data_parallel, swap_checked=True)
        op = curvature_operator(part, getattr(settings, "matrix", "hessian"), callback=callback,
                                product=settings.product, fisher_samples=getattr(settings, "fisher_samples", None),
                                seed=settings.seed)
        result = top_eigenvalues(op, 1, tol=settings.tol, seed=settings.seed)
        op.release()
        rows.append((float(result.eigenvalues[0]), result.matvecs, float(result.converged)))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def per_block_data(loss: Any, groups: Mapping[str, list[str]], settings: Any, traces: tuple | None, *,
                   callback: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """The ``group``-dimension variables of ``--per-block``: ``group_num_parameters``, ``block_eigenvalue_largest``
    with ``block_eigenvalue_matvecs`` and ``block_eigenvalue_converged``, and from ``traces`` (the output of
    :func:`~landscape.curvature.trace.deflated_group_traces`, or ``None``) ``block_trace`` and ``block_trace_standard_error``."""
    sizes = [sum(int(np.prod(loss.shapes[n])) for n in names) for names in groups.values()]
    data: dict[str, Any] = {"group_num_parameters": (("group",), np.asarray(sizes, dtype=np.int64),
                                                     {"long_name": "parameters in the group"})}
    if settings.top_k > 0:
        eig = restricted_top_eigenvalues(loss, groups, settings, callback=callback)
        data["block_eigenvalue_largest"] = (("group",), eig[:, 0], {
            "long_name": "largest eigenvalue of the curvature matrix restricted to the group (its diagonal block)"})
        data["block_eigenvalue_matvecs"] = (("group",), eig[:, 1].astype(np.int64),
                                            {"long_name": "products of the group's own Lanczos run"})
        data["block_eigenvalue_converged"] = (("group",), eig[:, 2].astype(np.int64),
                                              {"long_name": "1 if the group's eigenvalue met tol"})
    if traces is not None:
        _, estimates, errors = traces
        data["block_trace"] = (("group",), estimates, {
            "long_name": "trace of the diagonal block of the group, from the whole-model trace's probes"})
        data["block_trace_standard_error"] = (("group",), errors, {"long_name": "standard error of the block trace"})
    return data


def check_per_block(settings: Any) -> None:
    """One-sentence errors for ``--per-block`` combined with other settings."""
    if settings.per_block and settings.trace and (settings.top_k == 0 or settings.trace_method != "lanczos"):
        raise ConfigError("--per-block takes the blocks' traces from the eigenvalues' Lanczos basis: use --top-k 1 "
                          "or more with --trace-method lanczos.")
