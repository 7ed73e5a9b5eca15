#!/usr/bin/env bash
# On the GPU machine, from the repository root, after package-device.sh built
# .device/: the device tests, the conformance suite (quick grid in bf16 and
# f16, then the full grid), compute-sanitizer memcheck and racecheck over the
# quick grid, the kernel bench, and (PAGODA_NCU=1) Nsight Compute on the two
# attention kernels. Logs go to $OUT (7 files at most); a summary prints last.
set -uo pipefail
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
export PATH="$PATH:/usr/local/cuda-13.0/bin"
OUT="${OUT:-/tmp/pagoda-gpu-check}"
mkdir -p "$OUT"
D=.device
TMP="$(mktemp -d)"

step() { # name, log, seconds, command...
  local name=$1 log=$2 secs=$3; shift 3
  local t0=$SECONDS
  echo "### $name" >>"$OUT/$log.log"
  timeout "$secs" "$@" >>"$OUT/$log.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" >>"$TMP/steps.txt"
}
: >"$TMP/steps.txt"
step device device 50 $D/device --test-threads=1 --nocapture
step quick quick 60 $D/conformance --test-threads=1 --nocapture
step bench bench 80 $D/kernels
step full full 100 $D/conformance --ignored full_grid_bf16 --nocapture
step memcheck sanitizer 55 compute-sanitizer --tool memcheck --error-exitcode 9 $D/conformance quick_grid_bf16 --test-threads=1
step racecheck sanitizer 55 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 $D/conformance quick_grid_bf16 --test-threads=1
if [ "${PAGODA_NCU:-0}" = 1 ]; then
  SECTIONS=(--section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis
    --section MemoryWorkloadAnalysis --section SchedulerStats --section LaunchStats)
  step ncu-prefill ncu 60 ncu --clock-control none --kernel-name regex:prefill_attention --launch-skip 2 --launch-count 1 \
    "${SECTIONS[@]}" $D/kernels "prefill attention 4x"
  [ "${PAGODA_NCU_DECODE:-1}" = 1 ] && step ncu-decode ncu 60 ncu --clock-control none --kernel-name regex:paged_decode_kernel --launch-skip 2 --launch-count 1 \
    "${SECTIONS[@]}" $D/kernels "decode attention b64 ctx8192"
fi

{
  echo "== gpu"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  echo "== steps"; cat "$TMP/steps.txt"
  echo "== tests"; grep -h -E "^test |test result|panicked|rel err" "$OUT/device.log" "$OUT/quick.log" "$OUT/full.log" | grep -v " ok$" | head -40
  echo "== failures"; grep -h "FAIL" "$OUT/quick.log" "$OUT/full.log" | head -30
  echo "== max errors"; grep -h "^MAXERR" "$OUT/quick.log" "$OUT/full.log"
  echo "== sanitizer"; grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race reported" "$OUT/sanitizer.log" | sort | uniq -c | head -20
  if [ -f "$OUT/ncu.log" ]; then
    echo "== ncu"; grep -E "^### |Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Cache Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued" "$OUT/ncu.log" | head -40
  fi
  echo "== bench"; tail -n 24 "$OUT/bench.log"
} | tee "$OUT/report.txt"
