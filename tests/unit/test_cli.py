"""The `mili` command line: info on a checkpoint, clear errors naming the flag."""

from __future__ import annotations

import pytest

from mili.cli import main


def test_info_describes_a_checkpoint(small_checkpoint_dir, capsys):
    assert main(["info", "--model", str(small_checkpoint_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 layers, hidden 96" in out
    assert "4 query heads, 2 KV heads (GQA x2), head_dim 64" in out
    assert "embeddings tied" in out
    assert "151669 tokens, stop ids [151643, 151645]" in out


def test_info_on_a_folder_without_config_names_the_file(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path)]) == 1
    assert "config.json not found" in capsys.readouterr().err


def test_info_on_a_missing_folder_names_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--model .* is not a folder"):
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


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "0"], "--port must be in 1..65535"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
    (["serve", "--kv-cache-memory", "-1"], "--kv-cache-memory must be positive"),
    (["serve", "--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
    (["serve", "--model", "nobody/no-such-model-xyz"], "not in the local Hugging Face cache"),
])
def test_serve_flag_errors_name_the_flag(argv, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_unknown_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["checkpoint", "--preset", "qwen3-235b"])
    assert "invalid choice: 'qwen3-235b'" in capsys.readouterr().err
