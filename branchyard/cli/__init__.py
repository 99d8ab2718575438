"""The ``branchyard`` command. Every command but ``up`` is a client of the daemon's API.

The commands live in modules by what they are about: ``admin`` (the daemon: ``up``,
``info``, ``token``, ``gc``, ``dashboard``, ``demo``), ``repos`` (``repo ...``),
``services`` (what runs: ``ps``, ``ns``, ``logs``, ``url``, ``rm``, ``revisions``,
``events``), ``rollouts`` (which revision serves: ``rollback``, ``promote``, ``weight``,
``unpin``, ``restart``), ``env`` (a service's settings: ``env ...``, ``edit``,
``history``), and ``kube`` (``k8s render``: the Kubernetes objects of a revision);
under them, ``context`` (what every command shares) and ``output`` (tables,
ages, event lines).

Errors become ``error: MESSAGE`` on stderr and exit code 1 in one place,
:func:`main`. Modules only some commands need are imported inside those
commands, so that every command starts fast (bench/capacity.py times ``ps -A``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from branchyard.cli import admin, env, kube, repos, rollouts, services
from branchyard.cli.context import Context
from branchyard.client import default_home
from branchyard.errors import BranchyardError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="BRANCHYARD_HOME",
    help="State directory (default: $BRANCHYARD_HOME or ~/.branchyard).",
)
@click.option("-n", "--namespace", help="Namespace (default: main, the baseline).")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, namespace: str | None) -> None:
    """branchyard: every commit of every branch runs, grouped into namespaces by branch."""
    ctx.obj = Context(home or default_home(), namespace)


for command in (
    *admin.COMMANDS,
    *repos.COMMANDS,
    *services.COMMANDS,
    *rollouts.COMMANDS,
    *env.COMMANDS,
    *kube.COMMANDS,
):
    cli.add_command(command)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BranchyardError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
