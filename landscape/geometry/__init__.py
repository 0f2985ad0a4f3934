"""Parameter-space geometry: directions, grids of weights, surfaces and interpolations."""
