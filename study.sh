#!/usr/bin/env bash
# The whole study in one command: build the model organisms the model needs, train every consistency target on
# every threat the model supports, then eval.py's cross-threat matrix, mechanism plots and report.
#
#   ./study.sh                                       # embedded SmolLM2-135M-Instruct on the CPU -> runs/study/
#   QUICK=1 OUT=runs/quick ./study.sh                # 2 steps and a few items per run: checks the pipeline
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct OUT=runs/qwen ./study.sh
#   THREATS=jailbreak,persona ./study.sh             # some threats: their organisms, runs and matrix rows
#
# What is trained (each threat's targets come from consistency.TARGETS, by the positions they read):
#   sycophancy, persona                bct act mlpct attct, from MODEL
#   frustration                        bct act, from the `frustrated` organism (the rejections follow the task,
#                                      so under causal attention the task's MLP and attention internals never
#                                      change; the embedded model itself never shows distress)
#   jailbreak                          bct act mlpct attct, from a model that refuses: MODEL itself, or for the
#                                      embedded model (which never refuses) the `refusal` organism
#   prefill                            bct prefill only (mlpct and attct get no signal there), from the same
#   conditional                        bct act mlpct attct, from the `inoculated` organism
# Settings (environment): MODEL, THREATS (all six; a comma list trains and evaluates those), OUT (runs/study), STEPS (40, train steps per run), ORGANISM_STEPS (STEPS), ORGANISM_LR (1e-4),
# N_TRAIN (256), BATCH_SIZE (8), LR (train.py's default), EVAL_N (30, items per threat), SYC_N (90, sycophancy's), MECH_N (16), GEN_DTYPE (auto),
# REFUSAL_ORGANISM (auto: only for the embedded model; 1 or 0 to force), TRAIN_FLAGS / EVAL_FLAGS (extra
# flags for every train.py / the eval.py call; an --n-threat there replaces SYC_N's). A run whose run.json exists is skipped and one with a checkpoint
# continues (--resume), and eval.py reads back the answers it has generated, so rerunning the script resumes an
# interrupted study. Logs: OUT/logs/. Report: OUT/report/results.md (+ matrix.png, mechanism_*.png).
# Parallelism: JOBS (2) train.py runs at once with THREADS (nproc / JOBS) threads each; eval.py uses every core.
# Wall time: the script measures itself and appends the total to the report (OUT/report/results.md).
#   QUICK=1 with a tiny random model (tests/conftest.py), 2 shared CPU cores: 8 min (training 4, evaluation 4).
#   Full run, embedded model: 3 organisms + 20 train.py runs + eval.py over 20 checkpoints and 4 bases; the
#   measured wall times are in LOG.md ("The whole study", and the dated entries after it).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-smollm2-135m-instruct}
ALL=sycophancy,persona,frustration,jailbreak,prefill,conditional
THREATS=${THREATS:-$ALL}
for t in ${THREATS//,/ }; do
    [[ ",$ALL," == *",$t,"* ]] || { echo "THREATS=$THREATS: unknown threat '$t'; give a comma list of $ALL"; exit 2; }
done
OUT=${OUT:-runs/study}
if [[ -n "${QUICK:-}" ]]; then
    STEPS=${STEPS:-2}; N_TRAIN=${N_TRAIN:-8}; BATCH_SIZE=${BATCH_SIZE:-2}; EVAL_N=${EVAL_N:-4}; MECH_N=${MECH_N:-4}
    QUICK_TRAIN="--response-tokens 8 --save-every 1000"
    QUICK_EVAL="--max-new-tokens 8 --boot 100 --ppl-lines 16"
fi
STEPS=${STEPS:-40}
ORGANISM_STEPS=${ORGANISM_STEPS:-$STEPS}
ORGANISM_LR=${ORGANISM_LR:-1e-4}   # the organisms are SFT that instils a behaviour: measured at 1e-4
N_TRAIN=${N_TRAIN:-256}
BATCH_SIZE=${BATCH_SIZE:-8}
EVAL_N=${EVAL_N:-30}
SYC_N=${SYC_N:-$([[ -n "${QUICK:-}" ]] && echo "$EVAL_N" || echo 90)}   # BRR is a difference of two rates:
                                                                      # at 30 its interval reaches 0
MECH_N=${MECH_N:-16}
GEN_DTYPE=${GEN_DTYPE:-auto}   # eval.py's answers from bf16 weights where the CPU has native bf16 (~1.6x faster)
REFUSAL_ORGANISM=${REFUSAL_ORGANISM:-auto}
[[ $REFUSAL_ORGANISM == auto ]] && REFUSAL_ORGANISM=$([[ $MODEL == smollm2-135m-instruct ]] && echo 1 || echo 0)
TRAIN="--steps $STEPS --n-train $N_TRAIN --batch-size $BATCH_SIZE --eval-n 0 ${LR:+--lr $LR} ${QUICK_TRAIN:-} ${TRAIN_FLAGS:-}"
mkdir -p "$OUT/logs" "$OUT/runs" "$OUT/organisms"

# train.py runs go JOBS at a time with nproc/JOBS threads each: a 135M model's small matmuls use one core
# almost as well as two, and model loading and generation overlap across runs
JOBS=${JOBS:-2}
THREADS=${THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
train() {  # train NAME FLAGS...: one train.py run into OUT/NAME in the background, skipped when finished before
    local name=$1; shift
    local dir=$OUT/$name log=$OUT/logs/${name//\//_}.log
    if [[ -f $dir/run.json ]]; then echo "  $name: done before, skipped"; return; fi
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done   # a failed run (exit 1) stops the study here
    (
        t0=$SECONDS
        resume=(); [[ -f $dir/checkpoint/train_state.pt ]] && resume=(--resume)   # interrupted: continue it
        if ! OMP_NUM_THREADS=$THREADS python train.py "$@" --out "$dir" "${resume[@]}" > "$log" 2>&1; then
            echo "  $name: FAILED"; tail -5 "$log"; exit 1
        fi
        echo "  $name: $((SECONDS - t0)) s"
    ) &
}
drain() { while [[ -n $(jobs -rp) ]]; do wait -n; done; }
t_train=$SECONDS

has() { [[ ",$THREATS," == *",$1,"* ]]; }
echo "== organisms ($MODEL) and the runs from it"
REFUSER=$MODEL
if [[ $REFUSAL_ORGANISM == 1 ]] && { has jailbreak || has prefill; }; then
    train organisms/refusal --organism refusal --model "$MODEL" $TRAIN --steps "$ORGANISM_STEPS" --lr "$ORGANISM_LR"
    REFUSER=$OUT/organisms/refusal
fi
has conditional && train organisms/inoculated --organism inoculated --model "$MODEL" $TRAIN \
    --steps "$ORGANISM_STEPS" --lr "$ORGANISM_LR"
has frustration && train organisms/frustrated --organism frustrated --model "$MODEL" $TRAIN \
    --steps "$ORGANISM_STEPS" --lr "$ORGANISM_LR"
# targets_for THREAT: the registered targets (consistency.TARGETS) with a signal on THREAT, by the positions
# each reads (Target.reads). A prefill comes after the prompt, so the prompt's internals and its suffix are the
# same in both runs: only theta0's labels and the prefill target see it. Frustration's rejections follow the
# task, so under causal attention the task's internals never change: no content target. The prefill target
# needs prefill pairs.
targets_for() {
    python - "$1" <<'PY'
import sys
from consistency import TARGETS
reads = {"prefill": ("labels", "prefill"), "frustration": ("labels", "suffix")}.get(
    sys.argv[1], ("labels", "suffix", "content"))
print(*(name for name, t in TARGETS.items() if t.reads in reads))
PY
}
run_threats() {  # run_threats THREAT...: every target of each selected threat, from that threat's base
    for threat in "$@"; do
        has "$threat" || continue
        case $threat in
            jailbreak|prefill) base=$REFUSER ;;
            conditional) base=$OUT/organisms/inoculated ;;
            frustration) base=$OUT/organisms/frustrated ;;
            *) base=$MODEL ;;
        esac
        targets=$(targets_for "$threat")   # an assignment, so that a failure stops the study (set -e)
        for target in $targets; do
            train "runs/$target-$threat" --target "$target" --threat "$threat" --model "$base" $TRAIN
        done
    done
}
run_threats sycophancy persona   # from MODEL: these share the cores with the organisms
drain                            # the runs below start from the organisms
run_threats frustration jailbreak prefill conditional
drain
train_time=$((SECONDS - t_train))

echo "== evaluation: matrix, mechanism, report"
runs=(); for threat in ${THREATS//,/ }; do runs+=("$OUT"/runs/*-"$threat"); done
t0=$SECONDS
python eval.py --matrix "${runs[@]}" --out "$OUT/report" --n "$EVAL_N" --n-threat "sycophancy:$SYC_N" \
    --mech-n "$MECH_N" --gen-dtype "$GEN_DTYPE" ${QUICK_EVAL:-} \
    ${EVAL_FLAGS:-} 2>&1 | tee "$OUT/logs/eval.log"
eval_time=$((SECONDS - t0))
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //' || true)
line="Study wall time: $SECONDS s (training $train_time s, evaluation $eval_time s) on $(nproc) cores ($cpu), MODEL=$MODEL STEPS=$STEPS EVAL_N=$EVAL_N${QUICK:+ QUICK}; runs finished before this invocation are not counted."
echo "$line" | tee -a "$OUT/report/results.md"
