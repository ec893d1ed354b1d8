"""Shared fixtures: the model zoo is built once per session (exports take seconds)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# compile reads the tuning cache: tests start from an empty one, never the user's
os.environ["SPARSEC_TUNING_CACHE"] = str(
    Path(tempfile.mkdtemp(prefix="sparsec-tuning-")) / "tuning.json")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)

import zoo  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def zoo_models():
    """name -> onnx.ModelProto, built lazily and cached for the whole session."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = zoo.build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_files(zoo_models, tmp_path_factory):
    """name -> path of the model saved as an .onnx file."""
    import onnx

    root = tmp_path_factory.mktemp("zoo")

    def get(name: str) -> Path:
        path = root / f"{name}.onnx"
        if not path.exists():
            onnx.save(zoo_models(name), str(path))
        return path

    return get
