"""Signed bundles in the OpenSSF model-signing format (key based, offline).

A signature is ``model.sig`` inside the bundle: a Sigstore bundle (v0.3 JSON) whose
DSSE envelope carries an in-toto statement with predicate
``https://model_signing/signature/v1.0``, listing the sha256 of every file of the
bundle (manifest included) and signed with an elliptic-curve key (ECDSA P-256,
P-384 or P-521, the hash matching the curve). It is the format the ``model-signing``
package writes and verifies, so a bundle signed here verifies with that project's
verifier and the other way round.

Decisions taken where the format is silent:

* Signing goes through ``model-signing`` (the release pipeline; ``pip install
  'edgederm[sign]'``). Verifying on the device uses ``cryptography`` alone: the
  model-signing package with its Sigstore dependencies adds ~69 MiB and ~1.1 s of
  import to a device install, while the key-based check needs ~17 MiB and ~60-110 ms.
  The two verifiers are checked against each other in the tests.
* Every file counts. Only ``model.sig`` itself is left out; a file the signer chose
  to ignore (model-signing ignores git files by default) is refused as unsigned.
  Links are refused, as the bundle reader refuses them.
* The check reads file bytes only (no graph is parsed) and runs before the manifest
  is trusted, so a swapped graph with its hash updated in the manifest is caught as
  two changed files.
* A key's id is the sha256 of its public key in PEM (SubjectPublicKeyInfo), the hint
  model-signing records in the signature; messages show its first 16 hex digits.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from .bundle import read_manifest, sha256_file
from .errors import (
    BundleError,
    BundleSignatureError,
    InputError,
    SignedFileChangedError,
    SignedFileMissingError,
    UnsignedBundleError,
    UnsignedFileError,
    UntrustedSignerError,
)
from .optional import optional_import

SIGNATURE_FILE = "model.sig"
PRIVATE_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"

KeySource = Union[str, "os.PathLike[str]", bytes]


@dataclass(frozen=True)
class SignatureInfo:
    """What a verified signature says: who signed, and the digests of what they signed."""

    key_id: str  # sha256 of the signer's public key PEM (hex)
    files: dict[str, str]  # bundle-relative path -> sha256 hex

    @property
    def short_key_id(self) -> str:
        return self.key_id[:16]


def _crypto() -> Any:
    return optional_import("cryptography.hazmat.primitives.serialization", "bundle signatures")


def load_public_key(source: KeySource) -> Any:
    """A PEM public key (file path or bytes); an EC private key PEM is accepted and reduced to its public half."""
    serialization = _crypto()
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            where = "bytes" if isinstance(source, bytes) else repr(str(source))
            raise InputError(f"trusted key {where} is not a PEM public key ({exc}); expected the .pub file "
                             "written by `edgederm keygen`") from exc
    ec = optional_import("cryptography.hazmat.primitives.asymmetric.ec", "bundle signatures")
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError(f"trusted key is a {type(key).__name__}; model-signing keys are elliptic-curve "
                         "(P-256, P-384 or P-521). Fix: use `edgederm keygen`")
    return key


def key_id(public_key: Any) -> str:
    serialization = _crypto()
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _hash_for(public_key: Any) -> Any:
    hashes = optional_import("cryptography.hazmat.primitives.hashes", "bundle signatures")
    return {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}[public_key.curve.key_size]()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what the ECDSA signature is computed over."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def keygen(out: str | os.PathLike[str], curve: str = "P-256", overwrite: bool = False) -> tuple[Path, Path]:
    """Write an elliptic-curve key pair: ``signing-key.pem`` (private, mode 0600) and ``signing-key.pub``."""
    serialization = _crypto()
    ec = optional_import("cryptography.hazmat.primitives.asymmetric.ec", "key generation")
    curves = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
    if curve not in curves:
        raise InputError(f"curve {curve!r} is not supported; choose one of {', '.join(curves)}")
    folder = Path(out)
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise InputError(f"{folder} already holds a key pair; choose another --out (a key that signed released "
                         "bundles must not be replaced by accident)")
    folder.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(curves[curve]())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def bundle_files(root: Path) -> list[str]:
    """Every file of the bundle (relative, '/'-separated), except the signature; refuses links and special files."""
    names = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise UnsignedFileError(f"bundle {root} holds a link {rel!r}; signed bundles hold regular files only. "
                                    "Fix: replace the link by the file it points to and sign again")
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise UnsignedFileError(f"bundle {root} holds {rel!r}, which is not a regular file")
        if rel != SIGNATURE_FILE:
            names.append(rel)
    return names


def sign_bundle(bundle: str | os.PathLike[str], private_key: str | os.PathLike[str],
                password: str | None = None) -> SignatureInfo:
    """Sign every file of ``bundle`` (manifest included) into ``bundle/model.sig`` with model-signing.

    The bundle's own hashes are checked first, so a damaged bundle is never signed.
    The signature is written beside the bundle and renamed in, so the bundle holds a
    complete signature or none.
    """
    root = Path(bundle)
    read_manifest(root, verify=True)
    bundle_files(root)  # links and special files: refused before signing
    ms = optional_import("model_signing", "signing bundles")
    hashing = ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)
    config = ms.signing.Config().use_elliptic_key_signer(private_key=Path(private_key), password=password)
    fd, tmp = tempfile.mkstemp(prefix=f".{root.name}.", suffix=".sig.tmp", dir=root.resolve().parent)
    os.close(fd)
    try:
        config.set_hashing_config(hashing).sign(root, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, root / SIGNATURE_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    serialization = _crypto()
    secret = password.encode() if password is not None else None
    return verify_bundle(root, [serialization.load_pem_private_key(Path(private_key).read_bytes(), secret).public_key()])


def _b64(value: object, what: str, root: Path) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleSignatureError(f"{root / SIGNATURE_FILE}: {what} is not base64 ({exc}); sign the bundle again") from exc


def verify_bundle(bundle: str | os.PathLike[str], trusted_keys: Sequence[KeySource | Any]) -> SignatureInfo:
    """Check ``bundle/model.sig`` against the pinned keys and every file's bytes.

    Reads bytes only: nothing in the bundle is parsed as a graph. Raises
    UnsignedBundleError, UntrustedSignerError, SignedFileChangedError,
    UnsignedFileError or SignedFileMissingError, each naming the key or the files.
    """
    root = Path(bundle)
    keys = [k if hasattr(k, "public_bytes") else load_public_key(k) for k in trusted_keys]
    if not keys:
        raise InputError("trusted_keys is empty; pass the signer's public key (.pub from `edgederm keygen`)")
    pinned = {key_id(k): k for k in keys}
    pinned_text = ", ".join(k[:16] for k in pinned)
    sig_path = root / SIGNATURE_FILE
    if not root.is_dir():
        raise BundleError(f"bundle {str(root)!r} is not a directory; expected a folder written by `edgederm export`")
    if not sig_path.is_file():
        raise UnsignedBundleError(
            f"bundle {root} is not signed (no {SIGNATURE_FILE}) and keys are pinned ({pinned_text}). "
            f"Fix: `edgederm sign {root} --key PRIVATE_KEY` in the release pipeline")
    try:
        document = json.loads(sig_path.read_text(encoding="utf-8"))
        envelope = document["dsseEnvelope"]
        payload = _b64(envelope["payload"], "the payload", root)
        signatures = [_b64(s["sig"], "the signature", root) for s in envelope["signatures"]]
        payload_type = envelope["payloadType"]
        hint = ((document.get("verificationMaterial") or {}).get("publicKey") or {}).get("hint") or ""
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleSignatureError(f"{sig_path} is not a model-signing signature ({type(exc).__name__}: {exc}); "
                                   "sign the bundle again") from exc
    signer = _find_signer(pinned, hint, payload_type, payload, signatures)
    if signer is None:
        raise UntrustedSignerError(
            f"bundle {root} is signed by key {hint[:16] or '(no key id recorded)'}, which is not a pinned key "
            f"(pinned: {pinned_text}), or its signature does not match its payload. "
            "Fix: pin the release key's .pub, or have the bundle signed with it")
    expected = _signed_files(payload, payload_type, sig_path)
    actual = bundle_files(root)
    changed = sorted(n for n in actual if n in expected and sha256_file(root / n) != expected[n])
    added = sorted(n for n in actual if n not in expected)
    missing = sorted(set(expected) - set(actual))
    if changed:
        raise SignedFileChangedError(
            f"bundle {root}: {', '.join(map(repr, changed))} changed after signing (sha256 differs from the "
            f"signature by {signer[:16]}). Fix: re-copy the released bundle")
    if added:
        raise UnsignedFileError(
            f"bundle {root}: {', '.join(map(repr, added))} not covered by the signature (added after signing). "
            "Fix: remove it, or sign the bundle again in the release pipeline")
    if missing:
        raise SignedFileMissingError(
            f"bundle {root}: signed file(s) {', '.join(map(repr, missing))} missing. Fix: re-copy the released bundle")
    return SignatureInfo(key_id=signer, files=expected)


def _find_signer(pinned: dict[str, Any], hint: str, payload_type: str, payload: bytes,
                 signatures: Iterable[bytes]) -> str | None:
    exceptions = optional_import("cryptography.exceptions", "bundle signatures")
    ec = optional_import("cryptography.hazmat.primitives.asymmetric.ec", "bundle signatures")
    message = pae(payload_type, payload)
    # The hint only orders the search: the signature itself decides.
    order = sorted(pinned, key=lambda k: k != hint)
    for kid in order:
        key = pinned[kid]
        for signature in signatures:
            try:
                key.verify(signature, message, ec.ECDSA(_hash_for(key)))
                return kid
            except exceptions.InvalidSignature:
                continue
    return None


def _signed_files(payload: bytes, payload_type: str, sig_path: Path) -> dict[str, str]:
    """The ``name -> sha256`` list of a verified payload; refuses forms this runtime does not check."""
    try:
        statement = json.loads(payload)
        ok = (payload_type == PAYLOAD_TYPE and statement["_type"] == STATEMENT_TYPE
              and statement["predicateType"] == PREDICATE_TYPE)
        serialization = statement["predicate"]["serialization"]
        resources = statement["predicate"]["resources"]
        files = {r["name"]: r["digest"] for r in resources if r["algorithm"] == "sha256"}
        root_digest = statement["subject"][0]["digest"]["sha256"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise BundleSignatureError(f"{sig_path}: signed payload is not a model-signing v1.0 statement ({exc})") from exc
    if not ok:
        raise BundleSignatureError(f"{sig_path}: signed payload is {payload_type!r} / {statement.get('predicateType')!r}; "
                                   f"expected {PAYLOAD_TYPE!r} / {PREDICATE_TYPE!r}")
    if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256" or \
            len(files) != len(resources):
        raise BundleSignatureError(
            f"{sig_path}: signed with serialization {serialization!r}; this runtime checks per-file sha256 "
            "(model-signing's default). Fix: sign with `edgederm sign`, or model_signing's default hashing")
    # model-signing's root digest: sha256 over the resources' digests in order.
    combined = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
    if combined != root_digest:
        raise BundleSignatureError(f"{sig_path}: the statement's root digest does not match its file list; "
                                   "the signature was not written by a model-signing signer")
    return files
