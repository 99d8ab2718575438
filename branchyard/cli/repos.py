"""The service repos the daemon watches: ``repo add``, ``repo set``, ``repo ls``,
``repo rm``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from branchyard.cli.context import Context, pass_context
from branchyard.cli.output import table
from branchyard.client import path_of

if TYPE_CHECKING:  # the shapes of the answers; importing them costs a command ~20 ms
    from branchyard import shapes


@click.group()
def repo() -> None:
    """Register, list and remove service repos."""


@repo.command("add")
@click.argument("url")
@click.option("--name", help="Service name (default: the repo's name without .git).")
@click.option(
    "--default-branch",
    help="Branch for the baseline (default: the repo's HEAD now, else init.defaultBranch, "
    "else main, else master).",
)
@click.option(
    "--webhook-secret",
    default="",
    help="Secret its webhooks are signed with ('-' reads it from stdin).",
)
@pass_context
def repo_add(
    ctx: Context, url: str, name: str | None, default_branch: str | None, webhook_secret: str
) -> None:
    """Register a service repo: a local path, file://, http(s):// or ssh URL."""
    local = Path(url).expanduser()
    if "://" not in url and not url.startswith("git@") and local.exists():
        url = str(local.resolve())
    body = {
        "url": url,
        "name": name,
        "default_branch": default_branch,
        "webhook_secret": _secret_option(webhook_secret),
    }
    added: shapes.Repo = ctx.client.call("POST", path_of("repos"), body)
    click.echo(f"added {added['name']} ({added['url']}); default branch {added['default_branch']}")


def _secret_option(value: str) -> str:
    """A --webhook-secret value; '-' reads it from stdin."""
    return sys.stdin.readline().strip() if value == "-" else value


@repo.command("set")
@click.argument("name")
@click.option("--default-branch", help="Branch that deploys to the baseline from now on.")
@click.option(
    "--webhook-secret",
    help="Secret its webhooks are signed with ('-' reads it from stdin; '' uses the global one).",
)
@pass_context
def repo_set(
    ctx: Context, name: str, default_branch: str | None, webhook_secret: str | None
) -> None:
    """Change a registered repo's default branch or webhook secret."""
    body: dict[str, str] = {}
    if default_branch is not None:
        body["default_branch"] = default_branch
    if webhook_secret is not None:
        body["webhook_secret"] = _secret_option(webhook_secret)
    done: shapes.Repo = ctx.client.call("PATCH", path_of("repos", name), body)
    what = [f"default branch {done['default_branch']}"] if default_branch is not None else []
    if webhook_secret is not None:
        what.append("webhook secret " + ("set" if body["webhook_secret"] else "removed"))
    click.echo(f"{name}: {', '.join(what)}")


@repo.command("ls")
@pass_context
def repo_ls(ctx: Context) -> None:
    """List registered repos."""
    found: list[shapes.RepoRow] = ctx.client.call("GET", path_of("repos"))
    rows = [
        [
            r["name"],
            r["url"],
            r["default_branch"] or "(HEAD)",
            str(r["branches"]),
            r["error"] or "ok",
        ]
        for r in found
    ]
    click.echo(table(["NAME", "URL", "DEFAULT", "BRANCHES", "STATUS"], rows))


@repo.command("rm")
@click.argument("name")
@pass_context
def repo_rm(ctx: Context, name: str) -> None:
    """Unregister a repo; its services leave every namespace."""
    ctx.client.call("DELETE", path_of("repos", name))
    click.echo(f"removed {name}")


COMMANDS = (repo,)
