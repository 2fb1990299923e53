"""`python -m qlora.data preview`: the first examples with trained tokens marked, and the statistics."""

from transformers import AutoTokenizer

from conftest import run_cli
from qlora.config import ASSETS_DIR
from qlora.data.masks import BY_MARKERS
from qlora.data.preview import MASKED_COLOUR, RESET, TRAINED_COLOUR, preview, render_example


def run_preview(*args, cwd):
    return run_cli("preview", *args, cwd=cwd, command="qlora.data")


def test_preview_of_the_tiny_recipe_marks_the_answer_and_counts(tmp_path):
    result = run_preview("-n", "2", "+recipe=tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "first 2 training examples (trained tokens inside [[ ]])" in out
    answers = [f"### Response:\n[[{label}<|end_of_text|>]]" for label in ("negative", "positive")]
    assert sum(out.count(answer) for answer in answers) == 2
    assert "examples            512 (of 512 rows)" in out and "truncated           0" in out
    assert "\033[" not in out  # piped: markers, no colour codes
    assert not any(tmp_path.iterdir())  # nothing written


def test_preview_reports_bad_config_without_traceback(tmp_path):
    result = run_preview("data.path=qlora/assets/examples/messages.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert "data.path=qlora/assets/examples/messages.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_preview_of_chat_data_shows_truncation_and_validation(tiny_config):
    config = tiny_config(f"data.path={ASSETS_DIR / 'examples' / 'sharegpt.jsonl'}", "data.chat_template=chatml",
                         "data.max_length=110", "data.val_size=1")
    report = preview(config, examples=5)
    assert report.startswith(f"chat rows: {BY_MARKERS}\nfirst 2 training examples")
    assert "validation data: 1 examples (2 left for training)" in report
    assert "[[" in report and "<|im_start|>user" in report
    assert "truncated           1" in report


def test_colour_in_a_terminal():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    ids = tokenizer("the film was great")["input_ids"]
    labels = [-100, -100] + ids[2:]
    coloured = render_example(ids, labels, tokenizer, colour=True)
    masked, trained = tokenizer.decode(ids[:2]), tokenizer.decode(ids[2:])
    assert coloured == f"{MASKED_COLOUR}{masked}{RESET}{TRAINED_COLOUR}{trained}{RESET}"
    assert render_example(ids, labels, tokenizer, colour=False) == f"{masked}[[{trained}]]"
