"""Dataset layouts, one module each, registered by name (see ``registry``).

Importing this package registers the layouts of ``_LAYOUT_MODULES``, in the order
error messages list them and the generic layouts (csv, folder) are tried. A new layout
is a module whose reader is decorated by :func:`register_layout`, added to that list.
"""
import importlib

from edgederm.data.layouts.registry import LAYOUTS, detect_layout, layout_name, read_dataset, register_layout

_LAYOUT_MODULES = ("edgederm", "isic", "ham10000", "pad_ufes_20", "derm7pt", "isic_segmentation", "ph2",
                   "clinic_csv", "folder")
for _module in _LAYOUT_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

from edgederm.data.layouts.derm7pt import DERM7PT_CLASSES, DERM7PT_DIAGNOSES  # noqa: E402
from edgederm.data.layouts.ham10000 import HAM10000_CLASSES  # noqa: E402
from edgederm.data.layouts.pad_ufes_20 import PAD_UFES_20_CLASSES  # noqa: E402
from edgederm.data.layouts.ph2 import PH2_CLASSES  # noqa: E402

__all__ = ["LAYOUTS", "detect_layout", "layout_name", "read_dataset", "register_layout", "DERM7PT_CLASSES",
           "DERM7PT_DIAGNOSES", "HAM10000_CLASSES", "PAD_UFES_20_CLASSES", "PH2_CLASSES"]
