"""Table-driven tests of the pure builders (qlora_operator.render) and the operator settings."""

from __future__ import annotations

import copy
import json

import pytest

from qlora_operator import plan, render
from qlora_operator.settings import OperatorSettings, SettingsError
from qlora_trainer.config import parse_config

UID = "0b5c7f3e-1111-2222-3333-444455556666"
BASE_SPEC = {
    "model": {"uri": "s3://models/smollm2/"},
    "dataset": {"uri": "s3://data/chat.jsonl"},
    "output": {"uri": "s3://artifacts/team-a/bot/"},
    "storage": {"endpoint": "http://minio.storage:9000", "credentialsSecretRef": {"name": "s3-creds"}},
}


def body(name: str = "bot", spec: dict | None = None, **spec_updates) -> dict:
    data = copy.deepcopy(spec if spec is not None else BASE_SPEC)
    for key, value in spec_updates.items():
        data[key] = value
    return {
        "apiVersion": "qlora.dev/v1alpha1",
        "kind": "QLoRAJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": UID, "generation": 3},
        "spec": data,
    }


def parsed(b: dict):
    spec, invalid = plan.validate(b["spec"], OperatorSettings())
    assert invalid is None, invalid
    return spec


def job_for(b: dict, settings: OperatorSettings | None = None, run: int = 1) -> dict:
    return render.render_job(b, parsed(b), settings or OperatorSettings(), run)


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def env_of(job: dict) -> dict:
    return {e["name"]: e for e in container(job)["env"]}


# --- names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "args", "expected"),
    [
        (render.job_name, ("bot", 1), "bot-train"),
        (render.job_name, ("bot", 2), "bot-train-r2"),
        (render.config_map_name, ("bot", 1), "bot-config"),
        (render.config_map_name, ("bot", 7), "bot-config-r7"),
        (render.trainer_name, ("bot",), "bot-trainer"),
        (render.label_value, ("bot",), "bot"),
    ],
)
def test_names(fn, args, expected):
    assert fn(*args) == expected


@pytest.mark.parametrize("length", [52, 60, 63, 120, 253])
def test_long_names_are_shortened_deterministically(length):
    name = ("a" * (length - 1)) + "z"
    for run in (1, 2, 123):
        child = render.job_name(name, run)
        assert len(child) <= 63
        assert child == render.job_name(name, run)
        assert child.endswith("train" if run == 1 else f"train-r{run}")
    assert len(render.label_value(name)) <= 63
    assert render.job_name(name, 1) != render.job_name(name[:-1] + "y", 1)


# --- the Job -----------------------------------------------------------------------------


def test_job_basics():
    job = job_for(body())
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == "bot-train"
    assert job["metadata"]["namespace"] == "team-a"
    assert pod["restartPolicy"] == "Never"
    assert spec["completions"] == 1 and spec["parallelism"] == 1
    assert spec["backoffLimit"] == 3
    assert spec["suspend"] is False
    assert spec["podReplacementPolicy"] == "Failed"
    assert "activeDeadlineSeconds" not in spec and "ttlSecondsAfterFinished" not in spec
    assert container(job)["command"] == ["qlora-train", "--config", "/etc/qlora/config.json"]
    assert container(job)["image"] == OperatorSettings().trainer_image
    assert container(job)["terminationMessagePath"] == "/dev/termination-log"
    assert pod["serviceAccountName"] == "bot-trainer"
    assert pod["automountServiceAccountToken"] is True


def test_pod_failure_policy():
    rules = job_for(body())["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3, 6, 7, 8]},
    }
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert len(rules) == 2  # everything else counts against backoffLimit


@pytest.mark.parametrize(
    ("run_policy", "expected"),
    [
        ({}, {"backoffLimit": 3, "suspend": False}),
        ({"backoffLimit": 0}, {"backoffLimit": 0}),
        ({"activeDeadlineSeconds": 3600}, {"activeDeadlineSeconds": 3600}),
        ({"ttlSecondsAfterFinished": 600}, {"ttlSecondsAfterFinished": 600}),
        ({"suspend": True}, {"suspend": True}),
    ],
)
def test_run_policy(run_policy, expected):
    job = job_for(body(runPolicy=run_policy))
    for key, value in expected.items():
        assert job["spec"][key] == value
    if run_policy.get("suspend"):
        assert job["metadata"]["annotations"][render.ANN_USER_SUSPENDED] == "true"


@pytest.mark.parametrize(
    ("resources", "settings", "gpu_name", "quantities"),
    [
        ({}, {}, "nvidia.com/gpu", {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"}),
        ({"gpus": 4, "cpu": "16", "memory": "128Gi"}, {}, "nvidia.com/gpu", {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "4"}),
        ({"gpus": 2}, {"gpu_resource_name": "amd.com/gpu"}, "amd.com/gpu", {"amd.com/gpu": "2"}),
        ({"gpuResourceName": "nvidia.com/mig-1g.10gb"}, {"gpu_resource_name": "amd.com/gpu"}, "nvidia.com/mig-1g.10gb", {"nvidia.com/mig-1g.10gb": "1"}),
    ],
)
def test_resources(resources, settings, gpu_name, quantities):
    job = job_for(body(resources=resources), OperatorSettings(**settings))
    res = container(job)["resources"]
    for key, value in quantities.items():
        assert res["requests"][key] == value
        assert res["limits"][key] == value
    assert res["requests"] == res["limits"]
    assert gpu_name in res["limits"]


def test_env_contract():
    env = env_of(job_for(body(), run=2))
    assert env["QLORA_JOB_NAME"]["value"] == "bot"
    assert env["QLORA_JOB_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["QLORA_RUN"]["value"] == "2"
    assert env["QLORA_TERMINATION_MESSAGE_PATH"]["value"] == "/dev/termination-log"
    assert env["QLORA_CACHE_DIR"]["value"] == "/cache"
    assert env["HF_HOME"]["value"].startswith("/cache")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
        assert "value" not in env[key]
    # temporary credentials: the session token when the Secret has one, and a Secret without it still works
    assert env["AWS_SESSION_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SESSION_TOKEN", "optional": True}
    }


def test_no_secret_reference_without_credentials_ref():
    spec = copy.deepcopy(BASE_SPEC)
    del spec["storage"]["credentialsSecretRef"]
    env = env_of(job_for(body(spec=spec)))
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)


MLFLOW = {"trackingUri": "http://mlflow.mlflow:5000", "experimentName": "support-bot", "tags": {"team": "support"}}


def test_mlflow_credentials_are_optional_secret_key_refs_never_values():
    b = body(tracking={"mlflow": {**MLFLOW, "credentialsSecretRef": {"name": "mlflow-creds"}}})
    env = env_of(job_for(b))
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "mlflow-creds", "key": key,
                                                                        "optional": True}}}
    # The URI, experiment and tags travel in config.json (the trainer sets MLFLOW_* itself), not the pod env.
    assert not {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS", "MLFLOW_RUN_ID"} & set(env)
    cm = render.render_config_map(b, parsed(b))
    config = json.loads(cm["data"]["config.json"])
    assert config["tracking"] == {"mlflow": MLFLOW, "tensorboard": {"enabled": False}}
    assert "mlflow-creds" not in cm["data"]["config.json"]
    assert parse_config(config).tracking.report_to() == ["mlflow"]  # the trainer accepts what we render


@pytest.mark.parametrize(
    "tracking",
    [None, {"mlflow": MLFLOW}, {"tensorboard": {"enabled": True}}],
    ids=["no-tracking", "mlflow-without-secret", "tensorboard"],
)
def test_no_mlflow_secret_reference_without_its_credentials_ref(tracking):
    b = body(**({"tracking": tracking} if tracking else {}))
    env = env_of(job_for(b))
    assert not [name for name in env if name.startswith("MLFLOW_")]
    config = json.loads(render.render_config_map(b, parsed(b))["data"]["config.json"])
    assert parse_config(config).tracking.report_to() == (
        [] if tracking is None else ["mlflow"] if "mlflow" in tracking else ["tensorboard"]
    )


def test_mlflow_credential_names_are_reserved_for_pod_env():
    reserved = set(render.reserved_env_names())
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"} <= reserved


@pytest.mark.parametrize(
    ("scheduling", "pod_fields", "job_labels"),
    [
        ({}, {}, {}),
        ({"nodeSelector": {"gpu": "h200"}}, {"nodeSelector": {"gpu": "h200"}}, {}),
        (
            {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
            {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
            {},
        ),
        ({"priorityClassName": "training"}, {"priorityClassName": "training"}, {}),
        ({"queueName": "team-a"}, {}, {render.KUEUE_QUEUE_LABEL: "team-a"}),
    ],
)
def test_scheduling(scheduling, pod_fields, job_labels):
    job = job_for(body(scheduling=scheduling))
    pod = job["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        assert pod.get(key) == pod_fields.get(key)
    for key, value in job_labels.items():
        assert job["metadata"]["labels"][key] == value
    if not job_labels:
        assert render.KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    # Kueue admits a queued Job by un-suspending it.
    assert job["spec"]["suspend"] is bool(scheduling.get("queueName"))


def test_image_from_spec_or_settings():
    assert container(job_for(body(image="registry.example/t:1")))["image"] == "registry.example/t:1"
    assert container(job_for(body(), OperatorSettings(trainer_image="x/y:2")))["image"] == "x/y:2"


def test_trainer_command_from_settings():
    job = job_for(body(), OperatorSettings(trainer_command='["python", "-c", "print(1)"]'))
    assert container(job)["command"] == ["python", "-c", "print(1)"]


def restricted_violations(pod: dict) -> list[str]:
    """The Pod Security 'restricted' checks that apply to what we render."""
    out = []
    psc = pod.get("securityContext") or {}
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            out.append(f"{c['name']}: capabilities must drop ALL")
        if set(sc.get("capabilities", {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: capabilities add")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{c['name']}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: seccompProfile")
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
    for v in pod.get("volumes", []):
        allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
        if not (set(v) - {"name"}) <= allowed:
            out.append(f"volume {v['name']}: type")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        out.append("host namespaces")
    return out


def test_security_context_passes_restricted():
    pod = job_for(body())["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    sc = container(job_for(body()))["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 1000
    mounts = {m["mountPath"]: m["name"] for m in container(job_for(body()))["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/cache", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]]
    assert volumes[mounts["/etc/qlora"]]["configMap"]["name"] == "bot-config"


def test_run_n_uses_its_own_config_map():
    pod = job_for(body(), run=3)["spec"]["template"]["spec"]
    config = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config["configMap"]["name"] == "bot-config-r3"


# --- the other children -----------------------------------------------------------------


def test_children_order_owner_references_and_labels():
    b = body()
    children = render.render_children(b, parsed(b), OperatorSettings(), 1)
    assert [c["kind"] for c in children] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "qlora.dev/v1alpha1",
                "kind": "QLoRAJob",
                "name": "bot",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][render.LABEL_JOB] == "bot"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "qlora-operator"
        assert meta["annotations"][render.ANN_JOB] == "bot"
    pod_labels = children[-1]["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[render.LABEL_JOB] == "bot" and pod_labels[render.LABEL_RUN] == "1"


def test_config_map_holds_the_trainer_config():
    b = body()
    cm = render.render_config_map(b, parsed(b))
    assert cm["metadata"]["name"] == "bot-config"
    config = json.loads(cm["data"]["config.json"])
    assert "credentialsSecretRef" not in json.dumps(config)
    for runtime_field in ("resources", "image", "scheduling", "runPolicy"):
        assert runtime_field not in config
    loaded = parse_config(config)  # the trainer accepts exactly what we render
    assert loaded.dataset.uri == "s3://data/chat.jsonl"
    assert loaded.storage.endpoint == "http://minio.storage:9000"


def test_run_records_its_spec():
    b = body()
    for obj in (render.render_config_map(b, parsed(b)), job_for(b)):
        recorded = render.recorded_spec(obj)
        assert recorded is not None
        assert recorded["dataset"]["uri"] == "s3://data/chat.jsonl"
        assert obj["metadata"]["annotations"][render.ANN_GENERATION] == "3"
    changed = body(dataset={"uri": "s3://data/other.jsonl"})
    assert job_for(b)["metadata"]["annotations"][render.ANN_SPEC_HASH] != job_for(changed)["metadata"]["annotations"][render.ANN_SPEC_HASH]


def test_role_is_limited_to_this_job():
    role = render.render_role(body())
    assert role["metadata"]["name"] == "bot-trainer"
    assert role["rules"] == [
        {"apiGroups": ["qlora.dev"], "resources": ["qlorajobs/status"], "resourceNames": ["bot"], "verbs": ["get", "patch"]},
        {"apiGroups": ["qlora.dev"], "resources": ["qlorajobs"], "resourceNames": ["bot"], "verbs": ["get"]},
    ]
    text = json.dumps(role)
    assert "secrets" not in text and "*" not in text


def test_role_binding_and_service_account():
    rb = render.render_role_binding(body())
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bot-trainer"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "bot-trainer", "namespace": "team-a"}]
    sa = render.render_service_account(body())
    assert sa["metadata"]["name"] == "bot-trainer" and sa["automountServiceAccountToken"] is True


def test_rendering_is_deterministic():
    b = body()
    one = render.render_children(b, parsed(b), OperatorSettings(), 2)
    two = render.render_children(copy.deepcopy(b), parsed(b), OperatorSettings(), 2)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"metadata": {"labels": {render.LABEL_RUN: "4"}}}, 4),
        ({"metadata": {"labels": {render.LABEL_RUN: "x"}}}, None),
        ({"metadata": {}}, None),
    ],
)
def test_run_of(obj, expected):
    assert render.run_of(obj) == expected


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "overrides", "field", "expected"),
    [
        ({}, {}, "trainer_command", ("qlora-train", "--config", "/etc/qlora/config.json")),
        ({"QLORA_OPERATOR_TRAINER_COMMAND": '["python", "-c", "x"]'}, {}, "trainer_command", ("python", "-c", "x")),
        ({"QLORA_OPERATOR_TRAINER_COMMAND": "python -c 'import sys; sys.exit(3)'"}, {}, "trainer_command", ("python", "-c", "import sys; sys.exit(3)")),
        ({"QLORA_OPERATOR_MAX_GPUS_PER_JOB": "2"}, {}, "max_gpus_per_job", 2),
        ({"QLORA_OPERATOR_MAX_GPUS_PER_JOB": "2"}, {"max_gpus_per_job": 5}, "max_gpus_per_job", 5),
        ({"QLORA_OPERATOR_NAMESPACES": "a, b"}, {}, "namespaces", ("a", "b")),
        ({"QLORA_OPERATOR_NAMESPACES": "a"}, {"namespaces": ["c"]}, "namespaces", ("c",)),
        ({}, {"stalled_timeout_seconds": None}, "stalled_timeout_seconds", 900.0),
        ({"QLORA_OPERATOR_STALLED_TIMEOUT_SECONDS": "30"}, {}, "stalled_timeout_seconds", 30.0),
    ],
)
def test_settings_env_then_flags(env, overrides, field, expected):
    assert getattr(OperatorSettings.load(env, **overrides), field) == expected


@pytest.mark.parametrize(
    ("env", "overrides", "clusterwide"),
    [({}, {}, True), ({"QLORA_OPERATOR_NAMESPACES": "a"}, {}, False), ({"QLORA_OPERATOR_NAMESPACES": "a"}, {"all_namespaces": True}, True)],
)
def test_settings_scope(env, overrides, clusterwide):
    assert OperatorSettings.load(env, **overrides).clusterwide is clusterwide


def test_settings_errors_name_the_variable_and_flag():
    with pytest.raises(SettingsError) as err:
        OperatorSettings.load({"QLORA_OPERATOR_MAX_GPUS_PER_JOB": "zero"})
    assert "QLORA_OPERATOR_MAX_GPUS_PER_JOB" in str(err.value) and "--max-gpus-per-job" in str(err.value)
    with pytest.raises(SettingsError):
        OperatorSettings.load({}, log_format="xml")


# --- several nodes (issue 10) -----------------------------------------------------------------------


def multinode(nodes: int = 2, gpus: int = 1, name: str = "bot", **updates) -> dict:
    return body(name, resources={"gpus": gpus, "nodes": nodes}, **updates)


@pytest.mark.parametrize(
    ("nodes", "gpus", "expected"),
    [
        (1, 1, None),
        (1, 4, {"QLORA_NNODES": "1", "QLORA_NPROC_PER_NODE": "4", "QLORA_NODE_RANK": "0", "QLORA_MASTER_ADDR": "127.0.0.1"}),
        (2, 1, {"QLORA_NNODES": "2", "QLORA_NPROC_PER_NODE": "1", "QLORA_MASTER_ADDR": "bot-train-0.bot-train"}),
        (2, 4, {"QLORA_NNODES": "2", "QLORA_NPROC_PER_NODE": "4", "QLORA_MASTER_ADDR": "bot-train-0.bot-train"}),
    ],
)
def test_distributed_env_contract(nodes, gpus, expected):
    env = env_of(job_for(multinode(nodes, gpus)))
    names = ("QLORA_NNODES", "QLORA_NPROC_PER_NODE", "QLORA_NODE_RANK", "QLORA_MASTER_ADDR", "QLORA_MASTER_PORT")
    if expected is None:
        assert not set(names) & set(env)
        return
    for key, value in expected.items():
        assert env[key] == {"name": key, "value": value}
    assert env["QLORA_MASTER_PORT"]["value"] == "29500"
    if nodes > 1:  # the rank is the pod's completion index, set by the Job controller
        assert env["QLORA_NODE_RANK"] == {
            "name": "QLORA_NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}},
        }
    assert container(job_for(multinode(nodes, gpus)))["command"] == ["qlora-train", "--config", "/etc/qlora/config.json"]


def test_multinode_master_addr_follows_the_run():
    env = env_of(job_for(multinode(), run=3))
    assert env["QLORA_MASTER_ADDR"]["value"] == "bot-train-r3-0.bot-train-r3"
    assert env["QLORA_MASTER_ADDR"]["value"] == render.master_addr("bot", 3)


def test_multinode_job_is_indexed_and_fails_as_a_group():
    job = job_for(multinode(3, 2, runPolicy={"backoffLimit": 5}))
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["backoffLimit"] == 0  # the first failed pod fails the Job; the operator restarts the group
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3, 6, 7, 8]}},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "NotIn", "values": [0, 143]}},
        {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [143]}},
    ]
    assert pod["subdomain"] == "bot-train" and pod["restartPolicy"] == "Never"
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"  # gpus per pod
    ann = job["metadata"]["annotations"]
    assert (ann[render.ANN_GROUP_ATTEMPT], ann[render.ANN_GROUP_FAILURES]) == ("0", "0")
    assert render.ANN_RESTART_OF not in ann
    assert render.job_nodes(job) == 3
    assert restricted_violations(pod) == []


def test_single_node_job_is_unchanged():
    job = job_for(body())
    spec = job["spec"]
    assert "completionMode" not in spec and (spec["completions"], spec["parallelism"]) == (1, 1)
    assert "subdomain" not in spec["template"]["spec"]
    assert render.ANN_GROUP_ATTEMPT not in job["metadata"]["annotations"]
    assert render.job_nodes(job) == 1
    b = body()
    assert [c["kind"] for c in render.render_children(b, parsed(b), OperatorSettings())] == [
        "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]


def test_multinode_group_attempt_is_recorded_on_the_job():
    b = multinode()
    group = render.GroupAttempt(attempt=2, failures=1, restart_of=4)
    job = render.render_job(b, parsed(b), OperatorSettings(), 5, group)
    ann = job["metadata"]["annotations"]
    assert (ann[render.ANN_GROUP_ATTEMPT], ann[render.ANN_GROUP_FAILURES], ann[render.ANN_RESTART_OF]) == ("2", "1", "4")
    assert render.group_attempt_of(job) == group
    assert render.group_attempt_of(None) == render.GroupAttempt()
    assert render.group_attempt_of({"metadata": {"annotations": {render.ANN_GROUP_ATTEMPT: "x"}}}) == render.GroupAttempt()


def test_multinode_headless_service():
    b = multinode()
    children = render.render_children(b, parsed(b), OperatorSettings(), 2)
    assert [c["kind"] for c in children] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Service", "Job"]
    svc, job = children[-2], children[-1]
    assert svc["metadata"]["name"] == "bot-train-r2" == job["spec"]["template"]["spec"]["subdomain"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {render.LABEL_JOB: "bot", render.LABEL_RUN: "2"}
    template_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(template_labels[k] == v for k, v in svc["spec"]["selector"].items())  # it selects the run's pods
    assert svc["spec"]["ports"] == [{"name": "torch-dist", "port": 29500, "targetPort": 29500, "protocol": "TCP"}]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == UID  # created before the Job: owned by the QLoRAJob


@pytest.mark.parametrize("length", [1, 40, 50, 52])
@pytest.mark.parametrize("run", [1, 2, 10, 999])
def test_multinode_names_fit_dns_labels(length, run):
    import re

    name = ("b" * (length - 1)) + "z"
    svc = render.service_name(name, run)
    hostname = f"{render.job_name(name, run)}-63"  # the Job controller's hostname of the last index
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", svc), svc  # DNS-1035 (a Service name)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", hostname), hostname  # DNS-1123 label
    assert render.master_addr(name, run) == f"{render.job_name(name, run)}-0.{svc}"


@pytest.mark.parametrize(
    ("name", "resources", "settings", "fragment"),
    [
        ("bot", {"nodes": 2, "gpus": 9}, {}, "spec.resources.gpus: 9 GPUs requested"),
        ("bot", {"nodes": 8, "gpus": 8}, {}, None),  # max_gpus_per_job is per pod; ResourceQuota caps the total
        ("bot.v2", {"nodes": 2}, {}, "metadata.name must be a DNS-1035 label"),
        ("7b-bot", {"nodes": 2}, {}, "metadata.name must be a DNS-1035 label"),
        ("7b-bot", {"nodes": 1}, {}, None),
        ("bot.v2", {}, {}, None),
    ],
)
def test_validate_several_nodes(name, resources, settings, fragment):
    spec = copy.deepcopy(BASE_SPEC)
    spec["resources"] = resources
    parsed_spec, invalid = plan.validate(spec, OperatorSettings(**settings), name)
    if fragment is None:
        assert invalid is None and parsed_spec is not None
    else:
        assert parsed_spec is None and fragment in invalid


@pytest.mark.parametrize("nodes", [0, 65])
def test_nodes_bounds(nodes):
    spec = copy.deepcopy(BASE_SPEC)
    spec["resources"] = {"nodes": nodes}
    _, invalid = plan.validate(spec, OperatorSettings())
    assert invalid and "spec.resources.nodes" in invalid


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        ({"metadata": {"annotations": {render.COMPLETION_INDEX: "3"}}}, 3),
        ({"metadata": {"labels": {render.COMPLETION_INDEX: "1"}}}, 1),
        ({"metadata": {}}, None),
    ],
)
def test_pod_node_index(pod, expected):
    assert render.pod_node_index(pod) == expected


# --- spec.pod: identity and pod plumbing (issue 18, item 4) ------------------------------------

POD_EXTRAS = {
    "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/team-a"},
    "imagePullSecrets": ["registry-team-a", "shared-registry"],
    "runtimeClassName": "nvidia",
    "env": [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "RUN_TAG", "value": "$(QLORA_JOB_NAME)-$(QLORA_RUN)"},
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}},
    ],
    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "team-a-models", "readOnly": True}}],
    "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
}


def test_pod_extras_are_rendered_after_the_operators():
    settings = OperatorSettings(image_pull_secrets=("shared-registry", "org-registry"))
    job = job_for(body(pod=POD_EXTRAS), settings)
    pod = job["spec"]["template"]["spec"]
    names = [e["name"] for e in container(job)["env"]]
    # the operator's variables come first, so $(QLORA_JOB_NAME) in an extra one expands
    assert names[-3:] == ["HF_HUB_OFFLINE", "RUN_TAG", "WANDB_API_KEY"]
    assert names.index("QLORA_JOB_NAME") < names.index("RUN_TAG")
    assert env_of(job)["WANDB_API_KEY"]["valueFrom"] == POD_EXTRAS["env"][2]["valueFrom"]
    assert pod["volumes"][-1] == POD_EXTRAS["volumes"][0]
    assert [v["name"] for v in pod["volumes"][:-1]] == ["config", "cache", "tmp", "dshm"]
    assert container(job)["volumeMounts"][-1] == {"name": "models", "mountPath": "/models", "readOnly": True}
    # chart's pull secrets first, then the job's, each once
    assert pod["imagePullSecrets"] == [{"name": "shared-registry"}, {"name": "org-registry"}, {"name": "registry-team-a"}]
    assert pod["runtimeClassName"] == "nvidia"
    # the security context does not change
    assert container(job)["securityContext"]["readOnlyRootFilesystem"] is True


def test_no_pod_extras_render_nothing():
    pod = job_for(body())["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in pod and "runtimeClassName" not in pod and "affinity" not in pod
    assert [v["name"] for v in pod["volumes"]] == ["config", "cache", "tmp", "dshm"]


def test_affinity_is_passed_as_written():
    affinity = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"qlora.dev/job": "bot"}}}}]},
    }
    pod = job_for(body(scheduling={"affinity": affinity}))["spec"]["template"]["spec"]
    assert pod["affinity"] == affinity


def test_reserved_lists_come_from_what_the_operator_renders():
    job = job_for(multinode(2, 2))
    rendered_env = {e["name"] for e in container(job)["env"]}
    assert rendered_env <= set(render.reserved_env_names())
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HOME", "QLORA_MASTER_ADDR"} <= set(
        render.reserved_env_names()
    )
    pod = job["spec"]["template"]["spec"]
    assert set(render.reserved_volume_names()) == {v["name"] for v in pod["volumes"]}
    assert set(render.reserved_mount_paths()) == {m["mountPath"] for m in container(job)["volumeMounts"]} | {
        container(job)["terminationMessagePath"]
    }


@pytest.mark.parametrize(
    ("path", "collides"),
    [
        ("/cache", True), ("/cache/", True), ("/cache/hf", True), ("/", True), ("/dev", True),
        ("/etc", True), ("/etc/qlora/x", True), ("/dev/termination-log", True),
        ("/cached", False), ("/data", False), ("/models/m", False), ("/etc/ssl", False), ("/tmpdata", False),
    ],
)
def test_mount_path_collisions(path, collides):
    assert any(render.mount_path_collides(path, p) for p in render.reserved_mount_paths()) is collides


def test_service_account_annotations_chart_default_then_job():
    settings = OperatorSettings(service_account_annotations={"iam.gke.io/gcp-service-account": "t@p.iam", "a/b": "chart"})
    b = body(pod={"serviceAccountAnnotations": {"a/b": "job", "eks.amazonaws.com/role-arn": "arn"}})
    sa = render.render_service_account(b, parsed(b), settings)
    ann = sa["metadata"]["annotations"]
    assert ann["a/b"] == "job" and ann["iam.gke.io/gcp-service-account"] == "t@p.iam" and ann["eks.amazonaws.com/role-arn"] == "arn"
    assert json.loads(ann[render.ANN_MANAGED_ANNOTATIONS]) == ["a/b", "eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"]
    assert ann[render.ANN_JOB] == "bot"  # the operator's own annotation stays
    # the children carry it
    assert render.render_children(b, parsed(b), settings, 1)[1] == sa


def test_service_account_patch_sets_changes_and_removes_only_its_own_keys():
    b = body(pod={"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:1", "x/y": "1"}})
    have = render.render_service_account(b, parsed(b))
    have["metadata"]["annotations"]["someone.else/note"] = "keep"
    assert render.service_account_patch(have, have) is None
    changed = body(pod={"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:2"}})
    patch = render.service_account_patch(have, render.render_service_account(changed, parsed(changed)))
    assert patch == {"metadata": {"annotations": {
        "eks.amazonaws.com/role-arn": "arn:2", "x/y": None, render.ANN_MANAGED_ANNOTATIONS: '["eks.amazonaws.com/role-arn"]'}}}
    plain = render.render_service_account(body(), parsed(body()))
    patch = render.service_account_patch(have, plain)
    assert patch == {"metadata": {"annotations": {
        "eks.amazonaws.com/role-arn": None, "x/y": None, render.ANN_MANAGED_ANNOTATIONS: None}}}


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"QLORA_OPERATOR_IMAGE_PULL_SECRETS": '["a", "b"]'}, "image_pull_secrets", ("a", "b")),
        ({"QLORA_OPERATOR_IMAGE_PULL_SECRETS": "a,b"}, "image_pull_secrets", ("a", "b")),
        ({"QLORA_OPERATOR_SERVICE_ACCOUNT_ANNOTATIONS": '{"eks.amazonaws.com/role-arn": "arn"}'},
         "service_account_annotations", {"eks.amazonaws.com/role-arn": "arn"}),
    ],
)
def test_settings_pod_defaults_from_env(env, field, expected):
    assert getattr(OperatorSettings.load(env), field) == expected


def test_settings_refuse_operator_annotation_keys():
    with pytest.raises(SettingsError, match="QLORA_OPERATOR_SERVICE_ACCOUNT_ANNOTATIONS.*qlora.dev/job"):
        OperatorSettings.load({"QLORA_OPERATOR_SERVICE_ACCOUNT_ANNOTATIONS": '{"qlora.dev/job": "x"}'})


# --- leader election settings (issue 18, item 1) ------------------------------------------------


def test_leader_election_settings_from_env():
    s = OperatorSettings.load({"QLORA_OPERATOR_LEADER_ELECTION": "true", "QLORA_OPERATOR_LEADER_ELECTION_LEASE_SECONDS": "6",
                               "QLORA_OPERATOR_LEADER_ELECTION_RENEW_DEADLINE_SECONDS": "4",
                               "QLORA_OPERATOR_LEADER_ELECTION_RETRY_SECONDS": "1"})
    assert s.leader_election is True and s.leader_election_lease_seconds == 6
    assert OperatorSettings().leader_election is False  # one process alone needs no Lease


@pytest.mark.parametrize(("lease", "renew", "retry"), [(10, 10, 2), (15, 10, 9), (5, 3, 3)])
def test_leader_election_timing_is_checked(lease, renew, retry):
    with pytest.raises(SettingsError, match="leader_election_lease_seconds > leader_election_renew_deadline_seconds"):
        OperatorSettings.load({"QLORA_OPERATOR_LEADER_ELECTION_LEASE_SECONDS": str(lease),
                               "QLORA_OPERATOR_LEADER_ELECTION_RENEW_DEADLINE_SECONDS": str(renew),
                               "QLORA_OPERATOR_LEADER_ELECTION_RETRY_SECONDS": str(retry)})
