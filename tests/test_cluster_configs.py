"""The multi-node files (infra/cluster/, infra/container/, docs/multinode.md) against the code they drive.

Static checks, no cluster: YAML loads, the launcher config validates against Ray's bundled schema, every
``python -m MODULE`` is a module of this repository, every ``trainer.main`` / ``pipeline`` /
``teacher-cache`` command parses with the real parser (recipes and overrides resolve), every environment
variable is documented, no literal secrets, GPU groups ask for GPUs, the image installs what
scripts/bootstrap.sh installs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "infra" / "cluster"
DOCKERFILE = ROOT / "infra" / "container" / "Dockerfile"
GUIDE = ROOT / "docs" / "multinode.md"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
YAMLS = sorted(CLUSTER.glob("*.yaml"))

ENV_REF = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)")
SECRETISH = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|PRIVATE_KEY", re.I)


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _walk(node):
    """Every mapping inside ``node`` (depth first)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _joined(text: str) -> str:
    return re.sub(r"\\\n\s*", " ", text)


def _command_lines() -> list[tuple[str, str]]:
    """(source, line) for every line of every config string, the Dockerfile and the guide."""
    out = []
    for path in YAMLS:
        for doc in _docs(path):
            out += [(path.name, line) for s in _strings(doc) for line in s.splitlines()]
    for path in (DOCKERFILE, GUIDE):
        out += [(path.name, line) for line in _joined(path.read_text()).splitlines()]
    return out


def _argv_after(line: str, start: str) -> list[str]:
    """The arguments after ``start`` on ``line``, up to a shell separator or comment."""
    return _args(line.split(start, 1)[1])


def _args(rest: str) -> list[str]:
    """``rest`` split like a shell, up to a separator or comment."""
    rest = re.split(r"\s(?:#|&&|\|\||;|\||&)(?:\s|$)|`", rest)[0]
    return shlex.split(rest)


def _all_gpu_groups():
    """(name, resources) of every GPU worker group in the three cluster configs."""
    groups = []
    for name, node in yaml.safe_load(LAUNCHER.read_text())["available_node_types"].items():
        if name != yaml.safe_load(LAUNCHER.read_text())["head_node_type"]:
            groups.append((f"launcher:{name}", node))
    for path in (RAYCLUSTER, RAYJOB):
        for doc in _docs(path):
            spec = doc.get("spec", {})
            spec = spec.get("rayClusterSpec", spec)
            for g in spec.get("workerGroupSpecs", []):
                groups.append((f"{path.name}:{g['groupName']}", g))
    return groups


def test_files_exist_and_yaml_loads():
    assert {p.name for p in YAMLS} >= {LAUNCHER.name, RAYCLUSTER.name, RAYJOB.name}
    assert DOCKERFILE.is_file() and GUIDE.is_file()
    for path in YAMLS:
        assert _docs(path), f"{path.name} is empty"


def test_launcher_config_matches_rays_schema():
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is CPU only"


def test_kuberay_objects():
    kinds = {(d["apiVersion"], d["kind"]) for p in (RAYCLUSTER, RAYJOB) for d in _docs(p)}
    assert ("ray.io/v1", "RayCluster") in kinds and ("ray.io/v1", "RayJob") in kinds
    cluster = next(d for d in _docs(RAYCLUSTER) if d["kind"] == "RayCluster")
    job = next(d for d in _docs(RAYJOB) if d["kind"] == "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "headGroupSpec" in cluster["spec"] and cluster["spec"]["workerGroupSpecs"]
    configmaps = {d["metadata"]["name"] for d in _docs(RAYCLUSTER) if d["kind"] == "ConfigMap"}
    for pod in (cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]):
        for c in pod["template"]["spec"]["containers"]:
            assert {e["configMapRef"]["name"] for e in c.get("envFrom", [])} <= configmaps
            env = c.get("env", [])
            refs = [e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
            assert {r["key"] for r in refs} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for g in cluster["spec"]["workerGroupSpecs"]:
        spec = g["template"]["spec"]
        shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["name"]: m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert any(mounts.get(v["name"]) == "/dev/shm" for v in shm), f"{g['groupName']}: no in-memory /dev/shm"


def test_gpu_worker_groups_request_gpus():
    groups = _all_gpu_groups()
    assert groups
    for name, g in groups:
        if "resources" in g:  # launcher node type
            assert g["resources"].get("GPU", 0) >= 1, name
            assert g["max_workers"] >= max(g.get("min_workers", 0), 1), name
        else:  # KubeRay worker group
            for c in g["template"]["spec"]["containers"]:
                limits = c["resources"]["limits"]
                assert int(limits.get("nvidia.com/gpu", 0)) >= 1, name
                assert c["resources"]["requests"].get("nvidia.com/gpu") == limits["nvidia.com/gpu"], name
            assert g["maxReplicas"] >= g["replicas"] >= g.get("minReplicas", 0), name


def test_python_modules_exist_in_this_repo():
    tooling = {"venv", "pip"}  # the image's own setup (python3.11 -m venv), not commands of the project
    found = set()
    for source, line in _command_lines():
        for module in re.findall(r"\bpython[0-9.]*\s+-m\s+([A-Za-z_][\w.]*)", line):
            found.add(module)
            if module in tooling:
                continue
            spec = importlib.util.find_spec(module)
            assert spec is not None and spec.origin, f"{source}: python -m {module}: no such module"
            assert Path(spec.origin).resolve().is_relative_to(ROOT), f"{source}: {module} is not this repo's"
    assert "trainer.main" in found


def test_trainer_commands_parse_and_resolve():
    from trainer import recipes
    from trainer.main import _parser, resolve

    names = set(recipes.names())
    known_flags = {s for a in _parser()._actions for s in a.option_strings}
    seen = 0
    for source, line in _command_lines():
        if "-m trainer.main" not in line:
            continue
        argv = _argv_after(line, "-m trainer.main")
        if not argv:  # prose mentioning the module
            continue
        for token in argv:
            if token.startswith("--"):
                assert token.split("=")[0] in known_flags, f"{source}: unknown flag {token} of trainer.main"
        args = _parser().parse_args(argv)
        if args.recipe:
            assert args.recipe in names, f"{source}: unknown recipe {args.recipe}"
            config = resolve(args.recipe, args.overrides)  # every override key exists and validates
            assert config.data.batch_size % config.scaling.num_workers == 0
            if args.storage:
                assert args.storage.startswith("s3://"), f"{source}: checkpoints belong on object storage"
            seen += 1
    assert seen >= 2  # the RayJob and the guide


@pytest.mark.parametrize("tool,module", [("pipeline", "pipeline.cli"), ("teacher-cache", "teacher_cache.cli")])
def test_console_commands_parse(tool, module):
    parser = importlib.import_module(module).build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    seen = 0
    for _source, line in _command_lines():
        m = re.search(rf"(?:^|\s){re.escape(tool)}\s+([a-z][a-z-]*)\b", line)
        if not m or m.group(1) not in subcommands:
            continue  # not a command of this tool (prose, a path)
        parser.parse_args([m.group(1), *_args(line[m.end():])])  # exits (fails) on a bad flag
        seen += 1
    assert seen >= 1, f"no {tool} command found"


def _documented_env() -> set[str]:
    section = GUIDE.read_text().split("## Environment variables", 1)
    assert len(section) == 2, "docs/multinode.md has no '## Environment variables' section"
    return set(re.findall(r"^\|\s*`([A-Z_][A-Z0-9_]*)`", section[1], re.M))


def _referenced_env() -> dict[str, str]:
    refs: dict[str, str] = {}
    for path in YAMLS:
        for doc in _docs(path):
            for s in _strings(doc):
                refs.update({v: path.name for v in ENV_REF.findall(s)})
            for m in _walk(doc):
                if isinstance(m.get("name"), str) and ("value" in m or "valueFrom" in m):
                    refs[m["name"]] = path.name
            if doc.get("kind") == "ConfigMap":
                refs.update({k: path.name for k in doc.get("data", {})})
    docker = _joined(DOCKERFILE.read_text())
    refs.update({v: DOCKERFILE.name for v in ENV_REF.findall(docker)})
    for line in docker.splitlines():
        if line.startswith("ENV "):
            refs.update({v: DOCKERFILE.name for v in re.findall(r"([A-Z_][A-Z0-9_]*)=", line)})
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S):
        refs.update({v: GUIDE.name for v in ENV_REF.findall(block)})
    return refs


def test_every_environment_variable_is_documented():
    documented = _documented_env()
    refs = _referenced_env()
    assert {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "DISTILLERY_STORAGE"} <= set(refs)
    missing = {v: src for v, src in refs.items() if v not in documented}
    assert not missing, f"not in docs/multinode.md's list: {missing}"


def test_no_literal_secrets():
    texts = {p.name: p.read_text() for p in (*YAMLS, DOCKERFILE, GUIDE)}
    for name, text in texts.items():
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{12,}", text), f"{name}: an AWS access key id"
        assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY", text), f"{name}: a private key"
        for m in re.finditer(r"^\s*[\w-]*secret[\w-]*\s*:\s*(\S.*)?$", text, re.I | re.M):
            key = m.group(0).split(":")[0].strip()
            assert key in {"secretKeyRef", "secretRef", "secretName"}, f"{name}: literal {m.group(0).strip()!r}"
        # `export X=...` / `X=...` of a credential must take its value from the environment
        for m in re.finditer(r"\b([A-Z_]*(?:SECRET|TOKEN|PASSWORD|ACCESS_KEY)[A-Z_]*)=(\"?)([^\s\"]*)", text):
            assert m.group(3).startswith("$"), f"{name}: {m.group(1)} set to a literal"
    for path in YAMLS:
        for doc in _docs(path):
            assert doc.get("kind") != "Secret", f"{path.name}: Secret objects are created from the environment"
            for m in _walk(doc):
                is_env = "value" in m or "valueFrom" in m
                if is_env and isinstance(m.get("name"), str) and SECRETISH.search(m["name"]):
                    assert "value" not in m, f"{path.name}: {m['name']} has a literal value"
                    assert "secretKeyRef" in m.get("valueFrom", {}), f"{path.name}: {m['name']} not from a Secret"


def test_dockerfile_matches_bootstrap():
    docker = _joined(DOCKERFILE.read_text())
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pins = re.search(r"pip install -c constraints.txt (torch==\S+ torchvision==\S+)", bootstrap).group(1)
    assert f"pip install -c constraints.txt {pins}" in docker, f"the image must pin {pins} as scripts/bootstrap.sh does"
    assert re.search(r"""pip install -c \S*constraints.txt\s+["']?\S*\[cuda12\]""", docker), \
        "the image must install the cuda12 extra at constraints.txt's versions"
    assert "COPY --chown=ray:ray constraints.txt" in docker, "the image must take the repository's constraints.txt"
    assert docker.index(pins) < docker.index("[cuda12]"), "torch first, then the project (as bootstrap.sh)"
    base = re.search(r"^FROM\s+(\S+)", docker, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-cudnn-runtime-ubuntu22\.04", base), base
    assert "python3.11" in docker
    users = re.findall(r"^USER\s+(\S+)", docker, re.M)
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", docker, re.M), "Ray starts its own processes"
    image = yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]
    assert "distillery" in image
