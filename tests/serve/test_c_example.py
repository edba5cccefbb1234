"""examples/c: the libcurl client, built with the system's C compiler and run against `edgederm serve`."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgederm.runtime import load
from edgederm.serve.server import Server

SOURCE = Path(__file__).resolve().parents[2] / "examples" / "c" / "edgederm_client.c"


@pytest.fixture(scope="module")
def client_binary(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc/gcc) on this machine; Debian: apt-get install gcc")
    probe = subprocess.run([compiler, "-E", "-"], input="#include <curl/curl.h>\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("libcurl's headers are not installed; Debian: apt-get install libcurl4-openssl-dev")
    binary = tmp_path_factory.mktemp("c_example") / "edgederm_client"
    build = subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-Werror", str(SOURCE), "-lcurl", "-o", str(binary)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    return binary


def test_c_client_gets_the_same_answer_as_predict_file(client_binary, serve_bundles, lesion_images):
    model = load(serve_bundles["classifier"], precision="fp32")
    with Server(model, http_port=0, grpc_port=None) as server:
        url = server.addresses()["http"]
        run = subprocess.run([str(client_binary), url, server.name, str(lesion_images["lesion_jpg"])],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        outputs = {o["name"]: o["data"] for o in json.loads(run.stdout)["outputs"]}
        expected = model.predict_file(lesion_images["lesion_jpg"])
        assert outputs["label"] == [expected.label]
        assert dict(zip(outputs["probability_names"], outputs["probabilities"])) == pytest.approx(
            expected.probabilities, abs=1e-12)
        assert outputs["needs_review"] == [expected.needs_review]
        assert outputs["review_reasons"] == expected.review_reasons

        refused = subprocess.run([str(client_binary), url, "no_such_model", str(lesion_images["lesion_jpg"])],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "HTTP 404" in refused.stderr and "unknown model" in refused.stderr
