"""Compiled kernel graphs, shared by every test in tests/kernels (each compiles once per session)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from max.driver import CPU, Buffer
from max.engine import InferenceSession, Model
from max.graph import DeviceRef

from mili.dtypes import numpy_to_buffer
from tests.kernels.graphs import (
    ATTENTION_CASES,
    NUM_LAYERS,
    AttentionCase,
    build_attention_graph,
    build_elementwise_graph,
    build_linear_graph,
)


@dataclass(frozen=True)
class AttentionCaseModel:
    """One case of the all-cases attention graph: `execute` takes and returns that case's inputs and output alone;
    every other case gets a one-token call whose K/V row is padding (slot -1), so it stores nothing."""

    model: Model
    case: AttentionCase

    def execute(self, *inputs: Buffer) -> list[Buffer]:
        args: list[Buffer] = []
        for case in ATTENTION_CASES:
            args += inputs if case == self.case else idle_attention_inputs(case)
        return [self.model.execute(*args)[ATTENTION_CASES.index(self.case)]]


def idle_attention_inputs(case: AttentionCase) -> list[Buffer]:
    d, row = case.head_dim, np.zeros((1, 1, case.head_dim), np.float32)
    return [numpy_to_buffer(np.zeros((NUM_LAYERS, 2, 1, 1, case.block_size * d), np.float32), case.dtype),
            numpy_to_buffer(row, case.dtype), numpy_to_buffer(row, case.dtype),
            Buffer.from_numpy(np.array([-1], np.int32)),
            numpy_to_buffer(row, case.dtype), Buffer.from_numpy(np.array([0], np.int32)),
            Buffer.from_numpy(np.array([0, 1], np.int32)), Buffer.from_numpy(np.array([1], np.int32)),
            Buffer.from_numpy(np.array([[0]], np.int32))]


@pytest.fixture(scope="session")
def cpu_session() -> InferenceSession:
    return InferenceSession(devices=[CPU()])


@pytest.fixture(scope="session")
def elementwise_model(cpu_session):
    return cpu_session.load(build_elementwise_graph(DeviceRef.CPU()))


@pytest.fixture(scope="session")
def attention_models(cpu_session):
    model = cpu_session.load(build_attention_graph(DeviceRef.CPU()))
    return {case: AttentionCaseModel(model, case) for case in ATTENTION_CASES}


@pytest.fixture(scope="session")
def linear_model(cpu_session):
    return cpu_session.load(build_linear_graph(DeviceRef.CPU()))
