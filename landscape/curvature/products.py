"""Hessian-vector products :math:`H V` of a :class:`~landscape.curvature.loss.LossFunction`, three ways.

Each strategy has one method, ``matmat(V)``: ``(P, k)`` columns in, :math:`H V` ``(P, k)`` out, on the model's
device and in its dtype, summed over the batches of the evaluation set with the loss's batch weights, :math:`n_b / N` (and over the
processes of a data-parallel set). All three are exact; they differ by floating-point rounding, by memory and by
what they recompute:

- :class:`ForwardOverReverse`: :math:`H v = \\partial_\\epsilon \\nabla L(\\theta + \\epsilon v)|_{\\epsilon=0}`
  (:func:`torch.func.jvp` of :func:`torch.func.grad`) per batch, ``vectors_per_pass`` columns sharing one primal
  pass through :func:`torch.func.vmap`. Fills a GPU; on a CPU vmap's batched tangents cost more memory traffic than
  the shared primal pass saves.
- :class:`DoubleBackward`: :math:`H v = \\nabla_\\theta (g^\\top v)`, :math:`g = \\nabla_\\theta L`, per batch one
  forward and backward pass with ``create_graph=True`` and one more backward pass per column (one batch's graph in
  memory at a time). An independent cross-check of the forward-over-reverse product.
- :class:`KeptGraphProducts`: the same reverse-over-reverse product, the gradient graph of every batch built once
  and kept across calls: each product after the first is one backward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from landscape.curvature.loss import add_scaled, evaluation_mode

if TYPE_CHECKING:
    from landscape.curvature.loss import LossFunction

Tensor = torch.Tensor


class ForwardOverReverse:
    """:math:`H V` by forward-over-reverse differentiation, ``vectors_per_pass`` columns per primal pass (default
    the loss function's :attr:`~landscape.curvature.loss.LossFunction.vectors_per_pass`)."""

    def __init__(self, loss: LossFunction, vectors_per_pass: int | None = None):
        self.loss_function = loss
        self.vectors_per_pass = vectors_per_pass or loss.vectors_per_pass

    def matmat(self, vectors: Tensor) -> Tensor:
        """``(P, k)`` -> ``(P, k)``."""
        step = self.vectors_per_pass
        return torch.cat([self._columns(vectors[:, i:i + step]) for i in range(0, vectors.shape[1], step)], dim=1)

    def _columns(self, vectors: Tensor) -> Tensor:
        """One pass per batch, the primal computation shared by the ``k`` tangents."""
        lf = self.loss_function
        k = vectors.shape[1]
        tangents = lf.unflatten(vectors)  # {name: (k, *shape)}
        primals = lf.parameters()
        result = None
        with evaluation_mode(lf.model):
            for w, x, y in lf.weighted_batches():
                gradient = torch.func.grad(lf.batch_loss)

                def hvp(t: dict[str, Tensor]) -> dict[str, Tensor]:
                    return torch.func.jvp(lambda p: gradient(p, x, y), (primals,), (t,))[1]

                if k == 1:
                    hv = {n: t[None] for n, t in hvp({n: t[0] for n, t in tangents.items()}).items()}
                else:
                    hv = torch.func.vmap(hvp)(tangents)
                result = add_scaled(result, hv, w)
        return lf.all_reduce(lf.flatten(result))


class DoubleBackward:
    """:math:`H V` by reverse-over-reverse differentiation, the graph of one batch at a time: the columns of a call
    share each batch's forward and backward pass."""

    def __init__(self, loss: LossFunction):
        self.loss_function = loss

    def matmat(self, vectors: Tensor) -> Tensor:
        """``(P, k)`` -> ``(P, k)``."""
        lf = self.loss_function
        tangents = [list(lf.unflatten(vectors[:, i]).values()) for i in range(vectors.shape[1])]
        result = torch.zeros_like(vectors)
        leaves = list(lf.differentiable_parameters().values())  # each batch builds its own graph on the same leaves
        with evaluation_mode(lf.model), torch.enable_grad():
            for w, x, y in lf.weighted_batches():
                grads = torch.autograd.grad(lf.batch_loss(dict(zip(lf.names, leaves)), x, y), leaves,
                                            create_graph=True)
                for i, tangent in enumerate(tangents):
                    hv = torch.autograd.grad(grads, leaves, grad_outputs=tangent, retain_graph=i + 1 < len(tangents))
                    result[:, i].add_(torch.cat([h.reshape(-1) for h in hv]), alpha=w)
        return lf.all_reduce(result)


class KeptGraphProducts:
    """Hessian-vector products through a kept gradient graph: :math:`H v = \\nabla_\\theta (g^\\top v)` with
    :math:`g = \\nabla L` computed once, with ``create_graph=True``, and reused for every ``v``.

    The first product (or :meth:`build`) runs one forward and backward pass per batch and holds each batch's
    graph; every product after it is one backward pass through those graphs (reverse-over-reverse), skipping
    the forward and backward pass that :class:`ForwardOverReverse` and :class:`DoubleBackward` recompute. The
    loss and gradient of that pass are kept too (:attr:`loss_value`, :attr:`gradient`). Memory: the graph of every
    batch at once: its activations and the backward pass's intermediates. Products are exact for the parameters at
    build time; :meth:`release` frees the graphs (so does leaving a ``with`` block).
    """

    def __init__(self, loss: LossFunction):
        self.loss_function = loss
        self._graphs: list[tuple[float, tuple[Tensor, ...]]] | None = None
        self._leaves: list[Tensor] = []
        self.loss_value: float | None = None
        self.gradient: Tensor | None = None

    def build(self) -> "KeptGraphProducts":
        if self._graphs is not None:
            return self
        lf = self.loss_function
        leaves = lf.differentiable_parameters()
        graphs, total, gradient = [], 0.0, None
        with evaluation_mode(lf.model), torch.enable_grad():
            for w, x, y in lf.weighted_batches():
                value = lf.batch_loss(leaves, x, y)
                grads = torch.autograd.grad(value, list(leaves.values()), create_graph=True)
                graphs.append((w, grads))
                total += w * float(value.detach())
                gradient = add_scaled(gradient, {n: g.detach() for n, g in zip(leaves, grads)}, w)
        self._graphs, self._leaves = graphs, list(leaves.values())
        self.loss_value = lf.all_reduce_scalars(total)[0]
        self.gradient = lf.all_reduce(lf.flatten(gradient))
        return self

    def matmat(self, vectors: Tensor) -> Tensor:
        """``(P, k)`` -> ``(P, k)``, one backward pass per column and batch.

        No module code runs in a backward pass through a recorded graph, so the model's mode is left alone here
        (switching every module to eval and back cost 13% of a product on the demo's 52k-parameter ViT). One
        vmapped backward per block (``is_grads_batched``) was measured too and is slower on a CPU (2.0-2.2
        gradients per column against 1.8 for the loop).
        """
        self.build()
        lf = self.loss_function
        vectors = vectors.to(lf.device, lf.dtype)
        out = torch.empty_like(vectors)
        for i in range(vectors.shape[1]):
            tangent = list(lf.unflatten(vectors[:, i]).values())
            total = None
            for w, grads in self._graphs:
                hv = torch.autograd.grad(grads, self._leaves, grad_outputs=tangent, retain_graph=True)
                flat = torch.cat([h.reshape(-1) for h in hv])
                total = w * flat if total is None else total.add_(flat, alpha=w)
            out[:, i] = total
        return lf.all_reduce(out)

    def release(self) -> None:
        self._graphs, self._leaves = None, []

    def __enter__(self) -> "KeptGraphProducts":
        return self.build()

    def __exit__(self, *exc) -> None:
        self.release()


def hessian_vector_product(loss: LossFunction, v: Tensor | Mapping[str, Tensor], *,
                           vectors_per_pass: int | None = None) -> Tensor | dict[str, Tensor]:
    """:math:`H v` by forward-over-reverse differentiation (:class:`ForwardOverReverse`), returned in the form ``v``
    was given: ``(P,)``, ``(P, k)`` (``k`` vectors as columns, pushed through :func:`torch.func.vmap`
    ``vectors_per_pass`` at a time, default the loss function's) or a dict shaped like the parameters."""
    return loss.columnwise(ForwardOverReverse(loss, vectors_per_pass).matmat, v)


def hessian_vector_product_double_backward(loss: LossFunction, v: Tensor | Mapping[str, Tensor]
                                           ) -> Tensor | dict[str, Tensor]:
    """:math:`H v = \\nabla_\\theta (g^\\top v)`, :math:`g = \\nabla_\\theta L`, by reverse-over-reverse (double
    backward, :class:`DoubleBackward`), an independent cross-check of :func:`hessian_vector_product`; ``v`` as
    there."""
    return loss.columnwise(DoubleBackward(loss).matmat, v)


def dense_hessian(loss: LossFunction) -> Tensor:
    """The full ``(P, P)`` Hessian from ``P`` Hessian-vector products with unit vectors (small models only)."""
    eye = torch.eye(loss.num_parameters, device=loss.device, dtype=loss.dtype)
    return hessian_vector_product(loss, eye, vectors_per_pass=max(loss.vectors_per_pass, 128))
