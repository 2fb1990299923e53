"""`python -m COMMAND ARGS` (or `python SCRIPT.py ARGS`) for the tests, without the libraries' imports each time.

A command's process spends about 10 s of a 2-core machine importing torch, transformers, peft and TRL before it
does anything, and the suite runs dozens of commands. Run as a script, this module is a server that imports them
once, then for each request (a JSON line on stdin) forks a child that becomes `python -m COMMAND ARGS` in the
request's folder, with its stdin, stdout and stderr on files, and reports the child's exit status (a JSON line on
a pipe of its own: libraries print to stdout as they are imported). The child is a process of its own: the module
state from before any command ran, its own exit code, and the interpreter's exit (threads joined, atexit
handlers), but for the teardown of every module. Environment variables that the libraries read at import are the
server's: a client keeps one server at a time, started again when the environment changes. What the libraries
print as they are imported is not in a command's output.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

# what the commands import (torch, transformers, peft, TRL, datasets, bitsandbytes come with them); never a module
# that a command runs as __main__ (runpy warns when it was imported before)
PRELOADED = ("qlora.pipeline", "qlora.plan", "qlora.data.preview", "qlora.runs", "qlora.stages.heldout")

_server: dict = {}  # "process": the running server, "key": its environment


def run_python(command: str, args: list[str], cwd: Path, env: dict[str, str], input: str | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m COMMAND ARGS` (`python COMMAND ARGS` for a COMMAND ending in .py) in `cwd` with `env`, as
    subprocess.run(..., capture_output=True, text=True) gives it, forked from a server that has the libraries
    imported; for another environment than the running server's, a new server (one at a time)."""
    # pytest names the running test in the environment; the libraries do not read it at import
    key = frozenset((name, value) for name, value in env.items() if name != "PYTEST_CURRENT_TEST")
    server = _server.get("process")
    if server is None or server.poll() is not None or _server["key"] != key:
        _stop_server()
        replies, reply_end = os.pipe()
        server = subprocess.Popen([sys.executable, __file__, str(reply_end)], stdin=subprocess.PIPE, env=env,
                                  text=True, pass_fds=(reply_end,))
        os.close(reply_end)
        _server.update(process=server, key=key, replies=os.fdopen(replies))
    with tempfile.TemporaryDirectory() as folder:
        files = {name: str(Path(folder) / name) for name in ("stdin", "stdout", "stderr")}
        Path(files["stdin"]).write_text(input or "")
        request = {"command": command, "args": args, "cwd": str(cwd), "env": env, "timeout": timeout, **files}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        reply = _server["replies"].readline()
        if not reply:
            raise RuntimeError(f"the preloaded Python server ended (exit code {server.wait()})")
        status = json.loads(reply)
        argv = python_argv(command, args)
        stdout, stderr = Path(files["stdout"]).read_text(), Path(files["stderr"]).read_text()
    if status["timed_out"]:
        raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    return subprocess.CompletedProcess(argv, status["returncode"], stdout, stderr)


@atexit.register
def _stop_server() -> None:
    if server := _server.pop("process", None):
        server.stdin.close()  # the server's loop ends at the end of its input
        server.wait(timeout=60)
        _server.pop("replies").close()


def _become_command(request: dict, replies) -> None:
    """In the forked child: the folder, environment, arguments and standard streams of `python -m COMMAND ARGS`."""
    replies.close()
    os.setpgid(0, 0)  # a group of its own, so that a timeout ends whatever it started too
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        opened = os.open(request[name], os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # the server's sys.stdin may hold requests it read ahead


def _is_script(command: str) -> bool:
    return command.endswith(".py")


def python_argv(command: str, args: list[str]) -> list[str]:
    """`python -m COMMAND ARGS`, or `python COMMAND ARGS` for a script."""
    return [sys.executable, *([command] if _is_script(command) else ["-m", command]), *args]


def _run_command(request: dict, replies) -> None:
    _become_command(request, replies)
    finish_command(request["command"], request["args"], request["cwd"])


def finish_command(command: str, args: list[str], cwd: str) -> NoReturn:
    """In a forked child with the command's folder, environment and standard streams: run `python -m COMMAND ARGS`
    (`python COMMAND ARGS` for a script), then exit as the interpreter would (threads joined, atexit handlers run,
    streams flushed) but without tearing down every module, which here would touch, and so copy, the whole heap
    shared with the server."""
    # `python -m` puts the current folder first on the path, `python SCRIPT` the script's folder
    sys.path[0] = str(Path(command).parent) if _is_script(command) else cwd
    sys.argv = [command, *args]
    try:
        if _is_script(command):
            runpy.run_path(command, run_name="__main__")
        else:
            runpy.run_module(command, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (printed and exit code 1, as the interpreter does)
        sys.excepthook(*sys.exc_info())
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve() -> None:
    for module in PRELOADED:
        __import__(module)
    gc.freeze()  # the garbage collector leaves the imported objects alone, so children share their pages
    replies = os.fdopen(int(sys.argv[1]), "w")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_command(request, replies)
        deadline = time.monotonic() + request["timeout"]
        timed_out = False
        while not (status := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(pid, signal.SIGKILL)
                status = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status[1]), "timed_out": timed_out}), file=replies,
              flush=True)


if __name__ == "__main__":
    _serve()
