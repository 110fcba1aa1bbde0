"""Offline checks of everything that deploys dadpo-ray: cluster/*.yaml, cluster/kuberay/*.yaml, jobs/runtime_env.yaml.

Each file is checked by the owner of its format (Ray's autoscaler schema, the KubeRay v1.7 CRD schemas, the
Kubernetes schemas bundled in kubernetes-validate, Ray's RuntimeEnv parser) and then against our own policies:
the dashboard is never exposed, secrets are never inline, scheduled runs never overlap, a RayJob's cluster is
deleted when it ends, and run dirs live on the shared volume every Ray pod mounts (never a URI: the recipe writes
them with plain file I/O). Every check is also shown to reject a broken copy. No network, no cloud credentials.
"""

import copy
import json
import os
import re
import subprocess
from functools import cache

import jsonschema
import pytest
import yaml
from conftest import REPO, shared_path
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

LAUNCHER_FILES = sorted((REPO / "cluster").glob("*.yaml"))
KUBERAY_FILES = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
K8S_VERSIONS = ("1.30", "1.37")  # oldest and newest Kubernetes minor we check the CronJob and RBAC against
SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|CREDENTIALS?)(_|$)", re.I)  # HF_TOKEN, not TOKENIZERS_
# Shapes of real credentials: Hugging Face, OpenAI-style, AWS access key, GitHub, PEM private keys.
LITERAL_SECRET = re.compile(r"hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}"
                            r"|-----BEGIN [A-Z ]*PRIVATE KEY-----")
SHARED_MOUNT = "/mnt/dadpo"  # where every Ray pod mounts the shared run directory
RUNS_CLAIM = "dadpo-ray-runs"  # its ReadWriteMany PersistentVolumeClaim, cluster/kuberay/pvc.yaml
URI_RUN_DIR = re.compile(r"run_dir[=:]\s*[\"']?[A-Za-z][\w+.-]*://")  # run_dir=s3://..., run_dir: gs://...
ENTRYPOINT = re.compile(r"python jobs/(pipeline|generate|train|evaluate)\.py --config jobs/configs/[\w.-]+\.yaml"
                        r"( --schedule)?( [\w.]+=[\w./:@-]+)*")


def load_all(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kuberay_objects():
    """(label, object) for every ray.io object, including the RayJob the CronJob's ConfigMap carries."""
    for path in KUBERAY_FILES:
        for doc in load_all(path):
            if doc["apiVersion"].startswith("ray.io/"):
                yield f"{path.name}:{doc['kind']}", doc
            elif doc["kind"] == "ConfigMap":
                for key, text in doc["data"].items():
                    yield f"{path.name}:{doc['metadata']['name']}/{key}", yaml.safe_load(text)


def k8s_objects():
    """(label, object) for every built-in Kubernetes object (CronJob, RBAC, ConfigMap)."""
    for path in KUBERAY_FILES:
        for doc in load_all(path):
            if not doc["apiVersion"].startswith("ray.io/"):
                yield f"{path.name}:{doc['kind']}", doc


def job_spec(obj):
    """The RayJob spec inside a RayJob or RayCronJob; None for a RayCluster."""
    return {"RayJob": obj["spec"], "RayCronJob": obj["spec"].get("jobTemplate")}.get(obj["kind"])


def cluster_spec(obj):
    return obj["spec"] if obj["kind"] == "RayCluster" else job_spec(obj)["rayClusterSpec"]


def walk(node):
    """Every dict and list inside node, node included."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


# ------------------------------------------------------------------------------------------- our own policies
def launcher_problems(config):
    """Dashboard on loopback only, no inbound rule for it, a head that takes no work, workers that scale to 0,
    and the shared run directory mounted on every node's host and passed into the container."""
    problems = []
    start = " ".join(config.get("head_start_ray_commands", []))
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    if not hosts or set(hosts) != {"127.0.0.1"}:
        problems.append(f"head must start the dashboard with --dashboard-host=127.0.0.1, found {hosts}")
    if "8265" in json.dumps(config.get("provider", {})):
        problems.append("provider opens the dashboard port 8265")
    types = config["available_node_types"]
    if types[config["head_node_type"]].get("resources", {}).get("CPU") != 0:
        problems.append("head node type must have resources {'CPU': 0}")
    for name, node_type in types.items():
        if name != config["head_node_type"] and node_type.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers must be 0")
    if "idle_timeout_minutes" not in config:
        problems.append("idle_timeout_minutes is not set")
    if f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" not in config.get("docker", {}).get("run_options", []):
        problems.append(f"docker run_options must bind the shared run directory: -v {SHARED_MOUNT}:{SHARED_MOUNT}")
    if not re.search(rf"\bmount\b.* {SHARED_MOUNT}\b", " ".join(config.get("initialization_commands", []))):
        problems.append(f"initialization_commands must mount the shared filesystem at {SHARED_MOUNT}")
    return problems


def exposure_problems(obj):
    """No LoadBalancer / NodePort service and no Ingress anywhere in a KubeRay object."""
    problems = [f"exposed through {value}" for node in walk(obj) if isinstance(node, dict)
                for value in node.values() if value in ("LoadBalancer", "NodePort")]
    problems += ["enableIngress is on" for node in walk(obj) if isinstance(node, dict) and node.get("enableIngress")]
    return problems


def secret_problems(obj):
    """Env vars that look like secrets must come from a Secret, never from a literal value."""
    env_vars = [var for node in walk(obj) if isinstance(node, dict) and isinstance(node.get("env"), list)
                for var in node["env"]]
    return [f"{var['name']} is not read from a Secret" for var in env_vars if SECRET_NAME.search(var["name"])
            and ("value" in var or "secretKeyRef" not in var.get("valueFrom", {}))]


def rayjob_problems(spec):
    """A RayJob deletes its cluster when done, has a deadline, and its runtime env survives submission."""
    problems = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true")
    if "ttlSecondsAfterFinished" not in spec or "activeDeadlineSeconds" not in spec:
        problems.append("ttlSecondsAfterFinished and activeDeadlineSeconds must be set")
    # K8sJobMode / SidecarMode hand the runtime env to `ray job submit` through a shell, which expands $...
    if "$" in spec.get("runtimeEnvYAML", "") and spec.get("submissionMode") != "HTTPMode":
        problems.append("runtimeEnvYAML uses ${...}: submissionMode must be HTTPMode")
    if not ENTRYPOINT.fullmatch(spec.get("entrypoint", "")):
        problems.append(f"entrypoint is not a dadpo-ray job command: {spec.get('entrypoint')!r}")
    return problems


def run_dir_problems(spec):
    """The entrypoint writes its run dir on the shared volume: `run_dir=/mnt/dadpo/...`, never a URI (the recipe
    writes run dirs with plain file I/O on several nodes) nor a pod-local path."""
    run_dirs = re.findall(r"(?:^|\s)run_dir=(\S*)", spec.get("entrypoint", ""))
    if not run_dirs:
        return [f"entrypoint sets no run_dir (must be under {SHARED_MOUNT}/)"]
    return [f"run_dir {d!r} is not on the shared volume: must be a path under {SHARED_MOUNT}/, never a URI"
            for d in run_dirs if "://" in d or not d.startswith(SHARED_MOUNT + "/") or ".." in d.split("/")]


def shared_volume_problems(cluster):
    """The head and every worker group's pod mounts the shared run directory (the PVC) at /mnt/dadpo."""
    problems = []
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])
                   if v.get("persistentVolumeClaim", {}).get("claimName") == RUNS_CLAIM}
        if not volumes:
            problems.append(f"{name}: no volume from the PersistentVolumeClaim {RUNS_CLAIM}")
        for container in pod["containers"]:
            mounts = [m for m in container.get("volumeMounts", []) if m.get("mountPath") == SHARED_MOUNT]
            if not any(m["name"] in volumes and not m.get("readOnly") and not m.get("subPath") for m in mounts):
                problems.append(f"{name}/{container['name']}: {RUNS_CLAIM} is not mounted read-write at {SHARED_MOUNT}")
    return problems


def pvc_problems(obj):
    """The shared run directory is one volume that pods on many nodes read and write at once."""
    return [] if "ReadWriteMany" in obj["spec"].get("accessModes", []) else [
        f"{obj['metadata']['name']}: accessModes must include ReadWriteMany"]


def cronjob_problems(obj):
    """A scheduled run never starts while the previous one is still going. (The Kubernetes schema carries no
    enum for concurrencyPolicy, so 'Sometimes' passes it; this check is what catches it.)"""
    policy = obj["spec"].get("concurrencyPolicy")
    return [] if policy == "Forbid" else [f"concurrencyPolicy must be Forbid, found {policy!r}"]


def runtime_env_problems(env):
    """Only fields Ray knows, and no secrets among the env vars."""
    problems = [f"unknown runtime_env field {key!r}" for key in set(env) - RuntimeEnv.known_fields]
    problems += [f"{name} looks like a secret" for name in env.get("env_vars", {}) if SECRET_NAME.search(name)]
    return problems


# --------------------------------------------------------------------------------- checkers of other owners
def ray_check(config):
    """What `ray up` checks before it touches the cloud: Ray's defaults for the provider merged in
    (prepare_config reads a YAML shipped with Ray), then Ray's JSON schema plus head/min/max consistency
    (validate_config). Not checked: the provider bootstrap (`_bootstrap_config` -> bootstrap_aws / bootstrap_gcp),
    which calls the cloud APIs (IAM, subnets, key pairs, AMI / image lookup, instance-type resource detection);
    so an ImageId, machine type or zone that does not exist passes here."""
    validate_config(prepare_config(copy.deepcopy(config)))


@cache
def crd_schema(kind, strict):
    suffix = ".strict" if strict else ""
    return json.loads(shared_path("data", "kuberay-schemas", f"{kind.lower()}_v1{suffix}.json").read_text())


def crd_errors(obj, strict):
    """Schema errors of a KubeRay object. The CRDs' x-kubernetes-validations (CEL rules) are not evaluated."""
    validator = jsonschema.Draft202012Validator(crd_schema(obj["kind"], strict))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def k8s_errors(obj, version, strict=True):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is missing: pip install -r requirements.txt")
    try:
        kubernetes_validate.validate(obj, version, strict=strict)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


# ------------------------------------------------------------------------------------ cluster launcher YAMLs
def test_launcher_files_exist():
    assert [p.name for p in LAUNCHER_FILES] == ["aws.yaml", "gcp.yaml"]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_and_policy(path):
    config = yaml.safe_load(path.read_text())
    ray_check(config)
    assert launcher_problems(config) == []
    gpus = sorted(t["resources"].get("GPU", 0) for t in config["available_node_types"].values())
    assert 1 in gpus and gpus[-1] >= 8, "needs 1-GPU inference nodes and a multi-GPU training node type"
    assert not LITERAL_SECRET.search(path.read_text())


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("breakage", ["unknown top-level key", "node type without resources", "wrong type"])
def test_launcher_yaml_broken_copy_rejected_by_ray(path, breakage):
    config = yaml.safe_load(path.read_text())
    if breakage == "unknown top-level key":
        config["idle_timeout_minute"] = 5
    elif breakage == "node type without resources":
        del config["available_node_types"]["gpu_inference"]["resources"]
    else:
        config["max_workers"] = "14"
    with pytest.raises(jsonschema.ValidationError):
        ray_check(config)


@pytest.mark.parametrize("breakage", ["dashboard on all interfaces", "dashboard port opened", "work on the head",
                                      "shared dir not in the container", "shared dir not mounted"])
def test_launcher_policy_rejects_broken_copy(breakage):
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    if breakage == "dashboard on all interfaces":
        config["head_start_ray_commands"][-1] += " --dashboard-host=0.0.0.0"
    elif breakage == "dashboard port opened":
        config["provider"]["security_group"] = {"IpPermissions": [{"FromPort": 8265, "ToPort": 8265}]}
    elif breakage == "work on the head":
        config["available_node_types"]["head"]["resources"] = {"CPU": 8}
    elif breakage == "shared dir not in the container":
        config["docker"]["run_options"] = [o for o in config["docker"]["run_options"] if SHARED_MOUNT not in o]
    else:
        del config["initialization_commands"]
    assert launcher_problems(config)


# ----------------------------------------------------------------------------------------- KubeRay objects
def test_kuberay_files_exist():
    names = {p.name for p in KUBERAY_FILES}
    assert names == {"raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "pvc.yaml"}


@pytest.mark.parametrize("label", [label for label, _ in kuberay_objects()])
def test_kuberay_object_passes_crd_schema_and_policy(label):
    obj = dict(kuberay_objects())[label]
    assert crd_errors(obj, strict=True) == []
    assert crd_errors(obj, strict=False) == []
    assert exposure_problems(obj) == [] and secret_problems(obj) == []
    assert cluster_spec(obj)["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert shared_volume_problems(cluster_spec(obj)) == []
    if job_spec(obj) is not None:
        assert rayjob_problems(job_spec(obj)) == []
        assert run_dir_problems(job_spec(obj)) == []
        env = yaml.safe_load(job_spec(obj)["runtimeEnvYAML"])
        RuntimeEnv(**env)  # Ray's own parser, as `ray job submit` runs it
        assert runtime_env_problems(env) == []


@pytest.mark.parametrize("label", [label for label, _ in kuberay_objects()])
def test_kuberay_broken_copies_rejected(label):
    obj = dict(kuberay_objects())[label]
    unknown = copy.deepcopy(obj)  # a typo deep in a pod template: only the strict schema knows every field
    cluster_spec(unknown)["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert crd_errors(unknown, strict=True)
    wrong_type = copy.deepcopy(obj)
    cluster_spec(wrong_type)["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert crd_errors(wrong_type, strict=True) and crd_errors(wrong_type, strict=False)

    exposed = copy.deepcopy(obj)
    cluster_spec(exposed)["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert exposure_problems(exposed)
    inline = copy.deepcopy(obj)
    inline_env = cluster_spec(inline)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    inline_env[0] = {"name": "HF_TOKEN", "value": "not-a-real-token"}
    assert secret_problems(inline)
    if job_spec(obj) is not None:
        kept = copy.deepcopy(obj)
        job_spec(kept)["shutdownAfterJobFinishes"] = False
        assert rayjob_problems(job_spec(kept))
        shell_mode = copy.deepcopy(obj)
        job_spec(shell_mode)["submissionMode"] = "K8sJobMode"
        assert rayjob_problems(job_spec(shell_mode))
        for run_dir in ("s3://BUCKET/dadpo-ray/SETTING", "gs://BUCKET/x", "file:///mnt/dadpo/x", "/tmp/SETTING",
                        "runs/SETTING", "/mnt/dadpo-other/x", "/mnt/dadpo/../x"):
            elsewhere = copy.deepcopy(obj)
            spec = job_spec(elsewhere)
            spec["entrypoint"] = re.sub(r"run_dir=\S*", f"run_dir={run_dir}", spec["entrypoint"])
            assert run_dir_problems(spec), run_dir
        no_run_dir = copy.deepcopy(obj)
        job_spec(no_run_dir)["entrypoint"] = re.sub(r" run_dir=\S*", "", job_spec(no_run_dir)["entrypoint"])
        assert run_dir_problems(job_spec(no_run_dir))


@pytest.mark.parametrize("label", [label for label, _ in kuberay_objects()])
@pytest.mark.parametrize("group", ["head", "cpu", "gpu-train"])
@pytest.mark.parametrize("breakage", ["mount dropped", "volume dropped", "other claim", "read-only", "other path"])
def test_kuberay_shared_volume_missing_rejected(label, group, breakage):
    """Every pod template must mount the shared run directory; dropping it from any one group is caught."""
    obj = copy.deepcopy(dict(kuberay_objects())[label])
    cluster = cluster_spec(obj)
    pod = (cluster["headGroupSpec"] if group == "head" else
           next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == group))["template"]["spec"]
    # The YAML anchors make the groups share one list: give this group its own copies first.
    pod["volumes"] = copy.deepcopy(pod["volumes"])
    container = pod["containers"][0]
    container["volumeMounts"] = copy.deepcopy(container["volumeMounts"])
    runs_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == SHARED_MOUNT)
    runs_volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    if breakage == "mount dropped":
        container["volumeMounts"].remove(runs_mount)
    elif breakage == "volume dropped":
        pod["volumes"].remove(runs_volume)
    elif breakage == "other claim":
        runs_volume["persistentVolumeClaim"]["claimName"] = "someone-elses-claim"
    elif breakage == "read-only":
        runs_mount["readOnly"] = True
    else:
        runs_mount["mountPath"] = "/mnt/shared"
    problems = shared_volume_problems(cluster)
    assert problems and all(p.startswith(group) for p in problems), problems


def test_shared_run_dir_claim_is_read_write_many():
    """pvc.yaml holds the one claim every pod template mounts, and pods on many nodes can write it at once."""
    claims = [obj for _, obj in k8s_objects() if obj["kind"] == "PersistentVolumeClaim"]
    assert [c["metadata"]["name"] for c in claims] == [RUNS_CLAIM]
    assert pvc_problems(claims[0]) == []
    once = copy.deepcopy(claims[0])
    once["spec"]["accessModes"] = ["ReadWriteOnce"]
    assert pvc_problems(once)
    # Not in the files whose objects are deleted with a run: `kubectl delete -f rayjob.yaml` must keep the runs.
    for path in KUBERAY_FILES:
        kinds = {doc["kind"] for doc in load_all(path)}
        assert path.name == "pvc.yaml" or "PersistentVolumeClaim" not in kinds, path.name


DEPLOY_TEXTS = (LAUNCHER_FILES + KUBERAY_FILES + [REPO / "jobs" / "runtime_env.yaml"]
                + sorted((REPO / "jobs" / "configs").glob("*.yaml")))


@pytest.mark.parametrize("path", DEPLOY_TEXTS, ids=lambda p: p.name)
def test_no_uri_run_dir_in_commands_or_comments(path):
    """Commands shown in comments are copied by hand: none may pass a URI run_dir, which the recipe cannot write."""
    assert not URI_RUN_DIR.search(path.read_text()), URI_RUN_DIR.search(path.read_text())[0]
    assert URI_RUN_DIR.search("-- python jobs/pipeline.py run_dir=s3://BUCKET/x")  # the pattern does catch one
    assert URI_RUN_DIR.search("run_dir: gs://BUCKET/x")


def test_kuberay_copies_agree():
    """The cluster spec is written out four times and the scheduled job spec twice: they must not drift."""
    objects = dict(kuberay_objects())
    cluster = objects["raycluster.yaml:RayCluster"]["spec"]
    for label, obj in objects.items():
        assert cluster_spec(obj) == cluster, f"{label}: cluster spec differs from raycluster.yaml"
    one_shot = dict(job_spec(objects["rayjob.yaml:RayJob"]), rayClusterSpec=None)
    nightly = dict(job_spec(objects["raycronjob.yaml:RayCronJob"]), rayClusterSpec=None)
    assert nightly == dict(one_shot, entrypoint=one_shot["entrypoint"].replace(".yaml", ".yaml --schedule", 1))
    assert job_spec(objects["cronjob.yaml:dadpo-ray-nightly-rayjob/rayjob.yaml"]) == job_spec(
        objects["raycronjob.yaml:RayCronJob"])
    local_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    remote_env = yaml.safe_load(one_shot["runtimeEnvYAML"])
    assert {k: remote_env[k] for k in ("env_vars", "config")} == {k: local_env[k] for k in ("env_vars", "config")}


def test_kuberay_cluster_autoscales_from_zero():
    spec = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups)
    gpus = sorted(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
                  for g in groups)
    assert 1 in gpus and gpus[-1] >= 8


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_files_hold_no_literal_secrets(path):
    assert not LITERAL_SECRET.search(path.read_text())


# --------------------------------------------------------------------------- the CronJob and its RBAC objects
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("label", [label for label, _ in k8s_objects()])
def test_k8s_object_passes_kubernetes_schema(label, version):
    obj = dict(k8s_objects())[label]
    assert k8s_errors(obj, version) == []
    assert secret_problems(obj) == []
    if obj["kind"] == "CronJob":
        assert cronjob_problems(obj) == []


def test_rbac_allows_the_scheduler_to_create_rayjobs():
    objects = dict(k8s_objects())
    rules = objects["cronjob.yaml:Role"]["rules"]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    pod = objects["cronjob.yaml:CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    binding = objects["cronjob.yaml:RoleBinding"]
    assert binding["roleRef"]["name"] == objects["cronjob.yaml:Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"] == objects[
        "cronjob.yaml:ServiceAccount"]["metadata"]["name"]


def test_cronjob_broken_copies_rejected():
    cronjob = dict(k8s_objects())["cronjob.yaml:CronJob"]
    misspelled = copy.deepcopy(cronjob)
    misspelled["spec"]["concurencyPolicy"] = misspelled["spec"].pop("concurrencyPolicy")
    assert k8s_errors(misspelled, K8S_VERSIONS[-1], strict=True)
    wrong_type = copy.deepcopy(cronjob)
    wrong_type["spec"]["successfulJobsHistoryLimit"] = "3"
    assert k8s_errors(wrong_type, K8S_VERSIONS[-1], strict=False)
    sometimes = copy.deepcopy(cronjob)
    sometimes["spec"]["concurrencyPolicy"] = "Sometimes"
    assert cronjob_problems(sometimes)


@pytest.mark.parametrize(("existing", "statuses", "result", "creates", "succeeds"), [
    ("", "Initializing\nRunning\nComplete", "SUCCEEDED", True, True),
    ("dadpo-ray-nightly-old=Complete\n", "Complete", "FAILED", True, False),
    ("", "Running\nFailed", "FAILED", True, False),
    ("dadpo-ray-nightly-old=Running\n", "", "", False, False),
    ("dadpo-ray-nightly-new=\n", "", "", False, False),
], ids=["succeeds", "ray job fails", "cluster fails", "earlier run going: skip", "earlier run just created: skip"])
def test_cronjob_script_waits_and_never_overlaps(tmp_path, existing, statuses, result, creates, succeeds):
    """The CronJob's shell script against a stand-in kubectl: it skips while a run is going, else creates one
    RayJob, waits for the end and reports the job's own result."""
    cronjob = dict(k8s_objects())["cronjob.yaml:CronJob"]
    script = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    (tmp_path / "statuses").write_text(statuses + "\n")
    (tmp_path / "kubectl").write_text(
        '#!/bin/sh\necho "$*" >> "$FAKE/calls"\ncase "$*" in\n'
        '  "get rayjobs "*) printf "%s" "$FAKE_EXISTING" ;;\n'
        '  create*) echo dadpo-ray-nightly-abcde ;;\n'
        '  *jobDeploymentStatus*) head -n 1 "$FAKE/statuses"; sed -i 1d "$FAKE/statuses" ;;\n'
        '  *jobStatus*) echo "$FAKE_RESULT" ;;\nesac\n')
    (tmp_path / "sleep").write_text("#!/bin/sh\n")
    for stub in ("kubectl", "sleep"):
        (tmp_path / stub).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE=str(tmp_path),
               FAKE_EXISTING=existing, FAKE_RESULT=result)
    run = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=10)
    calls = (tmp_path / "calls").read_text()
    assert ("create -f /manifests/rayjob.yaml" in calls) == creates, calls
    assert (run.returncode == 0) == succeeds, run.stdout + run.stderr


# ------------------------------------------------------------------------------------- jobs/runtime_env.yaml
def test_runtime_env_parses_and_holds_no_secrets(monkeypatch):
    path = REPO / "jobs" / "runtime_env.yaml"
    env = yaml.safe_load(path.read_text())
    monkeypatch.chdir(REPO)  # `pip: requirements.txt` is read relative to where `ray job submit` runs
    parsed = RuntimeEnv(**env)
    assert any(line.startswith("ray[") for line in parsed["pip"]["packages"])  # requirements.txt was read
    assert runtime_env_problems(env) == []
    assert {".venv", "runs", ".git", "__pycache__"} <= set(env["excludes"])
    assert env["working_dir"] == "." and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert not LITERAL_SECRET.search(path.read_text())


@pytest.mark.parametrize("breakage", ["secret env var", "unknown field"])
def test_runtime_env_broken_copy_rejected(breakage):
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    if breakage == "secret env var":
        env["env_vars"]["HF_TOKEN"] = "not-a-real-token"
    else:
        env["env_var"] = {}
    assert runtime_env_problems(env)
