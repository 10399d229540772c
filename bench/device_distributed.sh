#!/usr/bin/env bash
# Issue 12 on a 2-GPU machine (nvidia-h200-x2), with the wheels carried in .whl and the bundled
# Shakespeare shards in .carry (`llmtrain data prepare --out .carry`; prepared here if absent):
#   - 1 GPU vs 2 GPUs with the same global batch (1 x 8 and 2 x 4 sequences of 1024 tokens) under DDP,
#     FSDP2, DeepSpeed ZeRO-2 (optimizer on the GPUs) and ZeRO-2 + CPU Adam offload, for a 124M
#     retention model and the 1B MLA model: losses within a stated bf16 tolerance, tokens/s;
#   - FSDP2 on 2 GPUs against FSDP2 on 1 GPU (a group of one: the same bf16-weight numerics);
#   - weak scaling (the same work per GPU), tokens/s: 8 sequences per GPU, and 32K tokens per GPU and
#     optimizer step (the 124M model's 8 x 1024 step is bound by the CPU's kernel launches, not the
#     GPU: 32 x 1024 for it; the 1B: 8 x 1024 x 4 accumulated, DDP's all-reduce on the last only);
#   - checkpoints saved on 2 GPUs resumed on 1 and the reverse, for DDP, FSDP2 and DeepSpeed.
#
# Usage (repo root, on the device): bash bench/device_distributed.sh [all|STAGE|summary], STAGE one of
# scaling weak accum fsdp1 deepspeed offload resume
# The first call installs the wheels and builds llmtrain (about 3 minutes); later calls on the same
# warm machine skip that. Every finished run leaves $RUNS/<name>/DONE and is skipped by later calls,
# so `timeout 540 bash bench/device_distributed.sh all` can be repeated, one device call each, until
# everything has run. Every call ends with the summary of the runs that exist ($OUT/summary.md) and
# packs logs and metrics into $OUT/results.tar.gz; it exits 1 if a loss comparison is outside the
# tolerance.
set -uo pipefail  # no -e: a failed run is reported and the others still run
STAGE=${1:-all}
case "$STAGE" in all|scaling|weak|accum|fsdp1|deepspeed|offload|resume|summary) ;;
  *) echo "usage: $0 all|scaling|weak|accum|fsdp1|deepspeed|offload|resume|summary" >&2; exit 2 ;; esac
# NVLink multicast stays off: a program using it can take the host's shared GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4  # DeepSpeed cannot parse "9.0a"
FINAL_OUT=${OUT:-/tmp/out}
RESULTS=${RESULTS:-/tmp/llmtrain-dist-results}  # packed into $FINAL_OUT/results.tar.gz
RUNS=${RUNS:-/tmp/llmtrain_dist}                # run directories (checkpoints stay on the machine)
READY=/tmp/llmtrain-dist-ready
# Each call stops starting runs when fewer seconds than a run needs are left of BUDGET_S (default
# 540, under the device's 10-minute limit, counted from here); the next call carries on.
DEADLINE=${DEADLINE_AT:-$(( $(date +%s) + ${BUDGET_S:-540} ))}  # DEADLINE_AT: epoch seconds, for several stages in one call
mkdir -p "$FINAL_OUT" "$RESULTS/logs" "$RUNS"
pack() { tar czf "$FINAL_OUT/results.tar.gz" -C "$RESULTS" . 2>/dev/null || true; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

if [ "$STAGE" != summary ] && [ ! -f "$READY" ]; then
  start=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "WHEELS FAILED"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$RESULTS/gpu.txt"
  nvidia-smi topo -m | tee -a "$RESULTS/gpu.txt" || true
  # DeepSpeed's CPU Adam op is compiled on first use: build it now, beside llmtrain's own build
  (python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
     >"$RESULTS/logs/cpu_adam_build.log" 2>&1; echo "cpu_adam build rc $?" >>"$RESULTS/logs/cpu_adam_build.log") &
  ds_build=$!
  arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}a' if m == 9 else f'{m}{n}')")
  python3 -m pip install --no-build-isolation --no-deps -q . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" \
    -Cbuild-dir=/tmp/llmtrain-build >"$RESULTS/logs/build.log" 2>&1 || { tail -30 "$RESULTS/logs/build.log"; pack; exit 1; }
  wait $ds_build || true
  tail -1 "$RESULTS/logs/cpu_adam_build.log"
  (cd /tmp && python3 -m llmtrain info) | tee "$RESULTS/info.txt"
  echo "setup: $(( $(date +%s) - start )) s"
  touch "$READY"
fi

DATA=$PWD/.carry
if [ ! -d "$DATA/shards/pretrain/train" ]; then
  DATA=$RUNS/data
  [ -d "$DATA/shards/pretrain/train" ] || python3 -m llmtrain data prepare --out "$DATA" --no-progress
fi
# lr 3e-4 is the `small` preset's scale (the quick start's 5e-3 is for the tiny CPU model); warm-up 5
# steps, cosine over the run; evaluation and periodic saves off so the step times are the training steps.
common=(--dataset "$DATA" --seq_len 1024 --learning_rate 3e-4 --warmup_steps 5 --eval_interval 100000
        --save_interval 100000 --log_interval 1 --progress false --sample_tokens 1 --dtype bf16 --device cuda)
# one: one process on GPU $GPU (default 0); two: torchrun, 2 processes; two_ds: DeepSpeed's own launcher
one() { CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m llmtrain pretrain "${common[@]}" "$@"; }
two() { torchrun --nproc_per_node 2 --master_port 29511 -m llmtrain pretrain "${common[@]}" "$@"; }
two_ds() { python3 -m deepspeed.launcher.runner --num_gpus 2 --master_port 29512 --module --no_local_rank \
             llmtrain pretrain "${common[@]}" "$@"; }
small=(--model_size small --model_overrides "{vocab_size: 50304}" --max_steps 50)
big=(--model_size mla-1b --model_overrides "{vocab_size: 50304}" --max_steps 20)
fsdp=(--fsdp true)
ds_gpu=(--backend deepspeed --ds_config ds_zero2.json)  # ZeRO-2, AdamW on the GPUs
ds_cpu=(--backend deepspeed)                            # configs/ds_config.json: ZeRO-2 + CPU Adam offload

room() { local need=$1; [ $(( DEADLINE - $(date +%s) )) -ge "$need" ] && return 0
         echo "-- no time left in this call for $2 (needs ${need} s): the next call runs it"; return 1; }
need() { case $1 in big*) echo 100 ;; *) echo 45 ;; esac; }  # seconds: 2026-11-24 took 18-44 and 52-77
finished() { [ -f "$RUNS/$1/DONE" ]; }
# run NAME launcher args...: a fresh run directory (a leftover would be resumed or mixed in)
run() { local name=$1 launcher=$2 t0; shift 2; rm -rf "${RUNS:?}/$name"; t0=$(date +%s)
        echo "== $name${GPU:+ (GPU $GPU)}"
        "$launcher" "$@" --output_dir "$RUNS/$name" > "$RESULTS/logs/$name.log" 2>&1 \
          || { echo "!! $name failed: tail of its log"; tail -15 "$RESULTS/logs/$name.log"; return 1; }
        echo "   $name: $(( $(date +%s) - t0 )) s"; }
single() { finished "$1" && return 0; room "$(need "$1")" "$1" || return 0
           run "$@" && touch "$RUNS/$1/DONE"; pack; }
# half NAME launcher args...: the first part of a resume check (saved at --stop_at_step)
half() { finished "$1" || [ -f "$RUNS/$1/HALF" ] && return 0; room 75 "$1" || return 1
         run "$@" && touch "$RUNS/$1/HALF"; }
# resume NAME launcher args...: continue $RUNS/NAME from its latest checkpoint, then mark it done
resume() { local name=$1 launcher=$2 t0; shift 2; finished "$name" && return 0
           [ -f "$RUNS/$name/HALF" ] || { echo "!! $name: its first part did not finish"; return 1; }
           t0=$(date +%s); echo "== $name (resume)${GPU:+ (GPU $GPU)}"
           "$launcher" "$@" --resume latest --output_dir "$RUNS/$name" >> "$RESULTS/logs/$name.log" 2>&1 \
             || { echo "!! $name resume failed"; tail -15 "$RESULTS/logs/$name.log"; return 1; }
           echo "   $name (resume): $(( $(date +%s) - t0 )) s"; touch "$RUNS/$name/DONE"; }
# both CMD... -- CMD...: two one-GPU commands at once, on GPUs 0 and 1 (resume checks only: their
# tokens/s are not reported)
both() { local pa pb ra=0 rb=0 side=a; local -a a=() b=()
         for x in "$@"; do if [ "$x" = "--" ]; then side=b; elif [ $side = a ]; then a+=("$x"); else b+=("$x"); fi; done
         room 75 "${a[1]} and ${b[1]}" || return 1
         ( GPU=0 "${a[@]}" ) & pa=$!; ( GPU=1 "${b[@]}" ) & pb=$!
         wait $pa || ra=$?; wait $pb || rb=$?; pack; [ $ra = 0 ] && [ $rb = 0 ]; }

stage() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }
if stage scaling; then  # timed runs, one at a time
  single small_1gpu one "${small[@]}" --batch_size 8
  single small_ddp two "${small[@]}" --batch_size 4
  single small_fsdp two "${small[@]}" --batch_size 4 "${fsdp[@]}"
  single big_1gpu one "${big[@]}" --batch_size 8
  single big_ddp two "${big[@]}" --batch_size 4
  single big_fsdp two "${big[@]}" --batch_size 4 "${fsdp[@]}"
fi
if stage weak; then
  single small_ddpweak two "${small[@]}" --batch_size 8
  single big_ddpweak two "${big[@]}" --batch_size 8
fi
if stage accum; then  # 32K tokens per GPU and optimizer step
  single small_1gpu_32k one "${small[@]}" --batch_size 32 --max_steps 30
  single small_ddp_32k two "${small[@]}" --batch_size 32 --max_steps 30
  single big_1gpu_32k one "${big[@]}" --batch_size 8 --grad_accum 4 --max_steps 15
  single big_ddp_32k two "${big[@]}" --batch_size 8 --grad_accum 4 --max_steps 15
fi
if stage fsdp1; then  # FSDP2 over a group of one: the reference for FSDP2 on 2 GPUs
  single small_fsdp1gpu one "${small[@]}" --batch_size 8 "${fsdp[@]}"
  single big_fsdp1gpu one "${big[@]}" --batch_size 8 "${fsdp[@]}"
fi
if stage deepspeed; then  # compared with DeepSpeed on one GPU (bf16 weights with fp32 masters)
  single small_ds1gpu one "${small[@]}" --batch_size 8 "${ds_gpu[@]}"
  single small_dsgpu two_ds "${small[@]}" --batch_size 4 "${ds_gpu[@]}"
fi
if stage offload; then
  single small_dscpu two "${small[@]}" --batch_size 4 "${ds_cpu[@]}"
fi
if stage resume; then
  # saved at step 20 by one world size, steps 21-50 on the other (same global batch). FSDP2's
  # checkpoints are the plain format: FSDP2 on 2 GPUs -> one plain GPU, and one GPU -> FSDP2 on 2.
  half ddp_2to1 two "${small[@]}" --batch_size 4 --stop_at_step 20
  half fsdp_2to1 two "${small[@]}" --batch_size 4 --stop_at_step 20 "${fsdp[@]}"
  half ds_2to1 two "${small[@]}" --batch_size 4 --stop_at_step 20 "${ds_gpu[@]}"
  finished ddp_2to1 && finished fsdp_2to1 || both resume ddp_2to1 one "${small[@]}" --batch_size 8 \
    -- resume fsdp_2to1 one "${small[@]}" --batch_size 8
  finished ds_2to1 || { room 75 ds_2to1 && resume ds_2to1 one "${small[@]}" --batch_size 8 "${ds_gpu[@]}"; }
  [ -f "$RUNS/ddp_1to2/HALF" ] && [ -f "$RUNS/fsdp_1to2/HALF" ] || finished ddp_1to2 \
    || both half ddp_1to2 one "${small[@]}" --batch_size 8 --stop_at_step 20 \
         -- half fsdp_1to2 one "${small[@]}" --batch_size 8 --stop_at_step 20
  finished ddp_1to2 || { room 75 ddp_1to2 && resume ddp_1to2 two "${small[@]}" --batch_size 4; }
  finished fsdp_1to2 || { room 75 fsdp_1to2 && resume fsdp_1to2 two "${small[@]}" --batch_size 4 "${fsdp[@]}"; }
  pack
fi

for d in "$RUNS"/*/; do  # the metrics come back (checkpoints stay on the machine)
  if [ -f "$d/metrics.jsonl" ]; then
    mkdir -p "$RESULTS/run/$(basename "$d")" && cp "$d/metrics.jsonl" "$RESULTS/run/$(basename "$d")/"
  fi
done
set +e
python3 bench/distributed_summary.py "$RUNS" | tee "$RESULTS/summary.md"
rc=${PIPESTATUS[0]}
pack
exit "$rc"
