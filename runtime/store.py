"""A/B bundle store with an atomic active pointer, rollback and RAUC-style mark-good.

Layout of a store folder::

    state.json        the pointer: {"active": "a", "rollback": "b", "trial": false, "slots": {...}}
    slots/a/, slots/b/  two bundle copies; the one not active is the rollback target
    .lock             flock: one installer at a time

``install`` verifies the source (signature when keys are pinned, then the bundle's
own hashes), forgets the inactive slot as a rollback target (state written first,
so a crash never leaves the pointer on a slot being rewritten), copies the bundle
into ``slots/<inactive>.partial`` file by file with fsync, renames it into place,
verifies the copy again, runs a self-check there, and only then switches the
pointer: ``state.json`` is written to a temp file, fsynced, renamed, and the folder
fsynced. A crash at any instant leaves either the old pointer (old bundle active,
intact) or the new one (new bundle complete and checked). ``gc`` and the next
install remove what a crash left behind.

The self-check is the bundle's golden self-test when it has goldens
(runtime/selftest.py); otherwise each precision predicts a deterministic synthetic
lesion and must agree with the fp32 graph within the self-test's tolerance floors.

``EDGEDERM_STORE_CRASH_AT=N`` makes the installer SIGKILL itself at its N-th step
(``EDGEDERM_STORE_STEPS=FILE`` appends each step's name to FILE): how the tests show
that every step is crash-safe.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .bundle import read_manifest, write_json_atomic
from .errors import EdgeDermError, StoreError

if TYPE_CHECKING:
    from .model import DeployedModel

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
STATE = "state.json"


class _Steps:
    """Names each step of an install; kills the process at step N when the crash test asks for it."""

    def __init__(self) -> None:
        self.count = 0
        crash = os.environ.get("EDGEDERM_STORE_CRASH_AT")
        self.crash_at = int(crash) if crash else None
        self.trace = os.environ.get("EDGEDERM_STORE_STEPS")

    def __call__(self, name: str) -> None:
        self.count += 1
        if self.trace:
            with open(self.trace, "a") as f:
                f.write(f"{self.count} {name}\n")
        if self.crash_at == self.count:
            os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BundleStore:
    def __init__(self, root: str | os.PathLike[str], trusted_keys: Sequence[Any] | None = None,
                 key_provider: Any = None) -> None:
        self.root = Path(root)
        self.trusted_keys = list(trusted_keys) if trusted_keys else None
        self.key_provider = key_provider

    # -- state --------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        path = self.root / STATE
        if not path.exists():
            return {"active": None, "rollback": None, "trial": False, "trial_loads": 0, "slots": {}}
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"store state {path} is unreadable ({exc}); it is only ever replaced by rename, so the "
                             "store folder was changed by hand. Fix: reinstall a bundle into a new store") from exc
        return dict(state)

    def _write_state(self, state: dict[str, Any], step: _Steps) -> None:
        path = self.root / STATE
        tmp = self.root / f".{STATE}.tmp"
        step("state: temp opened")
        with open(tmp, "w") as f:
            f.write(json.dumps(state, indent=2) + "\n")
            step("state: temp written")
            f.flush()
            os.fsync(f.fileno())
        step("state: temp synced")
        os.replace(tmp, path)
        step("state: renamed")
        _fsync_dir(self.root)
        step("state: folder synced")

    def slot_path(self, slot: str) -> Path:
        return self.root / "slots" / slot

    def status(self) -> dict[str, Any]:
        state = self._read_state()
        state["store"] = str(self.root)
        state["active_path"] = str(self.slot_path(state["active"])) if state.get("active") else None
        return state

    # -- install ------------------------------------------------------------------------
    def install(self, bundle: str | os.PathLike[str], trial: bool = False, selfcheck: bool = True) -> dict[str, Any]:
        import fcntl

        step = _Steps()
        source = Path(bundle)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "slots").mkdir(exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            step("locked")
            signature = None
            if self.trusted_keys:
                from .signing import verify_bundle

                signature = verify_bundle(source, self.trusted_keys)
            step("source signature verified")
            read_manifest(source, verify=True)
            step("source hashes verified")
            state = self._read_state()
            target = "b" if state.get("active") == "a" else "a"
            if state.get("rollback") == target:
                state = {**state, "rollback": None, "slots": {k: v for k, v in state["slots"].items() if k != target}}
                self._write_state(state, step)
            partial = self.slot_path(target).with_name(f"{target}.partial")
            for leftover in (partial, self.slot_path(target)):
                if leftover.exists():
                    shutil.rmtree(leftover)
            step("inactive slot cleared")
            self._copy(source, partial, step)
            os.replace(partial, self.slot_path(target))
            step("slot renamed")
            _fsync_dir(self.root / "slots")
            step("slots folder synced")
            installed = self.slot_path(target)
            if self.trusted_keys:
                from .signing import verify_bundle

                verify_bundle(installed, self.trusted_keys)
            read_manifest(installed, verify=True)
            step("slot verified")
            check = self._selfcheck(installed) if selfcheck else "skipped"
            step("slot self-checked")
            from .audit import bundle_id

            slots = dict(state.get("slots") or {})
            slots[target] = {"bundle_id": bundle_id(installed), "source": str(source.resolve()),
                             "signer": signature.key_id if signature is not None else None, "selfcheck": check,
                             "installed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            new_state = {"active": target, "rollback": state.get("active"), "trial": bool(trial), "trial_loads": 0,
                         "slots": slots}
            self._write_state(new_state, step)
            step("installed")
        return self.status()

    def _copy(self, source: Path, dest: Path, step: _Steps) -> None:
        from .signing import SIGNATURE_FILE, bundle_files

        names = bundle_files(source) + ([SIGNATURE_FILE] if (source / SIGNATURE_FILE).is_file() else [])
        dest.mkdir(parents=True)
        step("partial slot created")
        for name in names:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source / name, "rb") as src, open(target, "wb") as out:
                step(f"copy {name}: opened")
                shutil.copyfileobj(src, out, 1 << 20)
                step(f"copy {name}: written")
                out.flush()
                os.fsync(out.fileno())
            step(f"copy {name}: synced")
        for folder in sorted({(dest / n).parent for n in names}, key=lambda p: -len(p.parts)):
            _fsync_dir(folder)
        step("partial slot synced")

    def _selfcheck(self, bundle: Path) -> str:
        """The golden self-test when the bundle has goldens; else every precision vs fp32 on a synthetic lesion."""
        from .model import load
        from .selftest import TOLERANCE_FLOOR, run_selftest, synthetic_lesion

        manifest = read_manifest(bundle, verify=False)

        def open_model(precision: str) -> DeployedModel:
            return load(bundle, precision=precision, cache=False, key_provider=self.key_provider)

        try:
            if manifest.selftest is not None:
                for precision in manifest.precisions():
                    run_selftest(open_model(precision))
                return "golden self-test"
            image = synthetic_lesion(256, 256)
            reference = open_model("fp32").predict(image).probabilities
            for precision in manifest.precisions():
                got = open_model(precision).predict(image).probabilities
                diff = max(abs(got[k] - v) for k, v in reference.items())
                if not np.isfinite(diff) or diff > TOLERANCE_FLOOR[precision] * 10:
                    raise StoreError(f"self-check of {bundle}: {precision} probabilities differ from fp32 by {diff:.4g} "
                                     f"(allowed {TOLERANCE_FLOOR[precision] * 10:.4g}) on the synthetic lesion; "
                                     "not installed")
            return "predict vs fp32"
        except StoreError:
            raise
        except EdgeDermError as exc:
            raise StoreError(f"self-check of the new bundle failed, store unchanged: {exc}") from exc

    # -- after install ------------------------------------------------------------------
    def rollback(self) -> dict[str, Any]:
        """Make the rollback target active again (and the current bundle the rollback target)."""
        import fcntl

        if not (self.root / STATE).is_file():
            raise StoreError(f"{self.root} is not a bundle store (no {STATE}); "
                             f"run `edgederm store install BUNDLE --store {self.root}` first")
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            state = self._read_state()
            target = state.get("rollback")
            if not target or not self.slot_path(target).is_dir():
                raise StoreError(f"store {self.root} has no rollback target (status: active {state.get('active')!r}, "
                                 "rollback none); install a bundle first")
            read_manifest(self.slot_path(target), verify=True)
            self._write_state({**state, "active": target, "rollback": state.get("active"), "trial": False,
                               "trial_loads": 0}, _Steps())
        return self.status()

    def mark_good(self) -> dict[str, Any]:
        """Confirm a trial install: it stays active on later loads."""
        state = self._read_state()
        if state.get("trial"):
            write_json_atomic(self.root / STATE, {**state, "trial": False, "trial_loads": 0})
        return self.status()

    def gc(self) -> list[str]:
        """Remove what is neither active nor the rollback target (crash leftovers); returns what was removed."""
        state = self._read_state()
        keep = {state.get("active"), state.get("rollback")}
        removed = []
        for path in sorted((self.root / "slots").glob("*")) if (self.root / "slots").exists() else []:
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(str(path))
        for tmp in self.root.glob(f".{STATE}.tmp"):
            tmp.unlink()
            removed.append(str(tmp))
        return removed


def load_active(store: str | os.PathLike[str], trusted_keys: Sequence[Any] | None = None, **load_kwargs: Any) -> DeployedModel:
    """Load the store's active bundle. A trial install not marked good since its first load is rolled back first."""
    from .model import load

    bundles = BundleStore(store, trusted_keys=trusted_keys)
    state = bundles._read_state()
    if not state.get("active"):
        raise StoreError(f"store {store} has no active bundle; run `edgederm store install BUNDLE --store {store}`")
    if state.get("trial"):
        if state.get("trial_loads", 0) >= 1 and state.get("rollback"):
            log.warning("trial bundle in slot %s was not marked good after its first start; rolling back",
                        state["active"])
            state = bundles.rollback()
        else:
            write_json_atomic(Path(store) / STATE, {**state, "trial_loads": int(state.get("trial_loads", 0)) + 1})
    return load(bundles.slot_path(state["active"]), trusted_keys=trusted_keys, **load_kwargs)
