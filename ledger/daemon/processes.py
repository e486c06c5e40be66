"""The daemon as two processes, when ``[daemon] privileged_socket`` is set.

This process serves the privileged socket (mode 0600, owned by the SlurmUser: slurmctld's
job_submit.lua and root) and nothing else. A child process serves the main socket —
users' ``balance``/``quote``/``jobs`` and root's CLI — at a lower CPU priority. However
hard users flood the main socket (connections, slow lines, expensive requests), the
privileged process shares no connection slots, no threads and no interpreter lock with
that work, and the kernel runs it first. The main socket is bound here, before the child
starts, and handed to it as an inherited descriptor; a child that dies is started again.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from .server import Server

USER_NICE = 19  # the users' process runs at this niceness (the least CPU share)
PRIVILEGED_NICE = -10  # and slurmctld's at this one, where the daemon may raise it (root)
PARENT_ENV = "GPULEDGER_SERVE_PARENT"  # the privileged process's pid, for the users' one
PR_SET_PDEATHSIG = 1
RESTART_DELAY = 1.0  # s before a child that died is started again
STOP_TIMEOUT = 5.0


def public_command(config_path: str | None, fd: int, metrics_fd: int | None = None
                   ) -> list[str]:
    """How this process starts the users' one: the same CLI, serving the inherited socket
    (and the metrics endpoint's, when there is one)."""
    args = [sys.executable, "-c", "from ledger.cli import main; main()"]
    if config_path:
        args += ["--config", config_path]
    extra = ["--inherited-metrics-fd", str(metrics_fd)] if metrics_fd is not None else []
    return [*args, "serve", "--inherited-fd", str(fd), *extra]


class TwoProcesses:
    """Runs ``privileged`` here and a child serving ``public``'s socket; stops both."""

    def __init__(self, privileged: Server, public: Server, config_path: str | None):
        self.privileged = privileged
        self.public = public
        self.config_path = config_path
        self._stopping = threading.Event()
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        # the metrics endpoint's listening socket (ledger.daemon.endpoint), bound here and
        # served by the users' process; None: no endpoint
        self.metrics_listener = None

    def bind(self) -> None:
        self.public.bind()
        try:
            self.privileged.bind()
        except BaseException:
            self.public.stop()
            raise

    def _start_child(self) -> None:
        fd = self.public.fileno()
        metrics = self.metrics_listener.fileno() if self.metrics_listener is not None else None
        with self._lock:
            if self._stopping.is_set():
                return
            self._child = subprocess.Popen(public_command(self.config_path, fd, metrics),
                                           pass_fds=(fd,) if metrics is None else (fd, metrics),
                                           stdin=subprocess.DEVNULL,
                                           env={**os.environ, PARENT_ENV: str(os.getpid())})
        self.public.log.event(event="started", role="users", pid=self._child.pid,
                              socket=self.public.path)

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            child = self._child
            code = child.wait() if child is not None else None
            if self._stopping.is_set():
                return
            self.public.log.event(event="exited", role="users", pid=child.pid if child else "-",
                                  code=code, restart_in=f"{RESTART_DELAY:g}")
            time.sleep(RESTART_DELAY)
            self._start_child()

    def serve_forever(self) -> None:
        set_priority(PRIVILEGED_NICE)
        self._start_child()
        threading.Thread(target=self._supervise, daemon=True).start()
        self.privileged.serve_forever()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            child = self._child
        self.privileged.stop()
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.public.stop()
        if self.metrics_listener is not None:
            self.metrics_listener.close()


def set_priority(nice: int) -> None:
    """This process's niceness, absolute; left as it is where not permitted."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass


def as_users_process() -> None:
    """Set up the users' process: the kernel runs the privileged one first, and this one
    ends with it (else it would keep the main socket, and a restarted daemon find it taken)."""
    set_priority(USER_NICE)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):  # it died before prctl took effect
        os._exit(0)
