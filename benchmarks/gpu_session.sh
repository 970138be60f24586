#!/usr/bin/env bash
# The GPU measurements of docs/results.md, in parts, for a machine lent for a few minutes.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS]
#
# Runs, in order, each under what is left of SECONDS (default 540):
#   1. the app's /run compute (benchmarks/app_compute.py; issue 4's GPU figure);
#   2. the mnist sweep pieces missing from docs/results/mnist-h100 (issue 5), one bench run per solver
#      and schedule with the variants its "done when" names (vanilla, stein, stein-cap1): 2,000 samples,
#      3 seeds, batch 500, K = 1 (estimated 100 s each on an H100, against 193 s measured with six variants);
#   3. the cost table (batch 64, K = 1 and 5, VJP and forward-difference probes);
#   4. the same pieces' other variants (stein-safe, sc-noise, sc-lookahead), as runs of their own;
#   5. one 50,000-sample FD-MNIST cell (measured before: 21.7 s vanilla, 34.5 s stein-safe on an H100).
# Parts work in ./gpu-work (ignored by git), which a warm machine keeps between calls: a part that
# finished is skipped, so calling again goes on where the last call stopped. After each part
# OUT_DIR/results.tgz holds everything finished so far, so a call cut short still returns it. Merge the
# finished sweep folders (NAME.done beside them) with docs/results/mnist-h100 (Heun on both schedules,
# DPM-Solver++(2M) on Karras) by
# `python benchmarks/results.py --models '' --skip-cost --merge mnist docs/results/mnist-h100 WORK/mnist-*/`
# with WORK the unpacked results.tgz (it writes docs/results/mnist/: move that to docs/results/mnist-h100).
# Pieces may hold different variants; a cell held twice is refused.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [SECONDS]}
deadline=$(($(date +%s) + ${2:-540}))
work=gpu-work
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1
pieces="dpmpp_2m-logsnr ddim-karras ddim-logsnr unipc-karras unipc-logsnr dpmpp_3m-karras dpmpp_3m-logsnr"

pack() { tar czf "$out/results.tgz.part" -C "$work" . && mv "$out/results.tgz.part" "$out/results.tgz"; }

part() { # part NAME LIMIT_S COMMAND...: unless done before, run under min(LIMIT_S, time left), log to work/NAME.log
    local name=$1 limit=$2 left=$((deadline - $(date +%s)))
    shift 2
    if [[ -e "$work/$name.done" ]]; then echo "$name: done in an earlier call"; return; fi
    ((left < limit)) && limit=$left
    if ((limit < 15)); then echo "skipped $name: no time left"; return; fi
    local start=$(date +%s) status
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    status=$?
    echo "$name: exit $status after $(($(date +%s) - start)) s"
    ((status == 0)) && touch "$work/$name.done"
    pack
}

sweep() { # sweep PIECE SUFFIX VARIANTS: one solver and schedule of the mnist sweep
    local piece=$1 name="mnist-$1$2"
    part "$name" 400 python3 -m steindiff bench --model mnist --solvers "${piece%-*}" --schedules "${piece#*-}" \
        --nfe 3,4,5,6,8,10,20 --variants "$3" --samples 2000 --seeds 0,1,2 --batch 500 --probes 1 \
        --out "$work/$name"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
    "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } >"$work/device.txt" 2>&1
cat "$work/device.txt"
part app_compute 90 python3 benchmarks/app_compute.py --device cuda --repeats 5
for piece in $pieces; do sweep "$piece" "" vanilla,stein,stein-cap1; done
part cost 90 python3 -m steindiff cost --model mnist --solver dpmpp_2m --nfe 5 --batch 64 \
    --variants stein,stein-safe --probes 1,5 --repeats 5 --device cuda
for piece in $pieces; do sweep "$piece" -more stein-safe,sc-noise,sc-lookahead; done
part cell50k 90 python3 -m steindiff bench --model mnist --solvers dpmpp_2m --schedules karras --nfe 5 \
    --variants vanilla,stein-safe --samples 50000 --seeds 0 --batch 500 --probes 1 --out "$work/cell50k"
pack
for log in "$work"/*.log; do echo "== $log"; tail -n 12 "$log"; done
