"""Remote backend: ``load(bundle, backend="triton://HOST:PORT")`` runs the stage graphs on a server.

The server is ``edgederm serve`` on the same bundle (it publishes each stage graph as
model ``<NAME>_<stage>``); tiling, preprocessing and review stay local, so the
results must match a local load within 1e-6, and a server that goes away must give
a typed error within the retry budget, never a hang.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from edgederm.runtime import InputError, RemoteBackendError, load  # noqa: E402
from edgederm.serve.server import Server  # noqa: E402


def _remote(bundle, server: Server):
    return load(bundle, backend=f"triton://127.0.0.1:{server.http_port}", precision="fp32")


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_remote_stages_give_the_local_results(serve_bundles, lesion_images, kind):
    local = load(serve_bundles[kind], precision="fp32")
    with Server(local, http_port=0, grpc_port=None) as server:
        remote = _remote(serve_bundles[kind], server)
        assert remote.backend_name.startswith("triton://")
        for image in ("lesion_jpg", "lesion_png"):
            expected = local.predict_file(lesion_images[image])
            got = remote.predict_file(lesion_images[image])
            assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
            assert (got.label, got.needs_review, got.review_reasons) == (
                expected.label, expected.needs_review, expected.review_reasons)
            if kind == "segmenter":
                np.testing.assert_array_equal(got.mask, expected.mask)


@pytest.mark.slow
def test_remote_remixformer_with_clinical_image_and_metadata(remix_bundle, lesion_images):
    local = load(remix_bundle, precision="fp32")
    metadata = {"age": 54, "sex": "female", "site": "back"}
    with Server(local, http_port=0, grpc_port=None) as server:
        remote = _remote(remix_bundle, server)
        expected = local.predict_file(lesion_images["lesion_jpg"], metadata=metadata, clinical=lesion_images["clinical"])
        got = remote.predict_file(lesion_images["lesion_jpg"], metadata=metadata, clinical=lesion_images["clinical"])
        assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
        assert got.label == expected.label


def test_a_dropped_server_is_a_typed_error_not_a_hang(serve_bundles, lesion_images):
    local = load(serve_bundles["classifier"], precision="fp32")
    server = Server(local, http_port=0, grpc_port=None).start()
    remote = _remote(serve_bundles["classifier"], server)
    remote.predict_file(lesion_images["lesion_jpg"])  # connected and answering
    server.stop()
    start = time.monotonic()
    with pytest.raises(RemoteBackendError, match=rf"no answer from triton://127.0.0.1:{server.http_port} for "
                                                 r"stage model 'SmallClassifier_classifier' after 4 attempts"):
        remote.predict_file(lesion_images["lesion_jpg"])
    assert time.monotonic() - start < 10  # 3 retries with 0.2, 0.4, 0.8 s back-off


def test_remote_errors_name_the_server_and_the_fix(serve_bundles):
    with pytest.raises(InputError, match="expected triton://HOST:PORT"):
        load(serve_bundles["classifier"], backend="triton://no-port")
    local = load(serve_bundles["classifier"], precision="fp32")
    with Server(local, name="another_model", http_port=0, grpc_port=None) as server:
        remote = _remote(serve_bundles["classifier"], server)
        with pytest.raises(RemoteBackendError, match="refused stage model 'SmallClassifier_classifier': HTTP 404: "
                                                     "unknown model"):
            remote.predict(dermoscopy=np.zeros((32, 32, 3), np.uint8))
