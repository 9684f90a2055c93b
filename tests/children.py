"""Child processes of the test run that can never outlive it.

Every harness here (monerod and wallets, tors, PostgreSQL, the daemon under test) starts its
programs with :func:`dies_with_parent` as ``preexec_fn``: ``PR_SET_PDEATHSIG`` makes the kernel
SIGKILL the child when its parent goes, even when the test run itself is SIGKILLed.

Linux sends that signal when the *thread* that forked the child ends, not the process: a child
forked from a short-lived thread (a ``deferToThread`` pool thread) would die with that thread.
:class:`Forker` is one long-lived thread to fork from.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def dies_with_parent(
    user: pwd.struct_passwd | None = None, umask: int | None = None
) -> Callable[[], None]:
    """A ``preexec_fn``: optionally drop to *user* and set *umask*, then die with the parent
    (thread)."""
    # Resolved before fork: the child should do as little as possible between fork and exec.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if umask is not None:
            os.umask(umask)
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)  # a credential change clears the death signal: set it after
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent was gone before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Forker:
    """One long-lived thread that forks children on behalf of any caller thread."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        done: Future[T] = Future()
        self._jobs.put((fn, done))
        return done.result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
