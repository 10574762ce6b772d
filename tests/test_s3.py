"""`run.storage_path: s3://...` against a real S3-protocol server (moto) on loopback: the model to continue comes from
the bucket, checkpoints, metrics and final/ land in it, a re-run resumes from it, and the credentials never show up
in output or Ray's logs."""

import json
import math
import os
import re
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raypt import checkpoint, train

from conftest import S3_SECRET, S3_TRAFFIC

pytestmark = pytest.mark.slow


ROOT = Path(__file__).resolve().parents[1]


def read_s3(uri: str) -> bytes:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def upload(local: Path, uri: str) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@pytest.fixture(scope="module")
def bucket(s3_server, corpus, tiny_pretrained) -> str:
    """The bucket as a recipe expects it: the corpus's TXT shards under corpus/, a (tiny) model to continue, with its
    tokenizer, under models/."""
    upload(corpus, f"s3://{s3_server}/corpus")
    upload(Path(tiny_pretrained), f"s3://{s3_server}/models/tiny")
    return s3_server


def recipe(name: str, bucket: str, tmp_path: Path, *sets: str) -> list[str]:
    """`configs/NAME.yaml` with its bucket made the test's, the 8B model made tiny, and a run of 2-CPU size."""
    text = (ROOT / "configs" / f"{name}.yaml").read_text()
    assert "s3://YOUR-BUCKET/" in text and "model.name_or_path" not in sets
    config = tmp_path / f"{name}.yaml"
    config.write_text(re.sub(r"s3://YOUR-BUCKET/models/Meta-Llama-3\.1-\w+", f"s3://{bucket}/models/tiny", text)
                      .replace("s3://YOUR-BUCKET/", f"s3://{bucket}/"))
    argv = ["--config", str(config)]
    for s in ("data.seq_len=32", "scaling.num_workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=0.5",
              "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.warmup_steps=1",
              "train.log_every=1", "train.sample_tokens=0", "run.report=false", *sets):
        argv += ["--set", s]
    return argv


@pytest.fixture(scope="module")
def refused_run(ray_local, bucket, tmp_path_factory) -> list[dict]:
    """The QLoRA recipe (6 steps, a checkpoint every 3) on a store that refuses every write of rank 1's shard of
    checkpoint 3 (500, past the retries), with run.checkpoint_failed: continue; nothing else is faulted: its losses
    are a fault-free run's. Returns its metrics.jsonl rows. (Before any test's busy CPUs: a fixture of the module.)"""
    argv = recipe("llama3-8b-qlora-cpt", bucket, tmp_path_factory.mktemp("refused"), "run.name=refused",
                  "train.max_steps=6", "train.checkpoint_every=3", "run.max_failures=0", "run.storage_retries=2",
                  "run.checkpoint_failed=continue")
    S3_TRAFFIC.refuse, S3_TRAFFIC.refused = "refused/checkpoint_000003/state/__1_0.distcp", 0
    try:
        assert train.main(argv) == 0
    finally:
        S3_TRAFFIC.refuse = None
    assert S3_TRAFFIC.refused > 0
    return [json.loads(x) for x in read_s3(f"s3://{bucket}/runs/refused/metrics.jsonl").decode().splitlines()]


def test_a_checkpoint_a_rank_cannot_upload_fails_on_every_rank_at_once_and_the_run_goes_on(refused_run, bucket):
    """Both ranks learn at once that rank 1 could not upload checkpoint 3 (rank 0 does not wait at the save's barrier
    until the collective timeout); the failure is logged in one line naming the checkpoint, the rank, the error and the
    tries, the half-written checkpoint is removed, and (run.checkpoint_failed: continue) training goes on and saves
    checkpoint 6. (Stopping instead: `tests/test_loop.py`, on a full disk.)"""
    storage = f"s3://{bucket}/runs/refused"
    [failed] = [r for r in refused_run if "checkpoint_failed" in r]
    assert failed["step"] == 3 and failed["checkpoint_failed"].startswith(
        f"{storage}/checkpoint_000003 could not be written (rank 1: ") and "tried 2 times in" in failed[
        "checkpoint_failed"], failed
    assert [r["step"] for r in refused_run if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert checkpoint.latest(storage) == f"{storage}/checkpoint_000006"
    fs, path = pafs.FileSystem.from_uri(f"{storage}/checkpoint_000003")
    assert fs.get_file_info(path).type == pafs.FileType.NotFound


def test_s3_storage_checkpoints_resume_and_secrets(ray_local, bucket, refused_run, tmp_path, tokenizer_dir,
                                                   monkeypatch, capfd, busy_cpus):
    """The QLoRA recipe (`configs/llama3-8b-qlora-cpt.yaml`) as written, its s3:// corpus, model and storage in the
    test's bucket: the model's own tokenizer (no tokenizer.path), checkpoints, metrics and final/ in the bucket, a
    re-run resumes from it. All of it while the store answers 10 % of requests with 503 SlowDown and resets 2 % of
    connections, every core busy: the retries are counted, and the per-step losses are a fault-free run's (the same
    recipe's in `refused_run`, whose faults are one object's writes)."""
    storage = f"s3://{bucket}/runs"
    argv = recipe("llama3-8b-qlora-cpt", bucket, tmp_path, "run.name=s3run", "train.max_steps=6",
                  "train.checkpoint_every=3", "run.max_failures=0")

    # the first attempt dies after step 4 (no restarts allowed): checkpoint 3 is in the bucket
    monkeypatch.setenv("RAYPT_FAULT", "step:4:0")
    monkeypatch.setenv("RAYPT_FAULT_FILE", str(tmp_path / "fault"))
    S3_TRAFFIC.fail(slowdown=0.10, reset=0.02)
    try:
        with pytest.raises(Exception):
            train.main(argv)
        assert checkpoint.latest(f"{storage}/s3run") == f"{storage}/s3run/checkpoint_000003"
        monkeypatch.delenv("RAYPT_FAULT")

        # the same command again resumes from the bucket and finishes there
        assert train.main(argv) == 0
    finally:
        injected = dict(S3_TRAFFIC.injected)
        S3_TRAFFIC.fail()
    out, err = capfd.readouterr()
    assert "resuming from the latest, checkpoint_000003" in out
    rows = [json.loads(x) for x in read_s3(f"{storage}/s3run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["resumed_from"] for r in rows if "resumed_from" in r] == [f"{storage}/s3run/checkpoint_000003"]
    assert injected["slowdown"] > 20 and injected["reset"] > 2, injected
    assert sum(r.get("storage_retries", 0) for r in rows) > 0, injected  # (the corpus reads and the resume's)
    assert "storage: trying again" in err

    # a run without the kill and without these faults: the same losses step by step
    again = {r["step"]: r["loss"] for r in rows if "loss" in r}  # (step 4, logged twice: its second loss)
    assert [again[s] for s in range(1, 7)] == pytest.approx([r["loss"] for r in refused_run if "loss" in r], rel=1e-5)
    assert checkpoint.problem(f"{storage}/s3run/checkpoint_000006") is None
    local = tmp_path / "final"
    local.mkdir()
    fs, path = pafs.FileSystem.from_uri(f"{storage}/s3run/final")
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    assert AutoModelForCausalLM.from_pretrained(local) is not None
    assert AutoTokenizer.from_pretrained(local).get_vocab() == AutoTokenizer.from_pretrained(
        tokenizer_dir).get_vocab()  # the model's own tokenizer
    assert [r for r in rows if "eval_loss" in r]  # the corpus's eval split, from the bucket

    # the secret key was in every process's environment, and is in no output and no Ray log
    assert S3_SECRET not in out + err
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and S3_SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == S3_SECRET  # (the test really ran with it set)


def test_the_full_fsdp_recipe_trains_from_the_bucket_and_resumes_reading_only_its_shards(ray_local, bucket, tmp_path,
                                                                                         tiny_pretrained):
    """`configs/llama3-8b-full-fsdp.yaml` (FSDP2, a gradient reduce-scatter every micro-batch, asynchronous
    checkpoints) from its bucket: 2 steps, each saved, and the final model in the bucket. Run on to step 3, it
    resumes with each rank fetching its own shards' bytes from the bucket, in a request or two, and nothing else of
    the checkpoint (no copy of it per node), and without reading the base model's weights, which the checkpoint
    replaces (counted by the S3 server)."""
    storage = f"s3://{bucket}/runs"
    argv = recipe("llama3-8b-full-fsdp", bucket, tmp_path, "run.name=fsdp-recipe", "scaling.fsdp_shard_size=null",
                  "train.micro_batch_size=1", "train.checkpoint_every=1")
    assert train.main([*argv, "--set", "train.max_steps=2"]) == 0
    run = f"{storage}/fsdp-recipe"
    rows = [json.loads(x) for x in read_s3(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and [r for r in rows if "eval_loss" in r]
    assert checkpoint.latest(run) == f"{run}/checkpoint_000002"
    assert read_s3(f"{run}/final/config.json")

    upload(Path(tiny_pretrained), f"s3://{bucket}/models/tiny")  # new times: a node's cached copy no longer counts
    S3_TRAFFIC.reset()
    assert train.main([*argv, "--set", "train.max_steps=3"]) == 0
    fs, path = pafs.FileSystem.from_uri(f"{run}/checkpoint_000002/state")
    shards = sum(i.size for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.endswith(".distcp"))
    fetched = S3_TRAFFIC.under(f"{bucket}/runs/fsdp-recipe/checkpoint_000002/state/", ".distcp")
    event = [r for r in (json.loads(x) for x in read_s3(f"{run}/metrics.jsonl").decode().splitlines())
             if "resumed_from" in r][-1]
    files = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.endswith(".distcp")]
    gets = S3_TRAFFIC.requests(f"{bucket}/runs/fsdp-recipe/checkpoint_000002/state/", ".distcp")
    print(f"shards {shards:,} B in {len(files)} files; fetched {fetched:,} B in {gets} GETs; read by the ranks "
          f"{event['restore_bytes']:,} B, the busiest {event['restore_bytes_max']:,} B")
    assert gets <= 2 * len(files)  # each rank: its own file in one read, what all ranks hold alike in one
    assert event["resumed_from"] == f"{run}/checkpoint_000002"
    assert shards <= fetched <= shards * 1.1  # no rank (no node) fetches shards not its own
    assert event["restore_bytes"] == fetched
    assert event["restore_bytes_max"] <= 0.6 * shards  # each of the 2 ranks about its half
    assert S3_TRAFFIC.under(f"{bucket}/models/tiny/", ".safetensors") == 0  # the base's weights: never read


def test_the_70b_recipe_trains_from_the_bucket_split_over_a_tensor_parallel_group(ray_local, bucket, tmp_path):
    """`configs/llama3-70b-fsdp-tp.yaml` with the model made tiny and its 64 workers 2 (one tensor-parallel group
    of 2): the driver checks the model's shapes from its config.json in the bucket, rank 0 reads the pretrained
    weights and every rank keeps its tensor-parallel slices, 2 steps train, the final model lands in the bucket."""
    argv = recipe("llama3-70b-fsdp-tp", bucket, tmp_path, "run.name=tp-recipe", "scaling.tensor_parallel=2",
                  "train.max_steps=2", "train.checkpoint_every=0", "train.eval_every=0", "train.eval_batches=1")
    assert train.main(argv) == 0
    run = f"s3://{bucket}/runs/tp-recipe"
    rows = [json.loads(x) for x in read_s3(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows
                                                                      if "loss" in r)
    assert json.loads(read_s3(f"{run}/final/config.json"))["num_hidden_layers"] == 2


def test_a_model_uploaded_again_to_the_same_uri_is_fetched_again(s3_server, tmp_path, monkeypatch):
    from raypt.model import local_model_dir

    monkeypatch.setenv("RAYPT_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3_server}/models/changing"
    got = []
    for layers in (1, 2):
        src = tmp_path / f"m{layers}"
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(src)
        upload(src, uri)
        got.append(local_model_dir(uri))
        assert local_model_dir(uri) == got[-1]  # cached: the same copy while the files are unchanged
    assert got[0] != got[1]
    assert json.loads(Path(got[1], "config.json").read_text())["num_hidden_layers"] == 2


def test_a_models_uri_without_tokenizer_path_gives_its_tokenizer_and_nothing_else(s3_server, tokenizer_dir, tmp_path,
                                                                                   monkeypatch):
    """model.name_or_path: s3://... and no tokenizer.path: the driver and the data processes load the model's own
    tokenizer from a node-wide copy of the tokenizer files alone (never the weights); a copy of a URI without a
    tokenizer is a clear error."""
    from raypt.config import load_config
    from raypt.tokenizer import encoder_spec, local_tokenizer_dir

    monkeypatch.setenv("RAYPT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model"
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    (src / "model.safetensors").write_bytes(b"\0" * 1000)  # (stands in for the weights)
    uri = f"s3://{s3_server}/models/with-tokenizer"
    upload(src, uri)

    cfg = load_config(None, [f"model.name_or_path={uri}", "data.train_paths=[x]"])
    spec, local = encoder_spec(cfg), encoder_spec(load_config(None, [f"tokenizer.path={tokenizer_dir}",
                                                                       "data.train_paths=[x]"]))
    assert (spec.backend_json, spec.bos_id, spec.eos_id) == (local.backend_json, local.bos_id, local.eos_id)
    copied = Path(local_tokenizer_dir(uri))
    assert "model.safetensors" not in {p.name for p in copied.iterdir()} and (copied / "tokenizer.json").exists()

    fs = pafs.FileSystem.from_uri(uri)[0]
    fs.create_dir(f"{s3_server}/models/weights-only")
    with fs.open_output_stream(f"{s3_server}/models/weights-only/model.safetensors") as f:
        f.write(b"\0")
    with pytest.raises(Exception, match="holds no tokenizer files"):
        local_tokenizer_dir(f"s3://{s3_server}/models/weights-only")


def test_listing_ten_thousand_objects_takes_sizes_from_the_listing(s3_server):
    """One LIST per 1,000 keys, no request per object: 10,000 objects list in well under 10 s. (The objects are put
    straight into the server's store, which saves ~2 minutes of PUTs; the listing goes over HTTP like any client.)"""
    import time

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from raypt.corpus import list_files

    store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for i in range(10_000):
        store.put_object(s3_server, f"many/{i // 1000:02d}/doc_{i:05d}.txt", b"x" * (1 + i % 7) + b"\n")
    t0 = time.perf_counter()
    listing = list_files([f"s3://{s3_server}/many"])
    seconds = time.perf_counter() - t0
    assert len(listing.files) == 10_000 and seconds < 10, seconds
    assert listing.sizes[:8] == [2, 3, 4, 5, 6, 7, 8, 2] and all(m > 0 for m in listing.mtimes[:8])


def test_a_model_uri_is_copied_to_a_node_without_what_from_pretrained_never_reads(s3_server, tiny_pretrained,
                                                                                 tmp_path, monkeypatch):
    """A Hugging Face snapshot in the bucket with its `original/` consolidated checkpoint and a .bin twin of its
    safetensors: a node's copy holds the top-level safetensors, configs and tokenizer alone, and loads."""
    import torch

    from raypt.model import local_model_dir

    snapshot = tmp_path / "snapshot"
    upload(Path(tiny_pretrained), f"s3://{s3_server}/snapshot")
    (snapshot / "original").mkdir(parents=True)
    (snapshot / "original" / "consolidated.00.pth").write_bytes(b"\0" * 4096)
    torch.save({}, snapshot / "pytorch_model.bin")
    upload(snapshot, f"s3://{s3_server}/snapshot")
    monkeypatch.setenv("RAYPT_CACHE", str(tmp_path / "cache"))
    local = Path(local_model_dir(f"s3://{s3_server}/snapshot"))
    copied = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != ".complete")
    assert copied == sorted(p.name for p in Path(tiny_pretrained).iterdir()), copied
    assert AutoModelForCausalLM.from_pretrained(local) is not None


def test_every_read_request_a_faulty_store_fails_is_retried_and_counted(s3_server, corpus, tmp_path):
    """A store that answers 503 SlowDown, 500, resets the connection or stalls, for 40 % of all requests: listing,
    reading (whole files, byte ranges) and copying a directory give what a fault-free store gives, and every fault
    met is one counted retry (reads have no retries of the SDK's own). A store that keeps failing: the request gives
    up after run.storage_retries tries, naming the object; a missing object fails at once, without retries."""
    from collections import Counter

    from raypt import storage
    from raypt.corpus import Segment, iter_documents, list_files
    from raypt.settings import RunConfig

    uri = f"s3://{s3_server}/faulty"
    upload(corpus / "train", uri)
    listing = list_files([uri])
    units = [Segment(f, s * i // 8, s * (i + 1) // 8) for f, s in zip(listing.files, listing.sizes) for i in range(8)]
    units += [Segment(f) for f in listing.files]
    clean = [list(iter_documents(u, "text", Counter())) for u in units]

    before = storage.retries()
    S3_TRAFFIC.fail(slowdown=0.2, error=0.1, reset=0.05, delay=0.05)
    try:
        assert list_files([uri]).files == listing.files
        assert [list(iter_documents(u, "text", Counter())) for u in units] == clean
        copied = storage.node_copy(uri, "faulty-test", key=str(tmp_path))
        faults = dict(S3_TRAFFIC.injected)
    finally:
        S3_TRAFFIC.fail()
    assert sorted(p.name for p in copied.iterdir() if not p.name.startswith(".")) == [
        f.rsplit("/", 1)[1] for f in listing.files]
    assert all(faults.get(fault, 0) > 0 for fault in ("slowdown", "error", "reset", "delay")), faults
    assert storage.retries() - before == sum(n for fault, n in faults.items() if fault != "delay"), faults

    storage.configure(RunConfig(storage_retries=3, storage_retry_s=60))
    S3_TRAFFIC.fail(slowdown=1.0)
    try:
        with pytest.raises(storage.GaveUp, match=r"faulty/shard_00.txt.*HTTP status 503.*\(tried 3 times in"):
            list(iter_documents(listing.files[0], "text", Counter()))
        with pytest.raises(FileNotFoundError):
            S3_TRAFFIC.fail()
            before = storage.retries()
            list(iter_documents(f"{uri}/missing.txt", "text", Counter()))
        assert storage.retries() == before
    finally:
        S3_TRAFFIC.fail()
        storage.configure(RunConfig())
