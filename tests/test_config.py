from pathlib import Path

import pytest

from raypt.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    assert CONFIGS, "configs/ has no YAML file"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.train_paths or all(src.paths for src in cfg.data.sources)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_overrides_are_parsed_as_yaml(tmp_path):
    p = write(tmp_path, "data:\n  train_paths: [a]\n")
    cfg = load_config(p, ["data.seq_len=128", "data.eval_paths=[x, y]", "tokenizer.add_bos=false", "run.name=r1"])
    assert cfg.data.seq_len == 128
    assert cfg.data.eval_paths == ["x", "y"]
    assert cfg.tokenizer.add_bos is False
    assert cfg.run.name == "r1"


def test_sources_are_checked_each_by_its_index(tmp_path):
    p = write(tmp_path, "data:\n  sources:\n    - {name: news, paths: [a], weight: 0.7}\n"
                        "    - {name: web, paths: b, format: jsonl}\n")
    cfg = load_config(p)
    assert [(s.name, s.paths, s.weight, s.format) for s in cfg.data.sources] == [
        ("news", ["a"], 0.7, None), ("web", ["b"], 1.0, "jsonl")]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.sources=[{name: a, paths: [x], weight: 0}, {name: a, paths: [], wight: 1}, 3]",
                           "data.train_paths=[z]"])
    msg = str(e.value)
    for part in ("unknown key data.sources[1].wight", "data.sources[2] must be a mapping",
                 "data.sources replaces data.train_paths", "data.sources[1].name 'a' is used twice",
                 "data.sources[0].weight must be > 0", "data.sources[1].paths is empty"):
        assert part in msg, part


def test_a_single_path_is_a_list_of_one(tmp_path):
    assert load_config(None, ["data.train_paths=corpus/"]).data.train_paths == ["corpus/"]


def test_unknown_keys_list_the_valid_ones(tmp_path):
    p = write(tmp_path, "data:\n  train_paths: [a]\n  seqlen: 5\nmodle: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown key data.seqlen" in msg and "seq_len" in msg
    assert "unknown key modle" in msg and "model" in msg


def test_all_problems_are_reported_at_once(tmp_path):
    p = write(tmp_path, "data:\n  train_paths: [a]\n  seq_len: many\n  format: csv\nscaling:\n  use_gpu: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.max_steps=x", "run.preemption_check_s=-1"])
    assert len(e.value.problems) == 5
    msg = str(e.value)
    assert "run.preemption_check_s must be >= 0 (0: never), got -1" in msg
    for key in ("data.seq_len", "data.format", "scaling.use_gpu", "train.max_steps"):
        assert key in msg


@pytest.mark.parametrize("seq_len", [1, 0, -3])
def test_seq_len_below_two_is_a_config_error(seq_len):
    with pytest.raises(ConfigError, match="seq_len must be at least 2"):
        load_config(None, ["data.train_paths=[a]", f"data.seq_len={seq_len}"])


def test_missing_train_paths_and_bad_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["nonsense"])
    assert "section.key=value" in str(e.value)
    assert "train_paths is empty" in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["data.train_paths=[a, b]", "data.seq_len=64"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_fsdp_needs_gpus_and_qlora_needs_lora():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train_paths=[a]", "scaling.strategy=fsdp", "model.quantize=nf4"])
    msg = str(e.value)
    assert "fsdp cannot shard model.quantize" in msg and "set model.lora: true" in msg and "pretrained model.name_or_path" in msg


def test_global_batch_must_split_into_micro_batches():
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size x scaling.num_workers = 8"):
        load_config(None, ["data.train_paths=[a]", "train.global_batch_size=12", "train.micro_batch_size=4"])
    cfg = load_config(None, ["data.train_paths=[a]", "data.seq_len=128", "train.global_batch_tokens=4096",
                             "train.micro_batch_size=4"])
    from raypt.config import global_batch_size, grad_accum_steps

    assert global_batch_size(cfg) == 32 and grad_accum_steps(cfg) == 4


def test_tensor_parallel_is_checked_against_the_rest_of_the_config():
    """What scaling.tensor_parallel cannot work with, all reported at once; the global batch splits over the
    data-parallel ranks (workers / tensor_parallel), and so do the accumulation steps."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train_paths=[a]", "scaling.tensor_parallel=2", "scaling.num_workers=3",
                           "data.seq_len=33", "model.loss=hf", "model.name_or_path=/m", "model.lora=true"])
    msg = str(e.value)
    for says in ("set scaling.strategy: fsdp", "cannot shard LoRA models", "set model.loss: chunked",
                 "data.seq_len 33 must be a multiple of scaling.tensor_parallel 2",
                 "scaling.num_workers 3 must be a multiple of scaling.tensor_parallel 2"):
        assert says in msg, (says, msg)
    with pytest.raises(ConfigError, match="needs a fixed scaling.num_workers"):
        load_config(None, ["data.train_paths=[a]", "scaling.strategy=fsdp", "scaling.tensor_parallel=2",
                           "scaling.num_workers=[2, 4]"])
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(None, ["data.train_paths=[a]", "scaling.tensor_parallel=0"])
    with pytest.raises(ConfigError, match=r"x 2 data-parallel ranks \(scaling.num_workers / scaling.tensor_parallel\) = 8"):
        load_config(None, ["data.train_paths=[a]", "scaling.strategy=fsdp", "scaling.tensor_parallel=2",
                           "scaling.num_workers=4", "train.global_batch_size=12", "train.micro_batch_size=4"])
    from raypt.config import grad_accum_steps

    cfg = load_config(None, ["data.train_paths=[a]", "scaling.strategy=fsdp", "scaling.tensor_parallel=2",
                             "scaling.num_workers=4", "train.global_batch_size=16", "train.micro_batch_size=4"])
    assert grad_accum_steps(cfg) == 2  # 16 sequences over 2 data-parallel ranks, 4 at a time


def test_an_elastic_range_needs_a_global_batch_every_size_can_cut():
    """Any size in [min, max] may run: each must give every worker the same number of non-empty micro-batches."""
    from raypt.config import grad_accum_steps

    cfg = load_config(None, ["data.train_paths=[a]", "scaling.num_workers=[1, 4]", "train.global_batch_size=8",
                             "train.micro_batch_size=2"])
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers, cfg.scaling.elastic) == (1, 4, True)
    assert [grad_accum_steps(cfg, w) for w in (1, 2, 3, 4)] == [4, 2, 2, 1]  # 3 workers: 3+3+2 rows, 2 micro-batches
    with pytest.raises(ConfigError) as e:  # 7 rows over 6 workers: 2+1+1+..., two micro-batches of 1 leave one empty
        load_config(None, ["data.train_paths=[a]", "scaling.num_workers=[6, 7]", "train.global_batch_size=7",
                           "train.micro_batch_size=1"])
    assert "for each size in scaling.num_workers [6, 7]; sizes that work: [7]" in str(e.value)
    for bad in ("[0, 2]", "[3, 2]", "[2]"):
        with pytest.raises(ConfigError, match="must be a count >= 1 or \\[min, max\\]"):
            load_config(None, ["data.train_paths=[a]", f"scaling.num_workers={bad}"])
    with pytest.raises(ConfigError, match="fsdp_shard_size needs a fixed scaling.num_workers"):
        load_config(None, ["data.train_paths=[a]", "scaling.num_workers=[2, 4]", "train.global_batch_size=8",
                           "scaling.strategy=fsdp", "scaling.fsdp_shard_size=2"])


@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLE:wJalrSECRET@bucket/runs",
                                 "s3://bucket/runs?access_key=AKIAEXAMPLE&secret_key=wJalrSECRET",
                                 "gs://bucket/runs?token=wJalrSECRET"])
def test_credentials_in_a_uri_are_refused_without_echoing_them(uri):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train_paths=[a]", f"run.storage_path={uri}"])
    assert "run.storage_path carries credentials" in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)
    assert "wJalrSECRET" not in str(e.value)


def test_plain_uris_pass():
    cfg = load_config(None, ["data.train_paths=[s3://bucket/corpus/*.txt]", "run.storage_path=s3://bucket/runs",
                             "model.name_or_path=gs://models/llama?versionId=3"])
    assert cfg.run.storage_path == "s3://bucket/runs"
