"""The mathematics of curvature, knowing nothing of runs, files or checkpoints.

- :mod:`~landscape.curvature.loss`: the loss over a fixed evaluation set (loss, gradient, evaluation).
- :mod:`~landscape.curvature.products`: Hessian-vector products (forward-over-reverse, double backward, kept graph).
- :mod:`~landscape.curvature.operators`: the Hessian, Gauss-Newton and Fisher matrices as linear operators; probes.
- :mod:`~landscape.curvature.lanczos`, :mod:`~landscape.curvature.trace`, :mod:`~landscape.curvature.density`,
  :mod:`~landscape.curvature.sharpness`, :mod:`~landscape.curvature.directions`: one estimator family per file,
  each taking an operator or a loss closure.
"""
