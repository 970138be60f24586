"""One thread for a server's torch work, so that only one OpenMP thread pool ever exists.

A server answers requests on many threads (gradio: a pool of workers; concurrent requests get different
ones). With GNU OpenMP (torch's CPU backend on Linux), every thread that runs a parallel op gets its own
pool of OpenMP threads, and once the pools together hold more threads than there are cores, libgomp stops
spinning between parallel regions and puts its threads to sleep instead, for the life of the process.
After one burst of concurrent requests, every later forward of the mnist UNet was markedly slower
(docs/app-performance.md). A model loaded on the main thread at start-up (``--model``) would start a second
pool too. Running all torch work, loading
included, on one long-lived thread keeps a single pool, as in a script.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["on_compute_thread"]

Result = TypeVar("Result")

_PREFIX = "steindiff-compute"
_COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_PREFIX)


def on_compute_thread(fn: Callable[..., Result], *args, **kwargs) -> Result:
    """``fn(*args, **kwargs)`` on the compute thread, in the caller's context (gradio's progress lives
    in context variables); waits for it and returns its result or raises its exception. Calls from
    several threads run one after the other."""
    if threading.current_thread().name.startswith(_PREFIX):  # already there: waiting on itself would hang
        return fn(*args, **kwargs)
    context = contextvars.copy_context()
    return _COMPUTE.submit(context.run, fn, *args, **kwargs).result()
