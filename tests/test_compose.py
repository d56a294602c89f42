"""docker-compose.yml: its topology, and its launcher, worker and dashboard commands run for real.

Images cannot be pulled or built here, so the smoke test does what Compose would do with the file:
interpolate ``${VAR:-default}``, mount the shared checkpoint volume (a temporary directory), and
run each service's command through the image's entrypoint (``tlsearch``, or ``optuna-dashboard``)
against a real local PostgreSQL database instead of the ``postgres`` service.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import cli_env
from pg import REPO, tiny_config

COMPOSE = REPO / "docker-compose.yml"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's ``!reset`` tag (overrides that remove a key)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def _load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}`` and ``${VAR:-default}``, over strings, lists and mappings."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(3) or ""
            return env.get(name) or default

        return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def _entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT, as the program installed in this environment."""
    (line,) = [
        ln for ln in (REPO / "Dockerfile").read_text().splitlines() if ln.startswith("ENTRYPOINT")
    ]
    return json.loads(line.removeprefix("ENTRYPOINT"))


def _argv(service: dict[str, Any]) -> list[str]:
    program, *args = service.get("entrypoint") or _entrypoint()
    installed = Path(sys.executable).with_name(program)
    assert installed.exists(), f"{program} is not installed beside {sys.executable}"
    return [str(installed), *args, *service["command"]]


def _environment(
    service: dict[str, Any], volumes: dict[str, Path], base: dict[str, str]
) -> dict[str, str]:
    env = dict(base)
    for key, value in service.get("environment", {}).items():
        for container_path, host_path in volumes.items():
            value = str(value).replace(container_path, str(host_path))
        env[key] = str(value)
    return env


def test_services_and_their_contract() -> None:
    services = _load(COMPOSE)["services"]
    assert set(services) == {"postgres", "launcher", "dashboard", "worker"}

    pg = services["postgres"]
    assert pg["image"].startswith("postgres:")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])

    launcher, worker, dashboard = services["launcher"], services["worker"], services["dashboard"]
    assert launcher["command"][0] == "create" and launcher["restart"] == "no"
    assert launcher["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["command"][0] == "worker"
    assert worker["depends_on"]["launcher"]["condition"] == "service_completed_successfully"
    assert "deploy" not in worker or "replicas" not in worker["deploy"], "scale with --scale"
    (gpus,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["capabilities"] == ["gpu"] and gpus["driver"] == "nvidia"
    assert dashboard["entrypoint"] == ["optuna-dashboard"]
    assert any(p.endswith(":8080") for p in dashboard["ports"])
    # Shared checkpoints: the launcher pretrains once, every worker finds the file.
    assert (
        "checkpoints:/cache" in launcher["volumes"] and "checkpoints:/cache" in worker["volumes"]
    )
    # No password on a command line or in a URL: it reaches the programs through the environment.
    for service in (launcher, worker, dashboard):
        assert not re.search(r"://[^@/]*:[^@/]*@", " ".join(service["command"]))
        assert "POSTGRES_PASSWORD" in str(service["environment"])


def test_cpu_override_removes_only_the_gpu_reservation() -> None:
    override = _load(REPO / "docker-compose.cpu.yml")["services"]
    assert override["worker"]["deploy"] is None  # !reset
    assert set(override) <= {"launcher", "dashboard", "worker"}


@pytest.mark.slow  # about 40 s: a launcher, two workers and a dashboard process
def test_launcher_workers_and_dashboard_run_as_declared(
    tmp_path: Path,
    pg_url: str,
) -> None:
    services = _interpolate(
        _load(COMPOSE)["services"],
        {
            "TLSEARCH_STORAGE": pg_url,  # instead of the postgres service
            # The tiny study, with its checkpoints where the image puts them ($TLSEARCH_CACHE).
            "TLSEARCH_CONFIG": str(
                tiny_config(
                    tmp_path, "sqlite:///unused.db", n_trials=6, pretrain={"cache_dir": None}
                )
            ),
            "TLSEARCH_STUDY": "compose",
            "TLSEARCH_THREADS": "1",
        },
    )
    volumes = {"/cache": tmp_path / "checkpoints-volume"}
    base = cli_env(tmp_path)

    launcher = subprocess.run(
        _argv(services["launcher"]),
        env=_environment(services["launcher"], volumes, base),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launcher.returncode == 0, launcher.stderr
    workers = [
        subprocess.Popen(
            _argv(services["worker"]),
            env=_environment(services["worker"], volumes, base),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)  # docker compose up --scale worker=2
    ]

    dashboard_service = dict(services["dashboard"])
    port = _free_port()
    dashboard_service["command"] = [
        str(port) if arg == "8080" else arg for arg in dashboard_service["command"]
    ]
    dashboard = subprocess.Popen(
        _argv(dashboard_service),
        env=_environment(dashboard_service, volumes, base),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", seconds=60)
        assert "compose" in json.dumps(studies)
    finally:
        dashboard.terminate()
        dashboard.wait(30)

    study = optuna.load_study(study_name="compose", storage=pg_url)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 6
    # The launcher's checkpoint, on the shared volume, is the one the workers used.
    assert str(volumes["/cache"]) in study.user_attrs["tlsearch_checkpoint"]["path"]
    assert "pretraining it here" not in "".join(outputs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_compose_files_interpolate_cleanly(name: str) -> None:
    """Every ${...} has a default, so `docker compose up` works without a .env file."""
    text = (REPO / name).read_text()
    for m in re.finditer(r"\$\{(\w+)([^}]*)\}", text):
        assert m.group(2).startswith(":-"), f"{m.group(0)} has no default"


def test_cluster_examples_are_valid_commands_and_configs() -> None:
    """The SLURM and Kubernetes examples parse with today's CLI and config schema."""
    import tomllib

    from tlsearch.cli import build_parser
    from tlsearch.config import config_from_dict

    manifest = list(
        yaml.safe_load_all((REPO / "deploy/kubernetes/tlsearch-workers.yaml").read_text())
    )
    config_map, job = manifest
    config_from_dict(tomllib.loads(config_map["data"]["study.toml"]), "study.toml")
    pod = job["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        args = [
            a.replace("$(TLSEARCH_STORAGE)", "postgresql+psycopg://u@h/db")
            for a in container["args"]
        ]
        assert build_parser().parse_args(args).command in {"create", "worker"}

    script = (REPO / "deploy/slurm/tlsearch-workers.sbatch").read_text()
    command = script[script.index("exec tlsearch ") :].replace("\\\n", " ").split("\n")[0]
    args = re.sub(
        r'"\$\{?(\w+)[^"]*"', lambda m: {"SLURM_CPUS_PER_TASK": "4"}.get(m.group(1), "x"), command
    )
    assert build_parser().parse_args(args.split()[2:]).command == "worker"
