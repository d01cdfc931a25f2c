"""One model call at a time: a single worker thread and a bounded queue of jobs in front of it.

A request becomes a `Job` (a function of the pipeline); `submit` refuses it when the queue
is full (the server answers 429 with Retry-After). A client that goes away before its job
starts has the job cancelled, which frees its place; a job that streams checks
`job.cancelled` between frames and stops early. Every job ends with a result or an error,
so no request is lost silently.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `size` jobs already."""


@dataclass
class Job:
    """One request's work: `fn(job)` runs on the worker thread; its return value resolves `future`."""

    fn: Callable[[Job], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)


class ModelWorker:
    """Runs jobs one at a time, in order, on one thread (one model call at a time per device)."""

    def __init__(self, size: int):
        self.size = size
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.pending = 0  # queued or running
        self.lock = threading.Lock()
        self.seconds_per_job = 1.0  # a running mean, for Retry-After
        self.thread = threading.Thread(target=self._run, name="dalle-model", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[Job], Any]) -> Job:
        with self.lock:
            if self.pending >= self.size:
                raise QueueFull(f"{self.pending} requests are queued (at most {self.size})")
            self.pending += 1
        job = Job(fn)
        self.jobs.put(job)
        return job

    def retry_after(self) -> int:
        """Seconds until a place is likely free."""
        return max(1, round(self.seconds_per_job))

    def queue_length(self) -> int:
        return self.pending

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            started = time.monotonic()
            try:
                if job.cancelled:  # its client went away while it waited
                    job.future.cancel()
                    continue
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn(job))
                    except BaseException as error:  # handed to the request, which answers with it
                        job.future.set_exception(error)
            finally:
                with self.lock:
                    self.pending -= 1
                self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.monotonic() - started)
