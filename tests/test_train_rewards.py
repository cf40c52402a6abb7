"""The GRPO rewards on hand-written completions, malformed ones included."""
import pytest

from avar_kernels.train.rewards import (
    accuracy_reward,
    answers_match,
    choice_letter,
    extract_answer,
    format_reward,
    to_number,
)

GOOD = "<think>The image shows two red shapes.</think><answer>2</answer>"


@pytest.mark.parametrize("predicted, reference", [
    ("2", "2"), ("2.0", "2"), (" 2 ", "2"), ("1/2", "0.5"), ("\\frac{1}{2}", "1/2"), ("\\dfrac{3}{4}", "0.75"),
    ("2\\sqrt{3}", "\\sqrt{12}"), ("3.46", "2\\sqrt{3}"), ("3.5", "2\\sqrt{3}"), ("\\sqrt 2", "1.41421356"),
    ("45^\\circ", "45"), ("45°", "45"), ("45 degrees", "45"), ("12 cm", "12"), ("12\\text{ cm}", "12"), ("$12$", "12"),
    ("\\boxed{7}", "7"), ("1,000", "1000"), ("50%", "0.5"), ("\\pi/2", "1.5707963"), ("2\\pi", "6.2832"),
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) 12", "B"), ("b", "B"), ("Red", "red"), ("a  cat", "A cat"),
])
def test_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("3", "2"), ("1/3", "0.5"), ("3.6", "2\\sqrt{3}"), ("3.4", "2\\sqrt{3}"), ("C", "B"), ("blue", "red"),
    ("", "2"), ("2", "B"), ("two", "2"), ("\\frac{1}{0}", "1"), ("1e999", "1"), ("2**99999", "1"), ("x+1", "2"),
    ("__import__('os')", "0"),
])
def test_answers_do_not_match(predicted, reference):
    assert not answers_match(predicted, reference)


def test_to_number_and_letters():
    assert to_number("\\frac{\\sqrt{3}}{2}") == pytest.approx(3 ** 0.5 / 2)
    assert to_number("12 cm^2") == 12 and to_number("hello") is None and to_number("\\frac{1}{") is None
    assert choice_letter("(C) none of these") == "C" and choice_letter("12") is None


def test_extract_answer_takes_the_last_answer_block_or_the_text_without_thinking():
    assert extract_answer("<answer>1</answer> ... <answer> 3 </answer>") == "3"
    assert extract_answer("<think>it is 5</think> 4") == "4"
    assert extract_answer("no tags at all") == "no tags at all"


def test_accuracy_reward_on_completions_incl_malformed():
    completions = [GOOD, "<think>x</think><answer>3</answer>", "<answer>2", "<think>2</think>", "",
                   "<think>unclosed <answer>2</answer>", [{"role": "assistant", "content": GOOD}], "2"]
    answers = ["2"] * len(completions)
    got = accuracy_reward(None, completions, None, answer=answers)
    # an unclosed <answer> leaves the whole text (not "2"); an unclosed <think> still has a closed <answer>
    assert got == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_format_reward_incl_malformed():
    completions = [GOOD, "  " + GOOD + "\n", "<answer>2</answer>", "<think>a</think>",
                   "<think>a</think>b<answer>2</answer>", "<answer>2</answer><think>a</think>", GOOD + " trailing",
                   "<think>a<answer>2</answer>", "",
                   [{"role": "assistant", "content": GOOD}]]
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
