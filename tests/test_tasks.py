"""Task files -> problems, prompt formats, stop strings, extractor sets, and re-grading saved completions."""
import json

import pytest

from mathlm.data import synth, tasks
from mathlm.data.sources import DataError, qa_prompt

# GSM8K test set, MIT (c) 2021 OpenAI (openai/grade-school-math test.jsonl, records 0 and 2, verbatim).
GSM8K = [
    {"question": "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?", "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18"},
    {"question": "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in repairs.  This increased the value of the house by 150%.  How much profit did he make?", "answer": "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"},
]
# SVAMP, MIT (c) 2021 Arkil Patel (arkilpatel/SVAMP SVAMP.json, first two records, verbatim).
SVAMP = [
    {"ID": "chal-1", "Body": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack", "Question": "How much do you have to pay to buy each pack?", "Equation": "( 76.0 - 25.0 )", "Answer": 51.0, "Type": "Subtraction"},
    {"ID": "chal-2", "Body": "Dan had $ 3 left with him after he bought a candy bar. If he had $ 4 at the start", "Question": "How much did the candy bar cost?", "Equation": "( 4.0 - 3.0 )", "Answer": 1.0, "Type": "Subtraction"},
]
# MAWPS as released by reasoning-machines/pal (datasets/mawpssingleop.jsonl, first two records, verbatim;
# Apache-2.0 repository); the third record is made up to show a fractional target.
MAWPS = [
    {"input": "If there are 7 bottle caps in a box and Linda puts 7 more bottle caps inside, how many bottle caps are in the box?", "target": 14.0},
    {"input": "Jose starts with 7 bottle caps. He gets 2 more from Rebecca. How many bottle caps does Jose end with?", "target": 9.0},
    {"input": "Half of 7 apples?", "target": 3.5},
]
# MATH, MIT (c) 2021 Dan Hendrycks: test/algebra/1.json and MATH-500 test/algebra/2584.json (prm800k, MIT (c)
# 2023 OpenAI), verbatim; the third is the second with its `answer` removed.
MATH = [
    {"problem": "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?", "level": "Level 3", "type": "Algebra", "solution": "The denominator of the rational function factors into $x^2+x-6=(x-2)(x+3)$. Since the numerator is always nonzero, there is a vertical asymptote whenever the denominator is $0$, which occurs for $x = 2$ and $x = -3$.  Therefore, the graph has $\\boxed{2}$ vertical asymptotes.", "answer": "2", "unique_id": "test/algebra/1.json"},
    {"problem": "If $f(x) = \\frac{3x-2}{x-2}$, what is the value of $f(-2) +f(-1)+f(0)$? Express your answer as a common fraction.", "solution": "$f(-2)+f(-1)+f(0)=\\frac{3(-2)-2}{-2-2}+\\frac{3(-1)-2}{-1-2}+\\frac{3(0)-2}{0-2}=\\frac{-8}{-4}+\\frac{-5}{-3}+\\frac{-2}{-2}=2+\\frac{5}{3}+1=\\boxed{\\frac{14}{3}}$", "answer": "\\frac{14}{3}", "subject": "Algebra", "level": 3, "unique_id": "test/algebra/2584.json"},
    {"problem": "If $f(x) = \\frac{3x-2}{x-2}$, what is the value of $f(-2) +f(-1)+f(0)$? Express your answer as a common fraction.", "solution": "$f(-2)+f(-1)+f(0)=\\frac{3(-2)-2}{-2-2}+\\frac{3(-1)-2}{-1-2}+\\frac{3(0)-2}{0-2}=\\frac{-8}{-4}+\\frac{-5}{-3}+\\frac{-2}{-2}=2+\\frac{5}{3}+1=\\boxed{\\frac{14}{3}}$"},
]


def _write(path, records, blank_line_after_first=False):
    lines = [json.dumps(r) for r in records]
    if blank_line_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gsm8k_problems(tmp_path):
    problems = tasks.load_problems(_write(tmp_path / "gsm8k.jsonl", GSM8K), "gsm8k")
    assert [(p.id, p.reference) for p in problems] == [("gsm8k-0", "18"), ("gsm8k-1", "70000")]
    assert problems[0].question == GSM8K[0]["question"] and problems[0].record == GSM8K[0]


def test_synth_problems_keep_their_ids(tmp_path):
    paths = synth.write_jsonl(synth.generate(synth.SynthConfig(n=40, seed=0)), tmp_path)
    records = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    problems = tasks.load_problems(paths["test"], "synth")
    assert [p.id for p in problems] == [r["id"] for r in records]
    assert [p.reference for p in problems] == [synth.final_answer(r["answer"]) for r in records]


def test_svamp_mawps_math_problems(tmp_path):
    svamp = tasks.load_problems(_write(tmp_path / "svamp.jsonl", SVAMP), "svamp")
    assert svamp[0].id == "chal-1" and svamp[0].reference == "51"
    assert svamp[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each "
                                 "pack How much do you have to pay to buy each pack?")
    mawps = tasks.load_problems(_write(tmp_path / "mawps.jsonl", MAWPS), "mawps")
    assert [(p.id, p.reference) for p in mawps] == [("mawps-0", "14"), ("mawps-1", "9"), ("mawps-2", "3.5")]
    math = tasks.load_problems(_write(tmp_path / "math.jsonl", MATH, blank_line_after_first=True), "math")
    assert [(p.id, p.reference) for p in math] == [
        ("test/algebra/1.json", "2"), ("test/algebra/2584.json", "\\frac{14}{3}"), ("math-2", "\\frac{14}{3}")]


def test_limit_takes_the_first_n(tmp_path):
    path = _write(tmp_path / "mawps.jsonl", MAWPS)
    assert [p.id for p in tasks.load_problems(path, "mawps", limit=2)] == ["mawps-0", "mawps-1"]
    assert tasks.load_problems(path, "mawps", limit=0) == []
    assert len(tasks.load_problems(path, "mawps", limit=10)) == 3


@pytest.mark.parametrize("task, records, drop, field", [
    ("gsm8k", GSM8K, "answer", "answer"), ("gsm8k", GSM8K, "question", "question"),
    ("svamp", SVAMP, "Body", "Body"), ("svamp", SVAMP, "Answer", "Answer"), ("mawps", MAWPS, "target", "target"),
    ("math", MATH, "problem", "problem"), ("math", MATH[2:] * 2, "solution", "solution"),
])
def test_missing_field_names_the_field_and_file_line(tmp_path, task, records, drop, field):
    broken = [records[0], {k: v for k, v in records[1].items() if k != drop}]
    path = _write(tmp_path / "t.jsonl", broken, blank_line_after_first=True)  # record 2 is on line 3
    with pytest.raises(DataError, match=rf"t\.jsonl:3: missing field '{field}'"):
        tasks.load_problems(path, task)


def test_bad_json_empty_and_missing_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MAWPS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        tasks.load_problems(bad, "mawps")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no problems"):
        tasks.load_problems(tmp_path / "empty.jsonl", "mawps")
    with pytest.raises(DataError, match="not found"):
        tasks.load_problems(tmp_path / "nope.jsonl", "mawps")
    no_box = tmp_path / "nobox.jsonl"
    _write(no_box, [{"problem": "?", "solution": "It is 3."}])
    with pytest.raises(DataError, match=r"nobox\.jsonl:1: .*boxed"):
        tasks.load_problems(no_box, "math")
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        tasks.load_problems(bad, "gsm9k")


Q = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def test_zero_shot_prompts():
    assert tasks.build_prompt(Q, "gsm8k") == qa_prompt(Q) == f"Question: {Q}\nAnswer:"
    assert tasks.build_prompt(Q, "gsm8k", shots=0) == qa_prompt(Q)
    boxed = tasks.build_prompt(Q, "math", style="boxed")
    assert boxed == (f"Question: {Q} Please reason step by step, and put your final answer within \\boxed{{}}."
                     "\nAnswer:")
    assert tasks.stop_strings("gsm8k", "qa") == ["\nQuestion:"]


def test_lm_eval_5_shot_layout():
    prompt = tasks.build_prompt(Q, "gsm8k", shots=5)
    blocks = prompt.split("\n\n")
    assert len(blocks) == 6 and blocks[-1] == qa_prompt(Q)
    assert blocks[0].startswith("Question: Natalia sold clips to 48 of her friends")
    assert blocks[0].endswith("\nAnswer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
                              "<<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert all(b.startswith("Question: ") and "\nAnswer: " in b and "\n#### " in b for b in blocks[:5])
    assert "\n\nQuestion:" in tasks.stop_strings("gsm8k", "lm-eval")
    assert tasks.extractor_names("gsm8k", "lm-eval") == ("strict-match", "flexible-extract")


def test_wei_cot_8_shot_layout():
    fmt = tasks.resolve_format("gsm8k", shots=8)
    assert (fmt.style, fmt.shots, fmt.extractors) == ("cot", 8, ("answer-is", "flexible-extract"))
    blocks = fmt.prompt(Q).split("\n\n")
    assert len(blocks) == 9 and blocks[-1] == f"Q: {Q}\nA:"
    assert blocks[0] == ("Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
                         "After they are done, there will be 21 trees. How many trees did the grove workers plant "
                         "today?\nA: There are 15 trees originally. Then there were 21 trees after some more were "
                         "planted. So there must have been 21 - 15 = 6. The answer is 6.")
    assert "\n\nQ:" in fmt.stop
    assert tasks.build_prompt(Q, "svamp", style="cot").count("\nA: ") == 8  # all of the file by default
    assert tasks.build_prompt(Q, "svamp", shots=3, style="cot").count("\nA: ") == 3


def test_minerva_4_shot_layout():
    fmt = tasks.resolve_format("math", shots=4)
    assert (fmt.style, fmt.extractors[0]) == ("minerva", "minerva")
    prompt = fmt.prompt(Q)
    assert prompt.startswith("Problem:\nFind the domain of the expression")
    assert prompt.endswith(f"I hope it is correct.\n\nProblem:\n{Q}\n\nSolution:")
    assert prompt.count("\n\nSolution: ") == 4 and "\n\nProblem:" in fmt.stop


@pytest.mark.parametrize("task, shots, style, message", [
    ("gsm8k", 3, None, "no default prompt style for 3-shot gsm8k"),
    ("math", 5, None, "no default prompt style for 5-shot math"),
    ("gsm8k", 5, "boxed", "'boxed' is zero-shot"),
    ("gsm8k", 0, "cot", "'cot' is few-shot; use 1 to 8 shots"),
    ("gsm8k", 9, "cot", "9 shots requested but .* has only 8 exemplars"),
    ("math", 8, "cot", "'cot' does not apply to math"),
    ("gsm8k", 4, "minerva", "'minerva' does not apply to gsm8k"),
    ("gsm8k", 0, "fancy", "unknown prompt style 'fancy'"),
    ("gsm8k", -1, None, "shots must be >= 0"),
])
def test_invalid_combinations_fail_with_one_line(task, shots, style, message):
    with pytest.raises(ValueError, match=message) as err:
        tasks.resolve_format(task, shots, style)
    assert "\n" not in str(err.value)


def test_custom_exemplar_file(tmp_path):
    path = _write(tmp_path / "shots.jsonl", [{"question": "1+1?", "answer": "2.\n#### 2"},
                                             {"problem": "2+2?", "solution": "4.\n#### 4"}])
    prompt = tasks.build_prompt(Q, "gsm8k", shots=2, style="lm-eval", exemplars=path)
    assert prompt == f"Question: 1+1?\nAnswer: 2.\n#### 2\n\nQuestion: 2+2?\nAnswer: 4.\n#### 4\n\n{qa_prompt(Q)}"
    with pytest.raises(ValueError, match="needs a few-shot style"):
        tasks.resolve_format("gsm8k", 0, "qa", path)
    broken = _write(tmp_path / "broken.jsonl", [{"question": "1+1?"}])
    with pytest.raises(DataError, match=r"broken\.jsonl:1: missing field 'answer'"):
        tasks.resolve_format("gsm8k", 1, "lm-eval", broken)


def test_score_records_round_trip(tmp_path):
    problems = tasks.load_problems(_write(tmp_path / "gsm8k.jsonl", GSM8K), "gsm8k")
    completions = [GSM8K[0]["answer"], "He made $70,000 in profit."]  # right; right but without '#### N'
    saved = [{"id": p.id, "prompt": qa_prompt(p.question), "reference": p.reference, "completion": c}
             for p, c in zip(problems, completions)]
    out_path = tmp_path / "scored.jsonl"
    out_path.write_text("".join(json.dumps(r) + "\n" for r in tasks.score_records(saved, "gsm8k")))
    scored = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [(r["extracted"], r["correct"]) for r in scored] == [("18", True), (None, False)]
    assert scored[1]["extracted_by"] == {"strict-match": None, "flexible-extract": "$70,000"}
    assert scored[1]["correct_by"] == {"strict-match": False, "flexible-extract": True}
    assert tasks.accuracy_by_extractor(scored) == {"strict-match": 0.5, "flexible-extract": 1.0}
    assert all(r["prompt"] == s["prompt"] for r, s in zip(scored, saved))  # other fields pass through
    # Re-grading the scored file with another style: the Wei CoT extractors.
    again = list(tasks.score_file(out_path, "gsm8k", style="cot"))
    assert [r["correct_by"]["flexible-extract"] for r in again] == [True, True]


def test_score_records_from_task_fields_and_several_samples():
    math = {**MATH[2], "completion": "So the sum is $\\boxed{\\dfrac{14}{3}}$."}
    [scored] = tasks.score_records([math], "math")
    assert (scored["reference"], scored["extracted"], scored["correct"]) == ("\\frac{14}{3}", "\\dfrac{14}{3}", True)
    multi = {**GSM8K[0], "completions": ["#### 18", "#### 17", "no answer"]}
    [scored] = tasks.score_records([multi], "gsm8k")
    assert scored["correct"] == [True, False, False] and scored["n_correct"] == 1
    minerva = {"reference": "-\\frac{2}{3}", "style": "minerva",
               "completion": "Final Answer: The final answer is $-\\frac{4}{6}$. I hope it is correct."}
    assert next(tasks.score_records([minerva], "math"))["correct"]


def test_score_records_errors_name_the_record():
    good = {"reference": "1", "completion": "#### 1"}
    with pytest.raises(DataError, match=r"out\.jsonl:2: missing field 'completion'"):
        list(tasks.score_records([good, {"reference": "1"}], "gsm8k", source="out.jsonl"))
    with pytest.raises(DataError, match=r"record:1: missing field 'reference' \(or the svamp field 'Answer'\)"):
        list(tasks.score_records([{"completion": "#### 1"}], "svamp"))
