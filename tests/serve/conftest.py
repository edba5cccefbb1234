"""Small bundles for the serving tests: a classifier, a segmenter and RemixFormer++ (tiny).

Seeded random weights: the tests compare the server with ``predict_file`` on the
same bundle, so what the weights have learnt does not matter, only that both paths
compute the same thing.
"""
from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgederm.export import export_bundle  # noqa: E402
from edgederm.models.base import EdgeDermModel  # noqa: E402


class SmallClassifier(EdgeDermModel):
    """Two strided convolutions, global pooling, a linear head over three classes."""

    def __init__(self) -> None:
        super().__init__(3, 32, ["nevus", "melanoma", "vascular"])
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(dermoscopy).mean(dim=(2, 3)))


class SmallSegmenter(EdgeDermModel):
    """Two convolutions to background/lesion logits at full resolution, tiled at 32 px."""

    task = "segment"

    def __init__(self) -> None:
        super().__init__(2, 32, ["background", "lesion"])
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.body(dermoscopy)


@pytest.fixture(scope="session")
def serve_bundles(tmp_path_factory):
    """name -> bundle path: ``classifier`` (review class 'vascular') and ``segmenter``."""
    root = tmp_path_factory.mktemp("serve_bundles")
    torch.manual_seed(0)
    return {
        "classifier": export_bundle(SmallClassifier().eval(), root / "classifier", profile_memory=False,
                                    clinical={"review_classes": ["vascular"]}, progress=lambda m: None),
        "segmenter": export_bundle(SmallSegmenter().eval(), root / "segmenter", profile_memory=False,
                                   progress=lambda m: None),
    }


@pytest.fixture(scope="session")
def remix_bundle(tmp_path_factory):
    """RemixFormer++ (tiny): dermoscopy windows, clinical image and metadata stages."""
    from edgederm.models import create_model

    torch.manual_seed(0)
    return export_bundle(create_model("remixformer_tiny").eval(), tmp_path_factory.mktemp("remix") / "remix",
                         profile_memory=False, progress=lambda m: None)


@pytest.fixture(scope="session")
def lesion_images(tmp_path_factory):
    """Synthetic dermoscopy as JPEG and PNG files, and a clinical photo."""
    import cv2

    from edgederm.data.synthetic import generate_case

    root = tmp_path_factory.mktemp("serve_images")
    paths = {}
    for name, seed, size, ext in [("lesion_jpg", 1, 96, ".jpg"), ("lesion_png", 2, 80, ".png"),
                                  ("clinical", 3, 64, ".jpg")]:
        path = root / (name + ext)
        cv2.imwrite(str(path), cv2.cvtColor(generate_case(seed=seed, size=size).image, cv2.COLOR_RGB2BGR))
        paths[name] = path
    return paths


class GatedModel:
    """A loaded model whose predictions wait while the gate is closed (closed at first)."""

    def __init__(self, model) -> None:
        self.model = model
        self.manifest, self.task = model.manifest, model.task
        self.modalities, self.class_names = model.modalities, model.class_names
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    def predict(self, **kwargs):
        self.started.release()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.model.predict(**kwargs)


@pytest.fixture()
def gated_model():
    """``gated_model(model)``: the model behind a gate the test opens (``.gate.set()``)."""
    made: list[GatedModel] = []

    def make(model) -> GatedModel:
        made.append(GatedModel(model))
        return made[-1]

    yield make
    for gated in made:  # never leave a worker waiting
        gated.gate.set()
