"""Version folders in the model store: written once under a unique name, verified before anything loads them.

Version numbers restart with every fresh database while the store stays, so a folder is named by the
version, its training batch and a random suffix (`v3-b7-1a2b3c4d`), never by the version alone. It is
written as a hidden staging folder and renamed into place in one step, so a reader never sees half a version,
and a name that exists already is refused rather than written into. Its manifest lists the sha256 of every
file in it; the controller checks them all before any rollout actor is told to load the folder.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from trainer.model import MANIFEST, sha256_file


class ArtifactError(RuntimeError):
    """A version folder that must not be served: missing, rewritten or tampered with. The message names it."""


def version_folder_name(version: int, batch_id: int | None) -> str:
    batch = f"-b{batch_id}" if batch_id is not None else ""
    return f"v{version}{batch}-{uuid.uuid4().hex[:8]}"


def staging_folder(store: Path, name: str) -> Path:
    """Where a version is assembled before `publish` renames it to `store / name` (same filesystem)."""
    return store / f".staging-{name}"


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the manifest aside), by path relative to it."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST
    }


def write_manifest(folder: Path, **fields: Any) -> dict[str, Any]:
    """(Re)write the manifest with `fields` and the checksums of every file now in `folder`."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest.update(fields, checksums=file_checksums(folder))
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def publish(staging: Path, final: Path) -> Path:
    """Move a fully written staging folder to its final name in one rename; an existing name is refused."""
    if final.exists():
        raise ArtifactError(
            f"{final} exists already; a version folder is written once (a new version gets a new folder name)"
        )
    # os.rename onto an existing empty folder would succeed on POSIX, hence the check above.
    os.rename(staging, final)
    return final


def servable_folder(store: Path, row: dict[str, Any], subfolder: str | None = None) -> Path:
    """The folder rollout actors load for version `row` (a model_versions row), or ArtifactError saying why
    it must not be served: outside the store, missing, pickled weights, or a file that fails its checksum."""
    version, uri = row["version"], row["artifact_uri"]
    root = Path(uri or "").expanduser().resolve()
    path = (root / subfolder).resolve() if subfolder is not None else root
    if not uri or not path.is_relative_to(store):
        raise ArtifactError(f"version {version}'s artifact {uri!r} is outside the model store")
    if not path.is_dir():
        raise ArtifactError(f"version {version}'s folder {path} does not exist")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickles:
        raise ArtifactError(
            f"version {version}'s folder {path} holds pickled files {pickles}; only safetensors weights are served "
            "(loading a pickle runs arbitrary code)"
        )
    expected = "adapter_config.json" if row["kind"] == "lora" and subfolder is None else "config.json"
    if not (path / expected).is_file() or not any(path.glob("*.safetensors")):
        raise ArtifactError(f"version {version}'s folder {path} holds no {expected} and safetensors weights")
    verify_artifact(root, path, version)
    return path


def verify_artifact(version_dir: Path, served_dir: Path, version: int) -> None:
    """Check every file of `served_dir` (the version folder or a subfolder of it) against the manifest in
    `version_dir`: each must be listed and match its sha256, and each listed one must exist."""
    manifest_path = version_dir / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"version {version}'s folder {version_dir} has no {MANIFEST}; only folders written by the training "
            "job (python -m cluster.train_job), whose manifest lists every file's sha256, are served"
        )
    try:
        checksums = json.loads(manifest_path.read_text())["checksums"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"version {version}'s manifest {manifest_path} is unreadable ({exc!r})") from None
    prefix = served_dir.relative_to(version_dir).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    present = {f"{prefix}{name}": digest for name, digest in file_checksums(served_dir).items()}
    listed = {name: digest for name, digest in checksums.items() if name.startswith(prefix)}
    for name in sorted(present):
        if name not in listed:
            raise ArtifactError(
                f"version {version}: {version_dir / name} is not in the manifest {manifest_path}; the folder was "
                "changed after the training job wrote it, so it is not served"
            )
        if present[name] != listed[name]:
            raise ArtifactError(
                f"version {version}: {version_dir / name} has sha256 {present[name]}, but the manifest says "
                f"{listed[name]}; the file was modified after training, so it is not served (train a new version)"
            )
    missing = sorted(set(listed) - set(present))
    if missing:
        raise ArtifactError(f"version {version}: {missing} listed in {manifest_path} are missing from {version_dir}")
