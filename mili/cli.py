"""The `mili` command line.

    mili info --model DIR_OR_GGUF         what a checkpoint folder or GGUF file holds, as MILI reads it
    mili checkpoint --preset NAME --out DIR   write a random-weight Qwen3 checkpoint (needs test extras)
    mili generate --prompt TEXT [--model DIR_GGUF_OR_HF_ID]   greedy generation for one prompt, streamed to stdout
    mili serve [--model DIR_GGUF_OR_HF_ID] ... the OpenAI-compatible server (see `mili serve --help`)

`generate` and `serve` without --model use the built-in demo model (random weights, real tokenizer).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mili.cli_environment import apply_environment_defaults

# the parser names vLLM users pass; each means MILI's one reader of Qwen3's format (mili/server/reasoning.py,
# mili/server/tool_calls.py)
REASONING_PARSERS = ("qwen3", "deepseek_r1")
TOOL_CALL_PARSERS = ("hermes", "qwen3")

log = logging.getLogger("mili")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _cmd_info(args: argparse.Namespace) -> int:
    from mili.model_source import ModelSource, ModelSourceError, is_gguf_path
    from mili.weights import checkpoint_files, expected_shapes

    path = Path(args.model)
    if not path.is_dir() and not is_gguf_path(path):
        raise SystemExit(f"mili info: --model {path} is neither a folder nor a .gguf file; pass a Hugging Face "
                         f"checkpoint folder or a GGUF file")
    try:
        source = ModelSource.open(path, args.tokenizer)
    except ModelSourceError as exc:
        raise SystemExit(f"mili info: {exc}") from None
    config = source.config
    params = sum(_product(shape) for shape in expected_shapes(config).values())
    print(f"{'GGUF model' if source.is_gguf else 'model folder':<15}{source.path}")
    attention_block = "q/k/v biases" if config.qkv_bias else "per-head q/k norm"
    print(f"architecture   {config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"intermediate {config.intermediate_size}, {attention_block}")
    print(f"attention      {config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads "
          f"(GQA x{config.gqa_group_size}), head_dim {config.head_dim}, RoPE theta {config.rope_theta:g}")
    print(f"vocabulary     {config.vocab_size} rows, embeddings {'tied' if config.tie_word_embeddings else 'untied'}")
    print(f"context        {config.max_position_embeddings} positions")
    if source.gguf is not None:
        from mili.gguf.weights import type_usage

        files = source.gguf.paths
        print(f"parameters     {params / 1e6:.1f} M in {len(files)} file(s), "
              f"{sum(f.stat().st_size for f in files) / 1e9:.2f} GB: {source.describe()}")
        for usage in type_usage(source.gguf):
            print(f"  {usage.type_name:<12} {usage.tensors:>4} tensors  {usage.weights / 1e6:>9.2f} M weights  "
                  f"{usage.nbytes / 1e6:>9.2f} MB  {8 * usage.nbytes / max(1, usage.weights):.2f} bits/weight")
    else:
        files = checkpoint_files(path)
        print(f"parameters     {params / 1e6:.1f} M, saved as {config.checkpoint_dtype or 'unstated dtype'} "
              f"in {len(files)} file(s), {sum(f.stat().st_size for f in files) / 1e9:.2f} GB")
    generation = source.generation_config()
    if generation.sampling_defaults:
        print(f"sampling       {generation.sampling_defaults}")
    tokenizer = source.tokenizer()
    origin = " (from the file)" if source.is_gguf else ""
    if source.tokenizer_dir is not None:
        origin = f" (from {source.tokenizer_dir})"
    print(f"tokenizer      {tokenizer.vocab_size} tokens{origin}, stop ids {sorted(tokenizer.eos_token_ids)}")
    specials = [tokenizer.id_to_token(i) for i in tokenizer.special_token_ids()]
    shown = ", ".join(specials[:12]) + (f", ... ({len(specials)} in all)" if len(specials) > 12 else "")
    print(f"special tokens {shown or 'none'}")
    return 0


def _product(shape: Sequence[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from mili.checkpoints import PRESETS, cached_checkpoint, missing_writer_modules, write_checkpoint

    # write_checkpoint imports torch and transformers only when it runs: check for them before anything starts.
    missing = missing_writer_modules()
    if missing:
        raise SystemExit(f"mili checkpoint needs the test extras ({', '.join(missing)} missing): "
                         f"pip install -e '.[test]' (or make install-test)")
    spec = PRESETS[args.preset]
    if args.out is None:
        path = cached_checkpoint(spec)
    else:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"mili checkpoint: --out {out} is not empty; choose a new folder")
        log.info("writing %s (random weights, %s) to %s", spec.name, spec.dtype, out)
        path = write_checkpoint(spec, out)
    print(path)
    return 0


GENERATE_BLOCK_SIZE = 16  # tokens per KV block; one prompt needs only a handful of blocks


def _cmd_generate(args: argparse.Namespace) -> int:
    from mili.engine.engine import Engine
    from mili.engine.sampling_params import SamplingParams
    from mili.server.startup import StartupError, open_model

    if args.max_tokens < 1:
        raise SystemExit(f"mili generate: --max-tokens must be at least 1, got {args.max_tokens}")
    speculative = _speculative_config(args, "generate")
    try:
        source, _ = open_model(args.model, args.tokenizer)
    except StartupError as exc:
        raise SystemExit(f"mili generate: {exc}") from None
    if args.model is None:
        log.info("no --model: generating with the built-in demo model (RANDOM weights: the text is gibberish)")
    tokenizer = source.tokenizer()
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], enable_thinking=False)
    ids = tokenizer.encode(text)
    if not ids:
        raise SystemExit("mili generate: --prompt is empty; give at least one token of text")
    try:
        engine = Engine.from_pretrained(source, dtype=args.dtype, device=args.device,
                                        quantization=args.quantization, float_activations=args.float_activations,
                                        block_size=GENERATE_BLOCK_SIZE,
                                        num_kv_blocks=-(-(len(ids) + args.max_tokens) // GENERATE_BLOCK_SIZE),
                                        speculative=speculative)
    except ValueError as exc:  # --device gpu without one, a draft model of another vocabulary, --quantization GGUF
        raise SystemExit(f"mili generate: {exc}") from None
    engine.add_request("generate", ids, SamplingParams.greedy(max_tokens=args.max_tokens))
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise SystemExit(f"mili generate: generation failed: {out.error}")
            for completion in out.outputs:  # one (n=1), or none in a step that only prefilled
                print(completion.delta, end="", flush=True)
    print(flush=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise SystemExit(f"mili serve: --port must be in 1..65535, got {args.port}")
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens",
                        args.max_num_batched_tokens), ("--block-size", args.block_size), ("--max-queue", args.max_queue)):
        if value < 1:
            raise SystemExit(f"mili serve: {flag} must be at least 1, got {value}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise SystemExit(f"mili serve: --max-model-len must be at least 2, got {args.max_model_len}")
    from mili.server.serve import ServeOptions, StartupError, serve

    if not args.shutdown_grace >= 0:
        raise SystemExit(f"mili serve: --shutdown-grace must be 0 or more seconds, got {args.shutdown_grace}")
    try:
        return serve(ServeOptions(
            model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
            quantization=args.quantization, float_activations=args.float_activations, tokenizer=args.tokenizer,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory=args.kv_cache_memory, block_size=args.block_size, prefix_cache=not args.no_prefix_cache,
            api_key=args.api_key, max_queue=args.max_queue, served_model_name=args.served_model_name,
            max_model_len=args.max_model_len, shutdown_grace_s=args.shutdown_grace,
            speculative=_speculative_config(args, "serve"), reasoning_parser=args.reasoning_parser,
            tool_call_parser=None if args.tool_call_parser == "none" else args.tool_call_parser))
    except StartupError as exc:
        raise SystemExit(f"mili serve: {exc}") from None


def _add_speculative_flags(parser: argparse.ArgumentParser) -> None:
    from mili.engine.speculative import DEFAULT_MAX_BATCH_SIZE, METHODS

    parser.add_argument("--speculative", choices=METHODS,
                        help="speculative decoding (default off): ngram guesses from earlier text of the prompt and "
                             "output (free; pays off when the output repeats its input), draft runs --draft-model")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                        help="most tokens guessed per sequence and step (default 4)")
    parser.add_argument("--draft-model", help="a smaller Qwen3 checkpoint folder with the same tokenizer "
                                              "(for --speculative draft)")
    parser.add_argument("--speculative-max-batch", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                        help=f"speculate only while at most N sequences run (default {DEFAULT_MAX_BATCH_SIZE}: "
                             f"bigger batches already share each weight read among their tokens)")


def _speculative_config(args: argparse.Namespace, command: str):
    """The SpeculativeConfig the flags ask for (None: off); a bad combination exits naming the flag."""
    from mili.engine.speculative import SpeculativeConfig

    if args.speculative is None:
        if args.draft_model is not None:
            raise SystemExit(f"mili {command}: --draft-model needs --speculative draft")
        return None
    if args.speculative == "draft" and args.draft_model is None:
        raise SystemExit(f"mili {command}: --speculative draft needs --draft-model FOLDER (a smaller Qwen3 with "
                         f"the same tokenizer), or use --speculative ngram")
    if args.speculative == "ngram" and args.draft_model is not None:
        raise SystemExit(f"mili {command}: --draft-model is for --speculative draft, not ngram")
    if not 1 <= args.num_speculative_tokens <= 16:
        raise SystemExit(f"mili {command}: --num-speculative-tokens must be in 1..16, got {args.num_speculative_tokens}")
    if args.speculative_max_batch < 1:
        raise SystemExit(f"mili {command}: --speculative-max-batch must be at least 1, got {args.speculative_max_batch}")
    return SpeculativeConfig(args.speculative, args.num_speculative_tokens, draft_model=args.draft_model,
                             max_batch_size=args.speculative_max_batch)


def _add_format_flags(parser: argparse.ArgumentParser) -> None:
    """--dtype and --quantization, the same for generate and serve."""
    from mili.dtypes import AUTO, DTYPE_CHOICES
    from mili.model.packed_linear import DEFAULT_GROUP_SIZE
    from mili.quantization import NONE, QUANTIZATIONS

    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO,
                        help="run dtype of activations and the KV cache (default auto: on CPU the checkpoint's own "
                        "dtype from config.json, float16 running as bfloat16 and float32 when it names none; "
                        "bfloat16 on GPU). On CPU bfloat16 weights are packed for MILI's linear op and read "
                        "half float32's bytes")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=NONE,
                        help="int8: the linear layers' weights as int8 with a float16 scale per output channel "
                        f"per {DEFAULT_GROUP_SIZE} inputs (~1.06 bytes a weight, vs 2 for bfloat16), activations "
                        "stay in --dtype; int4: 4-bit codes with a float16 scale and offset per channel per 32 "
                        "inputs (5.0 bits a weight), activations quantized to int8 per 32 inputs (see "
                        "--float-activations); default none: weights in the run dtype. A GGUF file runs the types "
                        "it stores and takes no --quantization")
    parser.add_argument("--float-activations", action="store_true",
                        help="4-bit weights (--quantization int4, a GGUF file's Q4_0 / Q4_1 / Q4_K tensors) meet "
                        "activations in --dtype, each weight decoded exactly (GGUF: as gguf-py dequantizes it), "
                        "instead of activations quantized to int8 per 32 inputs as llama.cpp does: exact, and "
                        "about as slow as int8 weights")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="a Hugging Face tokenizer folder to use instead of the model's own (a GGUF file "
                        "carries its tokenizer and chat template; this replaces them)")


def build_parser() -> argparse.ArgumentParser:
    from mili.checkpoints import PRESETS  # plain data; importing it needs no test extras

    parser = argparse.ArgumentParser(prog="mili", description="MILI: a serving engine for Qwen3 on MAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe a checkpoint folder or GGUF file as MILI reads it")
    info.add_argument("--model", required=True, help="a Hugging Face Qwen3/Qwen2 checkpoint folder (config.json, "
                      "*.safetensors, tokenizer.json) or a GGUF file (or a folder holding one)")
    info.add_argument("--tokenizer", metavar="DIR", help="a Hugging Face tokenizer folder replacing the model's own")
    info.set_defaults(run=_cmd_info)

    checkpoint = commands.add_parser("checkpoint", help="write a random-weight Qwen3 checkpoint for tests and "
                                     "benchmarks (needs: pip install -e '.[test]')")
    checkpoint.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-0.6b",
                            help="shape to write; qwen3-0.6b is Qwen3-0.6B's shape in bf16 (default)")
    checkpoint.add_argument("--out", help="folder to write into (default: the shared cache, "
                            "$MILI_CACHE_DIR/checkpoints, reused if already written)")
    checkpoint.set_defaults(run=_cmd_checkpoint)

    generate = commands.add_parser("generate", help="greedy generation for one prompt, streamed to stdout")
    generate.add_argument("--model", help="a Qwen3/Qwen2 checkpoint folder, a GGUF file or a Hugging Face repo id "
                          "(as for serve); "
                          "default: the built-in demo with RANDOM weights (gibberish text), as for serve")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    generate.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    _add_format_flags(generate)
    generate.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where to run (default cpu)")
    _add_speculative_flags(generate)
    generate.set_defaults(run=_cmd_generate)

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                description="Serves a Qwen3 model: /v1/completions, /v1/chat/completions, "
                                "/v1/models, /generate, /health, /status, /metrics. Every --flag can also be set "
                                "as the environment variable MILI_FLAG (--kv-cache-memory: MILI_KV_CACHE_MEMORY; "
                                "switches take 1/0); a flag on the command line wins.")
    serve.add_argument("--model", help="a Qwen3/Qwen2 checkpoint folder, a GGUF file (Q4_K_M, Q8_0, ...; or a folder "
                       "holding one) or a Hugging Face repo id (from the local HF cache, downloaded when online); "
                       "default: a small built-in demo with RANDOM weights")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine "
                       "only; 0.0.0.0 to accept other machines)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where the model runs (default cpu)")
    _add_format_flags(serve)
    serve.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step (default 64)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=512,
                       help="token budget of one step; longer prompts are prefilled in chunks (default 512)")
    serve.add_argument("--kv-cache-memory", default="1GiB",
                       help="KV cache size: bytes, with a unit or without (4GiB, 512MB, 2e9; KB/MB/GB count "
                       "1000s, KiB/MiB/GiB 1024s), or a plain number in (0, 1]: that fraction of the free memory "
                       "(of the GPU with --device gpu) once the weights are loaded; default 1GiB")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    serve.add_argument("--no-prefix-cache", action="store_true", help="turn off prefix caching")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* and /generate")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests in flight before new ones get 429 (default 256)")
    serve.add_argument("--max-model-len", type=int, help="context limit in tokens, prompt plus output "
                       "(default: the model's max_position_embeddings)")
    serve.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish before they are "
                       "ended with an error event (default 30)")
    serve.add_argument("--served-model-name", help="the model name clients use (default: the folder or repo id)")
    serve.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                       help="split Qwen3's <think> blocks into message.reasoning_content (as vLLM's --reasoning-parser "
                       "qwen3); also bounds thinking by a request's thinking_token_budget and applies structured "
                       "output after the block (default: off, think blocks stay in content)")
    serve.add_argument("--tool-call-parser", choices=(*TOOL_CALL_PARSERS, "none"), default="hermes",
                       help="read Qwen3's <tool_call> output into message.tool_calls (hermes and qwen3 both name "
                       "it; default hermes; none refuses requests with tools)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM command lines: tool_choice auto always works here")
    _add_speculative_flags(serve)
    apply_environment_defaults(serve)  # containers configure by environment: MILI_PORT, MILI_MODEL, ...
    serve.set_defaults(run=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from mili.config import ConfigError
    from mili.tokenizer import TokenizerError
    from mili.weights import CheckpointError

    try:
        return args.run(args)
    except (ConfigError, CheckpointError, TokenizerError) as exc:  # GGUFError is a ConfigError too
        print(f"mili {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
