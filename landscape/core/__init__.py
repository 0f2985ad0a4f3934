"""The toolkit's core: errors, atomic writes, parameter dicts, provenance, the results format, run directories."""
