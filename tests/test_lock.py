"""The install is reproducible: requirements.lock pins every package pyproject.toml asks for, within its range."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return {canonicalize_name(n): v for n, v in (line.split("==") for line in lines if re.match(r"[A-Za-z0-9]", line))}


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in reqs if canonicalize_name(r.name) != "raypt"]


def test_the_lock_pins_every_requirement_within_its_range():
    locked = pins()
    reqs = requirements()
    assert len(reqs) > 20
    for r in reqs:
        name = canonicalize_name(r.name)
        if name == "torch":  # (the Makefile's TORCH pins it, so a GPU machine can take the CUDA build)
            assert name not in locked
            continue
        assert name in locked, f"{r.name} is not in requirements.lock: run `make lock`"
        assert r.specifier.contains(locked[name], prereleases=True), f"{r.name}=={locked[name]} is not {r}"


def test_the_makefiles_torch_is_in_range_and_the_lock_holds_no_cuda_library():
    torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert torch, "the Makefile pins torch (TORCH ?= torch==X)"
    wanted = next(r for r in requirements() if r.name == "torch")
    assert wanted.specifier.contains(torch.group(1))
    # a lock resolved against the CUDA build of torch would install its libraries on every CPU machine
    assert not [n for n in pins() if n.startswith(("nvidia-", "triton", "cuda-"))]
