"""quantd's client: QuantdClient (torch tensors and numpy arrays in, QuantizedTensor out), QuantdError, the CLI.

The names load on first use, so modules that need only grpc (client.channels, the health probe) stay light.
"""
__all__ = ["AmaxHistory", "QuantdClient", "QuantdError", "QuantizeResult"]


def __getattr__(name):
    if name == "AmaxHistory":
        from .scaling import AmaxHistory
        return AmaxHistory
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
