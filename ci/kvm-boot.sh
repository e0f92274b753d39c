#!/usr/bin/env bash
# Boots the default configuration under QEMU with KVM (`cargo xtask run
# --kvm`) and judges the Linux guest's /init verdict: the line
# `MOAT-INIT done checks=N failed=0`. The guest then waits at its shell;
# this script types `poweroff -f` there.
#
# Exit status: 0 passed; 77 skipped (the host's KVM cannot run Moat, and
# xtask said why); anything else failed.
set -uo pipefail
cd "$(dirname "$0")/.."

LOG=${LOG:-target/ci-kvm-boot.log}
LIMIT_SECS=${LIMIT_SECS:-900}
mkdir -p "$(dirname "$LOG")"
: >"$LOG"

input=$(mktemp -u)
mkfifo "$input"
trap 'rm -f "$input"' EXIT

# The FIFO is the console's input: held open (fd 3) until the verdict.
timeout "$LIMIT_SECS" cargo xtask run --kvm <"$input" >"$LOG" 2>&1 &
run=$!
exec 3>"$input"

verdict=""
while kill -0 "$run" 2>/dev/null; do
    verdict=$(grep -a -m1 -o 'MOAT-INIT done checks=[0-9]* failed=[0-9]*' "$LOG")
    [ -n "$verdict" ] && break
    sleep 2
done
if [ -n "$verdict" ]; then
    sleep 2
    echo 'poweroff -f' >&3
fi
exec 3>&-
wait "$run"
status=$?
cat "$LOG"

if [ "$status" = 77 ]; then
    echo "ci: skipped: this runner's KVM cannot run Moat (see above)"
    exit 77
fi
echo "ci: xtask run ended with status $status; verdict: ${verdict:-none}"
case "$verdict" in
*" failed=0") exit 0 ;;
*) exit 1 ;;
esac
