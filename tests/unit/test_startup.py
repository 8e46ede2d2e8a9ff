"""`mili serve`'s preconditions, checked before the graph compile: each failure one line naming its flag."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from mili.server.startup import StartupError, bind_listening_socket, check_checkpoint_folder, plan_kv_cache_blocks


def test_a_busy_port_names_the_flag():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StartupError, match=f"--port {port}: 127.0.0.1:{port} is already in use.*--port"):
            bind_listening_socket("127.0.0.1", port)


def test_a_free_port_is_bound_and_handed_over():
    sock = bind_listening_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_a_host_that_is_not_this_machine_names_the_flag():
    with pytest.raises(StartupError, match="--host 192.0.2.1: not an address of this machine"):
        bind_listening_socket("192.0.2.1", 0)  # TEST-NET-1: never assigned to a machine


@pytest.mark.parametrize("remove, named", [("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"),
                                           ("model.safetensors", "*.safetensors")])
def test_a_folder_missing_a_checkpoint_file_names_it(small_checkpoint_dir, tmp_path, remove, named):
    folder = tmp_path / "ckpt"
    shutil.copytree(small_checkpoint_dir, folder)
    check_checkpoint_folder(folder)
    for path in folder.glob(remove):
        path.unlink()
    with pytest.raises(StartupError, match=f"--model {folder}: no {named.replace('*', '[*]')} in that folder"):
        check_checkpoint_folder(folder)


def test_an_unreadable_checkpoint_is_named_with_the_fix(small_checkpoint_dir, monkeypatch):
    """A container user that cannot read a mounted checkpoint gets one line, not a traceback. (Tests run as root,
    who can read anything, so the permission answer is forced.)"""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("config.json")
                        and real_access(path, mode))
    with pytest.raises(StartupError, match=r"config\.json cannot be read by this user \(uid \d+\); make the "):
        check_checkpoint_folder(small_checkpoint_dir)


def test_a_folder_that_cannot_be_searched_is_named(small_checkpoint_dir, monkeypatch):
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(small_checkpoint_dir / "config.json"))
    monkeypatch.setattr(Path, "is_file", refuse)
    with pytest.raises(StartupError, match=r"config\.json cannot be read by this user"):
        check_checkpoint_folder(small_checkpoint_dir)


def plan(folder, value: str) -> int:
    return plan_kv_cache_blocks(folder, kv_cache_memory=value, dtype=None, device="cpu", block_size=16).num_blocks


@pytest.mark.parametrize("value, message", [
    ("99e12", "--kv-cache-memory 99e12: 99000.00 GB is more than the .* GB of host memory free"),
    ("100", "--kv-cache-memory 100: a KV cache of 100 bytes holds no block of 16 tokens"),
    ("1.5", "--kv-cache-memory 1.5: a KV cache of 1 byte holds no block of 16 tokens"),
    ("1B", "--kv-cache-memory 1B: '1B' is less than one KV block"),
    ("abc", "--kv-cache-memory abc: 'abc' is not a size"),
    ("-1", "--kv-cache-memory -1: '-1' is not a positive size"),
    ("0", "--kv-cache-memory 0: '0' is not a positive size"),
    ("1.5G", "--kv-cache-memory 1.5G: '1.5G' has an unknown unit 'G'"),
])
def test_kv_cache_budgets_that_cannot_work_name_the_flag_and_what_to_pass(small_checkpoint_dir, value, message):
    with pytest.raises(StartupError, match=message) as caught:
        plan(small_checkpoint_dir, value)
    assert "\n" not in str(caught.value)


def test_kv_cache_budgets_that_work(small_checkpoint_dir):
    per_block = 2 * 2 * 2 * 16 * 64 * 4  # tiny-tied-gqa2-d64 in float32: 2 layers, K and V, 2 heads of 64
    assert plan(small_checkpoint_dir, "1GiB") == (1 << 30) // per_block
    assert plan(small_checkpoint_dir, "1MB") == 10**6 // per_block
    assert plan(small_checkpoint_dir, "0.01") > 0


def test_gpu_without_one_names_the_flag(small_checkpoint_dir):
    from max.driver import accelerator_count

    if accelerator_count():
        pytest.skip("this machine has a GPU")
    with pytest.raises(StartupError, match="--device gpu: .*no GPU"):
        plan_kv_cache_blocks(small_checkpoint_dir, kv_cache_memory="1GiB", dtype=None, device="gpu", block_size=16)


def test_the_plan_resolves_the_dtype_from_the_checkpoint_and_the_weights_from_quantization(small_checkpoint_dir):
    from max.dtype import DType

    from mili.checkpoints import cached_checkpoint
    from mili.model.packed_linear import WeightFormat

    def planned(folder, **flags):
        return plan_kv_cache_blocks(folder, kv_cache_memory="0.1", device="cpu", block_size=16,
                                    **{"dtype": "auto", **flags})

    bf16_dir = cached_checkpoint("tiny-tied-gqa2-d64-bf16")  # config.json says bfloat16
    auto_f32, auto_bf16 = planned(small_checkpoint_dir), planned(bf16_dir)
    assert (auto_f32.spec.dtype, auto_f32.spec.weight_format) == (DType.float32, WeightFormat.DENSE)
    assert (auto_bf16.spec.dtype, auto_bf16.spec.weight_format) == (DType.bfloat16, WeightFormat.BF16)
    forced = planned(bf16_dir, dtype="float32")
    assert (forced.spec.dtype, forced.spec.weight_format) == (DType.float32, WeightFormat.DENSE)
    int8 = planned(bf16_dir, quantization="int8")
    assert (int8.spec.dtype, int8.spec.weight_format) == (DType.bfloat16, WeightFormat.INT8)


@pytest.mark.parametrize("flags, message", [
    ({"quantization": "fp8"}, "--quantization fp8: unsupported quantization 'fp8': choose none, int8 or int4"),
    ({"dtype": "float16"}, "--dtype float16: unsupported dtype 'float16': choose float32 or bfloat16"),
])
def test_a_bad_dtype_or_quantization_names_the_flag(small_checkpoint_dir, flags, message):
    with pytest.raises(StartupError, match=message):
        plan_kv_cache_blocks(small_checkpoint_dir, kv_cache_memory="1GiB", device="cpu", block_size=16,
                             **{"dtype": None, **flags})
