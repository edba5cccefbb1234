"""Triton Python-backend model running the whole EdgeDerm pipeline (``export-triton`` copies it as model.py).

Preprocessing, tiling, every stage, calibration and review run in the EdgeDerm
runtime on the bundle stored beside this file (``<version>/bundle``), so a Triton
server answers exactly what ``predict`` answers, on the same protocol as
``edgederm serve`` (same input and output names, see ``edgederm.serve.protocol``).

The Python backend's stub embeds its own interpreter, which ignores PYTHONPATH; it
is read here and its folders (with their .pth files, so editable installs work)
are put first on ``sys.path``, so the model can be given the environment that has
the EdgeDerm runtime. The numpy in that environment must match what the stub was
built against (numpy 1.x for the stubs of nvidia-pytriton 0.7).
"""
import os
import site
import sys


def _use_pythonpath() -> None:
    before = list(sys.path)
    for entry in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        site.addsitedir(entry)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


_use_pythonpath()

import json  # noqa: E402
from typing import Any  # noqa: E402

import triton_python_backend_utils as pb_utils  # noqa: E402

from edgederm.runtime import load  # noqa: E402
from edgederm.serve import protocol  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        bundle = os.path.join(args["model_repository"], args["model_version"], "bundle")
        self.model = load(bundle, backend="onnxruntime-cpu", precision=parameters.get("precision", "auto"))
        self.limits = protocol.Limits(max_image_side=int(parameters["max_image_side"]),
                                      max_image_pixels=int(parameters["max_image_pixels"]))
        self.inputs = protocol.input_specs(self.model.modalities)

    def execute(self, requests: list) -> list:
        return [self._answer(request) for request in requests]

    def _answer(self, request: Any) -> Any:
        try:
            tensors = []
            for spec in self.inputs:
                given = pb_utils.get_input_tensor_by_name(request, spec["name"])
                if given is not None:
                    data = given.as_numpy()
                    tensors.append(protocol.Tensor(spec["name"], spec["datatype"], list(data.shape), data))
            parameters = json.loads(request.parameters() or "{}")
            parsed = protocol.parse_request(tensors, parameters, request.requested_output_names() or None,
                                            self.model.modalities, self.model.task, self.limits)
            result = protocol.predict_request(self.model, parsed)
            outputs = protocol.result_tensors(result, self.model.task, parsed.outputs, parsed.mask_format)
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(t.name, t.data) for t in outputs])
        except Exception as exc:  # an error response for this request; the model stays loaded
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                protocol.as_protocol_error(exc).message))
