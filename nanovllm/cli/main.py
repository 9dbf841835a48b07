"""`nanovllm` console script: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    if model_positional:
        p.add_argument("model", nargs="?", default=None,
                       help="model: HF directory, repo id in the local HF cache, or .gguf file "
                            "(default: the bundled SmolLM2-135M-Instruct)")
    else:
        p.add_argument("--model", "-m", default=None,
                       help="model: HF directory, repo id in the local HF cache, or .gguf file "
                            "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (auto: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion in tokens")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch (default 256)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory for weights + activations + KV cache (default 0.9)")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--allow-long-max-model-len", action="store_true",
                   help="accept a --max-model-len beyond the model's max_position_embeddings (untrained positions)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"device": args.device, "dtype": args.dtype, "enforce_eager": args.enforce_eager}
    if getattr(args, "allow_long_max_model_len", False):
        kwargs["allow_long_max_model_len"] = True
    for name in ("max_model_len", "max_num_seqs", "gpu_memory_utilization"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    return kwargs


def add_sampling_args(p: argparse.ArgumentParser, default_temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=default_temperature,
                   help=f"sampling temperature, 0 = greedy (default {default_temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the request, for reproducible sampling")


def sampling_params(args: argparse.Namespace):
    from nanovllm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="A small, readable, fast LLM inference engine.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete one prompt and print the completion",
                         description="Complete PROMPT with the model and print the completion.")
    gen.add_argument("prompt", help="the text to complete")
    add_engine_args(gen)
    add_sampling_args(gen, default_temperature=0.0)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal (streamed, keeps history)",
                          description="Interactive chat. Type a message and press Enter; /exit or Ctrl-D quits, "
                                      "/reset clears the history.")
    add_engine_args(chat)
    add_sampling_args(chat, default_temperature=0.0)
    chat.add_argument("--system", default=None, help="optional system prompt")
    chat.set_defaults(func=cmd_chat, max_tokens=256)

    try:
        from nanovllm.serve.cli import add_serve_parser

        add_serve_parser(sub)
    except ImportError:
        pass
    try:
        from nanovllm.bench.cli import add_bench_parser

        add_bench_parser(sub)
    except ImportError:
        pass
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from nanovllm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    params = sampling_params(args)
    if args.stream:
        for delta in llm.stream(args.prompt, params):
            print(delta, end="", flush=True)
        print()
    else:
        out = llm.generate([args.prompt], params, use_tqdm=False)[0]
        print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from nanovllm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    params = sampling_params(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("nanovllm chat: /exit or Ctrl-D to quit, /reset to clear the history.", flush=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        prompt = llm.apply_chat_template(history)
        reply = []
        try:
            for delta in llm.stream(prompt, params):
                reply.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:  # stop this answer, keep the session
            pass
        except ValueError as e:  # e.g. the history outgrew max_model_len
            print(f"\n[error] {e}", flush=True)
            history.pop()
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
