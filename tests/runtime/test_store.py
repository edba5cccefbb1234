"""A/B bundle store: SIGKILL at every install step leaves a store that predicts; rollback; trial; refusals."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from edgederm.cli import main as cli_main
from edgederm.runtime.errors import SelfTestError, StoreError, UnsignedBundleError
from edgederm.runtime.goldens import add_goldens
from edgederm.runtime.store import BundleStore, load_active

IMAGE = np.random.default_rng(11).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)


def _probabilities(model) -> dict:
    return model.predict(IMAGE).probabilities


@pytest.fixture()
def two_bundles(tmp_path, write_mini_bundle):
    """Release A and release B (same graph, another temperature: other probabilities)."""
    a = write_mini_bundle(tmp_path / "release_a")
    b = write_mini_bundle(tmp_path / "release_b")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["clinical"]["temperature"] = 2.5
    (b / "manifest.json").write_text(json.dumps(manifest))
    return a, b


def _outputs(bundle) -> dict:
    from edgederm.runtime import load

    return _probabilities(load(bundle, cache=False))


def test_install_switches_and_rollback_restores_exact_outputs(two_bundles, tmp_path):
    a, b = two_bundles
    store = BundleStore(tmp_path / "store")
    first = store.install(a)
    assert first["active"] == "a" and first["rollback"] is None
    assert _probabilities(load_active(store.root, cache=False)) == _outputs(a)
    second = store.install(b)
    assert second["active"] == "b" and second["rollback"] == "a"
    assert _probabilities(load_active(store.root, cache=False)) == _outputs(b) != _outputs(a)
    store.rollback()
    assert _probabilities(load_active(store.root, cache=False)) == _outputs(a)
    # A third install goes into the slot not active and keeps the active one as rollback target.
    third = store.install(b)
    assert (third["active"], third["rollback"]) == ("b", "a")
    assert sorted(p.name for p in (store.root / "slots").iterdir()) == ["a", "b"]


def test_trial_install_rolls_back_unless_marked_good(two_bundles, tmp_path):
    a, b = two_bundles
    store = BundleStore(tmp_path / "store")
    store.install(a)
    store.install(b, trial=True)
    assert _probabilities(load_active(store.root, cache=False)) == _outputs(b)  # first start of the trial
    assert _probabilities(load_active(store.root, cache=False)) == _outputs(a)  # not confirmed: rolled back
    store.install(b, trial=True)
    load_active(store.root, cache=False)
    store.mark_good()
    for _ in range(2):
        assert _probabilities(load_active(store.root, cache=False)) == _outputs(b)


def test_refused_installs_leave_the_store_unchanged(two_bundles, tmp_path):
    pytest.importorskip("cryptography")
    from edgederm.runtime.signing import keygen

    a, b = two_bundles
    store = BundleStore(tmp_path / "store")
    store.install(a)
    before = (store.root / "state.json").read_text()
    _, public = keygen(tmp_path / "keys")
    with pytest.raises(UnsignedBundleError):
        BundleStore(store.root, trusted_keys=[public]).install(b)
    # A bundle whose graph no longer gives its goldens fails the self-check in the inactive slot.
    add_goldens(b)
    manifest = json.loads((b / "manifest.json").read_text())
    section = manifest["selftest"]["stages"]["classifier"]
    section["tolerance"]["fp32"] = 0.0
    golden = np.load(b / section["file"])
    data = {k: golden[k] for k in golden.files}
    data["output.logits"] = data["output.logits"] + 0.5
    np.savez(b / section["file"], **data)
    from edgederm.runtime.bundle import sha256_file

    manifest["files"][section["file"]]["sha256"] = sha256_file(b / section["file"])
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="self-check of the new bundle failed, store unchanged") as info:
        store.install(b)
    assert isinstance(info.value.__cause__, SelfTestError)
    assert (store.root / "state.json").read_text() == before
    assert _probabilities(load_active(store.root, cache=False)) == _outputs(a)


INSTALL = "import sys; from edgederm.runtime.store import BundleStore; BundleStore(sys.argv[1]).install(sys.argv[2])"


def _install_in_child(store, bundle, env_extra) -> int:
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", INSTALL, str(store), str(bundle)], env=env).returncode


@pytest.mark.slow
def test_sigkill_at_every_install_step_leaves_a_store_that_predicts(two_bundles, tmp_path, record_property):
    a, b = two_bundles
    template = tmp_path / "template"
    BundleStore(template).install(a)
    BundleStore(template).install(a)  # a in both slots' history: active b, rollback a
    expect_old, expect_new = _outputs(a), _outputs(b)
    trace = tmp_path / "steps.txt"
    clean = tmp_path / "clean"
    shutil.copytree(template, clean)
    assert _install_in_child(clean, b, {"EDGEDERM_STORE_STEPS": str(trace)}) == 0
    steps = [line.split(" ", 1)[1] for line in trace.read_text().splitlines()]
    assert len(steps) >= 20, steps
    record_property("figure:install crash points", len(steps))
    switch = max(i for i, name in enumerate(steps, start=1) if name == "state: renamed")
    assert switch > steps.index("slot self-checked")  # the pointer moves only after the self-check
    for n in range(1, len(steps) + 1):
        store = tmp_path / f"crash{n}"
        shutil.copytree(template, store)
        code = _install_in_child(store, b, {"EDGEDERM_STORE_CRASH_AT": str(n)})
        assert code == -signal.SIGKILL, (n, steps[n - 1], code)
        got = _probabilities(load_active(store, cache=False))
        assert got == (expect_new if n >= switch else expect_old), (n, steps[n - 1])
        # The next install recovers from whatever the crash left.
        status = BundleStore(store).install(b)
        assert _probabilities(load_active(store, cache=False)) == expect_new
        BundleStore(store).gc()
        assert sorted(p.name for p in (store / "slots").iterdir()) == sorted({status["active"], status["rollback"]})
        shutil.rmtree(store)


def test_cli_store_flow(two_bundles, tmp_path, capsys):
    a, b = two_bundles
    store = tmp_path / "store"
    assert cli_main(["store", "install", str(a), "--store", str(store)]) == 0
    assert cli_main(["store", "install", str(b), "--store", str(store)]) == 0
    capsys.readouterr()
    assert cli_main(["store", "status", "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == "b"
    assert cli_main(["store", "rollback", "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == "a"
    (store / "slots" / "b.partial").mkdir()
    assert cli_main(["store", "gc", "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == [str(store / "slots" / "b.partial")]
    empty = tmp_path / "empty"
    assert cli_main(["store", "rollback", "--store", str(empty)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
