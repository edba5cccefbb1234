"""Shared fixtures; prints the measured figures (parity, INT8 agreement) at the end."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        for key, value in getattr(report, "user_properties", []):
            if key.startswith("figure:"):
                rows.append((report.nodeid.split("::")[-1], key[7:], value))
    if rows:
        terminalreporter.section("measured figures")
        for test, key, value in rows:
            terminalreporter.write_line(f"{test:<48} {key:<32} {value}")


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Small labelled synthetic datasets (train/test) at 128 px."""
    from edgederm.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root / "train", n_per_class=24, size=128, seed=0)
    generate_dataset(root / "test", n_per_class=10, size=128, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, synthetic_data):
    """hifuse_tiny (random weights, seeded) exported and quantized: fp32 + int8 graphs."""
    torch = pytest.importorskip("torch")
    from edgederm.calibration import quantize_bundle
    from edgederm.export import export_bundle
    from edgederm.models import create_model

    torch.manual_seed(0)
    model = create_model("hifuse_tiny", class_names=["nevus", "melanoma", "vascular"])
    out = tmp_path_factory.mktemp("bundles") / "hifuse_tiny"
    export_bundle(model, out, clinical={"review_classes": ["vascular"]})
    quantize_bundle(out, synthetic_data / "train", eval_dir=synthetic_data / "test", max_images=32, say=lambda m: None)
    return out


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest
