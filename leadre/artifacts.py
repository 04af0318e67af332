"""Artifact directories: every step writes one, atomically, with a `manifest.json`.

A step writes into a hidden temporary sibling of its output directory and renames it into place only after the
manifest is written, so a crash leaves either the previous output or nothing — never a half-written directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leadre import __version__

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An input artifact directory is missing, incomplete or of the wrong kind."""


@contextlib.contextmanager
def write_artifact(
    out: str | Path,
    step: str,
    inputs: dict[str, str | Path] | None = None,
    parameters: dict[str, Any] | None = None,
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield `(tmp_dir, manifest)`; fill both; on a clean exit the directory replaces `out` atomically.

    `manifest` starts with step, version, inputs and parameters; the caller adds `counts` and anything else.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    manifest: dict[str, Any] = {
        "step": step,
        "version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {k: str(v) for k, v in (inputs or {}).items()},
        "parameters": parameters or {},
        "counts": {},
    }
    try:
        yield tmp, manifest
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        _normal_permissions(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: wrote %s %s", step, out, manifest["counts"])


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes the folder private and safetensors writes its files 0600; an artifact is as readable as any
    new file, so a pod running as another user (the predictor's uid 1000) can load it."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | Path, step: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read an artifact's manifest, checking it was written by `step` (one of them, if a tuple)."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    if not file.is_file():
        raise ArtifactError(f"{path}: not an artifact directory (no {MANIFEST}); was the step that writes it run?")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{file}: not valid JSON ({e})") from None
    steps = (step,) if isinstance(step, str) else step
    if steps and manifest.get("step") not in steps:
        raise ArtifactError(f"{path}: written by step {manifest.get('step')!r}, expected {' or '.join(steps)}")
    return manifest
