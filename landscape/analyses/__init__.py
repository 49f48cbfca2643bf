"""Measurements of the loss landscape at a run's checkpoints.

Each analysis is a function ``(model, evaluation data, settings) -> xarray.Dataset`` plus a driver that runs it
over the checkpoints of a run and keeps the results in ``RUN/analysis/<name>.nc``:

- :mod:`.curvature`: the loss over a fixed evaluation set, its gradient and Hessian-vector products, the
  Hessian as a linear operator;
- :mod:`.hessian`: extreme eigenvalues, trace and spectral density (``landscape analyze hessian``);
- :mod:`.sharpness`, :mod:`.surface`, :mod:`.dynamics`: sharpness, loss surfaces, training curves;
- :mod:`.results`: the resumable per-checkpoint results files every analysis shares.
"""
