"""A new Python started with this folder on PYTHONPATH and QLORA_TEST_FORK_SERVER=SOCKET: its command runs in a
process forked by tests/fork_server.py, and this one exits as that command exits; where the server declines or
cannot be reached, this Python starts as usual."""

import os
import sys


def _run_in_fork_server(socket_path: str) -> None:
    import json
    import signal
    import socket

    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        connection.connect(socket_path)
    except OSError:
        return
    request = {"argv": sys.orig_argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(connection, [json.dumps(request).encode()], [0, 1, 2])
    reply = json.loads(connection.recv(1 << 16))
    if reply.get("declined"):
        connection.close()
        return
    for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # what the program that started this one sends
        signal.signal(forwarded, lambda number, _: os.kill(reply["pid"], number))
    returncode = json.loads(connection.recv(1 << 16))["returncode"]
    if returncode < 0:  # ended by a signal: so is this process
        if -returncode in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    os._exit(returncode)


_SERVER = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "fork_server.py")
if (_socket_path := os.environ.get("QLORA_TEST_FORK_SERVER")) and sys.orig_argv[1:2] != [_SERVER]:  # not the server
    _run_in_fork_server(_socket_path)
