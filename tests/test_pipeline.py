"""The daily KFP pipeline: compiled with the real KFP compiler, run whole with kfp.local, sent through kfp.Client.

The local runs train real (tiny) models on a small synthetic marketplace and write a real Feast repository; only the
KFP server and the Kubernetes API are fakes (no cluster here), in the unit tests of what is sent to them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from leadre import pipeline
from leadre.cli import main
from pipelines import build_pipeline
from pipelines.daily import GPU_STEPS, Shape
from tests.conftest import TINY_PIPELINE_CONFIG

REPO = Path(__file__).resolve().parents[1]
STEPS = ("ingest", "semantic-ids", "prompts", "sft", "dpo", "evaluate", "gate", "compile-model", "bundle",
         "nearline", "deploy")
GUARDED = ("compile-model", "bundle", "nearline", "deploy")
USERS = 120


def _compiled(tmp_path: Path, shape: Shape = Shape()) -> dict[str, Any]:
    """The compiled pipeline spec, with its Kubernetes platform spec (a second YAML document) merged in."""
    text = pipeline.compile_pipeline(build_pipeline(shape), tmp_path / "pipeline.yaml").read_text()
    spec, *platform = yaml.safe_load_all(text)
    return spec | (platform[0] if platform else {})


def _condition(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The root DAG's condition task and the tasks it guards."""
    [(name, task)] = [(n, t) for n, t in spec["root"]["dag"]["tasks"].items() if "triggerPolicy" in t]
    return task, spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]


def test_compiled_dag_has_every_step_and_the_gate_guards_deploy(tmp_path: Path) -> None:
    spec = _compiled(tmp_path)
    root = spec["root"]["dag"]["tasks"]
    condition, guarded = _condition(spec)
    assert set(root) - {"condition-1"} | set(guarded) == set(STEPS)
    assert set(guarded) == set(GUARDED)
    # deploy and everything before it after the gate run only when the gate's single output is true
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    assert "gate" in condition["dependentTasks"]
    assert set(guarded["deploy"]["dependentTasks"]) == {"bundle", "nearline"}
    # artifacts flow task to task (never through paths): the gate reads both evaluations, bundle the gated model
    assert {a["taskOutputArtifact"]["producerTask"] for a in root["gate"]["inputs"]["artifacts"].values()} \
        == {"evaluate", "sft", "dpo"}
    candidate = guarded["bundle"]["inputs"]["artifacts"]["candidate"]["componentInputArtifact"]
    assert candidate.startswith("pipelinechannel--gate")
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"source", "path", "users", "preset", "config", "sid_levels", "sid_codes", "device", "deploy_root",
            "feature_repo"} <= set(parameters)
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"leadre:cpu"}
    assert not any("accelerator" in e["container"].get("resources", {}) for e in executors.values())
    assert all(e["container"]["resources"]["resourceCpuRequest"] for e in executors.values())
    # steps that read or write outside state never reuse an earlier run's outputs
    assert root["evaluate"]["cachingOptions"] == {} and guarded["deploy"]["cachingOptions"] == {}
    assert root["sft"]["cachingOptions"] == {"enableCache": True}


def test_gpu_and_no_dpo_shapes(tmp_path: Path) -> None:
    spec = _compiled(tmp_path, Shape(dpo=False, gpu=True, deploy_pvc="leadre-models"))
    assert "dpo" not in spec["root"]["dag"]["tasks"]
    executors = spec["deploymentSpec"]["executors"]
    gpu = {name.removeprefix("exec-") for name, e in executors.items() if "accelerator" in e["container"]["resources"]}
    assert gpu == set(GPU_STEPS) - {"dpo"}
    for name in gpu:
        container = executors[f"exec-{name}"]["container"]
        assert container["image"] == "leadre:gpu"
        assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    mounts = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(mounts) == {"exec-evaluate", "exec-deploy"}
    assert all(m["pvcMount"][0]["mountPath"] == "/mnt/leadre" for m in mounts.values())


class FakeKfpClient:
    """Records what the CLI asks of a KFP server, and checks the package it sends compiles to our pipeline."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, host: str, namespace: str):
        self.calls.append(("connect", {"host": host, "namespace": namespace}))

    def _package(self, path: str) -> dict[str, Any]:
        spec = next(yaml.safe_load_all(Path(path).read_text()))
        return {"pipeline": spec["pipelineInfo"]["name"]}

    def create_run_from_pipeline_package(self, pipeline_file: str, **kwargs: Any) -> Any:
        self.calls.append(("run", kwargs | self._package(pipeline_file)))
        return type("Run", (), {"run_id": "run-1"})()

    def create_experiment(self, name: str) -> Any:
        self.calls.append(("experiment", {"name": name}))
        return type("Experiment", (), {"experiment_id": "exp-1"})()

    def create_recurring_run(self, **kwargs: Any) -> Any:
        self.calls.append(("recurring", kwargs | self._package(kwargs["pipeline_package_path"])))
        return type("RecurringRun", (), {"recurring_run_id": "job-1"})()


def test_submit_and_schedule_send_the_compiled_pipeline_to_kfp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    import kfp

    monkeypatch.setattr(kfp, "Client", FakeKfpClient)
    FakeKfpClient.calls = []
    config = tmp_path / "config.yaml"
    config.write_text(TINY_PIPELINE_CONFIG)
    common = ["--host", "http://kfp.example:8888", "--users", "500", "--no-dpo", "--config", str(config),
              "--deploy-pvc", "leadre-models"]
    assert main(["pipeline", "submit", *common, "--run-name", "nightly"]) == 0
    assert main(["pipeline", "schedule", *common, "--cron", "0 0 3 * * *"]) == 0
    (_, connect), (_, run), (_, connect2), (_, experiment), (_, recurring) = FakeKfpClient.calls
    assert connect == connect2 == {"host": "http://kfp.example:8888", "namespace": "kubeflow"}
    assert run["pipeline"] == recurring["pipeline"] == "leadre-daily-no-dpo"
    assert run["run_name"] == "nightly" and run["experiment_name"] == "leadre"
    for arguments in (run["arguments"], recurring["params"]):
        assert arguments["users"] == 500 and arguments["config"] == TINY_PIPELINE_CONFIG
        assert arguments["inference_services"] == "recall,nearline" and arguments["namespace"] == "leadre"
        assert arguments["deploy_root"] == "/mnt/leadre"  # where the PVC is mounted into evaluate and deploy
    assert experiment == {"name": "leadre"}
    assert recurring["experiment_id"] == "exp-1" and recurring["cron_expression"] == "0 0 3 * * *"
    assert recurring["max_concurrency"] == 1 and recurring["no_catchup"] is True
    assert "run-1" in capsys.readouterr().out
    # KFP's cron has six fields; a five-field one is refused before anything is sent
    FakeKfpClient.calls = []
    assert main(["pipeline", "schedule", *common, "--cron", "0 3 * * *"]) == 2
    assert "six fields" in capsys.readouterr().err
    # without a deploy root the gate could not see the deployed model: refused before anything is sent
    assert main(["pipeline", "submit", *common[:-2]]) == 2
    assert "needs --deploy-pvc" in capsys.readouterr().err
    assert [name for name, _ in FakeKfpClient.calls] == ["connect"]


class FakeCustomObjects:
    """The two calls `patch_inference_services` makes of kubernetes.client.CustomObjectsApi."""

    def __init__(self, isvc: dict[str, Any]):
        self.isvc, self.patches = isvc, []

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str):
        assert (group, version, plural) == ("serving.kserve.io", "v1beta1", "inferenceservices")
        return json.loads(json.dumps(self.isvc))

    def patch_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str, body):
        self.patches.append((namespace, name, body))


def test_deploy_patches_inference_services_to_the_new_bundle() -> None:
    isvc = {"spec": {"predictor": {"containers": [{"name": "kserve-container", "image": "leadre:cpu",
                                                   "env": [{"name": "STORAGE_URI", "value": "pvc://m/bundles/old"},
                                                           {"name": "LEADRE_BUNDLE", "value": "/mnt/models"}]}]}}}
    api = FakeCustomObjects(isvc)
    assert pipeline.patch_inference_services(api, ["recall", "nearline"], "leadre", "pvc://m/bundles/sft-1",
                                             "sft-1") == ["recall", "nearline"]
    for (namespace, name, body), expected in zip(api.patches, ("recall", "nearline")):
        assert (namespace, name) == ("leadre", expected)
        assert body["metadata"]["annotations"] == {pipeline.VERSION_ANNOTATION: "sft-1"}
        [container] = body["spec"]["predictor"]["containers"]
        assert container["env"] == [{"name": "LEADRE_BUNDLE", "value": "/mnt/models"},
                                    {"name": "STORAGE_URI", "value": "pvc://m/bundles/sft-1"}]
    with pytest.raises(ValueError, match="no predictor container"):
        pipeline.patch_inference_services(FakeCustomObjects({"spec": {"predictor": {"model": {}}}}), ["recall"],
                                          "leadre", "s3://x", "v")


def test_ingest_copies_a_data_directory_and_names_a_bad_source(tiny_data_dir: Path, tmp_path: Path) -> None:
    from leadre.schema import read_data_dir, split_settings_of

    counts = pipeline.ingest("dir", str(tiny_data_dir), 0, 0, str(tmp_path / "data"), str(tmp_path / "report.md"))
    assert counts == {name: len(df) for name, df in read_data_dir(tmp_path / "data").items()}
    assert split_settings_of(tmp_path / "data") == split_settings_of(tiny_data_dir)  # the split travels with it
    with pytest.raises(ValueError, match="unknown source 'warehouse'"):
        pipeline.ingest("warehouse", "", 0, 0, str(tmp_path / "other"), str(tmp_path / "other.md"))
    assert not (tmp_path / "other").exists()


def _hidden_leftovers(root: Path) -> list[Path]:
    """Temporary siblings `write_artifact` and the trainers use, which a finished or failed step must not leave."""
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".work")]


def _run_dirs(out: Path) -> set[Path]:
    return set((out / "kfp").iterdir()) if (out / "kfp").is_dir() else set()


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three local runs under one folder (with KFP's caching, as on a cluster): one whose S-ID step fails, the
    rerun that succeeds and deploys, and a third whose candidate is the deployed model itself."""
    out = tmp_path_factory.mktemp("pipeline")
    repo = out / "feature_repo"
    repo.mkdir()
    for file in ("definitions.py", "feature_store.yaml"):
        shutil.copy(REPO / "feature_repo" / file, repo / file)
    config = out / "config.yaml"
    config.write_text(TINY_PIPELINE_CONFIG)
    run = ["pipeline", "run", "--local", "--out", str(out), "--cache", "--users", str(USERS), "--config", str(config),
           "--feature-repo", str(repo)]
    runs: dict[str, Any] = {"out": out, "repo": repo}

    before = _run_dirs(out)
    runs["failed_status"] = main(run + ["--levels", "99"])
    [runs["failed"]] = _run_dirs(out) - before
    runs["failed_leftovers"] = _hidden_leftovers(out / "kfp")
    runs["failed_log"] = (out / "pipeline.log").read_text()

    before = _run_dirs(out)
    runs["rerun_status"] = main(run)
    [runs["rerun"]] = _run_dirs(out) - before
    runs["current"] = (out / "deploy" / "current").resolve()

    before = _run_dirs(out)
    runs["same_status"] = main(run)
    [runs["same"]] = _run_dirs(out) - before
    return runs


def test_a_failing_step_leaves_no_partial_artifact_and_a_rerun_succeeds(local_runs: dict[str, Any]) -> None:
    assert local_runs["failed_status"] == 1
    failed = local_runs["failed"]
    assert (failed / "ingest" / "data" / "manifest.json").is_file()
    assert not (failed / "semantic-ids" / "sids").exists()
    assert local_runs["failed_leftovers"] == []
    assert not any((failed / step).exists() for step in STEPS[2:])
    assert "levels must be between 1 and" in local_runs["failed_log"]  # the step's own error, in the run's log
    assert local_runs["rerun_status"] == 0


def test_a_local_run_writes_every_artifact(local_runs: dict[str, Any]) -> None:
    from leadre.artifacts import read_manifest
    from leadre.bundle import read_bundle_manifest
    from leadre.features import open_store, recall_lists

    run = local_runs["rerun"]
    expected = {"semantic-ids": ("sids", "sids build"), "prompts": ("prompts", "prompts build"),
                "sft": ("model", "train sft"), "dpo": ("model", "train dpo"), "gate": ("candidate", "gate"),
                "compile-model": ("compiled", "compile"), "bundle": ("bundle", "bundle"),
                "nearline": ("recall_lists", "nearline")}
    for task, (output, step) in expected.items():
        assert read_manifest(run / task / output, step)
        report = run / task / ("decision" if task == "gate" else "report")
        assert report.read_text().startswith("# "), task
    assert list((run / "sft" / "model").glob("*.safetensors")) and list((run / "dpo" / "model").glob("*.safetensors"))
    # ingest was reused from the failed run (its inputs did not change): its output is there, not here
    assert not (run / "ingest").exists()
    assert read_manifest(local_runs["failed"] / "ingest" / "data")["counts"]["users"] == USERS

    evaluation = json.loads((run / "evaluate" / "evaluation" / "metrics.json").read_text())
    assert {"dpo", "sft", "popularity", "cooccurrence"} <= set(evaluation["results"])
    assert read_manifest(run / "evaluate" / "deployed_evaluation")[pipeline.NOTHING_DEPLOYED] is True
    assert "recall@10" in (run / "evaluate" / "table").read_text()
    assert "data:image/png;base64," in (run / "evaluate" / "plot").read_text()
    decision = read_manifest(run / "gate" / "candidate")["decision"]
    assert decision["decision"] == "promote" and decision["current"] is None  # the first deployment
    assert (run / "deploy" / "report").read_text().startswith("# Deploy")

    bundle = read_bundle_manifest(run / "bundle" / "bundle")  # verifies every file's SHA-256
    compiled = read_manifest(run / "compile-model" / "compiled", "compile")
    assert bundle["compiled"] and bundle["model_version"] == compiled["model_version"]
    lists = pd.read_parquet(run / "nearline" / "recall_lists" / "recall_lists.parquet")
    assert len(lists) == USERS and (lists["model_version"] == bundle["model_version"]).all()
    ads = pd.read_parquet(run / "bundle" / "bundle" / "ads.parquet").set_index("ad_id")["active"]
    assert all(ads[list(row)].all() and len(row) == 10 for row in lists["ad_ids"])  # active ads only
    stored = recall_lists(open_store(local_runs["repo"]), list(lists["user_id"][:5]))
    assert {u: v["ad_ids"] for u, v in stored.items()} == dict(zip(lists["user_id"][:5], map(list, lists["ad_ids"][:5])))

    current = local_runs["current"]
    assert current == (local_runs["out"] / "deploy" / "bundles" / bundle["model_version"]).resolve()
    assert read_bundle_manifest(current)["model_version"] == bundle["model_version"]
    assert _hidden_leftovers(run) == [] and _hidden_leftovers(local_runs["out"] / "deploy") == []


def test_the_gate_stops_a_candidate_that_does_not_beat_the_deployed_model(local_runs: dict[str, Any]) -> None:
    from leadre.artifacts import read_manifest

    assert local_runs["same_status"] == 0  # not promoting is a successful run
    run = local_runs["same"]
    deployed = json.loads((run / "evaluate" / "deployed_evaluation" / "metrics.json").read_text())
    assert set(deployed["results"]) == {"deployed"}
    decision = read_manifest(run / "gate" / "candidate")["decision"]
    assert decision["decision"] == "keep current" and decision["current"]["model"] == "deployed"
    assert not any((run / step).exists() for step in GUARDED)
    # the training steps' inputs did not change: KFP's cache reused their outputs, the deployed model's never
    assert not any((run / step).exists() for step in ("ingest", "semantic-ids", "prompts", "sft", "dpo"))
    assert (local_runs["out"] / "deploy" / "current").resolve() == local_runs["current"]
