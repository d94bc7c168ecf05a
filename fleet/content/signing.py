"""Ed25519 signatures over content packages (docs/content.md "Signature").

The signed message is 54 bytes, short enough for a terminal to verify with its own Ed25519
code after it hashed the package while downloading it:

    b"palaute-content\\x00" + u16le(version) + u32le(size) + sha256(package)

The private key is a raw 32-byte seed in a file readable only by its owner (0600), named by
``PALAUTE_CONTENT_KEY_FILE``; ``palaute content keygen`` makes one.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DOMAIN = b"palaute-content\x00"
SEED_BYTES = 32


class ContentKeyError(Exception):
    """The content key file is missing, unreadable, too open or not a 32-byte seed."""


def signed_message(version: int, package: bytes) -> bytes:
    """The 54-byte message whose Ed25519 signature a terminal checks."""
    return DOMAIN + struct.pack("<HI", version, len(package)) + hashlib.sha256(package).digest()


def generate_key_file(path: Path) -> Ed25519PrivateKey:
    """Write a new random seed to ``path`` (mode 0600) and return the key.

    Refuses to overwrite an existing file: replacing the key orphans every terminal that
    holds the old public key.
    """
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ContentKeyError(f"{path} already exists; terminals trust the key it holds, so "
                              "it is never overwritten (choose another path)") from None
    except OSError as exc:
        raise ContentKeyError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(seed)
    return key


def load_key_file(path: Path) -> Ed25519PrivateKey:
    """Load the signing key from a 0600 file holding a raw 32-byte seed."""
    try:
        mode = path.stat().st_mode
        seed = path.read_bytes()
    except FileNotFoundError:
        raise ContentKeyError(f"content key file {path} does not exist; create one with "
                              "`palaute content keygen --out FILE`") from None
    except OSError as exc:
        raise ContentKeyError(f"cannot read content key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ContentKeyError(f"content key file {path} is readable by others "
                              f"(mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`")
    if len(seed) != SEED_BYTES:
        raise ContentKeyError(f"content key file {path} holds {len(seed)} bytes, not a "
                              f"{SEED_BYTES}-byte Ed25519 seed")
    return Ed25519PrivateKey.from_private_bytes(seed)


def load_configured_key(key_file: str) -> Ed25519PrivateKey:
    """The key named by the ``content_key_file`` setting (``PALAUTE_CONTENT_KEY_FILE``)."""
    if not key_file:
        raise ContentKeyError("PALAUTE_CONTENT_KEY_FILE is not set; create a key with "
                              "`palaute content keygen --out FILE` and point it there")
    return load_key_file(Path(key_file))


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The 64 hex digits terminals hold in ``config.json`` key ``content_key``."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign(key: Ed25519PrivateKey, version: int, package: bytes) -> bytes:
    """The 64-byte signature of ``package`` as content ``version``."""
    return key.sign(signed_message(version, package))


def verify(public_hex: str, version: int, package: bytes, signature: bytes) -> bool:
    """True when ``signature`` is the key's signature of ``package`` as ``version``."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
    except ValueError:
        return False
    try:
        public.verify(signature, signed_message(version, package))
    except InvalidSignature:
        return False
    return True
