"""Shared benchmark plumbing: one fresh process per measurement, interleaved rounds, CPU-time and peak-RSS
readings, and a table of medians as ratios.

A worker is ``python <script> --worker NAME --threads T ...``; it prints one JSON line (its measurement) last.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_steps(
    step: Callable[[], None], warmup: int, steps: int, clock: Callable[[], float] = time.process_time
) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup``; by default CPU seconds (process time: all threads of
    this process). GPU work passes ``time.perf_counter`` and a ``step`` that ends with a synchronisation."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = clock()
        step()
        times.append(clock() - start)
    return times


def run_worker(script: str, name: str, threads: int, extra: Sequence[str] = ()) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, script, "--worker", name, "--threads", str(threads), *extra]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def interleaved(script: str, names: Sequence[str], rounds: int, threads: int, extra: Sequence[str] = ()) -> dict:
    """Run every measurement ``rounds`` times, rotating the order each round; results per name."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = list(names[round_index % len(names):]) + list(names[: round_index % len(names)])
        for name in order:
            result = run_worker(script, name, threads, extra)
            results[name].append(result)
            print(f"  round {round_index + 1}/{rounds} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return results


def median_of(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
