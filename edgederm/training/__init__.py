"""The trainer's parts; the loop itself is ``edgederm.train``.

``config`` (options and the learning-rate schedule), ``options`` (command-line
options, importable without torch), ``state`` (checkpointed training state and
resume), ``distributed`` (process group and batch shards), ``clinical`` (temperature
and review thresholds fitted on the validation split).
"""
