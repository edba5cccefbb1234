"""Where ``load()`` calls the device-trust features: one call before the manifest is
read (signature), one after the graphs are loaded (self-test, audit log).

Each feature lives in its own module (signing, crypto, selftest, audit, store) and
imports ``cryptography`` only when it is used, so a device that pins no key and
encrypts nothing pays nothing for them.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .model import DeployedModel
    from .signing import SignatureInfo


def before_load(bundle: str | os.PathLike[str], trusted_keys: Sequence[Any] | None) -> SignatureInfo | None:
    """With keys pinned, the signature check: file bytes only, before any JSON or graph is parsed."""
    if trusted_keys is None:
        return None
    from .signing import verify_bundle

    return verify_bundle(bundle, list(trusted_keys))


def after_load(model: DeployedModel, signature: SignatureInfo | None, *, selftest: bool,
               audit_log: str | os.PathLike[str] | None, audit_fields: Sequence[str]) -> DeployedModel:
    model.signature = signature
    if selftest:
        from .selftest import run_selftest

        run_selftest(model)
    if audit_log is not None:
        from .audit import AuditLog

        model.audit = AuditLog(audit_log, allowed_metadata=audit_fields)
    return model
