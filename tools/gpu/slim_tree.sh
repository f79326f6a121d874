#!/usr/bin/env bash
# Keep the bundled demo models (models/, ~69 MiB) out of what the device `run` tool sends.
#
#   bash tools/gpu/slim_tree.sh on | off | status
#
# The `run` tool sends every tracked and untracked-not-ignored file, 64 MiB in all; models/ alone is
# over that, so no device call can run while it travels. `on` untracks models/ in the index only (the
# files stay on disk) and ignores it through .git/info/exclude; `off` puts both back as they were.
# Between `on` and `off`, do NOT commit: the commit would delete the demo models. `status` says which.
# The device needs no file under models/ (bench/GPU_RUNBOOK.md).
set -euo pipefail
cd "$(dirname "$0")/../.."

EXCLUDE=.git/info/exclude
LINE="/models/  # sdrt: tools/gpu/slim_tree.sh on (run 'off' before committing)"

case "${1:-}" in
  on)
    if ! git diff --quiet HEAD -- models; then
      echo "models/ has changes against HEAD: commit or drop them first" >&2
      exit 1
    fi
    git rm -r -q --cached models
    grep -qxF "$LINE" "$EXCLUDE" || echo "$LINE" >> "$EXCLUDE"
    echo "models/ untracked and ignored for the device calls; run 'bash tools/gpu/slim_tree.sh off' before committing"
    ;;
  off)
    git reset -q HEAD -- models
    if [ -f "$EXCLUDE" ]; then
      grep -vxF "$LINE" "$EXCLUDE" > "$EXCLUDE.tmp" || true
      mv "$EXCLUDE.tmp" "$EXCLUDE"
    fi
    echo "models/ tracked again"
    ;;
  status)
    if grep -qxF "$LINE" "$EXCLUDE" 2>/dev/null; then echo "slim (models/ untracked: do not commit)"; else echo "normal"; fi
    ;;
  *)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
