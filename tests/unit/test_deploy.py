"""deploy/kuberay/ checked offline (docs/cluster.md): every manifest parses and validates
against a fixed Kubernetes version's schemas (kubernetes-validate, strict: an unknown field is
an error, as `kubectl apply` makes it) or, for KubeRay's RayCluster and CloudNativePG's
Cluster, against the schemas of the fields used in deploy/kuberay/schemas/ (written from
KubeRay v1.7.0's and CloudNativePG v1.30.0's APIs, closed the same way), the pod templates
inside the RayCluster
validate as core/v1 pod templates, and the properties that matter hold: the sandbox hosts are
privileged root pods on the tainted nodes, the head and front ends are not, token
authentication is on for every Ray container, the database's two clients (the front ends and
the sandbox hosts' NodeHosts, which write the audit rows) take its password and CA from its
Secrets, and the NetworkPolicies, read by a small evaluator of their rules, admit exactly the
connections docs/cluster.md lists.

Every check is also run on a copy of the manifests with that property broken, and must
reject it: a check that looks at nothing fails there."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .netpolicy import Peer, allowed, direction_allows, labels_matched

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kuberay"
KUBERNETES = "1.34.0"  # the schemas of this Kubernetes version (kubernetes-validate bundles them)
NAMESPACE = "codecage"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster.yaml",
    ("postgresql.cnpg.io/v1", "Cluster"): "cnpg-cluster.yaml",
}
TAINT = {"key": "codecage.dev/sandbox-host", "value": "true", "effect": "NoSchedule"}
TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay's authOptions.secretName Secret must have

Doc = dict[str, Any]


# --- loading ---------------------------------------------------------------------------------


@functools.cache
def _loaded() -> tuple[tuple[str, Doc], ...]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return tuple(found)


def manifests() -> list[Doc]:
    """A fresh copy of every document of deploy/kuberay/*.yaml, to read or to break."""
    return [copy.deepcopy(doc) for _, doc in _loaded()]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def groups(cluster: Doc) -> dict[str, Doc]:
    """The RayCluster's head group (as "head") and worker groups, by name."""
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def pod_spec(cluster: Doc, group: str) -> Doc:
    spec: Doc = groups(cluster)[group]["template"]["spec"]
    return spec


# --- schemas ---------------------------------------------------------------------------------


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = yaml.safe_load((DEPLOY / "schemas" / CRD_SCHEMAS[api_version, kind]).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate(doc: Doc) -> None:
    """Raises a jsonschema.ValidationError unless the document is valid; a kind with no
    schema here raises too (kubernetes_validate.SchemaNotFoundError)."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        crd_validator(*key).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def as_pod_template(name: str, template: Doc) -> Doc:
    """A RayCluster group's template as the core/v1 object it is."""
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }


def test_every_manifest_parses_and_has_a_kind() -> None:
    names = {name for name, _ in _loaded()}
    assert names == {p.name for p in DEPLOY.glob("*.yaml")}
    kinds = {doc["kind"] for _, doc in _loaded()}
    assert {"Namespace", "Cluster", "NetworkPolicy", "RayCluster", "Service"} <= kinds
    assert all(d["metadata"].get("namespace", NAMESPACE) == NAMESPACE for _, d in _loaded())


@pytest.mark.parametrize("index", range(len(_loaded())), ids=lambda i: _loaded()[i][0])
def test_manifest_validates(index: int) -> None:
    validate(manifests()[index])


@pytest.mark.parametrize("group", ["head", "sandbox-host", "frontend"])
def test_pod_templates_validate_as_core_v1(group: str) -> None:
    template = groups(one(manifests(), "RayCluster"))[group]["template"]
    assert kubernetes_validate.validate(as_pod_template(group, template), KUBERNETES, strict=True)


def _break(kind: str, change: Callable[[Doc], object]) -> Doc:
    doc = one(manifests(), kind, None if kind != "NetworkPolicy" else "codecage-frontend")
    change(doc)
    return doc


SCHEMA_BREAKS: dict[str, tuple[str, Callable[[Doc], object]]] = {
    "service misspelled field": ("Service", lambda d: d["spec"].update(selectr={"a": "b"})),
    "service port as text": ("Service", lambda d: d["spec"]["ports"][0].update(port="8000")),
    "policy misspelled field": ("NetworkPolicy", lambda d: d["spec"].update(podSelectr={})),
    "namespace label not text": ("Namespace", lambda d: d["metadata"]["labels"].update(x=1)),
    "raycluster misspelled field": (
        "RayCluster",
        lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs")),
    ),
    "raycluster replicas as text": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),
    ),
    "raycluster unknown auth mode": (
        "RayCluster",
        lambda d: d["spec"]["authOptions"].update(mode="on"),
    ),
    "raycluster group field misspelled": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][1].update(minReplica=1),
    ),
    "raycluster without head": ("RayCluster", lambda d: d["spec"].pop("headGroupSpec")),
    "raycluster empty pod": (
        "RayCluster",
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].update(containers=[]),
    ),
    "cnpg instances as text": ("Cluster", lambda d: d["spec"].update(instances="2")),
    "cnpg misspelled field": (
        "Cluster",
        lambda d: d["spec"].update(storag=d["spec"].pop("storage")),
    ),
    "cnpg unknown sync method": (
        "Cluster",
        lambda d: d["spec"]["postgresql"]["synchronous"].update(method="all"),
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKS))
def test_schema_rejects_a_broken_copy(case: str) -> None:
    kind, change = SCHEMA_BREAKS[case]
    with pytest.raises(jsonschema.ValidationError):
        validate(_break(kind, change))


POD_TEMPLATE_BREAKS: dict[str, Callable[[Doc], object]] = {
    "misspelled field": lambda s: s["containers"][0]["securityContext"].update(privilegd=True),
    "wrong type": lambda s: s["containers"][0].update(env="RAY_AUTH_MODE=token"),
    "no containers": lambda s: s.pop("containers"),
}


@pytest.mark.parametrize("case", sorted(POD_TEMPLATE_BREAKS))
def test_pod_template_validation_rejects_a_broken_copy(case: str) -> None:
    template = groups(one(manifests(), "RayCluster"))["sandbox-host"]["template"]
    POD_TEMPLATE_BREAKS[case](template["spec"])
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(as_pod_template("x", template), KUBERNETES, strict=True)


# --- the pods' privileges --------------------------------------------------------------------


def _security(spec: Doc, container: Doc, name: str) -> Any:
    """A container's security setting, else its pod's (as the kubelet resolves it)."""
    own = container.get("securityContext", {})
    return own[name] if name in own else spec.get("securityContext", {}).get(name)


def sandbox_host_problems(cluster: Doc) -> list[str]:
    group = groups(cluster).get("sandbox-host")
    if group is None:
        return ["no sandbox-host group"]
    spec, problems = group["template"]["spec"], []
    if group.get("resources", {}).get("codecage_node") != "1":
        problems.append('the Ray node lacks {"codecage_node": 1}')
    ray = spec["containers"][0]  # KubeRay runs Ray (and so the NodeHost) in the first container
    if ray.get("securityContext", {}).get("privileged") is not True:
        problems.append("the Ray container is not privileged")
    if _security(spec, ray, "runAsUser") != 0 or _security(spec, ray, "runAsNonRoot"):
        problems.append("the Ray container does not run as root")
    if not any(TAINT.items() <= t.items() for t in spec.get("tolerations", [])):
        problems.append("no toleration of the sandbox-host taint")
    if spec.get("nodeSelector", {}).get(TAINT["key"]) != TAINT["value"]:
        problems.append("not confined to the sandbox-host nodes")
    return problems


def unprivileged_problems(cluster: Doc, group: str) -> list[str]:
    """What keeps a group's pods from the restricted Pod Security profile (the parts that
    matter here)."""
    spec, problems = pod_spec(cluster, group), []
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        problems.append(f"{group}: shares a host namespace")
    if any("hostPath" in volume for volume in spec.get("volumes", [])):
        problems.append(f"{group}: mounts a host path")
    if spec.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{group}: no RuntimeDefault seccomp profile")
    for container in spec["containers"] + spec.get("initContainers", []):
        problems += _container_problems(spec, container, f"{group}/{container['name']}")
    return problems


def _container_problems(spec: Doc, container: Doc, where: str) -> list[str]:
    problems, context = [], container.get("securityContext", {})
    if context.get("privileged"):
        problems.append(f"{where}: privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: may escalate privileges")
    caps = context.get("capabilities", {})
    if caps.get("drop") != ["ALL"] or caps.get("add"):
        problems.append(f"{where}: keeps capabilities")
    if _security(spec, container, "runAsNonRoot") is not True:
        problems.append(f"{where}: not runAsNonRoot")
    if _security(spec, container, "runAsUser") in (0, None):
        problems.append(f"{where}: no non-root runAsUser")
    return problems


def test_sandbox_host_is_privileged_root_on_the_tainted_nodes() -> None:
    assert sandbox_host_problems(one(manifests(), "RayCluster")) == []


def _sandbox_container(d: Doc) -> Doc:
    container: Doc = pod_spec(d, "sandbox-host")["containers"][0]
    return container


SANDBOX_HOST_BREAKS: dict[str, Callable[[Doc], object]] = {
    "not privileged": lambda d: _sandbox_container(d)["securityContext"].pop("privileged"),
    "not root": lambda d: _sandbox_container(d)["securityContext"].update(runAsUser=1000),
    "no toleration": lambda d: pod_spec(d, "sandbox-host").pop("tolerations"),
    "wrong taint effect": lambda d: pod_spec(d, "sandbox-host")["tolerations"][0].update(
        effect="PreferNoSchedule"
    ),
    "no node selector": lambda d: pod_spec(d, "sandbox-host").pop("nodeSelector"),
    "no codecage_node": lambda d: groups(d)["sandbox-host"].pop("resources"),
    "group renamed": lambda d: groups(d)["sandbox-host"].update(groupName="sandboxes"),
}


@pytest.mark.parametrize("case", sorted(SANDBOX_HOST_BREAKS))
def test_sandbox_host_check_rejects_a_broken_copy(case: str) -> None:
    cluster = one(manifests(), "RayCluster")
    SANDBOX_HOST_BREAKS[case](cluster)
    assert sandbox_host_problems(cluster)


@pytest.mark.parametrize("group", ["head", "frontend"])
def test_head_and_front_ends_are_unprivileged(group: str) -> None:
    assert unprivileged_problems(one(manifests(), "RayCluster"), group) == []


def _frontend(d: Doc, index: int = 1) -> Doc:
    container: Doc = pod_spec(d, "frontend")["containers"][index]
    return container


UNPRIVILEGED_BREAKS: dict[str, Callable[[Doc], object]] = {
    "privileged": lambda d: _frontend(d)["securityContext"].update(privileged=True),
    "a capability added": lambda d: _frontend(d)["securityContext"]["capabilities"].update(
        add=["NET_ADMIN"]
    ),
    "capabilities kept": lambda d: _frontend(d, 0)["securityContext"].pop("capabilities"),
    "escalation allowed": lambda d: _frontend(d)["securityContext"].pop("allowPrivilegeEscalation"),
    "may run as root": lambda d: pod_spec(d, "frontend")["securityContext"].pop("runAsNonRoot"),
    "runs as uid 0": lambda d: _frontend(d)["securityContext"].update(runAsUser=0),
    "host network": lambda d: pod_spec(d, "frontend").update(hostNetwork=True),
    "host path": lambda d: pod_spec(d, "frontend")["volumes"].append(
        {"name": "h", "hostPath": {"path": "/"}}
    ),
    "no seccomp profile": lambda d: pod_spec(d, "frontend")["securityContext"].pop(
        "seccompProfile"
    ),
}


@pytest.mark.parametrize("case", sorted(UNPRIVILEGED_BREAKS))
def test_unprivileged_check_rejects_a_broken_copy(case: str) -> None:
    cluster = one(manifests(), "RayCluster")
    UNPRIVILEGED_BREAKS[case](cluster)
    assert unprivileged_problems(cluster, "frontend")


# --- Ray's token authentication --------------------------------------------------------------


def _env(container: Doc) -> dict[str, Doc]:
    return {var["name"]: var for var in container.get("env", [])}


def token_auth_problems(cluster: Doc) -> list[str]:
    spec, problems = cluster["spec"], []
    auth = spec.get("authOptions", {})
    secret = auth.get("secretName")
    if auth.get("mode") != "token" or not secret:
        problems.append("authOptions: not token mode with a secretName")
    if tuple(int(p) for p in spec.get("rayVersion", "0").split(".")) < (2, 52, 0):
        problems.append("rayVersion: token authentication needs Ray 2.52.0 or later")
    for name, group in groups(cluster).items():
        for container in group["template"]["spec"]["containers"]:
            problems += _token_env_problems(container, f"{name}/{container['name']}", secret)
    return problems


def _token_env_problems(container: Doc, where: str, secret: str | None) -> list[str]:
    env, problems = _env(container), []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not token")
    token = env.get("RAY_AUTH_TOKEN", {})
    wanted = {"name": secret, "key": TOKEN_SECRET_KEY}
    if "value" in token or token.get("valueFrom", {}).get("secretKeyRef") != wanted:
        problems.append(f"{where}: RAY_AUTH_TOKEN is not the Secret {secret}'s {TOKEN_SECRET_KEY}")
    return problems


def test_token_auth_is_on_for_every_ray_container() -> None:
    cluster = one(manifests(), "RayCluster")
    assert token_auth_problems(cluster) == []
    assert sum(len(g["template"]["spec"]["containers"]) for g in groups(cluster).values()) == 4


def _drop_env(container: Doc, name: str) -> None:
    container["env"] = [var for var in container["env"] if var["name"] != name]


TOKEN_BREAKS: dict[str, Callable[[Doc], object]] = {
    "auth disabled": lambda d: d["spec"]["authOptions"].update(mode="disabled"),
    "no authOptions": lambda d: d["spec"].pop("authOptions"),
    "old ray": lambda d: d["spec"].update(rayVersion="2.51.0"),
    "front end without mode": lambda d: _drop_env(_frontend(d), "RAY_AUTH_MODE"),
    "sandbox host without token": lambda d: _drop_env(_sandbox_container(d), "RAY_AUTH_TOKEN"),
    "token in the manifest": lambda d: _env(pod_spec(d, "head")["containers"][0])[
        "RAY_AUTH_TOKEN"
    ].update(value="secret"),
    "another secret": lambda d: d["spec"]["authOptions"].update(secretName="other"),
}


@pytest.mark.parametrize("case", sorted(TOKEN_BREAKS))
def test_token_auth_check_rejects_a_broken_copy(case: str) -> None:
    cluster = one(manifests(), "RayCluster")
    TOKEN_BREAKS[case](cluster)
    assert token_auth_problems(cluster)


# --- the front ends, their Service and the database -------------------------------------------


def frontend_problems(docs: list[Doc]) -> list[str]:
    cluster, problems = one(docs, "RayCluster"), []
    db = one(docs, "Cluster")["metadata"]["name"]
    container = pod_spec(cluster, "frontend")["containers"][1]
    args = container.get("command", [])
    option = dict(zip(args[2::2], args[3::2], strict=False))
    if args[:2] != ["codecage", "serve"]:
        problems.append("the front end does not run `codecage serve`")
    if option.get("--cluster") != "auto" and not option.get("--cluster", "").startswith("ray://"):
        problems.append("--cluster is neither auto nor ray://HOST:10001")
    if option.get("--db") != f"postgresql://codecage@{db}-rw:5432/codecage":
        problems.append("--db is not the database's read-write Service, without a password")
    http = {"containerPort": 8000, "name": "http"}
    if option.get("--port") != "8000" or http not in container.get("ports", []):
        problems.append("the front end does not serve on port 8000")
    return problems + service_problems(docs)


def service_problems(docs: list[Doc]) -> list[str]:
    service, cluster = one(docs, "Service", "codecage-frontend"), one(docs, "RayCluster")
    selector = service["spec"].get("selector", {})
    chosen = {
        n for n, g in groups(cluster).items() if _selects(selector, g["template"]["metadata"])
    }
    problems = [] if chosen == {"frontend"} else [f"the Service selects {sorted(chosen)}"]
    if [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] != [(8000, "http")]:
        problems.append("the Service does not send port 8000 to the front ends' http port")
    return problems


def _selects(selector: Mapping[str, str], metadata: Doc) -> bool:
    return bool(selector) and selector.items() <= metadata.get("labels", {}).items()


def database_problems(docs: list[Doc]) -> list[str]:
    spec, problems = one(docs, "Cluster")["spec"], []
    if spec.get("instances", 1) < 2:
        problems.append("no standby")
    sync = spec.get("postgresql", {}).get("synchronous", {})
    if sync.get("number", 0) < 1 or sync.get("dataDurability") != "required":
        problems.append("replication is not synchronous and required")
    if spec.get("enableSuperuserAccess", False):
        problems.append("the superuser can log in")
    return problems


def test_front_ends_service_and_database() -> None:
    docs = manifests()
    assert frontend_problems(docs) == []
    assert database_problems(docs) == []


def _frontend_args(d: list[Doc]) -> list[str]:
    args: list[str] = _frontend(one(d, "RayCluster"))["command"]
    return args


FRONTEND_BREAKS: dict[str, Callable[[list[Doc]], object]] = {
    "password in the URL": lambda d: _frontend_args(d).__setitem__(
        5, "postgresql://codecage:pw@codecage-db-rw:5432/codecage"
    ),
    "no cluster address": lambda d: _frontend_args(d).__setitem__(3, "localhost"),
    "service selects every Ray pod": lambda d: one(d, "Service")["spec"]["selector"].pop(
        "app.kubernetes.io/component"
    ),
    "service selects nothing": lambda d: one(d, "Service")["spec"].update(selector={"a": "b"}),
    "service on another port": lambda d: one(d, "Service")["spec"]["ports"][0].update(port=80),
}
DATABASE_BREAKS: dict[str, Callable[[list[Doc]], object]] = {
    "one instance": lambda d: one(d, "Cluster")["spec"].update(instances=1),
    "asynchronous": lambda d: one(d, "Cluster")["spec"]["postgresql"].pop("synchronous"),
    "durability preferred": lambda d: one(d, "Cluster")["spec"]["postgresql"]["synchronous"].update(
        dataDurability="preferred"
    ),
}


@pytest.mark.parametrize("case", sorted(FRONTEND_BREAKS) + sorted(DATABASE_BREAKS))
def test_front_end_and_database_checks_reject_a_broken_copy(case: str) -> None:
    docs = manifests()
    (FRONTEND_BREAKS | DATABASE_BREAKS)[case](docs)
    assert frontend_problems(docs) + database_problems(docs)


# --- the database's clients: the front ends and the sandbox hosts ----------------------------

# The containers that open the audit log, by group: the front end's `codecage serve`, and the
# sandbox host's Ray container, where the NodeHost writes the rows of its node's runs (with the
# front end's --db, handed over through Ray; libpq takes the rest from the environment).
DB_CLIENTS = {"frontend": 1, "sandbox-host": 0}


def database_client_problems(docs: list[Doc]) -> list[str]:
    cluster, db = one(docs, "RayCluster"), one(docs, "Cluster")["metadata"]["name"]
    problems = []
    for group, index in DB_CLIENTS.items():
        spec = pod_spec(cluster, group)
        container = spec["containers"][index]
        problems += _libpq_problems(spec, container, f"{group}/{container['name']}", db)
    return problems


def _libpq_problems(spec: Doc, container: Doc, where: str, db: str) -> list[str]:
    env, problems = _env(container), []
    password = env.get("PGPASSWORD", {})
    wanted = {"name": f"{db}-app", "key": "password"}
    if "value" in password or password.get("valueFrom", {}).get("secretKeyRef") != wanted:
        problems.append(f"{where}: PGPASSWORD is not the Secret {db}-app's password")
    plain = [v["name"] for v in container.get("env", []) if _plain_password(v)]
    plain += [a for a in container.get("command", []) + container.get("args", []) if _url_pw(a)]
    if plain:
        problems.append(f"{where}: a password in plain text: {plain}")
    if env.get("PGSSLMODE", {}).get("value") != "verify-full":
        problems.append(f"{where}: PGSSLMODE is not verify-full")
    ca = env.get("PGSSLROOTCERT", {}).get("value", "")
    if _secret_file(spec, container, ca) != (f"{db}-ca", "ca.crt"):
        problems.append(f"{where}: PGSSLROOTCERT is not the Secret {db}-ca's ca.crt, mounted")
    return problems


def _plain_password(var: Doc) -> bool:
    return "value" in var and ("PASSWORD" in var["name"].upper() or _url_pw(var["value"]))


def _url_pw(text: str) -> bool:
    """Whether the text is a URL with a password in it."""
    return "://" in text and urlsplit(text).password is not None


def _secret_file(spec: Doc, container: Doc, path: str) -> tuple[str, str] | None:
    """The Secret and key a file of the container comes from, if a Secret volume holds it."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret is None or not path.startswith(prefix):
            continue
        inside = path.removeprefix(prefix)
        keys = {i["path"]: i["key"] for i in secret.get("items", [{"key": inside, "path": inside}])}
        if inside in keys:
            return secret["secretName"], keys[inside]
    return None


def test_database_clients_take_the_password_and_ca_from_the_secrets() -> None:
    assert database_client_problems(manifests()) == []


def _pg_env(d: list[Doc], group: str) -> dict[str, Doc]:
    return _env(pod_spec(one(d, "RayCluster"), group)["containers"][DB_CLIENTS[group]])


def _sandbox_host_env(d: list[Doc]) -> list[Doc]:
    env: list[Doc] = _sandbox_container(one(d, "RayCluster"))["env"]
    return env


def _plain_text(env: list[Doc]) -> None:
    env[:] = [v for v in env if v["name"] != "PGPASSWORD"] + [{"name": "PGPASSWORD", "value": "pw"}]


DB_CLIENT_BREAKS: dict[str, Callable[[list[Doc]], object]] = {
    "sandbox host without PGPASSWORD": lambda d: _drop_env(
        _sandbox_container(one(d, "RayCluster")), "PGPASSWORD"
    ),
    "sandbox host's password in plain text": lambda d: _plain_text(_sandbox_host_env(d)),
    "sandbox host's password in a URL": lambda d: _sandbox_host_env(d).append(
        {"name": "DATABASE_URL", "value": "postgresql://codecage:pw@codecage-db-rw/codecage"}
    ),
    "sandbox host's password from another Secret": lambda d: _pg_env(d, "sandbox-host")[
        "PGPASSWORD"
    ]["valueFrom"]["secretKeyRef"].update(name="other"),
    "sandbox host without TLS": lambda d: _pg_env(d, "sandbox-host")["PGSSLMODE"].update(
        value="prefer"
    ),
    "sandbox host's CA not mounted": lambda d: _sandbox_container(one(d, "RayCluster")).pop(
        "volumeMounts"
    ),
    "sandbox host's CA from another Secret": lambda d: pod_spec(
        one(d, "RayCluster"), "sandbox-host"
    )["volumes"][0]["secret"].update(secretName="other"),
    "front end's password from another Secret": lambda d: _pg_env(d, "frontend")["PGPASSWORD"][
        "valueFrom"
    ]["secretKeyRef"].update(name="other"),
}


@pytest.mark.parametrize("case", sorted(DB_CLIENT_BREAKS))
def test_database_client_check_rejects_a_broken_copy(case: str) -> None:
    docs = manifests()
    DB_CLIENT_BREAKS[case](docs)
    assert database_client_problems(docs)


# --- NetworkPolicies -------------------------------------------------------------------------


def peers(docs: list[Doc]) -> dict[str, Peer]:
    """The pods of the manifests, with the labels their templates give them, and others."""
    cluster = one(docs, "RayCluster")
    db = one(docs, "Cluster")["metadata"]["name"]
    found = {
        name: Peer(name, NAMESPACE, group["template"]["metadata"]["labels"])
        for name, group in groups(cluster).items()
    }
    return found | {
        "db": Peer("db", NAMESPACE, {"cnpg.io/cluster": db, "cnpg.io/instanceRole": "primary"}),
        "standby": Peer("standby", NAMESPACE, {"cnpg.io/cluster": db}),
        "tenant-here": Peer("tenant-here", NAMESPACE, {"app": "tenant"}),
        "tenant-pod": Peer("tenant-pod", "tenants", {"app.kubernetes.io/name": "codecage"}),
        "client": Peer("client", ip="203.0.113.7"),
        "dns": Peer("dns", "kube-system", {"k8s-app": "kube-dns"}),
        "cnpg-operator": Peer("cnpg-operator", "cnpg-system", {"app": "cloudnative-pg"}),
    }


RAY_PORTS = [6379, 8265, 10001, 52365, 10002, 45678]  # GCS, dashboard, client, agent, workers
Flow = tuple[str, str, int, str, bool]  # source, target, port, protocol, allowed


def _flows(
    sources: str, targets: str, ports: list[int], want: bool, protocol: str = "TCP"
) -> list[Flow]:
    return [
        (s, t, p, protocol, want) for s in sources.split() for t in targets.split() for p in ports
    ]


# The connections docs/cluster.md lists, and those it rules out.
FLOWS: list[Flow] = [
    *_flows("frontend sandbox-host", "head", RAY_PORTS, True),
    *_flows("head frontend", "sandbox-host", RAY_PORTS, True),
    *_flows("client tenant-here", "frontend", [8000], True),
    *_flows("frontend sandbox-host standby", "db", [5432], True),  # sandbox host: NodeHost's audit
    *_flows("cnpg-operator", "db", [8000], True),
    *_flows("sandbox-host", "dns", [53], True, "UDP"),
    *_flows("tenant-here tenant-pod client", "head", RAY_PORTS, False),
    *_flows("tenant-here client", "sandbox-host frontend", RAY_PORTS, False),
    *_flows("head tenant-here tenant-pod client", "db", [5432], False),
    *_flows("sandbox-host frontend", "db", [8000], False),
    *_flows("sandbox-host head frontend", "client", [443, 5432], False),
    *_flows("sandbox-host", "tenant-here", [8080], False),
    *_flows("sandbox-host", "dns", [80], False),
    *_flows("frontend", "tenant-pod", [8000], False),
]


# Connections each side refuses on its own: the sender's egress and the receiver's ingress
# (defence in depth: either policy alone, broken, still leaves the other).
BOTH_SIDES_DENY: list[tuple[str, str, int]] = [
    ("head", "db", 5432),
    ("sandbox-host", "db", 8000),
    ("frontend", "db", 8000),
]


def network_problems(docs: list[Doc]) -> list[str]:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = peers(docs)
    problems = [
        f"{source} -> {target}:{port}/{protocol} is {'denied' if want else 'allowed'}"
        for source, target, port, protocol, want in FLOWS
        if allowed(policies, pods[source], pods[target], port, protocol) != want
    ]
    for source, target, port in BOTH_SIDES_DENY:
        for way, pod, other in (("egress", source, target), ("ingress", target, source)):
            if direction_allows(policies, pods[pod], pods[other], port, "TCP", way):
                problems.append(f"{source} -> {target}:{port} is allowed by {pod}'s {way}")
    return problems


def test_network_policies_admit_exactly_the_listed_connections() -> None:
    assert network_problems(manifests()) == []


def _policy(docs: list[Doc], name: str) -> Doc:
    return one(docs, "NetworkPolicy", name)


def _rename_component(docs: list[Doc]) -> None:
    labels = groups(one(docs, "RayCluster"))["frontend"]["template"]["metadata"]["labels"]
    labels["app.kubernetes.io/component"] = "api"


def _open_5432(docs: list[Doc]) -> None:
    """Every pod may send to 5432 and the database takes it from anyone."""
    _policy(docs, "codecage-ray-peers")["spec"]["egress"].append({"ports": [{"port": 5432}]})
    _policy(docs, "codecage-db")["spec"]["ingress"][0].pop("from")


NETWORK_BREAKS: dict[str, Callable[[list[Doc]], object]] = {
    "ray ports open to all": lambda d: _policy(d, "codecage-ray-peers")["spec"]["ingress"][0].pop(
        "from"
    ),
    "ray egress open": lambda d: _policy(d, "codecage-ray-peers")["spec"]["egress"].append({}),
    "ray egress to the database": lambda d: _policy(d, "codecage-ray-peers")["spec"][
        "egress"
    ].append({"to": [{"podSelector": {"matchLabels": {"cnpg.io/cluster": "codecage-db"}}}]}),
    "ray peers of any namespace": lambda d: _policy(d, "codecage-ray-peers")["spec"]["ingress"][0][
        "from"
    ][0].update(namespaceSelector={}),
    "front ends open on every port": lambda d: _policy(d, "codecage-frontend")["spec"]["ingress"][
        0
    ].pop("ports"),
    "no database policy": lambda d: d.remove(_policy(d, "codecage-db")),
    "database open on 5432 to all": lambda d: _policy(d, "codecage-db")["spec"]["ingress"][0].pop(
        "from"
    ),
    "database admits the head": lambda d: _policy(d, "codecage-db")["spec"]["ingress"][0][
        "from"
    ].append({"podSelector": {"matchLabels": {"app.kubernetes.io/component": "ray-head"}}}),
    "everything reaches 5432": _open_5432,
    "sandbox host's database egress for every Ray pod": lambda d: _policy(
        d, "codecage-sandbox-host"
    )["spec"]["podSelector"]["matchLabels"].pop("app.kubernetes.io/component"),
    "sandbox host without egress to the database": lambda d: d.remove(
        _policy(d, "codecage-sandbox-host")
    ),
    "database refuses the sandbox host": lambda d: _policy(d, "codecage-db")["spec"]["ingress"][0][
        "from"
    ].pop(1),
    "sandbox host's 5432 to any address": lambda d: _policy(d, "codecage-sandbox-host")["spec"][
        "egress"
    ][0].pop("to"),
    "sandbox host's database egress on every port": lambda d: _policy(d, "codecage-sandbox-host")[
        "spec"
    ]["egress"][0].pop("ports"),
    "database open to every Ray pod": lambda d: _policy(d, "codecage-db")["spec"]["ingress"][0][
        "from"
    ][0]["podSelector"]["matchLabels"].pop("app.kubernetes.io/component"),
    "database policy selects nothing": lambda d: _policy(d, "codecage-db")["spec"].update(
        podSelector={"matchLabels": {"cnpg.io/cluster": "other"}}
    ),
    "front end relabelled": _rename_component,
    "ray policies gone": lambda d: [
        d.remove(_policy(d, n)) for n in ("codecage-ray-peers", "codecage-default-deny")
    ],
}


@pytest.mark.parametrize("case", sorted(NETWORK_BREAKS))
def test_network_check_rejects_a_broken_copy(case: str) -> None:
    docs = manifests()
    NETWORK_BREAKS[case](docs)
    assert network_problems(docs)


def test_the_evaluator_follows_kubernetes_semantics() -> None:
    """The evaluator itself, on policies whose verdicts the Kubernetes documentation gives."""
    a, b = Peer("a", "ns", {"role": "a"}), Peer("b", "ns", {"role": "b"})
    deny = {
        "metadata": {"namespace": "ns"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    assert allowed([], a, b, 80)  # nothing selects b: not isolated
    assert not allowed([deny], a, b, 80)
    opened = copy.deepcopy(deny)
    opened["spec"]["ingress"] = [{"from": [{"podSelector": {"matchLabels": {"role": "a"}}}]}]
    assert allowed([deny, opened], a, b, 80)  # policies add up
    assert not allowed([deny, opened], Peer("c", "other", {"role": "a"}), b, 80)
    opened["spec"]["ingress"][0]["ports"] = [{"port": 80, "endPort": 90}]
    assert allowed([opened], a, b, 85) and not allowed([opened], a, b, 91)
    assert not allowed([opened], a, b, 85, "UDP")


def pods_of(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for name, group in groups(one(docs, "RayCluster")).items():
        yield name, group["template"]["metadata"]["labels"]


def test_every_policy_selects_some_pod() -> None:
    docs = manifests()
    labels = [lab for _, lab in pods_of(docs)] + [{"cnpg.io/cluster": "codecage-db"}]
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        name = policy["metadata"]["name"]
        assert any(labels_matched(policy["spec"]["podSelector"], lab) for lab in labels), name
