"""Decode step statistics as the router reads them: recent steps only, warm-up steps left out."""

import pytest

from colm.decode_worker.step_stats import StepTimes


def test_summary_is_median_and_mean_batch_of_recent_steps_only():
    st = StepTimes(window_s=10.0, max_samples=4)
    st.record(2, 50.0, 8, now=0.0)  # old: gone by t=20
    for t, ms, b in ((15.0, 1.0, 1), (16.0, 3.0, 3), (17.0, 2.0, 2)):
        st.record(1, ms, b, now=t)
    ms, batch = st.summary(now=20.0)
    assert ms == {1: 2.0} and batch == {1: 2.0}
    assert st.summary(now=5.0)[0] == {1: 2.0, 2: 50.0}  # (a clock before the later steps sees the old one too)
    for i in range(5):  # max_samples keeps the newest 4
        st.record(1, 10.0 + i, 1, now=18.0)
    assert st.summary(now=20.0)[0] == {1: 12.5}
    with pytest.raises(ValueError, match="window_s"):
        StepTimes(window_s=0)
