"""How the bubblewrap command line of a box is built (pure; the hostile probe in
test_sandbox_probe.py shows what the box holds for real)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from branchyard.runtime.sandbox import (
    BOX_USER,
    MARK,
    NOTHING,
    PRLIMIT,
    SETPRIV,
    TMP_SIZE,
    Box,
    Sandbox,
    system_binds,
)

SYSTEM = ("--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin")
AS_ROOT = Sandbox("/usr/bin/bwrap", SYSTEM, (Path("/usr"),), BOX_USER)
AS_USER = Sandbox("/usr/bin/bwrap", SYSTEM, (Path("/usr"),), None)
SERVICE = Box(
    (Path("/srv/home/builds/main/app/v1-abc1234"), Path("/srv/home/venvs/0123")),
    (Path("/srv/home/scratch/main/app/v1"),),
    home=Path("/srv/home/scratch/main/app/v1"),
)


def after(command: list[str], option: str, count: int = 1) -> list[tuple[str, ...]]:
    """The ``count`` arguments after each occurrence of ``option``."""
    return [tuple(command[i + 1 : i + 1 + count]) for i, arg in enumerate(command) if arg == option]


def command(sandbox: Sandbox = AS_ROOT, box: Box = SERVICE) -> list[str]:
    return sandbox.command(["/bin/sh", "-c", "python app.py"], Path("/srv/x"), box, 7)


@pytest.mark.parametrize(
    "flag",
    [
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
    ],
)
def test_every_box_has_its_own_namespaces_and_dies_with_its_parent(flag: str) -> None:
    for sandbox in (AS_ROOT, AS_USER):
        options = command(sandbox)[: command(sandbox).index("--")]
        assert flag in options


def test_the_box_reports_its_init_on_the_info_fd_and_runs_the_command_last() -> None:
    built = command()
    assert built[0] == "/usr/bin/bwrap"
    assert after(built, "--info-fd") == [("7",)]
    assert built[-3:] == ["/bin/sh", "-c", "python app.py"]
    assert after(built, "--chdir") == [("/srv/x",)]


def test_the_system_is_read_only_and_tmp_proc_and_dev_are_the_boxs_own() -> None:
    built = command()
    assert built[1 : built.index("--proc")].count("/usr") == 2
    assert after(built, "--proc") == [("/proc",)]
    assert after(built, "--dev") == [("/dev",)]
    tmpfs = built.index("--tmpfs")
    assert built[tmpfs - 4 : tmpfs + 2] == [
        "--perms",
        "1777",
        "--size",
        str(TMP_SIZE),
        "--tmpfs",
        "/tmp",
    ]
    assert "--bind" not in built[: built.index("--proc")]


def test_the_checkout_and_environment_are_read_only_and_only_the_scratch_area_writable() -> None:
    built = command()
    assert after(built, "--ro-bind", 2)[-2:] == [
        ("/srv/home/builds/main/app/v1-abc1234", "/srv/home/builds/main/app/v1-abc1234"),
        ("/srv/home/venvs/0123", "/srv/home/venvs/0123"),
    ]
    assert after(built, "--bind", 2) == [
        ("/srv/home/scratch/main/app/v1", "/srv/home/scratch/main/app/v1")
    ]
    assert after(built, "--setenv", 2) == [
        ("HOME", "/srv/home/scratch/main/app/v1"),
        ("TMPDIR", "/tmp"),
    ]
    assert after(built, "--unsetenv") == [(MARK,)]


def test_bwrap_carries_the_mark_of_its_home_and_the_box_does_not() -> None:
    boxed = replace(AS_ROOT, owner="/srv/home")
    assert boxed.environment({"PATH": "/usr/bin"}) == {"PATH": "/usr/bin", MARK: "/srv/home"}
    assert (MARK,) in after(command(boxed), "--unsetenv")


def test_the_parents_of_what_is_bound_are_made_reachable_outermost_first() -> None:
    built = command()
    made = [d for (d,) in after(built, "--dir")]
    assert made == [
        "/srv",
        "/srv/home",
        "/srv/home/builds",
        "/srv/home/venvs",
        "/srv/home/scratch",
        "/srv/home/builds/main",
        "/srv/home/scratch/main",
        "/srv/home/builds/main/app",
        "/srv/home/scratch/main/app",
    ]
    assert all(p == ("0755",) for p in after(built, "--perms")[1:])
    assert built.index("--dir") > built.index("--tmpfs")
    assert built.index("--dir") < built.index("--ro-bind", built.index("--tmpfs"))


def test_nothing_is_made_inside_a_read_only_system_mount_nor_for_an_empty_box() -> None:
    box = Box((Path("/usr/lib/python3.11"),))
    assert after(command(box=box), "--dir") == []
    assert after(command(box=NOTHING), "--dir") == []


def test_a_box_under_tmp_keeps_its_tmp_writable_by_all() -> None:
    box = Box((), (Path("/tmp/pytest/home/scratch"),))
    assert after(command(box=box), "--dir") == [
        ("/tmp/pytest",),
        ("/tmp/pytest/home",),
    ]


def test_as_root_the_box_drops_to_nobody_without_capabilities_under_limits() -> None:
    built = command(AS_ROOT)
    end = built.index("--")
    assert "--unshare-user" not in built
    assert after(built[:end], "--cap-add") == [("CAP_SETUID",), ("CAP_SETGID",)]
    assert built[end + 1 : end + 5] == [PRLIMIT, "--nofile=4096", "--nproc=4096", "--core=0"]
    assert built[end + 5 : -3] == [
        SETPRIV,
        f"--reuid={BOX_USER}",
        f"--regid={BOX_USER}",
        "--clear-groups",
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
    ]


def test_where_a_cgroup_counts_processes_the_box_has_no_shared_process_rlimit() -> None:
    built = command(replace(AS_ROOT, rlimits=(("nofile", 4096), ("core", 0))))
    end = built.index("--")
    assert built[end + 1 : end + 4] == [PRLIMIT, "--nofile=4096", "--core=0"]
    assert not [arg for arg in built if arg.startswith("--nproc")]


def test_as_another_user_the_box_is_a_user_namespace_of_that_user() -> None:
    built = command(AS_USER)
    end = built.index("--")
    assert "--unshare-user" in built[:end]
    assert "--cap-add" not in built
    assert SETPRIV not in built
    assert built[end + 1 :] == [
        PRLIMIT,
        "--nofile=4096",
        "--nproc=4096",
        "--core=0",
        "/bin/sh",
        "-c",
        "python app.py",
    ]


@pytest.mark.parametrize(
    ("layout", "prefix", "expected", "made"),
    [
        (
            {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64"},
            "/usr",
            [
                ("--symlink", "usr/bin", "/bin"),
                ("--symlink", "usr/lib", "/lib"),
                ("--symlink", "usr/lib64", "/lib64"),
            ],
            [],
        ),
        (
            {"bin": None, "lib": None},
            "/opt/python/3.11",
            [
                ("--ro-bind", "/bin", "/bin"),
                ("--ro-bind", "/lib", "/lib"),
                ("--ro-bind", "/opt/python/3.11", "/opt/python/3.11"),
            ],
            [("/opt",), ("/opt/python",)],
        ),
    ],
    ids=["merged-usr", "split-usr-and-own-python"],
)
def test_the_system_binds_follow_the_machine(
    tmp_path: Path,
    layout: dict[str, str | None],
    prefix: str,
    expected: list[tuple[str, ...]],
    made: list[tuple[str, ...]],
) -> None:
    for name, target in layout.items():
        if target is None:
            (tmp_path / name).mkdir()
        else:
            os.symlink(target, tmp_path / name)
    args, paths = system_binds(tmp_path, Path(prefix))
    binds = ("--ro-bind", "--ro-bind-try", "--symlink")
    triples = [tuple(args[i : i + 3]) for i, a in enumerate(args) if a in binds]
    assert triples[0] == ("--ro-bind", "/usr", "/usr")
    assert [t for t in triples if "/etc/" not in t[1]][1:] == expected
    assert ("--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf") in triples
    assert not any("shadow" in a for a in args)
    assert not [t for t in triples if t[1] == "/etc"], "never all of /etc"
    assert Path(prefix) in paths or Path(prefix).is_relative_to("/usr")
    # /etc and the Python's parents are made 0755: bwrap would make them 0700
    assert after(args, "--dir") == [("/etc",), *made]
