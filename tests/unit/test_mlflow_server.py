"""The pins of the MLflow test server (``hack/localcluster/mlflow_server.py``); the server itself
runs in ``tests/integration/test_mlflow_tracking_s3.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster import mlflow_server


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not name.startswith("#"):
            out[name.lower().replace("_", "-")] = version
    return out


def test_the_server_venv_is_fully_pinned_at_the_versions_env_version():
    version = mlflow_server.version()
    server = pins(mlflow_server.SERVER_CONSTRAINTS)
    assert server["mlflow"] == server["mlflow-skinny"] == server["mlflow-tracing"] == version
    assert {"sqlalchemy", "alembic", "flask", "uvicorn"} <= set(server), "the server's own dependencies are pinned"
    mlflow_server.check_pins()  # same major version as the trainer's client


def test_the_trainer_client_pin_is_read_from_constraints(tmp_path):
    assert mlflow_server.skinny_pin() == pins(mlflow_server.CONSTRAINTS)["mlflow-skinny"]
    other = tmp_path / "constraints.txt"
    other.write_text("# x\nmlflow_skinny==2.22.0\n")
    assert mlflow_server.skinny_pin(other) == "2.22.0"
    other.write_text("torch==2.11.0\n")
    assert mlflow_server.skinny_pin(other) is None


@pytest.mark.parametrize("xdg", ["/var/cache/ci", None])
def test_the_venv_lives_in_the_cache_outside_the_clone(monkeypatch, xdg):
    if xdg:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        expected = Path(xdg) / "qlora-operator" / "mlflow-9.9.9"
    else:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        expected = Path.home() / ".cache" / "qlora-operator" / "mlflow-9.9.9"
    assert mlflow_server.venv_dir("9.9.9") == expected
    assert mlflow_server.REPO not in expected.parents
