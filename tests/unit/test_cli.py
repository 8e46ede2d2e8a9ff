"""The `mili` command line: info on a checkpoint, clear errors naming the flag, found before any compile."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mili.checkpoints import cached_checkpoint
from mili.cli import main

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_info_describes_a_checkpoint(small_checkpoint_dir, capsys):
    assert main(["info", "--model", str(small_checkpoint_dir)]) == 0
    out = capsys.readouterr().out
    assert "qwen3: 2 layers, hidden 96, intermediate 160, per-head q/k norm" in out
    assert "4 query heads, 2 KV heads (GQA x2), head_dim 64" in out
    assert "embeddings tied" in out
    assert "151669 tokens, stop ids [151643, 151645]" in out


def test_info_describes_a_qwen2_checkpoint(capsys):
    assert main(["info", "--model", str(cached_checkpoint("tiny-qwen2-tied-gqa2-d64"))]) == 0
    out = capsys.readouterr().out
    assert "qwen2: 2 layers, hidden 256, intermediate 320, q/k/v biases" in out
    assert "4 query heads, 2 KV heads (GQA x2), head_dim 64" in out


def test_info_on_a_folder_without_config_names_the_file(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path)]) == 1
    assert "config.json not found" in capsys.readouterr().err


def test_info_on_a_missing_folder_names_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--model .* is neither a folder nor a .gguf file"):
        main(["info", "--model", str(tmp_path / "nope")])


def test_checkpoint_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit, match="--out .* is not empty"):
        main(["checkpoint", "--preset", "tiny-tied-gqa2-d64", "--out", str(tmp_path)])


def test_checkpoint_writes_a_loadable_folder(tmp_path, capsys):
    from mili.config import ModelConfig

    out = tmp_path / "ckpt"
    assert main(["checkpoint", "--preset", "tiny-tied-gqa2-d64", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert ModelConfig.from_pretrained(out).num_hidden_layers == 2


def test_checkpoint_without_the_test_extras_says_so(tmp_path, monkeypatch):
    # write_checkpoint imports torch only when it runs, below the import guard: simulate it missing.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit, match=r"mili checkpoint needs the test extras \(torch missing\): pip install"):
        main(["checkpoint", "--preset", "tiny-tied-gqa2-d64", "--out", str(tmp_path / "ckpt")])
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port must be in 1..65535"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
    (["--kv-cache-memory", "-1"], "--kv-cache-memory -1: '-1' is not a positive size"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory lots: 'lots' is not a size; pass bytes"),
    (["--kv-cache-memory", "99e12"], "--kv-cache-memory 99e12: .* is more than the .* of host memory free"),
    (["--kv-cache-memory", "100"], "--kv-cache-memory 100: a KV cache of 100 bytes holds no block"),
    (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
    (["--model", "nobody/no-such-model-xyz"], "not in the local Hugging Face cache.*hf download nobody/"),
])
def test_serve_flag_errors_name_the_flag(argv, message, monkeypatch, tmp_path, small_checkpoint_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    if "--model" not in argv:
        argv = [*argv, "--model", str(small_checkpoint_dir)]
    with pytest.raises(SystemExit, match=message) as caught:
        main(["serve", "--port", str(free_port()), *argv])
    assert "\n" not in str(caught.value)


def test_serve_on_a_busy_port_fails_at_once_naming_the_flag(small_checkpoint_dir):
    """Before: uvicorn's bind error was logged, the model compiled anyway (a minute), and the exit status was 0."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "mili.cli", "serve", "--model", str(small_checkpoint_dir),
                                 "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in result.stderr
    assert "compiling" not in result.stderr and time.monotonic() - started < 30


def test_unknown_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["checkpoint", "--preset", "qwen3-235b"])
    assert "invalid choice: 'qwen3-235b'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve"], ["generate", "--prompt", "Hi"]])
def test_dtype_and_quantization_flags_parse_with_their_defaults(command):
    from mili.cli import build_parser

    defaults = build_parser().parse_args(command)
    assert (defaults.dtype, defaults.quantization) == ("auto", "none")
    chosen = build_parser().parse_args([*command, "--dtype", "bfloat16", "--quantization", "int8"])
    assert (chosen.dtype, chosen.quantization) == ("bfloat16", "int8")


@pytest.mark.parametrize("flag, value, choices", [("--quantization", "fp8", "'none', 'int8', 'int4'"),
                                                  ("--dtype", "float16", "'auto', 'float32', 'bfloat16'")])
@pytest.mark.parametrize("command", [["serve"], ["generate", "--prompt", "Hi"]])
def test_a_bad_dtype_or_quantization_is_an_argparse_error_naming_the_flag(command, flag, value, choices, capsys):
    with pytest.raises(SystemExit):
        main([*command, flag, value])
    assert f"argument {flag}: invalid choice: '{value}' (choose from {choices})" in capsys.readouterr().err


def test_serve_and_generate_pass_the_flags_on(small_checkpoint_dir, monkeypatch):
    import mili.engine.engine
    import mili.server.serve

    seen: list[dict] = []

    def fake_serve(options) -> int:
        seen.append({"dtype": options.dtype, "quantization": options.quantization})
        return 0

    def fake_engine(cls, model_dir, **kwargs):
        seen.append({"dtype": kwargs["dtype"], "quantization": kwargs["quantization"]})
        raise ValueError("stopped before the compile")

    monkeypatch.setattr(mili.server.serve, "serve", fake_serve)
    monkeypatch.setattr(mili.engine.engine.Engine, "from_pretrained", classmethod(fake_engine))
    assert main(["serve", "--port", str(free_port()), "--quantization", "int8"]) == 0
    with pytest.raises(SystemExit, match="mili generate: stopped before the compile"):
        main(["generate", "--model", str(small_checkpoint_dir), "--prompt", "Hi", "--dtype", "float32",
              "--quantization", "int8"])
    assert seen == [{"dtype": "auto", "quantization": "int8"}, {"dtype": "float32", "quantization": "int8"}]


@pytest.mark.parametrize("argv, message", [
    (["--speculative", "draft"], "--speculative draft needs --draft-model FOLDER"),
    (["--draft-model", "/tmp"], "--draft-model needs --speculative draft"),
    (["--speculative", "ngram", "--draft-model", "/tmp"], "--draft-model is for --speculative draft, not ngram"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens must be in 1..16"),
    (["--speculative", "ngram", "--speculative-max-batch", "0"], "--speculative-max-batch must be at least 1"),
])
@pytest.mark.parametrize("command", ["serve", "generate"])
def test_speculative_flag_errors_name_the_flag(command, argv, message, small_checkpoint_dir):
    extra = ["--port", str(free_port())] if command == "serve" else ["--prompt", "Hi"]
    with pytest.raises(SystemExit, match=f"mili {command}: {message}"):
        main([command, "--model", str(small_checkpoint_dir), *extra, *argv])


def test_a_draft_model_of_another_vocabulary_is_refused_before_the_compile(small_checkpoint_dir, tmp_path):
    import json
    import shutil

    draft = tmp_path / "draft"
    shutil.copytree(small_checkpoint_dir, draft)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps(config | {"vocab_size": 152064}))  # Qwen2.5's
    with pytest.raises(SystemExit, match="--draft-model .*: its vocabulary has 152064 tokens, the model's 151936"):
        main(["serve", "--model", str(small_checkpoint_dir), "--port", str(free_port()), "--speculative", "draft",
              "--draft-model", str(draft)])


def test_serve_passes_the_speculative_settings_on(small_checkpoint_dir, monkeypatch):
    import mili.server.serve
    from mili.engine.speculative import SpeculativeConfig

    seen = []
    monkeypatch.setattr(mili.server.serve, "serve", lambda options: seen.append(options.speculative) or 0)
    assert main(["serve", "--port", str(free_port()), "--speculative", "ngram", "--num-speculative-tokens", "6",
                 "--speculative-max-batch", "2"]) == 0
    assert main(["serve", "--port", str(free_port())]) == 0
    assert seen == [SpeculativeConfig("ngram", 6, max_batch_size=2), None]
