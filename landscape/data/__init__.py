"""Tasks and data: the task registry, readers, tokenisation, metrics, per-example losses."""
