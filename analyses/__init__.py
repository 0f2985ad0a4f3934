"""Measurements on checkpoints.

Built: the empirical Fisher and the FSAM mask (:mod:`analyses.fisher`). To come (the analyses issue): Hessian
spectrum, Fisher distributions, sharpness metrics, cross-task transfer. This package never trains or plots.
"""
