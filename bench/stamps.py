"""One place for the stamps every results writer puts on its files: code version and device.

``git_describe()`` names the code a result was measured with: ``git describe --always
--dirty`` of the repository (a tag-relative name or the short sha), with ``-dirty``
when tracked files had uncommitted edits at the time of the call (untracked files do
not count). Outside a git checkout it is ``$LOWRANK_KERNELS_GIT_SHA`` or ``unknown``.
``device_name()`` is the GPU's name or the CPU's model with its core and thread
counts; ``device_tag()`` is a file-name-safe form. ``stamp()`` bundles them with the
torch/triton versions and a UTC timestamp, as written by ``python -m bench``,
``python -m bench.convergence`` and its tuning grid.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_describe(repo: Path | str = REPO) -> str:
    """``git describe --always --dirty`` of ``repo`` (``<sha>`` or ``<sha>-dirty``), or a fallback."""
    fallback = os.environ.get("LOWRANK_KERNELS_GIT_SHA", "unknown")
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=repo,
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return fallback
    desc = out.stdout.strip()
    return desc if out.returncode == 0 and desc else fallback


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or ``<CPU model> (<cores> cores, <threads> threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_tag(device: torch.device | str) -> str:
    """File-name-safe device name: letters, digits, '.', '_' and '-' only."""
    device = torch.device(device)
    raw = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-" + cpu_model()
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-") or device.type


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - any import problem: not usable here
        return "not installed"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp(device: torch.device | str) -> dict:
    """``{"git", "device", "device_name", "torch", "triton", "timestamp"}`` for a results file."""
    device = torch.device(device)
    return {"git": git_describe(), "device": device.type, "device_name": device_name(device),
            "torch": torch.__version__, "triton": triton_version(), "timestamp": utc_now()}
