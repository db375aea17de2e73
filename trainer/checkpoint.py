"""Checkpoints and the ledger of trained samples.

A checkpoint is a DeepSpeed checkpoint (weights, optimizer, scheduler, step) whose client state carries
what DeepSpeed does not know: the source's offsets and held samples, the policy version, counters and
the RNG states. DeepSpeed writes the ``latest`` tag file only after every part of a checkpoint is
written, so a crash mid-save leaves the previous checkpoint in force.

The ledger (``ledger.jsonl`` beside the checkpoints) records the sample ids of every step, one line per
step. On resume the lines of steps after the checkpoint are dropped, because the restored weights have
not seen those samples; the ledger then always lists exactly the samples in the weights, once each.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

CLIENT_KEY = "boltstream"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


class Checkpointer:
    """Save and resume DeepSpeed checkpoints under one directory, keeping the newest ``keep``."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def save(self, engine, step: int, state: dict[str, Any]) -> None:
        """Collective: every rank calls it. ``state`` (rank 0's) rides in the client state."""
        engine.save_checkpoint(str(self.directory), tag=f"step-{step:09d}", client_state={CLIENT_KEY: state})
        if engine.global_rank == 0:
            self._prune()

    def resume(self, engine) -> dict[str, Any] | None:
        """Load the newest checkpoint into ``engine``; its client state, or None if there is none."""
        if not (self.directory / "latest").exists():
            return None
        path, client_state = engine.load_checkpoint(str(self.directory))
        if path is None:
            raise RuntimeError(f"checkpoint {self.directory} names a tag that cannot be loaded")
        return client_state[CLIENT_KEY]

    def _prune(self) -> None:
        tags = sorted(p for p in self.directory.glob("step-*") if p.is_dir())
        for old in tags[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class Ledger:
    """Append-only record of which sample ids each step trained on."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def record(self, step: int, sample_ids: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "sample_ids": sample_ids}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # a line torn by a crash: nothing after it was written either
        return entries

    def truncate_after(self, step: int) -> None:
        """Keep only the steps the restored weights contain (atomically: temp file + rename)."""
        kept = [e for e in self.entries() if e["step"] <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(temporary, self.path)

    def trained_ids(self) -> list[str]:
        return [sample_id for entry in self.entries() for sample_id in entry["sample_ids"]]
