"""Processes that wait for a file write by another process without waiting in a collective operation.

Process 0 writes the checkpoint and the model and optimizer state while the others wait. Inside a collective, that
wait is cut at the process group's timeout (--dist-timeout), so a write that is slow but going on (a DeiT-B state
to a busy shared disk) would stop the run. Here each process instead tells the others through the process group's
key-value store (the one torchrun and accelerate set up) that its write is over, with its problem if it had one,
and beats while it writes; a waiting process gives up only when a process has shown no progress for --dist-timeout.
Written by hand: neither accelerate nor torch has a wait that outlasts the group's timeout while its peer is alive.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch.distributed as dist

from distill.errors import ProcessStalled

BEAT_SECONDS = 1.0  # how often a writing process says it is alive (more often under a --dist-timeout below 4 s)
POLL_SECONDS = 0.05
_calls = itertools.count()  # every process makes the same calls in the same order, so the numbers agree


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def beat_interval(timeout: float) -> float:
    """Seconds between heartbeats: at least four within the timeout the waiting processes allow."""
    return min(BEAT_SECONDS, timeout / 4)


def several_processes() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def beat() -> None:
    """One heartbeat of this process, from work that shows its own progress (a shard of the teacher cache written)."""
    if several_processes():
        _store().add(f"distill/beat/{dist.get_rank()}", 1)


@contextmanager
def beating(timeout: float) -> Iterator[None]:
    """While the body runs, this process's heartbeat counter goes up every `beat_interval(timeout)` seconds: for one
    long call (a file write) that cannot report progress, it says the process is alive, not that the call advances."""
    store, rank, interval = _store(), dist.get_rank(), beat_interval(timeout)
    stop = threading.Event()

    def beating_thread() -> None:
        while not stop.wait(interval):
            try:
                store.add(f"distill/beat/{rank}", 1)
            except Exception:  # a store that does not answer for a moment: try again at the next beat
                continue

    thread = threading.Thread(target=beating_thread, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _answer(problem: str | None) -> int:
    """Give this process's answer to the next wait (its problem, or ""); returns the wait's number."""
    store, rank = _store(), dist.get_rank()
    call = next(_calls)
    store.set(f"distill/done/{call}/{rank}", problem or "")
    if call >= 2:  # every process has read call - 2's answers before it gave its answer to call - 1
        store.delete_key(f"distill/done/{call - 2}/{rank}")
    return call


def settle(problem: str | None, timeout: float, doing: str) -> str | None:
    """Tell every process that this one's part is done (with its problem, or None), wait for all of theirs, and
    return the first problem any process had. A process that neither finishes nor beats for `timeout` seconds stops
    the wait with a sentence naming it and what it was `doing`."""
    store, rank, world = _store(), dist.get_rank(), dist.get_world_size()
    call = _answer(problem)
    answers: dict[int, str] = {rank: problem or ""}
    started = time.monotonic()
    heard = {other: (None, started) for other in range(world) if other != rank}
    while len(answers) < world:
        for other in [r for r in heard if r not in answers]:
            key = f"distill/done/{call}/{other}"
            if store.check([key]):
                answers[other] = store.get(key).decode()
                continue
            beat_count, since = heard[other]
            now_beat = store.add(f"distill/beat/{other}", 0)
            if now_beat != beat_count:
                heard[other] = (now_beat, time.monotonic())
            elif time.monotonic() - since > timeout:
                raise ProcessStalled(f"Process {rank} waited more than --dist-timeout {timeout:g} s for process {other} "
                                     f"while it was {doing}, and it showed no progress: it stopped or hangs; see its "
                                     "output.")
        # polled often at first, then at most once a second: a long wait of many processes loads process 0's store less
        time.sleep(min(1.0, timeout / 8, POLL_SECONDS + (time.monotonic() - started) / 100))
    return next((answers[r] for r in range(world) if answers[r]), None)


def shared_outcome(attempt: Callable[[], str | None], runs_here: bool, timeout: float, doing: str,
                   shows_progress: bool = False) -> str | None:
    """Run `attempt` on this process when `runs_here`, then settle with every process: the first problem any
    process's attempt returned, or None. Meanwhile this process beats: by itself when `shows_progress` (the attempt
    calls `beat()` as it advances), else from a thread. An exception the attempt does not turn into a problem is given
    to the others as this process's answer, without waiting for theirs (they stop with it as soon as they wait), then
    raised here."""
    many = several_processes()
    problem = None
    if runs_here:
        try:
            with beating(timeout) if many and not shows_progress else nullcontext():
                problem = attempt()
        except BaseException as error:
            if many:
                first = (str(error).strip().splitlines() or [""])[0]
                try:
                    _answer(f"Process {dist.get_rank()} failed while {doing} ({type(error).__name__}: {first}).")
                except Exception:  # the store is gone too: this process's own error says more
                    pass
            raise
    return settle(problem, timeout, doing) if many else problem
