#!/bin/bash
# make demo's time per round for two commits, back to back on this machine (not a test).
#
#   benchmarks/demo_rounds.sh BEFORE_REV AFTER_REV [ROUNDS] [PASSES]
#
# Each commit is checked out in its own worktree under $WORK (default /tmp/fedrot-demo-rounds)
# and imported through a PYTHONPATH shim ahead of the editable install, so both run with this
# checkout's .venv. The demos alternate (before, after, before, after, ...) so that both see the
# same stretch of a shared machine's load. Per run it prints the seconds from one round's opening
# to the next's (from the server's database) and the demo's wall time.
set -euo pipefail
before=${1:?usage: demo_rounds.sh BEFORE_REV AFTER_REV [ROUNDS] [PASSES]}
after=${2:?usage: demo_rounds.sh BEFORE_REV AFTER_REV [ROUNDS] [PASSES]}
rounds=${3:-4}
passes=${4:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/fedrot-demo-rounds}
python=$repo/.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

mkdir -p "$work"
for side in before after; do
  rev=${!side}
  tree=$work/tree-$side shim=$work/shim-$side
  rm -rf "$shim"
  git -C "$repo" worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
  git -C "$repo" worktree add -q --detach "$tree" "$rev"
  mkdir -p "$shim"
  ln -s "$tree/fedrot" "$shim/fedrot"
  ln -s "$tree/server" "$shim/fedrot_server"
  ln -s "$tree/client" "$shim/fedrot_client"
  ln -s "$tree/protos/fedrot_proto" "$shim/fedrot_proto"
done

for pass in $(seq "$passes"); do
  for side in before after; do
    out=$work/$side-$pass
    rm -rf "$out"
    start=$(date +%s)
    PYTHONPATH=$work/shim-$side "$python" "$work/tree-$side/scripts/demo.py" \
      --rounds "$rounds" --timeout 3600 --out "$out" > "$out.log" 2>&1
    wall=$(( $(date +%s) - start ))
    "$python" - "$side" "$pass" "$out" "$wall" <<'EOF'
import glob, json, sqlite3, sys
side, number, out, wall = sys.argv[1:]
(path,) = glob.glob(f"{out}/server/**/fedrot.sqlite3", recursive=True)
opened = [r[0] for r in sqlite3.connect(path).execute(
    "SELECT opened_at FROM rounds ORDER BY round_index")]
gaps = [b - a for a, b in zip(opened, opened[1:])]
print(json.dumps({"side": side, "pass": int(number), "round_to_round_s": [round(g, 1) for g in gaps],
                  "mean_round_s": round(sum(gaps) / len(gaps), 1), "demo_wall_s": int(wall)}))
EOF
  done
done
