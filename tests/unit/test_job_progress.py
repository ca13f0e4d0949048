"""Progress lines number a job's stages in the order the worker runs them."""

from __future__ import annotations

from nvfp4_admin.jobs import _RUN_ORDER, _step
from nvfp4_common.jobs import Stage

# What a watch sees of one job, in order (nvfp4_worker.pipeline): queued, loading, the
# original model evaluated, calibration, the quantized model evaluated, export, publish.
SEEN = [
    Stage.QUEUED,
    Stage.LOADING,
    Stage.LOADING,
    Stage.EVALUATING,
    Stage.CALIBRATING,
    Stage.EVALUATING,
    Stage.EXPORTING,
    Stage.PUBLISHING,
    Stage.DONE,
]


def test_a_watch_numbers_the_stages_in_run_order() -> None:
    step, shown = 0, []
    for stage in SEEN:
        step = _step(stage, step)
        shown.append(step)
    assert shown == [0, 1, 1, 2, 3, 4, 5, 6, 6]
    assert len(_RUN_ORDER) == 6


def test_numbers_never_go_back_when_a_watch_misses_a_stage() -> None:
    step = 0
    for stage in (Stage.LOADING, Stage.CALIBRATING, Stage.EXPORTING, Stage.PUBLISHING):
        new = _step(stage, step)
        assert new > step
        step = new


def test_a_single_look_gives_the_first_place() -> None:
    assert [_step(s) for s in (Stage.LOADING, Stage.EVALUATING, Stage.CALIBRATING)] == [1, 2, 3]
    assert _step(Stage.QUEUED) == 0
