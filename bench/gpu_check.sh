#!/usr/bin/env bash
# One prepared check of every CUDA path of llmstack, end to end, on one GPU, in under 8 minutes.
# See `bash bench/gpu_check.sh --help`. Helpers (offline install, kernel probe, summary): bench/gpu_probe.py.
set -uo pipefail
{ # the whole script is one block, read before it runs: editing the file meanwhile cannot derail it

usage() {
  cat <<'EOF'
usage: bash bench/gpu_check.sh [--cpu-smoke] [--budget SECONDS] [--wheels DIR] [--only NAME,...]

Exercises every CUDA path of llmstack on one GPU, each section under its own time limit, in
priority order, and prints one summary table (section, status, seconds, key figure):

  setup       offline install of what the machine lacks (deepspeed, pydantic, datasets, lm-eval,
              zstandard, ...) from the wheelhouse that `make gpu-wheels` builds (default ./wheels):
              pip install --no-index --find-links wheels --no-deps NAME==VERSION ... (torch untouched);
              the project itself runs from the checkout (PYTHONPATH, `python -m llmstack` / `-m eval`)
  probe       bf16 / fp32 matmul peak; the SDPA kernel chosen for causal and packed-document
              batches; GPT forward+backward MFU without optimizer; KV-cache generation on the GPU
  tokenizer   `llmstack tokenizer train` (byte-level BPE, 32k, builtin corpus) for every run below
  tiny_z0/2/3 `llmstack pretrain configs/pretrain/gpt-tiny.yaml precision=bf16 zero.stage=0|2|3`
  gpt2_124m   `llmstack pretrain configs/pretrain/gpt-124m.yaml` (bf16, ZeRO-1, T=1024): MFU, target >= 40%
  gpt2_350m   `llmstack pretrain configs/pretrain/gpt-350m.yaml` (bf16, ZeRO-2, T=1024): MFU, target >= 45%
  ppo         `llmstack ppo` from the tiny checkpoint: actor ZeRO-3, critic ZeRO-2, reference ZeRO-3, bf16
  generate    `llmstack generate` on the tiny checkpoint (--device cuda --dtype bf16 when the CLI has them)
  eval        `llmstack-eval` perplexity + demo_mc on the tiny checkpoint, bf16 (--device cuda when the CLI has it)

MFU = tokens/s x FLOPs/token (6N + 12 L H Q T) / 989 TFLOP/s (H100 SXM bf16), and against the bf16
matmul peak measured by the probe. A failing or slow section never stops the others; sections that
need an earlier one's output are skipped with the reason. Exit status: 0 when every section is OK
(MFU targets met), 1 otherwise, 2 for a bad argument or no usable Python.

Output: a log per section, sections.tsv, probe.json, eval.json and summary.txt in $OUT when set
(the run directories with checkpoints then go to a temporary folder, or $GC_WORK), else in
runs/gpu_check/ (run directories in runs/gpu_check/work/).

options:
  --cpu-smoke      the same sections on CPU with tiny sizes and fp32 (GC_SMOKE_PRECISION=bf16 to
                   change that): checks this script without a GPU, in a few minutes
  --budget S       total seconds for all sections (default 450 on GPU, 600 with --cpu-smoke, whose
                   section limits are doubled)
  --wheels DIR     the wheelhouse (default: wheels)
  --only A,B       run only these sections (those they depend on must have run before in the same GC_WORK)
  -h, --help       this text
environment: PYTHON (the interpreter; default: the first of .venv/bin/python, python3, python with a
  torch that sees CUDA, or any torch with --cpu-smoke), OUT, GC_WORK (the folder whose runs/ holds the
  run directories; replaced at each full check), GC_WORKERS (DataLoader workers of the 124M/350M runs,
  default 4)
EOF
}

MODE=gpu
BUDGET=""
WHEELS=wheels
ONLY=""
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --cpu-smoke) MODE=smoke ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
    --wheels=*) WHEELS=${1#*=} ;;
    --only) ONLY=${2:?--only needs section names}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -z $BUDGET ]] && { [[ $MODE == gpu ]] && BUDGET=450 || BUDGET=600; }
# CPU smoke: section limits x2 (a shared 2-core machine stalls processes for tens of seconds)
CAPX=1
[[ $MODE == smoke ]] && CAPX=2
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be whole seconds, not '$BUDGET'" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
T0=$(date +%s)

# where logs (small, collected) and run directories (checkpoints, large) go
if [[ -n ${OUT:-} ]]; then
  OUTDIR=$OUT
  WORK=${GC_WORK:-}
  [[ -z $WORK ]] && WORK=$(mktemp -d "${TMPDIR:-/tmp}/llmstack-gpu-check.XXXXXX") && TMPWORK=1
else
  OUTDIR=runs/gpu_check
  WORK=${GC_WORK:-runs/gpu_check/work}
fi
mkdir -p "$OUTDIR/logs" "$WORK/runs" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(cd "$WORK" && pwd)
if [[ -z $ONLY ]]; then  # a fresh check: forget the previous one's results (only the files this script writes)
  rm -rf "${WORK:?}/runs"
  rm -f "$OUTDIR"/logs/*.log "$OUTDIR/sections.tsv" "$OUTDIR/probe.json" "$OUTDIR/eval.json" "$OUTDIR/summary.txt"
  mkdir -p "$WORK/runs"
fi
TSV=$OUTDIR/sections.tsv
touch "$TSV"
if [[ -n $ONLY ]]; then  # --only: the rerun sections replace their earlier rows
  awk -F'\t' -v only=",$ONLY," 'index(only, "," $1 ",") == 0' "$TSV" >"$TSV.tmp" && mv "$TSV.tmp" "$TSV"
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}

left() { echo $((BUDGET - ($(date +%s) - T0))); }
log() { printf '[%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$TSV"; }
wanted() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

# section NAME MIN MAX NOTE cmd...: run cmd with its output in logs/NAME.log when at least MIN seconds
# of the budget are left, for at most MAX seconds (and never past the budget less RESERVE seconds kept
# for the sections after it); record OK / FAIL / TIME / SKIP with NOTE.
RESERVE=0
section() {
  local name=$1 min=$2 max=$3 note=$4
  shift 4
  wanted "$name" || return 0
  local l lim t rc dt logf=$OUTDIR/logs/$name.log
  l=$(($(left) - RESERVE))
  if ((l < min)); then
    log "SKIP  $name: ${l}s of the budget left for it, needs ${min}s"
    record "$name" SKIP "" "budget: ${l}s left, needs ${min}s${note:+; $note}"
    return 0
  fi
  max=$((max * CAPX))
  lim=$((max < l ? max : l))
  log "run   $name (limit ${lim}s)"
  {
    printf '# %s\n' "$*"
    printf '# limit %ss, started %s\n' "$lim" "$(date -u +%FT%TZ)"
  } >"$logf"
  t=$(date +%s)
  touch "$OUTDIR/logs/.section_start"
  timeout --kill-after=10 "$lim" "$@" </dev/null >>"$logf" 2>&1
  rc=$?
  dt=$(($(date +%s) - t))
  if ((rc == 0)); then
    log "OK    $name (${dt}s)"
    record "$name" OK "$dt" "$note"
  elif ((rc == 124 || rc == 137)); then
    # a process killed while it JIT-builds a torch/DeepSpeed extension leaves the build's lock file,
    # and every later process that loads the extension waits on it forever: name it
    local locks
    locks=$(find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name lock -newer "$OUTDIR/logs/.section_start" 2>/dev/null | tr '\n' ' ')
    log "TIME  $name: killed at its ${lim}s limit (log: $logf)${locks:+; extension build lock left: $locks(remove it if no build runs)}"
    record "$name" TIME "$dt" "killed at ${lim}s${locks:+; extension build lock left: $locks}${note:+; $note}"
  else
    local why n
    # the last error line of the log and the two after it (llmstack's "error: ..." continues indented)
    n=$(grep -n -E 'Error|error:|Exception|FAILED|failed|[Nn]o such|not found' "$logf" | grep -v -i -E '^[0-9]+:(#|.*warn)' | tail -n 1 | cut -d: -f1)
    if [[ -n $n ]]; then
      why=$(sed -n "${n},$((n + 2))p" "$logf" | sed 's/^[[:space:]]*//' | tr '\n' ' ' | cut -c1-300)
    else
      why=$(grep -v '^#' "$logf" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-300)
    fi
    log "FAIL  $name rc=$rc (${dt}s): $why"
    record "$name" FAIL "$dt" "rc=$rc: $why${note:+; $note}"
  fi
  return 0
}

# skip NAME WHY: a section that cannot run because of an earlier one
skip() {
  wanted "$1" || return 0
  log "SKIP  $1: $2"
  record "$1" SKIP "" "$2"
}

# ---- interpreter -----------------------------------------------------------------------------------
PY=""
if [[ $MODE == gpu ]]; then
  CHECK='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
else
  CHECK='import torch'
fi
for c in "${PYTHON:-}" .venv/bin/python python3 python; do
  if [[ -z $c ]] || ! command -v "$c" >/dev/null 2>&1; then continue; fi
  if "$c" -c "$CHECK" >/dev/null 2>&1; then
    PY=$(command -v "$c")
    [[ $PY == /* ]] || PY=$REPO/$PY
    break
  fi
done
{
  echo "== llmstack GPU check ($MODE), $(date -u +%FT%TZ), revision $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET}s"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 2 | sed 's/^/   GPU: /'
  fi
  echo "   logs: $OUTDIR/logs   runs: $WORK/runs"
  if [[ -n $PY ]]; then
    echo "   python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1))"
  fi
} | tee "$OUTDIR/header.txt"
if [[ -z $PY ]]; then
  [[ -n ${TMPWORK:-} ]] && rm -rf "$WORK"
  if [[ $MODE == gpu ]]; then
    echo "ABORT: no Python whose torch sees a CUDA device (set PYTHON=, or use --cpu-smoke)" | tee -a "$OUTDIR/header.txt"
  else
    echo "ABORT: no Python with torch (set PYTHON=)" | tee -a "$OUTDIR/header.txt"
  fi
  exit 2
fi
LL=("$PY" -m llmstack)
EV=("$PY" -m eval)

# ---- sizes -----------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
  DEV=cuda
  PREC=bf16
  # min_frequency 1: with the default 2 the 3 MB builtin corpus stops at about 22.7k tokens, and the
  # 124M/350M configs are meant with a 32768 vocabulary
  TOK=(tokenizer.path="$WORK/tokenizer" tokenizer.vocab_size=32768 tokenizer.min_frequency=1)
  TINY=(train.max_steps=40 train.log_every=10)                     # gpt-tiny.yaml: micro 8, T=256
  # per GPU what the configs' 8-GPU runs do: 124M micro 16 x accumulation 4, 350M micro 8 x 8 (global 64 here)
  WORKERS=${GC_WORKERS:-4}
  M124=(train.max_steps=30 train.log_every=5 train.global_batch=64 data.num_workers="$WORKERS" train.eval_batches=1)
  M350=(train.max_steps=20 train.log_every=5 train.global_batch=64 data.num_workers="$WORKERS" train.eval_batches=1)
  N124="ZeRO-1 T=1024 V=32768 micro 16 x accum 4, $WORKERS loader workers"
  N350="ZeRO-2 T=1024 V=32768 micro 8 x accum 8, $WORKERS loader workers"
  PPO=(train.max_steps=4)                                           # configs/ppo/demo.yaml: 16 rollouts x 40 tokens
  GEN=(--max-new-tokens 64)
  EVAL_TASKS=ppl:builtin:validation,demo_mc
  EVAL=(--batch-size 32)
  RESERVE_BIG=90                                                    # kept for ppo, generate, eval
else
  DEV=cpu
  # fp32: on CPU, bf16 matmuls run at about 1 GFLOP/s, and every bf16 run first measures a matmul
  # peak with them (common.peak_flops), which costs 30-60 s per process on a loaded 2-core machine
  PREC=${GC_SMOKE_PRECISION:-fp32}
  TOK=(tokenizer.path="$WORK/tokenizer" tokenizer.vocab_size=2048 tokenizer.min_frequency=1 tokenizer.max_chars=2000000)
  SMALL=(model.n_layer=2 model.n_head=2 model.d_model=64 data.seq_len=64)
  TINY=("${SMALL[@]}" train.micro_batch=4 train.max_steps=6 train.log_every=2)
  M124=("${SMALL[@]}" train.micro_batch=2 train.global_batch=4 train.max_steps=6 train.log_every=2 data.num_workers=1 train.eval_batches=1)
  M350=("${SMALL[@]}" train.micro_batch=2 train.global_batch=4 train.max_steps=6 train.log_every=2 data.num_workers=1 train.eval_batches=1)
  N124="gpt-124m.yaml shrunk to 2 layers x 64, T=64, 1 loader worker"
  N350="gpt-350m.yaml shrunk to 2 layers x 64, T=64, 1 loader worker"
  PPO=(train.max_steps=2 rollout.batch=4 rollout.max_new_tokens=8 train.micro_batch=2)
  GEN=(--max-new-tokens 16)
  head -c 3000 README.md >"$WORK/ppl_small.txt"
  EVAL_TASKS=ppl:$WORK/ppl_small.txt,demo_mc
  EVAL=(--batch-size 8 --limit 8)
  RESERVE_BIG=60
fi
RUN_COMMON=(train.resume=none train.progress=false train.eval_every=0 train.save_every=0 "${TOK[@]}")

# ---- 1. setup: offline install from the wheelhouse ------------------------------------------------
if [[ $MODE == gpu ]]; then
  section setup 30 150 "" "$PY" bench/gpu_probe.py install "$WHEELS" --target "$WORK/site"
elif [[ -d $WHEELS ]]; then
  section setup 10 120 "dry run (CPU smoke: nothing installed)" "$PY" bench/gpu_probe.py install "$WHEELS" --dry-run
else
  skip setup "no $WHEELS/ (make gpu-wheels); CPU smoke uses this Python's packages"
fi
[[ -d $WORK/site ]] && export PYTHONPATH="$WORK/site:$PYTHONPATH"  # wheels unpacked where pip was missing
CLI_OK=1
if ! "$PY" -c 'import pydantic, yaml, deepspeed' >"$OUTDIR/logs/imports.log" 2>&1; then
  CLI_OK=0
  log "deepspeed / pydantic / yaml do not import: the llmstack sections are skipped ($(tail -n 1 "$OUTDIR/logs/imports.log"))"
fi

# ---- 2. kernel probe (needs only torch and the model code) -----------------------------------------
PROBE_ARGS=(--out "$OUTDIR" --deadline-s 110)
[[ $MODE == smoke ]] && PROBE_ARGS+=(--smoke)
section probe 30 130 "" "$PY" bench/gpu_probe.py probe "${PROBE_ARGS[@]}"

# ---- 3. CLI stages ----------------------------------------------------------------------------------
cli() {  # cli NAME MIN MAX NOTE cmd...: a section that needs the installed dependencies
  if ((CLI_OK)); then section "$@"; else skip "$1" "deepspeed/pydantic missing (see setup)"; fi
}
cli tokenizer 20 120 "" "${LL[@]}" tokenizer train configs/tokenizer/bpe-demo.yaml "${TOK[@]}"

for z in 0 2 3; do
  cli "tiny_z$z" 20 $((z == 0 ? 100 : 75)) "$PREC ZeRO-$z" \
    "${LL[@]}" pretrain configs/pretrain/gpt-tiny.yaml "${RUN_COMMON[@]}" "${TINY[@]}" \
    run.dir="$WORK/runs/tiny_z$z" precision="$PREC" zero.stage="$z"
done

RESERVE=$RESERVE_BIG
cli gpt2_124m 45 110 "$PREC $N124" "${LL[@]}" pretrain configs/pretrain/gpt-124m.yaml "${RUN_COMMON[@]}" \
  "${M124[@]}" precision="$PREC" run.dir="$WORK/runs/gpt2_124m"
rm -rf "$WORK/runs/gpt2_124m/checkpoints"  # GBs; the metrics are what counts
cli gpt2_350m 60 140 "$PREC $N350" "${LL[@]}" pretrain configs/pretrain/gpt-350m.yaml "${RUN_COMMON[@]}" \
  "${M350[@]}" precision="$PREC" run.dir="$WORK/runs/gpt2_350m"
rm -rf "$WORK/runs/gpt2_350m/checkpoints"
RESERVE=0

# the tiny checkpoint that PPO, generate and eval start from
CKPT=""
for z in 0 2 3; do
  if [[ -e $WORK/runs/tiny_z$z/checkpoints/latest ]]; then CKPT=$WORK/runs/tiny_z$z/checkpoints/latest; break; fi
done

if [[ -z $CKPT ]]; then
  skip ppo "no tiny checkpoint (tiny_z0/2/3 failed or did not run)"
else
  cli ppo 30 120 "actor ZeRO-3, critic ZeRO-2, reference ZeRO-3, $PREC, rule reward" \
    "${LL[@]}" ppo configs/ppo/demo.yaml actor.init="$CKPT" reward.init=null \
    reward.function=llmstack.rlhf.rewards:contains 'reward.kwargs={target: "the"}' precision="$PREC" \
    actor.zero.stage=3 critic.zero.stage=2 reference.zero.stage=3 train.log_every=1 train.save_every=0 \
    train.resume=none train.progress=false run.dir="$WORK/runs/ppo" "${PPO[@]}"
fi

if [[ -z $CKPT ]]; then
  skip generate "no tiny checkpoint"
else
  GEN_HELP=$("${LL[@]}" generate --help 2>&1)
  GEN_PLACE=()
  GEN_NOTE="on $DEV"
  if grep -q -- '--device' <<<"$GEN_HELP"; then GEN_PLACE+=(--device "$DEV"); else GEN_NOTE="no --device flag: the CLI's default device"; fi
  if grep -q -- '--dtype' <<<"$GEN_HELP"; then GEN_PLACE+=(--dtype "$PREC"); GEN_NOTE+=", $PREC"; else GEN_NOTE+=", no --dtype flag: the CLI's default dtype"; fi
  cli generate 15 60 "$GEN_NOTE" "${LL[@]}" generate "$CKPT" --prompt "def " --prompt "The" "${GEN[@]}" \
    --temperature 0 "${GEN_PLACE[@]}"
fi

if [[ -z $CKPT ]]; then
  skip eval "no tiny checkpoint"
else
  EVAL_PLACE=()
  EVAL_NOTE="$PREC on $DEV"
  if grep -q -- '--device' <<<"$("${EV[@]}" --help 2>&1)"; then
    EVAL_PLACE+=(--device "$DEV")
  else
    EVAL_NOTE="$PREC, no --device flag: the CLI's default device"
  fi
  cli eval 20 90 "$EVAL_NOTE" "${EV[@]}" --model "$CKPT" --tasks "$EVAL_TASKS" --dtype "$PREC" "${EVAL[@]}" \
    "${EVAL_PLACE[@]}" --no-progress --output "$OUTDIR/eval.json"
fi

# ---- summary ----------------------------------------------------------------------------------------
SUM_ARGS=(--out "$OUTDIR" --work "$WORK")
[[ $MODE == smoke ]] && SUM_ARGS+=(--smoke)
"$PY" bench/gpu_probe.py summary "${SUM_ARGS[@]}" >"$OUTDIR/table.txt" 2>&1
src=$?  # 0: every section OK, 3: not every one (FAIL, TIME, SKIP, or LOW = MFU under its target)
echo
{
  cat "$OUTDIR/header.txt" "$OUTDIR/table.txt"
  if ((src != 0 && src != 3)); then  # the summary itself broke: the raw table
    echo "(summary failed, rc $src; raw sections.tsv:)"
    cat "$TSV"
  fi
  echo "== done in $(($(date +%s) - T0))s of ${BUDGET}s; logs in $OUTDIR/logs"
} | tee "$OUTDIR/summary.txt"
rm -f "$OUTDIR/table.txt"
((src == 0)) || exit 1
exit 0
}
