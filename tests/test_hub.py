"""The Hugging Face Hub, reachable or not: asked once, then offline mode, with no retry before the error.

A Hub that cannot be reached stands in as a local server that closes every connection unanswered and counts
them, so that "no retry" is counted, not timed, and nothing depends on this machine's network; and as a name
that never resolves, as on a machine without a network (CI), where huggingface_hub printed its retries.
"""

import os
import socket
import threading
from urllib.parse import urlparse

import datasets.config
import pytest
from huggingface_hub import constants

from conftest import run_cli
from qlora.hub import offline_reason, prepare_hub_access


class LocalHub:
    """A Hub endpoint on this machine counting the connections made to it: one that `answers` (HTTP 200) or one
    that cannot be reached (each connection closed without an answer)."""

    def __init__(self, answers: bool):
        self.answers, self.connections = answers, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            with connection:
                if self.answers:
                    connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def unreachable_hub():
    server = LocalHub(answers=False)
    yield server
    server.close()


@pytest.fixture
def hub(unreachable_hub):
    """A Hub that cannot be reached, its connections counted from this test on. One for the module: the commands run
    with the same Hub (HF_ENDPOINT) and cache (HF_HOME), both read at import, share a preloaded server."""
    unreachable_hub.connections = 0
    return unreachable_hub


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """Where the commands' Hugging Face caches go: one folder per Hub, empty while the commands that ask the Hub run
    (the local-files command, which caches its data there, runs after them)."""
    return tmp_path_factory.mktemp("hf")


@pytest.fixture
def online_process(monkeypatch):
    """This process as if HF_HUB_OFFLINE were not set (the tests set it) and the Hub not yet asked; restored after."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    offline_reason.cache_clear()
    yield monkeypatch
    offline_reason.cache_clear()


def test_an_unreachable_hub_is_asked_once_then_the_process_is_offline(hub, online_process):
    online_process.setattr(constants, "ENDPOINT", hub.url)
    for name in ("meta-llama/Llama-2-7b-hf", "tatsu-lab/alpaca"):
        prepare_hub_access(name)
    assert offline_reason() == f"{hub.url} cannot be reached from this machine"
    assert hub.connections == 1
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_reachable_hub_is_used(online_process):
    reachable = LocalHub(answers=True)
    online_process.setattr(constants, "ENDPOINT", reachable.url)
    try:
        assert offline_reason() is None and reachable.connections == 1
    finally:
        reachable.close()
    assert not constants.HF_HUB_OFFLINE


def test_hf_hub_offline_and_local_paths_ask_nothing(hub, online_process, tmp_path):
    online_process.setattr(constants, "ENDPOINT", hub.url)
    prepare_hub_access(str(tmp_path))  # a local folder
    assert offline_reason.cache_info().currsize == 0
    online_process.setattr(constants, "HF_HUB_OFFLINE", True)
    assert offline_reason() == "HF_HUB_OFFLINE=1 is set" and hub.connections == 0


UNREACHABLE = "it is not a local path, the Hugging Face cache does not hold it, and the Hub is not used: {reason}. " \
              "Download it where the Hub can be reached (`hf download {download} --local-dir DIR`) and give that " \
              "folder instead.\n"


UNRESOLVABLE = "http://hub.invalid"  # .invalid never resolves (RFC 2606)


def run_without_hub(*args: str, hub: LocalHub | str, cwd, hf_home, command: str = "qlora.train",
                    offline: bool = False):
    """`python -m COMMAND ARGS` with `hub` as the Hub (or its URL), the Hub's Hugging Face cache under `hf_home`,
    HF_HUB_OFFLINE=1 only if `offline`; no retry printed."""
    url = hub if isinstance(hub, str) else hub.url
    env = {"HF_ENDPOINT": url, "HF_HOME": str(hf_home / urlparse(url).hostname),
           "HF_HUB_OFFLINE": "1" if offline else None}
    result = run_cli(*args, cwd=cwd, command=command, env=env)
    assert "Retrying" not in result.stdout + result.stderr
    assert "thrown while requesting" not in result.stdout + result.stderr
    return result


# in the order that runs the commands of one environment one after another
@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "unreachable"])
def test_a_hub_model_offline_is_one_clear_error_without_retries(hub, tmp_path, hf_home, offline):
    model = "meta-llama/Llama-2-7b-hf"
    result = run_without_hub(f"model.name_or_path={model}", "training.output_dir=run", hub=hub, cwd=tmp_path,
                             hf_home=hf_home, offline=offline)
    reason = "HF_HUB_OFFLINE=1 is set" if offline else f"{hub.url} cannot be reached from this machine"
    assert result.returncode == 2
    assert result.stderr == f"qlora: error: could not load the tokenizer of model.name_or_path={model}: " \
        + UNREACHABLE.format(reason=reason, download=model)
    assert hub.connections == (0 if offline else 1)


def test_a_hub_dataset_offline_is_one_clear_error_without_retries(hub, tmp_path, hf_home):
    result = run_without_hub("data.path=tatsu-lab/alpaca", "training.output_dir=run", hub=hub, cwd=tmp_path,
                             hf_home=hf_home)
    assert result.returncode == 2
    assert result.stderr == "qlora: error: could not load dataset tatsu-lab/alpaca (split train): " + \
        UNREACHABLE.format(reason=f"{hub.url} cannot be reached from this machine",
                           download="tatsu-lab/alpaca --repo-type dataset")
    assert hub.connections == 1


def test_plan_offline_goes_straight_to_the_shipped_config(hub, tmp_path, hf_home):
    result = run_without_hub("recipe=llama7b", hub=hub, cwd=tmp_path, hf_home=hf_home, command="qlora.plan")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config.json from qlora's shipped copy (meta-llama--Llama-2-7b-hf.json; offline)" in result.stdout
    assert hub.connections == 1


def test_a_command_on_local_files_never_asks_the_hub(hub, tmp_path, hf_home):
    result = run_without_hub("preview", "-n", "1", hub=hub, cwd=tmp_path, hf_home=hf_home, command="qlora.data")
    assert result.returncode == 0, result.stderr[-2000:]
    assert hub.connections == 0


@pytest.mark.parametrize("command, args", [("qlora.train", ["model.name_or_path=meta-llama/Llama-2-7b-hf"]),
                                           ("qlora.plan", ["recipe=llama7b"])])
def test_a_hub_name_that_does_not_resolve_prints_no_retry(tmp_path, hf_home, command, args):
    result = run_without_hub(*args, hub=UNRESOLVABLE, cwd=tmp_path, hf_home=hf_home, command=command)
    said = result.stdout + result.stderr
    assert UNRESOLVABLE in said and "cannot be reached" in said  # as the log line or the error says it
    assert result.returncode == (2 if command == "qlora.train" else 0), result.stderr[-2000:]
