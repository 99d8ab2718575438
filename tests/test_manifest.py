"""Unit tests for the Procfile and branchyard.yaml parsers."""

from __future__ import annotations

import pytest

from branchyard.errors import ManifestError
from branchyard.manifest import DEFAULT_HEALTH_TIMEOUT, Manifest, parse_manifest, parse_procfile

PROCFILE = "web: python app.py\n"


@pytest.mark.parametrize(
    ("text", "entries"),
    [
        pytest.param("web: python app.py\n", {"web": "python app.py"}, id="one-line"),
        pytest.param(
            "# processes\n\n  web:   gunicorn app  \n\n# the worker\nworker: python w.py",
            {"web": "gunicorn app", "worker": "python w.py"},
            id="comments-blanks-and-spaces",
        ),
        pytest.param(
            "web: python -m http.server --bind 127.0.0.1:$PORT",
            {"web": "python -m http.server --bind 127.0.0.1:$PORT"},
            id="colon-inside-the-command",
        ),
        pytest.param(
            "web_2-x:run\r\nclock :tick\r\n",
            {"web_2-x": "run", "clock": "tick"},
            id="dash-underscore-crlf-no-spaces",
        ),
        pytest.param("web: one\nweb: two\n", {"web": "two"}, id="last-duplicate-wins"),
        pytest.param("", {}, id="empty"),
        pytest.param("# only a comment\n\n", {}, id="only-comments"),
    ],
)
def test_a_procfile_maps_process_names_to_commands(text: str, entries: dict[str, str]) -> None:
    assert parse_procfile(text) == entries


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "web python app.py",
            "Procfile line 1 is not `name: command`: 'web python app.py'",
            id="no-colon",
        ),
        pytest.param("\n# c\nweb:", "Procfile line 3 is not `name: command`: 'web:'", id="no-cmd"),
        pytest.param(
            "web: ok\nmy worker: run", "Procfile line 2 is not `name: command`", id="space-in-name"
        ),
        pytest.param(": run", "Procfile line 1 is not `name: command`", id="no-name"),
    ],
)
def test_a_bad_procfile_line_is_reported_with_its_number(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match="^" + message.replace("$", r"\$")) as caught:
        parse_procfile(text)
    assert caught.value.message.startswith(message)


def test_a_long_bad_procfile_line_is_cut_in_the_message() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_procfile("x" * 200)
    assert caught.value.message == f"Procfile line 1 is not `name: command`: {'x' * 60!r}"


def test_a_procfile_alone_is_enough() -> None:
    assert parse_manifest(PROCFILE, None) == Manifest(
        web="python app.py",
        workers=(),
        build=(),
        health_path="/",
        health_timeout=DEFAULT_HEALTH_TIMEOUT,
        env={},
    )
    assert DEFAULT_HEALTH_TIMEOUT == 30.0


def test_workers_are_every_other_process_sorted_by_name() -> None:
    manifest = parse_manifest("zz: z\nweb: w\nclock: c\nmailer: m\n", None)
    assert manifest.web == "w"
    assert manifest.workers == (("clock", "c"), ("mailer", "m"), ("zz", "z"))


@pytest.mark.parametrize(
    ("procfile", "config", "message"),
    [
        pytest.param(
            "worker: python w.py\n",
            None,
            "Procfile has no `web:` line and branchyard.yaml sets no `run:` command",
            id="procfile-without-web",
        ),
        pytest.param(
            "# nothing\n",
            "build: make\n",
            "Procfile has no `web:` line and branchyard.yaml sets no `run:` command",
            id="config-without-run",
        ),
        pytest.param(
            None,
            None,
            "no Procfile and branchyard.yaml sets no `run:` command",
            id="neither-file",
        ),
        pytest.param(
            None,
            "env: {A: b}\n",
            "no Procfile and branchyard.yaml sets no `run:` command",
            id="config-only-without-run",
        ),
    ],
)
def test_a_service_needs_a_web_command(
    procfile: str | None, config: str | None, message: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(procfile, config)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("procfile", "config", "web", "workers"),
    [
        pytest.param(PROCFILE, "run: python other.py", "python other.py", (), id="overrides-web"),
        pytest.param(None, "run: ./serve", "./serve", (), id="no-procfile-needed"),
        pytest.param(
            "worker: w\n", "run: ./serve", "./serve", (("worker", "w"),), id="adds-web-to-workers"
        ),
        pytest.param(PROCFILE, "run: null", "python app.py", (), id="null-run-keeps-procfile"),
    ],
)
def test_run_in_branchyard_yaml_is_the_web_command(
    procfile: str | None, config: str, web: str, workers: tuple[tuple[str, str], ...]
) -> None:
    manifest = parse_manifest(procfile, config)
    assert (manifest.web, manifest.workers) == (web, workers)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param("run: ''", id="empty"),
        pytest.param("run: '   '", id="blank"),
        pytest.param("run: 5", id="number"),
        pytest.param("run: [python, app.py]", id="list"),
    ],
)
def test_run_must_be_a_command(config: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message == "branchyard.yaml: run must be a command"


@pytest.mark.parametrize(
    ("config", "build"),
    [
        pytest.param("build: make", ("make",), id="string"),
        pytest.param("build: [make, make test]", ("make", "make test"), id="list"),
        pytest.param(
            "build:\n  - pip install .\n  - python -m compileall -q .\n", None, id="block"
        ),
        pytest.param("build: []", (), id="empty-list"),
        pytest.param("build:", (), id="null"),
        pytest.param("", (), id="no-config-keys"),
    ],
)
def test_build_is_a_command_or_a_list_of_commands(
    config: str, build: tuple[str, ...] | None
) -> None:
    expected = build if build is not None else ("pip install .", "python -m compileall -q .")
    assert parse_manifest(PROCFILE, config).build == expected


@pytest.mark.parametrize(
    "config",
    [
        pytest.param("build: ''", id="empty-string"),
        pytest.param("build: [make, '']", id="empty-step"),
        pytest.param("build: [make, 3]", id="number-step"),
        pytest.param("build: 3", id="number"),
        pytest.param("build: {make: all}", id="mapping"),
    ],
)
def test_a_bad_build_is_refused(config: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message == (
        "branchyard.yaml: build must be a command or a list of commands"
    )


@pytest.mark.parametrize(
    ("config", "path", "timeout"),
    [
        pytest.param("", "/", 30.0, id="default"),
        pytest.param("health: /healthz", "/healthz", 30.0, id="string"),
        pytest.param("health: {path: /up, timeout: 5}", "/up", 5.0, id="mapping"),
        pytest.param("health: {timeout: 600}", "/", 600.0, id="timeout-only-max"),
        pytest.param("health: {timeout: 1}", "/", 1.0, id="timeout-min"),
        pytest.param("health: {timeout: 2.5}", "/", 2.5, id="float-timeout"),
        pytest.param("health: {path: /}", "/", 30.0, id="path-only"),
        pytest.param("health:", "/", 30.0, id="null"),
    ],
)
def test_health_is_a_path_or_a_mapping(config: str, path: str, timeout: float) -> None:
    manifest = parse_manifest(PROCFILE, config)
    assert (manifest.health_path, manifest.health_timeout) == (path, timeout)
    assert isinstance(manifest.health_timeout, float)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            "health: healthz", "branchyard.yaml: health path must start with /", id="no-slash"
        ),
        pytest.param(
            "health: {path: 5}", "branchyard.yaml: health path must start with /", id="path-number"
        ),
        pytest.param(
            "health: 5", "branchyard.yaml: health must be a path or a mapping", id="number"
        ),
        pytest.param(
            "health: [/a]", "branchyard.yaml: health must be a path or a mapping", id="list"
        ),
        pytest.param(
            "health: {timeout: 0}",
            "branchyard.yaml: health timeout must be more than 0 and at most 600 s",
            id="zero",
        ),
        pytest.param(
            "health: {timeout: -3}",
            "branchyard.yaml: health timeout must be more than 0 and at most 600 s",
            id="negative",
        ),
        pytest.param(
            "health: {timeout: 601}",
            "branchyard.yaml: health timeout must be more than 0 and at most 600 s",
            id="too-long",
        ),
        pytest.param(
            "health: {timeout: '30'}",
            "branchyard.yaml: health timeout must be more than 0 and at most 600 s",
            id="string",
        ),
        pytest.param(
            "health: {timeout: .nan}",
            "branchyard.yaml: health timeout must be more than 0 and at most 600 s",
            id="nan",
        ),
        # YAML 1.1 reads `yes` as True, and bool is an int: today it becomes a 1 s timeout.
        pytest.param(
            "health: {timeout: yes}",
            "branchyard.yaml: health timeout must be more than 0 and at most 600 s",
            id="bool",
        ),
    ],
)
def test_a_bad_health_check_is_refused(config: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("config", "env"),
    [
        pytest.param("env: {GREETING: hello}", {"GREETING": "hello"}, id="string"),
        pytest.param(
            "env:\n  WORKERS: 4\n  RATIO: 0.5\n  NAME: x\n",
            {"WORKERS": "4", "RATIO": "0.5", "NAME": "x"},
            id="numbers-become-strings",
        ),
        pytest.param("env: {_A1: ''}", {"_A1": ""}, id="empty-value"),
        pytest.param("env: {FLAG: 'yes'}", {"FLAG": "yes"}, id="quoted-yes"),
        pytest.param("env:", {}, id="null"),
        pytest.param("env: {}", {}, id="empty"),
    ],
)
def test_env_in_branchyard_yaml_maps_names_to_strings(config: str, env: dict[str, str]) -> None:
    assert parse_manifest(PROCFILE, config).env == env


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            "env: {1X: a}", "branchyard.yaml: '1X' is not a valid variable name", id="digit-first"
        ),
        pytest.param(
            "env: {A-B: a}", "branchyard.yaml: 'A-B' is not a valid variable name", id="dash"
        ),
        pytest.param(
            "env: {'A B': a}", "branchyard.yaml: 'A B' is not a valid variable name", id="space"
        ),
        pytest.param("env: {5: a}", "branchyard.yaml: 5 is not a valid variable name", id="int"),
        pytest.param(
            "env: {DEBUG: true}", "branchyard.yaml: env DEBUG must be a string or a number", id="b"
        ),
        pytest.param(
            "env: {A: null}", "branchyard.yaml: env A must be a string or a number", id="null"
        ),
        pytest.param(
            "env: {A: [1]}", "branchyard.yaml: env A must be a string or a number", id="list"
        ),
        pytest.param(
            "env: {A: {B: c}}", "branchyard.yaml: env A must be a string or a number", id="nested"
        ),
        pytest.param("env: [A=b]", "branchyard.yaml: env must map names to values", id="as-list"),
        pytest.param("env: A=b", "branchyard.yaml: env must map names to values", id="as-string"),
    ],
)
def test_bad_env_in_branchyard_yaml_is_refused(config: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            "ports: [80]\nport: 80\n",
            "branchyard.yaml has unknown keys: port, ports",
            id="two-unknown",
        ),
        pytest.param("Run: x", "branchyard.yaml has unknown keys: Run", id="case-matters"),
        pytest.param("- run: x", "branchyard.yaml must be a mapping, not list", id="a-list"),
        pytest.param("just text", "branchyard.yaml must be a mapping, not str", id="a-string"),
    ],
)
def test_a_branchyard_yaml_of_the_wrong_shape_is_refused(config: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message == message


@pytest.mark.parametrize(
    "config",
    [
        # YAML 1.1 reads the key `on` as True: a GitHub Actions habit.
        pytest.param("on: push", id="bool-key"),
        pytest.param("1: x", id="int-key"),
        pytest.param("null: x\nfoo: y", id="null-and-string-keys"),
    ],
)
def test_unknown_keys_that_are_not_strings_are_refused_too(config: str) -> None:
    with pytest.raises(ManifestError, match=r"^branchyard\.yaml has unknown keys: "):
        parse_manifest(PROCFILE, config)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param("run: [unclosed", id="unclosed-flow"),
        pytest.param("run: a\n  b: c\n d", id="bad-indent"),
        pytest.param("env:\n\t- x", id="tab"),
    ],
)
def test_invalid_yaml_is_reported_on_one_line(config: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message.startswith("branchyard.yaml is not valid YAML: ")
    assert "\n" not in caught.value.message
    assert caught.value.code == "bad_manifest"


def test_everything_together() -> None:
    config = """\
build:
  - python -m compileall -q .
run: python app.py --fast
health:
  path: /healthz
  timeout: 12
env:
  GREETING: hello
  WORKERS: 2
"""
    assert parse_manifest("web: python app.py\nworker: python w.py\n", config) == Manifest(
        web="python app.py --fast",
        workers=(("worker", "python w.py"),),
        build=("python -m compileall -q .",),
        health_path="/healthz",
        health_timeout=12.0,
        env={"GREETING": "hello", "WORKERS": "2"},
    )


def test_a_typo_inside_health_is_refused_not_ignored() -> None:
    with pytest.raises(ManifestError, match="health has unknown keys: pth"):
        parse_manifest("web: x", "health:\n  pth: /ready\n")


@pytest.mark.parametrize(
    ("config", "image"),
    [
        pytest.param("env: {}", None, id="absent"),
        pytest.param("image: null", None, id="null"),
        pytest.param("image: python:3.12-slim", "python:3.12-slim", id="name-and-tag"),
        pytest.param(
            "image: registry.example.com:5000/team/web:v1.2",
            "registry.example.com:5000/team/web:v1.2",
            id="registry-with-port",
        ),
        pytest.param(
            "image: python@sha256:" + "a" * 64, "python@sha256:" + "a" * 64, id="by-digest"
        ),
    ],
)
def test_image_in_branchyard_yaml_names_the_image_to_run_in(config: str, image: str | None) -> None:
    assert parse_manifest(PROCFILE, config).image == image


@pytest.mark.parametrize(
    "config",
    [
        pytest.param("image: ''", id="empty"),
        pytest.param("image: 3", id="number"),
        pytest.param("image: [python]", id="list"),
        pytest.param("image: python 3", id="space"),
        pytest.param("image: --privileged", id="option"),
        pytest.param("image: 'python;rm -rf /'", id="shell"),
    ],
)
def test_image_must_be_an_image_reference(config: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message == (
        "branchyard.yaml: image must be an image reference, like python:3.12"
    )


@pytest.mark.parametrize(
    ("config", "memory"),
    [
        pytest.param("image: null", None, id="unsaid"),
        pytest.param("memory: null", None, id="null"),
        pytest.param("memory: 256Mi", 256 * 1024**2, id="mebibytes"),
        pytest.param("memory: 1Gi", 1024**3, id="gibibytes"),
        pytest.param("memory: 65536Ki", 64 * 1024**2, id="kibibytes"),
        pytest.param("memory: 33554432", 32 * 1024**2, id="bytes"),
        pytest.param("memory: ' 64Mi '", 64 * 1024**2, id="spaces"),
    ],
)
def test_memory_in_branchyard_yaml_is_what_each_box_of_the_service_may_use(
    config: str, memory: int | None
) -> None:
    assert parse_manifest(PROCFILE, config).memory == memory


@pytest.mark.parametrize(
    ("config", "why"),
    [
        pytest.param("memory: 256M", "must be a size like 256Mi", id="decimal-unit"),
        pytest.param("memory: 1.5Gi", "must be a size like 256Mi", id="fraction"),
        pytest.param("memory: -1Gi", "must be a size like 256Mi", id="negative"),
        pytest.param("memory: true", "must be a size like 256Mi", id="boolean"),
        pytest.param("memory: [1Gi]", "must be a size like 256Mi", id="list"),
        pytest.param("memory: ''", "must be a size like 256Mi", id="empty"),
        pytest.param("memory: 1Mi", "must be at least 16Mi", id="too-small"),
        pytest.param("memory: 0", "must be at least 16Mi", id="zero"),
    ],
)
def test_memory_that_is_not_a_size_is_refused_in_one_line(config: str, why: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message.startswith(f"branchyard.yaml: memory {why}")
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("config", "cpu"),
    [
        pytest.param("image: null", None, id="unsaid"),
        pytest.param("cpu: null", None, id="null"),
        pytest.param("cpu: 2", 2.0, id="cores"),
        pytest.param("cpu: 0.5", 0.5, id="a-fraction"),
        pytest.param("cpu: .25", 0.25, id="no-leading-zero"),
        pytest.param("cpu: 500m", 0.5, id="millicores"),
        pytest.param("cpu: 10m", 0.01, id="the-least"),
        pytest.param("cpu: '1.5'", 1.5, id="a-string"),
        pytest.param("cpu: ' 250m '", 0.25, id="spaces"),
    ],
)
def test_cpu_in_branchyard_yaml_is_the_cores_each_box_of_the_service_may_keep_busy(
    config: str, cpu: float | None
) -> None:
    assert parse_manifest(PROCFILE, config).cpu == cpu


@pytest.mark.parametrize(
    ("config", "why"),
    [
        pytest.param("cpu: 1 core", "must be a number of cores like 0.5", id="a-word"),
        pytest.param("cpu: 500M", "must be a number of cores like 0.5", id="mega-not-milli"),
        pytest.param("cpu: 0.5m", "must be a number of cores like 0.5", id="a-fraction-of-milli"),
        pytest.param("cpu: -1", "must be a number of cores like 0.5", id="negative"),
        pytest.param("cpu: true", "must be a number of cores like 0.5", id="boolean"),
        pytest.param("cpu: [1]", "must be a number of cores like 0.5", id="list"),
        pytest.param("cpu: ''", "must be a number of cores like 0.5", id="empty"),
        pytest.param("cpu: 0.0001", "must be a number of cores like 0.5", id="too-precise"),
        pytest.param("cpu: 0", "must be at least 0.01 and at most 1024 cores", id="zero"),
        pytest.param("cpu: 5m", "must be at least 0.01 and at most 1024 cores", id="too-little"),
        pytest.param("cpu: 2048", "must be at least 0.01 and at most 1024 cores", id="too-much"),
    ],
)
def test_cpu_that_is_not_a_number_of_cores_is_refused_in_one_line(config: str, why: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(PROCFILE, config)
    assert caught.value.message.startswith(f"branchyard.yaml: cpu {why}")
    assert "\n" not in caught.value.message
