#!/usr/bin/env bash
# The Fashion-MNIST GPU study (experiments/fashion-mnist-gpu.yaml) as one command, for a machine without network:
#   experiments/fashion-mnist-gpu.sh            the full study, stopped after STUDY_TIMEOUT seconds (default 480)
#   experiments/fashion-mnist-gpu.sh --smoke    2 seeds of 3 variants, 1 epoch on 512 images: a check, not a result
# Writes under $OUT (default /tmp/fashion-mnist-gpu-out): results.tar.gz (study.yaml, timings.csv, report, figures, every run's
# config, metrics and analysis/*.nc; no checkpoints), study.log, gpu-utilisation.csv (nvidia-smi every 0.5 s),
# summary.txt (GPU name, exit status, wall time, images/s, mean GPU utilisation). Installs nothing from a
# registry: wheels in .carry/whl and data in .carry/data are used when present (experiments/fashion-mnist-gpu.md).
set -u
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/fashion-mnist-gpu-out}
WORK=${WORK_DIR:-$(mktemp -d /tmp/fashion-mnist-gpu.XXXX)}
LIMIT=${STUDY_TIMEOUT:-480}
JOBS=${JOBS:-7}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".carry/whl/*.whl" > /dev/null; then
  pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -d .carry/data ] && export LANDSCAPE_DATA_DIR=$PWD/.carry/data
STUDY=experiments/fashion-mnist-gpu.yaml
if [ $SMOKE = 1 ]; then
  STUDY=$WORK/smoke.yaml
  JOBS=${JOBS_SMOKE:-2}
  python3 - "$STUDY" <<'PY' || exit 1
import sys, yaml
spec = yaml.safe_load(open("experiments/fashion-mnist-gpu.yaml"))
spec["name"] += "-smoke"
spec["seeds"] = 2
spec["variants"] = [v for v in spec["variants"] if v["name"] in ("baseline", "grouped-g2", "mlit")]
spec["overrides"].update({"epochs": 1, "batch_size": 64, "data.train_size": 512, "data.val_size": 256})
spec["analysis"].update({"samples": 16, "checkpoints": "all", "trace_matvecs": 2, "density_probes": 1,
                         "density_steps": 4, "sharpness_steps": 1, "sharpness_draws": 1, "surface_points": 5,
                         "surface_points_2d": 3, "rhos": [0.05], "adaptive_rhos": [0.5]})
yaml.safe_dump(spec, open(sys.argv[1], "w"), sort_keys=False)
PY
fi

python3 - > "$OUT/device.txt" 2>&1 <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device)")
PY
SMI=
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,name,utilization.gpu,memory.used,power.draw --format=csv,nounits -lms 500 \
    > "$OUT/gpu-utilisation.csv" 2> /dev/null &
  SMI=$!
fi
START=$(date +%s.%N)
timeout --signal=INT --kill-after=30 "$LIMIT" python3 -m landscape study "$STUDY" --out "$WORK/study" --jobs "$JOBS" \
  > "$OUT/study.log" 2>&1
RC=$?
END=$(date +%s.%N)
[ -n "$SMI" ] && kill "$SMI" 2> /dev/null

python3 - "$WORK/study" "$OUT" "$RC" "$START" "$END" "$LIMIT" > "$OUT/summary.txt" 2>&1 <<'PY'
import csv, glob, os, sys
study, out, rc, start, end, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
print(open(os.path.join(out, "device.txt")).read().strip())
print(f"exit status {rc}{' (stopped by the time limit of ' + limit + ' s)' if rc in (124, 130, 137) else ''}")
print(f"wall time {end - start:.1f} s")
images, longest, per_run = 0, 0.0, []
for path in sorted(glob.glob(os.path.join(study, "runs", "*", "metrics.csv"))):
    rows = list(csv.DictReader(open(path)))
    if rows:
        images += int(rows[-1]["images_seen"])
        longest = max(longest, float(rows[-1]["wall_time"]))
        per_run += [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
print(f"runs with metrics {len(glob.glob(os.path.join(study, 'runs', '*', 'metrics.csv')))}, images trained {images}")
if longest:
    print(f"training images/s, all runs together: {images / longest:.0f} (images over the longest run's wall time)")
if per_run:
    print(f"training images/s of one run (mean over metrics rows): {sum(per_run) / len(per_run):.0f}")
util = os.path.join(out, "gpu-utilisation.csv")
if os.path.exists(util):
    values = [float(r[2]) for r in csv.reader(open(util)) if len(r) > 2 and r[2].strip().replace(".", "").isdigit()]
    if values:
        print(f"GPU utilisation: mean {sum(values) / len(values):.0f}%, samples {len(values)}, "
              f"busy (>0%) {100 * sum(v > 0 for v in values) / len(values):.0f}% of the time")
timings = os.path.join(study, "timings.csv")
if os.path.exists(timings):
    print(open(timings).read().strip())
PY
tar czf "$OUT/results.tar.gz" --exclude=checkpoints --exclude=state --exclude='*.lock' -C "$WORK" study 2> /dev/null
cat "$OUT/summary.txt"
exit $RC
