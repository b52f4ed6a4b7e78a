import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from nested_reft.cli import main
from nested_reft.rewards import extract_answer, grade_file, is_equivalent, math_reward


@pytest.mark.parametrize("text,expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # nested braces
    (r"first \boxed{1}, then \boxed{2}", "2"),  # the last box wins
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces inside
    (r"The area is \fbox{12}.", "12"),
    (r"Hence the answer is $\boxed 9$.", "9"),  # MATH's brace-less form
    (r"\boxed {7}", "7"),
    (r"\boxed{4} and later a truncated \boxed{5", None),  # unclosed last box: no box, no other marker
    (r"The answer is 3. Wait, \boxed{8", "3"),  # unclosed box falls back to the other rules
    ("She pays 9 * 2 = 18.\n#### 18", "18"),
    ("#### 1,234\nextra text", "1,234"),
    ("The answer is 42.", "42"),
    ("Thus the final answer is $x=3$.", "x=3"),
    ("answer: 3.5. Done", "3.5"),
    ("The answer is \\(\\frac{1}{3}\\)", r"\frac{1}{3}"),
    ("no final answer here, 17 apples", None),
    ("", None),
    (r"\boxed{}", None),
    (r"\boxedx{3}", None),  # not a box command
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


EQUIVALENT = [
    ("1/2", "0.5"), (r"\frac{1}{2}", "0.5"), (r"\dfrac{3}{4}", "0.75"), (r"\frac12", r"\frac{1}{2}"),
    ("1,234", "1234"), ("1{,}234", "1234"), ("5.0", "5"), ("5.50", "5.5"), ("-3", "-3.0"), ("-.5", r"-\frac{1}{2}"),
    ("50%", "50"), (r"50\%", "0.5"), (r"\$5", "5"), ("5 dollars", "5"), (r"3 \text{ cm}", "3"),
    (r"41.8^\circ", "41.8"), ("8.7e8", r"8.7 \times 10^{8}"), ("x=3", "3"), (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"), ("[1,2)", r"\left[1, 2\right)"), (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"\{2, 1\}", r"\{1, 2\}"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), ("p - q", "p-q"),
    (r"\text{(C)}", "C"), ("0.333333", r"\frac{1}{3}"), ("E_{1}, E_{2}", "E_1,E_2"), (r"\pi", r"\pi"),
    (r"x^2+2x+1", r"(x+1)^2"), (r"\frac{1}{2004!}", r"\frac{1}{2004!}"), (r"\textbf{(073)}", "73"),
]

NOT_EQUIVALENT = [
    ("5", "50"), ("50", "5"), ("0.5", "5"), ("1/2", "2"), (r"\frac{1}{2}", r"\frac{2}{1}"), ("-3", "3"),
    ("1,234", "1.234"), ("1234", "12345"), ("5.01", "5"), ("50%", "5"), ("x=3", "4"), ("3", "x=4"),
    (r"2\sqrt{2}", r"\sqrt{2}"), ("[1,2)", "[1,2]"), ("(1,2]", "[1,2]"), (r"\{1, 2\}", r"\{1, 3\}"),
    ("(1, 2)", "(2, 1)"), (r"5\pi", "5"), ("5x", "5"), (r"\sqrt{3}", "3"), ("8.7e8", r"8.7 \times 10^{7}"),
    ("A", "B"), ("", "0"), ("2/0", "0"), (r"x^2", "2x"), ("1e-3", "1e3"), ("(1,234)", "1234"),
]


@pytest.mark.parametrize("pred,ref", EQUIVALENT)
def test_equivalent(pred, ref):
    assert is_equivalent(pred, ref)


@pytest.mark.parametrize("pred,ref", NOT_EQUIVALENT)
def test_not_equivalent(pred, ref):
    assert not is_equivalent(pred, ref)


def test_alternatives_any_counts():
    assert is_equivalent("6630", "6630.65", ["6630.65", "6630"])
    assert not is_equivalent("6600", "6630.65", ["6630.65", "6630"])
    assert not is_equivalent(None, "1")


def test_math_reward_scores_and_checks_lengths():
    completions = [r"so \boxed{\frac{1}{2}}", "#### 1,234", "The answer is 7.", "I give up", r"\boxed{3}"]
    answers = ["0.5", "1234", "8", "0", "3"]
    assert math_reward(completions, answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert math_reward(["\\boxed{0.02}"], ["0.01"], [["0.01", "0.02"]]) == [1.0]
    with pytest.raises(ValueError, match="must match"):
        math_reward(["a", "b"], ["1"])


ADVERSARIAL = [
    "\\boxed{" + "9" * 10_000 + "}",  # 10,000-digit number
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",  # thousands of nested braces
    "\\boxed{" + "{" * 100_000,  # never closed
    "\\boxed{" * 100_000,  # many unclosed boxes
    r"\boxed{10^{10^{10^{10}}}}",  # power tower
    r"\boxed{9^9^9^9}",
    r"\boxed{2^{3 \cdot 10^{9}}}",
    r"\boxed{2^{99999999}}",
    r"\boxed{99999999!}",
    r"\boxed{(10^{9})!}",
    r"\boxed{\binom{99999999}{49999999}}",  # passes the caps, stopped by the timer
    r"\boxed{\Gamma(99999999)}",
    r"\boxed{\int_0^1 e^{-x^2} \sin(x^{17}) dx}",
    "The answer is " + "x+" * 200_000,  # very long string
    "answer is " * 100_000,
    "####" * 100_000,
    "\\boxed{" + "a" * 290 + "}",
    "\\boxed{7" + "0" * 5000 + "}",
    r"\boxed{import os; os.system('echo pwned')}",  # text is never executed
]


def test_adversarial_completions_score_zero_quickly():
    start = time.perf_counter()
    for completion in ADVERSARIAL:
        one = time.perf_counter()
        assert math_reward([completion], ["7"]) == [0.0]
        assert time.perf_counter() - one < 2.0, completion[:40]
    assert time.perf_counter() - start < 10.0


def test_adversarial_reference_is_bounded_too():
    start = time.perf_counter()
    assert not is_equivalent("1", r"10^{10^{10}}")
    assert not is_equivalent("1", "\\Gamma(99999999)")
    assert time.perf_counter() - start < 3.0


def test_timer_restores_the_callers_alarm():
    before = signal.getsignal(signal.SIGALRM)
    is_equivalent(r"\frac{x}{2}", r"0.5x")
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    signal.setitimer(signal.ITIMER_REAL, 100.0)  # a caller's own alarm survives, minus the time spent
    try:
        is_equivalent(r"\frac{x}{2}", r"0.5x")
        assert 90.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_timer_fires_when_the_parent_blocked_sigalrm():
    # A CI runner may start us with SIGALRM blocked; the timer must still stop a long sympy evaluation.
    code = (
        "import signal, time\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "from nested_reft.rewards import is_equivalent\n"
        "start = time.perf_counter()\n"
        "assert not is_equivalent(r'\\Gamma(10^{8})', '7')\n"
        "assert signal.SIGALRM in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the caller's mask is back\n"
        "print(time.perf_counter() - start)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 5.0


def test_timer_fires_again_when_a_bare_except_swallows_it():
    # sympy has bare `except:` clauses; one swallowed _Timeout must not let the computation run on
    from nested_reft import rewards

    start = time.perf_counter()
    with pytest.raises(rewards._Timeout):
        with rewards._time_limit(0.2):
            try:
                time.sleep(5)
            except BaseException:  # noqa: BLE001 - what sympy does
                pass
            time.sleep(5)
    assert time.perf_counter() - start < 2.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_huge_binomials_and_gammas_are_never_parsed():
    assert not is_equivalent(r"\binom{99999999}{49999999}", "7")
    assert not is_equivalent(r"\Gamma(99999999)", "7")
    assert is_equivalent(r"\binom{10}{3}", "120")


def test_works_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(math_reward([r"\boxed{\frac{2}{4}}"], ["0.5"])))
    worker.start()
    worker.join(timeout=30)
    assert results == [[1.0]]


# ---- grade: library and CLI -------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = [
    {"completion": r"So $\boxed{\frac{1}{2}}$.", "answer": "0.5"},
    {"completion": "12 + 6 = 18\n#### 18", "answer": "18", "id": "keep-me"},
    {"completion": "The answer is 5.", "answer": "50"},
    {"completion": r"\boxed{0.02}", "answer": "0.01", "answer_alternatives": ["0.01", "0.02"]},
]


def test_grade_cli_json(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", GOOD)
    assert main(["grade", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 4, "correct": 3, "accuracy": 0.75}


def test_grade_cli_summary_and_output(tmp_path, capsys):
    path, out = write_jsonl(tmp_path / "c.jsonl", GOOD), tmp_path / "graded.jsonl"
    assert main(["grade", str(path), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "graded 4 completions: 3 correct, accuracy 0.7500"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 1.0, 0.0, 1.0]
    assert [r["extracted"] for r in rows] == [r"\frac{1}{2}", "18", "5", "0.02"]
    assert rows[1]["id"] == "keep-me" and rows[3]["answer_alternatives"] == ["0.01", "0.02"]
    assert not (tmp_path / "graded.jsonl.tmp").exists()


@pytest.mark.parametrize("bad_line,message", [
    ('{"completion": "x", "answer": ', "c.jsonl:3: invalid JSON"),
    ('{"completion": "x"}', "c.jsonl:3: missing field 'answer'"),
    ('{"answer": "1"}', "c.jsonl:3: missing field 'completion'"),
    ('{"completion": "x", "answer": 5}', "c.jsonl:3: field 'answer' must be a string"),
    ('{"completion": "x", "answer": "1", "answer_alternatives": "2"}', "c.jsonl:3: field 'answer_alternatives'"),
    ('["completion", "answer"]', "c.jsonl:3: expected a JSON object"),
    ("", "c.jsonl:3: empty line"),
])
def test_grade_cli_bad_line_names_file_line_and_field(tmp_path, capsys, bad_line, message):
    path = write_jsonl(tmp_path / "c.jsonl", GOOD[:2] + [bad_line] + GOOD[2:])
    out = tmp_path / "graded.jsonl"
    assert main(["grade", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()  # nothing written unless the whole input is valid


def test_grade_cli_missing_file_and_empty_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["grade", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["grade", str(tmp_path / "empty.jsonl")]) == 2
    assert "no records" in capsys.readouterr().err


def test_grade_file_returns_summary(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", GOOD)
    assert grade_file(path) == {"n": 4, "correct": 3, "accuracy": 0.75}
    with pytest.raises(FileNotFoundError, match="parent directory"):
        grade_file(path, tmp_path / "no" / "such" / "dir.jsonl")
