#!/usr/bin/env bash
# Every GPU benchmark with its PyTorch anchor, in one call on one machine (ratios only mean something
# within one run), the headline pairs first; each run is cut at RUN_TIMEOUT seconds. Writes one JSON
# line per run to ${OUT:-bench_out}/results.jsonl. ONLY (a regex) keeps the runs whose label matches.
#   ANCHORS=../shared/bench bash bench/gpu_suite.sh
#   ANCHORS=../shared/bench ONLY=train bash bench/gpu_suite.sh     # the encoder's training runs alone
set -uo pipefail
cd "$(dirname "$0")/.."
anchors=${ANCHORS:-../shared/bench}
out=${OUT:-bench_out}
mkdir -p "$out"
results="$out/results.jsonl"
touch "$results"
run() {  # label, command...
  local label=$1; shift
  [[ $label =~ ${ONLY:-.} ]] || return 0
  echo "== $label: $*" >&2
  timeout "${RUN_TIMEOUT:-300}" "$@" 2>>"$out/stderr.log" | tail -n 1 | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['label']='$label'; print(json.dumps(d))" >>"$results" \
    || echo "{\"label\": \"$label\", \"failed\": true}" >>"$results"
}
base="--size base --batch 64 --group 8 --qlen 64 --klen 256"
run anchor_train python3 "$anchors/torch_anchor.py" $base
run ours_train python3 bench/train_throughput.py $base
run anchor_reward_7b python3 "$anchors/torch_reward_anchor.py" --size 7b --batch 16 --seqlen 512
run ours_reward_7b python3 bench/reward_throughput.py --size 7b --batch 16 --seqlen 512
run ours_train_gradcache_paper_batch python3 bench/train_throughput.py --size base --batch 100 --group 8 --qlen 64 --klen 256 --gradcache-chunk 25 --remat full
for task in qa tool lrlm; do
  run "anchor_train_$task" python3 "$anchors/torch_anchor.py" --size base --batch 64 --group 8 --lengths "$anchors/toy_lengths.json" --task "$task"
  run "ours_train_$task" python3 bench/train_throughput.py --size base --batch 64 --group 8 --lengths "$anchors/toy_lengths.json" --task "$task"
done
cat "$results"
