"""pass@k, maj@k and the coverage power-law fit (mathlm.train.eval.scoring) against hand and exact computations."""
import itertools
import math
import random

import pytest

from mathlm.train.eval import scoring


def test_pass_at_k_equals_the_exact_binomial_formula():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
                assert scoring.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert scoring.pass_at_k(10, 0, 5) == 0.0
    assert scoring.pass_at_k(10, 10, 1) == 1.0
    assert scoring.pass_at_k(10, 6, 5) == 1.0  # only 4 wrong samples: any 5 contain a right one
    assert scoring.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # n = 10,000: the binomials are astronomically large, the product form is not.
    assert scoring.pass_at_k(10_000, 1, 100) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="pass@11 needs 1 <= k <= n"):
        scoring.pass_at_k(10, 2, 11)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        scoring.pass_at_k(10, 11, 1)


def test_sample_budget_check_is_one_clear_line():
    scoring.check_sample_budget(16, [1, 4, 16])
    with pytest.raises(ValueError, match=r"pass@32 needs .* only 16 are drawn; raise the sample count to 64") as err:
        scoring.check_sample_budget(16, [1, 32, 64])
    assert "\n" not in str(err.value)


def test_summarize_averages_over_problems():
    got = scoring.summarize([0, 2, 4], 4, [1, 2])
    assert got[1] == pytest.approx((0 + 0.5 + 1) / 3)
    assert got[2] == pytest.approx((0 + (1 - 1 / 6) + 1) / 3)
    assert scoring.summarize([1, 1], [2, 4], [1]) == {1: pytest.approx((0.5 + 0.25) / 2)}
    with pytest.raises(ValueError, match="pass@8"):
        scoring.summarize([1], 4, [8])


def test_maj_at_k_by_hand():
    answers = ["A", "A", "B", None]
    # The six 2-subsets: {A,A} A, {A,B} tie -> A (sample 0 first), {A,None} A, {A,B} tie -> A, {A,None} A, {B,None} B.
    assert scoring.maj_at_k(answers, [True, True, False, False], 2) == pytest.approx(5 / 6)
    assert scoring.maj_at_k(answers, [False, False, True, False], 2) == pytest.approx(1 / 6)
    # k = n: the single full set; A has two votes.
    assert scoring.maj_at_k(answers, [True, True, False, False], 4) == 1.0
    # k = 1 is the mean accuracy of valid samples (None counts as wrong).
    assert scoring.maj_at_k(answers, [False, False, True, False], 1) == pytest.approx(1 / 4)


def test_maj_at_k_ties_go_to_the_earliest_sample_and_invalid_never_wins():
    assert scoring.maj_at_k(["B", "A"], [False, True], 2) == 0.0
    assert scoring.maj_at_k(["A", "B"], [True, False], 2) == 1.0
    assert scoring.maj_at_k([None, None, "A"], [False, False, True], 3) == 1.0  # two invalid votes lose to one
    assert scoring.maj_at_k([None, None], [False, False], 2) == 0.0


def _exact_maj(answers, correct, k):
    hits = []
    for subset in itertools.combinations(range(len(answers)), k):
        votes = [answers[i] for i in subset if answers[i] is not None]
        if not votes:
            hits.append(False)
            continue
        best = max(votes.count(a) for a in votes)
        winner = next(a for a in votes if votes.count(a) == best)
        hits.append(correct[answers.index(winner)])
    return sum(hits) / len(hits)


def test_maj_at_k_exact_enumeration_and_sampling():
    rng = random.Random(0)
    answers = [rng.choice(["1", "2", "3", None]) for _ in range(10)]
    correct = [a == "2" for a in answers]
    for k in (1, 3, 5, 10):
        assert scoring.maj_at_k(answers, correct, k) == pytest.approx(_exact_maj(answers, correct, k))
    # C(10, 5) = 252 > 100: sampled, deterministic per seed, close to the exact value.
    sampled = scoring.maj_at_k(answers, correct, 5, n_subsets=100, seed=1)
    assert sampled == scoring.maj_at_k(answers, correct, 5, n_subsets=100, seed=1)
    assert sampled == pytest.approx(_exact_maj(answers, correct, 5), abs=0.15)
    with pytest.raises(ValueError, match="maj@11"):
        scoring.maj_at_k(answers, correct, 11)


def test_summarize_majority():
    got = scoring.summarize_majority([["A", "B"], ["C", "C"]], [[True, False], [False, False]], [1, 2])
    assert got == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}


@pytest.mark.parametrize("a, b", [(-2.0, -0.5), (-0.7, -0.3), (-5.0, -1.2)])
def test_coverage_fit_recovers_the_power_law(a, b):
    ks = [1, 2, 4, 8, 16, 32, 64, 128]
    coverage = [math.exp(a * k**b) for k in ks]
    fa, fb = scoring.coverage_fit(ks, coverage)
    assert abs(fa - a) < 1e-6 and abs(fb - b) < 1e-6


def test_coverage_fit_skips_zero_and_one():
    ks = [1, 2, 4, 8, 16]
    coverage = [0.0] + [math.exp(-1.5 * k**-0.4) for k in ks[1:4]] + [1.0]
    fa, fb = scoring.coverage_fit(ks, coverage)
    assert fa == pytest.approx(-1.5, abs=1e-9) and fb == pytest.approx(-0.4, abs=1e-9)
    assert all(math.isnan(v) for v in scoring.coverage_fit([1, 2], [0.0, 1.0]))
    assert all(math.isnan(v) for v in scoring.coverage_fit([4, 4], [0.3, 0.4]))


def test_plot_coverage_writes_a_png(tmp_path):
    ks = [1, 2, 4, 8, 16]
    coverage = [math.exp(-1.0 * k**-0.5) for k in ks]
    path = scoring.plot_coverage(str(tmp_path / "coverage.png"), ks, coverage, scoring.coverage_fit(ks, coverage))
    data = (tmp_path / "coverage.png").read_bytes()
    assert path.endswith("coverage.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    scoring.plot_coverage(str(tmp_path / "nofit.png"), [1, 2], [0.0, 1.0], (math.nan, math.nan))
    assert (tmp_path / "nofit.png").stat().st_size > 0
