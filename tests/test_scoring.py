"""deeper.llm.scoring: a rating row with (near) no probability on the digits is a failure, not a uniform guess."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeper.llm.scoring import MIN_DIGIT_MASS, result_from_logits, result_from_top_logprobs


def test_rows_below_the_digit_mass_floor_fail_and_the_rest_renormalise():
    rows = [
        [("Rating", np.log(0.99)), ("**", np.log(0.01))],  # no digit at all
        [("4", np.log(MIN_DIGIT_MASS / 2)), ("Rating", np.log(0.99))],  # a trace of a digit
        [("4", np.log(MIN_DIGIT_MASS * 2)), ("Rating", np.log(0.99))],  # just above the floor: a real answer
        [("1", np.log(0.3)), (" 5", np.log(0.1)), ("5", np.log(0.1)), ("I", np.log(0.5))],
    ]
    result = result_from_top_logprobs(rows)
    assert result.failed.tolist() == [True, True, False, False]
    np.testing.assert_allclose(result.probs[:2], 0.2)
    np.testing.assert_allclose(result.digit_mass, [0.0, MIN_DIGIT_MASS / 2, MIN_DIGIT_MASS * 2, 0.5])
    np.testing.assert_allclose(result.probs[2], [0, 0, 0, 1, 0])
    np.testing.assert_allclose(result.probs[3], [0.6, 0, 0, 0, 0.4])


def test_logits_with_no_digit_mass_fail_the_same_way():
    digit_ids = [[1], [2], [3], [4], [5]]
    logits = torch.full((2, 8), -1e4)
    logits[0, 0] = 10.0  # all mass on a non-digit token
    logits[1, 3] = 10.0  # all mass on "3"
    result = result_from_logits(logits, digit_ids)
    assert result.failed.tolist() == [True, False]
    np.testing.assert_allclose(result.probs[0], 0.2)
    np.testing.assert_allclose(result.probs[1], [0, 0, 1, 0, 0], atol=1e-12)


@pytest.mark.parametrize("mass", [float("nan")])
def test_a_nan_mass_fails(mass):
    result = result_from_top_logprobs([[("3", mass)]])
    assert result.failed.tolist() == [True] and result.digit_mass.tolist() == [0.0]
