from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
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


# The tiny config plus small evaluate / nearline / compile sections: a whole pipeline run (test_pipeline, test_demo).
TINY_PIPELINE_CONFIG = TINY_CONFIG + """evaluate:
  splits: [validation]
  users: 30
  beam: 10
nearline:
  top_n: 10
compile:
  users: 8
  beam: 10
"""


@pytest.fixture(scope="session")
def tiny_pipeline_config(tiny_config: Path) -> Path:
    path = tiny_config.with_name("tiny-pipeline.yaml")
    path.write_text(TINY_PIPELINE_CONFIG)
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


class RedisProcess:
    """A real `redis-server` on 127.0.0.1 (or `host`) without persistence; `stop()` and `start()` again keep the port."""

    def __init__(self, binary: str, port: int, host: str = "127.0.0.1"):
        self.binary, self.port, self.host = binary, port, host
        self.address = f"{host}:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        # Protected mode refuses every address but loopback; another `host` is a test's own Docker network.
        self.process = subprocess.Popen([self.binary, "--bind", self.host, "--port", str(self.port), "--save", "",
                                         "--appendonly", "no", "--protected-mode", "yes" if self.host == "127.0.0.1"
                                         else "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on {self.address}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def _redis_process(host: str = "127.0.0.1") -> RedisProcess:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    with socket.socket() as s:  # a free port: the kernel picks one, redis-server binds it right after
        s.bind((host, 0))
        port = s.getsockname()[1]
    return RedisProcess(binary, port, host)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real Redis for the session's tests: its address "127.0.0.1:PORT" (e.g. REDIS_CONNECTION_STRING)."""
    server = _redis_process()
    server.start()
    yield server.address
    server.stop()


@pytest.fixture
def redis_outage() -> Iterator[RedisProcess]:
    """A test's own Redis that it may stop and start again (outage tests); `.address`, `.stop()`, `.start()`."""
    server = _redis_process()
    server.start()
    yield server
    server.stop()
