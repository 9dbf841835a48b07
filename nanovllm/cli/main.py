"""`nanovllm` console script: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from nanovllm.cli.args import add_engine_args, add_sampling_args, engine_kwargs, sampling_params
from nanovllm.worker.executor import WorkerDiedError


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
    except WorkerDiedError as e:  # a tensor-parallel worker process ended (logged with its reason)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
