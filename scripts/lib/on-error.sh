# Sourced by the scripts in scripts/ right after `set -euo pipefail`: when a
# command fails and `set -e` ends the script, say which script, line and
# command failed (and the step, if the script names one in PAGODA_STEP),
# instead of exiting silently with only a status.
#
# Known failure points still print their own, clearer message first; this is
# the backstop for everything else.

# Functions, command substitutions and subshells inherit the trap.
set -E

pagoda_on_error() {
  local status=$1 file=$2 line=$3 command=$4
  # A failure inside a command substitution or subshell is reported once, by
  # the shell that ends because of it.
  [ "$BASH_SUBSHELL" -eq 0 ] || return 0
  local where="${file##*/}, line $line"
  if [ -n "${PAGODA_STEP:-}" ]; then
    where="$where (step: $PAGODA_STEP)"
  fi
  echo "error: ${where}: \`$command\` failed with exit status $status" >&2
}
trap 'pagoda_on_error $? "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND"' ERR

# Prints "error: MESSAGE" naming the calling script, and exits 1.
die() {
  echo "error: ${0##*/}: $*" >&2
  exit 1
}
