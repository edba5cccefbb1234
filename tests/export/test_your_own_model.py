"""Models from outside the zoo: any nn.Module, preprocessing from the model's own config,
existing ONNX files; and models no one here wrote (timm, torchvision, Hugging Face, SMP)
through export/import -> quantize -> predict, with parity and INT8 agreement recorded."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")

from torch import nn  # noqa: E402

from edgederm.export import export_bundle  # noqa: E402
from edgederm.export.failures import DataDependentControlFlowError, UnsupportedOperatorError  # noqa: E402
from edgederm.export.onnx_import import import_onnx  # noqa: E402
from edgederm.runtime import load  # noqa: E402
from edgederm.runtime.errors import InputError  # noqa: E402
from edgederm.runtime.preprocess import PreprocessConfig, preprocess  # noqa: E402

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Random colour fields with lesion-scale structure (about 32 px), cubic-upsampled."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
        out.append(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC))
    return out


class TinyNet(nn.Module):
    def __init__(self, classes: int = 3, side: int = 32, final: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * (side // 2) ** 2, classes)
        self.final = final

    def forward(self, x):  # noqa: ANN001, ANN201
        y = self.fc(torch.relu(self.conv(x)).flatten(1))
        return self.final(y) if self.final is not None else y


def runtime_probabilities(bundle, image, precision="fp32"):  # noqa: ANN001, ANN201
    model = load(bundle, precision=precision)
    result = model.predict(dermoscopy=image)
    return np.array([result.probabilities[n] for n in model.manifest.model.class_names])


# --------------------------------------------------------------------------- any module


@pytest.mark.parametrize("final", ["softmax_module", "functional_softmax", "logits"])
def test_any_module_predicts_torchs_probabilities(tmp_path, final):
    torch.manual_seed(0)
    net = TinyNet(final=nn.Softmax(dim=1) if final == "softmax_module" else None).eval()
    module = nn.Sequential(net, nn.Identity()) if final != "functional_softmax" else _Functional(net)
    bundle = export_bundle(module, tmp_path / "b", task="classify", input_size=(32, 32), class_names=["a", "b", "c"],
                           preprocess=PreprocessConfig(input_size=(32, 32), resize="none"), profile_memory=False)
    image = smooth_images(1, 32, 32)[0]
    x = torch.from_numpy(preprocess(image, PreprocessConfig(input_size=(32, 32), resize="none")))[None]
    with torch.no_grad():
        out = module(x)
    out = (out["probs"] if isinstance(out, dict) else out)[0]
    expected = out if final != "logits" else torch.softmax(out, 0)
    got = runtime_probabilities(bundle, image)
    # Probabilities are mapped to log-probabilities, never soft-maxed twice.
    assert np.abs(got - expected.numpy()).max() <= 1e-5


class _Functional(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):  # noqa: ANN001, ANN201
        return {"probs": torch.softmax(self.net(x), dim=1), "features": x.mean((2, 3))}


class _WithMetadata(nn.Module):
    def __init__(self, metadata_dim: int) -> None:
        super().__init__()
        self.image = TinyNet(classes=4)
        self.metadata = nn.Linear(metadata_dim, 4)

    def forward(self, image, metadata):  # noqa: ANN001, ANN201
        return self.image(image) + self.metadata(metadata)


def test_module_with_metadata_input_gets_the_encoded_record(tmp_path):
    from edgederm.runtime.metadata import load_schema

    schema = load_schema("ham10000")
    torch.manual_seed(0)
    net = _WithMetadata(schema.dim).eval()
    config = PreprocessConfig(input_size=(32, 32), resize="none")
    bundle = export_bundle(net, tmp_path / "b", task="classify", input_size=32, class_names=["a", "b", "c", "d"],
                           modalities=("dermoscopy", "metadata"), metadata_schema="ham10000", preprocess=config,
                           profile_memory=False)
    assert [i.source for i in load(bundle).manifest.stages[0].inputs] == ["dermoscopy", "metadata"]
    image = smooth_images(1, 32, 32)[0]
    record = {"age": 60, "sex": "male", "localization": "back"}
    with torch.no_grad():
        logits = net(torch.from_numpy(preprocess(image, config))[None],
                     torch.from_numpy(schema.encode(record))[None].float())[0]
    got = load(bundle).predict(dermoscopy=image, metadata=record)
    assert np.abs(np.array(list(got.probabilities.values())) - torch.softmax(logits, 0).numpy()).max() <= 1e-5


def test_segmenter_with_softmax_channels_is_not_soft_maxed_twice(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Softmax(dim=1)).eval()
    config = PreprocessConfig(input_size=(32, 32), resize="none")
    bundle = export_bundle(net, tmp_path / "b", task="segment", input_size=32, class_names=["background", "lesion"],
                           preprocess=config, profile_memory=False)
    image = smooth_images(1, 32, 32)[0]
    with torch.no_grad():
        expected = 1 - net(torch.from_numpy(preprocess(image, config))[None])[0, 0].numpy()
    heatmap = load(bundle).predict(dermoscopy=image).heatmap
    assert np.abs(heatmap - expected).max() <= 1e-4


def test_dict_output_needs_the_right_key(tmp_path):
    torch.manual_seed(0)
    module = _Functional(TinyNet().eval())
    with pytest.raises(InputError, match=r"output_key='nope' not found .* available: \['probs', 'features'\]"):
        export_bundle(module, tmp_path / "b", task="classify", input_size=32, class_names=["a", "b", "c"],
                      output_key="nope", profile_memory=False)
    export_bundle(module, tmp_path / "b", task="classify", input_size=32, class_names=["a", "b", "c"],
                  output_key="probs", profile_memory=False)


def test_wrong_class_count_names_both_shapes(tmp_path):
    with pytest.raises(InputError, match=r"output has shape \[2, 3\].*must return \[batch, 2\]"):
        export_bundle(TinyNet(), tmp_path / "b", task="classify", input_size=32, class_names=["a", "b"],
                      profile_memory=False)
    assert not (tmp_path / "b").exists()


def test_plain_module_without_declarations_is_refused(tmp_path):
    from edgederm.export.onnx import ExportError

    with pytest.raises(ExportError, match="also pass task, input_size, class_names"):
        export_bundle(TinyNet(), tmp_path / "b", profile_memory=False)


class _ValueBranch(nn.Module):
    def forward(self, x):  # noqa: ANN001, ANN201
        if x.mean() > 0:
            return x.flatten(1)[:, :2]
        return -x.flatten(1)[:, :2]


class _Zeta(nn.Module):
    def forward(self, x):  # noqa: ANN001, ANN201
        return torch.special.zeta(x.flatten(1)[:, :2].abs() + 1, torch.tensor(2.0))


@pytest.mark.slow
def test_export_failures_are_typed_and_name_the_cause(tmp_path):
    with pytest.raises(DataDependentControlFlowError, match=r"depends on tensor values \(.*if x.mean\(\) > 0.*torch.where"):
        export_bundle(_ValueBranch(), tmp_path / "a", task="classify", input_size=8, class_names=["a", "b"],
                      profile_memory=False)
    with pytest.raises(UnsupportedOperatorError, match=r"the op prims.zeta has no ONNX translation") as info:
        export_bundle(_Zeta(), tmp_path / "b", task="classify", input_size=8, class_names=["a", "b"],
                      profile_memory=False)
    assert info.value.op == "prims.zeta"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- preprocessing


def _library_transforms():  # noqa: ANN202
    """(name, our config, the library's own transform on a PIL image -> CHW float)."""
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from edgederm.export.preprocess_from import from_hf, from_timm, from_torchvision

    cases = []
    for name in ("efficientnet_b0", "vit_small_patch16_224"):
        model = timm.create_model(name, pretrained=False, num_classes=7)
        transform = create_transform(**resolve_data_config({}, model=model))
        cases.append((f"timm:{name}", from_timm(model), lambda a, t=transform: t(Image.fromarray(a)).numpy()))
    for weights in (torchvision.models.ResNet18_Weights.DEFAULT, torchvision.models.Swin_V2_T_Weights.DEFAULT):
        transform = weights.transforms()
        cases.append((f"torchvision:{weights}", from_torchvision(weights),
                      lambda a, t=transform: t(Image.fromarray(a)).numpy()))
    transformers = pytest.importorskip("transformers")
    processor = transformers.ViTImageProcessor()
    cases.append(("hf:ViTImageProcessor", from_hf(processor),
                  lambda a, p=processor: p(images=Image.fromarray(a), return_tensors="np")["pixel_values"][0]))
    return cases


def test_config_preprocessing_matches_the_library_on_10_images(record_property):
    """Where no resampling happens (the image is already at the library's resize
    size) the pixels must be equal; with resampling the libraries use PIL bicubic/
    bilinear with antialiasing and the runtime OpenCV area/linear, so the difference
    is bounded separately (mean over pixels, normalised units)."""
    for name, config, library in _library_transforms():
        side = round(config.input_size[0] / config.crop_fraction)
        equal = max(float(np.abs(preprocess(a, config) - library(a)).max()) for a in smooth_images(10, side, side))
        assert equal <= 1e-5, name
        resized = [np.abs(preprocess(a, config) - library(a)) for a in smooth_images(10, 300, 410, seed=1)]
        mean_diff = max(float(d.mean()) for d in resized)
        record_property(f"figure:{name} equal-size max diff", f"{equal:.1e}")
        record_property(f"figure:{name} resized mean|max diff", f"{mean_diff:.3f}|{max(float(d.max()) for d in resized):.2f}")
        assert mean_diff <= 0.1, name


def test_hf_center_crop_and_shortest_edge_map_to_crop_fraction():
    from edgederm.export.preprocess_from import from_hf

    deit = from_hf({"do_resize": True, "size": {"height": 256, "width": 256}, "do_center_crop": True,
                    "crop_size": {"height": 224, "width": 224}, "image_mean": [0.1, 0.2, 0.3],
                    "image_std": [0.4, 0.5, 0.6], "rescale_factor": 1 / 255})
    assert (deit.resize, deit.input_size, deit.crop_fraction) == ("stretch", (224, 224), 224 / 256)
    convnext = from_hf({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "image_mean": [0.5] * 3,
                        "image_std": [0.5] * 3})
    assert (convnext.resize, convnext.crop_fraction) == ("center_crop", 224 / 256)
    with pytest.raises(InputError, match="rescale_factor=1.0; only 1/255"):
        from_hf({"size": {"height": 8, "width": 8}, "rescale_factor": 1.0, "image_mean": [0] * 3, "image_std": [1] * 3})


def test_crop_fraction_keeps_the_central_region():
    image = np.zeros((100, 100, 3), np.uint8)
    image[10:90, 10:90] = 200  # a frame of 10 px: cropping 0.8 removes it exactly
    from edgederm.runtime.preprocess import resize_image

    assert np.all(resize_image(image, (80, 80), "center_crop", crop_fraction=0.8) == 200)
    with pytest.raises(InputError, match="crop_fraction=0.5 with resize='letterbox'"):
        PreprocessConfig(resize="letterbox", crop_fraction=0.5)


# --------------------------------------------------------------------------- ONNX files


class _NHWCNet(TinyNet):
    def forward(self, x):  # noqa: ANN001, ANN201
        x = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
        return torch.softmax(self.fc(x.reshape(1, -1)), 1)  # batch baked in, as many old exports have


def _torchscript_export(module, example, path, dynamic=True):  # noqa: ANN001, ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}} if dynamic else None)
    return path


@pytest.mark.parametrize("layout", ["nchw_dynamic", "nhwc_fixed_batch_1"])
def test_imported_onnx_predicts_like_torch(tmp_path, layout):
    torch.manual_seed(0)
    if layout == "nhwc_fixed_batch_1":
        net = _NHWCNet().eval()
        path = _torchscript_export(net, torch.randn(1, 32, 32, 3), tmp_path / "m.onnx", dynamic=False)
    else:
        net = nn.Sequential(TinyNet(), nn.Softmax(dim=1)).eval()
        path = _torchscript_export(net, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    bundle = import_onnx(path, tmp_path / "b", task="classify", class_names=["a", "b", "c"], mean=(0.5,) * 3,
                         std=(0.25,) * 3, profile_memory=False)
    manifest = load(bundle).manifest
    assert manifest.stages[0].inputs[0].shape == ("batch", 3, 32, 32)
    assert manifest.data["export"]["import"]["removed"] == "Softmax"
    from edgederm.export.lint import lint_bundle

    assert lint_bundle(bundle, "x86-trt10") == []  # TensorRT 10's parser takes the adapted graph
    images = smooth_images(5, 32, 32)
    config = manifest.preprocess
    for image in images:
        x = torch.from_numpy(preprocess(image, config))[None]
        with torch.no_grad():
            expected = net(x.permute(0, 2, 3, 1) if layout.startswith("nhwc") else x)[0].numpy()
        assert np.abs(runtime_probabilities(bundle, image) - expected).max() <= 1e-5
    # The freed batch axis really runs batches: five rows equal five single runs.
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle / manifest.stages[0].graphs["fp32"].file))
    batch = np.stack([preprocess(i, config) for i in images])
    together = session.run(None, {manifest.stages[0].inputs[0].name: batch})[0]
    alone = np.concatenate([session.run(None, {manifest.stages[0].inputs[0].name: b[None]})[0] for b in batch])
    assert np.abs(together - alone).max() <= 1e-5


class _RowMixing(nn.Module):
    """Each row's output depends on the whole batch: the batch must stay fixed at 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fc(self.conv(x).mean((2, 3))) * (1 + 0.1 * x.mean(0).sum().tanh())


def test_import_keeps_a_batch_that_rows_share_and_quantize_feeds_it(tmp_path, calib_images):
    from edgederm.calibration import quantize_bundle

    torch.manual_seed(0)
    net = _RowMixing().eval()
    path = _torchscript_export(net, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", dynamic=False)
    bundle = import_onnx(path, tmp_path / "b", task="classify", class_names=["a", "b", "c"], mean=(0.5,) * 3,
                         std=(0.5,) * 3, profile_memory=False)
    manifest = load(bundle).manifest
    assert manifest.stages[0].inputs[0].shape == (1, 3, 32, 32)
    assert manifest.data["export"]["import"]["batch"] == "fixed 1"
    image = smooth_images(1, 32, 32)[0]
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(preprocess(image, manifest.preprocess))[None])[0], 0).numpy()
    assert np.abs(runtime_probabilities(bundle, image) - expected).max() <= 1e-5
    quantize_bundle(bundle, calib_images, max_images=4, target_agreement=None, say=lambda m: None)
    assert load(bundle, precision="int8").predict(dermoscopy=image).precision == "int8"


def test_import_refuses_an_op_onnx_runtime_lacks(tmp_path):
    helper = onnx.helper
    graph = helper.make_graph([helper.make_node("LesionMagic", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "custom.onnx")
    with pytest.raises(UnsupportedOperatorError, match="no kernel for the op com.example:LesionMagic") as info:
        import_onnx(tmp_path / "custom.onnx", tmp_path / "b", task="classify", class_names=["a", "b"])
    assert info.value.op == "com.example:LesionMagic"
    assert not (tmp_path / "b").exists()


def test_import_refuses_uint8_input_with_the_fix(tmp_path):
    helper = onnx.helper
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "u8.onnx")
    with pytest.raises(InputError, match="input 'x' is UINT8; the runtime feeds float32"):
        import_onnx(tmp_path / "u8.onnx", tmp_path / "b", task="classify", class_names=["a", "b"])


def test_cli_export_module_and_import(tmp_path, monkeypatch):
    from edgederm.cli import main

    (tmp_path / "my_models.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["export", "--module", "my_models:build", "--task", "classify", "--input-size", "32",
                 "--classes", "nevus,melanoma", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                 "--out", str(tmp_path / "b")]) == 0
    manifest = load(tmp_path / "b").manifest
    assert manifest.model.class_names == ("nevus", "melanoma")
    assert manifest.preprocess.mean == (0.485, 0.456, 0.406)
    assert main(["import", str(tmp_path / "b" / manifest.stages[0].graphs["fp32"].file), "--classes", "nevus,melanoma",
                 "--preprocess-from", "timm:efficientnet_b0", "--out", str(tmp_path / "i")]) == 0
    imported = load(tmp_path / "i").manifest
    assert (imported.preprocess.resize, imported.preprocess.crop_fraction) == ("center_crop", 0.875)
    assert imported.preprocess.input_size == (32, 32)


# --------------------------------------------------------------------------- models no one here wrote


def _timm(name: str, side: int):  # noqa: ANN202
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": side} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=7, **kwargs), {}


def _torchvision(name: str, side: int):  # noqa: ANN202
    torchvision = pytest.importorskip("torchvision")
    return getattr(torchvision.models, name)(num_classes=7), {}


def _hf_vit(name: str, side: int):  # noqa: ANN202
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=side, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=7)
    return transformers.ViTForImageClassification(config), {}  # ModelOutput: .logits is taken


def _smp_unet(name: str, side: int):  # noqa: ANN202
    smp = pytest.importorskip("segmentation_models_pytorch", reason="segmentation_models_pytorch is not installed")
    return smp.Unet("resnet18", encoder_weights=None, classes=1), {"task": "segment", "class_names": ["lesion"]}


FOREIGN = [
    ("timm_efficientnet_b0", _timm, "efficientnet_b0", 96),
    ("timm_vit_small", _timm, "vit_small_patch16_224", 64),
    ("torchvision_resnet18", _torchvision, "resnet18", 64),
    ("torchvision_swin_v2_t", _torchvision, "swin_v2_t", 64),
    ("hf_vit", _hf_vit, "vit", 32),
    ("smp_unet", _smp_unet, "unet", 64),
    ("onnx_torchscript_resnet18", _torchvision, "resnet18", 64),
]


@pytest.fixture(scope="module")
def calib_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    for i, image in enumerate(smooth_images(10, 80, 96, seed=3)):
        cv2.imwrite(str(root / f"img{i}.png"), image[:, :, ::-1])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", FOREIGN, ids=[c[0] for c in FOREIGN])
def test_foreign_model_export_quantize_predict(tmp_path, calib_images, record_property, case):
    from edgederm.calibration import quantize_bundle

    key, build, name, side = case
    torch.manual_seed(0)
    module, declared = build(name, side)
    module.eval()
    task = declared.get("task", "classify")
    names = declared.get("class_names", HAM)
    config = PreprocessConfig(input_size=(side, side), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    out = tmp_path / "bundle"
    if key.startswith("onnx_"):
        path = _torchscript_export(module, torch.randn(1, 3, side, side), tmp_path / "model.onnx")
        import_onnx(path, out, task=task, class_names=names, preprocess=config, profile_memory=False)
    else:
        export_bundle(module, out, task=task, input_size=(side, side), class_names=names, preprocess=config,
                      profile_memory=False)
    image = smooth_images(1, 80, 96, seed=7)[0]
    x = torch.from_numpy(preprocess(image, config))[None]
    with torch.no_grad():
        raw = module(x)
    raw = raw.logits if hasattr(raw, "logits") else raw
    model = load(out, precision="fp32")
    result = model.predict(dermoscopy=image)
    if task == "classify":
        expected = torch.softmax(raw[0], 0).numpy()
        got = np.array([result.probabilities[n] for n in names])
        parity = float(np.abs(got - expected).max())
    else:  # a tile at the input size: the heatmap is the sigmoid of the one lesion channel
        assert result.heatmap is not None
        tile = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(preprocess(tile, dataclasses_replace(config, resize="none")))[None]
        with torch.no_grad():
            expected = torch.sigmoid(module(x)[0, 0]).numpy()
        got = load(out, precision="fp32").predict(dermoscopy=tile).heatmap
        parity = float(np.abs(got - expected).max())
    record_property(f"figure:{key} fp32 parity", f"{parity:.1e}")
    assert parity <= 1e-4
    for precision in ("int8", "int8_dynamic"):
        report = quantize_bundle(out, calib_images, precision=precision, max_images=6, eval_dir=calib_images,
                                 target_agreement=None, say=lambda m: None, sensitivity_seconds=1)
        agreement = report["fidelity"].get("decision_agreement", report["fidelity"].get("pixel_agreement"))
        record_property(f"figure:{key} {precision} agreement", agreement)
        assert 0.0 <= float(agreement) <= 1.0
        quantized = load(out, precision=precision).predict(dermoscopy=image)
        assert quantized.precision == precision


def dataclasses_replace(config: PreprocessConfig, **changes):  # noqa: ANN001, ANN201
    import dataclasses

    return dataclasses.replace(config, **changes)
