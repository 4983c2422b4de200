"""_validate: numbers may be Python or numpy scalars, flags are booleans, thresholds stay in
float32's range; every refusal names the argument and the value."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradguard import _validate as V

F32_MAX = float(np.finfo(np.float32).max)
finite_f32 = st.floats(min_value=0.0, max_value=F32_MAX, allow_nan=False, width=32)


@given(x=finite_f32, kind=st.sampled_from([float, np.float32, np.float64]))
def test_a_threshold_is_the_same_float_whatever_scalar_type_carries_it(x, kind):
    v = V.nonneg_finite(kind(x), "t", allow_inf=True)
    assert type(v) is float and v == float(kind(x))


@given(x=st.floats(min_value=F32_MAX * (1 + 1e-6), max_value=1e308))
def test_a_finite_threshold_beyond_float32_is_refused(x):
    with pytest.raises(ValueError, match=r"t=.* is beyond float32's largest value"):
        V.nonneg_finite(x, "t", allow_inf=True)


@given(n=st.integers(min_value=0, max_value=2 ** 62),
       kind=st.sampled_from([int, np.int64, np.int32, np.uint64]))
def test_ints_of_any_scalar_type(n, kind):
    if kind is np.int32:
        n = n % 2 ** 31
    got = V.int_at_least(kind(n), "n", 0)
    assert type(got) is int and got == n


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_booleans_are_not_numbers(value):
    with pytest.raises(TypeError, match="t must be a number"):
        V.nonneg_finite(value, "t")
    with pytest.raises(TypeError, match="t must be a number"):
        V.number(value, "t")
    with pytest.raises(ValueError, match="n must be an int"):
        V.int_at_least(value, "n", 0)


@pytest.mark.parametrize("value, expect", [(True, True), (False, False), (np.bool_(False), False)])
def test_flags_take_booleans(value, expect):
    assert V.flag(value, "f") is expect


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, 1.0, np.int64(1)])
def test_flags_refuse_anything_else(value):
    with pytest.raises(TypeError, match=r"f must be True or False, got "):
        V.flag(value, "f")


def test_norm_type_takes_numpy_and_inf():
    assert V.norm_type(np.float32(1.5)) == 1.5
    assert V.norm_type("inf") == math.inf and V.norm_type(np.inf) == math.inf
    for bad in (0, -2, math.nan, np.float32("nan")):
        with pytest.raises(ValueError, match="norm_type must be a positive number or inf"):
            V.norm_type(bad)
