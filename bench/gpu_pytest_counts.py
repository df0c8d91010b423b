"""Per-file test counts for bench/gpu_check.sh, kept while the tests run.

As a pytest plugin (``python -m pytest -p bench.gpu_pytest_counts ...`` with
``GPU_CHECK_TEST_COUNTS=FILE`` and ``GPU_CHECK_TEST_PHASE=NAME``): every test's outcome is
appended to ``FILE`` the moment it is known (one line ``phase<TAB>file<TAB>outcome``), and so
is each file's count of collected tests (``collected:<n>``), so the counts survive a run
stopped by its time limit. With pytest-xdist the controller writes them (the workers send it
their reports).

As a script (``python -m bench.gpu_pytest_counts FILE --phase NAME --rc RC [--csv OUT]
[--time-limit-ok]``): prints the phase's per-file table (passed, failed, errors, skipped, not
run) and one line ``check tests-NAME: pass|fail <counts>``. The phase fails on a failed test
or error, a pytest exit status other than 0 / 5 (no test selected), or, unless
``--time-limit-ok``, a stop by the time limit (exit status 124 or 137, or tests not run).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

import pytest

ENV_FILE = "GPU_CHECK_TEST_COUNTS"
ENV_PHASE = "GPU_CHECK_TEST_PHASE"
OUTCOMES = ("passed", "failed", "error", "skipped")

_config = None


def _write(file: str, count_or_outcome: str) -> None:
    path = os.environ.get(ENV_FILE)
    if not path or (_config is not None and hasattr(_config, "workerinput")):
        return  # not asked for, or an xdist worker (the controller writes)
    phase = os.environ.get(ENV_PHASE, "tests")
    with open(path, "a") as f:
        f.write(f"{phase}\t{file}\t{count_or_outcome}\n")


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_configure(config):
    global _config
    _config = config


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Collected per file, after every other plugin's (and conftest's) selection."""
    if hasattr(config, "workerinput"):
        return
    counts = defaultdict(int)
    for item in items:
        counts[_file_of(item.nodeid)] += 1
    for file, n in counts.items():
        _write(file, f"collected:{n}")


_XDIST_SEEN = []


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """With pytest-xdist the controller collects nothing itself: the first worker's list counts."""
    if _XDIST_SEEN:
        return
    _XDIST_SEEN.append(node)
    counts = defaultdict(int)
    for nodeid in ids:
        counts[_file_of(nodeid)] += 1
    for file, n in counts.items():
        _write(file, f"collected:{n}")


def pytest_runtest_logreport(report):
    file = _file_of(report.nodeid)
    if report.when == "call":
        _write(file, "passed" if report.passed else ("skipped" if report.skipped else "failed"))
    elif report.when == "setup" and not report.passed:
        _write(file, "skipped" if report.skipped else "error")
    elif report.when == "teardown" and report.failed:
        _write(file, "error")


# --------------------------------------------------------------------------- the table
def table(path: str, phase: str):
    """``{file: {collected, passed, failed, error, skipped}}`` of ``phase`` in ``path``."""
    rows = defaultdict(lambda: dict(collected=0, **{o: 0 for o in OUTCOMES}))
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3 or parts[0] != phase:
                    continue
                _, file, what = parts
                if what.startswith("collected:"):
                    rows[file]["collected"] = max(rows[file]["collected"], int(what.split(":", 1)[1]))
                elif what in OUTCOMES:
                    rows[file][what] += 1
    return dict(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_pytest_counts", description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--phase", required=True)
    ap.add_argument("--rc", type=int, required=True, help="pytest's exit status (124 / 137: stopped by the time limit)")
    ap.add_argument("--csv", default=None, help="append the per-file rows to this CSV")
    ap.add_argument("--time-limit-ok", action="store_true",
                    help="a stop by the time limit is not a failure (the tests run 'with the time left')")
    args = ap.parse_args(argv)
    rows = table(args.file, args.phase)
    tot = dict(collected=0, **{o: 0 for o in OUTCOMES})
    print(f"tests {args.phase}: {'file':58s} {'passed':>6s} {'failed':>6s} {'errors':>6s} {'skipped':>7s} "
          f"{'not run':>7s}")
    for file in sorted(rows):
        r = rows[file]
        ran = sum(r[o] for o in OUTCOMES)
        not_run = max(0, r["collected"] - ran)
        for k in tot:
            tot[k] += r[k]
        print(f"tests {args.phase}: {file:58s} {r['passed']:6d} {r['failed']:6d} {r['error']:6d} {r['skipped']:7d} "
              f"{not_run:7d}")
    ran = sum(tot[o] for o in OUTCOMES)
    not_run = max(0, tot["collected"] - ran)
    timed_out = args.rc in (124, 137)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            wr = csv.writer(f)
            if new:
                wr.writerow(["phase", "file", "collected", *OUTCOMES, "not_run", "pytest_rc"])
            for file in sorted(rows):
                r = rows[file]
                wr.writerow([args.phase, file, r["collected"], *(r[o] for o in OUTCOMES),
                             max(0, r["collected"] - sum(r[o] for o in OUTCOMES)), args.rc])
    bad = tot["failed"] + tot["error"]
    ok = bad == 0 and (args.rc in (0, 5) or (timed_out and args.time_limit_ok))
    if (timed_out or not_run) and not args.time_limit_ok:
        ok = False
    note = ""
    if timed_out:
        note = f"; stopped by its time limit ({not_run} not run)"
    elif args.rc not in (0, 1, 5):
        note = f"; pytest exit status {args.rc}"
    print(f"check tests-{args.phase}: {'pass' if ok else 'fail'} {tot['passed']} passed, {tot['failed']} failed, "
          f"{tot['error']} errors, {tot['skipped']} skipped, {not_run} not run of {tot['collected']} collected "
          f"in {len(rows)} files{note}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
