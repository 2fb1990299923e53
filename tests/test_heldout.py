"""The held-out rows checked before and after training: read in their own format, skipped (saying why) when they
cannot test the model."""

import logging

from qlora.config import ASSETS_DIR
from qlora.stages.heldout import heldout_examples

RECIPE_HELDOUT = str(ASSETS_DIR / "sentiment" / "heldout.jsonl")  # the tiny recipe's, alpaca rows


def test_the_recipes_alpaca_heldout_file_is_checked_on_alpaca_or_prompt_completion_training():
    assert len(heldout_examples(RECIPE_HELDOUT, 8, ["alpaca"])) == 8
    rows = heldout_examples(RECIPE_HELDOUT, 64, ["sharegpt", "prompt_completion"])
    assert len(rows) == 32 and rows[0]["completion"] == "positive"


def test_the_recipes_heldout_file_is_skipped_with_one_line_when_chats_replace_its_data(caplog):
    with caplog.at_level(logging.INFO, logger="qlora"):
        assert heldout_examples(RECIPE_HELDOUT, 32, ["sharegpt"]) is None
    [line] = [record.getMessage() for record in caplog.records if "held-out" in record.getMessage()]
    assert line.startswith(f"held-out check skipped: data.heldout_path={RECIPE_HELDOUT} holds prompt/completion rows "
                           f"(alpaca) while the training data has messages rows (sharegpt)")
    assert "set data.heldout_path to held-out rows like your data's" in line


def test_heldout_text_rows_have_no_answers_to_check(tmp_path, caplog):
    (tmp_path / "text.jsonl").write_text('{"text": "the film was great"}\n')
    with caplog.at_level(logging.INFO, logger="qlora"):
        assert heldout_examples(str(tmp_path / "text.jsonl"), 32, ["text"]) is None
    assert "holds text rows, which have no reference answers" in caplog.text


def test_no_heldout_file_or_no_samples_means_no_check():
    assert heldout_examples(None, 32, ["alpaca"]) is None
    assert heldout_examples(RECIPE_HELDOUT, 0, ["alpaca"]) is None
