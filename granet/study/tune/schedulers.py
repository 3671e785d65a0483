"""Ray Tune searchers and schedulers with granet's semantics.

* :class:`PrunedAwareOptunaSearch`: Ray's ``OptunaSearch`` tells Optuna ``COMPLETE`` for trials
  that ASHA stopped early; here they are ``PRUNED`` (and errored ones ``FAIL``).
* :class:`FinalEpochSafeASHA`: ASHA that never stops a trial at its last epoch, so the trial's
  end-of-trial work (its ``trials`` row, closing its MLflow run) always runs.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

__all__ = ["FinalEpochSafeASHA", "PrunedAwareOptunaSearch"]

log = logging.getLogger("granet")


class PrunedAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna ``PRUNED`` for early-stopped trials.

    Ray's ``OptunaSearch.on_trial_complete`` tells ``COMPLETE`` with the truncated value whenever
    the last result holds the metric, so ASHA-stopped trials look finished to TPE. Here a trial
    whose last result has ``result[iteration_key] < full_iterations`` is told ``PRUNED`` (its last
    result is first reported as an intermediate value, which Optuna keeps as the PRUNED trial's
    value; single objective only), an errored trial ``FAIL``. Touches the private
    ``_ot_trials``/``_ot_study``/``_completed_trials`` of Ray 2.60's OptunaSearch: pinned and
    unit-tested against real Optuna.
    """

    def __init__(self, *args: Any, full_iterations: int, iteration_key: str = "epoch",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full_iterations = int(full_iterations)
        self.iteration_key = iteration_key

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        super().on_trial_result(trial_id, result)
        self._link(trial_id, result)

    def _link(self, trial_id: str, result: dict[str, Any] | None) -> None:
        """The Optuna trial -> its MLflow run (the trainable reports the run's id)."""
        run_id = (result or {}).get("mlflow_run_id")
        ot_trial = self._ot_trials.get(trial_id)
        if run_id and ot_trial is not None and trial_id not in self._completed_trials \
                and "mlflow_run_id" not in ot_trial.user_attrs:
            ot_trial.set_user_attr("mlflow_run_id", run_id)

    def _iteration(self, result: dict[str, Any] | None) -> int | None:
        if not result:
            return None
        for key in (self.iteration_key, "training_iteration"):
            if result.get(key) is not None:
                return int(result[key])
        return None

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        from optuna.trial import TrialState

        # Tune hands a scheduler's stopping result to on_trial_complete only
        self._link(trial_id, result)
        it = self._iteration(result)
        stopped_early = it is not None and it < self.full_iterations
        if not (error or stopped_early) or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        state = TrialState.FAIL if error else TrialState.PRUNED
        value = result.get(self.metric) if (result and isinstance(self.metric, str)) else None
        if state == TrialState.PRUNED and isinstance(value, (int, float)) and math.isfinite(value):
            # Tune hands the stopping result to on_trial_complete only, never to
            # on_trial_result: record it so the PRUNED trial keeps its truncated value.
            already = it in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values
            if not already:
                ot_trial.report(float(value), it)
        try:
            self._ot_study.tell(ot_trial, None, state=state)
        except (RuntimeError, ValueError) as exc:  # e.g. told already by a resumed driver
            log.warning("granet: warning: Optuna trial of %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


class FinalEpochSafeASHA(ASHAScheduler):
    """ASHA that never stops a trial at (or after) its last epoch.

    Plain ASHA with ``max_t = epochs`` answers STOP to the last report, so Tune kills the trial
    before the trainable returns and its end-of-trial work (the ``trials``/``layers`` Parquet
    rows, closing the MLflow run) never runs. Here ``max_t = epochs + 1`` and any decision at
    iteration >= epochs is CONTINUE; the trial then ends by itself.
    """

    def __init__(self, *, full_iterations: int, **kwargs: Any) -> None:
        super().__init__(max_t=int(full_iterations) + 1, **kwargs)
        self.full_iterations = int(full_iterations)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if result.get(self._time_attr, 0) >= self.full_iterations:
            if action == self.STOP:
                self._num_stopped -= 1
            return self.CONTINUE
        return action
