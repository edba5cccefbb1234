"""Colours of the synthetic images: skin tones, lesion colours, and how darker skin mutes them (RGB)."""
from __future__ import annotations

import numpy as np

# Skin as seen through a polarised dermoscope, Fitzpatrick I..VI (RGB).
SKIN_RGB = np.array(
    [
        (238, 206, 190),
        (226, 184, 158),
        (205, 158, 122),
        (176, 126, 90),
        (128, 86, 60),
        (84, 57, 43),
    ],
    dtype=np.float32,
)
# Pigment looks darker on darker skin; vessels and the veil darken less.
PIGMENT_GAIN = np.array([1.0, 0.95, 0.85, 0.72, 0.52, 0.38], dtype=np.float32)
VESSEL_GAIN = np.array([1.0, 1.0, 0.95, 0.88, 0.76, 0.64], dtype=np.float32)
VEIL_GAIN = np.array([1.0, 0.97, 0.9, 0.8, 0.66, 0.55], dtype=np.float32)

# Lesion colours (RGB).
NEVUS_LIGHT = np.array((172, 122, 86), np.float32)
NEVUS_DARK = np.array((108, 66, 42), np.float32)
MEL_LIGHT_BROWN = np.array((178, 128, 92), np.float32)
MEL_DARK_BROWN = np.array((96, 56, 36), np.float32)
MEL_BLACK = np.array((44, 32, 30), np.float32)
MEL_GREY = np.array((124, 120, 132), np.float32)
MEL_BLUE_WHITE = np.array((126, 150, 182), np.float32)
VASC_PINK = np.array((206, 104, 102), np.float32)
VASC_PURPLE = np.array((172, 68, 86), np.float32)
LACUNA_RED = np.array((192, 36, 50), np.float32)
LACUNA_DARK = np.array((112, 16, 38), np.float32)
LACUNA_PURPLE = np.array((104, 22, 56), np.float32)
