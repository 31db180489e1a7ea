"""The python_tests sandbox: hostile programs end as failed verifications within their limits, and this process goes on.

Each timing bound is the limit plus a few seconds: generous, so a loaded CI machine passes,
yet far below what an unbounded loop, allocation or fork bomb would take.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from stillhouse.verify import Limits, get_verifier, run_python, verify_many

FAST = Limits(timeout_s=1.0, memory_mb=256)
SLACK_S = 5.0


def run(program: str, tests: str = "", limits: Limits = FAST):
    start = time.monotonic()
    result = run_python(program, tests, limits)
    elapsed = time.monotonic() - start
    assert elapsed < limits.timeout_s + SLACK_S, f"took {elapsed:.1f} s: {result}"
    return result


def test_a_correct_program_passes_and_a_wrong_one_fails():
    good = run("def add(a, b):\n    return a + b", "assert add(1, 2) == 3\nassert add(-1, 1) == 0")
    assert good.ok and good.outcome == "passed" and good.reason == ""
    bad = run("def add(a, b):\n    return a - b", "assert add(1, 0) == 1\nassert add(1, 2) == 3, 'add(1, 2)'")
    assert not bad.ok and bad.outcome == "failed"
    assert bad.reason == "tests failed: AssertionError: add(1, 2) (tests.py line 2: assert add(1, 2) == 3, 'add(1, 2)')"
    broken = run("def add(a, b) return a", "assert add(1, 2) == 3")
    assert broken.outcome == "error" and "syntax error in the program" in broken.reason


def test_a_looping_program_times_out():
    result = run("while True:\n    pass")
    assert result.outcome == "timeout" and result.reason == "timed out after 1.0 s"


@pytest.mark.parametrize("program", [
    "x = bytearray(10 ** 12)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))",
])
def test_a_memory_bomb_hits_the_memory_limit(program):
    result = run(program)
    assert result.outcome == "memory" and result.reason == "memory limit (256 MiB)"


@pytest.mark.parametrize("program, what", [
    ("import os\nwhile True:\n    os.fork()", "os.fork"),
    ("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '30'])", "subprocess"),
    ("import os\nos.system('sleep 30 &')", "os.system"),
    ("import multiprocessing as mp\np = mp.Process(target=print)\np.start()", "os.fork"),
    ("import pty\npty.fork()", "os.forkpty"),
])
def test_process_creation_fails_fast(program, what):
    result = run(program)
    assert result.outcome == "blocked" and result.reason == f"blocked: process creation ({what})"
    assert result.duration_s < FAST.timeout_s


def test_a_fork_bomb_that_swallows_the_error_times_out_and_says_why():
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.outcome == "timeout"
    assert result.reason == "timed out after 1.0 s (after a blocked attempt at process creation (os.fork))"


@pytest.fixture
def local_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.3)
    yield server, server.getsockname()[1]
    server.close()


def assert_no_connection(server):
    with pytest.raises(socket.timeout):
        server.accept()


@pytest.mark.parametrize("connect", [
    "socket.create_connection(('127.0.0.1', {port}), timeout=2)",
    "socket.socket().connect(('127.0.0.1', {port}))",
    "socket.create_connection(('192.0.2.1', 80), timeout=2)",  # TEST-NET-1: an external address
    "socket.create_connection(('example.com', 80), timeout=2)",
    "__import__('urllib.request').request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
])
def test_network_attempts_are_refused(local_server, connect):
    server, port = local_server
    result = run("import socket\n" + connect.format(port=port))
    assert not result.ok and result.outcome == "blocked" and result.reason.startswith("blocked: network (socket.")
    assert_no_connection(server)


def test_the_network_namespace_holds_when_the_python_block_is_undone(local_server):
    server, port = local_server
    # Reloading _socket restores the real socket type: only the namespace stands in the way now.
    program = (f"import sys\ndel sys.modules['_socket'], sys.modules['socket']\nimport _socket\n"
               f"_socket.socket().connect(('127.0.0.1', {port}))")
    result = run(program)
    if result.isolation.get("network") != "namespace":
        pytest.skip(f"no network namespace here: {result.isolation.get('network')}")
    assert not result.ok and "Network is unreachable" in result.reason
    assert_no_connection(server)


def test_ctypes_is_blocked():
    result = run("import ctypes")
    assert result.outcome == "blocked" and result.reason == "blocked: ctypes (import ctypes)"


def test_a_program_that_prints_a_lot_does_not_hang():
    result = run("for i in range(400_000):\n    print('line', i)", "assert True")
    assert result.ok and result.stdout.endswith("line 399999\n") and len(result.stdout) <= 4000


def test_output_past_the_file_size_limit_fails():
    result = run("while True:\n    print('x' * 10_000)", limits=Limits(timeout_s=1.0, file_size_mb=2))
    assert result.outcome == "file_size" and result.reason.startswith("file size limit (2 MiB")


@pytest.mark.parametrize("program", ["import sys\nsys.exit(0)", "import os\nos._exit(0)"])
def test_exiting_before_the_tests_is_a_failure(program):
    result = run(program, "assert False")
    assert result.outcome == "exited" and result.reason.startswith("exited early:")


def test_the_caller_environment_and_user_do_not_leak(monkeypatch):
    monkeypatch.setenv("STILLHOUSE_TEST_SECRET", "sk-do-not-leak")
    result = run("import os\nprint(os.getuid())", "assert 'STILLHOUSE_TEST_SECRET' not in os.environ")
    assert result.ok, result.reason
    # Started as root, the child is root only where the drop to nobody was not possible.
    dropped = result.isolation["user"] == "nobody"
    assert (int(result.stdout) != 0) == (dropped or os.geteuid() != 0)


def test_python_tests_verifier_and_verify_many():
    v = get_verifier("python_tests", {"timeout_s": 1.0, "memory_mb": 256, "concurrency": 4})
    solution = "Here it is:\n```python\ndef square(x):\n    return x * x\n```\nDone."
    tests = ["assert square(3) == 9", "assert square(-2) == 4"]
    completions = [solution, solution.replace("x * x", "x + x"), "no code at all", solution.replace("return", "while True: pass\n    return")]
    start = time.monotonic()
    verdicts = verify_many(v, completions, [tests] * len(completions))
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert [d.ok for d in verdicts] == [True, False, False, False]
    assert verdicts[0].extracted == "def square(x):\n    return x * x\n"
    assert verdicts[1].reason.startswith("tests failed: AssertionError")
    assert verdicts[2].reason == "program error: syntax error in the program: invalid syntax (line 1)"
    assert verdicts[3].reason == "timed out after 1.0 s"
