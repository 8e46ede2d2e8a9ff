# Block-wide reductions for GPU kernels: every thread of the block calls them with its value and
# gets the result for the whole block. `partial` is shared memory of `threads` floats.
from max.gpu import barrier


def block_sum[threads: Int](partial: MutPointer[Float32, ...], tid: Int, value: Float32) -> Float32:
    partial.unsafe_store(tid, value)
    barrier()
    var stride = threads // 2
    while stride > 0:
        if tid < stride:
            partial.unsafe_store(tid, partial.unsafe_load(tid) + partial.unsafe_load(tid + stride))
        barrier()
        stride //= 2
    var total = partial.unsafe_load(0)
    barrier()  # every thread has read the result before `partial` is reused
    return total


def block_max[threads: Int](partial: MutPointer[Float32, ...], tid: Int, value: Float32) -> Float32:
    partial.unsafe_store(tid, value)
    barrier()
    var stride = threads // 2
    while stride > 0:
        if tid < stride:
            partial.unsafe_store(tid, max(partial.unsafe_load(tid), partial.unsafe_load(tid + stride)))
        barrier()
        stride //= 2
    var result = partial.unsafe_load(0)
    barrier()
    return result
