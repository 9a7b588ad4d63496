"""Static checks of docker/: the compose file, the Dockerfiles, the join script and the env example agree
with each other and with the repository.

No container engine is needed. The file is parsed with PyYAML; `docker compose config` (or Debian's
`docker-compose`, which parses without an engine) also runs when one is installed. Flags are checked against
the CLIs they are given to: `ray start` and `mlflow server` through their click commands, tune.py through its
--help.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
JOIN_SCRIPT = "docker/join-cluster.sh"
PROJECT_DOCKERFILE = "docker/Dockerfile"
RAY_SERVICES = ("ray-head", "ray-worker", "tuner")
SECRET_PLACEHOLDER = "change-me"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; "$$" is a literal "$".
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# ---------------------------------------------------------------------------------------------- helpers


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, enough of it for this file: defaults, required values, `$$`."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$$"  # left for the container's shell, as compose does
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if missing and op in ("-", ":-"):
            return arg
        if missing and op in ("?", ":?"):
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return VARIABLE.sub(substitute, text)


def variable_names(text: str) -> set[str]:
    return {m.group("name") for m in VARIABLE.finditer(text) if m.group("name")}


def read_env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def parse_flags(args: list[str]) -> dict[str, str | None]:
    """`--name=value` and `--name value` -> {"--name": "value"}; a bare `--flag` -> {"--flag": None}."""
    flags: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, has_value, value = arg.partition("=")
        if has_value:
            flags[name] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            flags[name] = args[i + 1]
        else:
            flags[name] = None
    return flags


def args_after(argv: list[str], *program: str) -> list[str]:
    """The arguments that follow `program` (e.g. "ray", "start") in argv."""
    n = len(program)
    for i in range(len(argv) - n + 1):
        if tuple(argv[i : i + n]) == program:
            return argv[i + n :]
    raise AssertionError(f"{' '.join(program)!r} not found in {argv}")


def argv(service: dict) -> list[str]:
    """What the container runs: entrypoint then command (both in exec form here)."""
    entrypoint, command = service.get("entrypoint", []), service.get("command", [])
    assert isinstance(entrypoint, list) and isinstance(command, list), "use the exec (list) form"
    return [*entrypoint, *command]


def address(value: str) -> tuple[str, int]:
    """ "ray-head:6379" or "http://mlflow:5000" -> (host, port)."""
    parts = urlsplit(value if "://" in value else f"//{value}")
    assert parts.hostname and parts.port, f"{value!r} names no host:port"
    return parts.hostname, parts.port


def healthcheck_port(service: dict) -> int:
    test = " ".join(service["healthcheck"]["test"])
    match = re.search(r"localhost:(\d+)", test)
    assert match, f"healthcheck {test!r} names no localhost port"
    return int(match.group(1))


def published_ports(service: dict) -> list[tuple[str | None, int, int]]:
    """(host ip, host port, container port) of every published port, short or long syntax."""
    published = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published.append((entry.get("host_ip"), int(entry["published"]), int(entry["target"])))
            continue
        fields = str(entry).split("/")[0].split(":")
        host_ip = fields[0] if len(fields) == 3 else None
        host_port = fields[-2] if len(fields) >= 2 else None  # "5000" alone publishes on a random port
        published.append((host_ip, int(host_port) if host_port else 0, int(fields[-1])))
    return published


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read_only) for every volume in short syntax."""
    table = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        table[target] = (source, mode == ["ro"])
    return table


def join_script_ray_start() -> list[str]:
    text = (REPO / JOIN_SCRIPT).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("ray start")]
    assert len(lines) == 1, f"{JOIN_SCRIPT} should run `ray start` once"
    return shlex.split(lines[0])


def dockerfile_copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (COPY --from=... is skipped)."""
    text = path.read_text().replace("\\\n", " ")
    copies = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY":
            continue
        options = [w for w in words[1:] if w.startswith("--")]
        if any(o.startswith("--from") for o in options):
            continue
        *sources, destination = [w for w in words[1:] if not w.startswith("--")]
        copies.append((sources, destination))
    return copies


def dockerignore_patterns(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.exists():
        return []
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def is_dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether the builder leaves `relative` out of the context: a pattern matches it or a folder above it
    (the last matching pattern wins, and `!pattern` lets a path back in)."""
    parts = PurePosixPath(relative.rstrip("/")).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        forms = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            ignored = not negated
    return ignored


def build_dir(service: dict) -> tuple[Path, Path]:
    """(context, Dockerfile) of a service that builds; compose resolves the Dockerfile in the context."""
    build = service["build"]
    context = (DOCKER / build["context"]).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def repository_paths(args: list[str]) -> list[str]:
    """Arguments and flag values that name a file of the repository (relative paths with a file suffix)."""
    values = [*args, *(v for v in parse_flags(args).values() if v)]
    return sorted({v for v in values if re.fullmatch(r"[\w./-]+\.(py|ya?ml|sh)", v) and not v.startswith("/")})


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


# ---------------------------------------------------------------------------------------------- layout


def test_services_are_ray_mlflow_and_tuner(services):
    assert set(services) == {"ray-head", "ray-worker", "tuner", "mlflow", "postgres"}


def test_build_contexts_and_dockerfiles_exist(services):
    for name, service in services.items():
        if "build" in service:
            context, dockerfile = build_dir(service)
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_every_copy_source_exists_and_is_not_dockerignored(services):
    checked = 0
    for service in services.values():
        if "build" not in service:
            continue
        context, dockerfile = build_dir(service)
        ignore = dockerignore_patterns(context)
        for sources, _ in dockerfile_copies(dockerfile):
            for source in sources:
                assert (context / source).exists(), f"{dockerfile.name}: COPY {source}: not in {context}"
                assert not is_dockerignored(source, ignore), f"{dockerfile.name}: COPY {source} is .dockerignored"
                checked += 1
    assert checked > 0


def test_image_mirrors_the_repository_layout():
    """Every COPY puts a path where it sits in the repository (relative to WORKDIR), so relative paths in the
    compose commands mean the same file in the image as in a checkout."""
    for sources, destination in dockerfile_copies(REPO / PROJECT_DOCKERFILE):
        for source in sources:
            source_dir = PurePosixPath(source).parent if not source.endswith("/") else PurePosixPath(source)
            assert PurePosixPath(destination) == source_dir, f"COPY {source} {destination} moves it"


def test_dockerignore_keeps_bulk_and_secrets_out():
    ignore = dockerignore_patterns(REPO)
    for path in (".git", ".venv", "runs", "data", "docker/.env", "runs/vpsde/best_config.yaml"):
        assert is_dockerignored(path, ignore), f".dockerignore lets {path} into the build context"
    assert not is_dockerignored("docker/.env.example", ignore)


def test_files_named_in_commands_exist_and_are_copied_into_the_image(services):
    copied = [s.rstrip("/") for sources, _ in dockerfile_copies(REPO / PROJECT_DOCKERFILE) for s in sources]
    named = set()
    for name, service in services.items():
        if service.get("build", {}).get("dockerfile") != PROJECT_DOCKERFILE:
            continue
        for path in repository_paths(argv(service)):
            assert (REPO / path).is_file(), f"{name}: {path} does not exist"
            assert any(path == c or path.startswith(c + "/") for c in copied), f"{name}: {path} not COPY'd"
            named.add(path)
    assert {"tune.py", "search_spaces/vpsde.yaml", JOIN_SCRIPT} <= named


# ---------------------------------------------------------------------------------------------- flags


def test_tuner_flags_are_flags_of_tune_py(services):
    if not (REPO / "tune.py").exists():
        pytest.skip("tune.py is not written yet")
    result = subprocess.run(
        [sys.executable, "tune.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    accepted = set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))
    used = parse_flags(args_after(argv(services["tuner"]), "python", "tune.py"))
    assert set(used) <= accepted, f"tune.py does not accept {sorted(set(used) - accepted)}"


def click_options(command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def test_ray_start_flags_are_flags_of_ray_start(services):
    from ray.scripts.scripts import start

    accepted = click_options(start)
    for where, args in [
        ("ray-head", args_after(argv(services["ray-head"]), "ray", "start")),
        ("ray-worker", args_after(argv(services["ray-worker"]), "ray", "start")),
        (JOIN_SCRIPT, args_after(join_script_ray_start(), "ray", "start")),
    ]:
        unknown = set(parse_flags(args)) - accepted
        assert not unknown, f"{where}: ray start does not accept {sorted(unknown)}"


def test_mlflow_server_flags_are_flags_of_mlflow_server(services):
    from mlflow.cli import server

    used = parse_flags(args_after(argv(services["mlflow"]), "mlflow", "server"))
    unknown = set(used) - click_options(server)
    assert not unknown, f"mlflow server does not accept {sorted(unknown)}"


# ---------------------------------------------------------------------------------------------- ports


def test_published_ports_bind_to_loopback_only(services):
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name}: network_mode host bypasses the port rules"
        for host_ip, _, container_port in published_ports(service):
            assert host_ip == "127.0.0.1", f"{name}: port {container_port} published beyond 127.0.0.1"


def test_only_the_dashboard_and_mlflow_are_published(services):
    published = {
        (name, host, container) for name, service in services.items() for _, host, container in published_ports(service)
    }
    assert published == {("ray-head", 8265, 8265), ("mlflow", 5000, 5000)}


def test_ray_addresses_agree(services):
    head = parse_flags(args_after(argv(services["ray-head"]), "ray", "start"))
    assert "--head" in head
    gcs = ("ray-head", int(head["--port"]))
    worker = parse_flags(args_after(argv(services["ray-worker"]), "ray", "start"))
    assert address(worker["--address"]) == gcs
    tuner = services["tuner"]
    assert address(tuner["environment"]["RAY_HEAD_ADDRESS"]) == gcs
    assert address(parse_flags(args_after(argv(tuner), "python", "tune.py"))["--address"]) == gcs
    assert parse_flags(args_after(join_script_ray_start(), "ray", "start"))["--address"].startswith(
        "${RAY_HEAD_ADDRESS"
    ), f"{JOIN_SCRIPT} must join the head named by RAY_HEAD_ADDRESS"


def test_ray_dashboard_port_agrees(services):
    head = services["ray-head"]
    dashboard = int(parse_flags(args_after(argv(head), "ray", "start"))["--dashboard-port"])
    assert dashboard == 8265
    assert [container for _, _, container in published_ports(head)] == [dashboard]
    assert healthcheck_port(head) == dashboard


def test_mlflow_port_agrees(services):
    mlflow = services["mlflow"]
    server = parse_flags(args_after(argv(mlflow), "mlflow", "server"))
    port = int(server["--port"])
    assert port == 5000
    [(_, host_port, container_port)] = published_ports(mlflow)
    assert container_port == port and healthcheck_port(mlflow) == port
    tuner = services["tuner"]
    uri = parse_flags(args_after(argv(tuner), "python", "tune.py"))["--mlflow-uri"]
    assert address(uri) == ("mlflow", port)
    assert tuner["environment"]["MLFLOW_TRACKING_URI"] == uri
    # MLflow refuses Host headers it does not list: the tuner's and the browser's must be there.
    allowed = server["--allowed-hosts"].split(",")
    assert f"mlflow:{port}" in allowed and f"127.0.0.1:{host_port}" in allowed


def test_mlflow_backend_is_the_postgres_service(services, compose_text):
    env = {name: f"value-of-{name}" for name in variable_names(compose_text)}
    resolved = yaml.safe_load(interpolate(compose_text, env))["services"]
    uri = urlsplit(resolved["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"])
    postgres = resolved["postgres"]["environment"]
    assert uri.scheme == "postgresql"
    assert (uri.hostname, uri.port) == ("postgres", 5432)  # the postgres image's port; nothing overrides it
    assert "PGPORT" not in postgres
    assert (uri.username, uri.password, uri.path) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        "/" + postgres["POSTGRES_DB"],
    )
    assert services["postgres"].get("ports") is None


# ---------------------------------------------------------------------------------------------- volumes


def test_named_volumes_are_declared_and_used(compose, services):
    declared = set(compose.get("volumes") or {})
    used = {
        source
        for service in services.values()
        for source, _ in mounts(service).values()
        if not source.startswith((".", "/", "~", "$"))
    }
    assert used == declared


def test_ray_nodes_share_runs_and_data_at_the_same_paths(services):
    for name in RAY_SERVICES:
        table = mounts(services[name])
        assert table.get("/runs") == ("runs", False), f"{name}: /runs is not the shared `runs` volume"
        source, read_only = table.get("/data", (None, None))
        assert source == "../data" and read_only, f"{name}: /data is not ../data mounted read-only"
    tune = parse_flags(args_after(argv(services["tuner"]), "python", "tune.py"))
    assert tune["--storage"] == "/runs" and tune["--data-root"] == "/data"


def test_mlflow_artifacts_land_on_their_volume(services):
    mlflow = services["mlflow"]
    destination = parse_flags(args_after(argv(mlflow), "mlflow", "server"))["--artifacts-destination"]
    assert mounts(mlflow)[destination] == ("mlflow-artifacts", False)


# ---------------------------------------------------------------------------------------------- order, GPUs


def test_healthy_dependencies_have_healthchecks(services):
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}'s missing healthcheck"


def test_only_the_workers_reserve_gpus(services):
    def gpu_devices(service):
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]

    assert gpu_devices(services["ray-worker"])
    assert [name for name, s in services.items() if gpu_devices(s)] == ["ray-worker"]


# ---------------------------------------------------------------------------------------------- secrets


def test_secrets_reach_services_only_through_variables(compose_text):
    env = {name: f"sentinel-{name}" for name in variable_names(compose_text)}
    resolved = yaml.safe_load(interpolate(compose_text, env))["services"]
    for name in RAY_SERVICES:
        assert resolved[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert resolved[name]["environment"]["RAY_AUTH_TOKEN"] == "sentinel-RAY_AUTH_TOKEN"
    assert resolved["postgres"]["environment"]["POSTGRES_PASSWORD"] == "sentinel-POSTGRES_PASSWORD"
    # With every variable empty, nothing secret is left: no literal sits behind a variable's back.
    blank = yaml.safe_load(VARIABLE.sub(lambda m: m.group(0) if m.group(0) == "$$" else "", compose_text))
    for name, service in blank["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value or "")
            if SECRET_NAME.search(key):
                assert value == "", f"{name}: {key} has a literal value"
            if "://" in value:
                assert not urlsplit(value).password, f"{name}: {key} holds a literal password"


def test_no_literal_secret_in_docker_files():
    # A key naming a secret, given a value; `${KEY...}` (a reference, not an assignment) is not one.
    assignment = re.compile(r"(?i)(?<!\{)\b(\w*(?:password|token|secret)\w*)\s*[:=]\s*[\"']?([^\s\"']*)")
    files = [p for p in DOCKER.iterdir() if p.is_file() and p.name != ".env"] + [REPO / ".dockerignore"]
    for path in files:
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue
            for key, value in assignment.findall(line):
                allowed = value.startswith("${") or (path == ENV_EXAMPLE and value == SECRET_PLACEHOLDER)
                assert allowed, f"{path.relative_to(REPO)}: {key} is given a literal value"


def test_env_example_defines_every_variable_with_placeholder_secrets(compose_text):
    example = read_env_file(ENV_EXAMPLE)
    missing = variable_names(compose_text) - set(example)
    assert not missing, f"{ENV_EXAMPLE.name} lacks {sorted(missing)}"
    secrets = {key: value for key, value in example.items() if SECRET_NAME.search(key)}
    assert secrets and all(value == SECRET_PLACEHOLDER for value in secrets.values()), secrets


def test_compose_refuses_to_start_without_credentials(compose_text):
    with pytest.raises(KeyError, match="docker/.env"):
        interpolate(compose_text, {})


def test_dotenv_is_git_ignored():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    result = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert result.returncode == 0, "docker/.env is not git-ignored: add it to .gitignore"


# ---------------------------------------------------------------------------------------------- compose CLI


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) where it works, else Debian's `docker-compose`; None without either."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_compose_config(cli: list[str], env_file: Path) -> subprocess.CompletedProcess:
    # A bare environment, so variables of the shell running the tests cannot stand in for the env file.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_compose_cli_accepts_the_file(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = run_compose_config(cli, ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_compose_config(cli, empty)
    assert result.returncode != 0 and "docker/.env" in result.stderr, result.stderr
