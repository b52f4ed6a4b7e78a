"""Verifiable math rewards: extract the final answer v(.) from a completion, decide equivalence, score 1/0.

Choices (SPEC section 4):
- Extraction, first rule that applies: the last `\\boxed{...}` or `\\fbox{...}` (balanced nested braces;
  `\\boxed 5` without braces too), else the last GSM8K `#### value`, else the last "answer is ..." /
  "answer: ..." phrase up to the end of its sentence. A last box whose braces never close (a truncated
  completion) does not count as a box. Nothing found gives None and reward 0.
- Equivalence, against the reference and each alternative (Minerva's `answer_alternatives`): equal
  strings after light cleaning (`$`, spaces, `\\left`/`\\right`, `\\dfrac`, `x_{1}` -> `x_1`), else, when
  both sides are plain numbers, numeric comparison with relative tolerance 1e-6 ("1,234", "5.0", "1/2",
  `\\frac{1}{2}`, "8.7e8", `8.7 \\times 10^{8}`, "$5", "5 dollars", `41.8^\\circ`; a percent sign gives
  both readings x and x/100), else math-verify with its LaTeX parser only (its plain-expression parser
  runs sympy's eval-based `parse_expr`, which we never feed completion text). `verify(gold=reference)`.
- Bounded time: an answer longer than MAX_ANSWER_CHARS, with a digit run longer than MAX_DIGITS, braces
  nested deeper than MAX_DEPTH, a 5+ digit exponent, a number raised to a numeric tower (10^{10^{10}},
  9^9^9), a factorial of a 5+ digit number or of a numeric group, or a binomial or Gamma with a 5+ digit
  number in it is never parsed (not equivalent): sympy would work on such integers inside C calls that no
  signal interrupts. The rest is bounded by a timer: math-verify's own timeout uses `signal.alarm` (whole
  seconds, and a ValueError off the main thread), so we switch it off and run each `is_equivalent` call
  (all alternatives together) under our own SIGALRM timer of TIMEOUT_S seconds, with SIGALRM unblocked for
  the call (a parent process may hand it to us blocked, and the timer would never fire). Signals only work
  on the main thread; off it, only the caps bound the time. Extraction is linear in the completion length.
  No text is ever eval'd or exec'd.
"""

import contextlib
import functools
import json
import logging
import os
import re
import signal
import threading
import time
from fractions import Fraction
from pathlib import Path

from math_verify import LatexExtractionConfig, parse, verify

MAX_ANSWER_CHARS = 300
MAX_DIGITS = 40
MAX_DEPTH = 10
TIMEOUT_S = 0.5
REPEAT_S = 0.05  # the timer fires again this often until the block ends
REL_TOL = Fraction(1, 10**6)

# math-verify warns once that its (signal-based) timeout is off: we run our own timer instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# ---- extraction -------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS = re.compile(r"answer\s*(?:is\b|:)\s*:?", re.IGNORECASE)
_BRACE = re.compile(r"(?<!\\)[{}]")
_BARE = re.compile(r"[^\s$]+")


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == '{', or None if it never closes."""
    depth = 0
    for brace in _BRACE.finditer(text, start):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[start + 1 : brace.start()]
    return None


def _last_boxed(text: str) -> str | None:
    box = _BOX.match(text, max(text.rfind("\\boxed"), text.rfind("\\fbox"), 0))
    if box is None:
        return None
    rest = box.end()
    while rest < len(text) and text[rest].isspace():
        rest += 1
    if rest < len(text) and text[rest] == "{":
        return _braced(text, rest)
    match = _BARE.match(text, rest)  # `\boxed 5`, as some MATH solutions write it
    return match.group(0) if match and rest > box.end() else None


def _after_marker(text: str) -> str | None:
    """The value after the last `####` (GSM8K) or else the last "answer is" phrase, to its sentence end."""
    cut = text.rfind("####")
    if cut >= 0:
        return text[cut + 4 :].split("\n", 1)[0]
    phrases = list(_ANSWER_IS.finditer(text))
    if not phrases:
        return None
    line = text[phrases[-1].end() :].split("\n", 1)[0]
    return re.split(r"\.(?=\s|$)", line, maxsplit=1)[0]


def extract_answer(text: str) -> str | None:
    """v(.): the final answer written in a completion, or None when it states none."""
    value = _last_boxed(text)
    if value is None:
        value = _after_marker(text)
    if value is None:
        return None
    value = value.strip()
    if value.startswith("$") and value.endswith("$") and len(value) > 1:
        value = value.strip("$").strip()
    elif value.startswith("\\(") and value.endswith("\\)"):
        value = value[2:-2].strip()
    return value.rstrip(".").strip() or None


# ---- equivalence ------------------------------------------------------------------------------


def _exponent(answer: str, caret: int) -> tuple[str, str]:
    """The exponent after the `^` at answer[caret] (a brace group or one token), and the text after it."""
    rest = answer[caret + 1 :].lstrip()
    if rest.startswith("{"):
        inner = _braced(rest, 0)
        return (rest, "") if inner is None else (inner, rest[len(inner) + 2 :])
    token = re.match(r"[\d.]+|\\?[A-Za-z]+|.?", rest).group(0)
    return token, rest[len(token) :]


def _huge_power(answer: str) -> bool:
    """A number raised to a numeric power of powers (10^{10^{10}}, 9^9^9, 2^{3 \\cdot 10^{9}}, 2^{9!}) or
    to a 5+ digit exponent: sympy would compute those integers in C, where no timer can interrupt it."""
    for caret in re.finditer(r"\^", answer):
        base = answer[: caret.start()].rstrip(" })")
        exponent, after = _exponent(answer, caret.start())
        if re.search(r"\d{5,}", exponent):
            return True
        tower = "^" in exponent or "!" in exponent or after.lstrip(" })").startswith("^")
        symbolic = re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", exponent))
        if tower and base[-1:].isdigit() and not symbolic:
            return True
    return False


# Functions whose value at a large integer sympy computes exactly, in C multiplications of huge integers.
_SPECIAL = re.compile(r"\\(?:[dt]?binom|choose|Gamma)(?![A-Za-z])")


def _too_risky(answer: str) -> bool:
    """True for inputs that could make parsing or sympy run for long (checked before any parsing)."""
    if len(answer) > MAX_ANSWER_CHARS or re.search(rf"\d{{{MAX_DIGITS + 1}}}", answer):
        return True
    depth = 0
    for char in answer:
        depth += (char == "{") - (char == "}")
        if depth > MAX_DEPTH:
            return True
    numeric = not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", answer))
    big_factorial = re.search(r"\d{5,}\s*\}?\s*!", answer) or (numeric and re.search(r"[)}]\s*!", answer))
    big_special = _SPECIAL.search(answer) and re.search(r"\d{5,}", answer)  # \binom{99999999}{49999999}
    return bool(big_factorial or big_special or "**" in answer or _huge_power(answer))


def _clean(answer: str) -> str:
    """Strip formatting that never changes the value: dollars, spacing, \\left/\\right, braces of x_{1}."""
    for old, new in (("\\$", ""), ("$", ""), ("\\!", ""), ("\\,", ""), ("\\;", " "), ("{,}", ","),
                     ("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")):
        answer = answer.replace(old, new)
    answer = re.sub(r"_\{(\w)\}", r"_\1", answer).replace("^{\\prime}", "'")  # E_{1} -> E_1, x^{\prime} -> x'
    return answer.strip().rstrip(".").strip()


_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|-?\.\d+"
_UNIT = re.compile(
    r"(?:\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z ]*\}"  # 5 \text{ cm}
    r"|\s+(?!pi\b)[A-Za-z]{2,}(?:\s+[A-Za-z]+)*"  # 5 dollars (one letter or "pi" is not a unit)
    r"|\s*\^\s*\{?\s*\\circ\s*\}?\s*[CFK]?"  # 41.8^\circ, 1950^\circ C
    r"|\s*(?:\^\s*\{(?:\s*\\prime)+\s*\}|'+))$"  # 0.003^{\prime \prime} (arcseconds)
)
_PLAIN = re.compile(rf"({_NUM})(?:e([+-]?\d{{1,4}})|\s*(?:\\times|\\cdot)\s*10\^\{{?([+-]?\d{{1,4}})\}}?)?")
_FRACTION = re.compile(rf"(-?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}|({_NUM})\s*/\s*({_NUM})")


def _fraction(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def _number_values(answer: str) -> list[Fraction] | None:
    """The value(s) of a plain number ("1,234", "5.0", "1/2", "\\frac{1}{2}", "8.7e8", "50%"), else None.

    A percentage gives two readings, x and x/100, so that "50%" matches both "50" and "0.5".
    """
    text = _UNIT.sub("", _clean(answer))
    for wrapper in (r"\\(?:text|textbf|mathbf|mathrm)\{(.*)\}", r"\(([^,]*)\)"):  # \textbf{(073)} (AIME)
        if wrapped := re.fullmatch(wrapper, text):
            text = wrapped.group(1).strip()
    percent = text.endswith("%")
    text = text.removesuffix("\\%").removesuffix("%").strip() if percent else text
    if match := _PLAIN.fullmatch(text):
        exponent = match.group(2) or match.group(3) or "0"
        value = _fraction(match.group(1)) * Fraction(10) ** int(exponent)
    elif match := _FRACTION.fullmatch(text):
        sign, num, den = match.group(1, 2, 3) if match.group(2) else ("", *match.group(4, 5))
        if _fraction(den) == 0:
            return None
        value = (-1 if sign else 1) * _fraction(num) / _fraction(den)
    else:
        return None
    return [value, value / 100] if percent else [value]


def _numbers_equal(a: list[Fraction], b: list[Fraction]) -> bool:
    return any(abs(x - y) <= REL_TOL * max(abs(x), abs(y)) for x in a for y in b)


class _Timeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException, so no `except Exception` inside sympy eats it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Interrupt the block after `seconds` on the main thread; elsewhere signals cannot, so run unbounded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    active = [True]

    def on_alarm(signum, frame):
        if active[0]:
            raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # A parent process (a CI runner, a job scheduler) may hand us SIGALRM blocked: the timer would then
    # never fire. Unblock it for this block only.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    # The alarm repeats: sympy has bare `except:` clauses that can swallow one _Timeout and carry on.
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT_S)
    start = time.monotonic()
    try:
        yield
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:  # a caller's own alarm keeps running, minus the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - start), 1e-3), outer_interval)


def _math_verify_equal(pred: str, ref: str) -> bool:
    config = [LatexExtractionConfig()]
    gold = parse(f"${ref}$", extraction_config=config, parsing_timeout=None)
    guess = parse(f"${pred}$", extraction_config=config, parsing_timeout=None)
    return bool(gold and guess and verify(gold, guess, timeout_seconds=None))


# One comparison of each kind whose first call pays for parser building and sympy's lazy imports
# (measured 0.1-0.4 s each on the 2-core machine: polynomial simplification, trig, sets, intervals).
_WARM_UP_PAIRS = ((r"\frac{x}{2}+1", "1+0.5x"), ("x^2+2x+1", "(x+1)^2"), (r"\sin(x)^2+\cos(x)^2", "1"),
                  (r"\{2, 1\}", r"\{1, 2\}"), ("[1,2)", "[1, 2)"), ("x=3", "3"))


@functools.cache
def _warm_up() -> None:
    """Run math-verify once per kind outside the timer, so no first-call cost counts against TIMEOUT_S."""
    for pred, ref in _WARM_UP_PAIRS:
        _math_verify_equal(pred, ref)


def _equivalent_one(pred: str, ref: str) -> bool:
    pred, ref = _clean(pred), _clean(ref)
    if pred.replace(" ", "") == ref.replace(" ", ""):
        return bool(pred)
    if _too_risky(pred) or _too_risky(ref):
        return False
    pred_values, ref_values = _number_values(pred), _number_values(ref)
    if pred_values is not None and ref_values is not None:
        return _numbers_equal(pred_values, ref_values)
    return _math_verify_equal(pred, ref)


def is_equivalent(pred: str | None, ref: str, alternatives=()) -> bool:
    """Whether the extracted answer `pred` is mathematically the reference or any of its alternatives."""
    if pred is None:
        return False
    _warm_up()
    try:
        with _time_limit(TIMEOUT_S):
            return any(_equivalent_one(pred, candidate) for candidate in dict.fromkeys((ref, *alternatives)))
    except _Timeout:
        return False


def math_reward(completions: list[str], answers: list[str], alternatives: list[list[str]] | None = None) -> list[float]:
    """r = 1.0 where the completion's extracted answer is equivalent to its reference answer, else 0.0."""
    alternatives = alternatives if alternatives is not None else [[] for _ in answers]
    if not len(completions) == len(answers) == len(alternatives):
        raise ValueError(f"got {len(completions)} completions, {len(answers)} answers, "
                         f"{len(alternatives)} alternative lists: they must match")
    return [float(is_equivalent(extract_answer(c), a, alts or ()))
            for c, a, alts in zip(completions, answers, alternatives)]


# ---- grading a JSONL file ---------------------------------------------------------------------


def _check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("completion", "answer"):
        if field not in record:
            raise ValueError(f"{where}: missing field '{field}'")
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}")
    alternatives = record.get("answer_alternatives", [])
    if not isinstance(alternatives, list) or not all(isinstance(a, str) for a in alternatives):
        raise ValueError(f"{where}: field 'answer_alternatives' must be a list of strings")


def read_grade_records(path) -> list[dict]:
    """The records of a grading JSONL, all validated; errors name `file:line` and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines[:-1] if lines[-1] == b"" else lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise ValueError(f"{where}: empty line (expected a JSON object)")
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc})") from None
        _check_record(record, where)
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def grade_file(path, output=None) -> dict:
    """Score every `{"completion", "answer"}` line of a JSONL file; optionally write the records with
    `extracted` and `reward` added to `output` (atomically, only once the whole input is valid)."""
    records = read_grade_records(path)
    if output is not None and not Path(output).resolve().parent.is_dir():
        raise FileNotFoundError(f"{output}: parent directory does not exist")
    graded = []
    for record in records:
        extracted = extract_answer(record["completion"])
        reward = float(is_equivalent(extracted, record["answer"], record.get("answer_alternatives", [])))
        graded.append({**record, "extracted": extracted, "reward": reward})
    if output is not None:
        tmp = Path(f"{output}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in graded), encoding="utf-8")
        os.replace(tmp, output)
    correct = int(sum(r["reward"] for r in graded))
    return {"n": len(graded), "correct": correct, "accuracy": correct / len(graded)}
