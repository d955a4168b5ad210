"""Admission (serve/admission.py): which queued requests join the running batch, without a model."""

from esft_jax.serve.admission import admit
from esft_jax.serve.engine import Request


def test_admission_takes_the_oldest_requests_that_fit_in_queue_order():
    queued = [Request([i + 1], model) for i, model in enumerate(["a", None, "b", "a", None])]
    assert admit(3, queued) == [0, 1, 2]
    assert admit(5, queued) == admit(8, queued) == [0, 1, 2, 3, 4]
    assert admit(0, queued) == []
    assert admit(4, []) == []
