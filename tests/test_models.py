"""Registered models: a changed file is refused when loaded, and `verispec models list` never cuts a name.

No real model is needed: a few bytes are registered as "fake-tiny" in a temporary VERISPEC_HOME.
"""

import hashlib
import json
import os

import pytest
from typer.testing import CliRunner

from verispec import load
from verispec.cli import app
from verispec.errors import ModelFileError
from verispec.models import files, registry

DATA = b"GGUF" + bytes(range(256)) * 16


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """'fake-tiny' as `models pull` leaves it: the file, and the stamp that lets later loads skip the hash."""
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    spec = registry.ModelSpec("fake-tiny", "a few bytes", ("fake-part1==1",), ("fake_part1/data",), len(DATA),
                              hashlib.sha256(DATA).hexdigest(), "fake-tiny.gguf", 1)
    monkeypatch.setitem(registry.REGISTRY, spec.name, spec)
    path = registry.model_path(spec)
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)
    # 10 s back, so that the test's own edit gets a new mtime however coarse the filesystem clock is
    past = path.stat().st_mtime_ns - 10**10
    os.utime(path, ns=(past, past))
    assert registry.verify(spec)  # hashed once and stamped, as pull does
    return spec, path


def test_a_stamped_registered_file_resolves_without_hashing_again(fake_model, monkeypatch):
    spec, path = fake_model

    def no_hashing(*args, **kwargs):
        raise AssertionError("resolve hashed a file whose stamp matches")

    monkeypatch.setattr(registry, "sha256_file", no_hashing)
    assert files.resolve(spec.name).path == path


def test_load_refuses_a_registered_file_with_one_byte_changed(fake_model):
    spec, path = fake_model
    with open(path, "r+b") as f:  # same size: only the sha256 can tell
        f.seek(len(DATA) // 2)
        f.write(bytes([DATA[len(DATA) // 2] ^ 0xFF]))
    for _ in range(2):  # a failed check leaves no stamp behind: the second load is refused too
        with pytest.raises(ModelFileError, match=r"fake-tiny fails its sha256 check: run `verispec models pull "
                                                 r"fake-tiny --force`"):
            load(spec.name)


def test_load_refuses_a_truncated_registered_file(fake_model):
    spec, path = fake_model
    with open(path, "r+b") as f:
        f.truncate(len(DATA) - 1)
    with pytest.raises(ModelFileError, match=r"fake-tiny .* has the wrong size .*pull fake-tiny --force"):
        load(spec.name)


NOT_A_TERMINAL = {"TTY_COMPATIBLE": None, "FORCE_COLOR": None}


@pytest.mark.parametrize("env", [
    {"COLUMNS": "40", **NOT_A_TERMINAL},  # piped
    {"COLUMNS": "40", "TTY_COMPATIBLE": "1"},  # a narrow terminal
    {"COLUMNS": "200", "TTY_COMPATIBLE": "1"},  # a wide one: the table
])
def test_models_list_never_cuts_a_name(tmp_path, env):
    result = CliRunner().invoke(app, ["models", "list"], env={"VERISPEC_HOME": str(tmp_path), **env})
    assert result.exit_code == 0, result.output
    assert "qwen2.5-coder-1.5b" in result.output
    assert all(name in result.output for name in registry.REGISTRY)
    assert ("┃" in result.output) == (env["COLUMNS"] == "200")


def test_models_list_json(fake_model, tmp_path):
    spec, path = fake_model
    result = CliRunner().invoke(app, ["models", "list", "--json"], env={"VERISPEC_HOME": str(tmp_path), "COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    models = json.loads(result.output)
    assert [m["name"] for m in models] == list(registry.REGISTRY)
    assert all(set(m) == {"name", "status", "size", "sha256", "description", "path"} for m in models)
    assert models[-1] == {"name": "fake-tiny", "status": "present", "size": len(DATA), "sha256": spec.sha256,
                          "description": "a few bytes", "path": str(path)}
    assert {m["status"] for m in models[:-1]} == {"missing"}
