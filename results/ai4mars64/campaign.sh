#!/usr/bin/env bash
# The real-data campaign on ai4mars64 (issue 27), one stage after another, each resumable:
#   a. search     marsseg_budget space, 1500 images, 12-epoch schedules, ASHA grace 3, 40 trials
#   b. export     the search's top-5 MarsSeg configs and its plots
#   c. compare    the best MarsSeg config against preset:plain, one split, 2 seeds, 20 epochs
#   d. final      that config as a 5-fold ensemble, 30 epochs, flip TTA, calibrated decoding
#   e. wider      the pick's recipe on a MarsSeg of plain's size (width 0.25), same budget as c.,
#                 compared with c.'s plain runs (stage b's answer to 'what else was tried')
# Round 2 (stage e's lever: let the search choose plain's U-Net too):
#   f. search-any   `budget` space (plain-sized U-Net or narrow MarsSeg, the same training knobs),
#                   a.'s budget but ASHA grace 6 (at 3, OneCycle trials such as plain are still
#                   warming up: a first try cut plain there), preset:plain as its first trial,
#                   plain with the levers set by hand as its second
#   g. export-any   its top-5 configs, any architecture
#   h. compare-any  its pick against c.'s plain runs (same data, split, seeds, 20 epochs)
#   i. final-any    that pick as a 5-fold ensemble, 30 epochs, flip TTA, calibrated decoding
#
# Rerun it after any stop (a session's end, Ctrl-C, a reboot): a finished stage is skipped (its
# marker in $CAMPAIGN/done/), an unfinished one continues from its checkpoints (search.run
# resumes its experiment, compare and final their runs). Everything it makes lives in $CAMPAIGN
# (default ~/marsseg-campaign), outside the work tree, which is laid anew each session; the
# project is installed there in its own venv, from this checkout, each time the script starts.
# `campaign.sh collect` copies the finished stages' small results into results/ai4mars64/;
# `campaign.sh restore` does only the restoring step below, which `run` starts with.
# If the state folder is lost (a new machine), the stages committed in results/ai4mars64/campaign/
# stay done and later stages read their picks from the committed results: the campaign restarts
# the first stage it had not committed, from scratch.
#
#   nohup bash results/ai4mars64/campaign.sh >> ~/marsseg-campaign/campaign.log 2>&1 &
#
# `campaign.sh stage NAME` runs that one stage with the venv as it is, beside a running campaign
# (e.g. `wider` on the core the final's last fold leaves idle); it does not reinstall the venv,
# whose code the running stage's Ray workers import.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
campaign=${MARSSEG_CAMPAIGN:-$HOME/marsseg-campaign}
data=${MARSSEG_DATA:-$(cd "$repo/.." && pwd)/shared/data/ai4mars64.npz}
# CPUs of each final-any fold (Ray's share; at least one torch thread): 0.4 trains all five
# folds at once on two cores, so none ends alone on one core while the other idles. A stopped
# stage may continue with another value: the CPU count is not part of the final's plan.
final_cpus=${MARSSEG_FINAL_CPUS:-1}
name=ai4mars64-budget
name_any=ai4mars64-any
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
python=$campaign/venv/bin/python
mkdir -p "$campaign/done" "$campaign/results"

installed=unknown  # the commit whose code the venv holds, set by install()

install() {
    # A copy of the project, not an editable install: Ray workers started later in a stage must
    # run the code the stage started with, whatever happens to the checkout meanwhile.
    installed=$(git -C "$repo" rev-parse --short HEAD)
    if [ ! -x "$python" ]; then
        python3 -m venv "$campaign/venv"
        "$python" -m pip install -q --upgrade pip
        "$python" -m pip install -q torch==2.13.0
        "$python" -m pip install -q -c "$repo/constraints/cluster.txt" "$repo"
    else
        "$python" -m pip install -q --no-deps --force-reinstall "$repo"
    fi
    echo "$installed" > "$campaign/venv/installed-commit"
}

stage() {  # stage NAME COMMAND...: run it unless done; log its start, end and exit status
    local stage_name=$1
    shift
    if [ -e "$campaign/done/$stage_name" ]; then
        echo "campaign: $stage_name done earlier ($(cat "$campaign/done/$stage_name"))"
        return 0
    fi
    local start
    start=$(date +%s)
    echo "campaign: $stage_name starts $(date -u +%FT%TZ) on $(hostname), $(nproc) CPUs, code of commit $installed"
    echo "campaign: $stage_name: $*"
    (cd "$campaign" && "$@")
    local took=$(( $(date +%s) - start ))
    echo "finished $(date -u +%FT%TZ) after ${took}s of this run, code of commit $installed" \
        > "$campaign/done/$stage_name"
    echo "campaign: $stage_name $(cat "$campaign/done/$stage_name")"
}

best=$campaign/results/search-budget/best_config.yaml
wider=$repo/results/ai4mars64/comparison-wider/marsseg-pick-width-0.25.yaml
best_any=$campaign/results/search-any/best_config.yaml

stages="search export compare final wider search-any export-any compare-any final-any"

run_stage() {  # run_stage NAME: one stage, by its name
    case $1 in
        search) stage search "$python" -m search.run --data "$data" --space marsseg_budget \
            --limit-images 1500 --max-epochs 12 --grace-period 3 --reduction-factor 3 \
            --num-samples 40 --time-budget 14400 --cpus-per-trial 1 --max-concurrent 2 \
            --no-reference-trial --storage "$campaign/experiments" --name "$name" ;;
        export) stage export "$python" -m search.export --name "$name" \
            --storage "$campaign/experiments" --arch marsseg --top-k 5 \
            --out "$campaign/results/search-budget" ;;
        compare) stage compare "$python" -m search.compare --data "$data" --max-epochs 20 \
            --seeds 0 1 --cpus-per-trial 1 --candidate plain=preset:plain \
            --candidate "marsseg-search=$best" --out "$campaign/results/comparison" ;;
        final) stage final "$python" -m search.final --config "$best" --data "$data" --folds 5 \
            --max-epochs 30 --cpus-per-trial 1 --compress --out "$campaign/results/final" ;;
        wider) stage wider "$python" -m search.compare --data "$data" --max-epochs 20 \
            --seeds 0 1 --cpus-per-trial 1 --candidate "marsseg-wide=$wider" \
            --out "$campaign/results/comparison-wider" ;;
        search-any) stage search-any "$python" -m search.run --data "$data" --space budget \
            --limit-images 1500 --max-epochs 12 --grace-period 6 --reduction-factor 3 \
            --num-samples 40 --time-budget 14400 --cpus-per-trial 1 --max-concurrent 2 \
            --storage "$campaign/experiments" --name "$name_any" ;;
        export-any) stage export-any "$python" -m search.export --name "$name_any" \
            --storage "$campaign/experiments" --arch any --top-k 5 \
            --out "$campaign/results/search-any" ;;
        compare-any) stage compare-any "$python" -m search.compare --data "$data" \
            --max-epochs 20 --seeds 0 1 --cpus-per-trial 1 --candidate "search-any=$best_any" \
            --out "$campaign/results/comparison-any" ;;
        final-any) stage final-any "$python" -m search.final --config "$best_any" --data "$data" \
            --folds 5 --max-epochs 30 --cpus-per-trial "$final_cpus" --compress \
            --out "$campaign/results/final-any" ;;
        *) echo "campaign: no stage '$1' ($stages)" >&2; return 2 ;;
    esac
}

restore() {
    # Only what is missing: a state folder that is there is never overwritten.
    local out=$repo/results/ai4mars64 marker each
    for marker in "$out"/campaign/*; do
        each=$(basename "$marker")
        if [ ! -e "$campaign/done/$each" ]; then
            cp "$marker" "$campaign/done/$each"
            echo "campaign: $each counted done, as committed in $out/campaign/ (the state folder lacked it)"
        fi
    done
    for each in search-budget search-any; do
        if [ -d "$out/$each" ] && [ ! -e "$campaign/results/$each/best_config.yaml" ]; then
            mkdir -p "$campaign/results/$each"
            cp -r "$out/$each"/. "$campaign/results/$each/"
            echo "campaign: results/$each restored from $out/$each"
        fi
    done
}

run_all() {
    restore
    install
    local each
    for each in $stages; do
        run_stage "$each"
    done
}

collect() {
    # The small results of the finished stages, for git; never checkpoints or model files.
    local out=$repo/results/ai4mars64
    mkdir -p "$out/campaign"
    cp "$campaign"/done/* "$out/campaign/" 2>/dev/null || true
    local search
    for search in export:search-budget export-any:search-any; do
        if [ -e "$campaign/done/${search%%:*}" ]; then
            search=${search#*:}
            mkdir -p "$out/$search"
            cp "$campaign/results/$search"/*.yaml "$campaign/results/$search"/*.csv "$out/$search/"
            cp -r "$campaign/results/$search/plots" "$out/$search/" 2>/dev/null || true
        fi
    done
    local from to
    for from in comparison:comparison-budget comparison-wider:comparison-wider \
        comparison-any:comparison-any; do
        to=$out/${from#*:}
        from=$campaign/results/${from%%:*}
        if [ -e "$from/runs.csv" ]; then
            mkdir -p "$to"
            cp "$from"/runs.csv "$to/"
            cp "$from"/comparison.* "$to/" 2>/dev/null || true
        fi
    done
    # A final restored as done from the committed markers has no files here: keep the committed.
    # Stage i's final led stage c's, so its report and submission are the folder's own.
    for from in final:final-marsseg final-any:.; do
        to=$out/${from#*:}
        from=${from%%:*}
        if [ -e "$campaign/done/$from" ] && [ -e "$campaign/results/$from/report.md" ]; then
            mkdir -p "$to"
            cp "$campaign/results/$from"/{report.md,*.png,submission.csv.gz} "$to/"
        fi
    done
    echo "campaign: collected into $out"
}

case ${1:-run} in
    run) run_all ;;
    stage)
        installed=$(cat "$campaign/venv/installed-commit" 2>/dev/null || echo unknown)
        run_stage "${2:?usage: $0 stage NAME}"
        ;;
    collect) collect ;;
    restore) restore ;;
    *) echo "usage: $0 [run|stage NAME|collect|restore]" >&2; exit 2 ;;
esac
