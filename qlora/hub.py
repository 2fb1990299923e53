"""The Hugging Face Hub, reachable or not: decided once per process, before the first Hub id is loaded.

Without a network, huggingface_hub retries every request with a growing wait (about 40 "Retrying in Ns" lines,
25-60 s per command) before the error. Here one short request decides instead; when it gets no answer, the process
switches to huggingface_hub's offline mode (what HF_HUB_OFFLINE=1 asks for), so that transformers and datasets go
straight to the local cache, the planner to its shipped configs, and a missing download to a clear error.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from huggingface_hub import constants, get_session

log = logging.getLogger("qlora")

PROBE_TIMEOUT_S = 3.0  # the Hub answers in well under a second; a dropped connection is not waited for longer


def prepare_hub_access(name_or_path: str) -> None:
    """Before loading `name_or_path`: nothing for a local path; for a Hub id, whether the Hub is used is decided
    (once per process) before any request that would be retried."""
    if not Path(name_or_path).expanduser().exists():
        offline_reason()


@functools.cache
def offline_reason() -> Optional[str]:
    """Why this process does not use the Hub (HF_HUB_OFFLINE=1, or it cannot be reached), or None when it does.

    The first call asks the Hub once; with no answer, the process goes offline (go_offline)."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    # Any failure to get an answer (no DNS, refused, timed out, TLS, proxy) means the Hub cannot be reached; the
    # HTTP client, and so its exception classes, differ between huggingface_hub versions (httpx, httpx2).
    except Exception as error:
        go_offline()
        log.info("the Hugging Face Hub (%s) cannot be reached (%s): working offline, from the local cache "
                 "(HF_HUB_OFFLINE=1 skips this check)", constants.ENDPOINT, type(error).__name__)
        return f"{constants.ENDPOINT} cannot be reached from this machine"
    return None


def go_offline() -> None:
    """huggingface_hub's offline mode for the rest of this process and the processes it starts."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when a library is imported, and by child processes
    constants.HF_HUB_OFFLINE = True  # read at each request by huggingface_hub and transformers
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:  # datasets keeps its own copy, taken when it was imported
        datasets_config.HF_HUB_OFFLINE = True


def why_not_loaded(name: str, error: Exception, repo_type: str = "model") -> str:
    """Why `name` could not be loaded, as the end of a one-line error: for a Hub id offline, what to do about it;
    otherwise the library's reason."""
    details = " ".join(str(error).split())
    if Path(name).expanduser().exists():
        return details
    reason = offline_reason()
    download = f"hf download {name}{'' if repo_type == 'model' else f' --repo-type {repo_type}'} --local-dir DIR"
    if reason is not None:
        return (f"it is not a local path, the Hugging Face cache does not hold it, and the Hub is not used: {reason}. "
                f"Download it where the Hub can be reached (`{download}`) and give that folder instead.")
    return (f"it is neither a local path nor available on the Hugging Face Hub (gated: `hf auth login` after "
            f"accepting its licence; private; or misspelt). Details: {details}")
