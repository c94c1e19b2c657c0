"""Shared fixtures: small real stores built once per test session."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "chula-rbc12-sample"
SHARED_DATA = Path(os.environ.get("CYTOSTORE_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    # ONNX graphs and trained encoders go to folders of this test run, never the user's home;
    # subprocesses started by tests inherit them.
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="cytostore-tests-"))
    os.environ["CYTOSTORE_CACHE"] = str(scratch / "cache")
    os.environ["CYTOSTORE_HOME"] = str(scratch / "home")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def sample_rows(fields: list[str] | None = None) -> list[dict]:
    """Rows of the bundled sample manifest, with absolute image paths."""
    with open(SAMPLE / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["image"] = str(SAMPLE / r["image"])
    return [r for r in rows if fields is None or r["slide_id"] in fields]


def write_manifest(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


TINY = "test_efficientnet"  # a small timm architecture: fast on the CPU


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A random checkpoint of the tiny architecture, written once."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# Three fields of the sample: 360 real cells in 8 classes.
SMALL_FIELDS = ["chula-1", "chula-27", "chula-255"]


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory) -> Path:
    """A manifest of three real Chula RBC-12 fields."""
    return write_manifest(sample_rows(SMALL_FIELDS), tmp_path_factory.mktemp("manifest") / "cells.csv")


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, small_manifest) -> Path:
    """A store of the three fields, embedded with the default encoder (read-only for tests)."""
    from cytostore import IngestConfig, ingest, open_source

    path = tmp_path_factory.mktemp("stores") / "small"
    report = ingest(open_source(small_manifest), path, IngestConfig(batch_size=32))
    assert report.cells_failed == 0
    return path


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> Path:
    """A store of the whole bundled sample (12 fields, 988 cells), default encoder (read-only)."""
    from cytostore import IngestConfig, ingest, open_source

    path = tmp_path_factory.mktemp("stores") / "sample"
    ingest(open_source(SAMPLE / "manifest.csv"), path, IngestConfig(batch_size=64))
    return path
