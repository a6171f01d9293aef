"""The layers read one way: kernels <- protocol <- {server, client} <- cli (ARCHITECTURE.md).

Every import in a folder's modules counts, those inside functions included: a lazy import is still a
dependency of the layer.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kernels": "quantd.kernels", "protocol": "quantd.protocol", "server": "quantd.server",
            "client": "quantd.client", "cli": "quantd.cli"}
# What each layer may not import (quantd.v1, the generated stubs, belongs to the protocol layer).
FORBIDDEN = {
    "kernels": ("quantd.protocol", "quantd.v1", "quantd.server", "quantd.client", "quantd.cli"),
    "protocol": ("quantd.server", "quantd.client", "quantd.cli"),
    "server": ("quantd.client", "quantd.cli"),
    "client": ("quantd.server", "quantd.cli"),
}


def imported_modules(path: Path, package: str):
    """Absolute names of every module (or module.attribute) `path` imports, relative ones resolved against `package`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # `from quantd import server` imports quantd.server
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            yield from (f"{module}.{alias.name}" for alias in node.names)


def violations(folder: str):
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module in imported_modules(path, PACKAGES[folder]):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[folder]):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_only_what_is_below_it(folder):
    assert violations(folder) == []


def test_the_scan_sees_relative_and_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from . import wire\nfrom ..server import app\nfrom quantd import cli\n"
                      "def f():\n    import quantd.client.api\n")
    assert list(imported_modules(module, "quantd.protocol")) == [
        "quantd.protocol.wire", "quantd.server.app", "quantd.cli", "quantd.client.api"]


def test_client_commands_load_no_server_code():
    code = ("import sys\nfrom quantd.cli.main import main\n"
            "try:\n    main(['quantize', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('quantd.server')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "--format" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
