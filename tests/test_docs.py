"""Every `bash` command in README.md and docs/*.md works as written.

Commands on the tiny recipe run for real, in-process, cut short (training.max_steps=2); commands on a
GPU recipe are composed and validated only (as `--cfg job` does); the few that cannot run on a CPU test
machine are listed in NOT_RUN with the reason. Placeholders (`outputs/<run>`, `my.jsonl`) stand for a
tiny run trained here and for the shipped example data.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from conftest import REPO_ROOT
from qlora.config import ASSETS_DIR, configs_dir, register_configs, typed_config
from qlora.compose import compose_config

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

NOT_RUN = {
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": "installs packages (the test machine has them)",
    "pip install -e '.[dev]'": "installs packages (the test machine has them)",
    "python -m pytest": "runs this test suite",
    "python scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2": "a 7B benchmark for a GPU",
    "python scripts/benchmark.py --model tiny --seq 32 --batch 2 --steps 3":
        "run by tests/test_benchmark.py::test_benchmark_runs_every_recipe_on_the_cpu",
    "python scripts/benchmark.py --model llama3-8b --recipe llama3_8b --max-context --seq 16384 --gpu-memory 24GiB":
        "an 8B benchmark for a GPU; its search by tests/test_benchmark.py::test_longest_context_steps_out_by_"
        "doubling_steps_then_bisects",
    "tensorboard --logdir outputs": "starts a web server",
    "python -m qlora.train +recipe=llama7b_dpo 'model.adapter=outputs/llama7b/<date_time>' data.path=pairs.jsonl":
        "continues a Llama-2-7B SFT run, which a CPU test machine cannot train",
}
GPU_RECIPES = ("llama7b", "llama3_8b", "mistral7b", "qwen2_5_7b", "llama7b_dpo")
# what the tiny runs here are cut to, so that every command runs in seconds
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHORT = ["training.max_steps=2", "training.logging_steps=1", "eval.exact_match_samples=2"]


def doc_commands() -> list[tuple[str, str]]:
    """(page, command) for each line of each fenced bash block, comments and line continuations removed."""
    commands = []
    for page in PAGES:
        for block in re.findall(r"^ *```bash\n(.*?)^ *```", page.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append((page.relative_to(REPO_ROOT).as_posix(), shlex.join(words)))
    return commands


COMMANDS = doc_commands()


def test_the_docs_have_commands_and_every_skipped_one_is_in_them():
    written = {command for _, command in COMMANDS}
    assert len(COMMANDS) >= 20
    assert set(NOT_RUN) <= written, "NOT_RUN names a command the docs no longer have"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, str]:
    """A folder to run the commands in, with the files they name, and a short tiny run for `outputs/<run>`."""
    from qlora.pipeline import run_training

    root = tmp_path_factory.mktemp("docs")
    shutil.copy(ASSETS_DIR / "sentiment" / "train.jsonl", root / "my.jsonl")
    shutil.copy(ASSETS_DIR / "sentiment_pairs" / "train.jsonl", root / "pairs.jsonl")
    for name in ("eval.jsonl", "prompts.jsonl"):
        shutil.copy(ASSETS_DIR / "sentiment" / "heldout.jsonl", root / name)
    (root / "models" / "llama2-7b-nf4").mkdir(parents=True)  # stands for `qlora.quantize`'s output
    run = root / "outputs" / "tiny" / "trained"
    run_training(compose_config([f"training.output_dir={run}", *SHORT]))
    other = run.parent / "other"
    shutil.copytree(run, other)
    chat_run = run.parent / "chat"  # as if trained on chat data: its saved tokenizer has a chat template
    shutil.copytree(run, chat_run)
    tokenizer = AutoTokenizer.from_pretrained(chat_run / "adapter")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(chat_run / "adapter")
    return {"root": str(root), "outputs/tiny/<date_time>": str(run), "outputs/<run>": str(run),
            "outputs/<other>": str(other), "outputs/<chat-run>": str(chat_run)}


# the commands NOT_RUN lists (with the reason) are checked only to be in the docs, above
RUN = [(page, command) for page, command in COMMANDS if command not in NOT_RUN]


@pytest.mark.parametrize("page, command", RUN, ids=[f"{p}: {c[:60]}" for p, c in RUN])
def test_command(page, command, workspace, monkeypatch):
    monkeypatch.chdir(workspace["root"])
    for placeholder in ("outputs/tiny/<date_time>", "outputs/<run>", "outputs/<other>", "outputs/<chat-run>"):
        command = command.replace(placeholder, workspace[placeholder])
    words = shlex.split(command)
    while "=" in words[0]:  # VAR=value before the command
        monkeypatch.setenv(*words.pop(0).split("=", 1))
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    if words[0] == "hf":  # the Hugging Face CLI (logging in asks for a token): the command exists as written
        hf = Path(sys.executable).with_name("hf")  # huggingface_hub's script, beside this Python
        done = subprocess.run([str(hf), *words[1:], "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and f"Usage: hf {' '.join(words[1:])}" in done.stdout, done.stderr[-2000:]
        return
    if words[:2] == ["accelerate", "launch"]:  # several GPUs: the launch config exists, the job composes
        config_file = words[words.index("--config_file") + 1]
        assert (REPO_ROOT / config_file).is_file(), config_file
        words = ["python", *words[words.index("-m"):]]
    assert words[:2] == ["python", "-m"], command
    module, args = words[2], words[3:]
    if "--help" in args:
        show_help(module, monkeypatch)
        return
    # --verbose only lets the libraries print (tests/test_output.py); --cfg job is composing, done here anyway
    run_module(module, [a for a in args if a not in ("--verbose", "--cfg", "job")], monkeypatch)


def show_help(module: str, monkeypatch) -> None:
    from qlora.cli import COMMANDS, usage

    name = module.removeprefix("qlora.")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    printed = io.StringIO()
    monkeypatch.setattr(sys, "stdout", printed)
    __import__(module, fromlist=["main"]).main()
    assert name in COMMANDS and printed.getvalue() == usage(name) + "\n"


def run_module(module: str, args: list[str], monkeypatch) -> None:
    if module == "qlora.train":
        recipe = next((a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("recipe=")), "tiny")
        overrides = args
        config = compose_config(overrides)  # composes and validates, as `--cfg job` would and more
        if recipe not in GPU_RECIPES:
            from qlora.pipeline import run_training

            out = Path.cwd() / "outputs" / "docs-run"
            shutil.rmtree(out, ignore_errors=True)
            summary = run_training(compose_config([*overrides, *SHORT, f"training.output_dir={out}"]))
            assert (Path(summary.run_dir) / "report.md").is_file()
        else:
            assert config.model.name_or_path
    elif module == "qlora.data":
        assert args[0] == "preview"
        recipe_args = [a for a in args[1:] if "=" in a]
        if any(a.split("=", 1)[1] in GPU_RECIPES for a in recipe_args if a.lstrip("+").startswith("recipe=")):
            compose_config(recipe_args)  # the GPU recipe's tokenizer is not on this machine
        else:
            from qlora.data.__main__ import main

            assert main(args) == 0
    elif module == "qlora.plan":
        from conftest import run_cli

        done = run_cli(*args, cwd=Path.cwd(), command="qlora.plan")
        assert done.returncode == 0 and "training peak" in done.stdout, done.stderr[-2000:]
    elif module == "qlora.report":
        from qlora.report import main

        main(args)
    elif module in ("qlora.generate", "qlora.evaluate", "qlora.merge", "qlora.quantize"):
        name = module.split(".")[1]
        config = compose_command(name, [*args, *SHORTER.get(name, [])])
        if name == "quantize":
            assert config.output_dir  # a 7B download: composed only
            return
        monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))  # chat=true: the user ends at once
        command = getattr(__import__(module, fromlist=[name]), name)
        command(config)
    else:
        raise AssertionError(f"no rule for python -m {module}: add one here")


# cut the after-training commands short too
SHORTER = {"generate": ["max_new_tokens=4"], "evaluate": ["max_samples=2", "max_new_tokens=4"]}


def compose_command(name: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(str(configs_dir()), version_base="1.3"):
        return typed_config(compose(name, overrides=overrides))
