"""The scripts a pod runs (branchyard.runtime.kube.render's FETCH, INSTALL and RUN), run
for real on this machine: the run script as PID 1 of a PID namespace of its own, as in
a container, and the install with nothing but Debian's ``python3``. The scripts name
``/workspace``; here it is a temporary directory (the same text, the path replaced)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchyard.runtime.kube import render
from tests.conftest import wait_for

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
