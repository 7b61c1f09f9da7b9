#!/usr/bin/env bash
# The GPU checks and benchmarks of the engines and the service, in parts that each fit a 10-minute call
# on one H100 (run from the repository root; results and logs under $OUT, default bench/results/run).
#
#   bash bench/gpu_suite.sh tests     # CUDA tests of kernels, engines and the KV hand-off        (~3 min)
#   bash bench/gpu_suite.sh decode    # decode steps (graphs, overlap, eager, HF) + step profiles at batch 1/8/64 (~7 min)
#   bash bench/gpu_suite.sh handoff   # 8K prompt TTFT per hand-off path vs chain-1 compute         (~3 min)
#   bash bench/gpu_suite.sh prefill   # chain-1 vs full prefill, 2K-32K and 128K chunked, vs HF     (~6 min)
#   bash bench/gpu_suite.sh serve     # goodput: colocated baseline, colm, colm with prefill graphs  (~9 min)
#   bash bench/gpu_suite.sh sweeps    # few-row chain Linear configs (1 and 8 rows, cold weights) and the
#                                     # in-graph paged-attention split sweep                        (~6 min)
#   bash bench/gpu_suite.sh train     # training tokens/s of the 1B shape: dense, CoLM, Air; autocast with eager and
#                                     # compiled elementwise ops, and the whole step graphed; one process, each with
#                                     # one profiled step (bench/train_throughput.py --profile; PRECISIONS=... picks
#                                     # others: autocast-ref, fsdp-bf16) (~6 min)
#   bash bench/gpu_suite.sh compare MODEL   # train and score one model of bench/train_compare.py (a lent machine
#                                     # starts bare: one model per call; join the reports with --merge) (<10 min)
#   bash bench/gpu_suite.sh compare-all  # all four models in one call: the slowest model's seconds per step measured
#                                     # first, then every model trains the step count that fits PER_MODEL_S (default
#                                     # 95 s) with the same recipe, scored and merged; then chain-1 self-speculative
#                                     # decoding of the trained Air {16,16} (SOURCES: a packed stdlib), all within
#                                     # TOTAL_S, each model's report returned as soon as it exists (<10 min)
#   bash bench/gpu_suite.sh spec      # speculative decoding of the bundled demo, the gathered and the paged
#                                     # verify side by side, and the CUDA tests of rounds and graphs (~3 min)
#   bash bench/gpu_suite.sh prefix    # prefix caching: the colocated engine without and with it, 1B Air, 160
#                                     # clients, prompts opening with one of 8 shared 1024-token prefixes (~6 min)
#   bash bench/gpu_suite.sh sampling  # picking tokens on the host path (sampled, penalties, top log-probs, structured
#                                     # output; needs xgrammar in $WHEELS for the last) against device greedy at a
#                                     # 128k vocabulary, the CUDA tests of sampled steps, and the colocated engine
#                                     # under greedy and sampled traffic (~9 min)
#   bash bench/gpu_suite.sh independent  # colm's colocated engine serving the Air model, the same engine serving
#                                     # the dense Llama of its full-scale shape, and an engine colm did not write
#                                     # (transformers' continuous batching, the same dense Llama), through one
#                                     # harness, 64 clients, prompts 512-2048, outputs 32-96 (~9 min; the JSON is
#                                     # written after each mode)
#   bash bench/gpu_suite.sh gc        # colm serve on Ray (needs Ray in $WHEELS), 1B Air, 160 clients, started with
#                                     # the start-up heap unfrozen, then frozen: garbage-collector pauses per
#                                     # process and the load's figures side by side (bench/gc_pauses.py) (~7 min)
#   bash bench/gpu_suite.sh ray       # colm serve on Ray (needs Ray in $WHEELS or installed), 1B Air, 160
#                                     # clients, full scale then the budget mix (bench/serve_ray.py)    (~5 min)
#   bash bench/gpu_suite.sh ray-ab    # the same service started SERVICES times (default 4), alternating the
#                                     # --set options in $RAY_A and $RAY_B (A B A B ...), one full-scale pass each,
#                                     # then one line per service (~100 s per service); e.g.
#                                     # RAY_A="--set decode.tpot_target_ms=0" compares with the fixed budget
#
# Where the colm package is not installed (e.g. an image without our dependencies), the script maps the
# top-level folders into colm/ the way the editable install does and puts $PWD on PYTHONPATH. Extra
# wheels (grpcio, protobuf, crc32c) may be given in $WHEELS (a folder); they are installed to /tmp/site.
set -uo pipefail
parts="tests|decode|handoff|prefill|serve|sweeps|train|compare|compare-all|spec|prefix|sampling|independent|gc|ray|ray-ab"
part=${1:?usage: bench/gpu_suite.sh $parts (compare takes a MODEL)}
if [[ "|$parts|" != *"|$part|"* ]]; then
  echo "unknown part $part: $parts (compare takes a MODEL)" >&2
  exit 2
fi
OUT=${OUT:-bench/results/run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! (cd / && python -c "import colm.decode_worker" 2>/dev/null); then  # as scripts see it (cwd not on path)
  for d in kernels prefill_worker decode_worker proto router deploy; do ln -sfn ../$d colm/$d; done
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -n "${WHEELS:-}" ]; then
  python -m pip install -q --no-deps --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -1
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
case "$part" in
  tests)
    COLM_KERNEL_TUNE=0 timeout 400 python -m pytest -q -p no:cacheprovider -k "not interpreter" \
      tests/test_engine_gpu.py tests/test_kv_ipc_gpu.py tests/test_kv_ipc.py tests/test_kv_pool.py tests/test_kernels_chain_linear.py tests/test_kernels_fused_linear.py \
      tests/test_kernels_norm_rope.py tests/test_kernels_swiglu.py tests/test_kernels_paged_attention.py \
      tests/test_kernels_greedy_head.py tests/test_prefill_graphs.py tests/test_kv_ready_event.py tests/test_graphed_forward.py tests/test_train_graphed.py tests/test_kernels_compiled.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
  decode)
    timeout 300 python bench/engines.py --out "$OUT" --sections decode 2>&1 | grep -v Warn | tail -60
    for b in 1 8 64; do  # bench/decode_profile.py's variants side by side, against the weight-read floor
      timeout 100 python bench/decode_profile.py --batch $b --out "$OUT/decode_profile_b$b.json" 2>&1 | grep -v Warn \
        | grep -E "^(floor|fused|unfused|wrote)"
    done ;;
  handoff)
    timeout 480 python bench/engines.py --out "$OUT" --sections handoff 2>&1 | grep -v Warn | tail -40
    # the hand-off's first full-scale step (1.65 ms after admission at 8K, 0.87 ms graphed at 2K): the batch-1 step
    # at 8K alone, its kernels and its floor
    if (( SECONDS < 480 )); then
      timeout $(( 585 - SECONDS )) python bench/decode_profile.py --batch 1 --context 8192 --variants fused_pdl \
        --out "$OUT/decode_profile_b1_ctx8192.json" 2>&1 | grep -v Warn | grep -E "^(floor|fused|unfused|wrote)"
    fi ;;
  prefill)
    timeout 560 python bench/engines.py --out "$OUT" --sections prefill 2>&1 | grep -v Warn | tail -40 ;;
  serve)
    # decode graphs of every batch size and width captured at start in every mode (--warmup-context: the
    # longest prompt + output), as deploy/serve.yaml does; without it colm stalled ~11 s at 16 req/s (docs/results.md)
    timeout 580 python bench/serve_goodput.py --rates 2,4,8,16 --slo-scale 2 --num-requests 320 --warmup-context 2200 \
      --modes baseline,colm,colm-graphs --out "$OUT/serve_goodput" 2>&1 | grep -v Warn | grep -v retrying | tail -40
    for f in "$OUT"/serve_goodput_*.log; do [ -s "$f" ] && { echo "== $f"; tail -20 "$f"; }; done ;;
  train)
    timeout 560 python bench/train_throughput.py --profile --precisions "${PRECISIONS:-autocast,autocast-compile,autocast-graph}" \
      --out "$OUT/train_throughput.json" 2>&1 | grep -v Warn | tail -40 ;;
  compare)
    model=${2:?usage: bench/gpu_suite.sh compare compare-dense|compare-16-16|compare-16-16-air|compare-8-8-8-8-air}
    timeout 570 python bench/train_compare.py --data /tmp/compare-data --runs /tmp/compare-runs --models "$model" \
      --max-seconds "${MAX_SECONDS:-420}" --json "$OUT/train_compare_$model.json" 2>&1 | grep -v Warn | tail -12 ;;
  compare-all)
    tc="python bench/train_compare.py --data ${DATA:-/tmp/compare-data} ${SOURCES:+--sources $SOURCES} ${COMPARE_ARGS:-}"
    mkdir -p /tmp/compare-parts
    timeout 120 $tc --prepare-only 2>&1 | tail -3
    # seconds per step of the slowest model (CoLM {16,16}: the most FLOPs of the chain models, no KV sharing),
    # its first steps included (conservative)
    timeout 120 $tc --runs /tmp/compare-calib --models compare-16-16 --steps 20 --eval-batches 1 \
      --json /tmp/compare-calib.json 2>&1 | grep -v Warn | tail -2
    per=${PER_MODEL_S:-95} total=${TOTAL_S:-560}
    steps=$(python -c "import json; r = json.load(open('/tmp/compare-calib.json'))['models']['compare-16-16']; \
print(max(20, int($per * 20 / r['train_seconds'])))")
    echo "steps per model: $steps"
    # each model's report comes back as soon as it exists (a call cut short keeps what it finished); a model is
    # started only while the call's TOTAL_S (default 560 s) leaves it room
    for m in compare-dense compare-16-16 compare-16-16-air compare-8-8-8-8-air; do
      if (( SECONDS + per + 60 > total )); then echo "$m: not started, the call's time is spent"; continue; fi
      timeout $(( per * 2 + 60 )) $tc --runs /tmp/compare-runs --models $m --steps "$steps" \
        --eval-batches ${EVAL_BATCHES:-64} --json "/tmp/compare-parts/$m.json" 2>&1 | grep -v Warn | tail -3
      [ -f "/tmp/compare-parts/$m.json" ] && cp "/tmp/compare-parts/$m.json" "$OUT/train_compare_$m.json"
    done  # their PNGs stay here (a call returns 8 files at most)
    python bench/train_compare.py --merge "$(ls /tmp/compare-parts/compare-*.json | paste -sd,)" \
      --json "$OUT/train_compare.json" 2>&1 | tail -12
    if (( SECONDS + 40 < total )) && [ -f /tmp/compare-runs/compare-16-16-air/model/config.json ]; then
      timeout $(( total - SECONDS )) python bench/speculative.py \
        --model /tmp/compare-runs/compare-16-16-air/model --dtype bfloat16 --batches 1,8 --gammas 1,2,4 --reps 3 \
        --out "$OUT/speculative_compare_16_16_air.json" 2>&1 | grep -v Warn | tail -14
    fi ;;
  spec)
    timeout 90 python -m pytest -q -p no:cacheprovider tests/test_speculative.py tests/test_verify_paged.py \
      tests/test_engine_gpu.py 2>&1 | tee "$OUT/gpu_tests_spec.log" | tail -4
    for va in gather paged; do
      timeout 150 python bench/speculative.py --model demo --batches 1,8 --gammas 1,2,4,8 --reps 10 \
        --verify-attention $va --out "$OUT/speculative_demo_$va.json" 2>&1 | grep -v Warn | tail -14
    done ;;
  prefix)
    timeout 560 python bench/serve_path.py --modes colocated_nocache,colocated --concurrency 160 --ramp-s 2 \
      --max-batched-tokens 4096 --num-requests 3000 --client-processes 8 --connections 4 --routers 4 --num-blocks 0 \
      --prompt-len 64,512 --output-len 32,96 --prefix-len 1024 --num-prefixes 8 \
      --out "$OUT/serve_path_1b_air_c160_prefix" 2>&1 | grep -v Warn | tail -20 ;;
  sampling)
    timeout 200 python bench/sampling_overhead.py --device cuda --vocab 128256 --batches 1,8,64 --context 64 --reps 30 \
      --out "$OUT/sampling_overhead.json" 2>&1 | grep -v Warn | tail -30
    COLM_KERNEL_TUNE=0 timeout 120 python -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py \
      tests/test_sampled_overlap.py 2>&1 | tail -3
    for t in 0 0.8; do  # greedy and sampled traffic side by side (each run: ~3 min, most of it the start's graph warm-up)
      name=$([ "$t" = 0 ] && echo greedy || echo sampled)
      timeout 300 python bench/serve_path.py --modes colocated --concurrency 64 --ramp-s 2 --max-batched-tokens 4096 \
        --num-requests 1500 --client-processes 8 --connections 4 --routers 4 --num-blocks 0 --prompt-len 512,2048 \
        --output-len 32,96 --temperature $t --top-p $([ "$t" = 0 ] && echo 1.0 || echo 0.95) \
        --out "$OUT/serve_path_1b_air_c64_$name" 2>&1 | grep -v Warn | tail -8
    done ;;
  independent)
    timeout 575 python bench/serve_path.py --modes colocated,dense,hf_dense --concurrency 64 --ramp-s 2 \
      --max-batched-tokens 4096 --num-requests 1500 --client-processes 8 --connections 4 --routers 4 --num-blocks 0 \
      --prompt-len 512,2048 --output-len 32,96 --out "$OUT/serve_path_1b_air_c64_independent" 2>&1 | grep -v Warn | tail -16 ;;
  gc)
    timeout 570 python bench/gc_pauses.py --set model.preset=llama-3.2-1b-16-16-air --set model.dtype=bfloat16 \
      --set decode.num_blocks=0 --set decode.warmup_context=2200 --set decode.max_batch_size=160 \
      --set router.replicas=auto --concurrency 160 --ramp-s 2 --num-requests 4000 --warmup-requests 64 \
      --processes 8 --connections 8 --prompt-len 512,2048 --output-len 32,96 --slo-ttft-ms 200 --slo-tpot-ms 10 \
      --out "$OUT/gc_pauses_1b_air_c160.json" 2>&1 | grep -v Warn | tail -24 ;;
  ray)
    timeout 560 python bench/serve_ray.py --set model.preset=llama-3.2-1b-16-16-air --set model.dtype=bfloat16 \
      --set decode.num_blocks=0 --set decode.warmup_context=2200 --set decode.max_batch_size=160 \
      --set router.replicas=auto --concurrency 160 --ramp-s 2 --num-requests 6000 --warmup-requests 64 \
      --processes 8 --connections 8 --prompt-len 512,2048 --output-len 32,96 --slo-ttft-ms 200 --slo-tpot-ms 10 \
      --passes 'none;none=1,tpot:4=1,ttft:100=1' --out "$OUT/serve_ray_1b_air_c160" 2>&1 | grep -v Warn | tail -20 ;;
  ray-ab)
    for i in $(seq 1 "${SERVICES:-4}"); do
      if [ $((i % 2)) = 1 ]; then tag=a; extra=${RAY_A:-}; else tag=b; extra=${RAY_B:-}; fi
      # shellcheck disable=SC2086 # $extra: --set options, split on purpose
      timeout "${SERVICE_S:-200}" python bench/serve_ray.py --set model.preset=llama-3.2-1b-16-16-air \
        --set model.dtype=bfloat16 --set decode.num_blocks=0 --set decode.warmup_context=2200 \
        --set decode.max_batch_size=160 --set router.replicas=auto $extra --concurrency 160 --ramp-s 2 \
        --num-requests 6000 --warmup-requests 64 --processes 8 --connections 8 --prompt-len 512,2048 \
        --output-len 32,96 --slo-ttft-ms 200 --slo-tpot-ms 10 --passes none \
        --out "$OUT/serve_ray_ab_${i}_$tag" 2>&1 | grep -v Warn | grep "serve_ray\]" | tail -3
    done
    python bench/serve_ray_ab.py "$OUT"/serve_ray_ab_*.json --out "$OUT/serve_ray_ab.json" ;;
  sweeps)
    for m in 1 8; do
      timeout 240 python bench/gemv_sweep.py --rows $m --out "$OUT/gemv_sweep_m$m.json" 2>&1 | grep -v Warn | tail -30
    done
    timeout 90 python bench/paged_attention.py --graph-sweep-only --out "$OUT/paged_attention_graph_sweep.json" 2>&1 \
      | grep -v Warn | tail -30 ;;
esac
