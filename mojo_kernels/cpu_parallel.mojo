# Splitting CPU work into a few large contiguous ranges, one task per range (per core), so that
# per-task overhead never dominates small per-row work.
#
# Tasks go to the DeviceContext MAX hands the op, as MAX's own kernels do (max.algorithm's
# sync_parallelize without a context builds a fresh CPU context on every call).
from max.gpu.host import DeviceContext
from std.math import ceildiv
from std.os import abort
from std.sys import num_physical_cores

# Waking a pool thread costs ~10-20 us here; a task should carry more work than that, or the split
# loses to one core doing everything. Measured in a graph: 16-row rms_norm took 1.18x MAX's time split
# in two, 0.95x on one core. MAX's elementwise ops use the same grain.
comptime MIN_ELEMENTS_PER_TASK = 32768


def tasks_for(elements: Int) -> Int:
    """How many cores a memory-bound op over `elements` elements should use."""
    return max(1, min(num_physical_cores(), elements // MIN_ELEMENTS_PER_TASK))


def parallel_for[F: def(Int) raises -> None](count: Int, body: F, ctx: DeviceContext) raises:
    """Runs body(0) ... body(count - 1) as parallel tasks on ctx's CPU threads and waits for all.
    A single task runs inline on the calling thread. An error inside a task aborts (as in MAX)."""
    if count <= 0:
        return
    if count == 1:
        body(0)
        return

    def run(i: Int) {imm body}:
        try:
            body(i)
        except e:
            abort(String("mili kernel task failed: ", e))

    ctx.enqueue_cpu_range(run, count=count)
    ctx.synchronize()


def parallel_ranges[F: def(Int, Int) raises -> None](count: Int, tasks: Int, body: F, ctx: DeviceContext) raises:
    """Runs body(start, end) over at most `tasks` contiguous ranges covering [0, count), in parallel."""
    var used = min(count, tasks)
    if used <= 0:
        return
    var per_task = ceildiv(count, used)

    def run(task: Int) raises {imm body, imm count, imm per_task}:
        body(task * per_task, min(count, (task + 1) * per_task))

    parallel_for(used, run, ctx)


def for_row_groups[F: def[MR: Int](row: Int) -> None, //, MR: Int](first_row: Int, end_row: Int, body: F):
    """Calls body[rows](row) over rows first_row ..< end_row in the fewest groups of at most MR rows, their
    sizes balanced (16 rows with MR = 6 are 6 + 5 + 5, never 6 + 6 + 4 or 6 + 6 + 1 + 1 + 1 + 1): a
    micro-kernel's efficiency falls with its row count, so no group is left much smaller than the others."""
    var total = end_row - first_row
    if total <= 0:
        return
    var groups = ceildiv(total, MR)
    var row = first_row
    for g in range(groups):
        var count = total // groups + (1 if g < total % groups else 0)
        comptime for rows in range(1, MR + 1):
            if count == rows:
                body[rows](row)
        row += count
