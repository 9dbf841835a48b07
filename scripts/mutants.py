#!/usr/bin/env python3
"""Mutation check: plant known bugs one at a time and make sure the tests named for each fail.

A test suite is only as good as the bugs it catches. Each mutant below is a small, plausible
bug written as an exact source replacement (file, old snippet, new snippet) plus the tests
that must fail with it. The script copies the working tree (tracked and untracked,
non-ignored files) to a temporary directory, checks that the named tests pass there
unmutated, then for each mutant patches one file, runs its tests with PYTHONPATH pointing at
the copy, and restores the file. A mutant is caught when pytest reports failing tests
(exit status 1); a collection error, a missing test or a timeout count as not caught.

    python scripts/mutants.py              # all mutants; exit status 1 if any survives
    python scripts/mutants.py --list       # names and the bug each plants
    python scripts/mutants.py --only seed_step_stuck --only preempted_requeued_at_back

A snippet that no longer occurs exactly once in its file (the code moved or changed) stops
the run with an error naming the mutant: re-target the snippet, do not delete the mutant.
Not part of the default test run (it runs the named tests 16 times); see CONTRIBUTING.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTEST_TIMEOUT_S = 600  # per test (pytest-timeout): a mutant that hangs fails its test
RUN_TIMEOUT_S = 1800  # per pytest process, a backstop


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # what goes wrong for users
    path: str  # file, relative to the repository root
    old: str  # exact snippet, must occur once
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail


GEN = "tests/entrypoints/test_generation_features.py"
TP_RANKS = "tests/worker/test_tensor_parallel_ranks.py"
MUTANTS = [
    # ---- the five bugs the suite once let through (issue #20)
    Mutant(
        "prefix_hash_without_chain", "a block is cached under its own tokens only: equal tokens at another "
        "position (or after another prefix) reuse K/V computed elsewhere",
        "nanovllm/engine/kv_cache_manager.py",
        "    return hash((parent_hash, token_ids))\n",
        "    return hash(token_ids)\n",
        ("tests/engine/test_kv_cache_manager.py::test_a_block_is_only_reused_at_the_position_it_was_computed_at",
         "tests/engine/test_engine_batching.py::test_repeated_blocks_at_other_positions_match_the_cache_off_run"),
    ),
    Mutant(
        "prompt_logprobs_shifted", "prompt logprobs score token p instead of p + 1 (the token each row predicts)",
        "nanovllm/worker/model_runner.py",
        "targets = torch.tensor([req.prompt_token_ids[p + 1] for p in positions]",
        "targets = torch.tensor([req.prompt_token_ids[p] for p in positions]",
        (f"{GEN}::test_prompt_logprobs_match_a_full_forward",),
    ),
    Mutant(
        "seed_step_stuck", "a seeded request draws the same noise at every step",
        "nanovllm/worker/sampling_batch.py",
        "seed_steps = tensor([num_output_tokens[i] & MASK32 for i in seeded], torch.int64)",
        "seed_steps = tensor([0 for i in seeded], torch.int64)",
        (f"{GEN}::test_seeded_draws_change_with_the_step",),
    ),
    Mutant(
        "preempted_requeued_at_back", "a preempted request loses its place to requests that arrived after it",
        "nanovllm/engine/scheduler.py",
        "        self.waiting.appendleft(req)\n",
        "        self.waiting.append(req)\n",
        ("tests/engine/test_scheduler.py::test_preempted_request_goes_back_to_the_front_of_the_queue",),
    ),
    Mutant(
        "stop_string_on_last_token_is_length", "a stop string completed by the max_tokens-th token reports "
        "finish_reason 'length'",
        "nanovllm/engine/llm_engine.py",
        "                else:\n                    req.status = RequestStatus.FINISHED_STOPPED\n",
        "                else:\n                    pass\n",
        (f"{GEN}::test_stop_string_completed_by_the_last_allowed_token",),
    ),
    # ---- ten more, one per area
    Mutant(
        "decode_tokens_not_charged", "running requests' tokens are not charged to the step's token budget",
        "nanovllm/engine/scheduler.py",
        "            budget -= num_new\n            if not is_decode:\n",
        "            if not is_decode:\n",
        ("tests/engine/test_scheduler.py::test_decode_requests_are_scheduled_before_new_prefills",),
    ),
    Mutant(
        "min_tokens_off_by_one", "EOS is ignored for one token more than min_tokens asks",
        "nanovllm/engine/scheduler.py",
        "        if req.num_output_tokens >= params.min_tokens:\n",
        "        if req.num_output_tokens > params.min_tokens:\n",
        ("tests/engine/test_scheduler.py::test_finish_on_eos_and_stop_token_and_min_tokens",),
    ),
    Mutant(
        "freed_blocks_evicted_head_first", "a freed request's first blocks are evicted before its last ones, "
        "so the prefix cache loses the shared prefixes first",
        "nanovllm/engine/kv_cache_manager.py",
        "        for b in reversed(blocks[dead:]):\n",
        "        for b in blocks[dead:]:\n",
        ("tests/engine/test_kv_cache_manager.py::test_eviction_order_is_least_recently_freed_tail_first",),
    ),
    Mutant(
        "repetition_penalty_divides_negatives", "the repetition penalty divides negative logits too, making "
        "seen tokens with negative logits more likely",
        "nanovllm/worker/sampler.py",
        "    rows = torch.where(rows > 0, rows / scale, rows * scale)\n",
        "    rows = rows / scale\n",
        ("tests/worker/test_sampler.py::test_penalties_follow_formulas",),
    ),
    Mutant(
        "seeded_noise_without_half_offset", "the seeded uniforms lose their +0.5 offset (u can be 0: infinite noise)",
        "nanovllm/kernels/counter_rng.py",
        "    uniform.add_(0.5).mul_(2.0**-UNIFORM_BITS)",
        "    uniform.mul_(2.0**-UNIFORM_BITS)",
        ("tests/kernels/test_sampling_kernel.py::test_uniform_bits_and_noise_match_seeded_exponential",),
    ),
    Mutant(
        "stop_string_searched_in_new_text_only", "a stop string that spans two tokens is missed",
        "nanovllm/engine/detokenizer.py",
        "            pos = self._text.find(stop, max(0, search_from - len(stop) + 1))\n",
        "            pos = self._text.find(stop, search_from)\n",
        ("tests/engine/test_detokenizer.py::test_stop_string_spanning_two_tokens_is_caught_and_trimmed",),
    ),
    Mutant(
        "sliding_window_one_key_too_many", "attention reference: the sliding window lets one key too many in",
        "nanovllm/kernels/reference.py",
        "            allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window\n",
        "            allowed &= k_pos[None, :] >= q_pos[:, None] - sliding_window\n",
        ("tests/layers/test_torch_attention.py::test_matches_reference",),
    ),
    Mutant(
        "rope_frequencies_without_stride", "RoPE frequencies use every exponent instead of every second one",
        "nanovllm/layers/rotary.py",
        "    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))\n",
        "    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim // 2, dtype=torch.float64) / rotary_dim))\n",
        ("tests/models/test_hf_parity.py::test_greedy_tokens_and_logprobs_match_hf[qwen3]",),
    ),
    Mutant(
        "staging_segments_unaligned", "the step's staging segments are packed without alignment (Triton's "
        "16-byte pointer specialisation breaks)",
        "nanovllm/worker/staging.py",
        "            offset += cdiv(nbytes, SEGMENT_ALIGN) * SEGMENT_ALIGN\n",
        "            offset += nbytes\n",
        ("tests/worker/test_staging.py::test_views_round_trip_with_their_shapes_and_dtypes",),
    ),
    Mutant(
        "streamed_choice_index_ignores_n", "a streamed completions request with several prompts and n > 1 "
        "numbers its choices prompt_index + completion_index (collisions)",
        "nanovllm/serve/completions.py",
        "                    index = i * req.n + c.index\n",
        "                    index = i + c.index\n",
        ("tests/serve/test_streaming.py::test_several_prompts_streamed_with_echo",),
    ),
    # ---- shared prefixes (issue #24)
    Mutant(
        "cascade_shares_the_current_tokens_block", "a cascade group shares the block that holds a member's "
        "current token (its own, just-written K/V would be read from another request's block)",
        "nanovllm/layers/attention/cascade.py",
        "    full = (seq_lens[decode_seqs] - 1) // block_size",
        "    full = seq_lens[decode_seqs] // block_size",
        ("tests/layers/test_cascade.py::test_current_token_block_is_never_shared",),
    ),
    Mutant(
        "cascade_merge_drops_the_suffix", "the CPU cascade path keeps only the shared prefix's attention",
        "nanovllm/layers/attention/torch_backend.py",
        "        out[rows], _ = reference.merge_attention_states(out[rows], lse[rows], o, l)\n",
        "        out[rows] = o.to(out.dtype)\n",
        ("tests/layers/test_cascade.py::test_cpu_cascade_decode_equals_paged_attention",),
    ),
    Mutant(
        "pending_token_hashed", "async scheduling: a block is cached under a hash of its known tokens while its "
        "last token is still in flight (that block and the request's later ones never hit)",
        "nanovllm/engine/kv_cache_manager.py",
        "min(min(req.num_computed_tokens, req.num_known_tokens) // self.block_size, len(blocks))",
        "min(req.num_computed_tokens // self.block_size, len(blocks))",
        ("tests/engine/test_prefix_cache_property.py::test_a_block_is_hashed_only_once_its_tokens_are_known",),
    ),
    Mutant(
        "prefill_cap_ignored_at_admission", "a newly admitted long prompt takes the whole budget while others "
        "decode (max_prefill_tokens_while_decoding only holds for running chunks)",
        "nanovllm/engine/scheduler.py",
        "            num_new = min(num_new, budget if prefill_left is None else min(budget, prefill_left))\n",
        "            num_new = min(num_new, budget)\n",
        ("tests/engine/test_chunked_prefill_policy.py::test_a_long_prompt_is_spread_over_steps_while_others_decode",),
    ),
    # ---- tensor parallelism
    Mutant(
        "tp_tokens_not_broadcast", "ranks > 0 never receive rank 0's sampled tokens: under async scheduling "
        "their next step embeds garbage token ids",
        "nanovllm/worker/model_runner.py",
        "                self.tp.broadcast_from_first(sampled)  # every rank feeds them to the next step\n",
        "                pass\n",
        (f"{TP_RANKS}::test_two_ranks_give_the_single_worker_results",),
    ),
    Mutant(
        "tp_embedding_unmasked", "a rank looks up the tokens of another rank's vocabulary rows too (its row 0): "
        "the all-reduce adds them in",
        "nanovllm/layers/linear.py",
        "        out.masked_fill_(outside.unsqueeze(-1), 0.0)\n",
        "",
        (f"{TP_RANKS}::test_two_ranks_give_the_single_worker_results",),
    ),
    Mutant(
        "tp_row_bias_on_every_rank", "every rank adds a row-parallel layer's bias: the all-reduce counts it N times",
        "nanovllm/layers/partition.py",
        "skip=self.rank != 0)",
        "skip=False)",
        (f"{TP_RANKS}::test_two_ranks_give_the_single_worker_results",),
    ),
    Mutant(
        "tp_workers_rerun_main", "spawned workers re-run the user's script: one without a __main__ guard starts "
        "an engine inside each worker, which dies",
        "nanovllm/worker/worker_procs.py",
        "        with _main_module_not_rerun():\n",
        "        if True:  # no hiding of __main__\n",
        ("tests/worker/test_tensor_parallel.py::test_ctrl_c_stops_the_engine_and_its_workers",),
    ),
    Mutant(
        "tp_moe_partial_sums", "MoE experts split over ranks return each rank's partial sum (no all-reduce)",
        "nanovllm/layers/moe.py",
        "        return self.tp.all_reduce(out)",
        "        return out",
        (f"{TP_RANKS}::test_two_ranks_give_the_single_worker_results",),
    ),
]


def copy_tree(dst: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored), uncommitted edits included."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--timeout={PYTEST_TIMEOUT_S}",
           *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def apply(tree: Path, m: Mutant) -> str:
    """Patch the copy; returns the original text. Raises if the snippet is not there exactly once."""
    path = tree / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant {m.name}: its snippet occurs {count} times in {m.path} (expected once): "
                         f"the code moved; re-target the mutant\n--- snippet ---\n{m.old}")
    path.write_text(text.replace(m.old, m.new))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutant (repeatable)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip checking that the named tests pass on the unmutated copy")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = ap.parse_args()

    if len({m.name for m in MUTANTS}) != len(MUTANTS):
        raise SystemExit("two mutants share a name")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:40s} {m.path}\n    {m.bug}")
        return 0
    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutant(s) {sorted(unknown)}; see --list")
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]

    tree = Path(tempfile.mkdtemp(prefix="nanovllm-mutants-"))
    start = time.monotonic()
    try:
        copy_tree(tree)
        for m in mutants:  # every snippet must apply before anything runs
            (tree / m.path).write_text(apply(tree, m))
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            rc, summary = run_tests(tree, tests)
            print(f"baseline (unmutated): {summary}", flush=True)
            if rc != 0:
                print("the named tests must pass on the unmutated tree first", file=sys.stderr)
                return 2
        survivors = []
        for m in mutants:
            original = apply(tree, m)
            t0 = time.monotonic()
            try:
                rc, summary = run_tests(tree, m.tests)
            finally:
                (tree / m.path).write_text(original)
            caught = rc == 1
            verdict = "caught" if caught else "SURVIVED"
            print(f"{verdict:9s} {m.name:40s} {time.monotonic() - t0:6.1f}s  {summary}", flush=True)
            if not caught:
                survivors.append(m.name)
        print(f"{len(mutants) - len(survivors)}/{len(mutants)} mutants caught in {time.monotonic() - start:.0f}s"
              + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
        return 1 if survivors else 0
    finally:
        if args.keep:
            print(f"copy kept at {tree}")
        else:
            shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
