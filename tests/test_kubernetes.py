"""deploy/kubernetes agrees with the Kubernetes schemas and with the gateway it runs.

No cluster here: every manifest, and the ConfigMap and Secrets kustomize would generate, is
validated offline against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships
(strict: an unknown or misspelt field fails), then checked against the Settings object and a
real gateway: the probes and the metrics path answer, the proxy pods refuse /admin, and the
gateway serves with the read-only root filesystem the pods get.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.app import create_app
from gateway.database import Database
from gateway.operators import Operators
from gateway.settings import Settings, settings_from, variable_name
from loadtests.harness import child_env, free_port
from tests.conftest import SettingsFactory, run_sync
from tests.servers import run_app, stop_process
from tests.upstream import MockUpstream

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
# The oldest schema kubernetes-validate ships, and the newest: every API used is GA in both.
VERSIONS = ("1.25", kubernetes_validate.latest_version())
SETTINGS = {variable_name(field): field for field in Settings.model_fields}
Manifest = dict[str, Any]


def _kustomization() -> Manifest:
    data: Manifest = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    return data


def _env_file(name: str) -> dict[str, str]:
    """A kustomize env file as kustomize reads it; an uncommitted one (a secret) from its `.example`."""
    path = KUBERNETES / name
    if not path.exists():
        path = KUBERNETES / f"{name}.example"
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            assert key not in pairs, f"{path.name}: {key} twice"
            pairs[key] = value
    return pairs


def _generated() -> list[Manifest]:
    """The ConfigMaps and Secrets the kustomization generates (names without kustomize's hash)."""
    kustomization = _kustomization()
    objects: list[Manifest] = []
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in kustomization.get(key, []):
            data = {name: value for env in generator["envs"] for name, value in _env_file(env).items()}
            if kind == "Secret":
                data = {name: base64.b64encode(value.encode()).decode() for name, value in data.items()}
            metadata = {"name": generator["name"], "namespace": kustomization["namespace"]}
            objects.append({"apiVersion": "v1", "kind": kind, "metadata": metadata, "data": data})
    return objects


def _resources() -> list[Manifest]:
    return [
        document
        for name in _kustomization()["resources"]
        for document in yaml.safe_load_all((KUBERNETES / name).read_text())
        if document
    ]


def _all() -> list[Manifest]:
    return [*_resources(), *_generated()]


def _one(kind: str, name: str) -> Manifest:
    found = [item for item in _all() if item["kind"] == kind and item["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _deployments() -> list[Manifest]:
    return [item for item in _resources() if item["kind"] == "Deployment"]


def _container(deployment: Manifest) -> Manifest:
    containers: list[Manifest] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _environment(deployment: Manifest) -> dict[str, str]:
    """The environment the gateway container gets: envFrom sources in order, then `env`."""
    container = _container(deployment)
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        )
        data = _one(kind, ref["name"])["data"]
        if kind == "Secret":
            data = {key: base64.b64decode(value).decode() for key, value in data.items()}
        environment.update(data)
    for variable in container.get("env", []):
        environment[variable["name"]] = variable["value"]
    return environment


def _settings(deployment: Manifest, **overrides: Any) -> Settings:
    """The Settings that environment gives (an empty value is unset, as in the environment)."""
    values = {SETTINGS[name]: value for name, value in _environment(deployment).items() if value != ""}
    return settings_from(**{**values, **overrides})


def _pre_stop_seconds(deployment: Manifest) -> float:
    command = _container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


# --- schemas and wiring -------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for item in _all():
        kubernetes_validate.validate(item, version, strict=True)
        kinds.add(item["kind"])
    assert kinds >= {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ConfigMap",
        "Secret",
    }


def test_a_misspelt_field_fails_validation() -> None:
    deployment = _one("Deployment", "chat-gateway")
    _container(deployment)["livenesProbe"] = _container(deployment).pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_kustomization_lists_every_manifest_of_the_directory() -> None:
    listed = set(_kustomization()["resources"])
    present = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_the_image_is_the_one_the_deployments_name_at_the_projects_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (image,) = _kustomization()["images"]
    assert image["newTag"] == version
    for deployment in _deployments():
        assert _container(deployment)["image"] == image["name"]


def test_secrets_come_from_uncommitted_files_with_committed_examples() -> None:
    for generator in _kustomization()["secretGenerator"]:
        for env in generator["envs"]:
            assert (KUBERNETES / f"{env}.example").exists(), env
            ignored = subprocess.run(
                ["git", "check-ignore", "-q", str(KUBERNETES / env)], cwd=ROOT, check=False
            ).returncode
            assert ignored == 0, f"{env} holds secrets and must be git-ignored"


def test_every_variable_the_manifests_set_is_a_setting() -> None:
    for deployment in _deployments():
        unknown = set(_environment(deployment)) - set(SETTINGS)
        assert not unknown, f"{deployment['metadata']['name']} sets {unknown}, which the gateway does not read"


def test_no_secret_setting_sits_in_the_config_map() -> None:
    secret_settings = {
        name for name, field in SETTINGS.items() if "SecretStr" in str(Settings.model_fields[field].annotation)
    }
    assert {"DATABASE_URL", "OPENAI_API_KEY", "GATEWAY_ADMIN_TOKEN"} <= secret_settings
    for config_map in (item for item in _generated() if item["kind"] == "ConfigMap"):
        assert not secret_settings & set(config_map["data"]), config_map["metadata"]["name"]


def test_the_settings_each_deployment_gets_load_and_listen_where_the_pod_expects() -> None:
    for deployment in _deployments():
        settings = _settings(deployment)
        container = _container(deployment)
        assert settings.host == "0.0.0.0"
        assert [port["containerPort"] for port in container["ports"] if port["name"] == "http"] == [settings.port]
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(settings.port)
        assert settings.workers == 1
        assert settings.database_url is not None
        assert settings.open_relay_problem() is None
        # The guard holds in the pods: a key without client keys stops start-up.
        keyed = _settings(deployment, openai_api_key="sk-real", api_keys=frozenset())
        assert "GATEWAY_API_KEYS" in (keyed.open_relay_problem() or "")


def test_the_grace_period_outlasts_the_pause_and_the_shutdown_grace() -> None:
    for deployment in _deployments():
        grace = _settings(deployment).shutdown_grace
        pod = deployment["spec"]["template"]["spec"]
        # After SIGTERM: in-flight calls drain for the shutdown grace, then the lifespan closes the
        # pool and background tasks (up to 10 s); SIGKILL must not come before.
        assert pod["terminationGracePeriodSeconds"] >= _pre_stop_seconds(deployment) + grace + 10


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    namespace = _one("Namespace", _kustomization()["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    image_user = next(
        line.split()[1].split(":")[0]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("USER ")
    )
    for deployment in _deployments():
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == image_user
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert "memory" in container["resources"]["limits"]
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}


def test_services_budget_and_autoscaler_point_at_their_pods() -> None:
    deployments = {item["metadata"]["name"]: item for item in _deployments()}
    for service in (item for item in _resources() if item["kind"] == "Service"):
        targets = [
            name
            for name, deployment in deployments.items()
            if service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {targets}"
        port_names = {port["name"] for port in _container(deployments[targets[0]])["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    for deployment in deployments.values():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= (
            deployment["spec"]["template"]["metadata"]["labels"].items()
        )
    proxy = deployments["chat-gateway"]
    autoscaler = _one("HorizontalPodAutoscaler", "chat-gateway")
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "chat-gateway",
    }
    assert "replicas" not in proxy["spec"], "the autoscaler owns the replica count; an apply would reset it"
    budget = _one("PodDisruptionBudget", "chat-gateway")
    assert budget["spec"]["selector"]["matchLabels"] == proxy["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] < autoscaler["spec"]["minReplicas"]
    assert proxy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_only_the_admin_pods_hold_the_admin_token_and_only_operators_reach_them() -> None:
    proxy, admin = _one("Deployment", "chat-gateway"), _one("Deployment", "chat-gateway-admin")
    assert "GATEWAY_ADMIN_TOKEN" not in _environment(proxy)
    assert _settings(proxy).admin_token is None
    # Stored operators would open /admin without any token: the switch keeps it off.
    assert _settings(proxy).admin is False
    assert "GATEWAY_ADMIN_TOKEN" in _environment(admin)
    assert _settings(admin).admin is True
    policies = {item["metadata"]["name"]: item for item in _resources() if item["kind"] == "NetworkPolicy"}
    for deployment, policy_name, client_label in (
        (proxy, "chat-gateway", "chat-gateway/client"),
        (admin, "chat-gateway-admin", "chat-gateway/operator"),
    ):
        policy = policies[policy_name]["spec"]
        assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert policy["policyTypes"] == ["Ingress"]
        peers = [peer for rule in policy["ingress"] for peer in rule["from"]]
        labelled = [peer["podSelector"]["matchLabels"] for peer in peers if "podSelector" in peer]
        assert labelled == [{client_label: "true"}]
        assert all("ipBlock" not in peer for peer in peers)


# --- against a real gateway ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat-gateway", "chat-gateway-admin"])
def test_the_probes_and_the_metrics_path_answer_on_a_gateway_with_these_settings(
    name: str, database_url: str, settings_factory: SettingsFactory
) -> None:
    deployment = _one("Deployment", name)
    token = "admin-token" if name == "chat-gateway-admin" else None  # the admin pods' from their Secret
    overrides = {"database_url": database_url, "data_dir": settings_factory().data_dir}
    settings = _settings(deployment, **overrides, **({"admin_token": token} if token else {}))
    container = _container(deployment)
    paths = [container[probe]["httpGet"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")]
    assert {path["port"] for path in paths} == {"http"}
    paths.append({"path": deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]})
    # An operator stored in the database both Deployments share.
    operator = run_sync(_add_operator(settings))
    with run_app(create_app(settings)) as base:
        for probe in paths:
            assert httpx2.get(base + probe["path"]).status_code == 200, probe["path"]
        answers = [
            httpx2.get(f"{base}/admin/users/alice", headers={"Authorization": f"Bearer {bearer}"})
            for bearer in (token or "a guess", operator)
        ]
    # The proxy pods have no admin API at all, for the operators too; the admin pods answer both.
    codes = [answer.json()["error"]["code"] for answer in answers]
    assert codes == (["user_not_found"] * 2 if token else ["admin_disabled"] * 2)


async def _add_operator(settings: Settings) -> str:
    database = Database(settings)
    await database.open()
    try:
        _, token = await Operators(database, settings).add("dana", "viewer", by="test")
    finally:
        await database.close()
    return token


# --- a read-only root filesystem ----------------------------------------------------------------

# Inside a private mount namespace: every mount read-only but /proc, /sys and /dev (as in a pod),
# then a fresh /tmp when the case wants the pod's emptyDir. Exit 97: this machine cannot do it.
_READ_ONLY = r"""
awk '{print $2}' /proc/self/mounts | sort -r | while read -r point; do
  case "$point" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) ;; *) mount -o remount,bind,ro "$point" 2>/dev/null ;; esac
done
touch /.writable 2>/dev/null && exit 97
if [ "$EMPTY_DIR_TMP" = 1 ]; then mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp || exit 97; fi
touch /tmp/.writable 2>/dev/null && [ "$EMPTY_DIR_TMP" != 1 ] && exit 97
exec "$@"
"""


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


def _read_only_gateway(workers: int, empty_dir_tmp: bool, database_url: str, upstream_url: str, port: int) -> Any:
    """`python -m gateway` with the proxy pods' settings in a read-only mount namespace (stderr piped)."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to make a read-only mount namespace")
    if empty_dir_tmp and f"host={tempfile.gettempdir()}" in database_url:
        pytest.skip("the embedded test PostgreSQL's socket is in /tmp, which the emptyDir would hide")
    if empty_dir_tmp and Path(sys.executable).absolute().is_relative_to(tempfile.gettempdir()):
        pytest.skip("this checkout's Python is in /tmp, which the emptyDir would hide")
    settings = {name: value for name, value in _environment(_one("Deployment", "chat-gateway")).items() if value}
    environment = child_env(
        **{
            **settings,
            "DATABASE_URL": database_url,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_WORKERS": str(workers),
            "GATEWAY_UPSTREAM_URL": upstream_url,
            "GATEWAY_SHUTDOWN_GRACE": "5",
            "EMPTY_DIR_TMP": "1" if empty_dir_tmp else "0",
            "PYTHONDONTWRITEBYTECODE": "1",  # as the image sets it
        }
    )
    for name in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"):
        environment.pop(name, None)  # coverage's data file could not be written there
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _READ_ONLY, "sh"]
    return subprocess.Popen(
        [*command, sys.executable, "-m", "gateway"], env=environment, cwd="/", stderr=subprocess.PIPE, text=True
    )


@pytest.mark.faults
@pytest.mark.parametrize(
    ("workers", "empty_dir_tmp"), [(1, False), (2, True)], ids=["1-worker-nothing-writable", "2-workers-tmp"]
)
def test_the_gateway_serves_on_a_read_only_root_filesystem(
    workers: int, empty_dir_tmp: bool, database_url: str, upstream: MockUpstream
) -> None:
    port = free_port()
    process = _read_only_gateway(workers, empty_dir_tmp, database_url, upstream.url, port)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                if process.returncode == 97:
                    pytest.skip("this machine cannot make a read-only mount namespace")
                pytest.fail(f"the gateway exited with {process.returncode}: {process.communicate()[1][-2000:]}")
            try:
                if httpx2.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not get ready"
            time.sleep(0.1)
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
        clean = httpx2.post(f"{base}/v1/chat/completions", json=body, headers={"X-User-ID": "alice"}, timeout=10)
        assert clean.status_code == 200
        flagged = {"model": "m", "messages": [{"role": "user", "content": "something forbidden"}]}
        violation = httpx2.post(f"{base}/v1/chat/completions", json=flagged, headers={"X-User-ID": "bob"}, timeout=10)
        assert violation.json()["error"]["code"] == "content_policy_violation"
        assert httpx2.get(f"{base}/metrics").status_code == 200
    finally:
        stderr = stop_process(process)
    assert process.returncode == 0, stderr[-2000:]
    assert "Read-only file system" not in stderr


@pytest.mark.faults
def test_several_workers_without_a_writable_tmp_refuse_to_start_with_one_line(database_url: str) -> None:
    process = _read_only_gateway(2, False, database_url, "http://127.0.0.1:9/v1", free_port())
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 97:
        pytest.skip("this machine cannot make a read-only mount namespace")
    assert process.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("chat-gateway: refusing to start: GATEWAY_WORKERS=2 needs a private, writable")
