# Shared by session.sh and peers.sh on the GPU machine (sourced; B and W set by the caller).

# Prints the pagoda binary to run: $PAGODA if set, else this call's .device/bin/pagoda, else the
# copy an earlier call kept (session.sh keep-bin); none is an error.
pagoda_bin() {
  if [ -n "${PAGODA:-}" ]; then echo "$PAGODA"
  elif [ -x "$B/pagoda" ]; then echo "$B/pagoda"
  elif [ -x "$W/pagoda" ]; then echo "$W/pagoda"
  else
    echo "no pagoda binary (carry .device/bin, or run session.sh keep-bin in an earlier call)" >&2
    return 1
  fi
}

# Waits until URL answers, for at most SECONDS; 1 if it never did.
wait_http() { # URL, SECONDS
  for _ in $(seq 1 $(($2 * 2))); do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null && return 0
    sleep 0.5
  done
  return 1
}
