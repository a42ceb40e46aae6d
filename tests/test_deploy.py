"""The deployment files: docker-compose.yml validates (Debian's docker-compose, no Docker engine needed),
its services run the right commands, and secrets come only from the environment."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")


def _config(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "POSTGRES_PASSWORD", "CHIME_API_KEY")}
    return subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "--project-directory", str(ROOT), "config"],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (make compose-check installs Debian's)")
def test_compose_file_validates_and_wires_the_services() -> None:
    done = _config({"DISCORD_TOKEN": "token-x", "POSTGRES_PASSWORD": "pw-y"})
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    services = cfg["services"]
    assert set(services) == {"db", "migrate", "bot", "api", "retrain"}
    assert services["bot"]["command"] == ["discord"] and services["api"]["command"][0] == "serve"
    assert services["retrain"]["command"][:2] == ["retrain", "--every"]
    assert services["db"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert services["bot"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert "postgresql://chime:pw-y@db:5432/chime" == services["bot"]["environment"]["DATABASE_URL"]
    assert services["bot"]["environment"]["DISCORD_TOKEN"] == "token-x"
    assert "db-data" in cfg["volumes"]


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (make compose-check installs Debian's)")
def test_compose_refuses_to_start_without_the_secrets() -> None:
    done = _config({})
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr + done.stdout


def test_no_secret_values_in_the_repository_files() -> None:
    example = (ROOT / ".env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert values["DISCORD_TOKEN"] == "" and "DISCORD_TOKEN" in (ROOT / "docker-compose.yml").read_text()
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()  # never baked into the image
