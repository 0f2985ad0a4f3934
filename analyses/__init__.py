"""Measurements on checkpoints (Hessian spectrum, empirical Fisher, sharpness, transfer).

Not implemented yet: they arrive with the analyses issue. This package must not train or plot.
"""
