"""The ``branchyard`` command. Every command but ``up`` is a client of the daemon's API.

Errors become ``error: MESSAGE`` on stderr and exit code 1 in one place,
:func:`main`. Modules only some commands need are imported inside those
commands, so that every command starts fast (bench/capacity.py times ``ps -A``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

import click

from branchyard.client import UNSANDBOXED, ApiError, Client, default_home, path_of
from branchyard.errors import BranchyardError, InvalidSettings, StaleVersion, UsageError
from branchyard.naming import BASELINE
from branchyard.text import printable

if TYPE_CHECKING:  # the shapes of the answers; importing them costs a command ~20 ms
    from branchyard import shapes

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    def __init__(self, home: Path, namespace: str | None) -> None:
        self.home = home
        self._namespace = namespace
        self.client = Client(home)

    def namespace(self, override: str | None) -> str:
        return override or self._namespace or BASELINE

    @property
    def namespace_option(self) -> str | None:
        """The global -n, if one was given."""
        return self._namespace


def namespaced(func: F) -> F:
    """Also accept ``-n`` after the command name (``branchyard ps -n bugfix``)."""
    return click.option("-n", "--namespace", "ns", help="Namespace (default: main).")(func)


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


pass_context = click.make_pass_decorator(Context)


@cli.command()
@click.option("--router-port", default=7080, show_default=True, help="0 picks a free port.")
@click.option("--api-port", default=0, show_default=True, help="0 picks a free port.")
@click.option(
    "--api-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the API; anything but loopback needs the token (always made on start).",
)
@click.option(
    "--poll-interval",
    default=5.0,
    show_default=True,
    help="Seconds between checks of remote repos.",
)
@click.option(
    "--drain-grace",
    default=30.0,
    show_default=True,
    help="Seconds in-flight requests get to finish on a replaced revision.",
)
@click.option(
    "--stop-grace",
    default=10.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL when a process is stopped.",
)
@click.option(
    "--api-head-timeout",
    default=30.0,
    show_default=True,
    help="Seconds an API client may take to send a request head, or stay idle between requests.",
)
@click.option(
    "--log-limit",
    default=10 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1024),
    help="Bytes a service's or a build's log may reach before its older part is rotated out.",
)
@click.option(
    "--no-sandbox",
    is_flag=True,
    help="Run pushed code without bubblewrap, with the daemon's rights (see docs/security.md).",
)
@pass_context
def up(
    ctx: Context,
    router_port: int,
    api_port: int,
    api_host: str,
    poll_interval: float,
    drain_grace: float,
    stop_grace: float,
    api_head_timeout: float,
    log_limit: int,
    no_sandbox: bool,
) -> None:
    """Run the daemon in the foreground (Ctrl-C stops it and everything it started)."""
    import asyncio
    import logging

    from branchyard.daemon import Options, hide_secrets, serve

    hide_secrets()
    if not 0.1 <= poll_interval <= 3600:
        raise UsageError("--poll-interval must be between 0.1 and 3600 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if drain_grace < 0 or stop_grace < 0:
        raise UsageError("--drain-grace and --stop-grace must not be negative")
    if api_head_timeout <= 0:
        raise UsageError("--api-head-timeout must be more than 0 seconds")
    options = Options(
        ctx.home,
        router_port,
        api_port,
        api_host,
        poll_interval,
        drain_grace,
        stop_grace,
        api_head_timeout,
        log_limit,
        not no_sandbox,
    )
    import uvloop  # libuv's event loop: about 1.5x the connections per second of asyncio's

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(options))


@cli.command()
@pass_context
def info(ctx: Context) -> None:
    """Print the router's and the API's addresses."""
    data: shapes.Info = ctx.client.call("GET", path_of("info"))
    click.echo(f"router  {data['router']}\napi     {data['api']}\nhome    {data['home']}")
    click.echo(f"sandbox {data.get('sandbox') or 'none: ' + UNSANDBOXED}")


@cli.group()
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
    click.echo(_table(["NAME", "URL", "DEFAULT", "BRANCHES", "STATUS"], rows))


@repo.command("rm")
@click.argument("name")
@pass_context
def repo_rm(ctx: Context, name: str) -> None:
    """Unregister a repo; its services leave every namespace."""
    ctx.client.call("DELETE", path_of("repos", name))
    click.echo(f"removed {name}")


def _age(since: float | None) -> str:
    if since is None:
        return "-"
    seconds = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(
    header: list[str], rows: list[list[str]], width: int | None = None, squeeze: int = -1
) -> str:
    """Columns two spaces apart. With a ``width``, the ``squeeze`` column is cut (ending
    in "…") so that the lines fit it, if that column alone can make them fit."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if width is not None and squeeze >= 0:
        over = sum(widths) + 2 * (len(widths) - 1) - width
        widths[squeeze] = max(len(header[squeeze]), widths[squeeze] - max(0, over))
        rows = [
            [_cut(c, widths[squeeze]) if i == squeeze else c for i, c in enumerate(r)] for r in rows
        ]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _terminal_width() -> int | None:
    """The width to fit tables to: $COLUMNS, else the terminal's; None when piped."""
    import shutil

    if "COLUMNS" not in os.environ and not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


@cli.command()
@click.option("-q", "--quiet", is_flag=True, help="Only namespace:service, one a line.")
@click.option("-A", "--all-namespaces", "everything", is_flag=True, help="Every namespace.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@namespaced
@pass_context
def ps(ctx: Context, quiet: bool, everything: bool, fmt: str, ns: str | None) -> None:
    """List what runs in a namespace."""
    namespace = None if everything else ctx.namespace(ns)
    rows: list[shapes.ServiceRow] = ctx.client.call("GET", path_of("services", namespace=namespace))
    if not ctx.client.sandboxed():
        click.echo(f"warning: no sandbox: {UNSANDBOXED}", err=True)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif quiet:
        for line in sorted(f"{r['namespace']}:{r['service']}" for r in rows):
            click.echo(line)
    else:
        table = []
        notes = []
        for r in rows:
            shown = r["live"] or r["latest"]
            revision = f"v{shown['ordinal']} {shown['sha7']}" if shown else "-"
            state = f"{r['state']}: {r['reason']}" if r["reason"] else r["state"]
            name = f"{r['namespace']}:{r['service']}"
            table.append([name, revision, state, r["url"], _age(r["since"])])
            latest = r["latest"]
            if r["logs_command"] and latest:
                notes.append(
                    f"{name} v{latest['ordinal']} {latest['state']}; see: {r['logs_command']}"
                )
        header = ["SERVICE", "REVISION", "STATE", "URL", "AGE"]
        click.echo(_table(header, table, _terminal_width(), squeeze=2))
        for note in notes:
            click.echo(note)


@cli.group("ns")
def ns_group() -> None:
    """Namespaces."""


@ns_group.command("ls")
@pass_context
def ns_ls(ctx: Context) -> None:
    """List namespaces, their branch and services."""
    found: list[shapes.Namespace] = ctx.client.call("GET", path_of("namespaces"))
    rows = [[n["namespace"], n["branch"], ", ".join(n["services"])] for n in found]
    click.echo(_table(["NAMESPACE", "BRANCH", "SERVICES"], rows))


@cli.command()
@click.argument("service")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("--build", is_flag=True, help="The build log (of the latest revision by default).")
@click.option("--revision", "rev", metavar="REV", help="That revision's (4 or v4) instead.")
@click.option(
    "--tail", type=click.IntRange(min=0), help="Only the last N lines (then new ones with -f)."
)
@namespaced
@pass_context
def logs(
    ctx: Context,
    service: str,
    follow: bool,
    build: bool,
    rev: str | None,
    tail: int | None,
    ns: str | None,
) -> None:
    """Print a service's output (the live revision's, else the latest's)."""
    path = path_of(
        "namespaces",
        ctx.namespace(ns),
        "services",
        service,
        "logs",
        build=build,
        follow=follow,
        tail=tail,
        revision=_ordinal(rev) if rev else None,
    )
    out = sys.stdout.buffer
    for chunk in ctx.client.stream(path):
        out.write(chunk)
        out.flush()


@cli.command()
@click.argument("service")
@namespaced
@pass_context
def url(ctx: Context, service: str, ns: str | None) -> None:
    """Print the router URL of a service."""
    row: shapes.ServiceRow = ctx.client.call(
        "GET", path_of("namespaces", ctx.namespace(ns), "services", service)
    )
    click.echo(row["url"])


@cli.command("rm")
@click.argument("service")
@namespaced
@pass_context
def rm(ctx: Context, service: str, ns: str | None) -> None:
    """Stop a service in a namespace until its branch gets a new commit."""
    namespace = ctx.namespace(ns)
    done: shapes.ServiceRemoved = ctx.client.call(
        "DELETE", path_of("namespaces", namespace, "services", service)
    )
    click.echo(
        f"removed {done['removed']}; the next push to {done['until_next_push_of']} brings it back"
    )


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


@cli.group("env")
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


def _assignments(pairs: tuple[str, ...]) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"{pair!r} is not KEY=VALUE")
        parsed[key] = value
    return parsed


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
    changes = _assignments(pairs)
    if secret:
        body = {"set": changes, "author": _author()}
        done: shapes.SecretsSaved = ctx.client.call(
            "PUT", _service_path(ctx, ns, service, "secrets"), body
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
        ctx.client.call("PUT", _service_path(ctx, ns, service, "secrets"), body)
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


@cli.command()
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
        "# save it unchanged or empty to cancel. PORT, BRANCHYARD_* and *_URL are set for you.\n"
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


@cli.command()
@click.argument("service")
@namespaced
@pass_context
def history(ctx: Context, service: str, ns: str | None) -> None:
    """The settings changes of a service in a namespace, newest first, with diffs."""
    path = path_of("namespaces", ctx.namespace(ns), "services", service, "history")
    changes: list[shapes.SettingsChange] = ctx.client.call("GET", path)
    for change in changes:
        click.echo(
            f"{change['commit']}  {change['date']}  {change['author']}\n    {change['message']}\n"
        )
        for line in change["diff"].splitlines():
            if line.startswith(("+", "-")) and not line.startswith(("+++", "---")):
                click.echo(f"    {line}")
        click.echo()


def _service_path(ctx: Context, ns: str | None, service: str, *more: str) -> str:
    return path_of("namespaces", ctx.namespace(ns), "services", service, *more)


def _ordinal(text: str) -> int:
    """``4``, ``v4`` or ``V4`` -> 4."""
    digits = text.lower().removeprefix("v")
    if not digits.isdigit():
        raise UsageError(f"{text!r} is not a revision (write it as 4 or v4)")
    return int(digits)


@cli.command()
@click.argument("service")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@namespaced
@pass_context
def revisions(ctx: Context, service: str, fmt: str, ns: str | None) -> None:
    """A service's revisions in a namespace, newest first, and why each ended."""
    found: list[shapes.Revision] = ctx.client.call(
        "GET", _service_path(ctx, ns, service, "revisions")
    )
    if fmt == "json":
        click.echo(json.dumps(found, indent=2))
        return
    rows = [
        [
            f"v{r['ordinal']}",
            r["sha7"],
            r["subject"][:40],
            r["settings"] or "-",
            _age(r["created_at"]),
            r["state"],
            r["reason"],
        ]
        for r in found
    ]
    click.echo(_table(["REV", "COMMIT", "SUBJECT", "SETTINGS", "CREATED", "STATE", "WHY"], rows))


@cli.command()
@click.argument("service")
@click.argument("revision", required=False)
@namespaced
@pass_context
def rollback(ctx: Context, service: str, revision: str | None, ns: str | None) -> None:
    """Send traffic to an earlier revision (the previous one by default) and pin it."""
    body = {"ordinal": _ordinal(revision) if revision else None}
    done: shapes.Pinned = ctx.client.call("POST", _service_path(ctx, ns, service, "rollback"), body)
    click.echo(
        f"{ctx.namespace(ns)}:{service} is on v{done['live']}, pinned; new commits "
        f"stage until: branchyard unpin {service}"
    )


@cli.command()
@click.argument("service")
@click.argument("revision")
@namespaced
@pass_context
def promote(ctx: Context, service: str, revision: str, ns: str | None) -> None:
    """Send all traffic to a revision (for example a staged one) and pin it."""
    body = {"ordinal": _ordinal(revision)}
    done: shapes.Pinned = ctx.client.call("POST", _service_path(ctx, ns, service, "promote"), body)
    click.echo(f"{ctx.namespace(ns)}:{service} is on v{done['live']}, pinned")


@cli.command()
@click.argument("service")
@namespaced
@pass_context
def restart(ctx: Context, service: str, ns: str | None) -> None:
    """Start the live revision's processes afresh, switching without a gap."""
    done: shapes.Live = ctx.client.call("POST", _service_path(ctx, ns, service, "restart"))
    click.echo(f"{ctx.namespace(ns)}:{service} v{done['live']} restarted")


@cli.command()
@click.argument("service")
@namespaced
@pass_context
def unpin(ctx: Context, service: str, ns: str | None) -> None:
    """Let traffic follow new commits again: the branch head goes live (built if need be)."""
    done: shapes.Unpinned = ctx.client.call("POST", _service_path(ctx, ns, service, "unpin"))
    if done["live"]:
        then = f"; v{done['live']} goes live"
    elif done["building"]:
        then = f"; building the head of {done['branch']} ({done['head'][:7]})"
    else:
        then = ""
    click.echo(f"{ctx.namespace(ns)}:{service} follows new commits{then}")


@cli.command()
@click.argument("service")
@click.argument("shares", nargs=-1, required=True, metavar="REV=PCT...")
@namespaced
@pass_context
def weight(ctx: Context, service: str, shares: tuple[str, ...], ns: str | None) -> None:
    """Split traffic between revisions, per request (a canary): weight web 4=90 5=10."""
    weights = {_ordinal(rev): pct for rev, pct in _assignments(shares).items()}
    try:
        body = {"weights": {rev: int(pct) for rev, pct in weights.items()}}
    except ValueError:
        raise UsageError("each share is REV=PCT with a whole number, like 5=10") from None
    done: shapes.Weights = ctx.client.call("PUT", _service_path(ctx, ns, service, "weights"), body)
    shown = " ".join(f"v{rev}={pct}" for rev, pct in sorted(done["weights"].items()))
    click.echo(f"{ctx.namespace(ns)}:{service} traffic: {shown} (pinned)")


def _event_time(at: float) -> str:
    """Local time with its offset from UTC: ``2026-11-28 23:20:41+01:00``."""
    from datetime import datetime

    return datetime.fromtimestamp(at).astimezone().isoformat(sep=" ", timespec="seconds")


def _event_line(event: shapes.Event) -> str:
    when = _event_time(event["at"])
    where = f"{event['namespace']}:{event['service']}" if event["namespace"] else "-"
    return printable(f"{when}  {event['kind']:<10} {where:<24} {event['message']}")


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("-n", "--namespace", "ns", help="Only this namespace (default: all).")
@pass_context
def events(ctx: Context, follow: bool, ns: str | None) -> None:
    """What happened: pushes, builds, revisions going live, rollbacks, edits, webhooks."""
    namespace = ns or ctx.namespace_option
    found: list[shapes.Event] = ctx.client.call("GET", path_of("events", namespace=namespace))
    for event in found:
        click.echo(_event_line(event))
    if not follow:
        return
    after = found[-1]["id"] if found else 0
    query = {"after": after, "namespace": namespace} if namespace else {"after": after}
    for line in ctx.client.lines(f"/events?{urlencode(query)}"):
        if line.startswith("data: "):
            click.echo(_event_line(json.loads(line[6:])))


@cli.group()
def token() -> None:
    """The API token (HOME/token, readable only by its owner)."""


@token.command("rotate")
@pass_context
def token_rotate(ctx: Context) -> None:
    """Replace the API token; the old one stops working at once."""
    done: shapes.TokenFile = ctx.client.call("POST", path_of("token", "rotate"))
    click.echo(f"token rotated; the new one is in {done['token_file']}")


@cli.command()
@pass_context
def gc(ctx: Context) -> None:
    """Delete builds beyond the kept ones and environments nothing uses."""
    freed = ctx.client.call("POST", path_of("gc"))
    click.echo(
        f"freed {freed['builds_bytes'] / 1e6:.1f} MB of builds, removed "
        f"{freed['environments_removed']} environments"
    )


@cli.command()
@click.option("--open", "open_browser", is_flag=True, help="Also open it in a web browser.")
@pass_context
def dashboard(ctx: Context, open_browser: bool) -> None:
    """Print a link that logs a browser in to the dashboard (once, within 5 minutes)."""
    done: shapes.LoginCode = ctx.client.call("POST", path_of("dashboard", "login-code"))
    click.echo(done["url"])
    click.echo(f"(the link logs in once, within {done['expires_in'] // 60} minutes)", err=True)
    if open_browser:
        import webbrowser

        webbrowser.open(done["url"])


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), default="branchyard-demo")
@pass_context
def demo(ctx: Context, directory: Path) -> None:
    """Create three sample service repos, register them, and print what to try."""
    from branchyard.demo import create_demo, workflow_text

    info_data: shapes.Info = ctx.client.call("GET", path_of("info"))
    try:
        repos = create_demo(directory)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    for made in repos:
        ctx.client.call("POST", path_of("repos"), {"url": str(made.origin), "name": made.name})
        click.echo(f"registered {made.name} ({made.origin})")
    click.echo()
    click.echo(workflow_text(directory.resolve(), info_data["router"]))


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
