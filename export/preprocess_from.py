"""A bundle's preprocessing read from the model's own configuration, not re-typed.

A wrong mean/std is the most common silent deployment bug, so the constants are read
from where the model's library keeps them (the mapping is tabled in
docs/your-own-model.md):

- timm: ``pretrained_cfg`` (``input_size``, ``mean``, ``std``, ``crop_pct``,
  ``crop_mode``, ``interpolation``) of a model or of a registered name;
- torchvision: a weights enum's ``transforms()`` (``resize_size``, ``crop_size``,
  ``mean``, ``std``, ``interpolation``);
- Hugging Face: an image processor or its ``preprocessor_config.json``
  (``size``, ``do_resize``, ``do_center_crop``, ``crop_size``, ``crop_pct``,
  ``do_rescale``, ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std``).

"Resize the shorter side to S, then crop the central C" becomes ``center_crop`` with
``crop_fraction = C / S``: the same region of the photo. The libraries resample with
PIL or torch (bilinear/bicubic, antialiased); the runtime resamples with OpenCV (area
when shrinking, linear when enlarging), so where a resize happens the pixels differ
slightly (bounded in tests/export/test_your_own_model.py); without a resize they are equal.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgederm.runtime.errors import InputError
from edgederm.runtime.preprocess import PreprocessConfig

SOURCES = ("timm", "torchvision", "hf")


def _triple(value: Any, key: str, where: str) -> tuple[float, float, float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(values) != 3:
        raise InputError(f"{where}: {key}={value!r}; expected three numbers (R, G, B)")
    return (float(values[0]), float(values[1]), float(values[2]))


def from_timm(source: Any) -> PreprocessConfig:
    """From a timm model, its ``pretrained_cfg`` (dict or PretrainedCfg) or a model name."""
    if isinstance(source, str):
        import timm

        cfg_obj = timm.models.get_pretrained_cfg(source)
        if cfg_obj is None:
            raise InputError(f"timm has no pretrained config for {source!r}; expected a timm model name such as "
                             "'efficientnet_b0' (timm.list_models())")
        cfg: Mapping[str, Any] = cfg_obj.to_dict()
    elif hasattr(source, "pretrained_cfg"):
        cfg = dict(source.pretrained_cfg)
    elif hasattr(source, "to_dict"):
        cfg = source.to_dict()
    elif isinstance(source, Mapping):
        cfg = source
    else:
        raise InputError(f"from_timm: received {type(source).__name__}; expected a timm model, its pretrained_cfg "
                         "or a model name")
    where = "timm pretrained_cfg"
    size = cfg.get("test_input_size") or cfg.get("input_size")
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        raise InputError(f"{where}: input_size={size!r}; expected (3, H, W)")
    height, width = int(size[1]), int(size[2])
    crop_pct = float(cfg.get("test_crop_pct") or cfg.get("crop_pct") or 0.875)
    mode = cfg.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise InputError(f"{where}: crop_mode={mode!r}; supported: 'center', 'squash' (use --mean/--std and a "
                         "resize policy instead)")
    # timm resizes to floor(size / crop_pct) and crops `size` back out of it.
    fraction = height / math.floor(height / crop_pct)
    return PreprocessConfig(input_size=(height, width), resize="center_crop" if mode == "center" else "stretch",
                            crop_fraction=min(1.0, fraction), mean=_triple(cfg.get("mean"), "mean", where),
                            std=_triple(cfg.get("std"), "std", where))


def from_torchvision(source: Any) -> PreprocessConfig:
    """From a torchvision weights enum (``ResNet18_Weights.DEFAULT``), its name, or the
    ``ImageClassification`` transform its ``transforms()`` returns."""
    if isinstance(source, str):
        from torchvision.models import get_weight

        source = get_weight(source)
    transform = source.transforms() if hasattr(source, "transforms") else source
    where = f"torchvision transform {type(transform).__name__}"
    try:
        resize, crop = list(transform.resize_size), list(transform.crop_size)
        mean, std = transform.mean, transform.std
    except AttributeError as exc:
        raise InputError(f"{where}: no {exc.name or 'resize_size/crop_size/mean/std'} attribute; expected a "
                         "classification weights enum (e.g. ResNet18_Weights.DEFAULT) or its transforms()") from None
    if len(resize) != 1 or len(crop) not in (1, 2):
        raise InputError(f"{where}: resize_size={resize}, crop_size={crop}; expected one shorter-side size and "
                         "a crop size")
    height = width = int(crop[0])
    if len(crop) == 2:
        height, width = int(crop[0]), int(crop[1])
    return PreprocessConfig(input_size=(height, width), resize="center_crop",
                            crop_fraction=min(1.0, min(height, width) / int(resize[0])),
                            mean=_triple(mean, "mean", where), std=_triple(std, "std", where))


def _hw(value: Any, key: str, where: str) -> tuple[int, int] | int:
    """A Hugging Face size: {height, width} -> (H, W); {shortest_edge} -> int."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value and "longest_edge" not in value:
            return int(value["shortest_edge"])
    raise InputError(f"{where}: {key}={value!r}; supported: {{'height': H, 'width': W}} or {{'shortest_edge': S}}")


def from_hf(source: Any) -> PreprocessConfig:
    """From a Hugging Face image processor, its dict, or a preprocessor_config.json
    (a file or the folder holding it)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "preprocessor_config.json" if path.is_dir() else path
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read Hugging Face image processor config {path}: {exc}; expected "
                             "preprocessor_config.json (AutoImageProcessor.save_pretrained writes it)") from None
    elif hasattr(source, "to_dict"):
        cfg = source.to_dict()
    elif isinstance(source, Mapping):
        cfg = dict(source)
    else:
        raise InputError(f"from_hf: received {type(source).__name__}; expected an image processor, its dict or "
                         "a preprocessor_config.json path")
    where = f"Hugging Face {cfg.get('image_processor_type', 'image processor')}"
    if cfg.get("do_rescale", True) and not math.isclose(float(cfg.get("rescale_factor", 1 / 255)), 1 / 255,
                                                        rel_tol=1e-6):
        raise InputError(f"{where}: rescale_factor={cfg.get('rescale_factor')}; only 1/255 (pixels to 0..1) is "
                         "supported")
    if cfg.get("do_normalize", True):
        mean = _triple(cfg.get("image_mean"), "image_mean", where)
        std = _triple(cfg.get("image_std"), "image_std", where)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if not cfg.get("do_rescale", True):  # the model takes 0..255 values
        mean, std = (mean[0] / 255, mean[1] / 255, mean[2] / 255), (std[0] / 255, std[1] / 255, std[2] / 255)
    size = _hw(cfg.get("size"), "size", where) if cfg.get("do_resize", True) else None
    crop = _hw(cfg.get("crop_size"), "crop_size", where) if cfg.get("do_center_crop") else None
    if isinstance(crop, int):
        crop = (crop, crop)
    if size is None:
        if crop is None:
            raise InputError(f"{where}: do_resize and do_center_crop are both off; the input size is unknown")
        return PreprocessConfig(input_size=crop, resize="center_crop", mean=mean, std=std)
    if isinstance(size, int):  # shorter side to `size`, keeping the aspect ratio
        if crop is None and "crop_pct" in cfg and size < 384:  # ConvNeXt: resize to size / crop_pct, crop size
            return PreprocessConfig(input_size=(size, size), resize="center_crop",
                                    crop_fraction=size / int(size / float(cfg["crop_pct"])), mean=mean, std=std)
        crop = crop or (size, size)
        return PreprocessConfig(input_size=crop, resize="center_crop", crop_fraction=min(1.0, min(crop) / size),
                                mean=mean, std=std)
    if crop is None:
        return PreprocessConfig(input_size=size, resize="stretch", mean=mean, std=std)
    if not math.isclose(crop[0] / size[0], crop[1] / size[1], rel_tol=1e-3):
        raise InputError(f"{where}: size={size}, crop_size={crop} keep different fractions of height and width; "
                         "give the preprocessing with --mean/--std and a resize policy instead")
    return PreprocessConfig(input_size=crop, resize="stretch", crop_fraction=crop[0] / size[0], mean=mean, std=std)


def preprocess_from(spec: str) -> PreprocessConfig:
    """``timm:NAME``, ``torchvision:WEIGHTS`` (e.g. ``ResNet18_Weights.IMAGENET1K_V1``)
    or ``hf:PATH`` (preprocessor_config.json or its folder)."""
    kind, _, name = spec.partition(":")
    readers = {"timm": from_timm, "torchvision": from_torchvision, "hf": from_hf}
    if kind not in readers or not name:
        raise InputError(f"--preprocess-from {spec!r}; expected one of {', '.join(k + ':NAME' for k in SOURCES)}, "
                         "e.g. timm:efficientnet_b0, torchvision:ResNet18_Weights.DEFAULT, "
                         "hf:./preprocessor_config.json")
    return readers[kind](name)


def preprocess_for(module: Any) -> PreprocessConfig | None:
    """The preprocessing a module carries itself (timm models: ``pretrained_cfg``), else None."""
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and "mean" in cfg and "input_size" in cfg:
        return from_timm(cfg)
    return None


def explicit(input_size: Sequence[int], mean: Sequence[float] | None, std: Sequence[float] | None,
             resize: str = "stretch") -> PreprocessConfig:
    """``--mean/--std`` given by hand; one left out keeps PreprocessConfig's default (0.5)."""
    kwargs: dict[str, Any] = {"input_size": (int(input_size[0]), int(input_size[1])), "resize": resize}
    if mean is not None:
        kwargs["mean"] = tuple(mean)
    if std is not None:
        kwargs["std"] = tuple(std)
    return PreprocessConfig(**kwargs)
