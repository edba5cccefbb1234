"""``edgederm quickstart``: the whole pipeline on synthetic data, on the embedded default.

data -> train (hifuse_tiny, 128 px) -> export (ONNX, parity checked) -> quantize
(INT8 QDQ, calibrated on training images) -> predict on a 2048x2048 image with ONNX
Runtime on CPU. Prints held-out accuracy fp32 vs int8, decision agreement and latency,
and writes OUT/report.json. Sized to finish in under 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "hifuse_tiny"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _latency_ms(model: Any, image: np.ndarray, repeats: int = 5) -> float:
    model.predict(dermoscopy=image)  # warm-up: first run allocates
    times = []
    for _ in range(repeats):
        times.append(model.predict(dermoscopy=image).timings["total"])
    return float(np.median(times))


def run_quickstart(out: str | Path, n_per_class: int = 200, epochs: int = 6, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    import cv2
    import torch

    from edgederm.calibration import quantize_bundle
    from edgederm.data.synthetic import generate_case, generate_dataset
    from edgederm.export import export_bundle
    from edgederm.runtime import load
    from edgederm.runtime.preprocess import PreprocessConfig
    from edgederm.data import read_image_folder
    from edgederm.train import TrainConfig, train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"edgederm quickstart: {out} is not empty; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    t_start = time.time()
    steps: dict[str, float] = {}

    _say(f"[1/5] generating synthetic dermoscopy: {n_per_class}/class for training, {max(30, n_per_class // 4)}/class held out")
    t = time.time()
    generate_dataset(out / "data" / "train", n_per_class=n_per_class, size=128, seed=seed)
    generate_dataset(out / "data" / "test", n_per_class=max(30, n_per_class // 4), size=128, seed=seed + 1)
    steps["data_s"] = time.time() - t

    _say(f"[2/5] training {MODEL} for {epochs} epochs")
    t = time.time()
    preprocess = PreprocessConfig(input_size=(128, 128))
    data = read_image_folder(out / "data" / "train", preprocess)
    model, train_report = train(data, TrainConfig(model=MODEL, epochs=epochs, seed=seed), out_dir=out / "checkpoint",
                                preprocess=preprocess, say=lambda m: _say("      " + m))
    steps["train_s"] = time.time() - t

    _say("[3/5] exporting to ONNX (dynamo exporter) with a torch parity check")
    t = time.time()
    bundle = export_bundle(model, out / "bundle", preprocess=preprocess, overwrite=True,
                           # Training's clinical settings (temperature, malignancy threshold, not-skin
                           # reference) plus quickstart's review policy.
                           clinical={**train_report.get("clinical", {}), "temperature": train_report["temperature"],
                                     "review_threshold": 0.6,
                                     "review_classes": sorted({"vascular", *train_report.get("clinical", {}).get("review_classes", [])})},
                           progress=lambda m: _say("      " + m))
    steps["export_s"] = time.time() - t

    _say("[4/5] quantizing to INT8 (QDQ, calibrated on 64 training images), fidelity on the held-out set")
    t = time.time()
    calibration = quantize_bundle(bundle, out / "data" / "train", eval_dir=out / "data" / "test",
                                  max_images=64, seed=seed, say=lambda m: _say("      " + m))
    steps["quantize_s"] = time.time() - t

    _say("[5/5] predicting a generated 2048x2048 dermoscopy image with ONNX Runtime on CPU")
    t = time.time()
    case = generate_case(seed=seed + 12345, size=2048, label=1)
    image_path = out / "example_2048.jpg"
    cv2.imwrite(str(image_path), cv2.cvtColor(case.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    fp32 = load(bundle, precision="fp32")
    int8 = load(bundle, precision="int8")
    result = int8.predict_file(image_path, metadata=case.metadata)
    latency = {"fp32_ms": _latency_ms(fp32, case.image), "int8_ms": _latency_ms(int8, case.image)}
    auto_precision = load(bundle).precision  # what precision="auto" takes on this CPU, from quantize's timing
    steps["predict_s"] = time.time() - t

    fidelity = calibration["fidelity"]
    report = {
        "model": MODEL,
        "bundle": str(bundle),
        "seconds_total": round(time.time() - t_start, 1),
        "seconds_by_step": {k: round(v, 1) for k, v in steps.items()},
        "validation_accuracy": train_report["val_accuracy"],
        "heldout_images": fidelity["images"],
        "heldout_accuracy_fp32": fidelity["accuracy_fp32"],
        "heldout_accuracy_int8": fidelity["accuracy_quantized"],
        "int8_decision_agreement": fidelity["decision_agreement"],
        "int8_max_probability_diff": fidelity["max_probability_diff"],
        "chance_accuracy": 1 / 3,
        "example_2048": {"true_class": case.class_name, **result.to_dict()},
        "latency_2048_image": {k: round(v, 1) for k, v in latency.items()},
        "auto_precision_cpu": auto_precision,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _say("")
    _say("EdgeDerm quickstart report")
    _say(f"  held-out accuracy   fp32 {report['heldout_accuracy_fp32']:.3f}   int8 {report['heldout_accuracy_int8']:.3f}   (chance 0.333, {fidelity['images']} images)")
    _say(f"  int8 vs fp32        decision agreement {fidelity['decision_agreement']:.3f}, max |dp| {fidelity['max_probability_diff']:.3f}")
    _say(f"  2048x2048 image     true {case.class_name}, predicted {result.label} "
         f"(p={result.probabilities[result.label]:.2f}), needs_review={result.needs_review} {result.review_reasons}")
    _say(f"  latency per image   fp32 {latency['fp32_ms']:.1f} ms   int8 {latency['int8_ms']:.1f} ms   (decode excluded; ONNX Runtime CPU)")
    speedup = calibration["latency"]["speedup"]
    _say(f"  precision auto      {auto_precision} on this CPU (int8 measured {speedup}x fp32 at quantize time)")
    _say(f"  total time          {report['seconds_total']:.0f} s   {report['seconds_by_step']}")
    _say(f"  bundle              {bundle}  (report: {out / 'report.json'})")
    sys.stdout.flush()
    return report
