"""The sandbox's child: run as a script by `stillhouse.verify.sandbox`, never imported.

It starts as the caller's user with `python -I -S -B`, reads its job, isolates itself
(network namespace, resource limits, an unprivileged user), blocks process creation and
sockets at the Python level, then runs the program and its tests in one namespace and
reports the outcome on the status pipe as nonce-tagged JSON lines. Only the standard
library is used: with -I -S no site-packages are on the path.
"""

import errno
import json
import os
import resource
import signal
import stat
import sys
import traceback
import types

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38


class SandboxViolation(PermissionError):
    """Raised by every blocked operation; a PermissionError, as an OS sandbox would give."""


def main() -> None:
    job_path = sys.argv[1]
    with open(job_path) as f:
        job = json.load(f)
    os.unlink(job_path)  # the nonce is on no disk the program can read
    nonce, status_fd, limits = job["nonce"], job["status_fd"], job["limits"]

    def send(event: dict) -> None:
        try:
            os.write(status_fd, (json.dumps({"nonce": nonce, **event}) + "\n").encode())
        except OSError:  # the program closed or filled the pipe; a missing "done" fails the run
            pass

    libc = _libc()
    isolation = {"network": "python-level only (unshare refused)", "user": "unchanged"}
    _set_limits(limits)
    if os.geteuid() == 0:
        if _unshare(libc, CLONE_NEWNET):
            isolation["network"] = "namespace"
        isolation["user"] = _drop_root(libc)
    # Root without CAP_SYS_ADMIN (a container) gets here as nobody, so the user namespace
    # it may still create does not leave it root outside, with RLIMIT_NPROC ignored.
    if isolation["network"] != "namespace" and _unshare(libc, CLONE_NEWUSER | CLONE_NEWNET):
        isolation["network"] = "namespace"
    if libc is None:
        isolation["network"] = "python-level only (no ctypes)"
    # Die with the caller, and never regain privileges through a setuid binary.
    _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    send({"event": "isolation", **isolation})

    reported: set = set()

    def violation(kind: str, what: str):
        if kind not in reported:
            reported.add(kind)
            send({"event": "blocked", "kind": kind, "what": what})
        raise SandboxViolation(f"{what} is blocked in the sandbox (no {kind})")

    _block(violation)
    del libc

    def done(outcome: str, detail: str = "") -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a full disk or closed stream must not hide the outcome
                pass
        send({"event": "done", "outcome": outcome, "detail": detail[:1000]})  # an assert may carry megabytes
        os._exit(0 if outcome == "passed" else 1)  # skips atexit hooks and threads the program left

    # A real module, so dataclasses, pickle and typing find it in sys.modules; not __main__,
    # so a program's `if __name__ == "__main__":` block (which often reads stdin) stays idle.
    module = types.ModuleType("solution")
    module.__file__ = "solution.py"
    sys.modules["solution"] = module
    sys.argv = ["solution.py"]
    for label, source in (("program", job["program"]), ("tests", job["tests"])):
        filename = "solution.py" if label == "program" else "tests.py"
        failed = "error" if label == "program" else "failed"
        try:
            code = compile(source, filename, "exec")
        except SyntaxError as e:
            done(failed, f"syntax error in the {label}: {e.msg}" + (f" (line {e.lineno})" if e.lineno else ""))
        except (ValueError, MemoryError) as e:
            done(failed, f"the {label} does not compile: {type(e).__name__}: {e}")
        try:
            exec(code, module.__dict__)
        except MemoryError:
            done("memory", "")
        except SystemExit as e:
            from_program = any(f.filename == "solution.py" for f in traceback.extract_tb(e.__traceback__))
            if label == "tests" and not from_program and e.code in (0, None):
                break  # the tests ended themselves successfully (unittest.main does)
            who = "program" if from_program or label == "program" else "tests"
            done("exited", f"the {who} called sys.exit({e.code!r}) before the tests finished")
        except SandboxViolation as e:
            done("blocked", str(e))
        except OSError as e:
            if e.errno == errno.EFBIG:  # RLIMIT_FSIZE, most often stdout grown past it
                done("file_size", "")
            done(failed, _describe(e, filename, source))
        except BaseException as e:  # noqa: BLE001 - whatever the code raised is its verdict
            done(failed, _describe(e, filename, source))
    done("passed")


def _describe(e: BaseException, filename: str, source: str) -> str:
    """`Type: message`, and for an error raised in `filename`, where and which line."""
    what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
    if frames and frames[-1].lineno:
        lines = source.splitlines()
        n = frames[-1].lineno
        line = lines[n - 1].strip() if 0 < n <= len(lines) else ""
        what += f" ({filename} line {n}: {line[:200]})"
    return what


def _libc():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except Exception:  # noqa: BLE001 - no ctypes: Python-level blocks only
        return None


def _unshare(libc, flags: int) -> bool:
    """Enter new namespaces; a new network namespace has only a loopback device, and it is down."""
    unshare = getattr(libc, "unshare", None)  # Linux only
    return unshare is not None and unshare(flags) == 0


def _prctl(libc, option: int, value: int) -> bool:
    prctl = getattr(libc, "prctl", None)  # Linux only
    return prctl is not None and prctl(option, value, 0, 0, 0) == 0


def _set_limits(limits: dict) -> None:
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb),
                       (resource.RLIMIT_NPROC, limits["max_processes"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    # The soft limit sends SIGXCPU (reported as such); the hard one a second later is SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))


def _drop_root(libc) -> str:
    """Become `nobody`, so RLIMIT_NPROC holds and root's powers are gone; keep root if that would break imports.

    The standard library may sit under a directory `nobody` cannot traverse (pyenv under
    /root). Its directories are opened now and put on sys.path as /proc/self/fd/N, which
    resolve without walking their parents; that needs the process to stay dumpable.
    """
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        uid = gid = 65534
    if libc is None or not os.path.isdir("/proc/self/fd"):
        return "unchanged (root): no way to keep the standard library reachable"
    new_path = []
    for entry in sys.path:
        try:
            st = os.stat(entry)
        except OSError:
            continue
        need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        if st.st_mode & need != need:
            return f"unchanged (root): {entry} is not readable by nobody"
        new_path.append(f"/proc/self/fd/{os.open(entry, os.O_RDONLY)}")
    try:
        os.chown(".", uid, gid)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        return f"unchanged (root): {e}"
    _prctl(libc, PR_SET_DUMPABLE, 1)
    sys.path[:] = new_path
    sys.path_importer_cache.clear()
    return "nobody"


def _block(violation) -> None:
    """Block process creation, signalling, sockets, name lookups, rlimit changes and importing ctypes.

    Patches the module objects themselves (os and posix, _posixsubprocess, socket and
    _socket, resource), so `import socket` again hands back the patched module.
    """
    import _posixsubprocess
    import _socket
    import posix
    import socket

    def blocker(kind, what):
        def blocked(*args, **kwargs):
            violation(kind, what)

        return blocked

    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
                 "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
                 "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, blocker("process creation", f"os.{name}"))
    _posixsubprocess.fork_exec = blocker("process creation", "subprocess")

    def blocked_class(base, what):
        # A subclass rather than a function, so `class SSLSocket(socket)` in ssl still imports.
        class Blocked(base):
            def __init__(self, *args, **kwargs):
                violation("network", what)

        Blocked.__name__ = Blocked.__qualname__ = base.__name__
        return Blocked

    _socket.socket = _socket.SocketType = blocked_class(_socket.socket, "socket.socket")
    socket.socket = socket.SocketType = blocked_class(socket.socket, "socket.socket")
    for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        for module in (socket, _socket):
            if hasattr(module, name):
                setattr(module, name, blocker("network", f"socket.{name}"))
    resource.setrlimit = blocker("limit changes", "resource.setrlimit")
    resource.prlimit = blocker("limit changes", "resource.prlimit")

    class NoCtypes:
        """Refuses ctypes, the ready way around every block above; the harness's own copy is dropped first."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in ("ctypes", "_ctypes"):
                violation("ctypes", f"import {name}")
            return None

    for name in [m for m in sys.modules if m.partition(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]
    sys.meta_path.insert(0, NoCtypes)


if __name__ == "__main__":
    main()
