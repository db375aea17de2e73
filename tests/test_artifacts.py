"""The artifact store keeps artifacts inside it: names and URIs that would climb out, symlinks and object-store
keys that would land outside the fetch directory are refused; the digest binds every file's name and size."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import fsspec
import pytest

from boltstream.trainer.artifacts import ArtifactStore, UntrustedArtifact, artifact_sha256


def weights_dir(directory: Path) -> Path:
    """The smallest full-weights artifact the store accepts: an empty safetensors file and a config."""
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


def test_an_artifact_round_trips_through_put_and_fetch(store: ArtifactStore, tmp_path: Path) -> None:
    artifact = store.put(weights_dir(tmp_path / "candidate"), "v000001-ab12", "full")
    fetched = store.fetch(artifact.uri, tmp_path / "fetched")
    assert sorted(p.name for p in fetched.iterdir()) == ["config.json", "model.safetensors"]
    assert artifact_sha256(fsspec.filesystem("file"), str(fetched)) == artifact.sha256


@pytest.mark.parametrize(
    "name", ["../escape", "..", "/tmp/abs", "a/b", ".tmp-v1-x", "%2e%2e", "..%2fescape", "v1\x00", ""]
)
def test_a_name_that_is_not_one_plain_component_is_refused(store: ArtifactStore, tmp_path: Path, name: str) -> None:
    with pytest.raises(UntrustedArtifact, match=r"artifact name .* refused"):
        store.put(weights_dir(tmp_path / "candidate"), name, "full")
    assert not (tmp_path / "escape").exists()


def test_a_uri_outside_the_store_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    store.put(weights_dir(tmp_path / "candidate"), "v1", "full")
    outside = weights_dir(tmp_path / "outside")
    root = store.fs.unstrip_protocol(store.root)
    for uri in (
        f"file://{outside}",  # absolute, elsewhere
        str(outside),  # a plain path is not a URI of this store either
        f"{root}/../outside",
        f"{root}/%2e%2e/outside",
        f"{root}/v1/../../outside",
        f"{root}-sibling/v1",
        f"memory://{store.root}/v1",  # the same path on another filesystem
    ):
        with pytest.raises(UntrustedArtifact):
            store.fetch(uri, tmp_path / f"fetched-{uuid.uuid4().hex[:6]}")
    assert not list(tmp_path.glob("fetched-*/*"))


def test_symlinks_in_or_as_an_artifact_are_refused(store: ArtifactStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for serving")
    artifact = store.put(weights_dir(tmp_path / "candidate"), "v1", "full")
    (Path(store.root) / "v1" / "tokenizer.json").symlink_to(secret)
    with pytest.raises(UntrustedArtifact, match=r"'tokenizer\.json', a symlink"):
        store.fetch(artifact.uri, tmp_path / "fetched")
    (Path(store.root) / "v2").symlink_to(weights_dir(tmp_path / "elsewhere"), target_is_directory=True)
    with pytest.raises(UntrustedArtifact, match="is a symlink"):
        store.fetch(f"{store.fs.unstrip_protocol(store.root)}/v2", tmp_path / "fetched-2")
    assert not (tmp_path / "fetched").exists() and not (tmp_path / "fetched-2").exists()


def test_object_store_keys_that_climb_out_of_the_artifact_are_refused(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://store-{uuid.uuid4().hex[:8]}")
    store.fs.pipe(f"{store.root}/v1/config.json", b"{}")
    store.fs.pipe(f"{store.root}/v1/../../escape", b"written outside the fetch directory")
    with pytest.raises(UntrustedArtifact, match="a path that leaves the artifact"):
        store.fetch(f"{store.fs.unstrip_protocol(store.root)}/v1", tmp_path / "a" / "b")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "a" / "escape").exists()


def test_the_digest_changes_when_a_file_is_renamed_or_bytes_move_between_files(tmp_path: Path) -> None:
    local = fsspec.filesystem("file")
    directory = weights_dir(tmp_path / "a")
    original = artifact_sha256(local, str(directory))
    (directory / "config.json").rename(directory / "config2.json")
    renamed = artifact_sha256(local, str(directory))
    (directory / "config2.json").rename(directory / "config.json")
    assert artifact_sha256(local, str(directory)) == original != renamed
    # Same bytes in the same order, cut differently: the concatenation alone would not notice.
    (directory / "config.json").write_text("{")
    (directory / "model.safetensors").write_bytes(b"}" + struct.pack("<Q", 2) + b"{}")
    assert artifact_sha256(local, str(directory)) != original
