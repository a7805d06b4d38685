"""The artifact container: one zip file holding manifest.json and the files it lists (JSON deflated, the rest stored).

The manifest records a sha256 and size for every other file; reading checks the zip's own CRCs, the format
version, that every listed path is a plain relative path inside the archive, that nothing unlisted is
there, and every digest, before any byte is interpreted. Writing goes to a temporary file in the same
directory, fsynced, then renamed over the target, so an interrupted save leaves the previous artifact intact.
Nothing here unpickles or imports anything.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

FORMAT = "sparsecc-artifact"
VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(Exception):
    """An artifact that cannot be trusted or understood: corrupt, truncated, tampered with or unknown."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_mode(path: Path) -> int:
    """The mode a plain open(path, "w") would give: the existing file's when overwriting one, else 0666 less the
    umask (0644 under the usual umask 022)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write(path: str | os.PathLike, manifest: dict, files: dict[str, bytes]) -> None:
    """Write manifest + files to path atomically; manifest['files'] is filled in here."""
    path = Path(path)
    manifest = {**manifest, "format": FORMAT, "format_version": VERSION,
                "files": {name: {"sha256": digest(data), "bytes": len(data)} for name, data in files.items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))     # mkstemp makes 0600; an artifact is an ordinary file
        with os.fdopen(fd, "wb") as raw:
            with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True), zipfile.ZIP_DEFLATED)
                for name, data in files.items():   # JSON programs shrink ~10x; weights and modules do not
                    zf.writestr(name, data, zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_name(path, name) -> None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or "\\" in name or ".." in p.parts or name != str(p):
        raise ArtifactError(f"{path}: manifest lists {name!r}, a path outside the artifact; "
                            f"only plain relative paths inside it are allowed")


def read(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {name: bytes}) of a verified artifact, or ArtifactError naming the file and the problem."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact ({e.strerror})") from None
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
        members = [info.filename for info in zf.infolist()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as e:
        raise ArtifactError(f"{path}: not a readable artifact (truncated or corrupt zip: {e})") from None
    if MANIFEST not in members:
        raise ArtifactError(f"{path}: no {MANIFEST} inside; this is not a sparsecc artifact")
    twice = sorted({m for m in members if members.count(m) > 1})
    if twice:
        raise ArtifactError(f"{path}: {twice[0]} appears more than once in the artifact")
    data = {}
    for name in members:
        try:
            data[name] = zf.read(name)          # checks the member's CRC-32
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, NotImplementedError) as e:
            raise ArtifactError(f"{path}: {name} is corrupt ({e})") from None
    try:
        manifest = json.loads(data.pop(MANIFEST))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: {MANIFEST} does not describe a {FORMAT}")
    if manifest.get("format_version") != VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')!r} is not supported "
                            f"(this sparsecc reads version {VERSION}); re-save it with a matching sparsecc")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ArtifactError(f"{path}: {MANIFEST} has no 'files' table")
    for name, entry in listed.items():
        _check_name(path, name)
        if name not in data:
            raise ArtifactError(f"{path}: {name} is listed in {MANIFEST} but missing from the artifact")
        if not isinstance(entry, dict) or len(data[name]) != entry.get("bytes"):
            raise ArtifactError(f"{path}: {name} has {len(data[name])} bytes, the manifest says "
                                f"{entry.get('bytes') if isinstance(entry, dict) else entry!r} (truncated?)")
        if digest(data[name]) != entry.get("sha256"):
            raise ArtifactError(f"{path}: {name} fails its sha256 check (corrupt or modified)")
    extra = sorted(set(data) - set(listed))
    if extra:
        raise ArtifactError(f"{path}: {extra[0]} is in the artifact but not in {MANIFEST}")
    return manifest, data
