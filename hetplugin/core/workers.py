"""Particle ranges processed by forked worker processes, one torch thread each (CPU only).

Per-particle work made of many small tensor operations (subtraction, for instance) scales
with processes where torch's own threads do not: threads that wait for each other at every
operation gain x1.1-1.5 on 2 cores, and lose their time slices when the cores are shared.
The caller prepares everything (maps, output files) first; the workers are forked from it,
so they inherit it without pickling or re-importing, and each runs ``work(first, stop,
report)`` on its own contiguous range of whole batches. Results come back through pipes.
"""
from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from typing import Callable

import torch

RangeWork = Callable[[int, int, Callable[[int], None]], object]


class Progress:
    """Progress lines '<name>: done/n particles (%), images/s': every 2 s, or at every batch when
    there are at most 20, and at the end."""

    def __init__(self, name: str, n: int, n_batches: int, log):
        self.name, self.n, self.every_batch, self.log = name, n, n_batches <= 20, log
        self.start = self.last = time.perf_counter()
        self.shown = 0

    def show(self, done: int) -> None:
        now = time.perf_counter()
        if done != self.shown and (done == self.n or self.every_batch or now - self.last > 2.0):
            self.last, self.shown = now, done
            self.log(f"{self.name}: {done}/{self.n} particles ({100.0 * done / self.n:.0f}%), "
                     f"{done / max(now - self.start, 1e-9):.0f} images/s")


def worker_count(requested: int, device: torch.device, n_batches: int) -> int:
    """Worker processes: on the CPU, the cores asked for (0: torch's threads), at most one per two batches; else 1."""
    if device.type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(requested or torch.get_num_threads(), n_batches // 2))


def batch_ranges(n: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous particle ranges made of whole batches, one per worker.

    The batches are those of a single process, so results that depend on a batch (e.g. a noise
    estimate shared within it) do not depend on the number of workers.
    """
    n_batches = math.ceil(n / batch_size)
    cuts = [min(n, batch_size * (n_batches * w // workers)) for w in range(workers + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _worker(name: str, work: RangeWork, first: int, stop: int, done, slot: int, conn) -> None:
    """Body of a forked worker process: its range on one torch thread; sends back the result or the error.

    One thread also keeps the child clear of the OpenMP thread pool, which a fork does not copy.
    A worker whose parent is gone (killed) stops at its next batch instead of computing for nobody.
    """
    torch.set_num_threads(1)
    parent = os.getppid()
    try:
        def report(count: int) -> None:
            if os.getppid() != parent:
                raise SystemExit(f"{name}: the parent process is gone")
            done[slot] = count
        conn.send(("ok", work(first, stop, report)))
    except BaseException as exc:
        message = str(exc) if isinstance(exc, ValueError) else traceback.format_exc()
        conn.send(("error", (isinstance(exc, ValueError), message)))
    finally:
        conn.close()


def run_in_workers(name: str, work: RangeWork, ranges: list[tuple[int, int]], progress: Progress) -> list:
    """``work`` on each range in its own forked process; the results in the order of ``ranges``.

    The parent shows the progress from the workers' counters. A worker that fails or dies stops
    the others and the run (a ValueError as in one process, else a RuntimeError), so that the
    caller writes no partial result.
    """
    ctx = multiprocessing.get_context("fork")
    done = ctx.RawArray("q", len(ranges))
    procs, pipes, results = [], {}, [None] * len(ranges)
    try:
        for w, (first, stop) in enumerate(ranges):
            receive, send = ctx.Pipe(duplex=False)
            pipes[receive] = w
            try:
                proc = ctx.Process(target=_worker, args=(name, work, first, stop, done, w, send),
                                   name=f"{name}-{w + 1}")
                proc.start()
            finally:
                send.close()
            procs.append(proc)
        while pipes:
            for conn in multiprocessing.connection.wait(list(pipes), timeout=0.5):
                w = pipes.pop(conn)
                first, stop = ranges[w]
                where = f"worker process {w + 1} (particles {first + 1}..{stop})"
                try:
                    status, payload = conn.recv()
                except EOFError:
                    procs[w].join()
                    code = procs[w].exitcode
                    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
                    raise RuntimeError(f"{name}: {where} ended without a result ({how}; out of memory?); "
                                       "the run is incomplete and no STAR file was written") from None
                finally:
                    conn.close()
                if status == "error":
                    value_error, message = payload
                    if value_error:
                        raise ValueError(message)
                    raise RuntimeError(f"{name}: {where} failed; the run is incomplete and no STAR file "
                                       f"was written:\n{message}")
                results[w] = payload
            progress.show(sum(done))
    finally:
        for conn in pipes:
            conn.close()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    return results
