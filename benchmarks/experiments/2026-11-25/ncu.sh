set -x
export PYTHONPATH=.
ncu --version | tail -1
ncu --clock-control none --profile-from-start off --set full --import-source no -o $OUT/gemv python3 benchmarks/experiments/2026-11-25/ncu_gemv.py down o > $OUT/ncu_log.txt 2>&1
tail -5 $OUT/ncu_log.txt
ncu -i $OUT/gemv.ncu-rep --page details > $OUT/details.txt 2>&1
ncu -i $OUT/gemv.ncu-rep --page raw --csv > $OUT/raw.csv 2>&1
ncu -i $OUT/gemv.ncu-rep --page source --print-source sass --csv --launch-skip 1 --launch-count 1 > $OUT/sass_down50.csv 2>&1
ls -la $OUT
grep -E "^  [a-z_]|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|One or More|Stall" $OUT/details.txt | head -150
