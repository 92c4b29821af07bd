"""Answer extraction and grading on a table of tricky generations (apps/bolt/evaluation/answers.py)."""

import pytest

from apps.bolt.evaluation import answers as A
from apps.bolt.evaluation import task_functions as F
from apps.bolt.formats import EOL

INV = A.INVALID

# (generation, strict, flexible, latent-strict, latent-flexible)
NUMBER_TABLE = [
    ("He has 12 apples. Therefore, the final answer is 12. I hope it is correct.", "12", "12", INV, INV),
    ("The final answer is 1,234. I hope it is correct.", "1234", "1234", INV, INV),
    ("So the answer is $18.00.", "18", "18", INV, INV),
    ("The answer is 12.50 dollars.", "12.5", "12.5", INV, INV),
    ("It drops, so the answer is -7.", "-7", "-7", INV, INV),
    ("The answer is: 42", "42", "42", INV, INV),
    # the first "answer is" wins for strict; the last number wins for flexible
    ("The answer is 5. Wait, 3 + 4 = 7.", "5", "7", INV, INV),
    # a range dash is not a minus sign; "3,4" is two numbers, not 34
    ("Read pages 3-5", INV, "5", INV, INV),
    ("Pick 3,4 or 10", INV, "10", INV, INV),
    ("x = -3", INV, "-3", INV, INV),
    ("1,000,000 grains", INV, "1000000", INV, INV),
    ("no digits at all", INV, INV, INV, INV),
    ("", INV, INV, INV, INV),
    # trailing few-shot debris after the answer does not change it
    ("The final answer is 9. I hope it is correct.\n\n\n\n##Problem\n", "9", "9", INV, INV),
    # latent variant: the thought is closed, the answer follows
    (f"4 * 7 = 28. 28 + 3 = 31. Therefore, the answer is 31.{EOL} The final answer is 31. I hope it is correct.",
     "31", "31", "31", "31"),
    # latent thought and stated answer disagree: each filter reads its own part
    (f"2 + 2 = 5. Therefore, the answer is 5.{EOL} The final answer is 4. I hope it is correct.", "5", "4", "5", "5"),
    # thought never closed: no latent answer
    ("2 + 2 = 4. Therefore, the answer is 4.", "4", "4", INV, INV),
    (f"{EOL} The final answer is 8.", "8", "8", INV, INV),
]


@pytest.mark.parametrize("text,strict,flexible,lstrict,lflexible", NUMBER_TABLE)
def test_number_extraction_table(text, strict, flexible, lstrict, lflexible):
    assert A.strict_number(text) == strict
    assert A.flexible_number(text) == flexible
    assert A.on_latent(A.strict_number, text) == lstrict
    assert A.on_latent(A.flexible_number, text) == lflexible
    # the lm-eval filter functions wrap exactly these extractors
    assert F.strict_number_filter([[text]], [{}]) == [[strict]]
    assert F.latent_flexible_number_filter([[text, text]], [{}]) == [[lflexible, lflexible]]


@pytest.mark.parametrize(
    "raw,norm",
    [("$1,200.00", "1200"), ("12.50", "12.5"), ("3.0", "3"), ("-0", "0"), (" 7. ", "7"), ("0.05", "0.05"), ("abc", "abc"), ("1e5", "1e5")],
)
def test_normalize_number(raw, norm):
    assert A.normalize_number(raw) == norm


@pytest.mark.parametrize(
    "field,gold",
    [("3 * 6 = <<3*6=18>>18\n#### 18", "18"), ("#### 1,335", "1335"), ("4 - 9 = -5\n#### -5", "-5"), ("72", "72")],
)
def test_gsm8k_gold(field, gold):
    assert A.gsm8k_gold(field) == gold


# (generation, strict, flexible)
CHOICE_TABLE = [
    ("Let's think step by step. Electrons are negative. The answer is (C).", "(C)", "(C)"),
    ("The answer is (b).", "(B)", "(B)"),
    ("Between (A) and (D), I pick (D).", INV, "(D)"),
    ("The answer is (A). Hmm, or maybe (B)", "(A)", "(B)"),
    ("The answer is C.", INV, INV),
    (f"Compare (A) with (B).{EOL} The answer is (B).", "(B)", "(B)"),
]


@pytest.mark.parametrize("text,strict,flexible", CHOICE_TABLE)
def test_choice_extraction_table(text, strict, flexible):
    assert A.strict_choice(text) == strict
    assert A.flexible_choice(text) == flexible


@pytest.mark.parametrize(
    "text,boxed",
    [
        ("so $x = \\boxed{6}$.", "6"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\sqrt{\\frac{3}{4}}}", "\\sqrt{\\frac{3}{4}}"),
        ("\\fbox{9}", "9"),
        ("no box", None),
        ("unbalanced \\boxed{3", None),
    ],
)
def test_last_boxed(text, boxed):
    assert A.last_boxed(text) == boxed


def test_math_gold_needs_a_box():
    assert A.math_gold("Hence $\\boxed{12}$.") == "12"
    with pytest.raises(ValueError, match="no \\\\boxed"):
        A.math_gold("the answer is 12")


# (gold, generation, correct?) graded by math-verify
MATH_TABLE = [
    ("\\frac{1}{2}", "Final Answer: The final answer is $0.5$. I hope it is correct.", True),
    ("\\frac{1}{2}", "Final Answer: The final answer is $\\frac12$. I hope it is correct.", True),
    ("\\frac{\\sqrt{2}}{2}", "The final answer is $\\sqrt{2}/2$. I hope it is correct.", True),
    ("6", "so $y = \\boxed{6}$", True),
    ("6", "Final Answer: The final answer is $7$. I hope it is correct.", False),
    # the stated final answer is graded, not a number from the work before it
    ("6", "2y = 12 gives y = 6 ... Final Answer: The final answer is $12$. I hope it is correct.", False),
    ("1000", "Final Answer: The final answer is $1,000$. I hope it is correct.", True),
    ("3.5", "The final answer is 3.5. I hope it is correct.", True),
    # latent variant: thought, EOL, then the answer sentence
    ("36", f"3x = 18 so x = 6, x^2 = 36.\nTherefore, the answer is $36$.\n{EOL} Final Answer: The final answer is $36$. I hope it is correct.", True),
    ("36", f"x = 6 and the square is 36.{EOL} 36", True),
    ("(1,2)", "The final answer is $(1, 2)$. I hope it is correct.", True),
    ("x^2+1", "The final answer is $1 + x^2$. I hope it is correct.", True),
    ("12", "I have no idea", False),
]


@pytest.mark.parametrize("gold,generation,correct", MATH_TABLE)
def test_math_verify_grading_table(gold, generation, correct):
    assert A.grade_math(gold, generation) is correct


def test_math_process_results_uses_the_boxed_solution():
    doc = {"problem": "p", "solution": "Adding gives $\\boxed{\\frac{1}{4}}$."}
    assert F.math_process_results(doc, ["The final answer is $0.25$. I hope it is correct."]) == {"exact_match": 1}
    assert F.math_process_results(doc, ["The final answer is $0.5$. I hope it is correct."]) == {"exact_match": 0}


def test_math_grading_off_the_main_thread():
    """math-verify's SIGALRM timeouts cannot run in a worker thread; grading must still work."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(A.grade_math, "\\frac{1}{2}", "The final answer is $0.5$. I hope it is correct.").result() is True
