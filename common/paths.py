"""Where the project's own files are (no settings here: those live in common/config.py)."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_SAMPLE = PROJECT_ROOT.parent / "shared" / "fashion-sample"
VENDORED_SAMPLE = PROJECT_ROOT / "data" / "sample"
MODELS_DIR = PROJECT_ROOT / "models"


def default_model_cache_dir() -> Path:
    """The user's cache directory (XDG_CACHE_HOME, else ~/.cache) for quarry/models."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quarry" / "models"


def default_dataset_path() -> Path:
    """The shared Kaggle sample when it exists, else the vendored subset."""
    return SHARED_SAMPLE if SHARED_SAMPLE.is_dir() else VENDORED_SAMPLE
