"""Figures from result files only (matplotlib, plotly, VTK, the HTML report).

Not implemented yet: they arrive with the figures issue. This package never imports or runs models.
"""
