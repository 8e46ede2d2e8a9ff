"""The peer benchmarks' own tools, checked without any peer: the serving client's statistics (against numpy), its
datasets (exact token counts with the real Qwen3 tokenizer), its accounting of streamed responses and failures
(against a scripted server), and the worker line protocol (a worker that prints to stdout and fails on purpose)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from benchmarks import client_check, gguf_accuracy, serving
from benchmarks.peers import engines
from benchmarks.peers.spotlight import Spotlight
from benchmarks.peers.workers import WorkerFailed, WorkerProcess, WorkerSpec
from benchmarks.serving_client import (
    Request,
    WordVocabulary,
    percentiles,
    random_dataset,
    run_load,
    shared_prefix_dataset,
    summarize,
)


def test_percentiles_match_numpy(rng):
    values = rng.exponential(0.05, int(rng.integers(1, 300))).tolist()
    got = percentiles(values)
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert got[name] == pytest.approx(np.percentile(values, q) * 1e3, rel=1e-12)
    assert got["mean"] == pytest.approx(np.mean(values) * 1e3, rel=1e-12)
    assert percentiles([])["p50"] is None


@pytest.fixture(scope="module")
def vocab(tokenizer_dir: Path) -> WordVocabulary:
    return WordVocabulary(tokenizer_dir)


def test_prompts_have_exactly_the_tokens_asked_for(vocab, seed):
    requests = random_dataset(vocab, 12, (1, 300), (5, 9), seed)
    lengths = [r.prompt_tokens for r in requests]
    assert all(1 <= n <= 300 for n in lengths) and all(5 <= r.max_tokens <= 9 for r in requests)
    assert lengths == [len(r.prompt.split(" ")) - 1 for r in requests]  # one token a word, as counted
    shared = shared_prefix_dataset(vocab, 10, num_prefixes=3, prefix_tokens=200, question_tokens=7,
                                   output_tokens=4, seed=seed)
    assert [r.prompt_tokens for r in shared] == [207] * 10
    assert len({" ".join(r.prompt.split(" ")[:201]) for r in shared}) == 3


def test_every_serving_point_sends_prompts_no_other_point_sent(vocab, seed):
    """A point that reused another's prompts would find them in the prefix cache and time cached prefill."""
    plan = serving.load_plan(["random", "shared-prefix"], [("concurrency", 1), ("concurrency", 4), ("rate", 0.5)],
                             seed)
    assert [(d, k, v) for d, k, v, _ in plan] == [(d, k, v) for d in ("random", "shared-prefix")
                                                 for k, v in (("concurrency", 1), ("concurrency", 4), ("rate", 0.5))]
    prompts = [{r.prompt for r in serving.dataset(d, vocab, 8, point_seed)} for d, _, _, point_seed in plan]
    assert sum(len(p) for p in prompts) == len(set().union(*prompts)), "two load points share a prompt"


def scripted_server(replies: list[tuple[int, list[str]]]) -> httpx.MockTransport:
    """Answers each request with the next (status, SSE data lines)."""
    queue = list(replies)

    def handle(request: httpx.Request) -> httpx.Response:
        status, lines = queue.pop(0)
        assert json.loads(request.content)["ignore_eos"] is True
        return httpx.Response(status, content="".join(f"data: {line}\n\n" for line in lines).encode())
    return httpx.MockTransport(handle)


def chunk(text: str) -> str:
    return json.dumps({"choices": [{"index": 0, "text": text}]})


def test_streamed_responses_and_failures_are_counted():
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})
    replies = [
        (200, [chunk("a"), chunk(""), chunk("b"), chunk("c"), usage, "[DONE]"]),  # ok: 3 tokens, 2 gaps
        (200, [chunk("a"), chunk("b"), chunk("c"), "[DONE]"]),  # ok without usage: chunks counted
        (200, [chunk("a"), json.dumps({"usage": {"completion_tokens": 1}}), "[DONE]"]),  # short: failed
        (200, [chunk("a"), json.dumps({"error": {"message": "engine died"}})]),  # error event: failed
        (400, [json.dumps({"error": {"message": "bad"}})]),  # client error: failed
    ]
    requests = [Request("x y z", 3, 3)] * len(replies)
    outcomes, duration = asyncio.run(run_load("http://server", "m", requests, 1, None,
                                              transport=scripted_server(replies)))
    assert [o.ok for o in outcomes] == [True, True, False, False, False]
    assert [o.output_tokens for o in outcomes[:2]] == [3, 3] and len(outcomes[0].itl_s) == 2
    assert "1 of 3 tokens" in outcomes[2].error and "engine died" in outcomes[3].error
    assert outcomes[4].error.startswith("HTTP 400")
    summary = summarize(outcomes, duration)
    assert (summary["requests"], summary["failed"], summary["output_tokens"]) == (5, 3, 6)
    assert len(summary["ttft_samples_ms"]) == 2 and len(summary["tpot_samples_ms"]) == 2


FAKE_WORKER = textwrap.dedent('''
    import sys, time
    from protocol import serve

    class Fake:
        def facts(self):
            print("noise on stdout that must not reach the driver")
            return {"weight_bytes": 123}

        def generate(self, prompts, max_tokens):
            print("more noise")
            if max_tokens[0] < 0:
                raise ValueError("negative")
            if max_tokens[0] == 999:
                time.sleep(600)  # a call the driver gives up on
            return sum(max_tokens)

    serve(Fake)
''')


def test_worker_protocol(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    worker = WorkerProcess(WorkerSpec("fake", Path(sys.executable), str(script), [], startup_timeout_s=60))
    try:
        assert worker.facts["weight_bytes"] == 123 and worker.facts["load_s"] >= 0
        reply = worker.call("latency", prompt=[1, 2, 3], decode=4)
        assert reply["prefill_s"] >= 0 and reply["decode_s"] >= 0
        reply = worker.call("offline", requests=[{"prompt": [1], "max_tokens": 5}, {"prompt": [2], "max_tokens": 6}])
        assert reply["output_tokens"] == 11
        with pytest.raises(WorkerFailed, match="negative"):
            worker.call("offline", requests=[{"prompt": [1], "max_tokens": -1}])
        assert worker.call("offline", requests=[{"prompt": [1], "max_tokens": 2}])["output_tokens"] == 2
        worker.pause()
        assert states_within([worker.process.pid], "T") == {"T"}
        assert worker.call("offline", requests=[{"prompt": [1], "max_tokens": 3}])["output_tokens"] == 3  # continued
        worker.pause()  # close() must continue it to be heard
    finally:
        worker.close()
    assert worker.process.returncode == 0


def test_a_worker_busy_with_an_abandoned_call_is_killed_at_once(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    worker = WorkerProcess(WorkerSpec("fake", Path(sys.executable), str(script), [], startup_timeout_s=60))
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="no answer to offline within 1 s"):
        worker.call("offline", timeout_s=1.0, requests=[{"prompt": [1], "max_tokens": 999}])
    assert worker.process.returncode == -signal.SIGKILL  # not asked to quit and waited on for a minute
    assert time.monotonic() - started < 30


def process_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat: R running, S sleeping, T stopped, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def states_within(pids: list[int], wanted: str, timeout_s: float = 10.0) -> set[str]:
    """The processes' states ("T" stopped, "S" not stopped: running or sleeping) once all are `wanted`, or as they
    are after `timeout_s` (signals land asynchronously: under load a SIGSTOP can take a while to show)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {"T" if process_state(p) == "T" else "S" for p in pids}
        if states == {wanted} or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


def test_spotlight_lets_only_the_measured_engine_run():
    """Each engine leads a process group with a child of its own (as vLLM's engine core is); only the group in the
    spotlight runs, a name with no group stops them all, and release() continues them all."""
    engine = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    engines = {name: subprocess.Popen([sys.executable, "-c", engine], start_new_session=True) for name in ("a", "b")}
    try:
        time.sleep(1.0)  # the children are up
        members = {name: [int(p) for p in subprocess.run(["pgrep", "-g", str(e.pid)], capture_output=True,
                                                           text=True, check=True).stdout.split()]
                   for name, e in engines.items()}
        assert all(len(pids) == 2 for pids in members.values()), members
        spotlight = Spotlight({name: SimpleNamespace(process=e) for name, e in engines.items()})  # owners of processes
        spotlight.on("a")
        assert states_within(members["b"], "T") == {"T"}
        assert states_within(members["a"], "S") == {"S"}
        spotlight.on("llama-bench")  # not a group of its own: everyone stops
        assert states_within(members["a"] + members["b"], "T") == {"T"}
        spotlight.release()
        assert states_within(members["a"] + members["b"], "S") == {"S"}
    finally:
        for e in engines.values():
            os.killpg(e.pid, signal.SIGKILL)
            e.wait()


@pytest.mark.parametrize(("flags", "dtype"), [("fpu avx2 fma", "float32"), ("avx2 avx512f avx512_bf16", "bfloat16"),
                                              ("avx2 avx512f amx_bf16 amx_tile", "bfloat16"), ("", "float32")])
def test_torch_peers_compute_batches_in_bf16_only_where_the_cpu_has_bf16_dot_products(monkeypatch, flags, dtype):
    monkeypatch.setattr(engines, "cpu_flags", lambda: set(flags.split()))
    assert engines.batched_peer_dtype() == dtype
    assert engines.vllm_worker(Path("m"), 1, dtype).name == f"vLLM {engines.SHORT_DTYPE[dtype]}"


def test_client_check_names_the_flag_that_is_out_of_range(capsys):
    with pytest.raises(SystemExit) as exited:
        client_check.main(["--num-prompts", "0"])
    assert exited.value.code == 2
    assert "--num-prompts must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny-untied-mha-d128", "tiny-tied-gqa4-d128"])
def test_prefill_flops_count_every_projection_of_the_checkpoint(name, rng):
    """benchmarks.step --prefill reports GFLOP/s from prefill_flops: its linear count must be 2 x tokens x every
    projection weight in the checkpoint (plus one LM-head row), its attention count the causal sum over tokens."""
    from benchmarks.step import prefill_flops
    from mili.checkpoints import cached_checkpoint
    from mili.config import ModelConfig

    model = cached_checkpoint(name)
    config = ModelConfig.from_pretrained(model)
    tokens = int(rng.integers(1, 600))
    projections = sum(n for tensor, n in engines.checkpoint_parameter_counts(model).items() if "proj.weight" in tensor)
    assert projections > 0
    linear, attention = prefill_flops(SimpleNamespace(spec=SimpleNamespace(config=config)), tokens)
    assert linear == 2 * tokens * projections + 2 * config.hidden_size * config.vocab_size
    keys_seen = sum(i + 1 for i in range(tokens))  # token i attends to i + 1 keys
    q_width = config.num_attention_heads * config.head_dim
    assert attention == config.num_hidden_layers * 2 * 2 * q_width * keys_seen


@pytest.mark.parametrize("argv", [["--ops", "attention,bogus"], ["--ops", ""], ["--dtypes", "float16"]])
def test_kernel_bench_names_the_flag_it_cannot_take(argv):
    # A child process: benchmarks.kernels imports max.nn.kernels, whose setenv(PYTHONEXECUTABLE) would stay in
    # this process and break every later test that starts the venv's python (test_kernel_package.py).
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernels", *argv], capture_output=True, text=True,
                            cwd=root, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{argv[0]} takes a comma-separated list" in result.stderr


HARNESSES = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "mojo").glob("*.mojo"))


@pytest.mark.slow
@pytest.mark.parametrize("source", HARNESSES, ids=[p.stem for p in HARNESSES])
def test_the_outside_graph_kernel_harnesses_compile(tmp_path, source):
    """benchmarks/mojo/*.mojo call the kernels' functions directly: a signature change must not leave one broken
    until someone next needs it."""
    from mili.kernels import build_env

    root = Path(__file__).resolve().parents[2]
    mojo = Path(sys.executable).with_name("mojo")
    result = subprocess.run([str(mojo), "build", "-I", str(root), str(source), "-o", str(tmp_path / "harness")],
                            capture_output=True, text=True, cwd=root, timeout=600, env=build_env())
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "harness").exists()


def _llama_kld_row(logits: np.ndarray, stride: int) -> np.ndarray:
    """One position as llama-perplexity's log_softmax() writes it (tools/perplexity/perplexity.cpp): a float32 scale
    and minimum log-probability, then each logit's 16-bit step above the minimum (at most 16 nats under the top)."""
    top = np.float32(logits.max())
    floor = np.float32(max(logits.min(), top - 16))
    log_sum_exp = np.float32(np.log(np.exp((logits - top).astype(np.float64)).sum()))
    scale = np.float32((top - floor) / np.float32(65535))
    row = np.zeros(stride, np.uint16)
    row[:4] = np.array([scale, floor - top - log_sum_exp], np.float32).view(np.uint16)
    row[4:4 + len(logits)] = np.where(logits > floor, np.rint((logits - floor) / scale), 0).astype(np.uint16)
    return row


def test_llama_perplexity_log_probabilities_are_read_as_written(tmp_path, seed):
    """benchmarks.gguf_accuracy reads llama-perplexity's --kl-divergence-base file: an odd vocabulary (the rows
    pad to an even count), the tokens, and log-probabilities within the format's step of numpy's."""
    rng = np.random.default_rng(seed)
    n_ctx, n_vocab, n_chunk = 12, 37, 2
    tokens = rng.integers(0, n_vocab, n_chunk * n_ctx).astype(np.int32)
    first = n_ctx // 2
    logits = rng.normal(0, 6, (n_ctx - 1 - first, n_vocab)).astype(np.float32)
    stride = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.stack([_llama_kld_row(row, stride) for row in logits])
    path = tmp_path / "base.kld"
    path.write_bytes(b"_logits_" + np.array([n_ctx, n_vocab, n_chunk], np.int32).tobytes() + tokens.tobytes()
                     + rows.tobytes())
    read = gguf_accuracy.read_kld_base(path, n_vocab)
    assert read.first == first and read.log_probs.shape == (n_ctx - 1 - first, n_vocab)
    np.testing.assert_array_equal(read.tokens, tokens[:n_ctx])
    expected = gguf_accuracy.log_softmax(logits)
    visible = expected > expected.max(axis=-1, keepdims=True) - 15.99
    step = 16 / 65535
    assert visible.sum() > logits.size // 2
    np.testing.assert_allclose(read.log_probs[visible], expected[visible], atol=step)
    assert (read.log_probs[~visible] <= expected.max(axis=-1, keepdims=True).repeat(n_vocab, 1)[~visible] - 15.9).all()
    with pytest.raises(ValueError, match="not a llama-perplexity"):
        (tmp_path / "other").write_bytes(b"GGUF" + bytes(40))
        gguf_accuracy.read_kld_base(tmp_path / "other", n_vocab)
