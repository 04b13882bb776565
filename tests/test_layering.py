"""The packages of torch_ucp depend on each other in one direction only (docs/ARCHITECTURE.md).

``metadata`` is the format and knows nothing of how it is planned or stored; ``patterns`` map
tensors through it; ``planner`` (DCP planning) and ``storage`` (bytes on a store) are siblings
that meet only in the format and in the planner protocols of ``storage.protocols``; the async
package, interop (readers of other formats), tools (export, convert) and the CLI sit on top.
Checked on the source, so a stray import fails here rather than as an import cycle at some
user's site.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torch_ucp

ROOT = Path(torch_ucp.__file__).parent

# package -> torch_ucp packages/modules it must not import (module-level or inside functions)
FORBIDDEN = {
    "metadata": {"planner", "storage", "patterns", "asynchronous", "interop", "cli", "api",
                 "checkpoint", "management", "integrations", "demo", "tools"},
    "patterns": {"planner", "storage", "asynchronous", "interop", "cli", "api", "checkpoint", "tools"},
    "storage": {"planner", "patterns", "asynchronous", "interop", "cli", "api", "management",
                "integrations", "demo", "tools"},
    "planner": {"storage", "asynchronous", "interop", "cli", "api", "management", "integrations", "tools"},
    # readers of other formats; the tools (export, convert) and the CLI build on them
    "interop": {"asynchronous", "cli", "api", "management", "integrations", "demo", "tools"},
    "tools": {"cli", "asynchronous", "api", "management", "integrations", "demo"},
}


def _imports(path: Path) -> set[str]:
    """The first component after ``torch_ucp.`` of every torch_ucp import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "torch_ucp" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_below_it(package):
    bad = {
        str(path.relative_to(ROOT.parent)): sorted(_imports(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in bad.items() if v}, f"{package} imports packages above it"
