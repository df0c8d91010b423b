"""Multi-process gloo runs (CPU) for the distributed tests.

A test module spawns its ranks once (a module-scoped fixture) and reads what each wrote::

    @pytest.fixture(scope="module")
    def results(tmp_path_factory):
        return _dist.run_ranks(_worker.worker, str(tmp_path_factory.mktemp("dist")), names)

    def test_x(results):
        _dist.check(results, "x")

and the worker, a module-level function run in each spawned process, is::

    def worker(rank, world, port, outdir, names):
        with _dist.rank_session(rank, world, port, outdir) as results:
            results["x"] = [ok, detail]   # one [ok, detail] per check

Each rank's stderr (file descriptor 2: Python, C++ and the C runtime's abort messages,
plus a Python stack of every thread on a fatal signal, and on the SIGTERM that stops the
other ranks once one has failed) goes to ``<outdir>/rank<r>.stderr``.
When a rank dies (an exception, an exit code, a signal such as SIGABRT) or writes no
results, :func:`run_ranks` raises :class:`RanksFailed` with every rank's exit status and
the end of its stderr, and prints the same report.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import json
import os
import signal
import socket
import sys
import traceback
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

WORLD = 2
#: seconds a collective may wait for the other ranks (env ``LOWRANK_DIST_TIMEOUT``).
TIMEOUT_ENV = "LOWRANK_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 90
STDERR_TAIL_CHARS = 20_000


class RanksFailed(RuntimeError):
    """A rank of :func:`run_ranks` died or wrote no results; the message holds every rank's
    exit status and the end of its stderr."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results_path(outdir: str, rank: int) -> str:
    return os.path.join(outdir, f"rank{rank}.json")


def _stderr_path(outdir: str, rank: int) -> str:
    return os.path.join(outdir, f"rank{rank}.stderr")


_STDERR_LOG = None  # the open log of this process (faulthandler writes to it on a fatal signal)


def _rank_main(rank: int, worker: Callable, world: int, port: int, outdir: str, args: tuple) -> None:
    """Run in each spawned process: stderr to ``rank<r>.stderr``, then the worker."""
    global _STDERR_LOG
    _STDERR_LOG = open(_stderr_path(outdir, rank), "w", buffering=1)
    sys.stderr.flush()
    os.dup2(_STDERR_LOG.fileno(), 2)  # C/C++ writes and abort messages too, not only sys.stderr
    faulthandler.enable(file=_STDERR_LOG, all_threads=True)
    # a rank stopped because another failed: where it was (e.g. waiting in a collective)
    faulthandler.register(signal.SIGTERM, file=_STDERR_LOG, all_threads=True, chain=True)
    try:
        worker(rank, world, port, outdir, *args)
    except Exception:
        traceback.print_exc()  # into the log as well (mp.spawn reports it to the parent too)
        raise
    finally:
        sys.stderr.flush()


def _status(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError as e:
        return f"(no stderr log: {e})"
    if not text.strip():
        return "(empty)"
    if len(text) > STDERR_TAIL_CHARS:
        text = f"... ({len(text) - STDERR_TAIL_CHARS} characters before)\n" + text[-STDERR_TAIL_CHARS:]
    return text


def _report(outdir: str, world: int, exitcodes: List[Optional[int]], error: Optional[BaseException],
            missing: List[int]) -> str:
    first = getattr(error, "error_index", None)
    lines = [f"{world}-process run failed ({outdir})"]
    for r in range(world):
        note = []
        if r == first:
            note.append("failed first")
        elif first is not None and exitcodes[r] == -signal.SIGTERM:
            note.append(f"stopped after rank {first} failed")
        if r in missing:
            note.append("wrote no results")
        lines.append(f"  rank {r}: {_status(exitcodes[r])}" + (f" ({', '.join(note)})" if note else ""))
    if error is not None:
        lines.append(f"spawn: {type(error).__name__}: {str(error).strip()}")
    for r in range(world):
        lines.append(f"---------- rank {r} stderr ({_stderr_path(outdir, r)})")
        lines.append(_tail(_stderr_path(outdir, r)).rstrip("\n"))
    return "\n".join(lines)


def run_ranks(worker: Callable, outdir: str, *args, world: int = WORLD) -> List[dict]:
    """Run ``worker(rank, world, port, outdir, *args)`` in ``world`` spawned processes and
    return each rank's results (the dict it wrote to ``<outdir>/rank<r>.json``, see
    :func:`rank_session`), by rank.

    ``worker`` must be a module-level function (the spawned processes import it). Raises
    :class:`RanksFailed` (and prints its report) when a rank exits with an error, a nonzero
    code or a signal, or writes no results: the report gives every rank's exit status and
    the end of its stderr (``<outdir>/rank<r>.stderr``).
    """
    os.makedirs(outdir, exist_ok=True)
    ctx = mp.start_processes(_rank_main, args=(worker, world, free_port(), outdir, tuple(args)), nprocs=world,
                             join=False, start_method="spawn")
    error = None
    try:
        while not ctx.join():
            pass
    except ProcessException as e:  # the other ranks are stopped by now
        error = e
    exitcodes = [p.exitcode for p in ctx.processes]
    results, missing = [], []
    for r in range(world):
        try:
            with open(_results_path(outdir, r)) as f:
                results.append(json.load(f))
        except (OSError, ValueError):
            missing.append(r)
    if error is not None or missing or any(c != 0 for c in exitcodes):
        report = _report(outdir, world, exitcodes, error, missing)
        print(report, file=sys.stderr)
        raise RanksFailed(report)
    return results


@contextlib.contextmanager
def rank_session(rank: int, world: int, port: int, outdir: str, timeout_s: Optional[float] = None) -> Iterator[dict]:
    """In a worker: join the gloo process group (one intra-op thread), yield the results
    dict (``{check: [ok, detail]}``), and whatever happens write it to
    ``<outdir>/rank<r>.json`` and leave the group.

    ``timeout_s``: how long a collective waits for the other ranks (default: the
    environment variable ``LOWRANK_DIST_TIMEOUT``, else 90 s).
    """
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if timeout_s is None:
        timeout_s = int(os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S)))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    results: dict = {}
    finished = False
    try:
        yield results
        finished = True
    finally:
        with open(_results_path(outdir, rank), "w") as f:
            json.dump(results, f, default=str)
        if finished:
            # No rank tears its connections down before every rank is done with every collective:
            # a rank that completes its last collective first (its sends written, the peer still
            # reading) could otherwise exit while the peer's transfer is in flight, and gloo
            # aborts a process whose transport thread meets a reset connection (SIGABRT,
            # "terminate called after throwing gloo::IoException"). Not after an error: the
            # other ranks may be blocked in another collective (mp.spawn stops them).
            dist.barrier()
        dist.destroy_process_group()


def check(results: List[dict], key: str) -> list:
    """Assert that every rank reported ``key`` as passed; return the ranks' details."""
    details = []
    for r, res in enumerate(results):
        assert key in res, f"rank {r}: no result for {key}"
        ok, detail = res[key]
        assert ok, f"rank {r}: {key}: {detail}"
        details.append(detail)
    return details
