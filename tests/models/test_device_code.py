"""A tensor created on the CPU inside device code breaks on a GPU (``stack`` of a CUDA and a CPU tensor raises) or
silently moves work to the CPU; on a machine without GPU nothing shows it. This check reads the device code and
fails on any tensor factory call that names no ``device=`` and is not moved at once (``.to(...)``), unless a
``# cpu:`` comment on that line or the line above says why the CPU is right (row indices, seeded draws, counts
the collectives move, results stored from the CPU)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEVICE_CODE = ["optimizers", "analyses", "landscape/geometry", "landscape/models", "landscape/training"]
FACTORIES = {
    "zeros", "ones", "empty", "full", "randn", "rand", "randint", "randperm", "arange", "linspace", "eye", "tensor",
    "as_tensor", "from_numpy",
}  # fmt: skip


def cpu_tensor_creations(source: str) -> list[int]:
    """Line numbers of torch factory calls without ``device=``, not moved at once, and without a ``# cpu:`` reason."""
    tree = ast.parse(source)
    lines = source.splitlines()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if node.func.attr not in FACTORIES or not (isinstance(owner, ast.Name) and owner.id == "torch"):
            continue
        if any(keyword.arg == "device" for keyword in node.keywords):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr == "to":
            continue
        nearby = lines[max(0, node.lineno - 2) : node.lineno]
        if any("# cpu:" in line for line in nearby):
            continue
        found.append(node.lineno)
    return found


def test_device_code_creates_no_tensor_on_the_cpu_without_a_reason():
    offenders = []
    for root in DEVICE_CODE:
        for path in sorted((REPO / root).rglob("*.py")):
            offenders += [f"{path.relative_to(REPO)}:{n}" for n in cpu_tensor_creations(path.read_text())]
    assert not offenders, "tensors created on the CPU in device code: " + ", ".join(offenders)


def test_the_check_sees_the_mistake_it_is_for():
    leak = "def f(x):\n    return torch.stack([x.sum(), torch.tensor(1.0)])\n"
    assert cpu_tensor_creations(leak) == [2]
    fixed = [
        "def f(x):\n    return torch.stack([x.sum(), torch.tensor(1.0, device=x.device)])\n",
        "def f(x):\n    return torch.arange(3).to(x.device)\n",
        "def f(x):\n    # cpu: row indices\n    return torch.arange(3)\n",
    ]
    assert all(cpu_tensor_creations(source) == [] for source in fixed)
