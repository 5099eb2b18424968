"""Ed25519 keys and signatures (``cryptography``); keys travel as 64-character hex strings.

Pure: key *bytes* in and out, no files. The PEM helpers convert to and from the standard
PKCS#8 / SubjectPublicKeyInfo encodings that ``openssl pkey`` reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import InputError, SignatureError
from protocol.wire import is_hex

__all__ = ["SigningKey", "verify_signature", "public_key_from_pem", "public_key_to_pem", "key_id"]


def key_id(public_key_hex: str) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key with its public half as hex."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as error:
            raise InputError(f"not a PEM private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError(f"expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)

    def to_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_key_hex(self) -> str:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return raw.hex()

    def sign(self, message: bytes) -> str:
        return self.private.sign(message).hex()

    def libp2p_identity(self) -> bytes:
        """This key as a libp2p private key file (protobuf PrivateKey: Type Ed25519, Data = seed ‖
        public key): the peer's libp2p id is then ``protocol.multiaddr.libp2p_id_of`` its public key."""
        seed = self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
        return bytes([0x08, 0x01, 0x12, 0x40]) + seed + bytes.fromhex(self.public_key_hex)


def verify_signature(public_key_hex: str, message: bytes, signature_hex: str, *, what: str) -> None:
    """Raise ``SignatureError`` naming ``what`` unless the signature verifies."""
    if not is_hex(public_key_hex, 64):
        raise SignatureError(f"{what}: public key is not 32 bytes of hex")
    if not is_hex(signature_hex, 128):
        raise SignatureError(f"{what}: signature is not 64 bytes of hex")
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    try:
        key.verify(bytes.fromhex(signature_hex), message)
    except InvalidSignature:
        raise SignatureError(f"{what}: signature does not verify under key {key_id(public_key_hex)}") from None


def public_key_to_pem(public_key_hex: str) -> bytes:
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_from_pem(pem: bytes) -> str:
    """Hex of the raw public key in a PEM file (or a bare 64-hex-digit line)."""
    text = pem.strip()
    if is_hex(text.decode("ascii", "replace"), 64):
        return text.decode("ascii")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as error:
        raise InputError(f"not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"expected an Ed25519 public key, got {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
