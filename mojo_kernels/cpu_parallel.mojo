# Splitting CPU work into a few large contiguous ranges, one task per range (per core), so that
# per-task overhead never dominates small per-row work.
from max.algorithm import sync_parallelize
from std.math import ceildiv


def parallel_ranges[F: def(Int, Int) raises -> None](count: Int, tasks: Int, body: F) raises:
    """Runs body(start, end) over at most `tasks` contiguous ranges covering [0, count), in parallel."""
    var used = min(count, tasks)
    if used <= 0:
        return
    var per_task = ceildiv(count, used)

    def run(task: Int) raises {imm body, imm count, imm per_task}:
        body(task * per_task, min(count, (task + 1) * per_task))

    sync_parallelize(run, used)
