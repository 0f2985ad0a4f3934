"""Models and weights: loading, safetensors weights, restore contexts, evaluation, analysis inputs."""
