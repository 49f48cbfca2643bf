"""Curvature matrices as symmetric linear operators, and the probes the estimators multiply them by.

Every curvature matrix here is a :class:`CurvatureOperator`: a symmetric ``(P, P)``
:class:`scipy.sparse.linalg.LinearOperator` over the parameters of a :class:`~landscape.curvature.loss.LossFunction`
whose one job is to multiply by a block of vectors. A subclass implements one method, :meth:`CurvatureOperator.product`
(``(P, k)`` -> ``(P, k)`` in torch, on the model's device); the base class gives it the scipy interface (``op @ x``,
:func:`scipy.sparse.linalg.eigsh`), the torch interface the estimators use (:meth:`~CurvatureOperator.torch_matmat`),
the count of products and a progress callback, and a dense matrix for small models. Every estimator of
:mod:`landscape.curvature.lanczos`, :mod:`~landscape.curvature.trace`, :mod:`~landscape.curvature.density` then
works on it unchanged:

- :class:`HessianOperator`: :math:`H = \\nabla^2 L`, by one of the product strategies of
  :mod:`landscape.curvature.products`;
- :class:`OutputCurvatureOperator`: matrices :math:`\\sum_b \\frac{n_b}{N} J_b^\\top M_b J_b` through the network's
  outputs, whose subclasses give only :math:`M_b u`: :class:`GGNOperator`, :class:`FisherOperator`,
  :class:`EmpiricalFisherOperator`.

The estimators take any operator through :func:`as_torch_operator`: a :class:`CurvatureOperator`, a dense tensor or
array, a scipy ``LinearOperator``, or a :class:`TorchOperator` built from a function (:func:`preconditioned_operator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from landscape.curvature.loss import LossFunction, _is_cross_entropy, evaluation_mode, example_weights
from landscape.curvature.products import DoubleBackward, ForwardOverReverse, KeptGraphProducts
from landscape.errors import ConfigError, LandscapeError

Tensor = torch.Tensor
PRODUCTS = ("auto", "forward-over-reverse", "double-backward", "kept-graph")
"""How :class:`HessianOperator` computes its products (``--product``)."""
MATRICES = ("hessian", "ggn", "fisher", "empirical-fisher")
"""The curvature matrices every estimator can take (``--matrix``)."""


# -- operators as torch sees them ---------------------------------------------------------------------------------
@dataclass
class TorchOperator:
    """A symmetric ``(n, n)`` operator as torch sees it: ``matmat`` maps ``(n, k)`` to ``(n, k)`` on ``device``."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    matmat: Callable[[Tensor], Tensor]


def as_torch_operator(op: Any) -> TorchOperator:
    """Wrap a :class:`CurvatureOperator` (anything with ``torch_matmat``), a dense tensor/array or a scipy
    LinearOperator as a :class:`TorchOperator`."""
    if isinstance(op, TorchOperator):
        return op
    if hasattr(op, "torch_matmat"):
        return TorchOperator(tuple(op.shape), op.torch_dtype, torch.device(op.device), op.torch_matmat)
    if isinstance(op, np.ndarray):
        op = torch.from_numpy(op)
    if isinstance(op, Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"a dense operator must be a square matrix, got shape {tuple(op.shape)}")
        matrix = op if op.is_floating_point() else op.double()
        return TorchOperator(tuple(matrix.shape), matrix.dtype, matrix.device, lambda v: matrix @ v.to(matrix.dtype))
    if hasattr(op, "matmat") and hasattr(op, "shape"):
        dtype = torch.float32 if np.dtype(op.dtype) == np.float32 else torch.float64
        np_dtype = np.float32 if dtype == torch.float32 else np.float64

        def matmat(v: Tensor) -> Tensor:
            out = op.matmat(v.detach().cpu().numpy().astype(np_dtype, copy=False))
            return torch.from_numpy(np.asarray(out, dtype=np_dtype))

        return TorchOperator(tuple(op.shape), dtype, torch.device("cpu"), matmat)
    raise TypeError(f"cannot use a {type(op).__name__} as a linear operator")


def random_probes(n: int, k: int, generator: torch.Generator, *, distribution: str = "rademacher",
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """``(n, k)`` probe vectors with :math:`E[z z^\\top] = I`: Rademacher (:math:`\\pm 1`) or standard Gaussian.

    Drawn on the CPU from ``generator``, one probe after another, so a seed gives the same probes on every
    device and however they are grouped: ``k`` probes drawn at once equal the same ``k`` drawn in smaller blocks
    (estimators that multiply probes in blocks then do not depend on the block size).
    """
    if distribution == "rademacher":
        draw = lambda: torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1  # noqa: E731
    elif distribution == "gaussian":
        draw = lambda: torch.randn(n, generator=generator, dtype=torch.float64)  # noqa: E731
    else:
        raise ConfigError(f"Unknown probe distribution {distribution!r}; accepted are rademacher and gaussian.")
    return torch.stack([draw() for _ in range(k)], dim=1).to(dtype)


def preconditioned_operator(op: Any, scale: Tensor) -> TorchOperator:
    """:math:`S A S` for a symmetric operator :math:`A` and the diagonal :math:`S` = ``scale`` ``(P,)``: with
    :math:`S = P^{-1/2}` the preconditioned Hessian, whose spectrum is that of :math:`P^{-1} H`."""
    A = as_torch_operator(op)
    s = scale.to(A.device, A.dtype)[:, None]
    return TorchOperator(A.shape, A.dtype, A.device, lambda V: s * A.matmat(s * V.to(A.device, A.dtype)))


# -- the symmetric curvature operator -----------------------------------------------------------------------------
class CurvatureOperator(LinearOperator):
    """A symmetric ``(P, P)`` curvature matrix of a :class:`~landscape.curvature.loss.LossFunction`, as a linear
    operator. Subclasses implement :meth:`product` only.

    The scipy interface (``op @ x``, ``op.matvec``, ``op.matmat``, :func:`scipy.sparse.linalg.eigsh`) takes and
    returns numpy arrays in the model's dtype (float32 or float64); :meth:`torch_matmat` and :meth:`torch_matvec`
    stay on the model's device, for estimators written in torch. Each product is counted in :attr:`num_matvecs`
    (one per column); ``callback(k)`` is called after each ``k``-column product, e.g. to drive a progress bar.
    :attr:`vectors_per_pass` (default the loss function's) is how many columns a subclass may push through the
    model at once.
    """

    matrix = ""
    """The name of the matrix, one of :data:`MATRICES` for the operators defined here."""

    def __init__(self, loss: LossFunction, *, callback: Callable[[int], Any] | None = None):
        self.loss = loss
        self.callback = callback
        self.num_matvecs = 0
        self.vectors_per_pass = loss.vectors_per_pass
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(loss.dtype)
        if np_dtype is None:
            raise LandscapeError(f"Curvature matrices are computed in float32 or float64, not {loss.dtype}.")
        super().__init__(dtype=np.dtype(np_dtype), shape=(loss.num_parameters, loss.num_parameters))

    def product(self, vectors: Tensor) -> Tensor:
        """``(P, k)`` -> ``(P, k)``: the matrix times ``vectors`` (on the model's device, in its dtype)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.loss.device

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.loss.dtype

    def torch_matmat(self, vectors: Tensor) -> Tensor:
        """``(P, k)`` -> ``(P, k)`` on the model's device, in its dtype."""
        vectors = vectors.to(self.device, self.torch_dtype)
        out = self.product(vectors)
        self._count(vectors.shape[1])
        return out

    def torch_matvec(self, vector: Tensor) -> Tensor:
        """``(P,)`` -> ``(P,)``."""
        return self.torch_matmat(vector.reshape(-1, 1))[:, 0]

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """:math:`(L, \\nabla L)` at the operator's parameters."""
        return self.loss.loss_and_gradient()

    def release(self) -> None:
        """Free what is kept between products (nothing, unless a subclass keeps something)."""

    def dense(self) -> Tensor:
        """The full ``(P, P)`` matrix from ``P`` products with unit vectors (small models only), at least 128 columns
        per pass through the model."""
        eye = torch.eye(self.shape[0], device=self.device, dtype=self.torch_dtype)
        kept, self.vectors_per_pass = self.vectors_per_pass, max(self.vectors_per_pass, 128)
        try:
            return self.torch_matmat(eye)
        finally:
            self.vectors_per_pass = kept

    def _count(self, k: int) -> None:
        self.num_matvecs += k
        if self.callback is not None:
            self.callback(k)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        vectors = torch.from_numpy(np.ascontiguousarray(X, dtype=self.dtype))
        return self.torch_matmat(vectors).cpu().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._matmat(X)

    def _adjoint(self) -> "CurvatureOperator":
        return self


# -- the Hessian --------------------------------------------------------------------------------------------------
class HessianOperator(CurvatureOperator):
    """:math:`H = \\nabla^2 L(\\theta)` of a :class:`~landscape.curvature.loss.LossFunction`.

    ``product`` chooses how products are computed (:mod:`landscape.curvature.products`), all exact (they differ by
    floating-point rounding):

    - ``"kept-graph"``: the gradient graph of the whole evaluation set is built once and kept across products
      (:class:`~landscape.curvature.products.KeptGraphProducts`; freed by :meth:`release`). Fastest: a product is
      one backward pass.
    - ``"double-backward"``: per call and batch, one forward and backward pass with ``create_graph`` and one more
      backward pass per vector (:class:`~landscape.curvature.products.DoubleBackward`); one batch's graph in memory
      at a time.
    - ``"forward-over-reverse"``: per call and batch, :func:`torch.func.jvp` of :func:`torch.func.grad`,
      ``vectors_per_pass`` vectors at a time under :func:`torch.func.vmap`
      (:class:`~landscape.curvature.products.ForwardOverReverse`).
    - ``"auto"``: ``"kept-graph"`` when the evaluation set is one batch, whose graph the batch size has already
      sized; otherwise ``"double-backward"`` on a CPU and ``"forward-over-reverse"`` on a GPU (holding every
      batch's graph at once could exceed the memory the batch size was chosen to fit). On a CPU vmap's batched
      tangents cost more memory traffic than the shared primal pass saves (1.8M-parameter ViT: 3.5 gradients per
      vector in blocks of 8, against 2.4 with one graph per call, ``benchmarks/hessian.md``); on a GPU batching
      fills the device.
    """

    matrix = "hessian"

    def __init__(self, loss: LossFunction, *, callback: Callable[[int], Any] | None = None, product: str = "auto"):
        if product not in PRODUCTS:
            raise ConfigError(f"Unknown Hessian-vector product {product!r}; accepted are {', '.join(PRODUCTS)}.")
        super().__init__(loss, callback=callback)
        if product == "auto":  # every process must choose alike: they meet in the same collectives
            several = float(loss.data.num_batches > 1)
            if loss.data_parallel is not None:
                several = float(loss.all_reduce(torch.tensor([several], device=loss.device)))
            if not several:
                product = "kept-graph"
            else:
                product = "forward-over-reverse" if loss.device.type == "cuda" else "double-backward"
        self.strategy = product
        """The product strategy in use (``"auto"`` resolved)."""
        self.kept = KeptGraphProducts(loss) if product == "kept-graph" else None

    def product(self, vectors: Tensor) -> Tensor:
        """:math:`H V`."""
        if self.kept is not None:
            return self.kept.matmat(vectors)
        if self.strategy == "double-backward":
            return DoubleBackward(self.loss).matmat(vectors)
        return ForwardOverReverse(self.loss, self.vectors_per_pass).matmat(vectors)

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """:math:`(L, \\nabla L)` at the operator's parameters; free once a kept graph is built."""
        if self.kept is not None:
            self.kept.build()
            return self.kept.loss_value, self.kept.gradient
        return self.loss.loss_and_gradient()

    def release(self) -> None:
        """Free a kept graph (the next product builds it again)."""
        if self.kept is not None:
            self.kept.release()


# -- Gauss-Newton and Fisher matrices -----------------------------------------------------------------------------
class OutputCurvatureOperator(CurvatureOperator):
    """A curvature matrix of the form :math:`\\sum_b w_b J_b^\\top M_b J_b`, :math:`w_b` the loss's batch weights
    (:math:`n_b / N`, :meth:`~landscape.curvature.loss.LossFunction.batch_weights`).

    :math:`J_b = \\partial z_b / \\partial \\theta` is the Jacobian of batch :math:`b`'s network outputs
    :math:`z_b \\in \\mathbb{R}^{n_b \\times C}` and :math:`M_b` a positive semi-definite matrix on the outputs that
    each subclass defines (:meth:`output_product`, the product :math:`M_b u` for a tangent :math:`u = J_b v` of the
    outputs' shape). A product is one forward-mode pass :math:`u = J_b v` (:func:`torch.func.jvp`), the output
    product, and one reverse pass :math:`J_b^\\top (M_b u)` (:func:`torch.func.vjp`, its forward pass shared by the
    columns of a block), per batch. Products are never formed from per-example gradients.
    """

    def output_product(self, batch: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """:math:`M_b u` for batch number ``batch`` with outputs ``(n_b, C)`` and a tangent ``u`` ``(n_b, C)``."""
        raise NotImplementedError

    def prepare_batch(self, batch: int, outputs: Tensor, targets: Tensor) -> None:
        """Called with each batch's outputs and targets before its products (outside :func:`torch.func.vmap`)."""

    def product(self, vectors: Tensor) -> Tensor:
        """:math:`\\sum_b \\frac{n_b}{N} J_b^\\top M_b J_b V`, :attr:`vectors_per_pass` columns through
        :func:`torch.func.vmap` together."""
        lf = self.loss
        primals = lf.parameters()
        result = torch.zeros_like(vectors)
        step = max(1, self.vectors_per_pass)
        with evaluation_mode(lf.model):
            for b, (w, x, y) in enumerate(lf.weighted_batches()):
                def outputs(variables: dict[str, Tensor], x=x) -> Tensor:
                    return lf.batch_outputs(variables, x)

                z, pullback = torch.func.vjp(outputs, primals)
                z = z.detach()
                self.prepare_batch(b, z, y)

                def column(tangent: dict[str, Tensor], b=b, z=z, y=y, pullback=pullback) -> dict[str, Tensor]:
                    u = torch.func.jvp(outputs, (primals,), (tangent,))[1]
                    return pullback(self.output_product(b, z, y, u))[0]

                for start in range(0, vectors.shape[1], step):
                    block = vectors[:, start:start + step]
                    products = torch.func.vmap(column)(lf.unflatten(block))
                    result[:, start:start + block.shape[1]].add_(lf.flatten(products), alpha=w)
        return lf.all_reduce(result)


class GGNOperator(OutputCurvatureOperator):
    """The generalised Gauss-Newton matrix :math:`G = \\sum_b \\frac{n_b}{N} J_b^\\top H_b J_b` (Schraudolph 2002)
    with :math:`H_b = \\nabla_z^2 \\bar\\ell_b(z)` the Hessian of the batch's mean loss with respect to the outputs
    (reverse-over-reverse through the criterion). It is the Hessian without the term
    :math:`\\sum_i \\nabla_z \\ell_i \\cdot \\nabla_\\theta^2 z_i` of the network's own curvature, and positive
    semi-definite for a convex criterion. For softmax cross-entropy
    :math:`H = (\\operatorname{diag}(p) - p p^\\top) / n_b` per example, which is also the true Fisher's.
    """

    matrix = "ggn"

    def output_product(self, batch: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        # H_b is symmetric, so H_b u is the pullback of u through the criterion's gradient (reverse over reverse,
        # on the outputs only: cheap). Forward over reverse fails inside torch for criteria whose output Hessian is
        # constant (mse_loss: "ZeroTensors are immutable").
        gradient = torch.func.grad(lambda z: self.loss.criterion(z, targets))
        return torch.func.vjp(gradient, outputs)[1](u)[0]


def _check_softmax_classifier(loss: LossFunction, what: str) -> None:
    """A softmax classifier's loss: cross-entropy in any of its spellings (landscape's, ``F.cross_entropy``,
    ``nn.CrossEntropyLoss``, with label smoothing or class weights): the Fisher is the model's, whatever the
    criterion does with the labels."""
    if not _is_cross_entropy(loss.criterion):
        raise ConfigError(f"The {what} is defined here for softmax classifiers, whose loss is a cross-entropy; this "
                          "loss has another criterion (use the matrix ggn or hessian: --matrix, or matrix= in "
                          "the notebook API).")


class FisherOperator(OutputCurvatureOperator):
    """The (true) Fisher information :math:`F = \\frac1N \\sum_i E_{\\hat y \\sim p(\\cdot | x_i)} [\\nabla_\\theta
    \\log p(\\hat y | x_i) \\nabla_\\theta \\log p(\\hat y | x_i)^\\top]` of the softmax model :math:`p =
    \\operatorname{softmax}(z)`, labels drawn from the model's own predictive distribution.

    - ``samples=None``: the expectation is exact, :math:`E[(e_{\\hat y} - p)(e_{\\hat y} - p)^\\top] =
      \\operatorname{diag}(p) - p p^\\top` per example. That is the Hessian of cross-entropy in the logits, so for
      softmax cross-entropy the true Fisher *equals* the generalised Gauss-Newton matrix (Martens 2020, Sec. 9.2);
    - ``samples=S``: a Monte Carlo estimate with ``S`` labels per example drawn (seeded with ``seed``, once per
      batch, fixed for the operator's lifetime so that it is one symmetric matrix):
      :math:`\\frac{1}{N S} \\sum_{i, s} g_{is} g_{is}^\\top`, :math:`g_{is} = J_i^\\top (e_{\\hat y_{is}} - p_i)`.

    With a cross-entropy that counts its targets otherwise (``ignore_index``, class weights:
    :func:`~landscape.curvature.loss.example_weights` :math:`c_i`) the mean is the loss's, :math:`\\sum_i c_i F_i /
    \\sum_i c_i`: an ignored example (padding) is not in it, and the exact Fisher stays the GGN of that loss
    (but for class weights with label smoothing, whose smoothing term weighs every class's log-probability).
    """

    matrix = "fisher"

    def __init__(self, loss: LossFunction, *, samples: int | None = None, seed: int = 0,
                 callback: Callable[[int], Any] | None = None):
        _check_softmax_classifier(loss, "true Fisher")
        if samples is not None and samples < 1:
            raise ConfigError(f"--fisher-samples must be a positive integer, not {samples}.")
        super().__init__(loss, callback=callback)
        self.samples = samples
        self.seed = int(seed)
        self.sampled_labels: dict[int, Tensor] = {}
        self.shares: dict[int, Tensor | None] = {}

    def labels(self, batch: int, probabilities: Tensor) -> Tensor:
        """The ``(S, n_b)`` labels drawn for batch ``batch`` (drawn on first use, on the CPU, then kept)."""
        if batch not in self.sampled_labels:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch)
            draws = torch.multinomial(probabilities.detach().double().cpu(), self.samples, replacement=True,
                                      generator=generator)
            self.sampled_labels[batch] = draws.T.contiguous()
        return self.sampled_labels[batch].to(probabilities.device)

    def prepare_batch(self, batch: int, outputs: Tensor, targets: Tensor) -> None:
        if self.samples is not None:  # random draws are not allowed under vmap: the labels are drawn here
            self.labels(batch, torch.softmax(outputs, dim=-1))
        if batch not in self.shares:
            self.shares[batch] = self._shares(outputs, targets)

    def _shares(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """Each example's share :math:`c_i / C_b` of the batch's mean, ``(n, 1)``, when the loss counts the batch's
        examples unequally (``None``: :math:`1 / n_b` each); the batch's own weight :math:`C_b / C` is applied
        outside. Logits of another shape than ``(n, C)`` are refused: the softmax here is over their last axis."""
        if outputs.dim() != 2:
            raise LandscapeError(
                f"The true Fisher is defined here for logits of shape (examples, classes); the model's outputs have "
                f"shape {tuple(outputs.shape)} (a class axis beside others, as for sequences or pixels). For "
                "cross-entropy the exact Fisher equals the GGN: measure the matrix ggn.")
        return example_shares(self.loss.criterion, outputs, targets)

    def output_product(self, batch: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        n = outputs.shape[0]
        share = self.shares.get(batch)
        p = torch.softmax(outputs, dim=-1)
        if self.samples is None:
            pu = p * u
            curvature = pu - p * pu.sum(-1, keepdim=True)
            return curvature / n if share is None else curvature * share
        labels = self.labels(batch, p)  # (S, n)
        residual = torch.nn.functional.one_hot(labels, p.shape[-1]).to(p) - p  # (S, n, C)
        summed = (residual * (residual * u).sum(-1, keepdim=True)).sum(0) / self.samples
        return summed / n if share is None else summed * share


class EmpiricalFisherOperator(OutputCurvatureOperator):
    """The empirical Fisher :math:`\\hat F = \\frac1N \\sum_i g_i g_i^\\top` with :math:`g_i = \\nabla_\\theta
    \\ell(z_i, y_i)` the per-example gradients at the true labels (any criterion that averages over examples).

    Computed as :math:`J^\\top M J` with :math:`M_i = r_i r_i^\\top / n_b`, :math:`r_i = \\nabla_{z_i} \\ell(z_i,
    y_i)` (:math:`n_b` times the gradient of the batch mean with respect to :math:`z_i`), which is the same matrix
    since :math:`g_i = J_i^\\top r_i`. For a cross-entropy that counts its examples unequally (``ignore_index``,
    class weights :math:`c_i`: :func:`~landscape.curvature.loss.example_weights`) the mean is the loss's,
    :math:`\\sum_i c_i g_i g_i^\\top / \\sum_i c_i`, each :math:`g_i` its own example's unweighted gradient. Unlike the Fisher it is not a curvature of the model's likelihood, and it
    vanishes where every example is fitted (Kunstner, Hennig & Balles 2019).
    """

    matrix = "empirical-fisher"

    def __init__(self, loss: LossFunction, *, callback: Callable[[int], Any] | None = None):
        super().__init__(loss, callback=callback)
        self.counted: dict[int, int] = {}
        self.shares: dict[int, Tensor | None] = {}

    def prepare_batch(self, batch: int, outputs: Tensor, targets: Tensor) -> None:
        if batch not in self.counted:
            self.counted[batch] = counted_examples(self.loss.criterion, outputs, targets)
            self.shares[batch] = example_shares(self.loss.criterion, outputs, targets)

    def output_product(self, batch: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        # n_b times the gradient of the batch mean is r_i when the mean is over the batch's n_b examples; a mean
        # over the V_b examples the criterion counts (ignore_index) needs V_b: with n_b the matrix came out n_b / V_b
        # times too large. Each example's r_i is a vector over all its outputs (a sequence's tokens, say).
        gradient = torch.func.grad(lambda z: self.loss.criterion(z, targets))(outputs)
        dims = tuple(range(1, outputs.dim()))
        share = self.shares.get(batch)
        if share is not None:  # examples counted unequally (class weights): the batch mean's gradient is s_i r_i
            # s_i r_i (r_i . u) with r_i = gradient_i / s_i: each example by its share, at its own loss's gradient
            scale = torch.where(share > 0, 1 / share.clamp_min(torch.finfo(share.dtype).tiny), 0)
            return gradient * (gradient * u).sum(dims, keepdim=True) * scale.reshape(-1, *[1] * len(dims))
        n = self.counted.get(batch) or outputs.shape[0]
        residual = n * gradient
        return residual * (residual * u).sum(dims, keepdim=True) / n


def example_shares(criterion: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor) -> Tensor | None:
    """Each example's share :math:`c_i / C_b` of a batch mean that counts its examples unequally
    (:func:`~landscape.curvature.loss.example_weights`: class weights, ignored targets), ``(n_b, 1)`` in the outputs'
    dtype and device; ``None`` when every example of the batch counts the same (a plain mean: :math:`1 / n_b`)."""
    counted = example_weights(criterion, targets)
    if counted is None or len(counted) != outputs.shape[0] or not float(counted.sum()) > 0:
        return None
    if bool((counted == counted[0]).all()):
        return None
    return (counted / counted.sum()).to(outputs.device, outputs.dtype)[:, None]


def counted_examples(criterion: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor) -> int:
    """How many of the batch's examples the criterion's mean is over: those whose loss alone is a number (an
    example whose every target is ``ignore_index`` gives 0/0); every example when one cannot be taken alone."""
    n = outputs.shape[0]
    counted = 0
    with torch.no_grad():
        for i in range(n):
            try:
                value = criterion(outputs[i:i + 1], targets[i:i + 1])
            except Exception:  # noqa: BLE001  (a criterion that needs more than one example)
                return n
            counted += bool(torch.isfinite(value).all())
    return counted or n


def curvature_operator(loss: LossFunction, matrix: str = "hessian", *, callback: Callable[[int], Any] | None = None,
                       product: str = "auto", fisher_samples: int | None = None, seed: int = 0) -> CurvatureOperator:
    """The operator of ``matrix`` (one of :data:`MATRICES`) for ``loss``: :class:`HessianOperator` (with
    ``product``), :class:`GGNOperator`, :class:`FisherOperator` (exact, or ``fisher_samples`` labels per example
    drawn with ``seed``) or :class:`EmpiricalFisherOperator`."""
    if matrix == "hessian":
        return HessianOperator(loss, callback=callback, product=product)
    if matrix == "ggn":
        return GGNOperator(loss, callback=callback)
    if matrix == "fisher":
        return FisherOperator(loss, samples=fisher_samples, seed=seed, callback=callback)
    if matrix == "empirical-fisher":
        return EmpiricalFisherOperator(loss, callback=callback)
    raise ConfigError(f"Unknown curvature matrix {matrix!r}; accepted are {', '.join(MATRICES)}.")
