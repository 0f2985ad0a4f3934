"""Measurements on checkpoints; this package never trains (except through the trainer, for transfer) or plots.

- :mod:`analyses.fisher`: the per-example empirical Fisher diagonal (FSAM Eq. 9) and the FSAM mask;
- :mod:`analyses.fisher_distribution`: its distributions per layer and module type, mask shares and IoU;
- :mod:`analyses.hessian`: the Hessian-vector-product operator of a model on an example subset, PyHessian backend;
- :mod:`analyses.spectral`: Lanczos, power iteration, Hutchinson, Hutch++ and stochastic Lanczos quadrature on
  any symmetric operator;
- :mod:`analyses.sharpness`: ε-, adaptive, average and per-instance sharpness;
- :mod:`analyses.transfer`: cross-task transfer (FSAM Fig. 3).
"""
