"""The Kubernetes manifests (manifests/): every overlay renders with kustomize, validates against the Kubernetes
and KServe schemas, keeps every container locked down, and runs only what the image and `leadre` really provide.

No API server runs here, so the checks are on the rendered YAML. `predictor_run_spec` is also what the opt-in
image test uses to start the predictor container exactly as the rendered manifest declares it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("local", "gpu")
KSERVE_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kserve"
# The oldest Kubernetes the manifests target (CronJob podFailurePolicy is GA from 1.31).
KUBERNETES_VERSION = "1.31"
IMAGE_ROOT = Path("/app")  # the repository's place inside the image (images/Dockerfile: WORKDIR /app)
UID = 1000  # user `leadre` of the image
ISVC = "InferenceService"
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ---- rendering and walking the manifests (importable helpers) ---------------------------------------------------

def render(overlay: str | Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay name (manifests/overlays/NAME) or folder, as a list of resources."""
    path = Path(overlay) if isinstance(overlay, Path) else MANIFESTS / "overlays" / overlay
    return [doc for doc in yaml.safe_load_all(_kustomize(path)) if doc]


@functools.cache
def _kustomize(path: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: install it (Debian: apt-get install kubernetes-client) to check manifests/")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return done.stdout


def pod_specs(resources: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload; an InferenceService predictor is a pod spec plus KServe fields."""
    for r in resources:
        kind, spec = r["kind"], r.get("spec", {})
        if kind in ("Deployment", "Job"):
            pod = spec["template"]["spec"]
        elif kind == "StatefulSet":  # its claim templates are volumes of the pod, one claim per replica
            pod = spec["template"]["spec"] | {"volumes": spec["template"]["spec"].get("volumes", []) + [
                {"name": t["metadata"]["name"], "persistentVolumeClaim": {}} for t in spec.get("volumeClaimTemplates", [])]}
        elif kind == "CronJob":
            pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        elif kind == ISVC:
            pod = spec["predictor"]
        else:
            continue
        yield f"{kind}/{r['metadata']['name']}", pod


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container_env(resources: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps, then `env` on top. A value from a
    Secret is None: it exists only on the cluster (and an optional one may not, leaving the ConfigMap's value)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: envFrom only from ConfigMaps, got {source}"
        env.update(find(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = find(resources, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif var["valueFrom"].get("secretKeyRef", {}).get("optional"):
            env.setdefault(var["name"], None)
        else:
            env[var["name"]] = None
    return env


def expand(text: str, env: dict[str, str | None]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; a reference to an unset variable stays as
    written (as the kubelet leaves it), which the checks below treat as an error."""
    return _VAR.sub(lambda m: env[m[1]] if env.get(m[1]) is not None else m[0], text)


def predictor_run_spec(overlay: str, service: str) -> dict[str, Any]:
    """How the rendered overlay runs InferenceService `service` ("recall" or "nearline"), for `docker run`:
    image, args (after the image's ENTRYPOINT, $(VAR) expanded), env (ConfigMap values; Secret-only ones left
    out), user, read_only (root file system), writable (paths that get an emptyDir or a volume), port, and the
    readiness and liveness probe paths. The bundle belongs at `bundle_mount` (KServe's model mount)."""
    resources = render(overlay)
    pod = find(resources, ISVC, service)["spec"]["predictor"]
    (container,) = pod["containers"]
    env = container_env(resources, container)
    security = effective_security(pod, container)
    return {
        "image": container["image"],
        "args": [expand(a, env) for a in container.get("args", [])],
        "env": {k: v for k, v in env.items() if v is not None},
        "user": security["runAsUser"],
        "read_only": security["readOnlyRootFilesystem"],
        "writable": sorted(m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")),
        "port": container["ports"][0]["containerPort"],
        "readiness_path": container["readinessProbe"]["httpGet"]["path"],
        "liveness_path": container["livenessProbe"]["httpGet"]["path"],
        "bundle_mount": env["LEADRE_BUNDLE"],
    }


def effective_security(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """Pod-level securityContext fields that containers inherit, overridden by the container's own."""
    pod_level = {k: v for k, v in pod.get("securityContext", {}).items()
                 if k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")}
    return pod_level | container.get("securityContext", {})


# ---- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def leadre_containers(resources: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for where, pod in pod_specs(resources):
        for c in containers(pod):
            if c["image"].split(":")[0].rsplit("/", 1)[-1] == "leadre":
                yield f"{where}/{c['name']}", pod, c


# ---- the rendered overlays --------------------------------------------------------------------------------------

def test_overlays_render_the_whole_deployment(overlay):
    name, resources = overlay
    kinds = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for expected in [("Namespace", "leadre"), (ISVC, "recall"), (ISVC, "nearline"), ("Deployment", "feast"),
                     ("Service", "feast"), ("StatefulSet", "redis"), ("Service", "redis"),
                     ("ConfigMap", "leadre-config"), ("CronJob", "nearline-refresh"), ("CronJob", "drift-report"),
                     ("PersistentVolumeClaim", "leadre-bundles"), ("PersistentVolumeClaim", "leadre-feast-registry"),
                     ("NetworkPolicy", "default-deny")]:
        assert expected in kinds, f"{name}: {expected} missing"
    for r in resources:
        if r["kind"] != "Namespace":
            assert r["metadata"].get("namespace") == "leadre", f"{name}: {r['kind']}/{r['metadata']['name']}"


def test_core_kinds_validate_strictly(overlay):
    import kubernetes_validate  # the `test` extra: it ships the Kubernetes schemas, so this runs offline
    name, resources = overlay
    for r in resources:
        if r["kind"] == ISVC:
            continue
        try:
            kubernetes_validate.validate(r, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {r['kind']}/{r['metadata']['name']} at {'.'.join(map(str, e.path))}: {e.message}")


@functools.cache
def kserve_schema() -> dict[str, Any]:
    """The v1beta1 InferenceService openAPIV3Schema, made strict: an object whose fields the schema lists takes no
    others (the API server's strict field validation), except where the CRD preserves unknown fields."""
    crd_file = KSERVE_SCHEMAS / "serving.kserve.io_inferenceservices.yaml"
    if not crd_file.is_file():
        pytest.skip(f"{crd_file} not found: the KServe CRD schemas live in ../shared/schemas/kserve")
    crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema["properties"]["spec"])
    return schema


def test_inferenceservices_match_the_kserve_crd(overlay):
    import jsonschema

    name, resources = overlay
    validator = jsonschema.Draft7Validator(kserve_schema())
    isvcs = [r for r in resources if r["kind"] == ISVC]
    assert {r["metadata"]["name"] for r in isvcs} == {"recall", "nearline"}
    for r in isvcs:
        assert r["apiVersion"] == "serving.kserve.io/v1beta1"
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(r)]
        assert not errors, f"{name}: InferenceService/{r['metadata']['name']}:\n" + "\n".join(errors)


def test_the_strict_kserve_schema_rejects_unknown_fields():
    """The check above can fail: a misspelt field is an error, as on a real API server."""
    import jsonschema

    isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": ISVC, "metadata": {"name": "x"},
            "spec": {"predictor": {"minReplica": 1, "containers": [{"name": "c", "image": "i"}]}}}
    assert [e.message for e in jsonschema.Draft7Validator(kserve_schema()).iter_errors(isvc)], "minReplica accepted"


# ---- security ---------------------------------------------------------------------------------------------------

def test_every_container_is_locked_down(overlay):
    name, resources = overlay
    pods = list(pod_specs(resources))
    for where, pod in pods:
        assert_locked_down(f"{name}: {where}", pod)
    assert sum(len(list(containers(pod))) for _, pod in pods) >= 7, f"{name}: containers missing"


def test_tools_are_valid_and_locked_down():
    import kubernetes_validate

    for path in sorted((MANIFESTS / "tools").glob("*.yaml")):
        for r in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(r, KUBERNETES_VERSION, strict=True)
            assert r["metadata"]["namespace"] == "leadre", path
            assert_locked_down(f"{path.name}: {r['kind']}/{r['metadata']['name']}", r["spec"])


def assert_locked_down(where: str, pod: dict[str, Any]) -> None:
    """Restricted pod security for every container, no API token, and writable scratch space only at /tmp."""
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
    assert pod.get("automountServiceAccountToken") is False, f"{where}: mounts an API token it does not use"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert not any("hostPath" in v for v in volumes.values()), f"{where}: hostPath volume"
    for c in containers(pod):
        at = f"{where}/{c['name']}"
        s = effective_security(pod, c)
        assert s.get("runAsNonRoot") is True, f"{at}: runAsNonRoot"
        assert s.get("runAsUser") == UID, f"{at}: runAsUser {s.get('runAsUser')}"
        assert s.get("readOnlyRootFilesystem") is True, f"{at}: readOnlyRootFilesystem"
        assert s.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation"
        assert not s.get("privileged"), f"{at}: privileged"
        assert s.get("capabilities", {}).get("drop") == ["ALL"], f"{at}: capabilities not all dropped"
        assert not s.get("capabilities", {}).get("add"), f"{at}: adds capabilities"
        assert s.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{at}: seccompProfile"
        assert c.get("resources", {}).get("limits"), f"{at}: no resource limits"
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{at}: no writable /tmp"
        for path, m in mounts.items():
            volume = volumes[m["name"]]
            assert "emptyDir" not in volume or path == "/tmp", f"{at}: emptyDir at {path} (only /tmp is scratch)"
            if "configMap" in volume or "secret" in volume:
                assert m.get("readOnly"), f"{at}: {path} should be mounted read-only"


def test_no_secret_values_only_references(overlay):
    name, resources = overlay
    assert not [r for r in resources if r["kind"] == "Secret"], f"{name}: a Secret in the repository"
    sensitive = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|_KEY$", re.I)
    for r in resources:
        if r["kind"] == "ConfigMap":
            for key, value in r["data"].items():
                assert not sensitive.search(key) and "password=" not in value.lower(), f"{name}: ConfigMap {key}"
    for where, pod in pod_specs(resources):
        for c in containers(pod):
            for var in c.get("env", []):
                if sensitive.search(var["name"]) or var["name"] == "REDIS_CONNECTION_STRING":
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{name}: {where}: {var['name']} by value"


def test_rbac_is_least_privilege(overlay):
    name, resources = overlay
    assert not [r for r in resources if r["kind"] in ("ClusterRole", "ClusterRoleBinding")], f"{name}: cluster-wide"
    roles = [r for r in resources if r["kind"] == "Role"]
    assert [r["metadata"]["name"] for r in roles] == ["leadre-deploy"]
    for rule in roles[0]["rules"]:
        assert rule["apiGroups"] == ["serving.kserve.io"] and rule["resources"] == ["inferenceservices"], rule
        assert sorted(rule["resourceNames"]) == ["nearline", "recall"], rule
        assert set(rule["verbs"]) <= {"get", "patch"}, rule
    accounts = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ServiceAccount"}
    for account, r in accounts.items():
        if account != "leadre-deploy":
            assert r.get("automountServiceAccountToken") is False, f"{name}: {account} gets an unused API token"
    used = {pod.get("serviceAccountName") for _, pod in pod_specs(resources)}
    assert None not in used and used <= set(accounts), f"{name}: pods without their own service account: {used}"
    assert "leadre-deploy" not in used, "the deploy identity belongs to the pipeline's deploy step only"


def test_network_policies_deny_by_default_and_let_redis_clients_through(overlay):
    name, resources = overlay
    policies = {r["metadata"]["name"]: r["spec"] for r in resources if r["kind"] == "NetworkPolicy"}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    client = policies["redis-client-egress"]["podSelector"]["matchLabels"]
    for where, pod in pod_specs(resources):
        for c in containers(pod):
            uses_redis = "feast" in (c.get("command") or []) or "--production" in c.get("args", [])
            if uses_redis:
                labels = pod_labels(resources, where)
                assert client.items() <= labels.items(), f"{name}: {where} uses Redis but egress is not allowed"


def pod_labels(resources: list[dict[str, Any]], where: str) -> dict[str, str]:
    kind, name = where.split("/")
    r = find(resources, kind, name)
    if kind == ISVC:
        return r["spec"]["predictor"].get("labels", {})
    if kind == "CronJob":
        return r["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return r["spec"]["template"]["metadata"]["labels"]


# ---- agreement with the code and the image ---------------------------------------------------------------------

def image_path(path: str | Path) -> Path:
    """A path inside the image that comes from the repository (/app/...), as a path in this checkout."""
    return ROOT / Path(path).relative_to(IMAGE_ROOT)


def test_container_commands_are_real(overlay):
    """Each container of the project image runs `leadre` (the image's ENTRYPOINT) with arguments its parser
    accepts and every $(VAR) defined, `feast` with options the Feast CLI accepts, or copies a folder the image
    has; the paths each command reads and writes are mounted as it needs them."""
    from leadre.cli import build_parser

    name, resources = overlay
    seen = set()
    for where, pod, c in leadre_containers(resources):
        where = f"{name}: {where}"
        env = container_env(resources, c)
        args = [expand(a, env) for a in (c.get("command") or []) + c.get("args", [])]
        unset = [a for a in args if _VAR.search(a)]
        assert not unset, f"{where}: $(VAR) without a value: {unset}"
        if c.get("command"):
            program, *args = args
            assert program in ("feast", "cp"), f"{where}: overrides the image's ENTRYPOINT [leadre] with {program}"
            if program == "feast":
                check_feast_args(args, where)
            else:
                assert args[0] == "-R" and image_path(args[1]).is_dir(), f"{where}: cp {args}"
                assert_writable(pod, c, args[2], where)
            seen.add(program)
            continue
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: `leadre {shlex.join(args)}` is not a valid command line (see above)")
        seen.add(" ".join(args[:2]) if parsed.command in ("serve", "monitor") else parsed.command)
        if parsed.command == "serve":
            check_serve(resources, c, parsed, env, where)
        if getattr(parsed, "feature_repo", None) is not None:
            check_feature_repo(pod, str(parsed.feature_repo), env, where)
        for option in ("config",):
            if getattr(parsed, option, None) is not None:
                assert_from_config_map(pod, c, str(getattr(parsed, option)), where)
        for option in ("log_dir", "out", "drift_reports"):
            if getattr(parsed, option, None) is not None:
                assert_writable(pod, c, str(getattr(parsed, option)), where)
        for option in ("bundle", "data", "reference", "logs"):  # a predictor's bundle is KServe's mount (above)
            if getattr(parsed, option, None) is not None and parsed.command != "serve":
                assert mount_of(c, str(getattr(parsed, option))), f"{where}: --{option} is not on a volume"
    assert {"serve recall", "serve nearline", "feast", "nearline", "monitor report", "cp"} <= seen, seen


def check_serve(resources: list[dict[str, Any]], c: dict[str, Any], parsed: Any, env: dict[str, str | None],
                where: str) -> None:
    port = c["ports"][0]["containerPort"]
    assert parsed.port == port == 8080, f"{where}: --port {parsed.port}, containerPort {port}"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in (port, c["ports"][0].get("name")), f"{where}: {probe} port"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert parsed.production, f"{where}: a cluster predictor must use the Redis store (--production)"
    # KServe mounts STORAGE_URI at /mnt/models; the predictor must load exactly that
    assert parsed.bundle == env["LEADRE_BUNDLE"] == "/mnt/models", f"{where}: bundle {parsed.bundle}"
    storage = [v["value"] for v in c.get("env", []) if v["name"] == "STORAGE_URI"]
    assert storage and storage[0].startswith("pvc://"), f"{where}: STORAGE_URI {storage}"
    claims = {r["metadata"]["name"] for r in resources if r["kind"] == "PersistentVolumeClaim"}
    assert storage[0].split("/")[2] in claims, f"{where}: {storage[0]} names no PersistentVolumeClaim"
    assert (parsed.service == "recall") == (parsed.nearline_url is not None), f"{where}: --nearline-url"


def check_feature_repo(pod: dict[str, Any], repo: str, env: dict[str, str | None], where: str) -> None:
    """The repository is the image's copy (or an init container's copy of it), its production Feast config exists
    and every ${VAR} that config reads is set."""
    copies = {c["command"][3]: c["command"][2] for c in pod.get("initContainers", []) if c.get("command", [""])[0] == "cp"}
    config = image_path(copies.get(repo, repo)) / "feature_store.production.yaml"
    assert config.is_file(), f"{where}: {config} does not exist"
    needed = set(re.findall(r"\$\{(\w+)\}", json.dumps(yaml.safe_load(config.read_text()))))  # values, not comments
    assert needed and needed <= set(env), f"{where}: {config.name} needs {sorted(needed - set(env))}"


def check_feast_args(args: list[str], where: str) -> None:
    import click
    from feast.cli.cli import cli

    split = args.index("serve")
    try:
        ctx = cli.make_context("feast", args[:split])
        cli.get_command(ctx, "serve").make_context("serve", args[split + 1:], parent=ctx)
    except click.ClickException as e:
        pytest.fail(f"{where}: `feast {shlex.join(args)}`: {e.format_message()}")
    fs_yaml = ctx.params["feature_store_yaml"]
    assert fs_yaml and image_path(fs_yaml).is_file(), f"{where}: {fs_yaml} is not in the repository"
    assert Path(fs_yaml).parent == Path(ctx.params["chdir"]), f"{where}: config outside the feature repo"


def mount_of(c: dict[str, Any], path: str) -> dict[str, Any] | None:
    matches = [m for m in c.get("volumeMounts", []) if Path(path).is_relative_to(m["mountPath"])]
    return max(matches, key=lambda m: len(m["mountPath"]), default=None)


def volume_of(pod: dict[str, Any], c: dict[str, Any], path: str, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    m = mount_of(c, path)
    assert m is not None, f"{where}: {path} is on the container's read-only root file system"
    return m, next(v for v in pod["volumes"] if v["name"] == m["name"])


def assert_writable(pod: dict[str, Any], c: dict[str, Any], path: str, where: str) -> None:
    m, volume = volume_of(pod, c, path, where)
    assert not m.get("readOnly") and not volume.get("persistentVolumeClaim", {}).get("readOnly"), \
        f"{where}: {path} is mounted read-only"


def assert_from_config_map(pod: dict[str, Any], c: dict[str, Any], path: str, where: str) -> None:
    m, volume = volume_of(pod, c, path, where)
    assert "configMap" in volume, f"{where}: {path} is not from a ConfigMap"


def model_config(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(find(resources, "ConfigMap", "leadre-model-config")["data"]["leadre.yaml"])


def test_model_config_sections_are_valid(overlay):
    """The mounted config's sections build the settings their commands read (unknown keys are errors there)."""
    from leadre.config import section
    from leadre.pipeline import NearlineSettings
    from leadre.serving import ServingSettings

    name, resources = overlay
    config = model_config(resources)
    assert set(config) == {"serving", "nearline"}, f"{name}: sections {sorted(config)}"
    assert section(config, "serving", ServingSettings, f"{name}: leadre-model-config").max_batch >= 1
    assert section(config, "nearline", NearlineSettings, f"{name}: leadre-model-config").batch_size >= 1


def test_the_drift_loop_is_closed(overlay):
    """The drift report reads the request logs the predictors write and writes where they read the drift share;
    its drift exit status (3) fails the Job without retries."""
    from leadre.monitor import EXIT_DRIFT

    name, resources = overlay
    cron = find(resources, "CronJob", "drift-report")
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    out, logs = Path(args[args.index("--out") + 1]), args[args.index("--logs") + 1]
    for service in ("recall", "nearline"):
        serve_args = find(resources, ISVC, service)["spec"]["predictor"]["containers"][0]["args"]
        assert serve_args[serve_args.index("--log-dir") + 1] == logs, f"{name}: {service} logs elsewhere"
        assert Path(serve_args[serve_args.index("--drift-reports") + 1]) in (out, out.parent), f"{name}: {service}"
    rules = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [EXIT_DRIFT]


def test_predictors_start_on_the_deployed_bundle():
    """Before the first deploy the predictors load `current` on the deploy volume, the folder the pipeline's deploy
    step switches (it then patches STORAGE_URI to pvc://<claim>/bundles/<version>)."""
    from leadre.pipeline import CURRENT

    resources = render("gpu")
    for service in ("recall", "nearline"):
        env = find(resources, ISVC, service)["spec"]["predictor"]["containers"][0]["env"]
        assert {"name": "STORAGE_URI", "value": f"pvc://leadre-bundles/{CURRENT}"} in env, service
    refresh = find(resources, "CronJob", "nearline-refresh")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    args = refresh["containers"][0]["args"]
    assert Path(args[args.index("--bundle") + 1]).name == CURRENT


@pytest.mark.parametrize("dockerfile, tag", [("Dockerfile", "leadre:cpu"), ("Dockerfile.gpu", "leadre:gpu")])
def test_dockerfile_agrees_with_the_manifests(dockerfile, tag):
    """The image runs `leadre` as uid 1000 from /app, with the feature repository where the manifests look for it,
    and the manifests use it under the tag images/build.sh gives it."""
    path = ROOT / "images" / dockerfile
    if not path.is_file():
        pytest.skip(f"{path} not written yet")
    text = path.read_text()
    final = text[text.rfind("\nFROM "):]  # the last stage is the image that runs
    directives: dict[str, list[str]] = {}
    for line in final.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word.isupper() and rest:
            directives.setdefault(word, []).append(rest.strip())
    assert json.loads(directives["ENTRYPOINT"][-1]) == ["leadre"], directives["ENTRYPOINT"]
    user = directives["USER"][-1].split(":")[0]
    assert user == str(UID) or (user == "leadre" and re.search(rf"--uid\s+{UID}\b", text)), f"USER {user}"
    assert directives["WORKDIR"][-1] == str(IMAGE_ROOT)
    assert "8080" in " ".join(directives.get("EXPOSE", [])).replace("/tcp", "").split()
    assert re.search(rf"^COPY\s+feature_repo\s+{IMAGE_ROOT}/feature_repo/?$", text, re.M), "no /app/feature_repo"
    assert f"images/{dockerfile} -> {tag}" in (ROOT / "images" / "build.sh").read_text(), f"build.sh: {tag}"
    images = {c["image"] for overlay in OVERLAYS for _, _, c in leadre_containers(render(overlay))}
    assert tag in images and images <= {"leadre:cpu", "leadre:gpu"}, f"{tag}: {images}"


# ---- what each overlay changes ----------------------------------------------------------------------------------

def test_local_overlay_is_small_cpu_and_single_replica():
    resources = render("local")
    for where, pod, c in leadre_containers(resources):
        assert c["image"] == "leadre:cpu", f"{where}: {c['image']}"
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), where
    for service in ("recall", "nearline"):
        predictor = find(resources, ISVC, service)["spec"]["predictor"]
        assert predictor["minReplicas"] == predictor["maxReplicas"] == 1, service
    assert find(resources, "Deployment", "feast")["spec"]["replicas"] == 1
    assert find(resources, "StatefulSet", "redis")["spec"]["replicas"] == 1


def test_gpu_overlay_runs_the_nearline_llm_on_cuda():
    resources = render("gpu")
    nearline = find(resources, ISVC, "nearline")["spec"]["predictor"]
    (c,) = nearline["containers"]
    assert c["image"] == "leadre:gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = [expand(a, container_env(resources, c)) for a in c["args"]]
    assert args[args.index("--device") + 1] == "cuda", args
    gpu, cpu = model_config(resources), model_config(render("local"))
    assert gpu["serving"]["max_batch"] > cpu["serving"]["max_batch"]
    assert gpu["nearline"]["batch_size"] > cpu["nearline"]["batch_size"]
    recall = find(resources, ISVC, "recall")["spec"]["predictor"]["containers"][0]
    assert "nvidia.com/gpu" not in recall["resources"]["limits"], "recall is a lookup service: no GPU"


def test_isvc_rollout_and_scaling_settings():
    for service in ("recall", "nearline"):
        r = find(render("gpu"), ISVC, service)
        predictor = r["spec"]["predictor"]
        assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"], service
        assert 0 < predictor["canaryTrafficPercent"] <= 100, service
        annotations = r["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        assert annotations["prometheus.io/port"] == str(predictor["containers"][0]["ports"][0]["containerPort"])


def test_external_redis_component(tmp_path):
    """The component swaps the in-cluster Redis for one named by the Secret leadre-redis."""
    relative = Path(*[".."] * len(tmp_path.parts[1:])) / MANIFESTS.relative_to("/")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(relative / "overlays" / "gpu")],
        "components": [str(relative / "components" / "external-redis")]}))
    resources = render(tmp_path)
    assert not [r for r in resources if r["metadata"]["name"] in ("redis", "redis-ingress", "leadre-redis")]
    egress = find(resources, "NetworkPolicy", "redis-client-egress")["spec"]["egress"]
    assert egress[0]["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"
    for where, pod, c in leadre_containers(resources):
        if "--production" in c.get("args", []) or c.get("command") == ["feast"]:
            refs = [v for v in c["env"] if v["name"] == "REDIS_CONNECTION_STRING"]
            assert refs and refs[0]["valueFrom"]["secretKeyRef"]["name"] == "leadre-redis", where


def test_nearline_refresh_command_fills_the_feature_store(tiny_bundle_dir, tiny_data_dir, tmp_path):
    """`leadre nearline`, what the near-line refresh CronJob runs, on a copy of the feature repository (local
    stores here, Redis on the cluster): every user's recall list is written and readable from the online store."""
    import pandas as pd

    from leadre import features
    from leadre.cli import main

    repo = shutil.copytree(ROOT / "feature_repo", tmp_path / "feature_repo",
                           ignore=shutil.ignore_patterns("data", "__pycache__"))
    config = tmp_path / "leadre.yaml"
    config.write_text(yaml.safe_dump({"nearline": {"top_n": 5, "users": 12}}))
    out = tmp_path / "nearline"
    assert main(["nearline", "--bundle", str(tiny_bundle_dir), "--data", str(tiny_data_dir), "--feature-repo",
                 str(repo), "--config", str(config), "--device", "cpu", "--out", str(out)]) == 0
    lists = pd.read_parquet(out / "recall_lists.parquet")
    assert len(lists) == 12 and all(len(ads) == 5 for ads in lists["ad_ids"])
    stored = features.recall_lists(features.open_store(repo), list(lists["user_id"]))
    assert {u: list(v["ad_ids"]) for u, v in stored.items()} == dict(zip(lists["user_id"], map(list, lists["ad_ids"])))
