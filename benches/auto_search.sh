#!/usr/bin/env bash
# `tpc compile --auto` at the 175B shape (examples/gpt_pipe.tpl without `@ pp`: H=12288, NH=96,
# S=2048, V=51200, B=32) on dp=4,tp=8 for L = 1, 16, 96 layers: the search's wall time (the
# whole `--auto` command, search plus the final plan) beside the time to compile the
# hand-annotated Megatron plan in the same run (the reference: one full plan of the same
# program), and the estimated step time of the plan found against the hand plan's.
# The budget is the hand plan's own peak memory, so the search must do as well with as little.
# Usage: benches/auto_search.sh [path/to/tpc]   (default: target/release/tpc, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-target/release/tpc}
[ -x "$T" ] || cargo build --release --quiet
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed 's/) @ pp  /)      /' examples/gpt_pipe.tpl > "$dir/hand.tpl"
grep -q 'repeat(L, layer, h)  ' "$dir/hand.tpl"
A="--mesh dp=4,tp=8 --set H=12288 --set NH=96 --set S=2048 --set V=51200 --set B=32"
now() { date +%s.%N; }
field() { grep -o "^# $1: [^(;]*" | head -1 | cut -d: -f2 | sed 's/^ //; s/ $//'; }
secs() { awk -v s="$1" 'BEGIN { split(s, a, " "); u = a[2]; v = a[1];
  if (u == "ms") v /= 1e3; else if (u == "µs") v /= 1e6; printf "%.6g", v }'; }
# The hand plan's peak, rounded up to 0.1 GiB (its printed figure may be rounded down).
gib() { awk -v s="$1" 'BEGIN { split(s, a, " "); u = a[2]; v = a[1];
  if (u == "MiB") v /= 1024; else if (u == "TiB") v *= 1024; printf "%.1f", (v + 0.05) }'; }
echo "| L | hand plan: compile | hand plan: step, peak | --auto: wall time | ratio to the hand compile | found: step, peak | step ratio | placements planned | how |"
echo "|---|---|---|---|---|---|---|---|---|"
for L in 1 16 96; do
  # shellcheck disable=SC2086
  t0=$(now); hand=$("$T" compile "$dir/hand.tpl" $A --set L=$L); t1=$(now)
  hstep=$(field "estimated step time" <<<"$hand")
  hpeak=$(grep -o 'peak memory per device: [^;]*' <<<"$hand" | head -1 | cut -d: -f2 | sed 's/^ //')
  budget="$(gib "$hpeak")GiB"
  # shellcheck disable=SC2086
  t2=$(now); auto=$("$T" compile "$dir/hand.tpl" $A --set L=$L --auto --memory-budget "$budget"); t3=$(now)
  astep=$(field "estimated step time" <<<"$auto")
  apeak=$(grep -o 'peak memory per device: [^;]*' <<<"$auto" | head -1 | cut -d: -f2 | sed 's/^ //')
  how=$(grep -q '^# auto: exhaustive' <<<"$auto" && echo exhaustive || echo descent)
  planned=$(grep -o '[0-9]* placements planned' <<<"$auto" | head -1 | cut -d' ' -f1)
  hc=$(echo "$t1 - $t0" | bc); ac=$(echo "$t3 - $t2" | bc)
  printf '| %s | %.2f s | %s, %s | %.2f s | %.1f× | %s, %s | %.3f× | %s | %s |\n' \
    "$L" "$hc" "$hstep" "$hpeak" "$ac" "$(echo "$ac / $hc" | bc -l)" "$astep" "$apeak" \
    "$(echo "$(secs "$astep") / $(secs "$hstep")" | bc -l)" "$planned" "$how"
done
