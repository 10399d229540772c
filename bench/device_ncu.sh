#!/usr/bin/env bash
# Nsight Compute counters of one power retention fwd+bwd (bench/ncu_retention.py) on the device.
# Usage (repo root, after device_session.sh built the package): [NCU_T="65536 2048"] [NCU_D=64]
#   [NCU_KERNELS=regex] [NCU_SECTIONS="..."] [BUDGET_S=240] bash bench/device_ncu.sh
#   -> $OUT/ncu/t<T>/{details.txt,raw.csv,source.csv}
set -uo pipefail
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu"; exit 1; }
secs=${NCU_SECTIONS:-"SpeedOfLight ComputeWorkloadAnalysis MemoryWorkloadAnalysis Occupancy LaunchStats WarpStateStats SchedulerStats InstructionStats SourceCounters"}
args=(); for s in $secs; do args+=(--section "$s"); done
ts=(${NCU_T:-65536 2048})
per=$(( ${BUDGET_S:-240} / ${#ts[@]} - 10 ))
for t in "${ts[@]}"; do
  R=$OUT/ncu/t$t; mkdir -p "$R"
  (cd bench && timeout $per "$NCU" --profile-from-start off --clock-control none --target-processes all \
    -k "regex:${NCU_KERNELS:-.}" "${args[@]}" -o "$R/rep" -f \
    python3 ncu_retention.py --t "$t" --d "${NCU_D:-64}" > "$R/run.log" 2>&1)
  echo "t=$t ncu rc=$?"; tail -3 "$R/run.log"
  "$NCU" --import "$R/rep.ncu-rep" --page details > "$R/details.txt" 2>&1
  "$NCU" --import "$R/rep.ncu-rep" --page raw --csv > "$R/raw.csv" 2>&1
  "$NCU" --import "$R/rep.ncu-rep" --page source --csv --print-source sass > "$R/source.csv" 2>&1 || true
  gzip -f "$R/source.csv" "$R/raw.csv"; rm -f "$R/rep.ncu-rep"
  ls -la "$R"
  grep -E "^  [a-zA-Z_]|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible" "$R/details.txt" | head -80
done
