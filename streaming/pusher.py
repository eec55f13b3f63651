"""Feast pushes in a child process: the driver's step 5 on the second core.

Why a process. A Feast write of a user row (protobuf build plus SQLite or Redis
rows) is pure Python; done in a thread of the driver it holds the GIL for about
as long as the merges it was meant to overlap (bench/ingest.py measured the push
thread taking half of the driver's wall time). A process runs it in parallel.

Why nothing crosses the pipe but batch ids. The state store's outbox already
names every key whose committed state has not reached Feast, and the states are
in the same store. So the driver only says "batch N is committed"; the child
reads the outbox and the current states of its keys (`StateStore.pending_push`),
writes them to the online store, clears those outbox rows (`mark_pushed`, which
keeps rows a newer batch rewrote meanwhile), and answers "covered up to batch
M". Pushes stay in commit order (one child, one push at a time), each key is
written with its newest state however many batches touched it, and after a crash
the same outbox is what `Driver.recover` pushes: no new protocol, no new state.

    driver                              child (PushProcess._main)
    commit_batch -> N                   ...
    submit(N)    ---- ("push", N) --->  drain the pipe (newest N wins)
                                        pending = store.pending_push()
                                        online.push_users / push_items
                                        store.mark_pushed(batch=pending.batch)
    poll()       <--- ("pushed", M, pushed_at, seconds, users, items)   M = max(N, pending.batch)
    commit offsets of batches <= M to Kafka, report them

The child dies with the driver (`PR_SET_PDEATHSIG`, and a closed pipe ends it
too): a pusher left behind by a killed driver could otherwise write an older
state after the restarted driver wrote a newer one.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import NamedTuple

from unirec.features.config import FeaturesConfig

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


class Pushed(NamedTuple):
    """The child's answer: every batch <= `batch` is in the online store."""

    batch: int
    pushed_at: float      # time.time() when the write had completed
    seconds: float        # read outbox + write + mark pushed
    users: int
    items: int


class PushError(RuntimeError):
    """The push process failed (its traceback is the message) or died."""


GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Garbage-collector settings for a long-running ingestion process (the driver and the
    push process call this once their start-up imports are done).

    A micro-batch allocates millions of short-lived objects (records, events, states),
    so with CPython's default (a young collection every 700 net allocations, an old one
    every 100 young ones) the collector ran thousands of times per batch, each old
    collection re-scanning every object Beam, Feast and kafka-python created at import.
    Measured on 50k generated events (the batch steps without Beam): rebuilding parsed
    events after a GroupByKey 9.0 -> 2.7 us/event, parse 12.3 -> 7.7-9.6 us/event with
    collection off. So: `gc.freeze()` moves everything alive after start-up to a
    permanent generation no collection scans, and young collections run every 50,000
    allocations. Cycles are still collected; a batch's garbage is mostly freed by
    reference counting anyway."""
    import gc

    gc.collect()
    gc.freeze()
    _g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, g1, g2)


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the closed pipe still ends the child
        pass
    if os.getppid() != parent_pid:     # the parent died before prctl took effect
        os._exit(0)


def push_pending(store, online, upto: int) -> Pushed:
    """Push every state the outbox names, clear it; covers every batch <= `upto`
    (the caller knows those are committed) and whatever else was committed since."""
    t = time.perf_counter()
    pending = store.pending_push()
    if pending:
        online.push_users(pending.users)
        online.push_items(pending.items)
        pushed_at = time.time()
        store.mark_pushed(batch=pending.batch)
    else:
        pushed_at = time.time()
    return Pushed(max(upto, pending.batch), pushed_at, time.perf_counter() - t,
                  len(pending.users), len(pending.items))


def _main(conn, features_cfg: FeaturesConfig, parent_pid: int, nice: int = 0) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the driver, which closes us
    # Feast imports torch when it is installed (for its own tensor features); pushes never
    # use it, and skipping it saves seconds of start-up CPU and ~300 MB here.
    sys.modules.setdefault("torch", None)
    try:
        from unirec.features.online import OnlineStore
        from unirec.features.state import StateStore

        store, online = StateStore(features_cfg.state_path), OnlineStore(features_cfg)
        tune_gc()
        if nice:
            os.nice(nice)   # `streaming.push_nice`: see PushProcess
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            upto = msg[1] if msg[0] == "push" else None
            while conn.poll():               # coalesce: one push covers every queued batch
                msg = conn.recv()
                upto = max(upto or 0, msg[1]) if msg[0] == "push" else upto
                if msg[0] == "stop":
                    break
            if upto is not None:
                conn.send(("pushed", *push_pending(store, online, upto)))
            if msg[0] == "stop":
                conn.send(("stopped",))
                return
    except EOFError:
        return                               # the driver is gone
    except BaseException:                    # noqa: BLE001 - reported to the driver, which raises
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass


class PushProcess:
    """The driver's side: `submit(batch)` after each commit, `poll()` / `wait(batch)` for answers."""

    def __init__(self, features_cfg: FeaturesConfig, *, nice: int = 0):
        """Starts the child and returns at once: it imports Feast (seconds) while the
        driver warms up Beam; `wait_ready` then waits for it. Batches submitted before it
        is ready wait in the pipe.

        `nice` (`streaming.push_nice`) lowers the child's CPU priority once it has started.
        The driver's read-merge-commit loop is the pipeline's critical path; the push is
        asynchronous and coalesces whatever was committed meanwhile, so when the two (and
        a broker) contend for the cores, the driver should win and the pusher catch up
        with larger, fewer pushes. bench/ingest.py's generated stream, two interleaved
        rounds: 16,096 / 15,789 events/s at the same priority, 16,570 / 16,497 at nice 5,
        16,552 / 16,448 at 19."""
        ctx = mp.get_context("spawn")        # no inherited threads, locks or sockets
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_main, args=(child, features_cfg, os.getpid(), nice),
                                 name="unirec-push", daemon=True)
        self._proc.start()
        child.close()
        self.covered = 0
        self.ready = False
        self._answers: list[Pushed] = []

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the child has opened its stores (raises PushError if it failed)."""
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PushError(f"push process not ready within {timeout_s:.0f} s")
            if self._conn.poll(min(left, 1.0)):
                self._handle(self._recv())
            elif not self._proc.is_alive():
                raise PushError(f"push process died while starting (exit code {self._proc.exitcode})")

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError) as e:
            raise PushError(f"push process died (exit code {self._proc.exitcode})") from e

    def _handle(self, msg) -> None:
        if msg[0] == "error":
            raise PushError(f"push process failed:\n{msg[1]}")
        if msg[0] == "ready":
            self.ready = True
        if msg[0] == "pushed":
            p = Pushed(*msg[1:])
            self.covered = max(self.covered, p.batch)
            self._answers.append(p)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def submit(self, batch: int) -> None:
        """Batch `batch` is committed: push it (and everything before it)."""
        try:
            self._conn.send(("push", batch))
        except OSError as e:
            raise PushError(f"push process died (exit code {self._proc.exitcode})") from e

    def poll(self, timeout_s: float = 0.0) -> list[Pushed]:
        """Answers received so far (waiting up to `timeout_s` for the first)."""
        if self._conn.poll(timeout_s):
            self._handle(self._recv())
            while self._conn.poll():
                self._handle(self._recv())
        out, self._answers = self._answers, []
        return out

    def wait(self, batch: int, timeout_s: float = 600.0) -> list[Pushed]:
        """Block until every batch <= `batch` is pushed; returns the answers received."""
        deadline = time.monotonic() + timeout_s
        got: list[Pushed] = []
        while self.covered < batch:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PushError(f"batch {batch} not pushed within {timeout_s:.0f} s")
            got += self.poll(min(left, 1.0))
            if self.covered < batch and not self._proc.is_alive():
                got += self.poll()
                if self.covered < batch:
                    raise PushError(f"push process died (exit code {self._proc.exitcode})")
        return got + self.poll()

    def close(self) -> None:
        try:
            self._conn.send(("stop",))
            while self._conn.poll(30):
                if self._recv()[0] == "stopped":
                    break
        except (OSError, EOFError, PushError):
            pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


class ThreadPusher:
    """The same protocol in the driver's process: pushes in one background thread
    (`push_mode: thread`, or when the caller passes its own online store object), or
    inline in `submit` (`inline=True`). Each push reads the whole outbox, so one that
    starts after several commits covers them all, and those queued behind it find
    little left to write. A push's error is raised by `poll` / `wait`."""

    def __init__(self, state_path: str, online, *, inline: bool = False):
        from unirec.features.state import StateStore

        self.store, self.online = StateStore(state_path), online   # its own SQLite connection
        self._pool = None if inline else ThreadPoolExecutor(1, thread_name_prefix="push")
        self._futures: deque[Future] = deque()
        self._answers: list[Pushed] = []
        self.covered = 0

    def submit(self, batch: int) -> None:
        if self._pool is None:
            self._take(push_pending(self.store, self.online, batch))
        else:
            self._futures.append(self._pool.submit(push_pending, self.store, self.online, batch))

    def _take(self, p: Pushed) -> None:
        self.covered = max(self.covered, p.batch)
        self._answers.append(p)

    def poll(self, timeout_s: float = 0.0) -> list[Pushed]:
        if self._futures and timeout_s:
            futures_wait([self._futures[0]], timeout=timeout_s)
        while self._futures and self._futures[0].done():
            self._take(self._futures.popleft().result())
        out, self._answers = self._answers, []
        return out

    def wait(self, batch: int, timeout_s: float = 600.0) -> list[Pushed]:
        while self.covered < batch and self._futures:
            self._take(self._futures.popleft().result(timeout=timeout_s))
        return self.poll()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()
