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


@pytest.fixture(scope="session")
def tiny_sids_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real S-IDs of the tiny marketplace: MiniLM embeddings, residual k-means, behaviour blend."""
    from leadre.semantic_ids import build_sids

    out = tmp_path_factory.mktemp("sids") / "sids"
    build_sids(tiny_data_dir, out, cache_dir=out.parent / "cache", progress=False)
    return out


TINY_CONFIG = """
prompts:
  stream_max_ads: 12
  max_prompt_tokens: 160
model:
  bpe_vocab_size: 600
sft:
  epochs: 3
  batch_size: 16
  learning_rate: 0.004
  evals_per_epoch: 1
  eval_users: 40
  beam: 10
  threads: 1
dpo:
  max_users: 60
  pairs_per_user: 4
  batch_size: 16
  learning_rate: 0.0002
  threads: 1
"""


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="session")
def tiny_prompts_dir(tiny_data_dir: Path, tiny_sids_dir: Path, tiny_config: Path) -> Path:
    from leadre.config import read_config, section
    from leadre.prompts import PromptConfig, build_prompts

    out = tiny_sids_dir.parent / "prompts"
    build_prompts(tiny_data_dir, tiny_sids_dir, out, section(read_config(tiny_config), "prompts", PromptConfig))
    return out


@pytest.fixture(scope="session")
def tiny_sft_dir(tiny_prompts_dir: Path, tiny_sids_dir: Path, tiny_config: Path) -> Path:
    """A `tiny` model trained for a few epochs (shared by the DPO, evaluation and pipeline tests)."""
    from leadre.cli import main

    out = tiny_sids_dir.parent / "sft"
    assert main(["train", "sft", "--prompts", str(tiny_prompts_dir), "--sids", str(tiny_sids_dir), "--out", str(out),
                 "--config", str(tiny_config)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_sft_dir: Path, tiny_sids_dir: Path, tiny_data_dir: Path) -> Path:
    """A recall bundle of the tiny SFT model (what serving, the pipeline and the manifests load)."""
    from leadre.bundle import build_bundle

    out = tiny_sids_dir.parent / "bundle"
    build_bundle(tiny_sft_dir, tiny_sids_dir, tiny_data_dir, out)
    return out
