"""Weight artifacts: safetensors export, an atomic artifact store on any fsspec URL, sha256 and verification.

An artifact is a directory: full weights (``model.safetensors`` + ``config.json`` + tokenizer files, a
loadable Hugging Face checkpoint) or a peft LoRA adapter (``adapter_model.safetensors`` +
``adapter_config.json``). Its ``sha256`` is the SHA-256 of the contents of its files concatenated in
order of their relative paths (``/``-separated) — :func:`artifact_sha256`, which readers reuse.

The store uploads into ``<root>/.tmp-<name>-<random>`` and renames it to ``<root>/<name>`` only once the
upload's hash matches the local one, so a reader never sees a partial directory under a real name (on a
local disk the rename is atomic; on object stores fsspec copies then deletes, and the hash check at
publication catches anything incomplete). Leftover ``.tmp-*`` directories of crashed uploads are removed
by :meth:`ArtifactStore.remove_partials`.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

WEIGHT_FILES = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}
CONFIG_FILES = {"full": "config.json", "lora": "adapter_config.json"}


class ArtifactError(RuntimeError):
    """An artifact that is missing, incomplete or does not match its hash."""


@dataclass(frozen=True)
class Artifact:
    uri: str
    sha256: str
    format: str  # "full" or "lora"


def artifact_sha256(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """SHA-256 over the contents of every file under ``root``, in order of relative path."""
    root = root.rstrip("/")
    digest = hashlib.sha256()
    for path in sorted(fs.find(root), key=lambda p: p[len(root) + 1 :]):
        with fs.open(path, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_safetensors(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Raise ArtifactError unless ``path`` is a complete safetensors file (header parses, sizes add up)."""
    size = fs.size(path)
    with fs.open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ArtifactError(f"{path}: {size} bytes, too short for a safetensors header")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise ArtifactError(f"{path}: header of {header_length} bytes runs past the end of the file")
        try:
            header = json.loads(handle.read(header_length))
        except ValueError as exc:
            raise ArtifactError(f"{path}: header is not JSON ({exc})") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_length + end != size:
        raise ArtifactError(f"{path}: tensors need {8 + header_length + end} bytes, file has {size}")


def export_policy(model, tokenizer, directory: str | Path, fmt: str) -> Path:
    """Write ``model`` (a peft model for ``lora``) as safetensors into ``directory``."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    if fmt == "full":
        tokenizer.save_pretrained(directory)
    if not (directory / WEIGHT_FILES[fmt]).exists():
        raise ArtifactError(f"export wrote no {WEIGHT_FILES[fmt]} in {directory}")
    return directory


class ArtifactStore:
    """A directory of artifacts at any fsspec URL (a plain path means the local disk)."""

    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def put(self, local_dir: str | Path, name: str, fmt: str) -> Artifact:
        """Upload ``local_dir`` as ``<root>/<name>``, atomically; the uploaded artifact, verified."""
        final = f"{self.root}/{name}"
        if self.fs.exists(final):
            raise ArtifactError(f"artifact {name} already exists in {self.root}")
        expected = artifact_sha256(fsspec.filesystem("file"), str(Path(local_dir).resolve()))
        temporary = f"{self.root}/.tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.put(str(local_dir).rstrip("/") + "/", temporary, recursive=True)
            uploaded = artifact_sha256(self.fs, temporary)
            if uploaded != expected:
                raise ArtifactError(f"upload of {name} hashes to {uploaded}, the local files to {expected}")
            self.fs.mv(temporary, final, recursive=True)
        finally:
            if self.fs.exists(temporary):
                self.fs.rm(temporary, recursive=True)
        artifact = Artifact(uri=self.fs.unstrip_protocol(final), sha256=expected, format=fmt)
        verify(artifact)
        return artifact

    def remove_partials(self) -> list[str]:
        """Delete the temporary directories of uploads that crashed; their paths."""
        partials = [
            p for p in self.fs.ls(self.root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith(".tmp-")
        ]
        for path in partials:
            self.fs.rm(path, recursive=True)
        return partials


def verify(artifact: Artifact) -> None:
    """Raise ArtifactError unless the artifact at its URI is complete and hashes to its sha256."""
    fs, root = fsspec.core.url_to_fs(artifact.uri)
    for required in (WEIGHT_FILES[artifact.format], CONFIG_FILES[artifact.format]):
        if not fs.exists(f"{root}/{required}"):
            raise ArtifactError(f"{artifact.uri}: {required} is missing")
    check_safetensors(fs, f"{root}/{WEIGHT_FILES[artifact.format]}")
    actual = artifact_sha256(fs, root)
    if actual != artifact.sha256:
        raise ArtifactError(f"{artifact.uri}: sha256 {actual} does not match the expected {artifact.sha256}")


def fetch(artifact_uri: str, local_dir: str | Path) -> Path:
    """Download an artifact directory to ``local_dir`` (a no-op copy for local files)."""
    fs, root = fsspec.core.url_to_fs(artifact_uri)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs.get(root.rstrip("/") + "/", str(local_dir), recursive=True)
    return local_dir
