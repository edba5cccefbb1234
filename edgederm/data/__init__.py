"""The dataset layer: layouts, labels.csv, labelled tensors, splits, augmentation.

Every layout reader (``edgederm.data.layouts``, one module each, registered by name)
returns a :class:`Dataset` of :class:`Record` s, so training, calibration and
evaluation never care where the images came from; :func:`load_labelled_images` turns
records into the trainer's :class:`LabelledImages` through the runtime's
preprocessing. Nothing here imports training code, and nothing imports torch.

Decisions taken for every layout:

* Metadata values stay raw (strings, numbers parsed only for numeric schema fields)
  and are validated against the schema while reading: an unknown category fails at
  read time with the file, line and image named, not in the middle of training.
* Identifiers (lesion, patient) are never metadata; they are ``Record.group`` so a
  split can keep one lesion's images together.
* Auto-detection looks a few folder levels down for each layout's marker file and
  refuses to guess between two matching public layouts; the generic layouts (csv,
  folder) are only considered when no public layout matches.
"""
from edgederm.data.labelled import LabelledImages, load_labelled_images, read_image_folder
from edgederm.data.layouts import (
    DERM7PT_CLASSES,
    DERM7PT_DIAGNOSES,
    HAM10000_CLASSES,
    LAYOUTS,
    PAD_UFES_20_CLASSES,
    PH2_CLASSES,
    detect_layout,
    read_dataset,
    register_layout,
)
from edgederm.data.records import Dataset, Record

__all__ = [
    "LAYOUTS",
    "Record",
    "Dataset",
    "LabelledImages",
    "read_dataset",
    "detect_layout",
    "register_layout",
    "load_labelled_images",
    "read_image_folder",
    "HAM10000_CLASSES",
    "PAD_UFES_20_CLASSES",
    "DERM7PT_CLASSES",
    "DERM7PT_DIAGNOSES",
    "PH2_CLASSES",
]
