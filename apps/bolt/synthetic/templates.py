"""The concrete worlds of the synthetic corpus and their sentence templates.

Each template pairs a question pattern with an answer pattern, a program (the derivation) and
a slot sampler. Samplers pick the free numbers first and build the stated constants from them
(an equation's solution is drawn, then its right-hand side computed), so almost every draw is
valid; the program, run on a bounded :class:`Calc`, still checks every step.

Worlds (name: what a statement looks like, steps it can take):

* ``shop``: "Mia has 4 boxes of 7 pens, then gives away 5, then gets 9 more." / "Mia ends with
  32 pens." (1-5 steps)
* ``equation``: "Solve 3x + 7 = 31." / "So x = 8." (2-3 steps)
* ``percent``: "A price of 40 dollars falls by 30%." / "The new price is 28 dollars." (1-3)
* ``units``: "Convert 3 feet 5 inches to inches." / "That is 41 inches." (1-3)
* ``mean``: "Find the mean of 4, 8 and 9." / "The mean is 7." (2-4)
* ``geometry``: "Find the area of a rectangle that is 7 by 5 with a hole of 2 by 3." / "The area
  is 29." (1-3)
* ``ages``: "Ann is 8, and Tom is 3 years older than 2 times Ann's age." / "So Tom is 19." (1-2)
"""

from __future__ import annotations

from apps.bolt.synthetic.arith import Calc, Pattern, Reject
from apps.bolt.synthetic.worlds import ChainWorld, Clause, Sampler, Template, TemplateWorld, World

NAMES = ("Mia", "Leo", "Ava", "Sam", "Noah", "Zoe", "Eli", "Ivy", "Max", "Lily", "Omar", "Nina")
GOODS = (
    ("boxes", "pens"),
    ("bags", "apples"),
    ("crates", "eggs"),
    ("packs", "cards"),
    ("jars", "marbles"),
    ("trays", "cookies"),
    ("sacks", "potatoes"),
    ("boxes", "crayons"),
)
VARIABLES = ("x", "y", "n")
# percent -> (numerator, denominator) of the reduced fraction p/100
PERCENTS = {10: (1, 10), 20: (1, 5), 25: (1, 4), 50: (1, 2), 30: (3, 10), 40: (2, 5), 60: (3, 5), 70: (7, 10), 75: (3, 4), 80: (4, 5), 90: (9, 10)}
UNIT_PERCENTS = tuple(p for p, (k, _) in PERCENTS.items() if k == 1)
OTHER_PERCENTS = tuple(p for p, (k, _) in PERCENTS.items() if k > 1)
# (big unit, small unit, small units per big unit)
UNITS = (
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
    ("gallons", "quarts", 4),
    ("pounds", "ounces", 16),
)
UNIT_FACTORS = {(big, small): f for big, small, f in UNITS}


def _t(name, question, answer, program, sample, steps, ops, **kinds) -> Template:
    q_kinds = {k: v for k, v in kinds.items() if "{" + k + "}" in question}
    a_kinds = {k: v for k, v in kinds.items() if "{" + k + "}" in answer}
    return Template(name, Pattern(question, **q_kinds), Pattern(answer, **a_kinds), program, sample, frozenset(steps), frozenset(ops))


# --- equations --------------------------------------------------------------------------------
def _eq_add(s: Sampler, n: int) -> dict:  # a*x + b = c
    a, x, b = s.num(), s.num(), s.num()
    return {"a": a, "b": b, "c": a * x + b, "v": s.pick(VARIABLES)}


def _eq_sub(s: Sampler, n: int) -> dict:  # a*x - b = c
    a, x = s.num(), s.num()
    b = s.num(hi=min(s.hi, a * x - 1))
    return {"a": a, "b": b, "c": a * x - b, "v": s.pick(VARIABLES)}


def _eq_paren(s: Sampler, n: int) -> dict:  # a*(x + b) = c
    a, x, b = s.num(), s.num(), s.num()
    return {"a": a, "b": b, "c": a * (x + b), "v": s.pick(VARIABLES)}


def _eq_frac(s: Sampler, n: int) -> dict:  # x / a + b = c
    a, q, b = s.num(), s.num(), s.num()
    return {"a": a, "b": b, "c": q + b, "v": s.pick(VARIABLES)}


def _eq_sides(s: Sampler, n: int) -> dict:  # a*x + b = c*x + d
    a = s.num(lo=3)
    c, x, b = s.num(hi=a - 1), s.num(), s.num()
    return {"a": a, "b": b, "c": c, "d": (a - c) * x + b, "v": s.pick(VARIABLES)}


def _eq_paren_sub(s: Sampler, n: int) -> dict:  # a*(x + b) - c = d
    a, x, b = s.num(), s.num(), s.num()
    c = s.num(hi=min(s.hi, a * (x + b) - 1))
    return {"a": a, "b": b, "c": c, "d": a * (x + b) - c, "v": s.pick(VARIABLES)}


_SO = "So {v} = {ans}."
EQUATION = TemplateWorld(
    "equation",
    [
        _t("eq_add", "Solve {a}{v} + {b} = {c}.", _SO, lambda k, v: k.div(k.sub(v["c"], v["b"]), v["a"]), _eq_add, {2}, "-/", v="var"),
        _t("eq_sub", "Solve {a}{v} - {b} = {c}.", _SO, lambda k, v: k.div(k.add(v["c"], v["b"]), v["a"]), _eq_sub, {2}, "+/", v="var"),
        _t("eq_paren", "Solve {a}({v} + {b}) = {c}.", _SO, lambda k, v: k.sub(k.div(v["c"], v["a"]), v["b"]), _eq_paren, {2}, "/-", v="var"),
        _t("eq_frac", "Solve {v} / {a} + {b} = {c}.", _SO, lambda k, v: k.mul(k.sub(v["c"], v["b"]), v["a"]), _eq_frac, {2}, "-*", v="var"),
        _t(
            "eq_sides",
            "Solve {a}{v} + {b} = {c}{v} + {d}.",
            _SO,
            lambda k, v: (lambda top: k.div(top, k.sub(v["a"], v["c"])))(k.sub(v["d"], v["b"])),
            _eq_sides,
            {3},
            "-/",
            v="var",
        ),
        _t(
            "eq_paren_sub",
            "Solve {a}({v} + {b}) - {c} = {d}.",
            _SO,
            lambda k, v: k.sub(k.div(k.add(v["d"], v["c"]), v["a"]), v["b"]),
            _eq_paren_sub,
            {3},
            "+/-",
            v="var",
        ),
    ],
)


# --- percentages ------------------------------------------------------------------------------
def _percent_slots(s: Sampler, n_part_steps: int) -> dict:
    """The base is any multiple of the fraction's denominator below ``s.limit`` (a price, not a
    free operand), so "30% of 70" is as likely as "30% of 20"."""
    p = s.pick(UNIT_PERCENTS if n_part_steps == 1 else OTHER_PERCENTS)
    den = PERCENTS[p][1]
    return {"p": p, "n": den * s.num(hi=s.limit // den)}


def _part(k: Calc, v: dict) -> int:
    """p% of n as n / d (* k when the fraction is not a unit fraction)."""
    if v["p"] not in PERCENTS:
        raise Reject(f"{v['p']}% is not a percentage of this world")
    num, den = PERCENTS[v["p"]]
    share = k.div(v["n"], den)
    return k.mul(share, num) if num > 1 else share


PERCENT = TemplateWorld(
    "percent",
    [
        _t("pct_of", "Find {p}% of {n}.", "That is {ans}.", _part, _percent_slots, {1, 2}, "/*"),
        _t(
            "pct_rise",
            "A price of {n} dollars rises by {p}%.",
            "The new price is {ans} dollars.",
            lambda k, v: k.add(v["n"], _part(k, v)),
            lambda s, n: _percent_slots(s, n - 1),
            {2, 3},
            "/*+",
        ),
        _t(
            "pct_fall",
            "A price of {n} dollars falls by {p}%.",
            "The new price is {ans} dollars.",
            lambda k, v: k.sub(v["n"], _part(k, v)),
            lambda s, n: _percent_slots(s, n - 1),
            {2, 3},
            "/*-",
        ),
    ],
)


# --- unit conversions -------------------------------------------------------------------------
def _units(s: Sampler, n: int) -> dict:
    big, small, f = s.pick(UNITS)
    slots = {"big": big, "small": small, "a": s.num()}
    if n >= 2:
        slots["b"] = s.num(hi=min(s.hi, f - 1))
    if n >= 3:
        slots["c"] = s.num()
    return slots


def _factor(v: dict) -> int:
    return UNIT_FACTORS[(v["big"], v["small"])]


UNITS_WORLD = TemplateWorld(
    "units",
    [
        _t("unit_whole", "Convert {a} {big} to {small}.", "That is {ans} {small}.", lambda k, v: k.mul(v["a"], _factor(v)), _units, {1}, "*", big="word", small="word"),
        _t(
            "unit_mixed",
            "Convert {a} {big} {b} {small} to {small}.",
            "That is {ans} {small}.",
            lambda k, v: k.add(k.mul(v["a"], _factor(v)), v["b"]),
            _units,
            {2},
            "*+",
            big="word",
            small="word",
        ),
        _t(
            "unit_add",
            "Add {c} {small} to {a} {big} {b} {small}.",
            "That is {ans} {small}.",
            lambda k, v: k.add(k.add(k.mul(v["a"], _factor(v)), v["b"]), v["c"]),
            _units,
            {3},
            "*+",
            big="word",
            small="word",
        ),
    ],
)


# --- means ------------------------------------------------------------------------------------
def _mean_slots(s: Sampler, n: int) -> dict:
    values = [s.num() for _ in range(n - 1)]
    fits = [x for x in range(s.lo, s.hi + 1) if (sum(values) + x) % n == 0]
    if not fits:
        raise Reject("no last value makes the mean whole")
    values.append(s.pick(fits))
    return {f"x{i + 1}": x for i, x in enumerate(values)}


def _mean(k: Calc, v: dict) -> int:
    values = [v[f"x{i + 1}"] for i in range(len(v))]
    total = values[0]
    for x in values[1:]:
        total = k.add(total, x)
    return k.div(total, len(values))


MEAN = TemplateWorld(
    "mean",
    [
        _t("mean2", "Find the mean of {x1} and {x2}.", "The mean is {ans}.", _mean, _mean_slots, {2}, "+/"),
        _t("mean3", "Find the mean of {x1}, {x2} and {x3}.", "The mean is {ans}.", _mean, _mean_slots, {3}, "+/"),
        _t("mean4", "Find the mean of {x1}, {x2}, {x3} and {x4}.", "The mean is {ans}.", _mean, _mean_slots, {4}, "+/"),
    ],
)


# --- rectangles and cubes ---------------------------------------------------------------------
def _rect(s: Sampler, n: int) -> dict:
    return {"a": s.num(), "b": s.num()}


def _hole(s: Sampler, n: int) -> dict:
    a, b = s.num(lo=3), s.num(lo=3)
    return {"a": a, "b": b, "c": s.num(hi=a - 1), "d": s.num(hi=b - 1)}


GEOMETRY = TemplateWorld(
    "geometry",
    [
        _t("area", "Find the area of a rectangle that is {a} by {b}.", "The area is {ans}.", lambda k, v: k.mul(v["a"], v["b"]), _rect, {1}, "*"),
        _t("perimeter", "Find the perimeter of a rectangle that is {a} by {b}.", "The perimeter is {ans}.", lambda k, v: k.mul(k.add(v["a"], v["b"]), 2), _rect, {2}, "+*"),
        _t("cube", "Find the volume of a cube with side {a}.", "The volume is {ans}.", lambda k, v: k.mul(k.mul(v["a"], v["a"]), v["a"]), _rect, {2}, "*"),
        _t(
            "area_hole",
            "Find the area of a rectangle that is {a} by {b} with a hole of {c} by {d}.",
            "The area is {ans}.",
            lambda k, v: (lambda whole: k.sub(whole, k.mul(v["c"], v["d"])))(k.mul(v["a"], v["b"])),
            _hole,
            {3},
            "*-",
        ),
    ],
)


# --- ages -------------------------------------------------------------------------------------
def _ages(s: Sampler, n: int) -> dict:
    n1 = s.pick(NAMES)
    n2 = s.pick([m for m in NAMES if m != n1])
    a, k = s.num(), s.num(lo=2, hi=min(4, s.hi))
    slots = {"n1": n1, "n2": n2, "a": a, "k": k}
    if n == 2:
        slots["c"] = s.num(hi=min(s.hi, a * k - 1))
    return slots


AGES = TemplateWorld(
    "ages",
    [
        _t("age_times", "{n1} is {a}, and {n2} is {k} times as old.", "So {n2} is {ans}.", lambda k, v: k.mul(v["a"], v["k"]), _ages, {1}, "*", n1="word", n2="word"),
        _t(
            "age_older",
            "{n1} is {a}, and {n2} is {c} years older than {k} times {n1}'s age.",
            "So {n2} is {ans}.",
            lambda k, v: k.add(k.mul(v["a"], v["k"]), v["c"]),
            _ages,
            {2},
            "*+",
            n1="word",
            n2="word",
        ),
        _t(
            "age_younger",
            "{n1} is {a}, and {n2} is {c} years younger than {k} times {n1}'s age.",
            "So {n2} is {ans}.",
            lambda k, v: k.sub(k.mul(v["a"], v["k"]), v["c"]),
            _ages,
            {2},
            "*-",
            n1="word",
            n2="word",
        ),
    ],
)


# --- shopping stories -------------------------------------------------------------------------
SHOP = ChainWorld(
    "shop",
    starts=[
        (Pattern("{name} has {a} {cs} of {b} {items}", name="word", cs="word", items="word"), 1),
        (Pattern("{name} has {a} {items}", name="word", items="word"), 0),
    ],
    clauses=[
        Clause("gain", Pattern("gets {c} more"), 1, frozenset("+")),
        Clause("lose", Pattern("gives away {c}"), 1, frozenset("-")),
        Clause("buy_groups", Pattern("buys {c} more {cs}", cs="word"), 2, frozenset("*+"), needs_groups=True),
        Clause("scale", Pattern("{verb} them", verb="word"), 1, frozenset("*")),
        Clause("pack", Pattern("packs them into bags of {c}"), 1, frozenset("/"), final_only=True),
    ],
    answers={
        "count": Pattern("{name} ends with {ans} {items}.", name="word", items="word"),
        "bags": Pattern("{name} fills {ans} bags.", name="word"),
    },
    names=NAMES,
    goods=GOODS,
    scale_verbs={"doubles": 2, "triples": 3},
)

WORLDS: dict[str, World] = {w.name: w for w in (SHOP, EQUATION, PERCENT, UNITS_WORLD, MEAN, GEOMETRY, AGES)}
"""Every world by name, in a fixed order (the generator's default mix)."""
