"""KV cache sizing: from the memory of the device the cache lives on (a GPU's own, never host RAM) less the
weights in the format they will have (int8, bf16, float32), refused before the compile when it cannot be
allocated or holds no block. GPUs are faked: these machines have none."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from max.dtype import DType

import mili.engine.model_runner as model_runner
from mili.config import ModelConfig
from mili.engine.model_runner import (KvCacheSizeError, device_free_memory_bytes, kv_cache_blocks,
                                      kv_cache_budget, runner_spec)
from mili.model.packed_linear import WeightFormat
from mili.server.demo import DEMO_CONFIG

HOST_FREE = 8 * 10**9
GPU_FREE = 70 * 10**9


@dataclass
class FakeDevice:
    """What the sizing reads of a max.driver.Device: `is_host` and `stats`."""

    is_host: bool
    stats: dict[str, object] = field(default_factory=dict)


@pytest.fixture(autouse=True)
def host_memory(monkeypatch):
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: HOST_FREE)


def gpu(free: object = GPU_FREE) -> FakeDevice:
    return FakeDevice(is_host=False, stats={"free_memory": free, "total_memory": 80 * 10**9})


def test_the_gpu_budget_comes_from_the_gpus_free_memory_not_host_ram():
    assert device_free_memory_bytes(gpu()) == GPU_FREE
    assert kv_cache_budget(0.5, weight_bytes=10 * 10**9, device=gpu()) == 30 * 10**9
    assert kv_cache_budget(20e9, weight_bytes=0, device=gpu()) == 20 * 10**9  # more than the host has: fine


def test_the_cpu_budget_comes_from_host_memory():
    cpu = FakeDevice(is_host=True, stats={"free_memory": GPU_FREE})  # MAX's CPU figure is not used
    assert device_free_memory_bytes(cpu) == HOST_FREE == device_free_memory_bytes(None)
    assert kv_cache_budget(0.5, weight_bytes=2 * 10**9, device=cpu) == 3 * 10**9
    assert kv_cache_budget(0.5, weight_bytes=0) == 4 * 10**9


@pytest.mark.parametrize("device, where", [(None, "host"), (gpu(), "GPU")])
def test_more_than_the_free_memory_is_refused(device, where):
    with pytest.raises(KvCacheSizeError, match=f"more than the .* GB of {where} memory free once the weights"):
        kv_cache_budget(99e12, weight_bytes=0, device=device)


def test_a_gpu_whose_free_memory_max_does_not_report_needs_bytes():
    silent = FakeDevice(is_host=False, stats={})
    assert device_free_memory_bytes(silent) is None
    assert kv_cache_budget(2e9, weight_bytes=0, device=silent) == 2 * 10**9
    with pytest.raises(KvCacheSizeError, match="MAX reports no free memory for this GPU.*give the KV cache size in bytes"):
        kv_cache_budget(0.5, weight_bytes=0, device=silent)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_non_positive_budgets_are_refused(value):
    with pytest.raises(KvCacheSizeError, match="must be positive"):
        kv_cache_budget(value, weight_bytes=0)


def demo_spec(dtype: DType, weights: WeightFormat | None = None):
    return runner_spec(ModelConfig.from_dict(DEMO_CONFIG), dtype=dtype, block_size=16, weights=weights)


def test_blocks_from_a_budget_and_too_small_budgets():
    per_block = 2 * 2 * 2 * 16 * 64 * 4  # the demo: 2 layers, 2 KV heads of 64: 16 KiB a float32 block of 16
    f32 = demo_spec(DType.float32)
    assert kv_cache_blocks(f32, 10 * per_block + 1) == 10
    assert kv_cache_blocks(demo_spec(DType.bfloat16), 10 * per_block) == 20
    assert kv_cache_blocks(f32, None) == (1 << 30) // per_block  # the default, 1 GiB
    for value in (100, 1.5, per_block - 1):
        with pytest.raises(KvCacheSizeError, match=f"holds no block of 16 tokens \\(one takes {per_block} bytes"):
            kv_cache_blocks(f32, value)
    with pytest.raises(KvCacheSizeError, match="more than the"):
        kv_cache_blocks(f32, 99e12)


def test_the_weights_are_counted_in_the_format_they_will_have():
    """int8 weights take ~1.06 bytes each, bf16 2, float32 4, so a fraction of the free memory holds more KV
    blocks next to int8 weights than next to bf16 ones (the same KV dtype), and next to bf16 than float32."""
    bf16, int8 = demo_spec(DType.bfloat16), demo_spec(DType.bfloat16, WeightFormat.INT8)
    f32, f32_int8 = demo_spec(DType.float32), demo_spec(DType.float32, WeightFormat.INT8)
    assert (bf16.weight_format, int8.weight_format, f32.weight_format) == (
        WeightFormat.BF16, WeightFormat.INT8, WeightFormat.DENSE)
    assert int8.weight_bytes() < bf16.weight_bytes() < f32.weight_bytes()
    assert f32_int8.weight_bytes() - int8.weight_bytes() < 0.001 * int8.weight_bytes()  # only the norms grow
    assert 1.8 < f32.weight_bytes() / bf16.weight_bytes() <= 2.0  # bf16 panels pad a little
    assert 1.8 < bf16.weight_bytes() / int8.weight_bytes() < 2.0
    for spec in (bf16, int8, f32, f32_int8):
        per_block = spec.cache_shape(1).bytes(spec.dtype.size_in_bytes)
        assert kv_cache_blocks(spec, 0.5) == (HOST_FREE - spec.weight_bytes()) // 2 // per_block
    assert kv_cache_blocks(int8, 0.5) > kv_cache_blocks(bf16, 0.5)
    assert kv_cache_blocks(f32_int8, 0.5) > kv_cache_blocks(f32, 0.5)
