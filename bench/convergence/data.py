"""The corpus, its three disjoint splits (train / tuning / validation), and the batches.

Default corpus: the Python standard library's own ``*.py`` files (present on every
machine), read as bytes in sorted order. A file's split is decided by the CRC32 of
its path relative to the corpus root (so it does not depend on which other files
exist): 0 mod 20 -> validation (the split every reported number is measured on),
1 mod 20 -> tuning (the split learning rates are chosen on), the rest -> training.
A single text file: the first 80% trains, the next 10% tunes, the last 10% validates.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import sysconfig
import zlib

import torch

from .presets import Preset

SPLITS = ("train", "tune", "val")
MIN_SPLIT_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Three disjoint byte streams (uint8 tensors) and a description of where they came from."""

    train: torch.Tensor
    tune: torch.Tensor
    val: torch.Tensor
    desc: str

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def _stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(f for f in root.rglob("*.py")
                   if f.is_file() and not skip & set(f.relative_to(root).parts))
    return root, files


def split_of(relpath: str) -> str:
    """``"val"``, ``"tune"`` or ``"train"`` for a file at ``relpath`` (the CRC rule above)."""
    r = zlib.crc32(relpath.replace(os.sep, "/").encode()) % 20
    return "val" if r == 0 else "tune" if r == 1 else "train"


def _is_validation(relpath: str) -> bool:
    return split_of(relpath) == "val"


def load_corpus(path: str | None = None) -> Corpus:
    """The corpus at ``path`` (default: the stdlib's ``*.py``), split as the module doc says.

    A folder is every regular file below it; a folder whose files all land in one
    or two splits falls back to cutting the missing splits off the end of training.
    """
    if path is None:
        root, files = _stdlib_files()
        desc = f"Python {sys.version.split()[0]} stdlib *.py ({root})"
    else:
        p = pathlib.Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--data: {path!r} does not exist")
        if p.is_file():
            data = p.read_bytes()
            a, b = int(len(data) * 0.8), int(len(data) * 0.9)
            desc = f"{p} (first 80% train, next 10% tuning, last 10% validation)"
            return Corpus(_as_tensor(data[:a], "training", desc), _as_tensor(data[a:b], "tuning", desc),
                          _as_tensor(data[b:], "validation", desc), desc)
        root = p
        files = sorted(f for f in p.rglob("*") if f.is_file())
        desc = f"{p} ({len(files)} files)"
    parts = {s: bytearray() for s in SPLITS}
    for f in files:
        parts[split_of(str(f.relative_to(root)))].extend(f.read_bytes())
    for s in ("val", "tune"):  # a folder too small for the CRC rule: cut from the end of training
        if not parts[s] and parts["train"]:
            cut = int(len(parts["train"]) * 0.9)
            parts[s], parts["train"] = parts["train"][cut:], parts["train"][:cut]
    names = {"train": "training", "tune": "tuning", "val": "validation"}
    return Corpus(*(_as_tensor(bytes(parts[s]), names[s], desc) for s in SPLITS), desc)


def _as_tensor(b: bytes, what: str, desc: str) -> torch.Tensor:
    if len(b) < MIN_SPLIT_BYTES:
        raise ValueError(f"--data: the {what} split of {desc} has {len(b)} bytes; need at least {MIN_SPLIT_BYTES}")
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


class Batches:
    """The same training windows, in the same order, for every method; fixed evaluation windows.

    ``train`` is the training stream; ``held_out`` the stream evaluated during the run
    (the validation split for the reported table, the tuning split for a tuning grid).
    The training windows depend on ``seed``; the evaluation windows do not.
    """

    def __init__(self, train: torch.Tensor, held_out: torch.Tensor, preset: Preset, seed: int):
        self.train, self.val, self.p = train, held_out, preset
        win = preset.seq_len + 1
        if len(train) <= win or len(held_out) <= win:
            raise ValueError(f"data splits ({len(train)}, {len(held_out)} bytes) are shorter than one window of {win}")
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(train) - win, (preset.steps, preset.batch_size), generator=g)
        n_val = preset.eval_batches * preset.batch_size
        self.val_offsets = torch.linspace(0, len(held_out) - win - 1, n_val).long()

    @staticmethod
    def _gather(stream: torch.Tensor, offsets: torch.Tensor, win: int) -> torch.Tensor:
        idx = offsets[:, None] + torch.arange(win)[None, :]
        return stream[idx].long()

    def train_batch(self, step: int) -> torch.Tensor:
        return self._gather(self.train, self.offsets[step], self.p.seq_len + 1)

    def val_batches(self):
        b = self.p.batch_size
        for i in range(self.p.eval_batches):
            yield self._gather(self.val, self.val_offsets[i * b:(i + 1) * b], self.p.seq_len + 1)
