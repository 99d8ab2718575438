"""What deploy/ runs of branchyard comes from a checkout, never from an index by a name.

The daemon's pod may list every Secret of the cluster (docs/kubernetes.md): whoever could
put code under a name it installs (``pip install branchyard``: the name is not ours on
PyPI) or pulls (an image ``someone/branchyard``) would get that. So no manifest under
deploy/ installs branchyard from an index by its name, and the image it names is one no
registry answers (``registry.invalid/…``: set by whoever deploys it) or pinned by digest;
deploy/Containerfile installs only the wheels it is given (``--no-index``). The manifests
are read as YAML: each pod template's containers, their commands, arguments and env.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OURS = re.compile(r"branchyard(\[[^\]]*\])?\s*([<>=!~;].*)?", re.IGNORECASE)
"""A requirement of the project ``branchyard`` by its name (extras, versions, markers),
not by a URL (``branchyard @ git+https://…@COMMIT``)."""
VALUED = {"-r", "-c", "-i", "-f", "-t", "-e", "--requirement", "--constraint", "--index-url"}
VALUED |= {"--extra-index-url", "--find-links", "--target", "--prefix", "--root", "--python"}
SEPARATORS = {";", "&&", "||", "|", "&"}


def pod_specs(document: Any) -> Iterator[dict[str, Any]]:
    """Every pod spec in a manifest's document: whatever holds ``containers``."""
    if isinstance(document, dict):
        if isinstance(document.get("containers"), list):
            yield document
        for value in document.values():
            yield from pod_specs(value)
    elif isinstance(document, list):
        for value in document:
            yield from pod_specs(value)


def expanded(text: str, env: Mapping[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` of the container's env put in (the rest left as is)."""
    return re.sub(
        r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), text
    )


def commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a shell script, each as its words."""
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        try:
            for word in lexer:
                if word in SEPARATORS:
                    yield words
                    words = []
                else:
                    words.append(word)
        except ValueError:  # not shell (an unbalanced quote): no command there
            continue
        yield words


def installs_by_name(words: list[str]) -> bool:
    """Whether a command has pip (or uv, pipx) install branchyard by its name from an
    index: a requirement ``branchyard…`` without ``--no-index``, as opposed to a wheel, a
    path, or a URL pinned to a commit."""
    programs = [w.rsplit("/", 1)[-1] for w in words]
    if "install" not in programs or not any(
        re.fullmatch(r"pip3?(\.\d+)?|uv|pipx", p) for p in programs[: programs.index("install")]
    ):
        return False
    rest = words[programs.index("install") + 1 :]
    if "--no-index" in rest:
        return False
    named, skip = [], False
    for word in rest:
        if skip:
            skip = False
        elif word in VALUED:
            skip = True
        elif not word.startswith("-"):
            named.append(word)
    by_url = [word == "@" for word in named[1:]] + [False]  # branchyard @ URL, in words
    return any(OURS.fullmatch(word) and not url for word, url in zip(named, by_url, strict=True))


def problems(manifest: str) -> list[str]:
    """What in a manifest installs or pulls branchyard by a name someone could claim."""
    found = []
    for document in yaml.safe_load_all(manifest):
        for spec in pod_specs(document):
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                name = container.get("name", "?")
                env = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
                argv = [str(w) for w in [*container.get("command", []), *container.get("args", [])]]
                scripts = [shlex.join(argv), *argv]
                if any(
                    installs_by_name(words)
                    for script in scripts
                    for words in commands(expanded(script, env))
                ):
                    found.append(f"{name} installs branchyard from an index by its name")
                image = str(container.get("image", ""))
                host = image.split("/", 1)[0] if "/" in image else ""
                if "branchyard" in image and not (host.endswith(".invalid") or "@sha256:" in image):
                    found.append(f"{name} pulls {image} by a name")
    return found


def manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_manifests_to_read() -> None:
    assert [p.name for p in manifests()] == ["branchyard.yaml"]


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_no_manifest_installs_or_pulls_branchyard_by_a_name_someone_could_claim(
    path: Path,
) -> None:
    assert problems(path.read_text()) == []


def test_the_containerfile_installs_only_the_wheels_it_is_given() -> None:
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    run = [line.removeprefix("RUN ") for line in text.splitlines() if line.startswith("RUN ")]
    installs = [words for line in run for words in commands(line) if "install" in words]
    assert installs and all("--no-index" in words for words in installs)
    assert not any(installs_by_name(words) for line in run for words in commands(line))


BEFORE = """
apiVersion: apps/v1
kind: Deployment
spec:
  template:
    spec:
      initContainers:
        - name: install
          image: python:3.11
          command:
            - sh
            - -c
            - |
              set -e
              python -m venv /opt/branchyard
              /opt/branchyard/bin/pip install --no-cache-dir "$BRANCHYARD_PACKAGE"
          env:
            - {name: BRANCHYARD_PACKAGE, value: branchyard==0.1.0}
      containers:
        - {name: direct, image: python:3.11, command: [pip, install, -U, "branchyard[k8s]"]}
        - {name: uv, image: python:3.11, args: [sh, -c, "uv pip install branchyard && true"]}
        - {name: pulled, image: someone/branchyard:0.1.0}
        - {name: hub, image: "branchyard:latest"}
"""
FINE = """
kind: Pod
spec:
  containers:
    - {name: wheels, image: registry.invalid/branchyard:0.1.0,
       command: [pip, install, --no-index, --find-links, /w, branchyard]}
    - {name: file, image: python:3.11,
       command: [pip, install, /w/branchyard-0.1.0-py3-none-any.whl]}
    - {name: pinned, image: python:3.11, command: [sh, -c,
       "pip install 'git+https://example.org/branchyard@3f2c1ab4d5e6f708192a3b4c5d6e7f8091a2b3c4'"]}
    - {name: url, image: python:3.11, command: [sh, -c,
       "pip install branchyard @ git+https://example.org/branchyard@3f2c1ab4d5e6f708192a3b4c5d"]}
    - {name: digest, image: "ghcr.io/x/branchyard@sha256:0123"}
    - {name: other, image: python:3.11, command: [pip, install, branchyard-tools-of-yours]}
"""


def test_the_check_finds_each_way_of_taking_branchyard_by_its_name() -> None:
    """The manifest before this check, and others; none of the fine ones."""
    assert problems(BEFORE) == [
        "install installs branchyard from an index by its name",
        "direct installs branchyard from an index by its name",
        "uv installs branchyard from an index by its name",
        "pulled pulls someone/branchyard:0.1.0 by a name",
        "hub pulls branchyard:latest by a name",
    ]
    assert problems(FINE) == []
