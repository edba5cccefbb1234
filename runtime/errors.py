"""Typed errors raised at the SDK's public boundary.

Every message says what was received, what was expected and how to fix it, so a
device app can show it (or log it) without a traceback from deep inside OpenCV or
ONNX Runtime.
"""
from __future__ import annotations


class EdgeDermError(Exception):
    """Base class of every error the SDK raises on purpose."""


class InputError(EdgeDermError, ValueError):
    """A caller passed something the model cannot take (image, metadata, option)."""


class ImageDecodeError(InputError):
    """An image file could not be read; names the file and the problem."""

    def __init__(self, path: object, problem: str, fix: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        message = f"cannot read image {self.path!r}: {problem}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class BundleError(EdgeDermError):
    """A bundle is missing, malformed, or was written by an incompatible SDK."""


class ManifestError(BundleError):
    """A manifest value is missing, malformed or out of range; names the field, the
    value found and what is allowed."""

    def __init__(self, field: str, found: object, allowed: str, fix: str = "re-export the bundle with this SDK") -> None:
        self.field, self.found, self.allowed = field, found, allowed
        shown = found if isinstance(found, str) and " " in found else repr(found)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        super().__init__(f"manifest field {field}: found {shown}; allowed: {allowed}. Fix: {fix}")


class GraphLoadError(BundleError):
    """A bundle graph passed its hash check but the backend cannot load it (not ONNX, or damaged)."""


class BundleIntegrityError(BundleError):
    """A bundle file does not match its manifest (hash, path, size)."""


class MissingDependencyError(EdgeDermError, ImportError):
    """An optional package is needed for this call and is not installed."""


class PythonVersionError(EdgeDermError):
    """A torch-side command (train, export, quantize...) run on a Python older than it needs."""


class MemoryBudgetError(EdgeDermError):
    """The requested memory budget cannot be met by the model and tile plan."""


class ImageTooLargeError(ImageDecodeError):
    """An image's header declares more pixels than the cap or the memory budget allows.

    Raised before decoding; ``width``, ``height`` and ``decode_bytes`` are what the
    header declared and what decoding it would have taken.
    """

    def __init__(self, path: object, problem: str, fix: str, width: int, height: int, decode_bytes: int) -> None:
        super().__init__(path, problem, fix)
        self.width, self.height, self.decode_bytes = width, height, decode_bytes


class BundleSignatureError(BundleIntegrityError):
    """A bundle's signature is missing, malformed, or does not match its files or the pinned keys."""


class UnsignedBundleError(BundleSignatureError):
    """Keys are pinned and the bundle carries no signature."""


class UntrustedSignerError(BundleSignatureError):
    """The signature was not made by any pinned key; names the signer's and the pinned key ids."""


class SignedFileChangedError(BundleSignatureError):
    """A signed file's bytes differ from what was signed; names the files."""


class UnsignedFileError(BundleSignatureError):
    """A file is in the bundle that the signature does not cover (added after signing); names it."""


class SignedFileMissingError(BundleSignatureError):
    """A signed file is missing from the bundle (removed after signing); names it."""


class DecryptionError(BundleError):
    """An encrypted graph could not be decrypted: wrong key, or ciphertext changed."""


class SelfTestError(BundleError):
    """A golden self-test output left its tolerance on this device; names stage, precision, difference."""


class CpuMismatchError(SelfTestError):
    """An int8 graph quantized on a CPU whose int8 arithmetic differs from this one's failed
    its golden self-test here; names both CPU classes and the fix (runtime/cpu_check.py)."""


class StoreError(EdgeDermError):
    """The A/B bundle store is missing, damaged, or asked for something it cannot do."""


class AuditLogError(EdgeDermError):
    """An audit log cannot be written, or its hash chain does not verify; names the first bad line."""


class RemoteBackendError(EdgeDermError, ConnectionError):
    """A remote server (``backend="triton://..."``) did not answer a stage, after its retries."""
