"""cluster/ files: Ray's own autoscaler validator, KubeRay manifests' required fields, and the recipe configs."""

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
GCP_CPUS = {"n2-standard-8": 8, "g2-standard-8": 8, "a3-highgpu-8g": 208}


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
    for name, t in filled_out(path, monkeypatch).items():
        cpus, gpus = carried(t["node_config"])
        if name == "head":
            assert t["resources"].get("CPU") == 0 and not t["resources"].get("GPU"), t["resources"]
            continue
        assert gpus > 0, name
        assert (t["resources"].get("CPU"), t["resources"].get("GPU")) == (cpus, gpus), (name, t["resources"])
        if raw["provider"]["type"] == "gcp":
            assert raw["available_node_types"][name]["resources"]["GPU"] == gpus  # declared: the provider adds none


def test_cloud_specifics():
    gcp = yaml.safe_load((ROOT / "cluster" / "gcp-gpu.yaml").read_text())
    for name, t in gcp["available_node_types"].items():
        if "guestAccelerators" in t["node_config"]:
            assert {"onHostMaintenance": "TERMINATE"} in t["node_config"]["scheduling"], name
    aws = (ROOT / "cluster" / "aws-gpu.yaml").read_text()
    assert "MarketType: spot" in aws  # the spot variant is documented


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
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
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            assert load_config(ROOT / config, sets)  # the entrypoint names a config that exists and loads
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


@pytest.mark.parametrize("name", ["llama3-8b-qlora-cpt", "llama-1b-scratch", "llama3-8b-full-fsdp"])
def test_recipe_step_budget_matches_tokens(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    tokens_per_step = global_batch_size(cfg) * cfg.data.seq_len
    assert cfg.train.max_steps == -(-cfg.train.max_tokens // tokens_per_step)
    assert grad_accum_steps(cfg) >= 1
