#!/usr/bin/env bash
# The GPU issue's checks and benchmarks in one device call; logs and CSVs to $OUT.
#   bash benchmarks/gpu_suite.sh [warm] [tests] [testsrev] [kernels] [gemv] [gemvcfg] [bench] [tput] [ab] [sync] [nopdl] [base] [trace] [tp] [hostcost] [tp1mp] [tp2] [bench8b] [fp8] [hf] [serve] [serveperf] [soak] [nanscan] [profile] [moe] [prefix] [cascadeprof] [quant] [quanttput]
#                                [sweep] [fusion] [profsum] [ncu]
# The research-plan measurements (#25) in two device calls: `sweep` (<= 9.5 min), then `fusion profsum ncu`.
set -uo pipefail
DEST=${OUT:-/tmp/nanovllm-out}; OUT=/tmp/suite-logs; mkdir -p "$OUT" "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
steps=${*:-tests bench tput bench8b profile}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
nv="python3 -m nanovllm.cli.main"
# Every test file with GPU-marked tests, in file order: `tests` runs them in one process in this
# order, `testsrev` in the reverse order (no state may leak from one engine or test to the next).
gpu_test_files=${GPU_TEST_FILES:-"tests/gpu/test_gpu_engine.py $(grep -rlE 'mark\.gpu|kernel_params' tests --include='test_*.py' | grep -v '^tests/gpu/test_gpu_engine.py' | sort)"}
# serveperf: the serve workload (512 requests of 512/256 tokens, concurrency 64, qwen3-0.6b random weights)
serve_workload=${SERVEPERF_WORKLOAD:-"--num-prompts 512 --input-len 512 --output-len 256 --max-concurrency 64 --ignore-eos --temperature 0.6"}
serve_model=${SERVEPERF_MODEL:-benchmarks/configs/qwen3-0.6b}
serve_warmup=128  # requests of the warm-up run before each measured one (bench timeline --skip-first)
gpu_name() { nvidia-smi --query-gpu=name --format=csv,noheader | head -1; }
# wait_for_server PID LOG: until the server on port 8123 answers /health (at most 180 s); 1 at once if it exits
wait_for_server() {
  for i in $(seq 180); do
    curl -sf http://127.0.0.1:8123/health >/dev/null && return 0
    if ! kill -0 "$1" 2>/dev/null; then   # died while starting: say why instead of waiting out the loop
      echo "server exited before serving ($2):"; tail -3 "$2"; return 1
    fi
    sleep 1
  done
  return 1
}
# serve_and_bench DIR LABEL TAG [server flags...]: DIR's server under this tree's `bench serve` (warm-up, then the
# measured run appended to this tree's serve.csv); the server log goes to $OUT/server_TAG.log
serve_and_bench() {
  local dir=$1 label=$2 tag=$3; shift 3
  (cd "$dir" && PYTHONPATH=$PWD:/tmp/site exec setsid python3 -m nanovllm.cli.main serve "$serve_model" \
      --load-format dummy --skip-tokenizer-init --max-model-len ${SERVEPERF_MAX_MODEL_LEN:-2048} --port 8123 "$@") > "$OUT/server_$tag.log" 2>&1 &
  local pid=$!
  wait_for_server "$pid" "$OUT/server_$tag.log" || return 1
  timeout 60 $nv bench serve --base-url http://127.0.0.1:8123 --num-prompts $serve_warmup --max-concurrency 64 --input-len 512 \
      --output-len 16 --ignore-eos --seed 99 --no-save > /dev/null 2>&1   # warm-up: Triton JIT, allocator
  timeout 150 $nv bench serve --base-url http://127.0.0.1:8123 $serve_workload --label "$label, $(gpu_name)" 2>&1 \
      | tee "$OUT/serve_$tag.log" | grep -E "Output token throughput|(Median|P99) (TTFT|ITL)|Failed"
  kill -TERM "$pid"   # SIGTERM: graceful shutdown writes the request timeline
  for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null
}
for s in $steps; do
  echo "=================== $s (t=${SECONDS}s)"
  case $s in
    warm)    # fills Triton's compile and autotune caches in parallel (kernel tests only: engine tests would
             # share the GPU's memory), so that the single-process runs below time the tests, not the compiler
             timeout ${WARM_TIMEOUT:-200} python3 -m pytest -q -m gpu -n ${WARM_PROCS:-8} -p no:randomly -p no:cacheprovider \
                 $(printf '%s\n' $gpu_test_files | grep '^tests/kernels/') 2>&1 | tee "$OUT/gpu_warm.log" | tail -6 ;;
    tests)   # -v: one line per test id in the log; SIGINT at the limit: pytest still prints its failures
             timeout -s INT -k 30 ${TESTS_TIMEOUT:-420} python3 -m pytest -v -rfE --tb=short -m gpu --durations=15 -p no:randomly \
                 -p no:cacheprovider $gpu_test_files 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -25 ;;
    testsrev) timeout -s INT -k 30 ${TESTS_TIMEOUT:-420} python3 -m pytest -v -rfE --tb=short -m gpu --durations=15 -p no:randomly \
                 -p no:cacheprovider $(printf '%s\n' $gpu_test_files | tac) 2>&1 | tee "$OUT/gpu_tests_reversed.log" \
                 | grep -E "FAILED|ERROR|passed|failed" | tail -25 ;;
    kernels) timeout 300 python3 -m pytest -q -m gpu ${KERNEL_TESTS:-tests/kernels} -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log" | tail -8 ;;
    gemvcfg) timeout 300 python3 benchmarks/gemv_configs.py ${GEMVCFG_ARGS:-} 2>&1 | tee "$OUT/gemv_configs.log" | grep -v "^INFO" ;;
    gemv)    timeout 200 python3 benchmarks/kernels_bench.py --only gemv 2>&1 | tee "$OUT/gemv_bench.log" | tail -30 ;;
    bench)   timeout 120 $nv bench latency --model benchmarks/configs/qwen3-0.6b 2>&1 | tee "$OUT/latency.log" | tail -3
             NANOVLLM_STEP_TIMING=1 timeout 60 $nv bench latency --model benchmarks/configs/qwen3-0.6b --repeats 1 \
                 --csv /tmp/timed_latency.csv 2>&1 | tee "$OUT/latency_timed.log" | grep "step phases" ;;
    tput)    timeout 200 $nv bench throughput --model benchmarks/configs/qwen3-0.6b 2>&1 | tee "$OUT/throughput.log" | tail -4 ;;
    ab)      # same-commit A/B: batch-1 latency of $AB_MODELS under each environment in $AB_ENV (';'-separated
             # settings, e.g. "NANOVLLM_PDL=0;NANOVLLM_X=1"); CSV rows of setting i to $OUT/ab_latency_i.csv
             IFS=';' read -ra ab_envs <<< "${AB_ENV:?set AB_ENV}"
             for i in "${!ab_envs[@]}"; do
               for m in ${AB_MODELS:-qwen3-0.6b qwen3-8b}; do
                 echo "[${ab_envs[$i]}] $m: $(env ${ab_envs[$i]} timeout 150 $nv bench latency --model benchmarks/configs/$m \
                     --csv "$OUT/ab_latency_$i.csv" 2>&1 | tail -1)"
               done
             done 2>&1 | tee "$OUT/ab.log" ;;
    sync)    # same-run baseline: the synchronous engine loop (no overlap of host and GPU work)
             timeout 120 $nv bench latency --model benchmarks/configs/qwen3-0.6b --no-async-scheduling 2>&1 | tee "$OUT/latency_sync.log" | tail -3
             timeout 200 $nv bench throughput --model benchmarks/configs/qwen3-0.6b --no-async-scheduling 2>&1 | tee "$OUT/throughput_sync.log" | tail -4 ;;
    tp)      NANOVLLM_STEP_TIMING=1 timeout 150 $nv bench throughput --model benchmarks/configs/qwen3-0.6b 2>&1 | tee "$OUT/throughput_timed.log" | grep -v "^INFO" | tail -3 ;;
    hostcost) # host time per decode step (#26, #27): benchmarks/host_step_cost.py on this machine's CPU (the host
             # that feeds the GPU; a one-layer model on the CPU stands in for the device work; the carried .tok
             # tokenizer when present, else the bundled one), then the throughput workload with the engine's phase
             # timer and its per-step timeline (host gaps before GPU steps). ~6-8 min
             hc_tok=""; [ -d .tok ] && hc_tok="--tokenizer .tok"
             timeout 480 python3 benchmarks/host_step_cost.py --modes offline,stream $hc_tok 2>&1 \
                 | tee "$OUT/host_step_cost.log" | grep -v "^INFO"
             NANOVLLM_STEP_TIMING=1 timeout 200 $nv bench throughput --model benchmarks/configs/qwen3-0.6b --timeline 2>&1 \
                 | tee "$OUT/throughput_hostcost.log" | grep -v "^INFO" | tail -30 ;;
    tp1mp)   # tensor parallelism's executor at size 1 against the in-process one, same run: tokens (GPU test on
             # Qwen3-0.6B), then batch-1 latency and throughput with each backend; mp/uni ratios printed last
             [ "${TP1MP_TESTS:-1}" = 0 ] || timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider \
                 tests/gpu/test_gpu_tensor_parallel.py 2>&1 | tee "$OUT/tp1mp_tests.log" | tail -4
             for b in uni mp; do
               timeout 120 $nv bench latency --model benchmarks/configs/qwen3-0.6b --distributed-executor-backend $b \
                   --csv "$OUT/tp1mp_latency.csv" 2>&1 | tee -a "$OUT/tp1mp_bench.log" | tail -1
               timeout 200 $nv bench throughput --model benchmarks/configs/qwen3-0.6b --distributed-executor-backend $b \
                   --csv "$OUT/tp1mp_throughput.csv" 2>&1 | tee -a "$OUT/tp1mp_bench.log" | tail -1
             done
             python3 benchmarks/compare_executors.py "$OUT/tp1mp_latency.csv" "$OUT/tp1mp_throughput.csv" 2>&1 \
                 | tee -a "$OUT/tp1mp_bench.log" ;;
    tp2)     # needs nvidia-h200-x2: TP=2 tokens vs TP=1 (GPU tests), then latency / throughput at TP=1 and TP=2
             timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_gpu_tensor_parallel.py 2>&1 \
                 | tee "$OUT/tp2_tests.log" | tail -4
             for m in ${TP2_MODELS:-qwen3-0.6b qwen3-8b}; do
               for t in 1 2; do
                 timeout 200 $nv bench latency --model benchmarks/configs/$m -tp $t 2>&1 | tee -a "$OUT/tp2_bench.log" | tail -1
               done
             done
             for t in 1 2; do
               timeout 300 $nv bench throughput --model benchmarks/configs/qwen3-0.6b -tp $t 2>&1 | tee -a "$OUT/tp2_bench.log" | tail -1
             done ;;
    nopdl)   # same-run baseline: decode kernels launched without programmatic dependent launch
             NANOVLLM_PDL=0 timeout 120 $nv bench latency --model benchmarks/configs/qwen3-0.6b 2>&1 | tee "$OUT/latency_nopdl.log" | tail -3 ;;
    bench8b) timeout 150 $nv bench latency --model benchmarks/configs/qwen3-8b 2>&1 | tee "$OUT/latency8b.log" | tail -3 ;;
    fp8)     # issue #26: fp8 KV kernel tests + Qwen3-0.6B quality and sizing (-s prints the MAEs), then the
             # throughput workload once per setting in $FP8_TPUT (';'-separated bench flags) with --timeline
             timeout 300 python3 -m pytest -q -s -m gpu -p no:randomly -p no:cacheprovider tests/kernels/test_kv_fp8.py \
                 tests/gpu/test_kv_fp8_gpu.py 2>&1 | tee "$OUT/fp8_tests.log" | grep -E "KV:|passed|failed|Error"
             IFS=';' read -ra fp8_runs <<< "${FP8_TPUT:---kv-cache-dtype auto;--kv-cache-dtype fp8;--kv-cache-dtype fp8 --decode-split balanced}"
             for flags in "${fp8_runs[@]}"; do
               echo "--- bench throughput $flags --timeline"
               timeout 200 $nv bench throughput --model benchmarks/configs/qwen3-0.6b $flags --timeline 2>&1 | grep -v "^INFO" | tail -12
             done 2>&1 | tee "$OUT/fp8_throughput.log" ;;
    hf)      # HF transformers' continuous batching; the same-workload ratio of README needs the full workload next to
             # `tput` in one call: HF_SEQS=256 HF_TIMEOUT=330 bash benchmarks/gpu_suite.sh tput hf (~5 min on an H200)
             timeout ${HF_TIMEOUT:-150} $nv bench throughput --model benchmarks/configs/qwen3-0.6b --backend hf --num-seqs ${HF_SEQS:-64} 2>&1 | tee "$OUT/hf.log" | tail -4 ;;
    serve)   # needs the carried wheels in .whl (fastapi, uvicorn, pydantic are not in the device image)
             python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
             setsid python3 -m nanovllm.cli.main serve benchmarks/configs/qwen3-0.6b --load-format dummy --skip-tokenizer-init \
                 --max-model-len 2048 --port 8123 > "$OUT/server.log" 2>&1 &
             wait_for_server $! "$OUT/server.log"
             timeout 200 $nv bench serve --base-url http://127.0.0.1:8123 --num-prompts 512 --max-concurrency 64 \
                 --input-len 512 --output-len 256 --ignore-eos --temperature 0.6 --label "qwen3-0.6b random, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" 2>&1 | tee "$OUT/serve.log" | tail -20
             curl -s http://127.0.0.1:8123/metrics | grep -E "^nanovllm:(num_requests|kv_cache)" | tee -a "$OUT/serve.log"
             pkill -f "nanovllm.cli.main serve" ;;
    serveperf) # issue 27 in one call: this tree served (with its request timeline) next to the offline replay of
             # the same workload, the same with the prefill cap while decoding for each value in $SERVEPERF_CAPS (default
             # 512; empty = none), and the $BASE_DIR tree's server (41db9eb's, if carried) under the same client;
             # SERVEPERF_NOCOALESCE=1 adds this tree's server with --no-coalesce-outputs; SERVEPERF_ENGINE_PROCESS=1 adds it
             # with --engine-process (the engine in a process of its own; its timeline to timeline_engproc.csv/png)
             python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
             csv=$PWD/benchmarks/results/serve.csv
             serve_and_bench . "serveperf" tree --request-timeline "$OUT/timeline.csv"
             $nv bench timeline "$OUT/timeline.csv" --skip-first $serve_warmup --png benchmarks/results/serve_timeline.png \
                 --title "served TTFT by stage, $(gpu_name)" 2>&1 | tee "$OUT/timeline.log"
             timeout 150 $nv bench throughput --workload serve --model "$serve_model" --max-model-len ${SERVEPERF_MAX_MODEL_LEN:-2048} \
                 $serve_workload --csv "$csv" --label "serveperf offline replay, $(gpu_name)" 2>&1 | tee "$OUT/replay.log" \
                 | grep -E "Output token throughput|(Median|P99) (TTFT|ITL)|Failed"
             for cap in ${SERVEPERF_CAPS-512}; do
               serve_and_bench . "serveperf prefill cap $cap" "cap$cap" --max-prefill-tokens-while-decoding "$cap" \
                   --request-timeline "$OUT/timeline_cap$cap.csv"
               $nv bench timeline "$OUT/timeline_cap$cap.csv" --skip-first $serve_warmup --png "benchmarks/results/serve_timeline_cap$cap.png" \
                   --title "served TTFT by stage, prefill cap $cap, $(gpu_name)" 2>&1 | tee "$OUT/timeline_cap$cap.log"
               timeout 150 $nv bench throughput --workload serve --model "$serve_model" --max-model-len ${SERVEPERF_MAX_MODEL_LEN:-2048} \
                   --max-prefill-tokens-while-decoding "$cap" $serve_workload --csv "$csv" \
                   --label "serveperf offline replay prefill cap $cap, $(gpu_name)" 2>&1 | tee "$OUT/replay_cap$cap.log" \
                   | grep -E "Output token throughput|(Median|P99) (TTFT|ITL)|Failed"
             done
             if [ "${SERVEPERF_NOCOALESCE:-0}" = 1 ]; then   # A/B: every step's output its own chunk
               serve_and_bench . "serveperf no coalescing" nocoalesce --no-coalesce-outputs
             fi
             if [ "${SERVEPERF_ENGINE_PROCESS:-0}" = 1 ]; then   # A/B: the engine off the HTTP layer's GIL
               serve_and_bench . "serveperf engine process" engproc --engine-process \
                   --request-timeline "$OUT/timeline_engproc.csv"
               $nv bench timeline "$OUT/timeline_engproc.csv" --skip-first $serve_warmup \
                   --png benchmarks/results/serve_timeline_engproc.png \
                   --title "served TTFT by stage, engine process, $(gpu_name)" 2>&1 | tee "$OUT/timeline_engproc.log"
             fi
             if [ -d "${BASE_DIR:-.base}" ]; then
               NANOVLLM_COMMIT=${BASE_COMMIT:-base} serve_and_bench "${BASE_DIR:-.base}" "serveperf base server" base
             fi ;;
    soak)    # benchmarks/soak.py for $SOAK_MINUTES (default 5) on the GPU; needs the carried wheels as for serve
             # (plus aiohttp and matplotlib when the image lacks them); CSV, PNG, JSON and server log to $DEST/soak
             python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
             # a carried tokenizer (.tok: SmolLM2's, from the bundled GGUF, 3.4 MB) adds chat and structured
             # requests to the mix; without one the server runs on token ids only
             soak_tok="--skip-tokenizer-init"; [ -d .tok ] && soak_tok="--tokenizer .tok"
             timeout $(( ${SOAK_MINUTES:-5} * 60 + 240 )) python3 benchmarks/soak.py --minutes ${SOAK_MINUTES:-5} \
                 --concurrency ${SOAK_CONCURRENCY:-64} --max-output 256 --out-dir "$DEST/soak" --tag "soak_$(date +%F)_gpu" \
                 -- ${SOAK_SERVE_ARGS:-benchmarks/configs/qwen3-0.6b --load-format dummy $soak_tok --max-model-len 2048} \
                 2>&1 | tee "$OUT/soak.log" | tail -40 ;;
    nanscan) timeout 120 python3 benchmarks/nan_scan_cost.py 2>&1 | tee "$OUT/nan_scan.log" ;;
    base)    # same-run baseline: an earlier commit's tree carried in $BASE_DIR (git archive C | tar -x -C .base),
             # its rows go to this tree's CSVs under commit $BASE_COMMIT; BASE_TPUT=0 skips its throughput run
             csvdir=$PWD/benchmarks/results
             (cd "${BASE_DIR:-.base}" && export NANOVLLM_COMMIT=${BASE_COMMIT:-base} PYTHONPATH=$PWD &&
              for m in ${BASE_MODELS:-qwen3-0.6b qwen3-8b}; do
                timeout 150 python3 -m nanovllm.cli.main bench latency --model benchmarks/configs/$m --csv "$csvdir/latency.csv" 2>&1 | tail -1
              done
              if [ "${BASE_TPUT:-1}" != 0 ]; then
                timeout 200 python3 -m nanovllm.cli.main bench throughput --model benchmarks/configs/qwen3-0.6b \
                    --csv "$csvdir/throughput.csv" 2>&1 | tail -1
              fi) 2>&1 | tee "$OUT/base.log" ;;
    trace)   # batch-1 Chrome trace (kernel gaps, work outside the graph) and a PDL-off 8B breakdown
             timeout 90 python3 benchmarks/profile_decode.py --batch 1 --trace "$OUT/trace_b1.json" 2>&1 | grep -v "^INFO" | tail -19
             NANOVLLM_PDL=0 timeout 120 python3 benchmarks/profile_decode.py --model benchmarks/configs/qwen3-8b --batch 1 2>&1 | grep -v "^INFO" | tail -19 ;;
    moe)     # model families (#22): the GPU-marked MoE and Gemma kernel tests and every family's HF parity on
             # CUDA, the 30B-A3B-shaped MoE layer (Triton vs reference), batch-1 latency + throughput of a
             # ~1B-total random Qwen3-MoE (MOE_TESTS=0 / MOE_LAYER=0: benchmarks only / no layer benchmark)
             [ "${MOE_TESTS:-1}" = 0 ] || timeout 150 python3 -m pytest -q -m gpu -p no:randomly -p no:cacheprovider tests/kernels/test_fused_moe.py \
                 tests/kernels/test_gemma_kernels.py tests/models/test_model_families.py 2>&1 | tee "$OUT/moe_tests.log" | tail -5
             [ "${MOE_LAYER:-1}" = 0 ] || timeout 60 python3 benchmarks/moe_bench.py --tokens 1 16 256 4096 2>&1 | tee "$OUT/moe_layer.log"
             timeout 60 $nv bench latency --model benchmarks/configs/qwen3-moe-1b --output-len 256 2>&1 | tee "$OUT/moe_latency.log" | tail -2
             timeout 90 $nv bench throughput --model benchmarks/configs/qwen3-moe-1b --num-seqs 128 --max-model-len 2048 \
                 2>&1 | tee "$OUT/moe_throughput.log" | tail -3 ;;
    prefix)  # cascade attention (#24): its GPU tests (PREFIX_TESTS=0: none), then `bench prefix` at Qwen3-0.6B shapes
             [ "${PREFIX_TESTS:-1}" = 0 ] || timeout 120 python3 -m pytest -q -m gpu -p no:randomly -p no:cacheprovider tests/kernels/test_cascade_attention.py \
                 tests/gpu/test_cascade_gpu.py 2>&1 | tee "$OUT/prefix_tests.log" | tail -8
             timeout 270 $nv bench prefix --model benchmarks/configs/qwen3-0.6b 2>&1 | tee "$OUT/prefix.log" | grep -v "^INFO" | tail -12 ;;
    cascadeprof) # where a shared-prefix decode step's time goes (#24): bench prefix (a)'s batch with cascade vs caching
             # alone (wall vs GPU time per step, GPU idle before steps, host phases, top kernels), then (b)'s cached-prefix
             # request; again with PDL off for true kernel durations (~2-4 min in all)
             timeout 240 python3 benchmarks/profile_cascade.py --model benchmarks/configs/qwen3-0.6b 2>&1 \
                 | tee "$OUT/cascade_profile.log" | grep -v "^INFO"
             timeout 240 python3 benchmarks/profile_cascade.py --model benchmarks/configs/qwen3-0.6b --no-pdl 2>&1 \
                 | tee "$OUT/cascade_profile_nopdl.log" | grep -v "^INFO" ;;
    sweep)   # `bench sweep`: prompt 128..4096 at batch 1 and 16, batch 1..64 at prompt 512, fusion on and off, one
             # model at a time (each within its timeout; rows are appended per fusion setting, so a cut run keeps them).
             # SWEEP_MODELS narrows it (e.g. SWEEP_MODELS=qwen3-0.6b), SWEEP_ARGS adds flags (e.g. --output-len 64)
             for m in ${SWEEP_MODELS:-qwen3-0.6b qwen3-8b}; do
               [ $m = qwen3-8b ] && t=${SWEEP_TIMEOUT_8B:-320} || t=${SWEEP_TIMEOUT:-240}
               timeout $t $nv bench sweep --models $m ${SWEEP_ARGS:-} 2>&1 | grep -v "^INFO"
             done 2>&1 | tee "$OUT/sweep.log" ;;
    fusion)  # `bench fusion`: the fused RMSNorm + skinny GEMM vs Triton RMSNorm + cuBLAS per decode shape, M = 1..64
             timeout ${FUSION_TIMEOUT:-240} $nv bench fusion ${FUSION_ARGS:-} 2>&1 | grep -v "^INFO" | tee "$OUT/fusion.log" | tail -16 ;;
    profsum) # kernel classes per decode step, batch 1 and 64, fusion on and off, both models (CSV + Markdown table)
             timeout ${PROFSUM_TIMEOUT:-300} python3 benchmarks/profile_summary.py ${PROFSUM_ARGS:-} 2>&1 | grep -v "^INFO" \
                 | tee "$OUT/profile_summary.log" | tail -12
             cp benchmarks/results/profile_summary.md "$OUT/" 2>/dev/null ;;
    ncu)     # Nsight Compute on the fused kernel alone (DRAM throughput, warps active): needs ncu and counter access
             if command -v ncu >/dev/null; then
               timeout 120 $(python3 benchmarks/profile_summary.py --ncu) 2>&1 | tee "$OUT/ncu.log" | tail -20
             else echo "ncu not installed: skipped" | tee "$OUT/ncu.log"; fi ;;
    quant)   # quantization (#23): its GPU tests, the kernels per Qwen3-8B projection at M = 1, then batch-1 decode of
             # Qwen3-8B in bf16 / int8 / fp8 / int4 (QUANTS; QUANT_TESTS=0: no tests) and the nano-vLLM workload with fp8 weights vs bf16
             [ "${QUANT_TESTS:-1}" = 0 ] || timeout 240 python3 -m pytest -q -m gpu -p no:randomly -p no:cacheprovider tests/gpu/test_gpu_quantization.py \
                 tests/kernels/test_quant_gemv.py tests/kernels/test_quant_formats.py 2>&1 | tee "$OUT/quant_tests.log" | tail -8
             timeout 120 python3 benchmarks/quant_kernels_bench.py --rows 1 2>&1 | tee "$OUT/quant_kernels.log" | tail -14
             for q in ${QUANTS:-none int8 fp8 int4}; do
               timeout 150 $nv bench latency --model benchmarks/configs/qwen3-8b --repeats ${QUANT_REPEATS:-1} \
                   $([ "$q" = none ] || echo --quantization "$q") 2>&1 | tee "$OUT/latency8b_$q.log" | grep -v "^INFO" | tail -2
             done ;;
    quanttput) for q in none fp8; do
               timeout 200 $nv bench throughput --model benchmarks/configs/qwen3-0.6b $([ "$q" = none ] || echo --quantization "$q") \
                   2>&1 | tee "$OUT/throughput_$q.log" | tail -2
             done ;;
    profile) for b in ${PROFILE_BATCHES:-1 64 256}; do timeout 90 python3 benchmarks/profile_decode.py --batch $b 2>&1 | grep -v "^INFO" | tail -19; done 2>&1 | tee "$OUT/profile.log" ;;
  esac
  # after every step, one archive (a call returns few files): a call cut off by its limit still returns them
  cp benchmarks/results/*.csv benchmarks/results/*.png "$OUT/" 2>/dev/null
  tar czf "$DEST/suite.tgz" -C "$OUT" .
done
echo "results in suite.tgz"
