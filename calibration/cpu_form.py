"""Which INT8 form ``edgederm quantize`` makes for the CPU the graphs are for, and the
record of it that each int8 graph carries in the manifest.

The decision (runtime/cpu.py ``int8_form``; sources in docs/int8-and-cpus.md): on x86
CPUs without VNNI ONNX Runtime's u8 x s8 kernels add pairs of products in saturating
16-bit lanes, so graphs for them get weights within +-64 (``reduce_range``), which
cannot saturate; VNNI, AMX and ARM kernels accumulate in 32 bits and get full 8-bit
weights. The record names the CPU the graph was quantized and measured on and the
class it was made for, so ``load`` re-checks the graph on a CPU that computes it
differently (runtime/cpu_check.py).
"""
from __future__ import annotations

from typing import Any

from edgederm.runtime.cpu import KERNEL_CLASSES, int8_form, record_summary, this_cpu
from edgederm.runtime.errors import InputError

#: The keys of the record stored with each int8 graph (runtime/bundle.py ``QuantizedOn``).
GRAPH_CPU_KEYS = ("made_on", "made_for", "saturation_free", "form")
CPU_PRECISIONS = ("int8", "int8_dynamic")


def cpu_record(precision: str, for_cpu: str | None, backend: str = "onnxruntime",
               activation_type: str = "uint8") -> dict[str, Any] | None:
    """The form chosen for ``precision`` graphs meant for CPUs of class ``for_cpu`` (None:
    this CPU's), and why; None for precisions that do not run int8 kernels on a CPU."""
    if for_cpu is not None and for_cpu not in KERNEL_CLASSES:
        raise InputError(f"--for-cpu {for_cpu!r} is not an int8 kernel class; choose one of "
                         f"{', '.join(KERNEL_CLASSES)} (`edgederm doctor` prints a device's class)")
    if precision not in CPU_PRECISIONS:
        return None
    here = this_cpu()
    chosen = int8_form(for_cpu or here.kernel_class)
    activations = "u8 activations (per batch)" if precision == "int8_dynamic" else \
        f"{'s8' if activation_type == 'int8' else 'u8'} activations"
    if precision == "int8" and backend == "modelopt":  # TensorRT's form: modelopt has no reduced range
        saturation_free = False
        form = f"{activations}, 8-bit weights (nvidia-modelopt, for TensorRT)"
        reason = "TensorRT QDQ as nvidia-modelopt writes it; " + (
            "on this CPU class it can saturate, so load re-checks it with the self-test" if chosen.reduce_range
            else chosen.reason)
    else:
        saturation_free = chosen.reduce_range
        form = f"{activations}, {'7-bit weights (reduce_range)' if chosen.reduce_range else '8-bit weights'}"
        reason = chosen.reason
    return {"made_on": here.to_record(), "made_for": chosen.target_class, "saturation_free": saturation_free,
            "form": form, "reason": reason}


def cpu_lines(record: dict[str, Any]) -> list[str]:
    """The fidelity report's lines on the form: which, for what CPU, on what CPU, why."""
    made_on = record["made_on"]
    lines = [f"  int8 form                  {record['form']} for {record['made_for']} CPUs",
             f"  why                        {record['reason']}",
             f"  quantized and measured on  {record_summary(made_on)}"]
    if made_on.get("class") != record["made_for"] and not record["saturation_free"]:
        lines.append("  note                       the figures above are this CPU's arithmetic; a "
                     f"{record['made_for']} CPU computes this graph differently, so load runs the golden "
                     "self-test there before trusting it (`edgederm selftest add` first)")
    return lines
