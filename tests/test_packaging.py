"""The wheel ships quantd.kernels, .protocol, .server, .client and .cli, and no top-level client or server module."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    # A copy of the tree, so no stale build/ directory leaks old files into the wheel.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", ".venv"))
    # No build isolation: the test extras install setuptools, and CI need not fetch it again.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("quantd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("kernels", "protocol", "server", "client", "cli"):
        assert f"quantd/{package}/__init__.py" in names
    assert "quantd/kernels/reference.py" in names and "quantd/kernels/cpu.py" in names
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"quantd"}, f"unexpected top-level entries in the wheel: {sorted(top - {'quantd'})}"
    assert not any(n.startswith(("client/", "server/", "kernels/", "protocol/", "cli/")) or n in ("client.py", "server.py", "cli.py", "protocol.py") for n in names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["quantd"]
