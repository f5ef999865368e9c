"""Built-in synthetic grade-school math word problems in GSM8K format.

Problems come from story templates with 1-5 reasoning steps. Every step is
computed with sympy integer arithmetic and the solution text is checked
against those values before a problem is kept, so no answer is ever wrong.
Answers have one line per step and end with "#### N", like GSM8K, but without
GSM8K's "<<...>>" calculator notes.

`generate` splits the problems into train/validation/test by a hash of the question; `write_jsonl` writes them as
<split>.jsonl. `split_paths` / `ensure_splits` are the one place that names a corpus' folder
(`synth-n{n}-s{seed}-k{max_steps}`), used by training (`data.train: [synth]`) and by `mathlm eval --task synth`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import pathlib
import random
import re

import sympy

from mathlm.data.sources import DataError, as_path, cannot_write, is_uri

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
# One "a op b = c" equation; the lookarounds stop it matching inside longer numbers or decimals.
_EQ_RE = re.compile(r"(?<![\d.])(\d+) ([-+*/]) (\d+) = (\d+)(?!\d|\.\d)")
_FINAL_RE = re.compile(r"^####[ \t]*(.+?)[ \t]*$", re.MULTILINE)
_MAX_MISSES = 5000  # consecutive duplicates/dead ends before we call the problem space exhausted

_NAMES = ([(n, "f") for n in "Mia Emma Olivia Ava Sofia Lily Grace Chloe Zoe Nora Aisha Mei Priya "
           "Lucia Hana Rosa Amara Ella Ruby Nina".split()]
          + [(n, "m") for n in "Tom Liam Noah Leo Ben Sam Omar Ravi Diego Kenji Jack Max Eli Hugo "
             "Felix Marco Kofi Ivan Luca Adam".split()])
_PRONOUNS = {"f": dict(he="she", He="She", his="her", His="Her", him="her", self="herself"),
             "m": dict(he="he", He="He", his="his", His="His", him="him", self="himself")}
_FRIENDS = ["friend", "brother", "sister", "cousin", "neighbor", "grandma", "grandpa", "aunt", "uncle"]
_THINGS = ["book", "kite", "board game", "backpack", "lunch box", "puzzle", "water bottle", "hat", "ball"]
_YOUNG, _PEERS = ["brother", "sister", "cousin"], ["friend", "classmate"]
_ADULT, _PARENTS = ["aunt", "uncle", "teacher", "coach", "neighbor"], ["mother", "father"]
_OLD = ["grandma", "grandpa", "great-aunt", "great-uncle"]

# Story templates. {a}/{b} are numbers drawn for the question, {eq} is the checked "a op b = c"
# equation of a solution line. open0 starts with a plain number (0 steps), open1 with one step
# (question, op, solution). Events move the running quantity x: add/sub/mul (x+a, x-a, x*2),
# group (a*b, then x + that), groupsub (a*b, then x - that). div ends with x / a; ask ends
# with a plain question. A template without ask always ends with div.
TEMPLATES: dict[str, dict] = {
    "collecting": dict(
        items=["stickers", "marbles", "seashells", "stamps", "baseball cards", "pebbles", "buttons"],
        open0=["{name} has {a} {item}.", "{name} has a collection of {a} {item}."],
        open1=[("{name} collects {a} {item} on Monday and {b} {item} on Tuesday.", "+",
                "{He} collects {eq} {item} in the two days."),
               ("{name} has {a} boxes with {b} {item} in each box.", "*", "{He} starts with {eq} {item}.")],
        add=[("{His} {friend} gives {him} {a} more {item}.", "Then {he} has {eq} {item}."),
             ("{He} finds {a} more {item} at the park.", "After finding more, {he} has {eq} {item}.")],
        sub=[("{He} gives {a} {item} to {his} {friend}.", "After giving some away, {he} has {eq} {item}."),
             ("{He} loses {a} {item} on the way home.", "After losing some, {he} has {eq} {item} left.")],
        group=[("{He} buys {a} packs with {b} {item} in each pack.", "The packs hold {eq} {item}.",
                "Now {he} has {eq} {item}.")],
        div=[("{He} puts all of them equally into {a} jars. How many {item} are in each jar?",
              "Each jar gets {eq} {item}.")],
        ask=["How many {item} does {name} have now?", "How many {item} does {name} have in the end?"]),
    "baking": dict(
        items=["cookies", "muffins", "cupcakes", "brownies", "bread rolls", "pancakes"],
        open0=["{name} bakes {a} {item} for a party."],
        open1=[("{name} bakes {a} trays of {item} with {b} {item} on each tray.", "*", "{He} bakes {eq} {item}."),
               ("{name} bakes {a} {item} in the morning and {b} {item} in the afternoon.", "+",
                "{He} bakes {eq} {item} that day.")],
        add=[("{His} {friend} brings {a} more {item}.", "Now there are {eq} {item}.")],
        sub=[("{He} eats {a} of the {item}.", "After eating some, {he} has {eq} {item}."),
             ("{He} sells {a} {item} at the bake sale.", "After the sale, {he} has {eq} {item} left.")],
        group=[("{He} also bakes {a} trays with {b} {item} on each tray.", "The extra trays hold {eq} {item}.",
                "Altogether there are {eq} {item}.")],
        div=[("{He} packs all the {item} into boxes of {a}. How many boxes does {he} fill?", "{He} fills {eq} boxes.")],
        ask=["How many {item} does {name} have now?"]),
    "sharing": dict(
        items=["apples", "oranges", "candies", "grapes", "strawberries", "crayons", "pencils"],
        open0=["{name} has {a} {item}."],
        open1=[("{name} has {a} bags with {b} {item} in each bag.", "*", "{name} has {eq} {item}."),
               ("{name} picks {a} {item} and {his} {friend} picks {b} {item}.", "+",
                "Together they have {eq} {item}.")],
        add=[("{His} {friend} gives {him} {a} more {item}.", "That makes {eq} {item}.")],
        sub=[("{He} keeps {a} {item} for {self}.", "That leaves {eq} {item} to share."),
             ("{He} loses {a} of the {item}.", "{He} has {eq} {item} left.")],
        group=[("{He} buys {a} bags with {b} {item} in each bag.", "The bags have {eq} {item}.",
                "Now {he} has {eq} {item}.")],
        div=[("{He} shares them equally among {a} friends. How many {item} does each friend get?",
              "Each friend gets {eq} {item}."),
             ("{He} puts them into {a} equal piles. How many {item} are in each pile?", "Each pile has {eq} {item}.")],
        ask=[]),
    "shopping": dict(
        items=["notebooks", "pens", "toy cars", "comic books", "erasers", "rulers", "paint sets"],
        open0=["{name} spends ${a} on a {thing}."],
        open1=[("{name} buys {a} {item} for ${b} each.", "*", "The {item} cost {eq} dollars.")],
        add=[("{He} also buys a {thing2} for ${a}.", "With the {thing2}, the total is {eq} dollars.")],
        sub=[("{He} uses a coupon for ${a} off.", "With the coupon, {he} pays {eq} dollars.")],
        group=[("{He} also buys {a} {item2} for ${b} each.", "The {item2} cost {eq} dollars.",
                "Altogether {he} spends {eq} dollars.")],
        mul=[("Next week {he} buys exactly the same things again.", "Over the two weeks {he} spends {eq} dollars.")],
        div=[("{name} and {his} friends split the total cost equally among {a} people. "
              "How many dollars does each person pay?", "Each person pays {eq} dollars.")],
        ask=["How many dollars does {name} spend in total?"]),
    "allowance": dict(
        items=["stickers", "pencils", "comic books", "toy cars", "snacks"],
        open0=["{name} has ${a} in {his} wallet.", "{name} gets ${a} for {his} birthday."],
        open1=[("{name} has ${a} and {his} {friend} gives {him} ${b} more.", "+", "{He} has {eq} dollars."),
               ("{name} helps at a farm stand for {a} days and earns ${b} each day.", "*", "{He} earns {eq} dollars.")],
        add=[("{He} earns ${a} washing cars.", "{He} now has {eq} dollars.")],
        sub=[("{He} spends ${a} on a {thing}.", "After buying the {thing}, {he} has {eq} dollars."),
             ("{He} pays ${a} for a {thing2}.", "After paying for the {thing2}, {he} has {eq} dollars.")],
        groupsub=[("{He} buys {a} {item} that cost ${b} each.", "The {item} cost {eq} dollars.",
                   "{He} has {eq} dollars left.")],
        div=[("{He} puts the money equally into {a} envelopes. How many dollars go in each envelope?",
              "Each envelope gets {eq} dollars.")],
        ask=["How much money does {name} have now?", "How many dollars does {name} have in the end?"]),
    "saving": dict(
        open0=["{name} has ${a} in {his} piggy bank."],
        open1=[("{name} saves ${b} every week for {a} weeks.", "*", "{He} saves {eq} dollars.")],
        add=[("{His} {friend} gives {him} ${a} to add to {his} savings.", "{He} now has {eq} dollars."),
             ("{He} earns ${a} walking dogs and saves all of it.", "That brings {his} savings to {eq} dollars.")],
        sub=[("{He} spends ${a} on a {thing}.", "After buying the {thing}, {he} has {eq} dollars."),
             ("{He} takes out ${a} to buy a gift for {his} {friend}.",
              "After buying the gift, {he} has {eq} dollars.")],
        group=[("Then {he} saves ${b} a week for {a} more weeks.", "Those weeks add {eq} dollars.",
                "{He} has {eq} dollars saved in total.")],
        mul=[("{His} parents match {his} savings dollar for dollar.", "With the match, {he} has {eq} dollars.")],
        div=[("{He} splits {his} savings equally into {a} jars. How many dollars go in each jar?",
              "Each jar gets {eq} dollars.")],
        ask=["How much money does {name} have now?"]),
    "travel": dict(
        units=["km", "miles"], b_range=(20, 90),  # speeds a vehicle can plausibly do
        open1=[("{name} drives at {b} {unit} per hour for {a} hours.", "*", "{He} drives {eq} {unit}."),
               ("{name} takes a train that goes {b} {unit} per hour for {a} hours.", "*",
                "The train goes {eq} {unit}."),
               ("A bus carries {name} at {b} {unit} per hour for {a} hours.", "*", "The bus travels {eq} {unit}.")],
        add=[("After a short break, {he} goes another {a} {unit}.", "So far {he} has gone {eq} {unit}."),
             ("Then {he} takes a detour of {a} {unit}.", "With the detour, {he} has gone {eq} {unit}.")],
        group=[("Then {he} travels for {a} more hours at {b} {unit} per hour.", "That part is {eq} {unit}.",
                "So far {he} has gone {eq} {unit}.")],
        mul=[("Later {he} makes the same trip back home.", "There and back is {eq} {unit}.")],
        div=[("The whole trip is split into {a} equal stages. How many {unit} long is each stage?",
              "Each stage is {eq} {unit}.")],
        ask=["How many {unit} does {name} travel in total?", "How far does {name} go altogether, in {unit}?"]),
    "classroom": dict(
        open0=["A school has {a} students."],
        open1=[("A school has {a} classes with {b} students in each class.", "*", "The school has {eq} students."),
               ("A school has {a} boys and {b} girls.", "+", "There are {eq} students.")],
        add=[("Then {a} new students join the school.", "Now there are {eq} students."),
             ("Later, {a} more students enroll.", "With them, there are {eq} students.")],
        sub=[("On Friday, {a} students are home sick.", "That leaves {eq} students at school."),
             ("Later, {a} students move to another town.", "After they leave, there are {eq} students.")],
        group=[("The school opens {a} new classes with {b} students each.", "The new classes have {eq} students.",
                "Now the school has {eq} students.")],
        div=[("For sports day, the students form teams of {a}. How many teams are there?", "There are {eq} teams."),
             ("All the students go on a trip in {a} buses with the same number on each bus. "
              "How many students ride each bus?", "Each bus carries {eq} students.")],
        ask=["How many students are at the school now?"]),
    "garden": dict(
        items=["tomato plants", "sunflowers", "rose bushes", "pepper plants", "tulips", "lettuce plants"],
        open0=["{name} has {a} {item} in {his} garden."],
        open1=[("{name} plants {a} rows of {item} with {b} {item} in each row.", "*", "{He} plants {eq} {item}."),
               ("{name} plants {a} {item} on Saturday and {b} on Sunday.", "+",
                "{He} plants {eq} {item} over the weekend.")],
        add=[("{His} {friend} gives {him} {a} more {item} to plant.", "Now there are {eq} {item}.")],
        sub=[("A storm ruins {a} of the {item}.", "After the storm, {eq} {item} are left."),
             ("Rabbits eat {a} of the {item}.", "After the rabbits, {eq} {item} remain.")],
        group=[("{He} also plants {a} rows with {b} {item} in each row.", "The new rows have {eq} {item}.",
                "The garden now has {eq} {item}.")],
        div=[("{He} gives all the {item} equally to {a} neighbors. How many {item} does each neighbor get?",
              "Each neighbor gets {eq} {item}.")],
        ask=["How many {item} are in {name}'s garden now?"]),
    "reading": dict(
        open0=["{name} has already read {a} pages of {his} book."],
        open1=[("{name} reads {b} pages every day for {a} days.", "*", "{He} reads {eq} pages."),
               ("{name} reads {a} pages on Saturday and {b} pages on Sunday.", "+",
                "{He} reads {eq} pages over the weekend.")],
        add=[("On Monday {he} reads another {a} pages.", "That makes {eq} pages."),
             ("On the bus {he} reads {a} more pages.", "Now {he} has read {eq} pages.")],
        group=[("The next week {he} reads {b} pages a day for {a} days.", "That week adds {eq} pages.",
                "{He} has read {eq} pages in all.")],
        div=[("Each chapter is {a} pages long. How many chapters has {name} read?", "{He} has read {eq} chapters.")],
        ask=["How many pages has {name} read in total?"]),
}
TEMPLATE_NAMES = [*TEMPLATES, "ages"]
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    n: int = 50000  # total problems to produce across all splits (after dedup)
    seed: int = 0
    min_steps: int = 1
    max_steps: int = 5
    max_value: int = 100  # upper bound for every number that appears in a question
    val_fraction: float = 0.05
    test_fraction: float = 0.05

    @classmethod
    def from_data(cls, data) -> SynthConfig:
        """The corpus a run's `data:` section asks for (its synth_n, synth_seed, synth_max_steps, synth_max_value)."""
        return cls(n=data.synth_n, seed=data.synth_seed, max_steps=data.synth_max_steps,
                   max_value=getattr(data, "synth_max_value", 100))


class _Reject(Exception):
    """Random choices hit a dead end (e.g. no exact divisor); the caller draws a new problem."""


def _rand(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(min(lo, hi), hi)  # tolerate hi < lo when max_value is small


class _Solver:
    """Collects question sentences and sympy-checked solution lines for one problem."""

    def __init__(self, ctx: dict):
        self.ctx, self.question, self.lines = ctx, [], []

    def say(self, fmt: str, **nums) -> None:
        self.question.append(fmt.format_map({**self.ctx, **nums}))

    def step(self, fmt: str, a: int, op: str, b: int, /, **nums) -> int:
        r = _OPS[op](sympy.Integer(a), sympy.Integer(b))
        if not r.is_Integer or r < 0:  # only exact, non-negative integer steps are allowed
            raise _Reject
        line = fmt.format_map({**self.ctx, **nums, "eq": f"{a} {op} {b} = {r}"})
        # Guard against template mistakes: the line must show exactly this one equation.
        if _EQ_RE.findall(line) != [(str(a), op, str(b), str(r))]:
            raise AssertionError(f"solution line does not match its step: {line!r}")
        self.lines.append(line)
        return int(r)


def _spec_story(rng: random.Random, spec: dict, k: int, maxv: int, s: _Solver) -> int:
    """Tell a k-step story from a TEMPLATES entry; returns the final answer."""
    b_lo, b_hi = spec.get("b_range", (2, maxv))
    b_hi = min(b_hi, maxv)
    div = spec.get("div") if not spec.get("ask") or rng.random() < 0.35 else None
    if div and k == 1 and not spec.get("open0"):
        div = None
    if not div and not spec.get("ask"):
        raise _Reject
    body = k - (1 if div else 0)  # steps before the finale
    if body == 0 or (spec.get("open0") and rng.random() < 0.25):
        x = _rand(rng, 2, maxv)
        s.say(rng.choice(spec["open0"]), a=x)
    else:
        q, op, sol = rng.choice(spec["open1"])
        a = _rand(rng, 2, min(10, maxv)) if op == "*" else _rand(rng, 2, maxv)  # a counts groups
        b = _rand(rng, b_lo, b_hi)
        s.say(q, a=a, b=b)
        x = s.step(sol, a, op, b)
        body -= 1
    used = set()  # each event sentence at most once per problem, so stories don't repeat themselves
    while body > 0:
        # sub leaves at least 2; groupsub needs room for at least 2 items at $2 or more.
        ok = {"add": True, "mul": True, "sub": x >= 4, "group": body >= 2, "groupsub": body >= 2 and x >= 8}
        options = [(kind, e) for kind in ok if ok[kind] for e in spec.get(kind, []) if e[0] not in used]
        if not options:
            raise _Reject
        kind, entry = rng.choice(options)
        used.add(entry[0])
        if kind in ("add", "sub"):
            a = _rand(rng, 2, maxv if kind == "add" else min(maxv, x - 2))
            s.say(entry[0], a=a)
            x = s.step(entry[1], x, "+" if kind == "add" else "-", a)
        elif kind == "mul":
            s.say(entry[0])
            x = s.step(entry[1], x, "*", 2)
        else:  # a groups of b, then added to / taken from the running total
            if kind == "group":
                a, b = _rand(rng, 2, min(10, maxv)), _rand(rng, b_lo, b_hi)
            else:  # keep the purchase below what is left, so money never runs out
                b = _rand(rng, 2, min(maxv, (x - 1) // 2))
                a = _rand(rng, 2, min(10, maxv, (x - 1) // b))
            s.say(entry[0], a=a, b=b)
            part = s.step(entry[1], a, "*", b)
            x = s.step(entry[2], x, "+" if kind == "group" else "-", part)
            body -= 1
        body -= 1
    if div:
        divisors = [d for d in range(2, min(12, maxv) + 1) if x % d == 0 and x // d >= 2]
        if not divisors:
            raise _Reject
        d = rng.choice(divisors)
        q, sol = rng.choice(div)
        s.say(q, a=d)
        return s.step(sol, x, "/", d)
    s.say(rng.choice(spec["ask"]))
    return x


def _ages_story(rng: random.Random, k: int, maxv: int, s: _Solver) -> int:
    """A chain of people, each age given relative to the previous person."""
    name = s.ctx["name"]
    x = child = _rand(rng, 3, min(14, maxv))
    s.say("{name} is {a} years old.", a=x)
    prev, used = name, set()
    for i in range(k):
        if i == k - 1 and rng.random() < 0.3:  # finish with "in y years" instead of a new person
            y = _rand(rng, 2, min(20, maxv))
            s.say("How old will {p} be in {a} years?", p=prev, a=y)
            return s.step("In {a} years, {p} will be {eq} years old.", x, "+", y, p=prev, a=y)
        options = [("+", _rand(rng, 2, min(30, maxv)))]
        if x >= 5:
            options.append(("-", _rand(rng, 2, min(30, maxv, x - 2))))
        if x * 2 <= 90:
            options.append(("*", _rand(rng, 2, min(4, maxv, 90 // x))))
        if x % 2 == 0 and x >= 6:
            options.append(("/", 2))
        op, a = rng.choice(options)
        age = _OPS[op](x, a)
        # Label the person by the age they will have, so a "grandpa" is never younger than a "sister".
        if age < 18:
            pool = _YOUNG + (_PEERS if abs(age - child) <= 2 else [])
        else:
            pool = _OLD if age >= 60 else _ADULT + (_PARENTS if age >= child + 20 else [])
        labels = [w for w in pool if w not in used]
        if age > 95 or not labels:
            raise _Reject
        used.add(rel := rng.choice(labels))
        who = f"{name}'s {rel}"
        s.say({"+": "{w} is {a} years older than {p}.", "-": "{w} is {a} years younger than {p}.",
               "*": "{w} is {a} times as old as {p}.", "/": "{w} is half as old as {p}."}[op], w=who, p=prev, a=a)
        x = s.step("{w} is {eq} years old.", x, op, a, w=who)
        prev = who
    s.say("How old is {p}?", p=prev)
    return x


def _make_problem(rng: random.Random, cfg: SynthConfig) -> dict | None:
    """One random problem as {question, answer, steps, template}, or None on a dead end."""
    k = rng.randint(cfg.min_steps, cfg.max_steps)
    tname = rng.choice(TEMPLATE_NAMES)
    spec = TEMPLATES.get(tname, {})
    name, sex = rng.choice(_NAMES)
    items = spec.get("items", ["things"])
    item = rng.choice(items)
    thing, thing2 = rng.sample(_THINGS, 2)
    ctx = dict(name=name, **_PRONOUNS[sex], friend=rng.choice(_FRIENDS), thing=thing, thing2=thing2,
               item=item, item2=rng.choice([i for i in items if i != item] or items),
               unit=rng.choice(spec.get("units", ["km"])))
    s = _Solver(ctx)
    try:
        if tname == "ages":
            x = _ages_story(rng, k, cfg.max_value, s)
        else:
            x = _spec_story(rng, spec, k, cfg.max_value, s)
    except _Reject:
        return None
    # The final answer is the sympy value of the last step, and there is one line per step.
    assert len(s.lines) == k and _EQ_RE.findall(s.lines[-1])[0][3] == str(x)
    return {"question": " ".join(s.question), "answer": "\n".join([*s.lines, f"#### {x}"]),
            "steps": k, "template": tname}


def _check_config(cfg: SynthConfig) -> None:
    if not 1 <= cfg.min_steps <= cfg.max_steps <= 5:
        raise ValueError(f"need 1 <= min_steps <= max_steps <= 5, got {cfg.min_steps}..{cfg.max_steps}")
    if cfg.max_value < 10:
        raise ValueError(f"max_value must be at least 10, got {cfg.max_value}")
    if cfg.n < 0 or cfg.val_fraction < 0 or cfg.test_fraction < 0 or cfg.val_fraction + cfg.test_fraction >= 1:
        raise ValueError("need n >= 0, fractions >= 0 and val_fraction + test_fraction < 1")


def split_of(question: str, cfg) -> tuple[str, str]:
    """Split chosen by a hash of the text alone, so it never depends on generation order (cfg: anything with
    val_fraction and test_fraction, e.g. SynthConfig or data/skills.py's SkillConfig)."""
    digest = hashlib.sha256(question.encode("utf-8")).hexdigest()
    u = int(digest[:16], 16) / 16**16
    split = "test" if u < cfg.test_fraction else "validation" if u < cfg.test_fraction + cfg.val_fraction else "train"
    return split, digest


def generate(cfg: SynthConfig) -> dict[str, list[dict]]:
    """cfg.n unique problems, split into train/validation/test by question hash."""
    _check_config(cfg)
    rng = random.Random(cfg.seed)
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    attempts = misses = 0
    while len(seen) < cfg.n:
        if misses >= _MAX_MISSES or attempts >= 20 * cfg.n + 1000:
            raise ValueError(f"only {len(seen)} unique problems after {attempts} attempts (n={cfg.n}); "
                             "lower n or raise max_value/max_steps")
        attempts += 1
        rec = _make_problem(rng, cfg)
        if rec is None or rec["question"] in seen:
            misses += 1
            continue
        misses = 0
        seen.add(rec["question"])
        split, digest = split_of(rec["question"], cfg)
        splits[split].append({"id": f"synth-{digest[:16]}", **rec})
    return splits


def write_jsonl(splits: dict[str, list[dict]], out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Write <out_dir>/<split>.jsonl for each split (a local folder or a URI); returns the paths."""
    out = as_path(out_dir)
    try:
        if not is_uri(out):
            out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(cannot_write(out, e)) from None
    paths = {}
    for name, records in splits.items():
        paths[name] = out / f"{name}.jsonl"
        # whole, in one write: an object store has no append
        paths[name].write_text("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records),
                               encoding="utf-8")
    return paths


def split_paths(root: str | pathlib.Path, cfg: SynthConfig) -> dict[str, pathlib.Path]:
    """Where the corpus of `cfg` lives under `root`: root/synth-n{n}-s{seed}-k{max_steps}/<split>.jsonl (named by
    the settings a run's `data:` section can choose; see SynthConfig.from_data)."""
    value = "" if cfg.max_value == 100 else f"-v{cfg.max_value}"  # the default keeps earlier runs' folder names
    folder = as_path(root) / f"synth-n{cfg.n}-s{cfg.seed}-k{cfg.max_steps}{value}"
    return {split: folder / f"{split}.jsonl" for split in SPLITS}


def ensure_splits(root: str | pathlib.Path, cfg: SynthConfig) -> dict[str, pathlib.Path]:
    """split_paths, generating and writing the corpus first if any split file is missing (it is deterministic)."""
    paths = split_paths(root, cfg)
    if not all(p.is_file() for p in paths.values()):
        write_jsonl(generate(cfg), paths["train"].parent)
    return paths


def final_answer(answer_text: str) -> str:
    """The N of the '#### N' line (thousands commas removed, as in GSM8K scoring)."""
    m = _FINAL_RE.search(answer_text)
    if m is None:
        raise ValueError("answer has no '#### N' line")
    return m.group(1).replace(",", "")


def verify(record: dict) -> bool:
    """Re-check a record's solution with sympy.

    Every line before '#### N' must hold exactly one 'a op b = c' equation that sympy
    confirms, whose operands come from the question or earlier results (2 is also allowed,
    for "twice"/"half"/"the same trip back"), and N must equal the last result.
    """
    try:
        *body, last = record["answer"].strip().split("\n")
        n = _FINAL_RE.fullmatch(last.strip())
        if not body or n is None or record.get("steps", len(body)) != len(body):
            return False
        known = set(re.findall(r"\d+", record["question"])) | {"2"}
        result = None
        for line in body:
            eqs = _EQ_RE.findall(line)
            if len(eqs) != 1:
                return False
            a, op, b, c = eqs[0]
            if a not in known or b not in known or sympy.sympify(f"{a} {op} {b}") != sympy.Integer(c):
                return False
            known.add(c)
            result = c
        return sympy.Integer(n.group(1).replace(",", "")) == sympy.Integer(result)
    except Exception:  # any malformed record simply fails verification
        return False
