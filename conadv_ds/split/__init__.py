"""The split schedule: attacker ranks compute δ for future batches while trainer ranks update.

In one process ConAdv does the same work as DisAdv; the attack only stops costing wall-clock
time when it runs on other hardware at the same time (paper, Fig. 1b). With

    "conadv": {"schedule": "split", "attacker_ranks": 1, "staleness": 1}

the launch's ranks are divided (`layout.py`): the trainer ranks form DeepSpeed's world (ZeRO
0-3, batch arithmetic over the trainers only) and the attacker ranks never build a
DeepSpeedEngine. `link.py` wires the process groups; `wire.py` is the message format.

Protocol, per trainer step t (`trainer.Remote.prepare`), τ = staleness:

- the trainer pulls its micro-batches up to step t+τ (steps 0..τ at the first step) and sends
  every attacker a header and its share of the live weights w_t (`shares.py`), as a host copy:
  the optimizer updates the weights while the copy is in flight, and the trainer never waits
  for its sends. They are released once the δ computed from them (step t+τ's) comes back (the
  attacker then provably holds them): at most τ + 1 steps' copies are held;
- to the attacker that serves it, the trainer also sends the newly pulled micro-batches (the
  attacker sees exactly what the trainer trains on, from any data pipeline), its BatchNorm
  buffers and its modules' train/eval modes;
- the attacker (`attacker.SplitAttacker`) assembles w_t from the N shares, computes δ for
  those steps with `Adversary` and the trainer's rank in the trainer world (the same
  `attack_seed` as in-process), from w_t = w_{s-τ} for step s = t+τ, and sends it with
  `isend`; the trainer posts `irecv` for it when it sends the job, so it only waits when the
  attack is slower than τ training steps. Each gloo send is waited exactly once (gloo counts
  completions) and released once its receiver provably holds it.

δ therefore equals the in-process ConAdv δ with the same τ and seeds, and the trajectory is
the same. BatchNorm running statistics for an `attack_bn: "eval"` attack come with the same
stale step as the weights (as on the in-process lookahead path).

User loop: the same code runs on every rank. `initialize` returns a `SplitAttacker` on
attacker ranks, whose `train_batch(data_iter)` ignores `data_iter` and serves one trainer
step; call it until it raises StopIteration, which it does when the trainers' data ends or
they call `engine.stop_attackers()`. `engine.is_attacker` tells the two apart.
"""

from .layout import Layout, plan_layout

__all__ = ["Layout", "plan_layout"]
