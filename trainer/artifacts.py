"""Weight artifacts: safetensors export, an atomic artifact store on any fsspec URL, sha256 and verification.

An artifact is a directory: full weights (``model.safetensors`` + ``config.json`` + tokenizer files, a
loadable Hugging Face checkpoint) or a peft LoRA adapter (``adapter_model.safetensors`` +
``adapter_config.json``). Its ``sha256`` covers every file in order of relative path (``/``-separated),
each as its path, its size and its bytes, so no renamed, added or re-cut file keeps the digest —
:func:`artifact_sha256`, which readers reuse.

Artifacts stay inside the store: a name is one plain path component (:data:`ARTIFACT_NAME`), the store
hands out only ``<root>/<name>`` (:meth:`ArtifactStore.locate`), and it fetches no artifact holding a
symlink or a path that would leave its directory. Each refusal is an :class:`UntrustedArtifact`, as is a
digest that differs from the expected sha256.

The store uploads into ``<root>/.tmp-<name>-<random>`` and renames it to ``<root>/<name>`` only once the
upload's hash matches the local one, so a reader never sees a partial directory under a real name (on a
local disk the rename is atomic; on object stores fsspec copies then deletes, and the hash check at
publication catches anything incomplete). Leftover ``.tmp-*`` directories of crashed uploads are removed
by :meth:`ArtifactStore.remove_partials`.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

WEIGHT_FILES = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}
CONFIG_FILES = {"full": "config.json", "lora": "adapter_config.json"}
#: An artifact's name: one path component of plain characters, so it cannot climb out of the store (``..``,
#: ``/``), hide as a temporary upload (leading dot) or mean something else once URL-decoded (``%``).
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ArtifactError(RuntimeError):
    """An artifact that is missing, incomplete or does not match its hash."""


class UntrustedArtifact(ArtifactError):
    """An artifact that must not be used: its name or location leaves the store, it holds a symlink, or its
    bytes are not the ones its sha256 names."""


@dataclass(frozen=True)
class Artifact:
    uri: str
    sha256: str
    format: str  # "full" or "lora"


def artifact_sha256(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """SHA-256 over every file under ``root`` in order of relative path: its path, its size, its bytes."""
    root = root.rstrip("/")
    digest = hashlib.sha256()
    for path in sorted(fs.find(root), key=lambda p: p[len(root) + 1 :]):
        digest.update(f"{path[len(root) + 1 :]}\0{fs.size(path)}\0".encode())
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
        check_name(name)
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

    def locate(self, uri: str) -> str:
        """The store path of the artifact at ``uri``; UntrustedArtifact unless ``uri`` is ``<root>/<name>``."""
        prefix = self.fs.unstrip_protocol(self.root).rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise UntrustedArtifact(f"{uri} is not in the artifact store {prefix}")
        name = uri[len(prefix) :]
        check_name(name)
        return f"{self.root}/{name}"

    def fetch(self, uri: str, local_dir: str | Path) -> Path:
        """Download the artifact at ``uri`` to ``local_dir``, refusing one that would reach outside either."""
        root = self.locate(uri)
        if self.fs.info(root).get("islink"):
            raise UntrustedArtifact(f"{uri} is a symlink")
        files = []
        for path, info in self.fs.find(root, withdirs=True, detail=True).items():
            if path == root:
                continue
            relative = path[len(root) + 1 :]
            # An object store's keys are free text: "a/../../b" would be written outside local_dir.
            if info.get("islink") or any(part in ("", ".", "..") for part in relative.split("/")):
                raise UntrustedArtifact(f"{uri} holds {relative!r}, a symlink or a path that leaves the artifact")
            if info["type"] == "file":
                files.append(relative)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        for relative in files:
            (local_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get([f"{root}/{relative}" for relative in files], [str(local_dir / r) for r in files])
        return local_dir

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
        raise UntrustedArtifact(f"{artifact.uri}: sha256 {actual} does not match the expected {artifact.sha256}")


def check_name(name: str) -> None:
    """Raise UntrustedArtifact unless ``name`` is a valid artifact name (:data:`ARTIFACT_NAME`)."""
    if not ARTIFACT_NAME.fullmatch(name):
        raise UntrustedArtifact(
            f"artifact name {name!r} refused: one path component of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
