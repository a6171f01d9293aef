"""CRC32C (Castagnoli, as in iSCSI and gRPC/GCS checksums), vectorised with numpy.

A CRC is linear over GF(2), so the bytes are cut into many equal segments whose CRCs
are computed side by side (one numpy operation advances every segment by 4 bytes) and
then folded pairwise: crc(A + B) = shift(crc(A), len(B)) ^ crc(B). Each linear map on
the 32-bit state is applied through two 65536-entry tables (low and high half-word).
"""
from __future__ import annotations

import functools

import numpy as np

POLY = 0x82F63B78  # reflected Castagnoli polynomial
_SEGMENT = 512     # bytes per segment in the vectorised pass (a multiple of 4)


def _byte_table() -> list:
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (POLY if c & 1 else 0)
        table.append(c)
    return table


_TABLE = _byte_table()


def _zero_byte(s: int) -> int:
    return _TABLE[s & 0xFF] ^ (s >> 8)


def _columns(nbytes: int) -> tuple:
    """Images of the 32 unit states after feeding `nbytes` zero bytes (columns of the shift matrix)."""
    if nbytes == 1:
        return tuple(_zero_byte(1 << j) for j in range(32))
    half = _columns(nbytes // 2)
    cols = tuple(_apply_cols(half, c) for c in half)
    return tuple(_apply_cols(_columns(1), c) for c in cols) if nbytes % 2 else cols


def _apply_cols(cols, s: int) -> int:
    out = 0
    for j in range(32):
        if s >> j & 1:
            out ^= cols[j]
    return out


@functools.lru_cache(maxsize=64)
def _shift_tables(nbytes: int):
    """(low, high) uint32 tables of the map 'feed nbytes zero bytes' on 16-bit halves of the state."""
    cols = np.array(_columns(nbytes), dtype=np.uint32)
    bits = ((np.arange(65536, dtype=np.uint32)[:, None] >> np.arange(16, dtype=np.uint32)) & 1).astype(bool)
    low = np.bitwise_xor.reduce(np.where(bits, cols[None, :16], 0), axis=1).astype(np.uint32)
    high = np.bitwise_xor.reduce(np.where(bits, cols[None, 16:], 0), axis=1).astype(np.uint32)
    return low, high


def _shift(state: np.ndarray, nbytes: int) -> np.ndarray:
    low, high = _shift_tables(nbytes)
    return low[state & 0xFFFF] ^ high[state >> 16]


def _scalar(state: int, data) -> int:
    for b in bytes(data):
        state = _TABLE[(state ^ b) & 0xFF] ^ (state >> 8)
    return state


def _segments(data: np.ndarray) -> int:
    """Raw CRC state (zero start) of `data`, whose length is segments * _SEGMENT with a power-of-two count."""
    words = data.view("<u4").reshape(-1, _SEGMENT // 4)
    state = np.zeros(words.shape[0], dtype=np.uint32)
    for i in range(words.shape[1]):
        state = _shift(state ^ words[:, i], 4)
    length = _SEGMENT
    while state.shape[0] > 1:
        state = _shift(state[0::2], length) ^ state[1::2]
        length *= 2
    return int(state[0])


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of a bytes-like `data`, continuing from `crc` (the CRC of the bytes before it)."""
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    state = crc ^ 0xFFFFFFFF
    pos = 0
    while len(buf) - pos >= 2 * _SEGMENT:
        count = 1 << ((len(buf) - pos) // _SEGMENT).bit_length() - 1
        n = count * _SEGMENT
        state = int(_shift(np.array([state], dtype=np.uint32), n)[0]) ^ _segments(buf[pos:pos + n])
        pos += n
    return _scalar(state, buf[pos:]) ^ 0xFFFFFFFF


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C of A + B from crc(A), crc(B) and len(B), without the bytes."""
    if len_b == 0:
        return crc_a
    # crc(A+B) = shift(crc(A) ^ ~0, len B) ^ (raw crc of B) ^ ~0, and raw(B) = crc(B) ^ ~0 ^ shift(~0, len B)
    ones = np.array([0xFFFFFFFF], dtype=np.uint32)
    shifted = int(_shift(np.array([crc_a ^ 0xFFFFFFFF], dtype=np.uint32), len_b)[0])
    return shifted ^ crc_b ^ int(_shift(ones, len_b)[0])
