"""The best model of a run: its validation loss and step, and when to stop trying to beat it.

`BestModel` does both jobs, since both read the same evaluations; train.py reports every
evaluation to it. `update` says whether the loss is the lowest so far (then train.py writes
gpt_best.pt); `should_stop` turns true after `patience` evaluations in a row without an
improvement of at least `min_delta` over the last loss that counted as one (`patience` 0 never
stops). Its state is four numbers (`state_dict`), saved in every step checkpoint
(step_checkpoint.py), so a resumed run keeps its best-so-far and its count exactly. Writing
gpt_best.pt is train.py's job, naming it rundir/names.py's.
"""

import math
from dataclasses import asdict, dataclass


@dataclass
class BestModel:
    patience: int = 0
    min_delta: float = 0.0
    best_loss: float = math.inf  # the lowest validation loss so far
    best_step: int = -1  # the step it was reached at; -1 before the first evaluation
    reference_loss: float = math.inf  # the loss of the last improvement of at least min_delta
    stale_evaluations: int = 0  # evaluations since that improvement

    def update(self, val_loss, step):
        """Count one evaluation; True if its loss is the lowest so far."""
        if val_loss < self.reference_loss - self.min_delta:
            self.reference_loss, self.stale_evaluations = val_loss, 0
        else:
            self.stale_evaluations += 1
        if val_loss < self.best_loss:
            self.best_loss, self.best_step = val_loss, step
            return True
        return False

    @property
    def should_stop(self):
        return self.patience > 0 and self.stale_evaluations >= self.patience

    def state_dict(self):
        state = asdict(self)
        del state["patience"], state["min_delta"]  # settings: this run's flags decide them
        return state

    def load_state_dict(self, state):
        self.best_loss = float(state["best_loss"])
        self.best_step = int(state["best_step"])
        self.reference_loss = float(state["reference_loss"])
        self.stale_evaluations = int(state["stale_evaluations"])
