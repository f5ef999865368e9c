"""Answer extraction and grading (mathlm.data.answers) on real reference formats, no model involved."""
import math
import os
import threading
import time

import pytest

from mathlm.data import answers

# GSM8K test set, MIT (c) 2021 OpenAI (openai/grade-school-math, grade_school_math/data/test.jsonl, records
# 0-9, 14, 146, 201, 230, 249; the `answer` field verbatim).
GSM8K_REFERENCES = [
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18",
    "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3",
    "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000",
    "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540",
    "If each chicken eats 3 cups of feed per day, then for 20 chickens they would need 3*20=<<3*20=60>>60 cups of feed per day.\nIf she feeds the flock 15 cups of feed in the morning, and 25 cups in the afternoon, then the final meal would require 60-15-25=<<60-15-25=20>>20 cups of chicken feed.\n#### 20",
    "The discount price of one glass is 60/100 * 5 = $<<60/100*5=3>>3.\nIf every second glass is cheaper, that means Kylar is going to buy 16 / 2 = <<16/2=8>>8 cheaper glasses.\nSo for the cheaper glasses, Kylar is going to pay 8 * 3 = $<<8*3=24>>24.\nAnd for the regular-priced glasses, Kylar will pay 8 * 5 = $<<8*5=40>>40.\nSo in total Kylar needs to pay 24 + 40 = $<<24+40=64>>64 for the glasses he wants to buy.\n#### 64",
    "If Seattle has 20 sheep, Charleston has 4 * 20 sheep = <<20*4=80>>80 sheep\nToulouse has twice as many sheep as Charleston, which is 2 * 80 sheep = <<2*80=160>>160 sheep\nTogether, the three has 20 sheep + 160 sheep + 80 sheep = <<20+160+80=260>>260 sheep\n#### 260",
    "First find how many gigabytes are in 40% of the file: 200 GB * 40% = <<200*40*.01=80>>80 GB\nThen divide that number by the download rate to find the time until Windows restarts: 80 GB / 2 GB/minute = <<80/2=40>>40 minutes\nThen find the time to download the whole file after the restart: 200 GB / 2 GB/minute = <<200/2=100>>100 minutes\nThen add the time to download 40% of the file, to download the whole file, and to wait for Windows to update: 40 minutes + 100 minutes + 20 minutes = <<40+100+20=160>>160 minutes\n#### 160",
    "When he turned around he was 3*60=<<3*60=180>>180 miles from home\nHe was only able to drive 4-2=<<4-2=2>>2 hours in the first four hours\nIn half an hour he goes 30*.5=<<30*.5=15>>15 miles\nHe then drives another 2-.5=<<2-.5=1.5>>1.5 hours\nIn that time he goes 80*1.5=<<80*1.5=120>>120 miles\nSo he drove 120+15=<<120+15=135>>135 miles\nSo he is 180-135=<<180-135=45>>45 miles away from home\n#### 45",
    "Eliza is entitled to 45 -40 = <<45-40=5>>5 hours overtime pay.\nHer hourly rate for the overtime pay is $10 x 1.2 = $<<10*1.2=12>>12.\nSo, Eliza will receive $12 x 5 =$<<12*5=60>>60 for overtime pay.\nHer regular weekly earning is $10 x 40 = $<<10*40=400>>400.\nThus, Eliza will receive a total of $400 + $60 = $<<400+60=460>>460 for this week's work.\n#### 460",
    "There are 20 x 20/100 = <<20*20/100=4>>4 students who enrolled in contemporary dance.\nSo, 20 - 4 = <<20-4=16>>16 students are enrolled in either jazz or hip-hop dance.\nThere are 16 x 25/100 = <<16*25/100=4>>4 students who enrolled in jazz dance.\nHence, 16 - 4 = <<16-4=12>>12 students enrolled in hip-hop dance.\nThis is 12/20 x 100% = 60% of the entire students.\n#### 60",
    "The first set had 500 pieces, and the second set had 3 times as many as the first set, so the second set has 500*3=<<500*3=1500>>1500 pieces\nThe third set had one-quarter of the 500 pieces, so that means it had 500*.25= <<500*.25=125>>125 pieces\nIn total, that means Johnny picked up 500 + 1500+ 125= <<500+1500+125=2125>>2125 blocks\n#### 2,125",
    "He makes 2000*52=$<<2000*52=104000>>104,000 a year\nSo the raise is worth .05*104,000=$<<.05*104000=5200>>5200\nSo he makes 104,000+5200=$<<104000+5200=109200>>109,200 from his salary\nSo in total he made 109,200+5,000=$<<109200+5000=114200>>114,200\n#### 114,200",
    "The cars cost 20000*12=$<<20000*12=240000>>240,000\nSo the tax came out to 240,000*.1=$<<240000*.1=24000>>24,000\nSo the cars cost 240,000+24,000=$<<240000+24000=264000>>264,000\nRegistration cost another 12*1000=<<12*1000=12000>>12,000\nSo his total cost is 264,000+12,000=$<<264000+12000=276000>>276,000\n#### 276,000",
    "Sue\u2019s Monday cookie intake is 4*5 = <<4*5=20>>20.\nSue\u2019s Tuesday cookie intake is 2*13 = <<2*13=26>>26.\nTotal cookies Sue consumed is 20+26 = <<20+26=46>>46.\nSue\u2019s sister ate a total of 5+13 = <<5+13=18>>18 cookies.\nSue ate 46-18=<<46-18=28>>28 more cookies.\nSue consumed 28*200=<<28*200=5600>>5,600 more calories.\n#### 5,600",
]


@pytest.mark.parametrize("solution", GSM8K_REFERENCES)
def test_gsm8k_references_grade_correct_against_themselves(solution):
    reference = answers.gsm8k_reference(solution)
    assert reference == solution.split("####")[-1].strip().replace(",", "")
    for name in ("strict-match", "flexible-extract"):
        extracted = answers.EXTRACTORS[name](solution)
        assert extracted is not None and answers.is_correct(extracted, reference, numeric=True), name


def test_gsm8k_reference_comes_from_the_final_line_not_the_calculator_notes():
    # A bare number search finds 130000 inside "<<80000+50000=130000>>" long before the answer.
    assert answers.gsm8k_reference(GSM8K_REFERENCES[2]) == "70000"
    assert answers.gsm8k_reference(GSM8K_REFERENCES[12]) == "114200"  # "#### 114,200"
    assert answers.gsm8k_reference("no final line, the result is 1,234.") == "1234"  # fallback: last number


def test_strict_and_flexible_follow_lm_eval():
    text = "First 2 + 3 = 5.\n#### 5\nThen I said 7."
    assert answers.extract_strict(text) == "5"  # first "#### N"
    assert answers.extract_flexible(text) == "7."  # the last number, punctuation and all
    assert answers.extract_strict("The answer is 5") is None
    assert answers.extract_flexible("no digits here") is None
    assert answers.extract_flexible("She makes $18 every day.") == "$18"
    assert answers.extract_flexible("so x = -3") == "-3"
    assert answers.extract_flexible("It costs $1,000.") == "$1,000."


@pytest.mark.parametrize("text, expected", [
    ("There are 15 trees originally. So 21 - 15 = 6. The answer is 6.", "6"),
    ("The answer is $1,234.50.", "1,234.50"),
    ("so the answer is -12", "-12"),
    ("The final answer is 3.5", "3.5"),
    ("The answer is 7. Q: next... The answer is 9.", "7"),  # lm-eval takes the first match
    ("I don't know.", None),
])
def test_the_answer_is(text, expected):
    assert answers.extract_answer_is(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{1} then \\boxed{ (1, 2) }", "(1, 2)"),
    ("\\fbox{42}", "42"),
    ("\\boxed{a} and finally \\fbox{b}", "b"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{\\frac{1}{2}", None),  # cut off inside the box
    ("\\boxed{}", None),
    ("no box at all", None),
])
def test_boxed_takes_the_last_box_with_balanced_braces(text, expected):
    assert answers.extract_boxed(text) == expected


def test_minerva_final_answer_line():
    # The ending of minerva_math_4shot.json exemplar 4 (lm-evaluation-harness, MIT).
    text = ("$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
            "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.")
    assert answers.extract_minerva(text) == "-\\frac{2}{3}"
    assert answers.extract_minerva("Final Answer: The final answer is $24$. ") == "24"  # cut at the stop string
    assert answers.extract_minerva("The answer is 24.") is None


@pytest.mark.parametrize("extracted, reference", [
    ("1,000", "1000"), ("$18", "18"), ("18.00", "18"), ("18.", "18"), ("$1,000.", "1,000"), ("-5", "-5"),
    ("\\$18", "18"),
    ("\\frac{35}{2}", "17.5"),  # not a plain number (a boxed answer): falls back to MATH equivalence
])
def test_numbers_equal_after_removing_commas_dollars_and_trailing_period(extracted, reference):
    assert answers.is_correct(extracted, reference, numeric=True)


@pytest.mark.parametrize("extracted, reference", [("18.5", "18"), ("17", "18"), ("-18", "18"), ("180", "18"),
                                                  ("..", "18"), (None, "18"), ("", "18")])
def test_numbers_that_differ_or_are_missing_are_wrong(extracted, reference):
    assert not answers.is_correct(extracted, reference, numeric=True)


@pytest.mark.parametrize("candidate, reference", [
    ("\\frac{1}{2}", "0.5"), ("1,000", "1000"), ("\\dfrac{3}{4}", "\\frac34"), ("x=3", "3"),
    ("(-\\infty, 2]", "(-\\infty,2]"), ("(1,2)", "(1, 2)"), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"), ("10^\\circ", "10"), ("5\\text{ cm}", "5"),
    ("\\text{(C)}", "(C)"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("\\$18.00", "18"),
    ("\\tfrac{14}{3}", "\\frac{14}{3}"), ("14/3", "\\frac{14}{3}"), (".5", "\\frac12"), ("2\\sqrt{3}", "\\sqrt{12}"),
])
def test_math_equivalent_answers(candidate, reference):
    assert answers.is_correct(candidate, reference, numeric=False)


@pytest.mark.parametrize("candidate, reference", [
    ("(1,2)", "[1,2]"), ("2", "3"), ("1,2", "12"), ("(0,1)", "(0,1]"), ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("x^2", "x^3"), (None, "2"),
])
def test_math_different_answers(candidate, reference):
    assert not answers.is_correct(candidate, reference, numeric=False)


def test_normalisation_keys():
    assert answers.normalize_math_answer("\\left( 1, \\dfrac{1}{2} \\right).") == "(1,\\frac{1}{2})"
    assert answers.normalize_math_answer("y = 2x + 3") == "2x+3"
    assert answers.normalize_math_answer("1,000") == "1000" and answers.normalize_math_answer("1,2") == "1,2"
    assert answers.answer_key("$1,000.00", numeric=True) == "1000"
    assert answers.answer_key("\\dfrac12", numeric=False) == answers.answer_key("\\frac{1}{2}", numeric=False)
    assert answers.answer_key(None, numeric=True) is None
    assert answers.format_number(51.0) == "51" and answers.format_number(3.33333) == "3.33333"


def test_symbolic_check_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(answers.math_equal("\\frac{2}{6}", "1/3.0")))
    thread.start()
    thread.join(60)
    assert results == [True]


def test_worker_timeout_kills_the_call_and_grading_recovers():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        answers._call_in_worker(time.sleep, (30,), 0.5)
    assert time.monotonic() - start < 10
    assert answers.symbolic_equal("x^2 - 1", "(x-1)(x+1)")
    with pytest.raises(answers.GradingWorkerError, match="ValueError: math domain error"):
        answers._call_in_worker(math.sqrt, (-1,), 5)
    with pytest.raises(answers.GradingWorkerError, match="died"):
        answers._call_in_worker(os._exit, (3,), 5)
    assert answers.math_equal("\\frac{x^2-1}{x-1}", "x+1")
