"""The `--quantization` choice and how a run's formats are named in logs and /status."""

from __future__ import annotations

import pytest
from max.dtype import DType

from mili.config import ModelConfig
from mili.engine.model_runner import runner_spec
from mili.model.packed_linear import WeightFormat
from mili.quantization import QUANTIZATIONS, describe_run, parse_quantization, weight_group_size
from mili.server.demo import DEMO_CONFIG


def test_the_choices_map_to_weight_formats():
    assert QUANTIZATIONS == ("none", "int8", "int4")
    assert parse_quantization("int8") is parse_quantization("INT8") is WeightFormat.INT8
    assert parse_quantization("int4") is WeightFormat.INT4
    assert parse_quantization("none") is parse_quantization(None) is None  # the spec's default


@pytest.mark.parametrize("value", ["fp8", "int2", "", "dense"])
def test_an_unknown_quantization_names_the_choices(value):
    with pytest.raises(ValueError, match=f"unsupported quantization '{value}': choose none, int8 or int4"):
        parse_quantization(value)


@pytest.mark.parametrize("dtype, quantization, described, group", [
    (DType.bfloat16, "int8", "bfloat16 activations, int8 weights (group 32)", 32),
    (DType.bfloat16, "int4", "bfloat16 activations, int4 weights (group 32, 5.0 bits a weight) meeting activations "
     "quantized to int8 per 32 inputs", 32),
    (DType.float32, "int8", "float32 activations, int8 weights (group 32)", 32),
    (DType.bfloat16, None, "bfloat16 activations, packed bf16 weights", None),  # the CPU default for bfloat16
    (DType.float32, None, "float32 activations, dense float32 weights", None),
])
def test_a_run_is_described_by_its_resolved_formats(dtype, quantization, described, group):
    spec = runner_spec(ModelConfig.from_dict(DEMO_CONFIG), dtype=dtype, block_size=16,
                       weights=parse_quantization(quantization))
    assert describe_run(spec) == described
    assert weight_group_size(spec) == group


def test_int4_with_float_activations_runs_in_the_int8_layout():
    spec = runner_spec(ModelConfig.from_dict(DEMO_CONFIG), dtype=DType.bfloat16, block_size=16,
                       weights=WeightFormat.INT4, float_activations=True)
    assert describe_run(spec) == ("bfloat16 activations, int4 weights (group 32, 5.0 bits a weight) meeting float "
                                  "activations, each weight decoded exactly")
    assert spec.packed_shape("layers.0.o_proj").format is WeightFormat.INT8
