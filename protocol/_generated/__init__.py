"""Generated gRPC stubs (import package `quantd.v1`); regenerate with protos/generate.py, never edit."""
