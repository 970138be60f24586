#!/usr/bin/env bash
# The GPU measurements of docs/results.md, in parts, for a machine lent for a few minutes.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS] [PART...]
#
# Runs these PARTs, in this order, each under what is left of SECONDS (default 540), and starts none that
# would not finish in time (a part cut short is lost):
#   roundtrip  the app's /run round trip through gradio_client (benchmarks/app_roundtrip.py, medians of 5;
#            issue 4's GPU figure). The machines lack gradio: run `python benchmarks/device_wheels.py` here
#            first and name .whl in the call's carry; without .whl the part is skipped;
#   app      the app's /run compute alone (benchmarks/app_compute.py, median of 3, each model where the app
#            runs it; about 30 s);
#   sweep    the mnist sweep pieces that docs/results/mnist-sweep lacks (issue 5), one bench run per solver
#            and schedule with those of the variants its "done when" names (vanilla, stein, stein-cap1) that
#            the piece lacks: 2,000 samples, 3 seeds, batch 500, K = 1 (105-119 s each on an H200);
#   more     the same for the other variants (stein-safe, sc-noise, sc-lookahead), as runs of their own;
#   cost     the cost table (batch 64, K = 1 and 5, VJP and forward-difference probes; 20 s);
#   cell50k  one 50,000-sample FD-MNIST cell (63 s on an H200).
# Default: roundtrip app sweep more (cost and cell50k were measured on an H200 with the code they describe).
# Plan one call per lease: a machine left idle is given back within about 30 s, and the next call starts
# a fresh one, which repeats what the first finished. Parts work in ./gpu-work (ignored by git), where a
# finished part is skipped. After each part OUT_DIR/results.tgz holds everything finished so far, so a call
# cut short still returns it. Merge the finished sweep folders (NAME.done beside them) into the published
# sweep, with WORK the unpacked results.tgz, by
#   python benchmarks/results.py --models '' --skip-cost --merge mnist docs/results/mnist-sweep WORK/mnist-*/ --merge-into mnist-sweep
# Pieces may hold different variants; a cell held twice is refused.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [SECONDS] [PART...]}
deadline=$(($(date +%s) + ${2:-540}))
shift $(($# > 1 ? 2 : 1))
parts=" ${*:-roundtrip app sweep more} "
work=gpu-work
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1
required=vanilla,stein,stein-cap1
others=stein-safe,sc-noise,sc-lookahead

pack() { tar czf "$out/results.tgz.part" -C "$work" . && mv "$out/results.tgz.part" "$out/results.tgz"; }

part() { # part NAME LIMIT_S NEED_S COMMAND...: unless done before, or under NEED_S left, run under
    # min(LIMIT_S, time left) and log to work/NAME.log (NEED_S: its expected time)
    local name=$1 limit=$2 need=$3 left=$((deadline - $(date +%s)))
    shift 3
    if [[ -e "$work/$name.done" ]]; then echo "$name: done in an earlier call"; return; fi
    ((left < limit)) && limit=$left
    if ((limit < need)); then echo "skipped $name: $limit s left, $need s needed"; return; fi
    local start=$(date +%s) status
    timeout "$limit" "$@" </dev/null >"$work/$name.log" 2>&1  # not the input of the loops below
    status=$?
    echo "$name: exit $status after $(($(date +%s) - start)) s"
    ((status == 0)) && touch "$work/$name.done"
    pack
}

missing() { # missing VARIANTS: a line "SOLVER-SCHEDULE LACKING" for each piece of the full sweep whose cells
    # lack some of VARIANTS, LACKING those of them (a merge refuses a cell held twice)
    python3 benchmarks/results.py --missing docs/results/mnist-sweep --variants "$1"
}

sweep() { # sweep PIECE SUFFIX VARIANTS: one solver and schedule of the mnist sweep
    local piece=$1 name="mnist-$1$2"
    part "$name" 400 125 python3 -m steindiff bench --model mnist --solvers "${piece%-*}" \
        --schedules "${piece#*-}" --nfe 3,4,5,6,8,10,20 --variants "$3" --samples 2000 --seeds 0,1,2 \
        --batch 500 --probes 1 --out "$work/$name"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
    "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } >"$work/device.txt" 2>&1
cat "$work/device.txt"
if [[ $parts == *" roundtrip "* ]]; then
    if [[ -d .whl ]] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/app-site .whl/*.whl; then
        part app_roundtrip 150 60 env PYTHONPATH=/tmp/app-site python3 benchmarks/app_roundtrip.py --repeats 5
    else
        echo "skipped app_roundtrip: no .whl, or it did not install (python benchmarks/device_wheels.py here; carry .whl)"
    fi
fi
[[ $parts == *" app "* ]] && part app_compute 90 40 python3 benchmarks/app_compute.py --repeats 3
if [[ $parts == *" sweep "* ]]; then
    while read -r piece lacking; do sweep "$piece" "" "$lacking"; done < <(missing $required)
fi
if [[ $parts == *" more "* ]]; then
    while read -r piece lacking; do sweep "$piece" -more "$lacking"; done < <(missing $others)
fi
[[ $parts == *" cost "* ]] && part cost 90 30 python3 -m steindiff cost --model mnist --solver dpmpp_2m \
    --nfe 5 --batch 64 --variants stein,stein-safe --probes 1,5 --repeats 5 --device cuda
[[ $parts == *" cell50k "* ]] && part cell50k 120 75 python3 -m steindiff bench --model mnist \
    --solvers dpmpp_2m --schedules karras --nfe 5 --variants vanilla,stein-safe --samples 50000 --seeds 0 \
    --batch 500 --probes 1 --out "$work/cell50k"
pack
for log in "$work"/*.log; do echo "== $log"; tail -n 12 "$log"; done
