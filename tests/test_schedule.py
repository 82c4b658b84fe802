"""The lookahead schedule on its own: which step's weights attack each batch, seen from when
the attack runs, for the iterator patterns a training loop uses."""

import warnings

import pytest
import torch

from conadv_ds.schedule import Lookahead, Pull


class Clock:
    """An attack that records, for each (step, micro) it perturbs, how many updates had happened:
    the weights it saw are w_{updates}."""

    def __init__(self):
        self.updates, self.seen = 0, {}

    def __call__(self, batch, step, micro):
        self.seen[step, micro] = self.updates
        return torch.zeros(1)


def batches(step):
    return [(torch.full((1,), float(step)), torch.zeros(1, dtype=torch.long))]


def run(steps, iterator_for_step):
    clock = Clock()
    schedule = Lookahead(clock)
    for step in range(steps):
        it = iterator_for_step(step)
        prepared = schedule.prepare(step, Pull(lambda it=it: next(it), it))
        assert [b[0].item() for b, _ in prepared] == [float(step)]  # the step trains its own batch
        clock.updates += 1  # the optimizer step
    return clock.seen


def test_one_iterator_attacks_each_step_with_the_previous_weights():
    shared = iter([batches(s) for s in range(5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen = run(5, lambda step: shared)
    assert seen == {(0, 0): 0, **{(s, 0): s - 1 for s in range(1, 5)}}  # δ_t from w_{t-1}


def test_a_one_step_iterator_per_step_warns_once_and_says_what_to_do():
    with pytest.warns(UserWarning) as record:
        seen = run(4, lambda step: iter([batches(step)]))
    messages = [str(w.message) for w in record if "conadv lookahead" in str(w.message)]
    assert len(messages) == 1
    assert "step 1 was attacked with the current weights (DisAdv)" in messages[0]
    assert "RepeatingLoader" in messages[0]
    assert seen == {(s, 0): s for s in range(4)}  # what the warning says: δ_t from w_t


def test_a_new_iterator_per_epoch_warns_once():
    epochs = [iter([batches(s) for s in range(e * 2, e * 2 + 2)]) for e in range(3)]
    with pytest.warns(UserWarning, match="step 2 was attacked with the current weights") as record:
        seen = run(6, lambda step: epochs[step // 2])
    assert sum("conadv lookahead" in str(w.message) for w in record) == 1
    assert seen[1, 0] == 0 and seen[2, 0] == 2 and seen[3, 0] == 2
