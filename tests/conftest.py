from __future__ import annotations

import os
from pathlib import Path

import pytest

from leadre.schema import Tables, read_data_dir, write_data_dir
from leadre.synth import POSITIVE_ACTIONS, SynthConfig, generate, synth_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic marketplace written once per test session (read-only for tests)."""
    cfg = SynthConfig(users=300, seed=7)
    out = tmp_path_factory.mktemp("tiny") / "data"
    write_data_dir(generate(cfg), out, "data synth", synth_parameters(cfg), POSITIVE_ACTIONS)
    return out


@pytest.fixture(scope="session")
def tiny_tables(tiny_data_dir: Path) -> Tables:
    return read_data_dir(tiny_data_dir)


def shared_dataset(name: str) -> Path:
    """A dataset from ../shared/data, or a skip saying why it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the slow tests need ../shared/data beside the checkout")
    return path
