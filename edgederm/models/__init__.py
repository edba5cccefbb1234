"""The model zoo: ``create_model(name)``, ``list_models()`` (PyTorch)."""
from .base import EdgeDermModel, ExportStage
from .registry import create_model, list_models, model_entry, register_model

__all__ = ["EdgeDermModel", "ExportStage", "create_model", "list_models", "model_entry", "register_model"]
