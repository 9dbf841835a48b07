"""`nanovllm` console script: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from nanovllm.cli.args import add_engine_args, add_sampling_args, engine_args, sampling_params
from nanovllm.worker.executor import WorkerDiedError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="A small, readable, fast LLM inference engine.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete one prompt and print the completion",
                         description="Complete PROMPT with the model and print the completion.")
    gen.add_argument("prompt", help="the text to complete")
    add_sampling_args(gen, default_temperature=0.0)
    add_engine_args(gen)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.set_defaults(func=cmd_generate, _parser=gen)

    chat = sub.add_parser("chat", help="interactive chat in the terminal (streamed, keeps history)",
                          description="Interactive chat. Type a message and press Enter; /exit or Ctrl-D quits, "
                                      "/reset clears the history.")
    add_sampling_args(chat, default_temperature=0.0)
    add_engine_args(chat)
    chat.add_argument("--system", default=None, help="optional system prompt")
    chat.set_defaults(func=cmd_chat, max_tokens=256, _parser=chat)

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

    llm = LLM(**engine_args(args).as_kwargs())
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

    llm = LLM(**engine_args(args).as_kwargs())
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
    args, unknown = parser.parse_known_args(argv)
    command_parser = getattr(args, "_parser", parser)
    if unknown:  # a mistyped flag: the subcommand's usage, and the nearest real flag
        command_parser.error(_unknown_flags_message(command_parser, unknown))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "_has_engine_args", False):  # bad values are refused before any model loads
            engine_args(args).create_engine_config()
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
    except (ValueError, TypeError) as e:
        command_parser.error(str(e))
    try:
        return args.func(args) or 0
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerDiedError as e:  # a tensor-parallel worker process ended (logged with its reason)
        print(f"error: {e}", file=sys.stderr)
        return 1


def _unknown_flags_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    import difflib

    known = [o for o in parser._option_string_actions if o.startswith("--")]
    hints = []
    for arg in unknown:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1)
            if close:
                hints.append(f"{arg.split('=', 1)[0]} -> did you mean {close[0]}?")
    message = f"unrecognized arguments: {' '.join(unknown)}"
    return message + (f" ({'; '.join(hints)})" if hints else "")


if __name__ == "__main__":
    sys.exit(main())
