"""Files the test control plane takes from Go modules without building them: the Gateway API's
CRDs (sigs.k8s.io/gateway-api) and kwok's own CRDs (sigs.k8s.io/kwok), each a folder of YAML
in its module's zip (docs/kubernetes.md).

A module is pinned by a go.sum-style line kept in the repo (``MODULE HASH`` in
tests/k8s/crds.sum, or go.sum for a module the build also uses). Its zip comes from the Go
module proxy and must have that hash (Go's ``h1:``, the one go.sum holds) or nothing is kept;
the folder it needs is kept in the cache, next to the binaries, so the proxy is asked once per
machine and version.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODULE = Path(__file__).resolve().parent / "k8s"
DEFAULT_PROXY = "https://proxy.golang.org"


class ModuleError(Exception):
    """Why a module's files cannot be had, in one line."""


def cache_root() -> Path:
    """The cache outside the checkout (CI clones afresh) that the binaries and these files
    share."""
    cache = os.environ.get("BRANCHYARD_K8S_CACHE") or Path.home() / ".cache" / "branchyard-k8s"
    return Path(cache)


@dataclass(frozen=True)
class ModuleFiles:
    """One folder of a module's zip, pinned by a go.sum-style line of ``sums``."""

    module: str  # its path, as in go.mod: sigs.k8s.io/gateway-api
    version: str
    sums: Path  # a go.sum-style file holding "MODULE VERSION h1:..."
    folder: str  # inside the module: config/crd/standard

    def pinned_hash(self) -> str:
        """The h1: hash that ``sums`` pins this module's zip to."""
        for line in self.sums.read_text().splitlines():
            if line.split()[:2] == [self.module, self.version]:
                return line.split()[2]
        raise ModuleError(f"{self.sums} pins no {self.module} {self.version}")

    def directory(self) -> Path:
        """Where the cache keeps the folder: CACHE/modules/MODULE@VERSION/FOLDER."""
        return cache_root() / "modules" / f"{self.module}@{self.version}" / self.folder

    def cached(self) -> Path | None:
        """The folder when the cache has it, for the pinned hash, else None."""
        directory = self.directory()
        stamp = directory / ".h1"
        found = stamp.is_file() and stamp.read_text().strip() == self.pinned_hash()
        return directory if found else None

    def fetch(self) -> Path:
        """The folder, fetched from the proxy unless the cache has it."""
        if (directory := self.cached()) is not None:
            return directory
        archive = download(self.module, self.version)
        found = dirhash(archive)
        if found != self.pinned_hash():
            raise ModuleError(
                f"{self.module} {self.version} from the module proxy has hash {found}, "
                f"but {self.sums.relative_to(MODULE.parent.parent)} pins {self.pinned_hash()}: "
                "nothing kept"
            )
        directory = self.directory()
        partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        prefix = f"{self.module}@{self.version}/{self.folder}/"
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            members = [name for name in opened.namelist() if name.startswith(prefix)]
            if not members:
                raise ModuleError(f"{self.module} {self.version} has no folder {self.folder}")
            for name in members:
                target = partial / name.removeprefix(prefix)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(opened.read(name))
        (partial / ".h1").write_text(found + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
        return directory


def required_version(module: str) -> str:
    """The version of ``module`` that tests/k8s/go.mod requires."""
    for line in (MODULE / "go.mod").read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == module:
            return words[1]
    raise ModuleError(f"{MODULE / 'go.mod'} requires no {module}")


def proxy() -> str:
    """The first module proxy of GOPROXY that is a URL (Go's default otherwise)."""
    for entry in re.split(r"[,|]", os.environ.get("GOPROXY", "")):
        if entry.startswith(("https://", "http://")):
            return entry.rstrip("/")
    return DEFAULT_PROXY


def download(module: str, version: str) -> bytes:
    """The module's zip, from the proxy (a module path's capitals are escaped as !c)."""
    escaped = re.sub("[A-Z]", lambda capital: "!" + capital[0].lower(), module)
    url = f"{proxy()}/{escaped}/@v/{version}.zip"
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return bytes(answer.read())
    except (urllib.error.URLError, OSError) as error:
        raise ModuleError(f"cannot download {url}: {error}") from None


def dirhash(archive: bytes) -> str:
    """Go's h1: hash of a module zip (golang.org/x/mod/sumdb/dirhash.Hash1): the SHA-256 of
    the lines "SHA256-OF-FILE  NAME", one per file of the zip, sorted by name."""
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        summary = "".join(
            f"{hashlib.sha256(opened.read(name)).hexdigest()}  {name}\n"
            for name in sorted(opened.namelist())
        )
    return "h1:" + base64.b64encode(hashlib.sha256(summary.encode()).digest()).decode()


def gateway_api() -> ModuleFiles:
    """The Gateway API's standard channel CRDs, at the version tests/k8s/crds.sum pins."""
    module, sums = "sigs.k8s.io/gateway-api", MODULE / "crds.sum"
    versions = [
        line.split()[1] for line in sums.read_text().splitlines() if line.startswith(module + " ")
    ]
    if len(versions) != 1:
        raise ModuleError(f"{sums} must pin one version of {module}, not {len(versions)}")
    return ModuleFiles(module, versions[0], sums, "config/crd/standard")


def kwok_crds() -> ModuleFiles:
    """kwok's CRDs, from the kwok that go.mod builds (its hash is go.sum's)."""
    module = "sigs.k8s.io/kwok"
    return ModuleFiles(module, required_version(module), MODULE / "go.sum", "kustomize/crd/bases")
