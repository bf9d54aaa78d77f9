#!/usr/bin/env python3
"""Independent reference for hybrid/src/kdf.rs: prints the known-answer vectors its tests pin."""
import hashlib
import hmac


def h(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.blake2s).digest()


def kdf(label: bytes, hh: bytes, ss: bytes, prev: bytes):
    temp = h(prev, label, b"\x00", hh, ss)
    out1 = h(temp, b"\x01")
    out2 = h(temp, out1, b"\x02")
    return out1, out2


a, b = kdf(b"lattice peer-psk v1", bytes([1]) * 32, bytes([2]) * 32, bytes(32))
print("KAT_ZERO_1", a.hex())
print("KAT_ZERO_2", b.hex())
a, b = kdf(b"lattice control v1", bytes([4]) * 32, bytes([5]) * 32, bytes([3]) * 32)
print("KAT_CHAIN_1", a.hex())
print("KAT_CHAIN_2", b.hex())
print("KAT_ID", h(b"lattice psk id v1", bytes([7]) * 32)[:8].hex())
