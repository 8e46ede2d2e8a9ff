"""Compiled kernel graphs, shared by every test in tests/kernels (each compiles once per session)."""

from __future__ import annotations

import pytest
from max.driver import CPU
from max.engine import InferenceSession
from max.graph import DeviceRef

from tests.kernels.graphs import ATTENTION_CASES, build_attention_graph, build_elementwise_graph, build_linear_graph


@pytest.fixture(scope="session")
def cpu_session() -> InferenceSession:
    return InferenceSession(devices=[CPU()])


@pytest.fixture(scope="session")
def elementwise_model(cpu_session):
    return cpu_session.load(build_elementwise_graph(DeviceRef.CPU()))


@pytest.fixture(scope="session")
def attention_models(cpu_session):
    return {case: cpu_session.load(build_attention_graph(DeviceRef.CPU(), case)) for case in ATTENTION_CASES}


@pytest.fixture(scope="session")
def linear_model(cpu_session):
    return cpu_session.load(build_linear_graph(DeviceRef.CPU()))
