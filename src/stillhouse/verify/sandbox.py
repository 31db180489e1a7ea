"""Run untrusted Python (a model's program and an item's unit tests) in a limited subprocess.

`run_python(program, tests, limits)` starts `python -I -S -B` (isolated mode: no
environment variables, no site-packages, no user site, no script directory on the path;
only the standard library) in a fresh temporary working directory, with an environment of
PATH, HOME, TMPDIR and LC_ALL only, so no API key of the caller reaches it. The child runs
the program, then the tests, in one module namespace named `solution`, and reports the
outcome over a private pipe; the caller reads it, cleans up, and answers a `SandboxResult`
whose `reason` names the limit or block that ended the run.

What is guaranteed, wherever this runs (Linux, any user):

* Wall clock: after `timeout_s` the child's whole process group (it is started in its own
  session) is killed with SIGKILL; `run_python` returns soon after, reason "timed out".
* Memory: RLIMIT_AS caps the address space at `memory_mb` (reason "memory limit").
* CPU: RLIMIT_CPU, soft `cpu_s` (SIGXCPU) and hard one second later (SIGKILL).
* Files: RLIMIT_FSIZE caps every file the child writes, its stdout and stderr included
  (these go to files, never a pipe, so a program that prints a lot cannot block).
  No core dumps (RLIMIT_CORE 0).
* The child dies with its caller (PR_SET_PDEATHSIG) and cannot gain privileges through a
  setuid binary (PR_SET_NO_NEW_PRIVS).
* A pass needs the child's harness to report, tagged with a per-run nonce, that the tests
  ran to the end: `sys.exit(0)` or `os._exit(0)` in the program is a failure.

What holds where the OS allows it (`SandboxResult.isolation` says what this run got):

* Network: the child moves itself into a new network namespace (`unshare(CLONE_NEWNET)`,
  as root, else inside a new user namespace where unprivileged ones are allowed). That
  namespace has only a loopback device, down: no socket reaches the host's 127.0.0.1 or
  anything outside, however it is made (ctypes included). Unix sockets bound to a path
  are files, not network: the namespace does not hide them (file permissions do, for
  `nobody`; the Python-level block covers every socket). Where neither is permitted
  (some containers), only the Python-level block below stands between the program and
  the network.
* User: started as root, the child becomes `nobody` before the program runs, so
  RLIMIT_NPROC is enforced (root ignores it), root's file access and its right to signal
  other processes are gone. It stays root if `nobody` could not read the standard library.

What is only a Python-level block (the program sees `PermissionError`; the first attempt of
each kind is named in the reason): os.fork/forkpty/system/popen/exec*/spawn*/posix_spawn*/
kill/killpg (in `os` and `posix`), subprocess and multiprocessing (through
`_posixsubprocess.fork_exec`), pty, every socket constructor, name lookups,
resource.setrlimit/prlimit, and importing ctypes. The patches are on the module objects,
so importing a module again returns the patched one; but a program that sets out to undo
them (reloading an extension module, reaching a saved reference, or ctypes re-imported
after deleting the block) can. Then the namespace still holds for the network, RLIMIT_NPROC
for processes when the child is `nobody`, and the process-group kill and RLIMIT_CPU for
what it started, except a process that also leaves the group with setsid(), which the
group kill does not reach (it still dies of RLIMIT_CPU).

Not guaranteed at all: filesystem isolation (the temporary directory is a working
directory, not a chroot: the program can read what its user can read, and write what its
user can write, each file capped by RLIMIT_FSIZE) and a verdict safe from a program that
attacks the harness in its own interpreter (it could find the nonce in memory). The
sandbox protects the machine and makes honest mistakes fail; it is not a judge of
adversarial code.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_CHILD = Path(__file__).with_name("_child.py")
_TAIL = 4000  # characters of stdout/stderr kept on a result


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use. `cpu_s` None means the wall-clock limit, rounded up, plus one."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    cpu_s: int | None = None
    file_size_mb: int = 16
    max_processes: int = 64

    def cpu_limit(self) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed run ended.

    `outcome` is one of: passed, failed (the tests raised), error (the program raised or
    does not compile), exited (sys.exit/os._exit before the tests finished), blocked,
    timeout, memory, cpu, file_size, crashed. `reason` says it in words ("" when passed).
    """

    outcome: str
    reason: str
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)
    blocked: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.outcome == "passed"


def run_python(program: str, tests: str = "", limits: Limits | None = None) -> SandboxResult:
    """Run `program` and then `tests` in a sandboxed `python -I -S` subprocess; never raises for what they do."""
    limits = limits or Limits()
    nonce = secrets.token_hex(16)
    tmp = Path(tempfile.mkdtemp(prefix="stillhouse-sandbox-"))
    read_end, write_end = os.pipe()
    try:
        job = tmp / ".job.json"
        job.write_text(json.dumps({
            "nonce": nonce, "status_fd": write_end, "program": program, "tests": tests,
            "limits": {"memory_mb": limits.memory_mb, "file_size_mb": limits.file_size_mb,
                       "max_processes": limits.max_processes, "cpu_s": limits.cpu_limit()}}))
        job.chmod(0o600)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LC_ALL": "C.UTF-8"}
        with open(tmp / ".stdout", "wb") as out, open(tmp / ".stderr", "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-X", "utf8", str(_CHILD), str(job)],
                cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                pass_fds=(write_end,), start_new_session=True, close_fds=True)
        os.close(write_end)
        write_end = -1
        timed_out = not _wait_exit(proc.pid, limits.timeout_s)
        # Killed before reaping, so the group id cannot yet belong to anyone else; this also
        # ends whatever the program left running in its group after a normal exit.
        _kill_group(proc.pid)
        returncode = proc.wait()
        duration = time.monotonic() - start
        events = _read_events(read_end, nonce)
        stdout, stderr = _tail(tmp / ".stdout"), _tail(tmp / ".stderr")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        shutil.rmtree(tmp, ignore_errors=True)

    isolation = next(({k: v for k, v in e.items() if k not in ("nonce", "event")}
                      for e in events if e["event"] == "isolation"), {})
    blocked = tuple(f"{e['kind']} ({e['what']})" for e in events if e["event"] == "blocked")
    done = next((e for e in events if e["event"] == "done"), None)
    outcome, reason = _verdict(done, timed_out, returncode, stderr, blocked, limits)
    return SandboxResult(outcome, reason, returncode, round(duration, 3), stdout, stderr, isolation, blocked)


def _verdict(done: dict | None, timed_out: bool, returncode: int, stderr: str,
             blocked: tuple[str, ...], limits: Limits) -> tuple[str, str]:
    after_block = f" (after a blocked attempt at {blocked[0]})" if blocked else ""
    if timed_out:
        return "timeout", f"timed out after {float(limits.timeout_s)!r} s{after_block}"
    if done is not None:
        outcome, detail = done["outcome"], done["detail"]
        if outcome == "passed":
            return outcome, ""
        if outcome == "memory":
            return outcome, f"memory limit ({limits.memory_mb} MiB)"
        if outcome == "file_size":
            return outcome, f"file size limit ({limits.file_size_mb} MiB; stdout and stderr count)"
        if outcome == "blocked":
            return outcome, f"blocked: {blocked[0] if blocked else detail}"
        label = {"failed": "tests failed", "error": "program error", "exited": "exited early"}.get(outcome, outcome)
        if blocked and outcome in ("failed", "error"):
            # A library that wraps the PermissionError (urllib's URLError) still failed because of the block.
            return "blocked", f"blocked: {blocked[0]}; then {label}: {detail}"
        return outcome, f"{label}: {detail}{after_block}"
    if returncode == -signal.SIGXCPU or returncode == -signal.SIGKILL:
        return "cpu", f"CPU time limit ({limits.cpu_limit()} s)"
    if "MemoryError" in stderr[-1000:]:
        return "memory", f"memory limit ({limits.memory_mb} MiB)"
    if returncode == -signal.SIGXFSZ:
        return "file_size", f"file size limit ({limits.file_size_mb} MiB)"
    if returncode < 0:
        return "crashed", f"crashed with {signal.Signals(-returncode).name}{after_block}"
    last = stderr.strip().splitlines()[-1:]
    said = f" ({last[0][:200]})" if last and returncode != 0 else ""
    return "exited", (f"exited early: the process ended with status {returncode} before the tests finished"
                      f"{said}{after_block}")


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until `pid` has exited, without reaping it; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # before Linux 5.3: poll without reaping
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
            time.sleep(0.005)
        return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_events(fd: int, nonce: str) -> list[dict]:
    """The harness's status lines; a line without this run's nonce is the program's, ignored."""
    os.set_blocking(fd, False)  # whatever escaped the group kill may hold the write end open
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    events = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("nonce") == nonce and "event" in event:
            events.append(event)
    return events


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
