"""cluster/ files: Ray's own autoscaler validator, KubeRay manifests' required fields, what every node installs,
the paths the configs they run need, and the recipe configs."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from raypt.config import global_batch_size, grad_accum_steps, load_config

ROOT = Path(__file__).parent.parent
AUTOSCALER = sorted(p for p in (ROOT / "cluster").glob("*.yaml") if not p.name.startswith("kuberay"))
KUBERAY = sorted((ROOT / "cluster").glob("kuberay*.yaml"))


@pytest.mark.parametrize("path", AUTOSCALER, ids=lambda p: p.name)
def test_autoscaler_config_passes_rays_validator(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))  # fills the provider's defaults, then checks ray-schema.json
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}  # the head schedules no training
    workers = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert len(workers) >= 2 and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers)
    head_cmd = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd  # dashboard only through SSH port-forwarding
    text = path.read_text().lower()
    for secret in ("aws_secret_access_key", "aws_access_key_id", "private_key", "password"):
        assert secret not in text


# What each machine type carries, from the clouds' machine type tables (GCP's provider has no such lookup).
GCP_CPUS = {"n2-standard-8": 8, "n2-standard-16": 16, "g2-standard-8": 8, "a3-highgpu-8g": 208}


def filled_out(path: Path, monkeypatch) -> dict:
    """The cluster file's node types as the autoscaler sees them: after its provider's own resource fill-out, run
    offline (AWS: against moto's copy of EC2's instance type table; GCP: a pure function)."""
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    kind = config["provider"]["type"]
    if kind == "aws":
        from moto import mock_aws
        from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # (the tests' loopback S3; EC2 here is moto's mock)
        with mock_aws():
            return AWSNodeProvider.fillout_available_node_types_resources(config)["available_node_types"]
    assert kind == "gcp", kind
    from ray.autoscaler._private.gcp.node_provider import GCPNodeProvider

    return GCPNodeProvider.fillout_available_node_types_resources(config)["available_node_types"]


def carried(node_config: dict) -> tuple[int, int]:
    """(CPUs, GPUs) of the instance a node type starts."""
    if "InstanceType" in node_config:
        import gzip
        import json

        import moto.ec2

        table = Path(moto.ec2.__file__).parent / "resources" / "instance_types.json.gz"
        info = json.loads(gzip.decompress(table.read_bytes()))[node_config["InstanceType"]]
        return info["VCpuInfo"]["DefaultVCpus"], sum(g["Count"] for g in (info.get("GpuInfo") or {}).get("Gpus", []))
    gpus = sum(a["acceleratorCount"] for a in node_config.get("guestAccelerators", []))
    return GCP_CPUS[node_config["machineType"]], gpus


@pytest.mark.parametrize("path", AUTOSCALER, ids=lambda p: p.name)
def test_the_autoscaler_sees_the_gpus_of_every_node_type(path, monkeypatch):
    """A job asking for GPUs scales up only node types whose resources, as the autoscaler believes them, have GPUs:
    Ray's AWS provider reads them from EC2, its GCP provider fills in TPUs only (so the GCP file declares them)."""
    raw = yaml.safe_load(path.read_text())
    kinds = set()
    for name, t in filled_out(path, monkeypatch).items():
        cpus, gpus = carried(t["node_config"])
        if name == "head":
            assert t["resources"].get("CPU") == 0 and not t["resources"].get("GPU"), t["resources"]
            continue
        kinds.add("gpu" if gpus else "cpu")
        assert (t["resources"].get("CPU"), t["resources"].get("GPU", 0)) == (cpus, gpus), (name, t["resources"])
        if raw["provider"]["type"] == "gcp":  # declared: the provider adds none
            assert raw["available_node_types"][name]["resources"].get("GPU", 0) == gpus
    assert kinds == {"gpu", "cpu"}  # a CPU type, so that tokenize actors never start a GPU node


def test_cloud_specifics():
    gcp = yaml.safe_load((ROOT / "cluster" / "gcp-gpu.yaml").read_text())
    for name, t in gcp["available_node_types"].items():
        if "guestAccelerators" in t["node_config"]:
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name  # (an object, not a list)
    aws = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    types = aws["available_node_types"]
    assert types["gpu_1x_l40s_spot"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    h100 = types["gpu_8x_h100"]["node_config"]
    efa = h100["NetworkInterfaces"]  # NCCL over EFA on every network card, in a cluster placement group
    assert [i["NetworkCardIndex"] for i in efa] == list(range(32)) and {i["InterfaceType"] for i in efa} == {"efa"}
    assert all(i["SubnetId"] and i["Groups"] for i in efa) and h100["Placement"]["GroupName"]
    head = types[aws["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    workers = {t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in types.items() if n != aws["head_node_type"]}
    assert head not in workers  # the head's profile may launch instances (and pass the workers' role); theirs not
    text = (ROOT / "cluster" / "aws-gpu.yaml").read_text()
    assert all(grant in text for grant in ("ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"))
    assert gcp["available_node_types"]["gpu_1x_l4_spot"]["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
    for config, cloud in ((aws, "aws"), (gcp, "gcp")):
        # the autoscaler (v1) does not pass the reclaim notice on: the worker nodes watch for it themselves, started
        # by the global worker_setup_commands (a node type's own would replace setup_commands, the venv with them)
        assert config["file_mounts"]["~/raypt/reclaim.py"] == "raypt/reclaim.py"
        assert f"~/raypt/venv/bin/python ~/raypt/reclaim.py --cloud {cloud}" in " ".join(config["worker_setup_commands"])
        assert not any("worker_setup_commands" in t for t in config["available_node_types"].values())
    kuberay = next(d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
                   if d["kind"] == "RayJob")
    spot = next(g for g in kuberay["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-spot")
    pod = spot["template"]["spec"]
    assert "raypt/reclaim.py --cloud" in pod["containers"][0]["args"][0] and pod["terminationGracePeriodSeconds"] >= 30


def torch_pin() -> str:
    return re.search(r"^TORCH \?= (torch==\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` a node or image runs: in setup commands, container args, RUN lines."""
    text = path.read_text()
    if path.name == "Dockerfile":
        text = re.sub(r"\\\n", " ", text)
        commands = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    else:
        docs = [d for d in yaml.safe_load_all(text) if d]
        commands = []

        def walk(x):
            if isinstance(x, dict):
                for k, v in x.items():
                    commands.extend(v if k in ("setup_commands", "args") and isinstance(v, list) else [])
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
        walk(docs)
    return [shlex.split(part.split("pip install", 1)[1]) for c in commands for part in re.split(r"&&|\|\||;", c)
            if "pip install" in part]


@pytest.mark.parametrize("path", [*AUTOSCALER, *KUBERAY, ROOT / "cluster" / "Dockerfile"], ids=lambda p: p.name)
def test_nodes_install_the_lock_and_nothing_by_name(path):
    """A node installs torch at the Makefile's pin and the rest from requirements.lock; raypt itself comes with the job
    or the image (this repository, never a name on an index, which anyone could claim)."""
    pin, args = torch_pin(), arg_defaults(path)
    uv = re.search(r"^UV \?= (uv==\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    installs = pip_installs(path)
    for argv in installs:
        names = [args.get(a, a) for i, a in enumerate(argv) if not a.startswith("-")
                 and not (i and argv[i - 1] in ("-r", "--index-url", "-c", "--python"))]
        assert all(n in (pin, uv, ".") for n in names), (path.name, argv)
        if "-r" in argv:
            assert argv[argv.index("-r") + 1].endswith("requirements.lock"), argv
    if path.name.startswith("kuberay"):
        assert not installs  # the image has everything
    else:
        assert any("-r" in a for a in installs) and any(pin in [args.get(x, x) for x in a] for a in installs)


def arg_defaults(path: Path) -> dict:
    """A Dockerfile's `ARG NAME=value` defaults, as "$NAME" -> value."""
    found = re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.M) if path.name == "Dockerfile" else []
    return {f"${name}": value for name, value in found}


def mounted(path: Path) -> set[str]:
    """Where a cluster file puts shared storage on every node: `mount ... DIR` in setup_commands, or the volume
    mounts that the head and every worker group share."""
    raw = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if path in AUTOSCALER:
        return {shlex.split(c)[-1] for c in raw[0]["setup_commands"] if re.search(r"\bmount\b.* -t ", c)}
    spec = next(d["spec"] for d in raw if d["kind"] == "RayJob")["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return set.intersection(*({m["mountPath"] for c in g["template"]["spec"]["containers"] for m in c["volumeMounts"]}
                              for g in groups))


@pytest.mark.parametrize("path", [*AUTOSCALER, *KUBERAY], ids=lambda p: p.name)
def test_every_local_path_a_config_uses_is_mounted_on_every_node(path):
    """The configs a cluster file runs (its `--config` command, with its `--set`s): each absolute local path (run,
    tokenizer, corpus, model) lies under shared storage that the file mounts on every node."""
    text = path.read_text()
    runs = re.findall(r"--config (\S*configs/[\w.-]+\.yaml)((?:\s+--set \S+)*)", text.replace("\\\n", " "))
    assert runs, path.name
    for config, sets in runs:
        cfg = load_config(ROOT / "configs" / Path(config).name, re.findall(r"--set (\S+)", sets))
        paths = [cfg.run.storage_path, cfg.tokenizer.path, cfg.model.name_or_path, *cfg.data.train_paths,
                 *cfg.data.eval_paths]
        local = [p for p in paths if p and p.startswith("/")]
        shared = mounted(path)
        assert all(any(p.startswith(m.rstrip("/") + "/") for m in shared) for p in local), (config, local, shared)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] != "ServiceAccount"]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayCluster")
        assert doc["metadata"]["name"]
        spec = doc["spec"]
        cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
        if doc["kind"] == "RayJob":
            assert spec["shutdownAfterJobFinishes"] is True
            argv = shlex.split(spec["entrypoint"])
            assert argv[:3] == ["python", "-m", "raypt.train"]
            config = argv[argv.index("--config") + 1]
            assert config.startswith("/home/ray/raypt/configs/")  # the image's copy (cluster/Dockerfile)
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            assert load_config(ROOT / "configs" / Path(config).name, sets)  # a config that exists and loads
            assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"  # our command runs
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert head["template"]["spec"]["containers"][0]["image"]
        gpu_groups = [g for g in cluster["workerGroupSpecs"]
                      if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu_groups and all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in gpu_groups)
        assert cluster.get("enableInTreeAutoscaling") is True
        mounts = {m["mountPath"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/mnt/shared" in mounts  # shared storage for checkpoints


def test_qlora_recipe():
    cfg = load_config(ROOT / "configs" / "llama3-8b-qlora-cpt.yaml")
    m = cfg.model
    assert (m.quantize, m.lora, m.lora_r, m.lora_alpha, m.lora_dropout) == ("nf4", True, 8, 16, 0.05)
    assert m.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert m.gradient_checkpointing and cfg.data.seq_len == 2048
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers > 1


def test_scratch_recipe():
    cfg = load_config(ROOT / "configs" / "llama-1b-scratch.yaml")
    from raypt.model import scratch_config

    arch = scratch_config(cfg.model, vocab_size=32000, seq_len=cfg.data.seq_len)
    assert (arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size, arch.num_key_value_heads) == \
        (16, 2048, 8192, 8)
    assert cfg.scaling.use_gpu and cfg.tokenizer.vocab_size


def test_fsdp_recipe():
    cfg = load_config(ROOT / "configs" / "llama3-8b-full-fsdp.yaml")
    assert cfg.scaling.strategy == "fsdp" and not cfg.model.lora and cfg.scaling.num_workers >= 8


@pytest.mark.parametrize("name", ["llama3-8b-qlora-cpt", "llama-1b-scratch", "llama3-8b-full-fsdp",
                                  "llama3-70b-fsdp-tp"])
def test_recipe_step_budget_matches_tokens(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    tokens_per_step = global_batch_size(cfg) * cfg.data.seq_len
    assert cfg.train.max_steps == -(-cfg.train.max_tokens // tokens_per_step)
    assert grad_accum_steps(cfg) >= 1
