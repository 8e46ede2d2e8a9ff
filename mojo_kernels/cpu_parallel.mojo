# Splitting CPU work into a few large contiguous ranges, one task per range (per core), so that
# per-task overhead never dominates small per-row work.
from max.algorithm import sync_parallelize
from std.math import ceildiv
from std.sys import num_physical_cores

# Waking a pool thread costs ~10-20 us here; a task should carry more work than that (about 32K
# elements of a memory-bound op), or the split loses to one core doing everything.
comptime MIN_ELEMENTS_PER_TASK = 8192


def tasks_for(elements: Int) -> Int:
    """How many cores a memory-bound op over `elements` elements should use."""
    return max(1, min(num_physical_cores(), elements // MIN_ELEMENTS_PER_TASK))


def parallel_ranges[F: def(Int, Int) raises -> None](count: Int, tasks: Int, body: F) raises:
    """Runs body(start, end) over at most `tasks` contiguous ranges covering [0, count), in parallel.
    One range runs inline on the calling thread."""
    var used = min(count, tasks)
    if used <= 0:
        return
    if used == 1:
        body(0, count)
        return
    var per_task = ceildiv(count, used)

    def run(task: Int) raises {imm body, imm count, imm per_task}:
        body(task * per_task, min(count, (task + 1) * per_task))

    sync_parallelize(run, used)
