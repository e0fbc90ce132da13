"""The production layout: docker-compose.yml, the Dockerfile, and the broker and
Prometheus configurations it mounts.

``docker-compose`` here means Debian 12's docker-compose 1.29.2, the one the test
command installs. A missing binary FAILS these tests, it never skips them: a
compose file nobody validated is how a production layout rots.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from hub.mqtt import MAX_PACKET_BYTES
from shouhu.settings import Settings, setting_env_names

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

APP_SERVICES = ("migrate", "hub", "router", "api", "gateway")
LONG_RUNNING_APP_SERVICES = ("hub", "router", "api")
MIN_MOSQUITTO = (2, 0, 18)
# The hub's dedup ledger keeps (device_id, msg_id) at least this long (DESIGN.md).
LEDGER_KEEP_HOURS = 7 * 24
# Payloads over this are refused by the hub (dead-lettered), per the MQTT contract.
CONTRACT_MAX_PAYLOAD = 64 * 1024
# Settings whose compose default deliberately differs from the settings default:
# empty means "embedded", and production must point at the compose services.
# The container's API binds every address (DESIGN.md: 0.0.0.0 in the container).
# So must the watch gateway (the watches connect from the mobile network).
COMPOSE_SPECIFIC_DEFAULTS = {"SHOUHU_DATABASE_URL", "SHOUHU_MQTT_URL", "SHOUHU_API_HOST", "SHOUHU_WATCH_HOST"}

MISSING_COMPOSE = (
    "docker-compose is not installed. The test command installs it "
    "(`apt-get update && apt-get install -y docker-compose`, Debian 12's 1.29.2); "
    "run the tests through it, or install it yourself. These tests never skip."
)


# --------------------------------------------------------------------------- helpers


def _docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(MISSING_COMPOSE, pytrace=False)
    return binary


def _run_compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` with nothing from the environment but PATH and HOME.

    ``--env-file`` points at an empty file so that a developer's ``.env`` (which
    docker-compose would read for interpolation) cannot make the test pass.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    return subprocess.run(
        [_docker_compose(), "--env-file", str(env_file), "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """docker-compose.yml as written (YAML anchors and merges resolved by PyYAML)."""
    return _load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml as docker-compose resolves it with an empty environment."""
    env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    env_file.write_text("", encoding="utf-8")
    result = _run_compose(env_file, "config")
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def _services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = doc.get("services")
    assert isinstance(services, dict), "no services in docker-compose.yml"
    return services


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), f"not a command: {value!r}"
    return [str(part) for part in value]


def _dockerfile_instruction(name: str) -> list[str]:
    """Every argument of a Dockerfile instruction (e.g. every EXPOSE line's words)."""
    values = []
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        match = re.match(rf"\s*{name}\s+(.+)", line, flags=re.IGNORECASE)
        if match:
            values.append(match.group(1).strip())
    return values


def _dockerfile_entrypoint() -> list[str]:
    entrypoints = _dockerfile_instruction("ENTRYPOINT")
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    # The last one wins; exec (JSON) form, so signals reach the process.
    parsed = json.loads(entrypoints[-1])
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def _effective_argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: entrypoint (compose's, else the Dockerfile's) + command."""
    entrypoint = service.get("entrypoint")
    head = _dockerfile_entrypoint() if entrypoint is None and "build" in service else _argv(entrypoint)
    return head + _argv(service.get("command"))


def _subcommands(command: Any) -> dict[str, Any] | None:
    """A command group's sub-commands, or None for a leaf command.

    Duck-typed: recent typer releases ship their own copy of click, so its groups
    are not ``click.Group`` instances.
    """
    commands = getattr(command, "commands", None)
    return commands if isinstance(commands, dict) else None


def _resolves_to_cli_command(group: Any, args: list[str]) -> bool:
    """Does ``shouhu <args>`` name a real (sub)command of the typer app?"""
    commands = _subcommands(group)
    if not args or commands is None:
        return False
    command = commands.get(args[0])
    if command is None:
        return False
    rest = args[1:]
    if _subcommands(command) is not None:
        # `shouhu registry` alone only prints help: a service must name a leaf verb.
        return bool(rest) and _resolves_to_cli_command(command, rest)
    return True


def _cli_verbs() -> tuple[Any, set[str]]:
    """The typer app as a command group, and its top-level verbs."""
    from launch.cli import app

    group = typer.main.get_command(app)
    commands = _subcommands(group)
    assert commands is not None, "launch.cli.app has no sub-commands"
    return group, set(commands)


def _env_keys(service: dict[str, Any]) -> set[str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {str(item).split("=", 1)[0] for item in env}
    return {str(key) for key in env}


def _container_port(entry: Any) -> int:
    """The container side of a `ports`/`expose` entry, short or long syntax."""
    if isinstance(entry, dict):
        return int(entry["target"])
    text = str(entry).split("/", 1)[0]
    return int(text.rsplit(":", 1)[-1])


def _service_ports(service: dict[str, Any]) -> set[int]:
    entries = list(service.get("ports") or []) + list(service.get("expose") or [])
    return {_container_port(entry) for entry in entries}


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, short or long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            parts = str(entry).split(":")
            mounts.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    return mounts


def _host_path_of(service: dict[str, Any], container_path: str) -> Path:
    """The host file behind a container path, through the service's bind mounts."""
    target = PurePosixPath(container_path)
    for source, mount_target in _bind_mounts(service):
        if not source.startswith((".", "/")):
            continue  # a named volume, not a file of this repository
        mount = PurePosixPath(mount_target)
        if target == mount or mount in target.parents:
            return (ROOT / source / target.relative_to(mount)).resolve()
    pytest.fail(f"{container_path} is not bind-mounted from the repository")


def _named_volume_target(doc: dict[str, Any], service: dict[str, Any], path: str) -> str:
    """The named volume mounted at `path` (and declared at the top level)."""
    wanted = PurePosixPath(path)
    for source, target in _bind_mounts(service):
        if PurePosixPath(target) == wanted and not source.startswith((".", "/")):
            assert source in (doc.get("volumes") or {}), f"volume {source} is not declared"
            return source
    pytest.fail(f"no named volume is mounted at {path}")


def _service_by_image(services: dict[str, dict[str, Any]], prefix: str) -> dict[str, Any]:
    found = [svc for svc in services.values() if str(svc.get("image", "")).startswith(prefix)]
    assert len(found) == 1, f"expected one service with image {prefix}*, found {len(found)}"
    return found[0]


def _parse_mosquitto_conf(path: Path) -> list[tuple[str, str]]:
    """(option, value) lines in order. A comment is a line whose FIRST character is #."""
    options = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        assert not line.lstrip().startswith("#"), (
            f"{path.name}:{number}: mosquitto only treats # as a comment in column 1"
        )
        key, _, value = line.strip().partition(" ")
        # mosquitto reads "10 # seconds" as the value; a trailing comment breaks it.
        assert "#" not in value, f"{path.name}:{number}: no comments after a value"
        options.append((key, value.strip()))
    return options


def _single(options: list[tuple[str, str]], key: str) -> str:
    values = [value for option, value in options if option == key]
    assert len(values) == 1, f"mosquitto.conf must set {key} exactly once, found {values}"
    return values[0]


def _listener_blocks(options: list[tuple[str, str]]) -> dict[int, dict[str, str]]:
    """Options that follow each `listener PORT [ADDRESS]` line, keyed by port."""
    blocks: dict[int, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for key, value in options:
        if key == "listener":
            port, _, address = value.partition(" ")
            current = {"address": address.strip()}
            blocks[int(port)] = current
        elif current is not None:
            current[key] = value
    return blocks


def _hours(expiration: str) -> int:
    match = re.fullmatch(r"(\d+)([hdwmy])", expiration)
    assert match, f"persistent_client_expiration {expiration!r} is not <n><h|d|w|m|y>"
    per_unit = {"h": 1, "d": 24, "w": 24 * 7, "m": 24 * 30, "y": 24 * 365}
    return int(match.group(1)) * per_unit[match.group(2)]


@pytest.fixture(scope="module")
def mosquitto(raw: dict[str, Any]) -> dict[str, Any]:
    return _service_by_image(_services(raw), "eclipse-mosquitto:")


@pytest.fixture(scope="module")
def mosquitto_conf(mosquitto: dict[str, Any]) -> list[tuple[str, str]]:
    argv = _argv(mosquitto.get("command"))
    in_container = (
        argv[argv.index("-c") + 1] if "-c" in argv else "/mosquitto/config/mosquitto.conf"
    )
    path = _host_path_of(mosquitto, in_container)
    assert path.is_file(), f"the compose file mounts {path}, which does not exist"
    return _parse_mosquitto_conf(path)


# ------------------------------------------------- (a) docker-compose accepts the file


def test_docker_compose_config_passes_with_an_empty_environment(tmp_path: Path) -> None:
    env_file = tmp_path / "empty.env"
    env_file.write_text("", encoding="utf-8")
    result = _run_compose(env_file, "config", "-q")
    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stderr}"
    # `${X}` without a default only warns ("The X variable is not set. Defaulting to a
    # blank string."): every variable must have a default or be set on purpose.
    assert "is not set" not in result.stderr, result.stderr


def test_resolved_settings_of_every_app_service_validate(
    resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = _services(resolved)
    for name in APP_SERVICES:
        for env_name in setting_env_names():
            monkeypatch.delenv(env_name, raising=False)
        environment = services[name].get("environment") or {}
        assert isinstance(environment, dict)
        for key, value in environment.items():
            monkeypatch.setenv(str(key), "" if value is None else str(value))
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert urlsplit(settings.database_url).hostname == "timescaledb", name
        assert urlsplit(settings.mqtt_url).hostname == "mosquitto", name


# ------------------------------------------------------------ (b) commands are CLI verbs


def test_every_shouhu_command_names_a_real_cli_verb(raw: dict[str, Any]) -> None:
    group, verbs = _cli_verbs()
    assert {"up", "hub", "router", "api", "migrate", "registry", "token", "simulate"} <= verbs
    verbs_run = {}
    for name, service in _services(raw).items():
        argv = _effective_argv(service)
        if not argv or argv[0] != "shouhu":
            continue
        assert _resolves_to_cli_command(group, argv[1:]), (
            f"service {name} runs `{shlex.join(argv)}`, which is not a shouhu command"
        )
        verbs_run[name] = argv[1]
    assert verbs_run == {name: name for name in APP_SERVICES}


def test_dockerfile_runs_shouhu_as_an_unprivileged_user() -> None:
    assert _dockerfile_entrypoint() == ["shouhu"]
    assert _dockerfile_instruction("FROM")[0].startswith("python:3.11-slim")
    assert any("pip install" in run and " ." in run for run in _dockerfile_instruction("RUN"))
    users = _dockerfile_instruction("USER")
    assert users, "the Dockerfile never drops root"
    assert users[-1].split(":", 1)[0] not in {"root", "0"}


def test_app_services_wait_for_migrations_and_long_running_ones_are_checked(
    raw: dict[str, Any],
) -> None:
    services = _services(raw)
    for name in APP_SERVICES:
        assert "build" in services[name], f"{name} must build from the Dockerfile"
    assert str(services["migrate"].get("restart", "no")) == "no"
    for name in LONG_RUNNING_APP_SERVICES:
        depends = services[name].get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["hub"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    # The watch gateway needs the broker alone (no database): it waits for it, not for migrations.
    assert services["gateway"]["depends_on"] == {"mosquitto": {"condition": "service_healthy"}}
    for name, service in services.items():
        if name == "migrate":
            continue
        test = (service.get("healthcheck") or {}).get("test")
        assert test, f"long-running service {name} has no health check"
        assert not (service.get("healthcheck") or {}).get("disable", False), name


def test_data_lives_in_named_volumes(raw: dict[str, Any]) -> None:
    services = _services(raw)
    _named_volume_target(raw, _service_by_image(services, "eclipse-mosquitto:"), "/mosquitto/data")
    _named_volume_target(
        raw, _service_by_image(services, "timescale/timescaledb:"), "/var/lib/postgresql/data"
    )
    _named_volume_target(raw, _service_by_image(services, "prom/prometheus:"), "/prometheus")


# ----------------------------------------------------- (c) SHOUHU_* names match settings


def test_every_setting_is_in_the_compose_file_and_nothing_else(raw: dict[str, Any]) -> None:
    known = set(setting_env_names())
    mentioned = set(re.findall(r"\bSHOUHU_[A-Z0-9_]+\b", COMPOSE.read_text(encoding="utf-8")))
    assert mentioned - known == set(), "names that shouhu/settings.py does not read"

    shared = raw.get("x-shouhu-env")
    assert isinstance(shared, dict), "no x-shouhu-env anchor"
    services = _services(raw)
    for name in APP_SERVICES:
        missing = set(shared) - _env_keys(services[name])
        assert not missing, f"{name} does not get x-shouhu-env: {sorted(missing)}"
    # The hub gets every setting; SHOUHU_HUB_ID and SHOUHU_HUB_SHARED are its own, not shared,
    # as SHOUHU_WATCH_GATEWAY_ID is the gateway's.
    assert known - _env_keys(services["hub"]) == {"SHOUHU_WATCH_GATEWAY_ID"}
    assert known - set(shared) <= {"SHOUHU_HUB_ID", "SHOUHU_HUB_SHARED", "SHOUHU_WATCH_GATEWAY_ID"}
    assert "SHOUHU_WATCH_GATEWAY_ID" in _env_keys(services["gateway"])


def test_compose_defaults_match_the_settings_defaults(raw: dict[str, Any]) -> None:
    shared = raw["x-shouhu-env"]
    for key, value in shared.items():
        text = str(value)
        match = re.fullmatch(r"\$\{(\w+)(:?[-?])(.*)\}", text)
        if match:
            assert match.group(1) == key, f"{key} interpolates ${{{match.group(1)}}}"
            # `:?` would make `docker-compose config` fail on a bare checkout.
            assert match.group(2) == ":-", f"{key}: use ${{{key}:-...}}"
            default = match.group(3)
        else:
            assert "$" not in text, f"{key}: {text!r} is not ${{{key}:-default}}"
            default = text
        if key == "SHOUHU_API_HOST":
            assert default == "0.0.0.0", "the container's API must listen beyond loopback"
        if key in COMPOSE_SPECIFIC_DEFAULTS:
            continue
        field = Settings.model_fields[key.removeprefix("SHOUHU_").lower()]
        assert default == str(field.default), f"{key}: compose {default!r} != {field.default!r}"


# --------------------------------------------------------------- (d) broker configuration


def test_mosquitto_image_is_at_least_2_0_18(mosquitto: dict[str, Any]) -> None:
    tag = str(mosquitto["image"]).split(":", 1)[1]
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", tag)
    assert match, f"pin an exact eclipse-mosquitto version, not {tag!r}"
    version = tuple(int(part) for part in match.groups())
    assert version >= MIN_MOSQUITTO, f"eclipse-mosquitto:{tag} is older than 2.0.18"
    assert version[0] == 2, "mosquitto.conf is written for Mosquitto 2.x"


def test_mosquitto_persists_often_to_the_named_volume(
    raw: dict[str, Any], mosquitto: dict[str, Any], mosquitto_conf: list[tuple[str, str]]
) -> None:
    assert _single(mosquitto_conf, "persistence") == "true"
    interval = int(_single(mosquitto_conf, "autosave_interval"))
    # 0 would mean "only on exit"; the default 1800 s loses half an hour on a crash.
    assert 0 < interval <= 60
    # With autosave_on_changes true, autosave_interval is a count, not seconds.
    assert dict(mosquitto_conf).get("autosave_on_changes", "false") == "false"
    location = _single(mosquitto_conf, "persistence_location").rstrip("/")
    _named_volume_target(raw, mosquitto, location)


def test_mosquitto_queues_survive_an_outage(mosquitto_conf: list[tuple[str, str]]) -> None:
    assert int(_single(mosquitto_conf, "max_queued_messages")) >= 100_000
    max_bytes = int(_single(mosquitto_conf, "max_queued_bytes"))
    # 0 is "no limit"; a cap must still hold 100,000 ordinary (~1 KiB) messages.
    assert max_bytes == 0 or max_bytes >= 100_000 * 1024
    assert dict(mosquitto_conf).get("queue_qos0_messages", "false") == "false"
    hours = _hours(_single(mosquitto_conf, "persistent_client_expiration"))
    # >= 1 day (hub sessions), <= the ledger's 7 days (a redelivery is still a duplicate).
    assert 24 <= hours <= LEDGER_KEEP_HOURS
    limit = int(_single(mosquitto_conf, "message_size_limit"))
    # Payloads over 64 KiB must reach the hub to be dead-lettered with a reason (and an
    # oversized SOS paged): a 1 MiB one too, and the hub must accept what the broker passes.
    assert limit == 0 or limit > CONTRACT_MAX_PAYLOAD
    assert limit == 0 or limit > 1024 * 1024 + 1024
    assert limit < MAX_PACKET_BYTES


def test_mosquitto_listeners_authenticate_and_the_health_check_can_connect(
    raw: dict[str, Any], mosquitto: dict[str, Any], mosquitto_conf: list[tuple[str, str]]
) -> None:
    assert mosquitto_conf[0] == ("per_listener_settings", "true"), (
        "per_listener_settings must come first for per-listener authentication"
    )
    blocks = _listener_blocks(mosquitto_conf)
    assert 1883 in blocks, "no listener 1883"
    assert blocks[1883].get("allow_anonymous") == "false"
    assert blocks[1883].get("password_file", "").startswith("/mosquitto/config/")
    for port, block in blocks.items():
        if block.get("allow_anonymous") == "true":
            assert block["address"] == "127.0.0.1", f"anonymous listener {port} is not loopback"
    assert 1883 in _service_ports(mosquitto)

    test = _argv(mosquitto["healthcheck"]["test"])
    port = int(test[test.index("-p") + 1]) if "-p" in test else 1883
    assert port in blocks, f"the health check connects to {port}, which is no listener"
    assert blocks[port].get("allow_anonymous") == "true", "the health check has no credentials"

    mqtt = str(raw["x-shouhu-env"]["SHOUHU_MQTT_URL"])
    default = re.fullmatch(r"\$\{\w+:-(.*)\}", mqtt)
    assert default
    assert urlsplit(default.group(1)).port == 1883


# ------------------------------------------------------------------- (e) ports agree


def test_ports_match_the_settings_defaults(raw: dict[str, Any]) -> None:
    api_port = Settings.model_fields["api_port"].default
    metrics_port = Settings.model_fields["metrics_port"].default
    services = _services(raw)
    assert str(raw["x-shouhu-env"]["SHOUHU_API_PORT"]) == str(api_port)
    assert str(raw["x-shouhu-env"]["SHOUHU_METRICS_PORT"]) == str(metrics_port)
    assert api_port in _service_ports(services["api"])
    for name in ("hub", "router"):
        assert metrics_port in _service_ports(services[name]), name
        assert "/healthz" in " ".join(_argv(services[name]["healthcheck"]["test"]))
    assert "/healthz" in " ".join(_argv(services["api"]["healthcheck"]["test"]))
    watch_port = Settings.model_fields["watch_port"].default
    assert str(raw["x-shouhu-env"]["SHOUHU_WATCH_PORT"]) == str(watch_port)
    assert {watch_port, metrics_port} <= _service_ports(services["gateway"])
    assert "/readyz" in " ".join(_argv(services["gateway"]["healthcheck"]["test"]))

    exposed = " ".join(_dockerfile_instruction("EXPOSE")).split()
    assert {str(api_port), str(metrics_port), str(watch_port)} <= set(exposed)


def test_prometheus_scrapes_every_long_running_process(raw: dict[str, Any]) -> None:
    prometheus = _service_by_image(_services(raw), "prom/prometheus:")
    config = _load_yaml(_host_path_of(prometheus, "/etc/prometheus/prometheus.yml"))
    targets = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
    api_port = Settings.model_fields["api_port"].default
    metrics_port = Settings.model_fields["metrics_port"].default
    assert {f"hub:{metrics_port}", f"router:{metrics_port}", f"gateway:{metrics_port}", f"api:{api_port}"} <= targets
