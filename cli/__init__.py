"""The `quantd` command line (quantd.cli.main): quantize, dequantize and info through quantd.client; serve
through quantd.server."""
