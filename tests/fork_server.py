"""A server that runs Python commands started by other programs (scripts/benchmark.py's workers) in processes forked
from one that has the libraries imported, as preloaded_python.py does for the commands the tests run themselves.

A worker process spends about 10 s of a 2-core machine importing torch, transformers, peft and TRL, and the benchmark
tests start ten. Started with tests/fork_client/ on PYTHONPATH and QLORA_TEST_FORK_SERVER=SOCKET in its environment,
a new Python (its sitecustomize) sends its command line, folder, environment and standard streams to the server at
SOCKET and exits as the forked command exits; the command's output goes straight to the streams it was given. The
server declines a Python whose environment is not its own (the libraries read some of it at import) or whose command
line it does not take, and that Python then starts as usual.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from preloaded_python import PRELOADED, finish_command

CLIENT_DIR = Path(__file__).resolve().parent / "fork_client"
SOCKET_VARIABLE = "QLORA_TEST_FORK_SERVER"
# set per test by pytest; the libraries do not read it at import
IGNORED = ("PYTEST_CURRENT_TEST",)


def start_server(socket_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """The server at `socket_path` for Pythons started with `env` (which names the socket and tests/fork_client/);
    it takes connections at once and serves them once it has imported the libraries."""
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(socket_path)], env=env)
    while not socket_path.exists():
        if server.poll() is not None:
            raise RuntimeError(f"the fork server ended (exit code {server.returncode})")
        time.sleep(0.05)
    return server


def comparable(env: dict[str, str]) -> dict[str, str]:
    """`env` less what the libraries never read at import; PYTHONPATH without repeated folders (scripts/benchmark.py
    puts the repository in front of it again for its workers), which import what it imports."""
    folders = env.get("PYTHONPATH", "").split(os.pathsep)
    python_path = os.pathsep.join(folder for index, folder in enumerate(folders) if folder not in folders[:index])
    return {**{name: value for name, value in env.items() if name not in IGNORED}, "PYTHONPATH": python_path}


def _serve(socket_path: str) -> None:
    started_with = comparable(dict(os.environ))  # before the libraries add to it as they are imported
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path)
    listener.listen(16)  # clients wait in the queue while the libraries are imported
    for module in PRELOADED:
        __import__(module)
    gc.freeze()  # the garbage collector leaves the imported objects alone, so children share their pages
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # each connection's process is reaped as it ends
    while True:
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _answer(connection, started_with)
            finally:  # never back into the server's loop
                os._exit(0)
        connection.close()


def _answer(connection: socket.socket, started_with: dict[str, str]) -> None:
    """In a process of its own: fork the client's command, tell the client its process id, then its exit status;
    end the command if the client ends first (killed by the program that started it)."""
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    request = json.loads(message)
    command = _command(request["argv"], request["env"])
    if command is None or comparable(request["env"]) != started_with:
        connection.send(json.dumps({"declined": True}).encode())
        return
    pid = os.fork()
    if pid == 0:
        connection.close()
        _become_command(request, command, fds)
    for fd in fds:
        os.close(fd)
    connection.send(json.dumps({"pid": pid}).encode())
    while not (status := os.waitpid(pid, os.WNOHANG))[0]:
        if select.select([connection], [], [], 0.02)[0]:  # the client's end closed: it was killed
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
    connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status[1])}).encode())


def _command(argv: list[str], env: dict[str, str]) -> list[str] | None:
    """`python [-u] SCRIPT ARGS` or `python [-u] -m MODULE ARGS` as preloaded_python.py takes it (a script's path,
    or the module name), with its arguments; None for other command lines."""
    if argv[:1] == ["-u"] and env.get("PYTHONUNBUFFERED"):  # this server's streams are unbuffered already
        argv = argv[1:]
    if argv[:1] == ["-m"] and len(argv) > 1:
        return argv[1:]
    if argv and argv[0].endswith(".py") and not argv[0].startswith("-"):
        return argv
    return None


def _become_command(request: dict, command: list[str], fds: list[int]) -> None:
    """In the forked child: the client's folder, environment, standard streams and command line, then the command."""
    os.setpgid(0, 0)  # a group of its own, so that ending it ends whatever it started too
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, received in enumerate(fds):
        os.dup2(received, fd)
        os.close(received)
    sys.stdin = open(0, closefd=False)
    finish_command(command[0], command[1:], request["cwd"])


if __name__ == "__main__":
    _serve(sys.argv[1])
