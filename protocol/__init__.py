"""What server and client share: the wire protocol of quantd.v1.

    quantd.v1          the generated messages and stubs (protos/quantd/v1/quantd.proto)
    chunks             chunk messages encoded and decoded without protobuf's payload copies
    wire               QuantSpec <-> proto, tensors <-> bytes, dtype names
    crc32c             the chunk checksum

It depends on quantd.kernels.spec (the vocabulary) only; quantd.server and quantd.client import it
and never each other.
"""
