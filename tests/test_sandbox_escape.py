"""The Python sandbox under attack, in every namespace mode this machine allows (bwrap, unshare): reading a
file outside its dir, writing outside it, opening a socket, a fork bomb, filling the disk and an infinite
loop all fail, every time, and leave nothing running. A control program proves each mode runs code at all."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from llmlab.eval.sandbox import Limits, available_modes, isolation_report, run_program

FAST = Limits(cpu_seconds=2, wall_seconds=4.0, disk_bytes=2 << 20)
NAMESPACE_MODES = [m for m in available_modes() if m != "rlimits"]
modes = pytest.mark.parametrize(
    "mode", NAMESPACE_MODES or [pytest.param("none", marks=pytest.mark.skip(reason="no namespaces here"))]
)


@modes
def test_control_program_runs_and_sees_its_input_file(mode):
    r = run_program("print(open('data.csv').read().strip())", FAST, mode=mode, files={"data.csv": "a,b\n1,2"})
    assert r.passed and r.output.strip() == "a,b\n1,2"
    assert mode in isolation_report(mode) and "NO network" not in isolation_report(mode)


@modes
def test_reading_a_file_outside_the_dir_fails(mode, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-7431")
    secret.chmod(0o644)
    r = run_program(f"print(open({str(secret)!r}).read())", FAST, mode=mode)
    assert not r.passed and "TOP-SECRET-7431" not in r.output


@modes
def test_writing_outside_the_dir_fails(mode, tmp_path):
    tmp_path.chmod(0o777)
    target = tmp_path / "planted.txt"
    prog = f"open({str(target)!r}, 'w').write('x')\nopen('/usr/planted.txt', 'w').write('x')\nprint('wrote')"
    r = run_program(prog, FAST, mode=mode)
    assert not r.passed and "wrote" not in r.output
    assert not target.exists() and not os.path.exists("/usr/planted.txt")


@modes
def test_opening_a_socket_fails(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    r = run_program(
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')",
        FAST,
        mode=mode,
    )
    assert not r.passed and "connected" not in r.output
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def _sandbox_processes() -> int:
    r = subprocess.run(["pgrep", "-fc", "-I -S prog.py"], capture_output=True, text=True)
    return int(r.stdout.strip() or 0)


@modes
def test_fork_bomb_is_contained_and_cleaned_up(mode):
    r = run_program("import os\nwhile True:\n    os.fork()\n", FAST, mode=mode)
    assert not r.passed
    time.sleep(0.3)
    assert _sandbox_processes() == 0


@modes
def test_filling_the_disk_stops_at_the_dir_quota(mode):
    before = shutil.disk_usage("/tmp").free
    prog = (
        "n = 0\ntry:\n    for i in range(10000):\n        open(f'f{i}', 'wb').write(b'x' * 65536)\n        n += 1\n"
        "finally:\n    print('files', n)\n"
    )
    r = run_program(prog, FAST, mode=mode)
    assert not r.passed and "No space left" in r.output
    written = int(r.output.split("files")[1].split()[0])
    assert written * 65536 <= FAST.disk_bytes  # stopped at the quota, far below the 655 MB it asked for
    assert shutil.disk_usage("/tmp").free > before - (64 << 20)


@modes
def test_infinite_loop_is_killed(mode):
    r = run_program("while True:\n    pass\n", Limits(cpu_seconds=1, wall_seconds=3.0), mode=mode)
    assert not r.passed and r.status in ("failed", "timeout")
    assert _sandbox_processes() == 0
