"""The `quantd` command line: quantize, dequantize and info through quantd.client; serve through quantd.server."""
from .main import main, parser

__all__ = ["main", "parser"]
