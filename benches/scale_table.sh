#!/usr/bin/env bash
# The "training at scale" table of the README: peak memory per device and estimated step time of
# gpt at the 175B shape (examples/gpt_pipe.tpl without `@ pp`: L=96, H=12288, NH=96, S=2048,
# V=51200, B=32) on dp=4,tp=8, for each memory feature alone and combined. Plans only (no run).
# Usage: benches/scale_table.sh [path/to/tpc]   (default: target/release/tpc, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-target/release/tpc}
[ -x "$T" ] || cargo build --release --quiet
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed 's/) @ pp  /)      /' examples/gpt_pipe.tpl > "$dir/f32.tpl"
grep -q 'repeat(L, layer, h)  ' "$dir/f32.tpl"
# Sequence parallelism by annotation: the residual stream split along S over tp.
sed -e 's/^    h = x + attention(layernorm(x, ln1_g, ln1_b))$/    h = x + attention(layernorm(x, ln1_g, ln1_b)) @ [dp, tp, _]/' \
    -e 's/^    return h + mlp(layernorm(h, ln2_g, ln2_b))$/    y = h + mlp(layernorm(h, ln2_g, ln2_b)) @ [dp, tp, _]\n    return y/' \
    -e 's/^h = embedding(tokens, wte) + wpe$/h = embedding(tokens, wte) + wpe @ [dp, tp, _]/' \
    "$dir/f32.tpl" > "$dir/f32_sp.tpl"
# bf16 params and activations (f32 master weights); the loss is computed in f32 either way.
for f in f32 f32_sp; do
  sed -e 's/f32\[/bf16[/g' "$dir/$f.tpl" > "$dir/bf16${f#f32}.tpl"
done
A="--mesh dp=4,tp=8 --set L=96 --set H=12288 --set NH=96 --set S=2048 --set V=51200 --set B=32"
echo "| configuration | peak memory per device | params + grads + optimizer (+ f32 masters) | activations kept | estimated step time | compile |"
echo "|---|---|---|---|---|---|"
row() {
  local name=$1 file=$2; shift 2
  local t0 t1 out
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  out=$("$T" compile "$dir/$file.tpl" $A "$@")
  t1=$(date +%s.%N)
  local peak step mem act master
  peak=$(grep -o 'peak memory per device: [^;]*' <<<"$out" | head -1 | cut -d: -f2)
  step=$(grep -o '^# estimated step time: [^(]*' <<<"$out" | cut -d: -f2)
  mem=$(grep -o 'params [0-9.]* [KMGT]*i*B, grads [0-9.]* [KMGT]*i*B, optimizer [0-9.]* [KMGT]*i*B' <<<"$out" | head -1)
  act=$(grep -o 'activations kept for the backward [0-9.]* [KMGT]*i*B' <<<"$out" | head -1 | awk '{print $(NF-1), $NF}')
  master=$(grep -o 'f32 master weights [0-9.]* [KMGT]*i*B' <<<"$out" | head -1 || true)
  echo "| $name | $peak | $mem${master:+, $master} | $act | $step | $(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s |"
}
row "plain (Megatron TP over tp, DP over dp)" f32
row "sequence parallel (annotated)" f32_sp
row "ZeRO-1" f32 --zero 1
row "ZeRO-3" f32 --zero 3
row "bf16 (f32 masters)" bf16
row "bf16 + dynamic loss scale" bf16 --loss-scale dynamic
row "full recompute" f32 --recompute full
row "bf16 + ZeRO-3 + full recompute" bf16 --zero 3 --recompute full
row "bf16 + ZeRO-3 + full recompute + SP" bf16_sp --zero 3 --recompute full
