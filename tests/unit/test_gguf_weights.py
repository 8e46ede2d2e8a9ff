"""A GGUF model's tensors as MILI packs them, against gguf-py's own dequantization, and the refusals of files and
flags MILI cannot run (each before anything is loaded or compiled).

The files are written like llama.cpp's converter writes them (tests/gguf_files.py): the "mixed" recipe stores
every supported type somewhere, with the fused q/k/v and gate/up made of different types.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize
from max.dtype import DType

from mili.checkpoints import qwen3_tokenizer_dir
from mili.cli import main
from mili.gguf.files import GGUFError, _Reader
from mili.gguf.weights import _Tensors, fused_layout, gguf_tensor_formats, pack_parts, tensor_layout
from mili.model.packed_linear import PackedShape, WeightFormat
from mili.model_source import ModelSource, ModelSourceError
from mili.quantization import describe_run
from mili.server.startup import StartupError, open_model, plan_kv_cache_blocks
from tests.gguf_files import cached_gguf, tiny_metadata, tiny_tensors, write_tiny
from tests.servers import free_port

MIXED_FILES = [("tiny-untied-gqa2-h256", "mixed"), ("tiny-qwen2-tied-gqa2-d64", "mixed")]


@pytest.fixture(scope="module", params=MIXED_FILES, ids=lambda case: ":".join(case))
def mixed(request) -> ModelSource:
    return ModelSource.open(cached_gguf(*request.param))


def test_every_packed_weight_holds_what_gguf_py_dequantizes(mixed: ModelSource):
    """Each graph weight (q/k/v and gate/up fused) packed in its layout holds, bit for bit, the concatenation of
    gguf.quants.dequantize of its tensors' blocks."""
    tensors = _Tensors(mixed.gguf, mixed.config)
    compared = 0
    for name, layout in gguf_tensor_formats(mixed.gguf, mixed.config):
        parts = tensors.parts(name)
        expected = np.concatenate([dequantize(np.asarray(p.data), p.tensor_type).reshape(
            int(p.shape[1]), int(p.shape[0])) for p in parts])
        packed = pack_parts(parts, layout)
        assert packed.shape == layout
        got = packed.dense()
        assert got.shape == expected.shape, name
        if layout.format is WeightFormat.INT4 and layout.offsets:
            # a Q4_0 part beside offsets holds (q + 8) * d + (-8 * d): gguf-py's q * d, but a zero lost its sign
            got, expected = got + 0.0, expected.astype(np.float32) + 0.0
        np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32),
                                      err_msg=f"{name} ({[p.tensor_type.name for p in parts]})")
        compared += got.size
    print(f"compared {compared} weights bit for bit")
    assert compared > 0.9 * sum(int(t.n_elements) for r in mixed.gguf.readers for t in r.tensors if len(t.shape) > 1)


def test_fused_parts_of_different_types_keep_their_own_layouts_or_share_a_lossless_one(mixed: ModelSource):
    formats = dict(gguf_tensor_formats(mixed.gguf, mixed.config))
    c = mixed.config
    three_k_quants = formats["layers.0.qkv_proj"]  # Q4_K + Q5_K + Q6_K: each its own (K is a whole 256 here)
    assert [(part.format, part.out_features) for part in three_k_quants.parts] == [
        (WeightFormat.INT4_K, c.q_size), (WeightFormat.INT8, c.kv_size), (WeightFormat.INT6, c.kv_size)]
    assert three_k_quants.format is WeightFormat.PARTS
    three_floats = formats["layers.1.qkv_proj"]  # F16 + BF16 + F32
    assert [part.format for part in three_floats.parts] == [WeightFormat.FLOAT16, WeightFormat.BF16,
                                                            WeightFormat.FLOAT32]
    assert formats["layers.1.gate_up_proj"].format is WeightFormat.BF16
    assert formats["layers.1.down_proj"].format is WeightFormat.FLOAT16
    q4 = formats["layers.0.gate_up_proj"]  # Q4_0 + Q4_1: 4-bit codes, float16 scales, offsets
    assert (q4.format, q4.group_size, q4.scale_dtype, q4.offsets) == (WeightFormat.INT4, 32, DType.float16, True)
    exact_formats = dict(gguf_tensor_formats(mixed.gguf, mixed.config, float_activations=True))
    exact = exact_formats["layers.0.gate_up_proj"]
    assert (exact.format, exact.group_size, exact.scale_dtype, exact.offsets) == (
        WeightFormat.INT8, 32, DType.float16, True)
    exact_k_quants = exact_formats["layers.0.qkv_proj"]  # all int8 with float activations: one joint layout
    assert (exact_k_quants.format, exact_k_quants.group_size, exact_k_quants.scale_dtype, exact_k_quants.offsets) == (
        WeightFormat.INT8, 16, DType.float32, True)


@pytest.mark.parametrize("types,expected", [
    ([T.Q8_0], PackedShape(WeightFormat.INT8, 8, 64, 32, DType.float16, False)),
    ([T.Q6_K, T.Q8_0], PackedShape(WeightFormat.INT8, 8, 64, 16, DType.float32, False)),
    ([T.Q5_1, T.Q5_0], PackedShape(WeightFormat.INT8, 8, 64, 32, DType.float16, True)),
    ([T.F16, T.F16], PackedShape(WeightFormat.FLOAT16, 8, 64)),
    ([T.F16, T.Q8_0], PackedShape(WeightFormat.FLOAT32, 8, 64)),
    ([T.BF16, T.F32], PackedShape(WeightFormat.FLOAT32, 8, 64)),
    ([T.Q4_0], PackedShape(WeightFormat.INT4, 8, 64, 32, DType.float16, False)),
    ([T.Q4_0, T.Q4_1], PackedShape(WeightFormat.INT4, 8, 64, 32, DType.float16, True)),
    ([T.Q4_K, T.Q4_K, T.Q4_0], PackedShape(WeightFormat.INT4, 8, 64, 32, DType.float32, True)),
    ([T.Q4_K, T.Q6_K], PackedShape(WeightFormat.INT8, 8, 64, 16, DType.float32, True)),
])
def test_layouts_of_type_mixes(types, expected):
    assert tensor_layout(types, 8, 64) == expected


def _int4_k(rows: int) -> PackedShape:
    return PackedShape(WeightFormat.INT4_K, rows, 256, 32, DType.float16, True)


@pytest.mark.parametrize("parts,expected", [
    # Q4_K_M's q/k/v: q and k join as Q4_K, v keeps Q6_K
    ([(T.Q4_K, 32), (T.Q4_K, 16), (T.Q6_K, 16)], PackedShape(WeightFormat.PARTS, 64, 256, parts=(
        _int4_k(48), PackedShape(WeightFormat.INT6, 16, 256, 16)))),
    ([(T.Q4_K, 32), (T.Q4_K, 16)], _int4_k(48)),
    # joining keeps each part's own format: one layout
    ([(T.Q4_0, 32), (T.Q4_1, 32)], PackedShape(WeightFormat.INT4, 64, 256, 32, DType.float16, True)),
    ([(T.Q5_1, 32), (T.Q5_0, 32)], PackedShape(WeightFormat.INT8, 64, 256, 32, DType.float16, True)),
    # a joint layout would widen a part: int8 codes for Q6_K, float32 for float16
    ([(T.Q8_0, 32), (T.Q6_K, 16)], PackedShape(WeightFormat.PARTS, 48, 256, parts=(
        PackedShape(WeightFormat.INT8, 32, 256, 32, DType.float16), PackedShape(WeightFormat.INT6, 16, 256, 16)))),
    ([(T.F16, 16), (T.BF16, 16), (T.F16, 16)], PackedShape(WeightFormat.PARTS, 48, 256, parts=(
        PackedShape(WeightFormat.FLOAT16, 16, 256), PackedShape(WeightFormat.BF16, 16, 256),
        PackedShape(WeightFormat.FLOAT16, 16, 256)))),
])
def test_layouts_of_fused_parts(parts, expected):
    assert fused_layout(parts, 256) == expected


def test_a_parts_layout_names_its_arrays_by_part_and_adds_up():
    layout = fused_layout([(T.Q4_K, 32), (T.Q6_K, 16)], 256)
    names = [suffix for suffix, _, _ in layout.arrays()]
    assert names == [".0.codes", ".0.scales", ".0.mins", ".0.block_scales", ".0.block_mins", ".1.codes", ".1.high",
                     ".1.scales", ".1.block_scales"]
    assert layout.nbytes() == sum(part.nbytes() for part in layout.parts)
    assert layout.leaves() == layout.parts and layout.parts[0].leaves() == (layout.parts[0],)
    with pytest.raises(ValueError, match="do not make"):
        PackedShape(WeightFormat.PARTS, 40, 256, parts=layout.parts)
    with pytest.raises(ValueError, match="parts go with"):
        PackedShape(WeightFormat.INT8, 48, 256, parts=layout.parts)


@pytest.mark.parametrize("types,expected", [
    ([T.Q4_0], PackedShape(WeightFormat.INT8, 8, 64, 32, DType.float16, False)),
    ([T.Q4_K], PackedShape(WeightFormat.INT8, 8, 64, 32, DType.float32, True)),
])
def test_float_activations_run_4_bit_types_in_the_int8_layout(types, expected):
    assert tensor_layout(types, 8, 64, float_activations=True) == expected


def test_a_tensor_type_mili_does_not_run_is_named_with_the_supported_ones(tmp_path):
    path = write_tiny(tmp_path / "iq.gguf", types={"blk.0.ffn_up.weight": T.IQ4_NL})
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.ffn_up.weight' is IQ4_NL, a type MILI does not run; "
                                        r"supported: BF16, F16, F32, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0"):
        ModelSource.open(path)


def test_a_tokenizer_with_more_tokens_than_embedding_rows_is_refused(tmp_path):
    path = write_tiny(tmp_path / "small.gguf")  # 16 embedding rows
    with pytest.raises(ModelSourceError, match=r"--tokenizer .*: its vocabulary has 151669 tokens but the model's "
                                               r"embedding has 16 rows"):
        ModelSource.open(path, tokenizer=qwen3_tokenizer_dir())


def test_a_tokenizer_folder_replaces_the_files_own(mixed: ModelSource):
    source = mixed.with_tokenizer(qwen3_tokenizer_dir())
    text = "Hello, 世界! <|im_start|>user\n"
    assert source.tokenizer().encode(text) == mixed.tokenizer().encode(text)
    assert source.tokenizer_dir == qwen3_tokenizer_dir()


def test_serve_refuses_a_bad_file_before_loading_anything(tmp_path, monkeypatch):
    from mili.server import serve as serve_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("the engine was built for a file that should have been refused")

    monkeypatch.setattr(serve_module.Engine, "from_pretrained", classmethod(must_not_load))
    path = write_tiny(tmp_path / "bad.gguf", tensors=tiny_tensors() | {"blk.0.ffn_up.weight": (96, 32)})
    with pytest.raises(SystemExit, match=r"^mili serve: --model .*bad.gguf: .*'blk.0.ffn_up.weight' is \[32, 96\]"):
        main(["serve", "--model", str(path), "--port", str(free_port())])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SystemExit, match=r"^mili serve: --model .*truncated.gguf: .*is not a readable GGUF file"):
        main(["serve", "--model", str(truncated), "--port", str(free_port())])


def test_quantization_is_refused_for_a_gguf_file(tmp_path):
    source, name = open_model(str(write_tiny(tmp_path / "m.gguf")))
    assert name == "m"
    with pytest.raises(StartupError, match=r"--quantization int8: m.gguf is a GGUF file, which runs in the types it "
                                           r"stores \(GGUF F32, 32.0 bits/weight\); drop --quantization"):
        plan_kv_cache_blocks(source, kv_cache_memory="16MiB", dtype=None, device="cpu", block_size=16,
                             quantization="int8")
    plan = plan_kv_cache_blocks(source, kv_cache_memory="16MiB", dtype=None, device="cpu", block_size=16)
    assert plan.spec.weight_format is WeightFormat.GGUF and plan.spec.dtype == DType.float32  # an all-F32 file
    assert describe_run(plan.spec) == (f"float32 activations, GGUF weights as stored, "
                                       f"{plan.spec.weight_bytes_per_token() / 1e9:.2f} GB read per token")


def test_info_lists_the_types_and_special_tokens(mixed: ModelSource, capsys):
    assert main(["info", "--model", str(mixed.path)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert f"GGUF model     {mixed.path}" in out
    assert "bits/weight" in out and "Q6_K" in out and "Q4_K" in out and "BF16" in out
    assert "tokenizer      151669 tokens (from the file)" in out
    assert "<|im_end|>" in out


def test_the_fast_metadata_reader_reads_what_gguf_py_reads(tmp_path, rng):
    """mili's reader reads arrays in one pass (Qwen's vocabulary: ~10 s -> ~1 s); every field and tensor it
    returns is what gguf-py's GGUFReader returns."""
    tokens = ["", "a", "ü", "世界", "<|im_end|>", " \n\t"] + [f"t{i}" for i in range(int(rng.integers(1, 50)))]
    metadata = tiny_metadata() | {"tokenizer.ggml.tokens": tokens,
                                  "test.ints": [int(i) for i in rng.integers(-9, 9, 7)], "test.empty": []}
    path = write_tiny(tmp_path / "m.gguf", metadata=metadata)
    ours, theirs = _Reader(path), GGUFReader(path)
    assert {k: f.contents() for k, f in ours.fields.items()} == {k: f.contents() for k, f in theirs.fields.items()}
    assert ours.fields["tokenizer.ggml.tokens"].contents() == metadata["tokenizer.ggml.tokens"]
    assert [(t.name, t.tensor_type, t.n_bytes, t.data_offset) for t in ours.tensors] == [
        (t.name, t.tensor_type, t.n_bytes, t.data_offset) for t in theirs.tensors]


def test_a_missing_model_is_named(tmp_path):
    with pytest.raises(ModelSourceError, match=r"missing.gguf does not exist: pass a checkpoint folder or a GGUF file"):
        ModelSource.open(tmp_path / "missing.gguf")
