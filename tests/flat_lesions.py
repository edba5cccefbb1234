"""Hand-built test data and bundles: flat skin with a coloured lesion square, and an ONNX
classifier of the lesion colour (builds in milliseconds, no torch).

The classifier takes the mean colour of the central 16 x 16 pixels of a 64 x 64 image and
picks the nearest lesion colour (a linear map). Two optional defects, each made on
purpose: ``darkness`` adds a large melanoma logit when the skin at the top border is
dark (worse on dark skin), and ``outlier`` puts a weight on a feature that is always 0
in the melanoma row (nothing in float; INT8's weight scale sized for it rounds the row's
real weights away, so the model is sensitive to quantization in one node, the Gemm).
"""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

CLASSES = ["nevus", "melanoma", "vascular"]
LESION_RGB = {"nevus": (150, 90, 50), "melanoma": (50, 35, 35), "vascular": (190, 40, 70)}
SKIN_RGB = [(238, 206, 190), (226, 184, 158), (205, 158, 122), (176, 126, 90), (128, 86, 60), (84, 57, 43)]
SIZE = 64


def lesion_colour_classifier(weight_dtype=np.float32, outlier: float = 0.0, darkness: float = 30.0):
    """The classifier of the module docstring; ``weight_dtype=np.float16`` rounds its weights
    as an fp16 graph would."""
    from onnx import TensorProto, helper

    mu = np.array([LESION_RGB[c] for c in CLASSES], np.float64) / 127.5 - 1.0  # preprocessed lesion colours
    scale = 4.0
    w = (2 * scale * mu).astype(weight_dtype).astype(np.float32)  # nearest prototype as a linear map
    w = np.concatenate([w, np.array([[0.0], [outlier], [0.0]], np.float32)], axis=1)
    b = (-scale * (mu ** 2).sum(1)).astype(weight_dtype).astype(np.float32)
    shift = np.array([[0.0, darkness, 0.0]], np.float32)  # melanoma logit per unit of darkness
    f32 = TensorProto.FLOAT
    init = [helper.make_tensor("w", f32, w.shape, w.ravel()), helper.make_tensor("b", f32, [3], b),
            helper.make_tensor("mean3", f32, [3, 1], [1 / 3] * 3), helper.make_tensor("thr", f32, [1], [-0.2]),
            helper.make_tensor("shift", f32, [1, 3], shift.ravel()),
            helper.make_tensor("c0", TensorProto.INT64, [2], [24, 24]), helper.make_tensor("c1", TensorProto.INT64, [2], [40, 40]),
            helper.make_tensor("ax", TensorProto.INT64, [2], [2, 3]), helper.make_tensor("t0", TensorProto.INT64, [1], [0]),
            helper.make_tensor("t1", TensorProto.INT64, [1], [6]), helper.make_tensor("ax2", TensorProto.INT64, [1], [2]),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]), helper.make_tensor("ax1", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node("Slice", ["dermoscopy", "c0", "c1", "ax"], ["centre"]),
             helper.make_node("GlobalAveragePool", ["centre"], ["cg"]), helper.make_node("Flatten", ["cg"], ["f"]),
             helper.make_node("Slice", ["f", "t0", "one", "ax1"], ["f0"]), helper.make_node("Sub", ["f0", "f0"], ["zero"]),
             helper.make_node("Concat", ["f", "zero"], ["f4"], axis=1),
             helper.make_node("Gemm", ["f4", "w", "b"], ["colour_logits"], transB=1),
             helper.make_node("Slice", ["dermoscopy", "t0", "t1", "ax2"], ["top"]),
             helper.make_node("GlobalAveragePool", ["top"], ["tg"]), helper.make_node("Flatten", ["tg"], ["g"]),
             helper.make_node("MatMul", ["g", "mean3"], ["brightness"]),
             helper.make_node("Sub", ["thr", "brightness"], ["below"]), helper.make_node("Relu", ["below"], ["dark"]),
             helper.make_node("Mul", ["dark", "shift"], ["dark_logits"]),  # broadcast: no MatMul+Add for the optimizer to fuse
             helper.make_node("Add", ["colour_logits", "dark_logits"], ["logits"])]
    for i, node in enumerate(nodes):
        node.name = "colour_gemm" if node.op_type == "Gemm" else f"{node.op_type.lower()}_{i}"  # the fallback names nodes
    graph = helper.make_graph(nodes, "darkness", [helper.make_tensor_value_info("dermoscopy", f32, ["batch", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", f32, ["batch", 3])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_flat_dataset(root: Path, per_cell: int, seed: int, skin_tone_column: bool = True,
                       tones: int = len(SKIN_RGB)) -> Path:
    """labels.csv + images/: every skin tone x class, lesion colour jittered, metadata age/sex/skin_tone."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for tone, skin in enumerate(SKIN_RGB[:tones], start=1):
        for label, name in enumerate(CLASSES):
            for k in range(per_cell):
                image = np.empty((SIZE, SIZE, 3), np.float64)
                image[:] = np.asarray(skin) + rng.normal(0, 4, 3)
                image[24:40, 24:40] = np.asarray(LESION_RGB[name]) + rng.normal(0, 28, 3)
                case_id = f"t{tone}_{name}_{k}"
                bgr = cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
                cv2.imwrite(str(root / "images" / f"{case_id}.png"), bgr)
                row = {"id": case_id, "label": label, "class_name": name, "age": int(rng.integers(20, 85)),
                       "sex": ["female", "male"][int(rng.integers(2))]}
                if skin_tone_column:
                    row["skin_tone"] = tone
                rows.append(row)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def mean_colour_classifier(num_classes: int, size: int = 32, seed: int = 0):
    """A K-class classifier on the image's mean colour (GlobalAveragePool, Gemm), seeded
    random weights: any class list, for datasets whose classes are not the three above."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 3, (num_classes, 3)).astype(np.float32)
    b = rng.normal(0, 0.5, num_classes).astype(np.float32)
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("GlobalAveragePool", ["dermoscopy"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1, name="gemm")]
    graph = helper.make_graph(nodes, "mean_colour", [helper.make_tensor_value_info("dermoscopy", f32, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("logits", f32, ["batch", num_classes])],
                              [helper.make_tensor("w", f32, w.shape, w.ravel()), helper.make_tensor("b", f32, [num_classes], b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def dark_pixel_segmenter(threshold: float = 110.0, sharpness: float = 12.0):
    """A segmenter of dark pixels: lesion where the mean of R, G, B is under ``threshold``
    (a 1x1 convolution to background/lesion logits), any tile size."""
    from onnx import TensorProto, helper

    # Preprocessed x = v / 127.5 - 1; lesion logit = sharpness * (t - mean v) / 127.5.
    t = threshold / 127.5 - 1.0
    w = np.zeros((2, 3, 1, 1), np.float32)
    w[1, :, 0, 0] = -sharpness / 3
    b = np.array([0.0, sharpness * t], np.float32)
    f32 = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Conv", ["dermoscopy", "w", "b"], ["logits"], name="pixel_conv")],
                              "dark_pixels", [helper.make_tensor_value_info("dermoscopy", f32, ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("logits", f32, ["batch", 2, "h", "w"])],
                              [helper.make_tensor("w", f32, w.shape, w.ravel()), helper.make_tensor("b", f32, [2], b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
