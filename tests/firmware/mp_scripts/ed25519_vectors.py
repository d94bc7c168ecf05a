"""Verify Ed25519 vectors with the firmware's verifier; run by tests/firmware/test_ed25519.py.

Usage: micropython ed25519_vectors.py VECTORS.json [once|baseline]
(MICROPYPATH must include the firmware, as source or compiled .mpy.)

VECTORS.json is a list of ``[public_hex, message_hex, signature_hex]``.  Prints ``R index
True|False`` per vector and ``T microseconds`` per verify.  ``once`` verifies only the first
vector (for heap bisection: exit status 0 means it fit); ``baseline`` loads the vectors and
verifies nothing, so the difference in the smallest heap that works is the verifier's cost.
"""

import json
import sys
import time


def unhex(text):
    return bytes(int(text[i:i + 2], 16) for i in range(0, len(text), 2))


def main():
    with open(sys.argv[1]) as f:
        vectors = [[unhex(x) for x in item] for item in json.load(f)]
    mode = sys.argv[2] if len(sys.argv) > 2 else "all"
    if mode == "baseline":
        print("B", len(vectors))
        return
    if mode == "once":
        vectors = vectors[:1]
    from terminal import ed25519

    for index, (public, message, signature) in enumerate(vectors):
        start = time.ticks_us()
        ok = ed25519.verify(public, message, signature)
        print("R", index, ok)
        print("T", time.ticks_diff(time.ticks_us(), start))


main()
