"""Provenance of a result: the versions that determine its numbers and the toolkit's git revision."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def environment_versions() -> dict[str, str]:
    """Versions of what determines the numbers: Python, torch, transformers, numpy, and the toolkit."""
    import numpy as np
    import torch
    import transformers

    import landscape

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "landscape": landscape.__version__,
        "platform": platform.platform(),
    }


def git_revision() -> str | None:
    """The toolkit's git revision (with ``-dirty`` when the work tree has changes), or None outside a checkout."""
    source = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")
