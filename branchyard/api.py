"""The HTTP API: everything the CLI does goes through here.

JSON in and out under ``/api``. Errors are ``{"error": CODE, "message": TEXT}``
with the status of the :mod:`branchyard.errors` class, turned into a response
in exactly one place (:func:`_error`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from branchyard.engine import Engine
from branchyard.errors import BranchyardError, NotFound
from branchyard.model import Revision, RevisionState
from branchyard.naming import BASELINE, dns_label
from branchyard.planner import Slot
from branchyard.settings import validate_env

FOLLOW_INTERVAL = 0.2


class RepoIn(BaseModel):
    url: str
    name: str | None = None
    default_branch: str | None = None


class EnvIn(BaseModel):
    env: dict[str, Any]
    author: str = "branchyard"
    message: str = ""


def _revision_json(revision: Revision | None) -> dict[str, Any] | None:
    if revision is None:
        return None
    return {
        "ordinal": revision.ordinal,
        "sha": revision.sha,
        "sha7": revision.sha7,
        "branch": revision.branch,
        "state": revision.state.value,
        "reason": revision.reason,
        "settings": revision.settings_version,
        "created_at": revision.created_at,
        "changed_at": revision.changed_at,
    }


def _baseline_first(item: tuple[Slot, Any]) -> tuple[bool, Slot]:
    return item[0][0] != BASELINE, item[0]


def create_app(engine: Engine, info: dict[str, Any]) -> FastAPI:
    app = FastAPI(title="branchyard", version="0.1.0")

    @app.exception_handler(BranchyardError)
    async def _error(request: Request, exc: BranchyardError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    def router_url(namespace: str, service: str) -> str:
        return f"http://{dns_label(service)}.{namespace}.localhost:{engine.router.main_port}/"

    def row(slot: Slot) -> dict[str, Any]:
        history = engine.store.revisions(slot)
        latest = history[0] if history else None
        live = engine.live.get(slot)
        shown = live.revision if live else latest
        if live and latest and latest.id != live.revision.id:
            state = f"live (v{latest.ordinal} {latest.state.value})"
        elif shown:
            state = shown.state.value
        else:
            state = "pending"
        return {
            "namespace": slot[0],
            "service": slot[1],
            "state": state,
            "reason": latest.reason if latest and latest.state is RevisionState.FAILED else "",
            "live": _revision_json(live.revision if live else None),
            "latest": _revision_json(latest),
            "url": router_url(*slot),
            "since": shown.changed_at if shown else None,
        }

    @app.get("/api/info")
    async def get_info() -> dict[str, Any]:
        return info

    @app.get("/api/repos")
    async def list_repos() -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "url": r.url,
                "default_branch": r.default_branch,
                "branches": len(engine.heads[r.name].branches) if r.name in engine.heads else 0,
                "error": engine.watcher.errors.get(r.name, ""),
            }
            for r in engine.store.repos()
        ]

    @app.post("/api/repos", status_code=201)
    async def add_repo(body: RepoIn) -> dict[str, Any]:
        repo = await engine.add_repo(body.url, body.name, body.default_branch)
        return {"name": repo.name, "url": repo.url, "default_branch": repo.default_branch}

    @app.delete("/api/repos/{name}")
    async def remove_repo(name: str) -> dict[str, Any]:
        await engine.remove_repo(name)
        return {"removed": name}

    @app.get("/api/namespaces")
    async def list_namespaces() -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for (namespace, service), target in sorted(engine.targets.items(), key=_baseline_first):
            entry = found.setdefault(
                namespace, {"namespace": namespace, "branch": target.branch, "services": []}
            )
            entry["services"].append(service)
        return list(found.values())

    @app.get("/api/services")
    async def list_services(namespace: str | None = None) -> list[dict[str, Any]]:
        slots = sorted(engine.targets)
        if namespace is not None:
            slots = [s for s in slots if s[0] == namespace]
            if not slots:
                engine.target(namespace, "")
        return [row(slot) for slot in slots]

    @app.get("/api/namespaces/{namespace}/services/{service}")
    async def get_service(namespace: str, service: str) -> dict[str, Any]:
        engine.target(namespace, service)
        return row((namespace, service))

    @app.delete("/api/namespaces/{namespace}/services/{service}")
    async def remove_service(namespace: str, service: str) -> dict[str, Any]:
        target = engine.remove_service(namespace, service)
        return {"removed": f"{namespace}:{service}", "until_next_push_of": target.branch}

    @app.get("/api/namespaces/{namespace}/services/{service}/env")
    async def get_env(namespace: str, service: str) -> dict[str, Any]:
        return {"env": engine.env_of(namespace, service)}

    @app.put("/api/namespaces/{namespace}/services/{service}/env")
    async def put_env(namespace: str, service: str, body: EnvIn) -> dict[str, Any]:
        env = validate_env(body.env)
        message = body.message or f"set env of {service} in {namespace}"
        overlay = await engine.set_env(namespace, service, env, body.author, message)
        return {"env": dict(overlay.env), "version": overlay.version}

    @app.get("/api/namespaces/{namespace}/services/{service}/history")
    async def history(namespace: str, service: str) -> list[dict[str, Any]]:
        engine.target(namespace, service)
        changes = await engine.settings_repo.history((namespace, service))
        return [c.__dict__ for c in changes]

    @app.get("/api/namespaces/{namespace}/services/{service}/logs", response_model=None)
    async def logs(
        namespace: str, service: str, build: bool = False, follow: bool = False
    ) -> PlainTextResponse | StreamingResponse:
        engine.target(namespace, service)
        history = engine.store.revisions((namespace, service))
        live = engine.live.get((namespace, service))
        revision = live.revision if live and not build else (history[0] if history else None)
        if revision is None:
            raise NotFound(f"{service} in {namespace} has no revision yet")
        path = engine.runtime.log_path(namespace, service, revision.ordinal, build)
        if not follow:
            return PlainTextResponse(path.read_text(errors="replace") if path.exists() else "")
        return StreamingResponse(_follow(path), media_type="text/plain")

    return app


async def _follow(path: Path) -> AsyncIterator[bytes]:
    position = 0
    while True:
        if path.exists():
            with path.open("rb") as file:
                file.seek(position)
                chunk = file.read()
            if chunk:
                position += len(chunk)
                yield chunk
        await asyncio.sleep(FOLLOW_INTERVAL)
