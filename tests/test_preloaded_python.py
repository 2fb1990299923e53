"""tests/preloaded_python.py: a command forked from the preloaded server behaves as a new Python process would."""

import os
import subprocess
import sys

import pytest
from conftest import run_cli

SCRIPT = """
import atexit, os, sys
atexit.register(lambda: print("atexit ran"))
print(os.getcwd(), sys.argv[1:], sys.stdin.read())
if sys.argv[1] == "raise":
    raise ValueError("from the script")
sys.exit(sys.argv[1] if sys.argv[1] == "message" else int(sys.argv[1]))
"""


def test_a_command_gives_what_a_new_process_gives(tmp_path):
    """A bad override: the same exit code and output as `python -m qlora.train` in a new process."""
    forked = run_cli("lora.r=abc", cwd=tmp_path)
    new = subprocess.run([sys.executable, "-m", "qlora.train", "lora.r=abc"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert forked.returncode == new.returncode == 1
    assert (forked.stdout, forked.stderr) == (new.stdout, new.stderr) and "lora.r" in forked.stderr


@pytest.mark.parametrize("argument, code, stderr", [("0", 0, ""), ("3", 3, ""), ("message", 1, "message\n"),
                                                   ("raise", 1, "ValueError: from the script\n")])
def test_a_script_gets_its_folder_arguments_and_input_and_exits_as_python_does(tmp_path, argument, code, stderr):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    (tmp_path / "folder").mkdir()
    done = run_cli(argument, cwd=tmp_path / "folder", command=str(script), input="typed")
    assert done.returncode == code
    assert done.stdout == f"{tmp_path / 'folder'} ['{argument}'] typed\natexit ran\n"
    assert done.stderr.endswith(stderr) and ("Traceback" in done.stderr) == (argument == "raise")


def test_a_command_past_its_timeout_is_killed(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        run_cli(cwd=tmp_path, command=str(script), timeout=2)
    assert timeout.value.output == "started\n"
