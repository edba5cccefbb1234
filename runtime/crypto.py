"""Encrypted graphs: AES-256-GCM on disk, plaintext only in this process's memory.

``encrypt_bundle`` replaces every ONNX graph ``X`` of a bundle by ``X.enc`` (one
random 96-bit nonce per file) and records, in the manifest's ``encryption``
section, the nonce, the plaintext's sha256 and the key's id. The associated data
binds each ciphertext to its file name and to the sha256 of the plain bundle's
manifest, so a graph cannot be moved to another name or another bundle and still
decrypt. The runtime decrypts into memory and hands the bytes to ONNX Runtime
(``InferenceSession`` accepts a serialized model); the optimised-graph cache is
skipped for such graphs, since it would write an optimised plaintext to disk.

Keys come from a *key provider*, so a device can keep the key in a secure element
or TPM and hand it over at load: 32 raw bytes; a callable returning them; a file
path (32 raw bytes or 64 hex digits); or ``"env:NAME"`` (hex in an environment
variable). TensorRT engines are not encrypted by this module.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Union

from .bundle import MANIFEST, Manifest, Stage, read_manifest, sha256_file, write_bytes_atomic, write_manifest
from .errors import BundleError, DecryptionError, InputError
from .optional import optional_import

ALGORITHM = "AES-256-GCM"
KEY_BYTES = 32
SUFFIX = ".enc"

KeyProvider = Union[bytes, str, "os.PathLike[str]", Callable[[], bytes], None]


def graph_key_id(key: bytes) -> str:
    """Names a key without revealing it (a keyed-purpose sha256 prefix)."""
    return hashlib.sha256(b"edgederm-graph-key\0" + key).hexdigest()[:16]


def new_key_file(path: str | os.PathLike[str]) -> Path:
    """32 random bytes, hex, mode 0600."""
    target = Path(path)
    if target.exists():
        raise InputError(f"{target} exists; a graph key that encrypted released bundles must not be replaced by accident")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    return target


def resolve_key(provider: KeyProvider) -> bytes:
    """The 32-byte key a provider gives (see the module docstring for the forms)."""
    if provider is None:
        raise DecryptionError("this bundle's graphs are encrypted and no key provider was given; "
                              "pass key_provider= (a key file, 'env:VAR' or a callable) or --key-file")
    if callable(provider):
        key = provider()
        where = "the key provider callable"
    elif isinstance(provider, bytes):
        key, where = provider, "the key bytes"
    elif isinstance(provider, str) and provider.startswith("env:"):
        name = provider[4:]
        if name not in os.environ:
            raise DecryptionError(f"key provider {provider!r}: environment variable {name} is not set")
        key, where = _decode_text_key(os.environ[name], f"environment variable {name}"), f"environment variable {name}"
    else:
        path = Path(provider)
        if not path.is_file():
            raise DecryptionError(f"key file {str(path)!r} does not exist; expected 32 bytes (or 64 hex digits)")
        raw = path.read_bytes()
        key = raw if len(raw) == KEY_BYTES else _decode_text_key(raw.decode("ascii", "replace"), f"key file {path}")
        where = f"key file {path}"
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise DecryptionError(f"{where} gave {got}; expected a {KEY_BYTES}-byte AES-256 key")
    return key


def _decode_text_key(text: str, where: str) -> bytes:
    try:
        return bytes.fromhex(text.strip())
    except ValueError as exc:
        raise DecryptionError(f"{where} is not a hex key ({exc}); expected 64 hex digits") from exc


def _aad(name: str, source_manifest: str) -> bytes:
    return b"edgederm-graph-v1\0" + name.encode("utf-8") + b"\0" + source_manifest.encode("ascii")


def _aesgcm(key: bytes) -> Any:
    aead = optional_import("cryptography.hazmat.primitives.ciphers.aead", "encrypted graphs")
    return aead.AESGCM(key)


def encrypt_bundle(bundle: str | os.PathLike[str], key_provider: KeyProvider) -> list[str]:
    """Encrypt every ONNX graph of ``bundle`` in place; returns the new file names.

    Order makes it crash-safe: ciphertexts are written (atomically) first, then the
    manifest that names them, and only then are the plaintext graphs removed. A
    signature no longer matches afterwards and is removed: sign the encrypted bundle.
    """
    root = Path(bundle)
    manifest = read_manifest(root, verify=True)
    if manifest.encryption is not None:
        raise InputError(f"bundle {root} is already encrypted (key {manifest.encryption.key_id})")
    data: dict[str, Any] = copy.deepcopy(dict(manifest.data))
    key = resolve_key(key_provider)
    cipher = _aesgcm(key)
    source = sha256_file(root / MANIFEST)
    records: dict[str, dict[str, Any]] = {}
    plain_files: list[str] = []
    for stage, raw_stage in zip(manifest.stages, data["stages"]):
        for precision, graph in stage.graphs.items():
            name = graph.file
            encrypted_name = name + SUFFIX
            nonce = secrets.token_bytes(12)
            plaintext = manifest.graph_path(stage, precision).read_bytes()
            write_bytes_atomic(root / encrypted_name, cipher.encrypt(nonce, plaintext, _aad(encrypted_name, source)))
            digest = sha256_file(root / encrypted_name)
            records[encrypted_name] = {"nonce": base64.b64encode(nonce).decode("ascii"),
                                       "plaintext_sha256": graph.sha256, "plaintext_file": name}
            data["files"].pop(name, None)
            data["files"][encrypted_name] = {"sha256": digest, "bytes": (root / encrypted_name).stat().st_size}
            raw_stage["graphs"][precision].update(file=encrypted_name, sha256=digest)
            plain_files.append(name)
    data["encryption"] = {"algorithm": ALGORITHM, "key_id": graph_key_id(key), "source_manifest_sha256": source,
                          "files": records}
    write_manifest(root, data)
    for name in plain_files:
        (root / name).unlink(missing_ok=True)
    (root / "model.sig").unlink(missing_ok=True)
    return sorted(records)


def decrypted_graph(manifest: Manifest, stage: Stage, precision: str, key_provider: KeyProvider) -> bytes | None:
    """The plaintext graph bytes of an encrypted stage graph; None for a plain one (nothing imported).

    The parser (runtime/bundle.py) has checked that every graph of an encrypted bundle has its record."""
    section = manifest.encryption
    if section is None:
        return None
    path = manifest.graph_path(stage, precision)  # a precision the stage lacks: a BundleError naming the fix
    name = stage.graphs[precision].file
    record = section.files[name]
    if section.algorithm != ALGORITHM:
        raise BundleError(f"graph {name!r} is encrypted with {section.algorithm!r}; this runtime reads {ALGORITHM}")
    key = resolve_key(key_provider)
    if graph_key_id(key) != section.key_id:
        raise DecryptionError(f"wrong key for bundle {manifest.root}: its graphs are encrypted with key "
                              f"{section.key_id}, the key provider gave key {graph_key_id(key)}")
    exceptions = optional_import("cryptography.exceptions", "encrypted graphs")
    ciphertext = path.read_bytes()
    try:
        plaintext: bytes = _aesgcm(key).decrypt(base64.b64decode(record.nonce), ciphertext,
                                                _aad(name, section.source_manifest_sha256))
    except exceptions.InvalidTag as exc:
        raise DecryptionError(f"graph {name!r} of bundle {manifest.root} does not decrypt with key {graph_key_id(key)}: "
                              "the ciphertext, its name or the manifest's encryption record was changed") from exc
    if hashlib.sha256(plaintext).hexdigest() != record.plaintext_sha256:
        raise DecryptionError(f"graph {name!r} decrypted to bytes whose sha256 differs from the manifest's record")
    return plaintext
