#!/usr/bin/env bash
# The GPU measurements of docs/results.md in one call, for a machine lent for a few minutes.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS]
#
# Runs, in order, each under what is left of SECONDS (default 540): the cost table (batch 64, K = 1
# and 5, VJP and forward-difference probes), the app's /run compute (benchmarks/app_compute.py), the
# mnist sweep of issue 5/7 as one bench run per solver and schedule (2,000 samples, 3 seeds, batch
# 500, K = 1), the pieces not yet in docs/results/mnist-h100 first, and last one 50,000-sample FD-MNIST
# cell (measured before: 21.7 s vanilla, 34.5 s stein-safe on an H100). After each part
# OUT_DIR/results.tgz holds everything so far, so a run cut short still returns what it finished. Merge
# the sweep folders, with docs/results/mnist-h100 (Heun on both schedules, DPM-Solver++(2M) on Karras),
# by `python benchmarks/results.py --models '' --skip-cost --merge mnist docs/results/mnist-h100 OUT/work/mnist-*/`
# (it writes docs/results/mnist/: move that to docs/results/mnist-h100).
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [SECONDS]}
deadline=$(($(date +%s) + ${2:-540}))
work="$out/work"
mkdir -p "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1
variants=vanilla,stein,stein-cap1,stein-safe,sc-noise,sc-lookahead

pack() { tar czf "$out/results.tgz.part" -C "$work" . && mv "$out/results.tgz.part" "$out/results.tgz"; }

part() { # part NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), log to work/NAME.log
    local name=$1 limit=$2 left=$((deadline - $(date +%s)))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 15)); then echo "skipped $name: no time left"; return; fi
    local start=$(date +%s)
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    echo "$name: exit $? after $(($(date +%s) - start)) s"
    pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
    "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } >"$work/device.txt" 2>&1
cat "$work/device.txt"
part cost 90 python3 -m steindiff cost --model mnist --solver dpmpp_2m --nfe 5 --batch 64 \
    --variants stein,stein-safe --probes 1,5 --repeats 5 --device cuda
part app_compute 60 python3 benchmarks/app_compute.py --device cuda --repeats 5
for piece in dpmpp_2m-logsnr ddim-karras ddim-logsnr unipc-karras unipc-logsnr dpmpp_3m-karras dpmpp_3m-logsnr \
    heun-karras heun-logsnr dpmpp_2m-karras; do
    part "mnist-$piece" 400 python3 -m steindiff bench --model mnist --solvers "${piece%-*}" \
        --schedules "${piece#*-}" --nfe 3,4,5,6,8,10,20 --variants "$variants" --samples 2000 \
        --seeds 0,1,2 --batch 500 --probes 1 --out "$work/mnist-$piece"
done
part cell50k 90 python3 -m steindiff bench --model mnist --solvers dpmpp_2m --schedules karras --nfe 5 \
    --variants vanilla,stein-safe --samples 50000 --seeds 0 --batch 500 --probes 1 --out "$work/cell50k"
for log in "$work"/*.log; do echo "== $log"; tail -n 12 "$log"; done
