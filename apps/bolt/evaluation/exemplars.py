"""Hand-written few-shot exemplars for the GSM8K, MATH and MMLU-STEM CoT tasks.

Each exemplar is stored once as (problem, reasoning, answer); the raw and the latent targets are
both derived from it by :mod:`apps.bolt.evaluation.task_functions`, so the two variants of a task
always show the model the same derivations, only placed differently (in the text for the raw
variant, inside the latent thought for the latent variant).

These problems were written for this project in the style of the benchmarks; they are not taken
from the benchmarks' train splits or from the reference's prompt files.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exemplar:
    problem: str
    reasoning: str
    answer: str
    choices: tuple[str, ...] = ()
    """Multiple-choice options (MMLU); ``answer`` is then the letter, e.g. ``"C"``."""


GSM8K = (
    Exemplar(
        "A baker made 48 muffins in the morning and 36 muffins in the afternoon. She sold 59 of "
        "them. How many muffins does she have left?",
        "In total she made 48 + 36 = 84 muffins. After selling 59 of them she has 84 - 59 = 25 "
        "muffins left.",
        "25",
    ),
    Exemplar(
        "Tom reads 12 pages on every weekday and 20 pages on each weekend day. How many pages "
        "does he read in one week?",
        "On the 5 weekdays he reads 5 * 12 = 60 pages. On the 2 weekend days he reads 2 * 20 = 40 "
        "pages. In one week he reads 60 + 40 = 100 pages.",
        "100",
    ),
    Exemplar(
        "A box holds 6 rows of 8 crayons. A teacher buys 5 boxes and gives away 70 crayons. How "
        "many crayons does she keep?",
        "One box holds 6 * 8 = 48 crayons, so 5 boxes hold 5 * 48 = 240 crayons. After giving "
        "away 70 she keeps 240 - 70 = 170 crayons.",
        "170",
    ),
    Exemplar(
        "Maria earns $15 per hour. She worked 7 hours on Monday and 5 hours on Tuesday, and she "
        "spent a third of her earnings on groceries. How many dollars does she have left?",
        "She worked 7 + 5 = 12 hours and earned 12 * 15 = 180 dollars. A third of that is "
        "180 / 3 = 60 dollars, so she has 180 - 60 = 120 dollars left.",
        "120",
    ),
    Exemplar(
        "A train travels at 80 kilometers per hour for 3 hours and then at 60 kilometers per hour "
        "for 2 hours. How many kilometers does it travel in total?",
        "In the first part it covers 80 * 3 = 240 kilometers and in the second part 60 * 2 = 120 "
        "kilometers. The total distance is 240 + 120 = 360 kilometers.",
        "360",
    ),
    Exemplar(
        "A garden has 4 times as many tulips as roses. There are 35 roses. If 28 tulips are "
        "picked, how many tulips remain?",
        "The garden has 4 * 35 = 140 tulips. After 28 are picked, 140 - 28 = 112 tulips remain.",
        "112",
    ),
    Exemplar(
        "Jake has 3 times as many marbles as Lily, and together they have 64 marbles. How many "
        "marbles does Jake have?",
        "If Lily has x marbles, Jake has 3x and together they have 4x = 64, so x = 64 / 4 = 16. "
        "Jake has 3 * 16 = 48 marbles.",
        "48",
    ),
    Exemplar(
        "A shirt costs $40. It is on sale for 25% off, and then a $3 coupon is applied. What is "
        "the final price in dollars?",
        "25% of 40 is 0.25 * 40 = 10 dollars, so the sale price is 40 - 10 = 30 dollars. The "
        "coupon brings it to 30 - 3 = 27 dollars.",
        "27",
    ),
)

MATH = (
    Exemplar(
        "If $3x - 7 = 11$, what is the value of $x^2$?",
        "Adding 7 to both sides gives $3x = 18$, so $x = 6$. Hence $x^2 = 36$.",
        "36",
    ),
    Exemplar(
        "In how many ways can 2 books be chosen from a shelf of 6 different books?",
        "The order does not matter, so the count is $\\binom{6}{2} = \\frac{6 \\cdot 5}{2} = 15$.",
        "15",
    ),
    Exemplar(
        "A right triangle has legs of lengths 5 and 12. What is the length of its hypotenuse?",
        "By the Pythagorean theorem the hypotenuse is $\\sqrt{5^2 + 12^2} = \\sqrt{25 + 144} = "
        "\\sqrt{169} = 13$.",
        "13",
    ),
    Exemplar(
        "Write $\\frac{18}{24}$ as a fraction in lowest terms.",
        "The greatest common divisor of 18 and 24 is 6, and dividing both by 6 gives "
        "$\\frac{18}{24} = \\frac{3}{4}$.",
        "\\frac{3}{4}",
    ),
)

MMLU_STEM = (
    Exemplar(
        "What is the derivative of $x^3$ with respect to $x$?",
        "The power rule says that the derivative of $x^n$ is $n x^{n-1}$, so the derivative of "
        "$x^3$ is $3x^2$.",
        "A",
        ("$3x^2$", "$x^2$", "$3x$", "$x^4/4$"),
    ),
    Exemplar(
        "Which of these particles carries a negative electric charge?",
        "Protons are positive, neutrons and photons are neutral, and electrons are negative.",
        "C",
        ("proton", "neutron", "electron", "photon"),
    ),
    Exemplar(
        "What is the worst-case running time of binary search on a sorted array of n elements?",
        "Each comparison halves the remaining range, so at most about log2(n) comparisons are "
        "needed, which is O(log n).",
        "B",
        ("O(n)", "O(log n)", "O(n log n)", "O(1)"),
    ),
    Exemplar(
        "A ball is dropped from rest. Ignoring air resistance and taking g = 9.8 m/s^2, what is "
        "its speed after 2 seconds?",
        "Starting from rest the speed grows as v = g t, so after 2 seconds v = 9.8 * 2 = 19.6 m/s.",
        "C",
        ("4.9 m/s", "9.8 m/s", "19.6 m/s", "39.2 m/s"),
    ),
)
