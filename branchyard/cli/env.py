"""A service's env in a namespace (its settings, docs/settings.md): ``env ls``,
``env set``, ``env unset``, ``edit`` in the person's editor, and ``history``.

Every change names its author (git's ``user.name`` and ``user.email``, else the login).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from branchyard.cli.context import Context, assignments, namespaced, pass_context
from branchyard.client import ApiError, path_of
from branchyard.errors import InvalidSettings, StaleVersion, UsageError

if TYPE_CHECKING:  # the shapes of the answers; importing them costs a command ~20 ms
    from branchyard import shapes


def _env_path(namespace: str, service: str) -> str:
    return path_of("namespaces", namespace, "services", service, "env")


def _author() -> str:
    import getpass
    import subprocess

    def config(key: str) -> str:
        try:
            found = subprocess.run(
                ["git", "config", key], capture_output=True, text=True, check=False
            )
        except OSError:
            return ""
        return found.stdout.strip()

    name = config("user.name") or getpass.getuser()
    email = config("user.email") or f"{getpass.getuser()}@localhost"
    return f"{name} <{email}>"


def _saved(namespace: str, service: str, done: shapes.EnvSaved) -> str:
    unchanged = "" if done["changed"] else " (unchanged)"
    return f"{namespace}:{service} settings {done['version']}{unchanged}"


def _change_env(
    ctx: Context, namespace: str, service: str, assign: dict[str, str], unset: tuple[str, ...]
) -> None:
    """Send only the change; the daemon applies it to the env as it is then."""
    body = {"set": assign, "unset": list(unset), "author": _author()}
    click.echo(
        _saved(namespace, service, ctx.client.call("PATCH", _env_path(namespace, service), body))
    )


@click.group("env")
def env_group() -> None:
    """Show and change a service's environment variables in a namespace."""


@env_group.command("ls")
@click.argument("service")
@click.option("--show-secrets", is_flag=True, help="Print secret values instead of a mask.")
@namespaced
@pass_context
def env_ls(ctx: Context, service: str, show_secrets: bool, ns: str | None) -> None:
    """Variables a person set (branchyard's own, like PORT and *_URL, are not listed)."""
    path = _env_path(ctx.namespace(ns), service) + ("?show_secrets=true" if show_secrets else "")
    found: shapes.Env = ctx.client.call("GET", path)
    for key, value in sorted(found["env"].items()):
        click.echo(f"{key}={value}")
    for key, value in sorted(found["secrets"].items()):
        click.echo(f"{key}={value}  (secret)")


@env_group.command("set")
@click.argument("service")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--secret", is_flag=True, help="Store the values as secrets, never shown again.")
@namespaced
@pass_context
def env_set(
    ctx: Context, service: str, pairs: tuple[str, ...], secret: bool, ns: str | None
) -> None:
    """Set variables; rolls out a new revision."""
    namespace = ctx.namespace(ns)
    changes = assignments(pairs)
    if secret:
        body = {"set": changes, "author": _author()}
        done: shapes.SecretsSaved = ctx.client.call(
            "PUT", ctx.service_path(ns, service, "secrets"), body
        )
        click.echo(f"{namespace}:{service} settings {done['version']} (secret values not shown)")
        return
    _change_env(ctx, namespace, service, changes, ())


@env_group.command("unset")
@click.argument("service")
@click.argument("keys", nargs=-1, required=True)
@namespaced
@pass_context
def env_unset(ctx: Context, service: str, keys: tuple[str, ...], ns: str | None) -> None:
    """Remove variables; rolls out a new revision."""
    namespace = ctx.namespace(ns)
    found: shapes.Env = ctx.client.call("GET", _env_path(namespace, service))
    env = found["env"]
    missing = [k for k in keys if k not in env and k not in found["secrets"]]
    if missing:
        raise UsageError(f"not set in {namespace}:{service}: {', '.join(missing)}")
    secrets = [k for k in keys if k in found["secrets"]]
    if secrets:
        body = {"unset": secrets, "author": _author()}
        ctx.client.call("PUT", ctx.service_path(ns, service, "secrets"), body)
        keys = tuple(k for k in keys if k not in secrets)
        if not keys:
            click.echo(f"{namespace}:{service} secrets unset: {', '.join(secrets)}")
            return
    _change_env(ctx, namespace, service, {}, keys)


def _editor() -> list[str]:
    import shlex

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    return shlex.split(editor)


def _edit_text(text: str) -> str:
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", prefix="branchyard-", delete=False
    ) as file:
        file.write(text)
    try:
        code = subprocess.run([*_editor(), file.name], check=False).returncode
        if code != 0:
            raise UsageError(f"the editor exited with code {code}; nothing was changed")
        return Path(file.name).read_text()
    except FileNotFoundError:
        raise UsageError(f"cannot run the editor {_editor()[0]!r}; set $EDITOR") from None
    finally:
        os.unlink(file.name)


def _strip_error_comments(text: str) -> str:
    return "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith("# error: ")
    )


def _edited_env(shown: str, current: dict[str, str]) -> dict[str, str]:
    """Open the editor on ``shown`` until it gives a valid, changed env; cancel otherwise."""
    from branchyard.settings import is_blank_document, parse_document  # only edit needs YAML

    while True:
        edited = _edit_text(shown)
        if edited == shown:
            raise UsageError("saved unchanged; nothing was changed")
        if is_blank_document(edited):
            raise UsageError("the file was left empty; nothing was changed")
        try:
            env = parse_document(edited)
        except InvalidSettings as exc:
            shown = f"# error: {exc.message}\n" + _strip_error_comments(edited)
            continue
        if env == current:
            raise UsageError("no change to the env; nothing was changed")
        return env


def _conflict_note(message: str, mine: dict[str, str]) -> str:
    from branchyard.settings import render_document

    yours = "".join(f"#   {line}\n" for line in render_document(mine).splitlines())
    return (
        f"# conflict: {message}.\n"
        "# Below is the latest; make your change again. What you saved (not applied):\n"
        f"{yours}"
    )


@click.command()
@click.argument("service")
@namespaced
@pass_context
def edit(ctx: Context, service: str, ns: str | None) -> None:
    """Edit a service's env in $VISUAL or $EDITOR; saving rolls out a new revision."""
    from branchyard.settings import render_document

    namespace = ctx.namespace(ns)
    path = _env_path(namespace, service)
    header = (
        f"# env of {service} in namespace {namespace}. Save to roll out a new revision;\n"
        "# save it unchanged or empty to cancel. HOST, PORT, BRANCHYARD_* and *_URL are set for "
        "you.\n"
    )
    note = ""
    while True:
        current: shapes.Env = ctx.client.call("GET", path)
        env = _edited_env(note + header + render_document(current["env"]), current["env"])
        body = {"env": env, "version": current["version"], "author": _author()}
        try:
            done: shapes.EnvSaved = ctx.client.call("PUT", path, body)
        except ApiError as exc:
            if exc.code != StaleVersion.code:
                raise
            note = _conflict_note(exc.message, env)
            continue
        break
    click.echo(f"{_saved(namespace, service, done)}; rolling out a new revision")


@click.command()
@click.argument("service")
@namespaced
@pass_context
def history(ctx: Context, service: str, ns: str | None) -> None:
    """The settings changes of a service in a namespace, newest first, with diffs."""
    path = ctx.service_path(ns, service, "history")
    changes: list[shapes.SettingsChange] = ctx.client.call("GET", path)
    for change in changes:
        click.echo(
            f"{change['commit']}  {change['date']}  {change['author']}\n    {change['message']}\n"
        )
        for line in change["diff"].splitlines():
            if line.startswith(("+", "-")) and not line.startswith(("+++", "---")):
                click.echo(f"    {line}")
        click.echo()


COMMANDS = (env_group, edit, history)
