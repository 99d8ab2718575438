"""The scripts a pod runs (branchyard.runtime.kube.render's FETCH, INSTALL and RUN), run
for real on this machine: the run script as PID 1 of a PID namespace of its own, as in
a container, the install with nothing but Debian's ``python3``, with and without an
install cache, and the fetch of a private repo from a git server that wants its login,
the login in files where its Secret would be mounted. The scripts name ``/workspace``
(the install ``/cache``, the fetch the login's mount); here they are temporary
directories (the same text, the paths replaced)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.services import wheel
from branchyard.manifest import Manifest
from branchyard.runtime import RevisionSpec
from branchyard.runtime.kube import render
from branchyard.runtime.kube.options import KubeOptions
from tests.conftest import ServiceRepo, wait_for
from tests.githttp import GitHttpServer

PYTHON_TERM_DEFAULT = "import time; print('up', flush=True); time.sleep(600)"
PYTHON_TERM_HANDLED = (
    "import signal, sys, time\n"
    "def bye(*_):\n"
    '    print("bye", flush=True)\n'
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    'print("up", flush=True)\n'
    "time.sleep(600)\n"
)


def moved(script: str, workspace: Path) -> str:
    return script.replace(render.WORKSPACE, str(workspace))


class Pid1:
    """``sh -c RUN`` as PID 1 of a new PID namespace (``unshare --pid --fork``): signals
    from outside reach it as the kubelet's reach a container's first process."""

    def __init__(self, command: str, workspace: Path) -> None:
        self.unshare = subprocess.Popen(
            [
                "unshare", "--pid", "--fork", "--kill-child",
                "sh", "-c", moved(render.RUN, workspace), "web", command,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # as a container's first process is (runc's setsid)
        )  # fmt: skip
        assert self.unshare.stdout is not None
        assert self.unshare.stdout.readline() == "up\n"
        self.pid = int(wait_for(self._init, 10, "the namespace's init"))

    def _init(self) -> str:
        children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        return children.read_text().split()[0]

    def terminate(self) -> tuple[int, str]:
        """SIGTERM to the namespace's init, as a pod's stop sends it; its exit status
        and what it wrote after."""
        os.kill(self.pid, signal.SIGTERM)
        out, _ = self.unshare.communicate(timeout=30)  # far beyond a prompt exit
        return self.unshare.returncode, out

    def kill(self) -> None:
        if self.unshare.poll() is None:
            self.unshare.kill()
            self.unshare.communicate()


@pytest.fixture
def started() -> Iterator[list[Pid1]]:
    made: list[Pid1] = []
    try:
        yield made
    finally:
        for one in made:
            one.kill()


@pytest.mark.parametrize(
    ("command", "said"),
    [
        pytest.param(f'python3 -c "{PYTHON_TERM_DEFAULT}"', "", id="python-without-a-handler"),
        pytest.param(f'cd / && python3 -c "{PYTHON_TERM_DEFAULT}"', "", id="a-command-list"),
        pytest.param(f"python3 -c '{PYTHON_TERM_HANDLED}'", "bye\n", id="python-that-handles-it"),
    ],
)
def test_the_run_script_as_pid_1_hands_sigterm_to_its_command_which_ends(
    tmp_path: Path, started: list[Pid1], command: str, said: str
) -> None:
    # PID 1 ignores a signal it has no handler for: run as PID 1 itself (exec), the
    # command ignored the SIGTERM and the pod waited out its grace
    process = Pid1(command, tmp_path)
    started.append(process)
    code, out = process.terminate()
    assert out == said
    assert code == (0 if said else 128 + signal.SIGTERM)


@pytest.mark.parametrize(("command", "code"), [("exit 3", 3), ("true", 0), ("nosuchcommand", 127)])
def test_the_run_script_exits_with_its_commands_status(
    tmp_path: Path, command: str, code: int
) -> None:
    ran = subprocess.run(
        ["unshare", "--pid", "--fork", "sh", "-c", moved(render.RUN, tmp_path), "web", command],
        capture_output=True,
        timeout=30,
        start_new_session=True,
    )
    assert ran.returncode == code


def test_the_run_script_puts_the_venv_first_on_the_path(tmp_path: Path) -> None:
    ran = subprocess.run(
        ["sh", "-c", moved(render.RUN, tmp_path), "web", 'echo "$PATH $VIRTUAL_ENV"'],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    venv = tmp_path / "venv"
    assert ran.stdout == f"{venv}/bin:/usr/bin:/bin {venv}\n"


def test_the_install_script_makes_the_venv_with_python3_where_python_is_missing(
    tmp_path: Path,
) -> None:
    assert not Path("/usr/bin/python").exists()  # Debian's: only python3
    checkout = tmp_path / "src"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = []\n')
    ran = subprocess.run(
        ["sh", "-c", moved(render.INSTALL, tmp_path), "install", "python -c 'print(42)'"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.endswith("$ python -c 'print(42)'\n42\n")
    assert (tmp_path / "venv" / "bin" / "python").exists()


def fetch_for_real(
    command: list[str], workspace: Path, login: Path
) -> subprocess.CompletedProcess[str]:
    """A fetch container's ``command`` (``sh -c FETCH fetch URL SHA``) run here, its
    script's ``/workspace`` moved to ``workspace`` and the login's mount to ``login``,
    with a ``HOME`` of its own in ``workspace`` and git never prompting."""
    shell, flag, script, *arguments = command
    script = script.replace(render.WORKSPACE, str(workspace)).replace(render.LOGIN, str(login))
    home = workspace / "home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [shell, flag, script, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "GIT_TERMINAL_PROMPT": "0"},
    )


def mount_login(directory: Path, username: str, password: str) -> Path:
    """Files as a Secret volume holds them: one a key, read-only."""
    directory.mkdir()
    for key, value in (("username", username), ("password", password)):
        (directory / key).write_text(value)
        (directory / key).chmod(0o440)
    return directory


TOKEN = "t0ken-5e2b7d"


@pytest.mark.parametrize(
    ("server_login", "mounted", "fetched"),
    [
        pytest.param(("deployer", TOKEN), ("deployer", TOKEN), True, id="the-login"),
        pytest.param((TOKEN, ""), (TOKEN, ""), True, id="a-token-as-user"),
        pytest.param(("deployer", TOKEN), ("deployer", "t0ken-wrong"), False, id="a-wrong-one"),
        pytest.param(("deployer", TOKEN), None, False, id="none-mounted"),
        pytest.param(None, None, True, id="a-public-repo"),
    ],
)
def test_the_fetch_script_logs_in_with_the_mounted_login_and_only_with_it(
    tmp_path: Path,
    make_repo: Callable[..., ServiceRepo],
    server_login: tuple[str, str] | None,
    mounted: tuple[str, str] | None,
    fetched: bool,
) -> None:
    app = make_repo("app")
    sha = app.commit({"private.txt": "only for the deployer"}, "second")
    app.push()
    workspace, login = tmp_path / "workspace", tmp_path / "login"
    workspace.mkdir()
    if mounted is not None:
        mount_login(login, *mounted)
    # a helper of the user's own config would be asked first: the fetch asks only its own
    asked = tmp_path / "asked"
    (workspace / "home").mkdir()
    (workspace / "home" / ".gitconfig").write_text(
        f'[credential]\n\thelper = "!f() {{ touch {asked}; }}; f"\n'
    )
    with GitHttpServer(app.origin.parent, credentials=server_login) as server:
        userinfo = ":".join(server_login) if server_login else ""
        url = f"{server.url}/app.git".replace("://", f"://{userinfo}@" if userinfo else "://")
        revision = RevisionSpec("main", "app", 2, url, sha, Manifest(web="python app.py"), {})
        (deployment,) = render.deployments(
            KubeOptions(), revision, *render.env_objects(KubeOptions(), revision)
        )
        assert deployment.spec is not None and deployment.spec.template.spec is not None
        pod: Any = deployment.spec.template.spec
        fetch = pod.initContainers[0]
        assert fetch.command[-2:] == [f"{server.url}/app.git", sha]  # no login in the URL
        ran = fetch_for_real(fetch.command, workspace, login)
    checkout = workspace / "src"
    assert (ran.returncode == 0) is fetched, ran.stderr
    if fetched:
        assert (checkout / "private.txt").read_text() == "only for the deployer"
        assert not (checkout / ".git").exists()  # nor its config, which named the helper
    else:
        assert not (checkout / "private.txt").exists()
    assert TOKEN not in ran.stdout + ran.stderr
    assert server.shown_in_argv == []  # the helper's printf is the shell's own
    assert not asked.exists()
    if server_login is not None:
        assert server.unauthorized > 0  # it asked for the login


class Pods:
    """The cached install (``render.CACHED_INSTALL``) run as one pod after another of a
    service would run it: each in a workspace of its own (an ``emptyDir``), all with one
    cache directory (the service's part of its Namespace's claim), installing a local
    wheel (``tinydep``) from a directory, no index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.cache.mkdir()
        self.wheels = root / "wheels"
        wheel(self.wheels, "1.0")
        self.pods = 0

    def install(self, key: str, *steps: str, path: str = "") -> subprocess.CompletedProcess[str]:
        self.pods += 1
        workspace = self.root / f"pod{self.pods}"
        checkout = workspace / "src"
        checkout.mkdir(parents=True)
        (checkout / "requirements.txt").write_text("tinydep\n")
        paths = {render.WORKSPACE: str(workspace), render.CACHE: str(self.cache)}
        script = re.sub("|".join(paths), lambda found: paths[found[0]], render.CACHED_INSTALL)
        return subprocess.run(
            ["sh", "-c", script, "install", *steps],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=120,
            env={
                "PATH": f"{path}/usr/bin:/bin",
                "HOME": str(workspace),
                "HOSTNAME": f"app-v1-{self.pods}",
                "INSTALL_KEY": key,
                "PIP_NO_INDEX": "1",
                "PIP_FIND_LINKS": str(self.wheels),
            },
        )

    def entries(self) -> list[str]:
        return sorted(path.name for path in self.cache.iterdir())


IMPORTS = "python -c 'import tinydep; print(tinydep.VALUE)'"


def test_the_first_install_of_an_environment_saves_it_and_the_next_pod_copies_it_without_pip(
    tmp_path: Path,
) -> None:
    pods = Pods(tmp_path)
    first = pods.install("k1", IMPORTS, 'touch "$VIRTUAL_ENV/built"')
    assert first.returncode == 0, first.stderr
    assert "Successfully installed tinydep-1.0" in first.stdout
    assert first.stdout.endswith("installed environment k1\n$ " + IMPORTS + "\n1.0\n$ touch "
                                 '"$VIRTUAL_ENV/built"\n')  # fmt: skip
    assert pods.entries() == ["k1"]
    assert (pods.cache / "k1" / ".complete").is_file()
    assert not (pods.cache / "k1" / "venv" / "built").exists()  # saved before the build steps
    for found in pods.wheels.iterdir():
        found.unlink()  # pip, were it called, would find nothing now
    second = pods.install("k1", IMPORTS)
    assert second.returncode == 0, second.stderr
    assert second.stdout == f"reused environment k1\n$ {IMPORTS}\n1.0\n"
    venv = tmp_path / "pod2" / "venv"
    assert (venv / "bin" / "python").exists() and not (venv / "built").exists()


def test_another_key_installs_again_beside_the_first(tmp_path: Path) -> None:
    pods = Pods(tmp_path)
    assert pods.install("k1").returncode == 0
    other = pods.install("k2")
    assert other.returncode == 0, other.stderr
    assert other.stdout.endswith("installed environment k2\n")
    assert pods.entries() == ["k1", "k2"]


@pytest.mark.parametrize(
    "leftover",
    [
        pytest.param({"venv/bin/python": "garbage"}, id="an-entry-without-its-mark"),
        pytest.param({}, id="an-empty-entry"),
    ],
)
def test_an_entry_without_its_mark_is_never_reused_and_a_whole_one_takes_its_place(
    tmp_path: Path, leftover: dict[str, str]
) -> None:
    pods = Pods(tmp_path)
    (pods.cache / "k1").mkdir()
    for path, text in leftover.items():
        (pods.cache / "k1" / path).parent.mkdir(parents=True, exist_ok=True)
        (pods.cache / "k1" / path).write_text(text)
    ran = pods.install("k1", IMPORTS)
    assert ran.returncode == 0, ran.stderr
    assert "installed environment k1\n" in ran.stdout and ran.stdout.endswith("1.0\n")
    assert (pods.cache / "k1" / ".complete").is_file()
    assert (pods.cache / "k1" / "venv" / "bin" / "python").is_symlink()
    assert pods.entries() == ["k1", "k1.partial.app-v1-1.unmarked"]  # aside, gone in an hour
    assert pods.install("k1", IMPORTS).stdout.startswith("reused environment k1\n")


def test_the_cache_keeps_the_environments_used_last_and_drops_stale_copies(
    tmp_path: Path,
) -> None:
    pods = Pods(tmp_path)
    now = time.time()
    for age in range(10):  # old0 the newest, old9 the oldest
        entry = pods.cache / f"old{age}"
        (entry / "venv").mkdir(parents=True)
        (entry / ".complete").touch()
        os.utime(entry / ".complete", (now - 60 * (age + 1),) * 2)
    stale, fresh = pods.cache / "old0.partial.gone-pod", pods.cache / "old1.partial.busy-pod"
    for partial in (stale, fresh):
        partial.mkdir()
        (partial / ".complete").touch()
    os.utime(stale, (now - 2 * 3600,) * 2)
    ran = pods.install("k1")
    assert ran.returncode == 0, ran.stderr
    kept = ["k1", *(f"old{age}" for age in range(render.CACHE_KEEP - 1))]
    assert pods.entries() == sorted([*kept, fresh.name])
    assert render.CACHE_KEEP == 8


def test_a_pod_that_loses_the_race_for_an_entry_drops_its_copy(tmp_path: Path) -> None:
    pods = Pods(tmp_path)
    shim = tmp_path / "shim"
    shim.mkdir()
    winner = pods.cache / "k1"
    (shim / "cp").write_text(  # another pod saves k1 as this one starts saving its copy
        f'#!/bin/sh\ncase "$3" in *.partial.*) mkdir -p {winner}/venv; '
        f'touch {winner}/venv/winner {winner}/.complete;; esac\nexec /bin/cp "$@"\n'
    )
    (shim / "cp").chmod(0o755)
    ran = pods.install("k1", path=f"{shim}:")
    assert ran.returncode == 0, ran.stderr
    assert pods.entries() == ["k1"]
    assert [p.name for p in (winner / "venv").iterdir()] == ["winner"]


def test_an_install_cache_that_cannot_be_written_fails_no_install(tmp_path: Path) -> None:
    pods = Pods(tmp_path)
    pods.cache.rmdir()
    pods.cache.write_text("")  # no directory can be made in it, as in a full volume
    ran = pods.install("k1", IMPORTS)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.endswith(
        "installed environment k1, not saved: the install cache is full or unwritable\n"
        f"$ {IMPORTS}\n1.0\n"
    )


def test_an_entry_that_cannot_be_copied_is_installed_again(tmp_path: Path) -> None:
    pods = Pods(tmp_path)
    (pods.cache / "k1").mkdir()
    (pods.cache / "k1" / ".complete").touch()  # marked, but its venv is gone
    ran = pods.install("k1", IMPORTS)
    assert ran.returncode == 0, ran.stderr
    assert "Successfully installed tinydep-1.0" in ran.stdout
    assert ran.stdout.endswith(f"$ {IMPORTS}\n1.0\n")
