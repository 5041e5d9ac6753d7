#!/usr/bin/env bash
# gpu_check.sh - device check of distill on ONE CUDA GPU (sized for one H200: under 8 minutes in all, offline).
#
# Run it from the repository root (the checkout that holds distill/ and tests/):
#     bash benchmarks/gpu_check.sh      # results under $OUT when set, else /tmp/gpu_check_out
# Environment knobs: PYTHON (default python), GPU_CHECK_BUDGET (seconds, default 450), NUM_WORKERS (default nproc-2, max 16).
# Nothing is downloaded: models are built by timm with random weights, data is the embedded digits and, when the
# checkout's shared data is present (shared/data or ../shared/data), CIFAR-10 JPEGs.
#
# What it measures (each step has its own time limit and the whole script a deadline):
#   0. environment: torch/timm/accelerate importable (exits 3 if not), CUDA present (exits 4 if not), versions
#   1. probe (python, below): host-device syncs per training step (torch.cuda.set_sync_debug_mode) for distill's own
#      engine.train_step + EMA + LR scheduler with a RegNetY-16GF teacher, bf16 (clip off/on) and fp16; teacher
#      frozen/eval/no grads/channels-last; TF32 and cudnn.benchmark as distill leaves them and what they are worth
#      (fp32 DeiT-S step with TF32 off/on, RegNetY-16GF forward with cudnn.benchmark off/on); whether
#      `accelerate launch --mixed_precision bf16` reaches distill; peak memory of DeiT-B/16@384 batch 64 with a
#      RegNetY-16GF teacher @384 (the fine-tune stage's shape)
#   2. distill benchmark deit_small/deit_tiny (distilled, token) with a regnety_160 teacher, 224 px, bf16:
#      synthetic-batch step rates and the +data rates (CIFAR-10 JPEGs resized to 224 when present, else digits);
#      with CIFAR-10, --data: the loader alone (CPU ms per image by part, cores one GPU needs at each measured step)
#   3. distill pipeline quickstart (digits) end to end on CUDA in bf16 (epochs cut to 2), then again: all reused
#   4. student step throughput: RegNetY-16GF teacher (1 short epoch) then DeiT-S distilled student at 224 px,
#      bf16, batch 128, 100 steps on real JPEGs (CIFAR-10 subset) with NUM_WORKERS loader workers: img/s of the
#      real loop (loader included) against the synthetic rate of step 2
#   5. pytest, the device-agnostic subset that runs its stages on CUDA here: test_losses, test_transforms (uint8
#      batches finished on the GPU equal torchvision on the CPU, bit for bit), test_student, test_teach
#      (minus the CPU-only bf16 test), test_finetune, test_cache, test_transfer; then the two bit-exact resume
#      tests of test_reliability (do kill-and-resume runs end bit-identical on CUDA?). Left out on purpose:
#      test_speed (asserts CPU defaults), test_multiprocess (two processes need two GPUs with NCCL),
#      test_teach::test_bf16_autocast_runs_on_cpu (a CPU layer under a CUDA accelerator's autocast).
#   A final table (also summary.txt in the results folder) lists each check with its result.
# CLAIMS=1 runs, instead of steps 1-5, benchmarks/deit_claims.py --scale gpu (the paper's distillation claims on
# CIFAR-10, one seed; GPU_CHECK_BUDGET=480 for its 8 minutes) and copies its tables into the results folder.
set -u
START=$SECONDS
DEADLINE=${GPU_CHECK_BUDGET:-450}
OUT_DIR=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
trap 'rmdir "$WORK" 2> /dev/null' EXIT  # an early exit leaves no empty work folder
PY=${PYTHON:-python}
REPO=$PWD
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=offline
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 COLUMNS=200 TERM=dumb
RESULTS="$OUT_DIR/results.tsv"
: > "$RESULTS"

row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RESULTS"; }
left() { echo $(( DEADLINE - (SECONDS - START) )); }
step() {  # step NAME LIMIT CMD...: runs CMD with timeout min(LIMIT, time left - 15 s); log in $OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local room=$(( $(left) - 15 ))
  (( limit > room )) && limit=$room
  if (( limit < 20 )); then row "$name" SKIP "no time left"; echo "== $name: skipped, no time left"; return 99; fi
  echo "== $name (limit ${limit}s, $(( SECONDS - START ))s elapsed)"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local took=$(( SECONDS - t0 ))
  echo "   rc=$rc after ${took}s"; tail -n 6 "$OUT_DIR/$name.log" | cut -c1-180 | sed 's/^/   | /'
  if (( rc == 124 || rc == 137 )); then row "$name" TIMEOUT "${took}s (limit ${limit}s)"
  elif (( rc == 0 )); then row "$name" ok "${took}s"
  else row "$name" FAIL "rc=$rc after ${took}s, see $name.log"; fi
  return $rc
}

# ---- 0. environment -----------------------------------------------------------------------------------------------
echo "== environment"
if ! $PY -c 'import torch, timm, accelerate' 2> "$OUT_DIR/import-error.log"; then
  echo "MISSING: 'import torch, timm, accelerate' fails with $PY ($(tail -n 1 "$OUT_DIR/import-error.log"))."
  echo "Install the project's wheels first (offline: pip install --no-index --find-links WHEELS -e '.[test]'), or set PYTHON."
  exit 3
fi
$PY - <<'EOF' | tee "$OUT_DIR/environment.txt"
import importlib.util, os, torch, timm, accelerate
print(f"python ok; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
      f"timm {timm.__version__}, accelerate {accelerate.__version__}, CPUs {os.cpu_count()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
missing = [m for m in ("distill", "datasets", "safetensors", "typer", "rich", "sklearn", "tomli_w", "PIL", "numpy", "pytest")
           if importlib.util.find_spec(m) is None]
print("missing modules:", ", ".join(missing) if missing else "none")
EOF
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "NO CUDA: torch sees no GPU on this machine; this check is for a CUDA device."; exit 4
fi
if ! $PY -c 'import distill, datasets, safetensors, typer, rich, sklearn, tomli_w' 2>> "$OUT_DIR/import-error.log"; then
  echo "MISSING: distill's own dependencies are not importable (see $OUT_DIR/import-error.log)."; exit 3
fi
NCPU=$(nproc)
NW=${NUM_WORKERS:-$(( NCPU > 4 ? NCPU - 2 : 2 ))}; (( NW > 16 )) && NW=16
CIFAR=""
for archive in "$REPO/shared/data/cifar10.tar.gz" "$REPO/../shared/data/cifar10.tar.gz"; do
  if [[ -f "$archive" ]]; then
    mkdir -p "$WORK/cifar10" && tar -xzf "$archive" -C "$WORK/cifar10" && CIFAR="$WORK/cifar10"; break
  fi
done
echo "   loader workers: $NW; CIFAR-10 JPEGs: ${CIFAR:-absent (digits used instead)}"
row environment ok "$(head -n 2 "$OUT_DIR/environment.txt" | tail -n 1)"

# ---- CLAIMS=1: instead of the checks below, the paper's claims at GPU scale (benchmarks/deit_claims.py --scale gpu) --
if [[ "${CLAIMS:-0}" == 1 ]]; then
  archive=$(ls "$REPO/shared/data/cifar10.tar.gz" "$REPO/../shared/data/cifar10.tar.gz" 2> /dev/null | head -n 1)
  step claims $(( DEADLINE - 30 )) $PY benchmarks/deit_claims.py --scale gpu --seeds 0 --cifar "$archive" \
    --workdir "$WORK/claims"
  cp benchmarks/results/deit_claims-gpu*.{json,md} "$OUT_DIR/" 2> /dev/null
  column -t -s $'\t' "$RESULTS"; exit 0
fi

# ---- 1. probe: syncs, frozen teacher, TF32/cudnn.benchmark, launcher precision, DeiT-B@384 memory ------------------
cat > "$WORK/probe.py" <<'EOF'
"""distill's training step on this device: host syncs, the frozen teacher, TF32/cudnn.benchmark, memory.
PROBE_SMOKE=1 runs it on a CPU with tiny models (to test this script without a GPU)."""
import gc, json, os, sys, time, warnings

import timm
import torch
from timm.scheduler import create_scheduler_v2
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from distill.config import auto_precision
from distill.data import NORMS
from distill.training.processes import make_accelerator
from distill.training.step import LossWatch, Prepared, TargetMixup, train_step
from distill.training.evaluation import bare
from distill.losses import DistillationLoss, base_criterion
from distill.speed import channels_last, choose_kernels, to_channels_last
from distill.students import set_distilled_training
from distill.teachers import FrozenTeacher

SMOKE = os.environ.get("PROBE_SMOKE") == "1"
CUDA = torch.cuda.is_available() and not SMOKE
out = {"smoke": SMOKE}
sync = torch.cuda.synchronize if CUDA else (lambda: None)
TINY = {"patch_size": 8, "depth": 1} if SMOKE else {}


def report(key, value):
    out[key] = value
    print(f"{key}: {value}", flush=True)


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def setup(student_name, teacher_name, res, batch, precision, kind="hard", ema=True):
    """What Run._fit builds, minus the data: a prepared student, a frozen (channels-last) teacher in the loss,
    timm's Mixup/CutMix, AdamW, cosine schedule, EMA; returns (acc, parts, teacher, one_step)."""
    acc = make_accelerator(precision)
    dev = acc.device
    student = timm.create_model(student_name, pretrained=False, num_classes=1000, img_size=res, drop_path_rate=0.1, **TINY)
    set_distilled_training(student, True)
    teacher = None
    if teacher_name:
        teacher_model = timm.create_model(teacher_name, pretrained=False, num_classes=1000)
        if channels_last(None, dev.type, precision):
            to_channels_last([teacher_model])
        teacher = FrozenTeacher(teacher_model, NORMS["imagenet"], NORMS["imagenet"]).to(dev)
    choose_kernels(acc, [student, teacher])
    optimizer = create_optimizer_v2(student, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=10, warmup_epochs=1, warmup_lr=1e-6,
                                       min_lr=1e-5, step_on_epochs=False, updates_per_epoch=100)
    model, optimizer = acc.prepare(student, optimizer)
    criterion = DistillationLoss(base_criterion(0.1, True), teacher, kind if teacher else "none", 0.5, 1.0).to(dev)
    mixup = TargetMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    ema_model = ModelEmaV3(bare(acc, model), decay=0.99996) if ema else None
    parts = Prepared(model, optimizer, scheduler, criterion, mixup, ema_model, None, 0, [model])
    images, labels = torch.randn(batch, 3, res, res), torch.randint(0, 1000, (batch,))
    if dev.type == "cuda":  # the training loader pins its batches on a GPU
        images, labels = images.pin_memory(), labels.pin_memory()
    watch = LossWatch(acc)
    state = {"clip": None}

    def one(i):  # one iteration of Run._train_epoch, without the loader and the logging
        loss = train_step(acc, parts, (images, labels), state["clip"])
        watch.add(loss, i + 1)
        scheduler.step_update(num_updates=i + 1)
        if ema_model is not None:
            ema_model.update(bare(acc, model))
        return loss

    return acc, parts, teacher, one, state


def timed(fn, steps, warm):
    for i in range(warm):
        fn(i)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        fn(warm + i)
    sync()
    return (time.perf_counter() - t) / steps


def syncs(fn, steps, offset=1000):
    """Synchronising CUDA calls made by `steps` iterations (torch.cuda.set_sync_debug_mode), and where from."""
    if not CUDA:
        return "n/a (cpu)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                fn(offset + i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in found})
    return f"{len(found)} in {steps} steps" + (f" (from {', '.join(where[:6])})" if where else "")


report("device", torch.cuda.get_device_name(0) if CUDA else "cpu")
report("tf32_matmul_as_distill_leaves_it", torch.backends.cuda.matmul.allow_tf32)
report("cudnn_benchmark_as_distill_leaves_it", torch.backends.cudnn.benchmark)

# accelerate launch --mixed_precision bf16 (or `accelerate config`) sets ACCELERATE_MIXED_PRECISION; distill's default
# --mixed-precision auto takes it, else bf16 on a GPU that has it
os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
report("launcher_asks_bf16_distill_auto_runs", auto_precision()[0])
os.environ["ACCELERATE_MIXED_PRECISION"] = "no"  # what accelerate launch sets when nothing is configured
report("launcher_default_distill_auto_runs", auto_precision()[0])
del os.environ["ACCELERATE_MIXED_PRECISION"]
report("no_launcher_distill_auto_runs", auto_precision()[0])
make_accelerator("no", deterministic=True)
report("deterministic_kernels_and_no_cudnn_benchmark", (torch.are_deterministic_algorithms_enabled(),
                                                        torch.backends.cudnn.benchmark))
make_accelerator("no")  # as the tools (evaluate, predict, benchmark) make it: full fp32
report("tf32_for_the_tools", torch.backends.cuda.matmul.allow_tf32)
make_accelerator("no", tf32=True)  # as a training run makes it
report("tf32_after_make_accelerator", torch.backends.cuda.matmul.allow_tf32)
report("cudnn_benchmark_after_make_accelerator", torch.backends.cudnn.benchmark)

# A. DeiT-S (token) + RegNetY-16GF teacher, hard distillation, 224 px, bf16, batch 128: syncs, rate, frozen teacher
S, T = ("deit_small_distilled_patch16_224", "regnety_160") if not SMOKE else ("deit_tiny_distilled_patch16_224", "regnety_002")
RES, B = (224, 128) if not SMOKE else (32, 8)
acc, parts, teacher, one, state = setup(S, T, RES, B, "bf16")
step_s = timed(one, 2 if SMOKE else 15, 2 if SMOKE else 5)
report("deit_s_regnety160_bf16_step_ms", round(step_s * 1e3, 1))
report("deit_s_regnety160_bf16_img_s", round(B / step_s))
report("syncs_bf16_clip_off", syncs(one, 2 if SMOKE else 10))
state["clip"] = 1.0
report("syncs_bf16_clip_1", syncs(one, 2 if SMOKE else 10))
conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
report("teacher_frozen_eval_no_grads_channels_last", {  # the wrapped model's modules (FrozenTeacher's own flag is unused)
    "any_module_training": any(m.training for m in teacher.model.modules()),
    "any_requires_grad": any(p.requires_grad for p in teacher.parameters()),
    "any_grad": any(p.grad is not None for p in teacher.parameters()),
    "channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last)})
report("peak_mem_gib_deit_s_regnety160_b128", round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else "n/a")

# B. cudnn.benchmark on the teacher's forward (the biggest cost of a teacher-on-the-fly step), NCHW input as a ViT gives
images = torch.randn(B, 3, RES, RES, device=acc.device)
def teacher_fwd(_):
    with acc.autocast():
        return teacher(images)
for flag in (False, True):
    torch.backends.cudnn.benchmark = flag
    report(f"regnety160_fwd_bf16_ms_cudnn_benchmark_{flag}", round(timed(teacher_fwd, 2 if SMOKE else 10, 1 if SMOKE else 3) * 1e3, 2))
torch.backends.cudnn.benchmark = False
del acc, parts, teacher, one, images
free()

# C. an fp32 run (--mixed-precision no, or auto without bf16): a DeiT-S fp32 step with TF32 off and on (distill: on)
acc, parts, _, one, _ = setup(S, None, RES, B, "no", ema=False)
for flag in (False, True):
    torch.backends.cuda.matmul.allow_tf32 = flag
    report(f"deit_s_fp32_step_ms_tf32_{flag}", round(timed(one, 2 if SMOKE else 5, 1 if SMOKE else 2) * 1e3, 1))
torch.backends.cuda.matmul.allow_tf32 = False
del acc, parts, one
free()

# D. fp16: GradScaler's inf check is a host sync per optimizer step (torch's, not distill's)
if CUDA:
    acc, parts, _, one, _ = setup("deit_tiny_distilled_patch16_224", None, 224, 64, "fp16", ema=False)
    timed(one, 2, 2)
    report("syncs_fp16", syncs(one, 5))
    del acc, parts, one
    free()

# E. memory of the fine-tune stage's shape: DeiT-B/16 (token) @384, batch 64, RegNetY-16GF teacher @384, bf16, EMA
Sb, Rb, Bb = ("deit_base_distilled_patch16_384", 384, 64) if not SMOKE else ("deit_tiny_distilled_patch16_224", 32, 8)
try:
    acc, parts, teacher, one, _ = setup(Sb, T, Rb, Bb, "bf16")
    step_s = timed(one, 2 if SMOKE else 3, 1 if SMOKE else 2)
    report("deit_b384_regnety160_384_b64_step_ms", round(step_s * 1e3, 1))
    report("deit_b384_regnety160_384_b64_peak_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else "n/a")
except torch.OutOfMemoryError as error:
    report("deit_b384_regnety160_384_b64_peak_gib", f"OOM: {str(error).splitlines()[0]}")

json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
EOF
step probe 150 $PY "$WORK/probe.py" "$OUT_DIR/probe.json"

# ---- 2. distill benchmark -----------------------------------------------------------------------------------------
BENCH_DATA=()
[[ -n "$CIFAR" ]] && BENCH_DATA=(--data-dir "$CIFAR" --data "$CIFAR")  # --data: the loader alone, by part
step benchmark 130 $PY -m distill benchmark deit_small_distilled_patch16_224 deit_tiny_distilled_patch16_224 \
  --teacher regnety_160 --img-size 224 --mixed-precision bf16 --batch-size 128 --steps 10 --warmup 3 \
  --num-workers "$NW" ${BENCH_DATA[@]+"${BENCH_DATA[@]}"} --json "$OUT_DIR/bench.json"

# ---- 3. tiny pipeline on the digits, CUDA, bf16; then the same command again (everything reused) --------------------
step pipeline 110 $PY -m distill pipeline quickstart --workdir "$WORK/pipe" --mixed-precision bf16 --num-workers 4 \
  --set epochs=2 --set finetune.teacher_epochs=1
step pipeline-reuse 40 $PY -m distill pipeline quickstart --workdir "$WORK/pipe" --mixed-precision bf16 --num-workers 4 \
  --set epochs=2 --set finetune.teacher_epochs=1

# ---- 4. student step throughput through the real loop -------------------------------------------------------------
if [[ -n "$CIFAR" ]]; then
  step throughput-teacher 60 $PY -m distill teach --data-dir "$CIFAR" --workdir "$WORK/tp" --model regnety_160 \
    --img-size 224 --epochs 1 --train-subset 512 --batch-size 128 --mixed-precision bf16 --num-workers "$NW" \
    --warmup-epochs 0
  step throughput-student 90 $PY -m distill student --workdir "$WORK/tp" --teacher "$WORK/tp/teach" \
    --model deit_small --img-size 224 --epochs 1 --train-subset 12800 --batch-size 128 --mixed-precision bf16 \
    --num-workers "$NW" --distillation hard --profile deit --warmup-epochs 0 --log-every 20
else  # the digits (718 images of classes 0-4, 32 px upsampled): short epochs, loader start-up weighs more
  step throughput-student 90 $PY -m distill student --workdir "$WORK/pipe" --teacher "$WORK/pipe/teach" \
    --name student-throughput --model deit_small --img-size 224 --epochs 3 --batch-size 128 --mixed-precision bf16 \
    --num-workers "$NW" --distillation hard --profile deit --warmup-epochs 0 --log-every 2
fi

# ---- 5. tests --------------------------------------------------------------------------------------------------------
if $PY -c 'import pytest' 2> /dev/null; then
  step pytest-stages 150 $PY -m pytest -q -p no:cacheprovider tests/test_losses.py tests/test_transforms.py tests/test_student.py \
    tests/test_teach.py tests/test_finetune.py tests/test_cache.py tests/test_transfer.py -k "not bf16_autocast_runs_on_cpu"
  step pytest-resume-exact 90 $PY -m pytest -q -p no:cacheprovider tests/test_reliability.py \
    -k "resume_after_sigkill or resumes_its_projection_exactly"
else
  row pytest SKIP "pytest is not installed"
fi

# ---- summary --------------------------------------------------------------------------------------------------------
$PY - "$OUT_DIR" "$WORK" "$(( SECONDS - START ))" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, re, sys
from pathlib import Path
out, work, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = [line.split("\t") for line in (out / "results.tsv").read_text().splitlines() if line.strip()]
status = {name: (state, detail) for name, state, detail in rows}
table = []
def add(check, result):
    table.append((check, str(result)))
for name, state, detail in rows:
    add(name, f"{state} {detail}")
probe = json.loads((out / "probe.json").read_text()) if (out / "probe.json").exists() else {}
for key in ("launcher_asks_bf16_distill_runs", "tf32_after_make_accelerator", "cudnn_benchmark_after_make_accelerator",
            "syncs_bf16_clip_off", "syncs_bf16_clip_1", "syncs_fp16", "teacher_frozen_eval_no_grads_channels_last",
            "deit_s_regnety160_bf16_img_s", "peak_mem_gib_deit_s_regnety160_b128",
            "regnety160_fwd_bf16_ms_cudnn_benchmark_False", "regnety160_fwd_bf16_ms_cudnn_benchmark_True",
            "deit_s_fp32_step_ms_tf32_False", "deit_s_fp32_step_ms_tf32_True",
            "deit_b384_regnety160_384_b64_step_ms", "deit_b384_regnety160_384_b64_peak_gib"):
    if key in probe:
        add(f"  probe {key}", probe[key])
if (out / "bench.json").exists():
    bench = json.loads((out / "bench.json").read_text())
    loader = bench.get("loader") if isinstance(bench, dict) else None
    if loader:
        add("  bench loader alone", f"{loader['loader_ms']} ms CPU/img, {loader['images_per_s_per_core']} img/s per core, "
            f"{loader['loader_img_s']} img/s with {loader['workers']} workers; cores per GPU {loader['cores_per_gpu']}")
    for r in (bench["models"] if isinstance(bench, dict) else bench):
        add(f"  bench {r['model']}", "img/s infer {infer_img_s}, train alone {train_alone_img_s} (+data {train_alone_data_img_s}), "
            "teacher {train_teacher_img_s} (+data {train_teacher_data_img_s}), cached {train_cached_img_s} "
            "(+data {train_cached_data_img_s}); peak {peak_memory_mb} MB".format(**{k: r.get(k, "-") for k in (
                "infer_img_s", "train_alone_img_s", "train_alone_data_img_s", "train_teacher_img_s",
                "train_teacher_data_img_s", "train_cached_img_s", "train_cached_data_img_s", "peak_memory_mb")}))
try:
    from distill.weights.checkpoint import read_checkpoint
    for run in sorted((work / "pipe").glob("*/model.safetensors")):
        m = read_checkpoint(run).meta.get("metrics", {})
        add(f"  pipeline {run.parent.name}", f"top-1 {m.get('top1')} ({m.get('precision')}, {m.get('img_size')} px), "
            f"train {m.get('train_seconds')} s")
except Exception as error:  # the table still prints
    add("  pipeline", f"unreadable: {error}")
log = out / "pipeline-reuse.log"
if log.exists():
    add("  pipeline second run", "all reused" if log.read_text().count("reused") >= 4 else "NOT all reused (see log)")
for path in sorted(set(work.glob("tp/*/metrics.jsonl")) | set(work.glob("pipe/student-throughput/metrics.jsonl"))):
    if True:
        lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        for l in lines:
            add(f"  loop {path.parent.name} epoch {l.get('epoch')}", f"{l.get('img_per_s')} img/s "
                f"({l.get('epoch_time_s')} s train, {l.get('eval_time_s')} s eval, top-1 {l.get('top1')})")
for name in ("pytest-stages", "pytest-resume-exact"):
    log = out / f"{name}.log"
    if log.exists():
        tail = [l for l in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
        add(f"  {name}", tail[-1].strip("= ") if tail else "no summary line")
        add(f"  {name} failures", "; ".join(sorted({l.split(" - ")[0] for l in log.read_text().splitlines()
                                                       if l.startswith(("FAILED", "ERROR"))}))[:300] or "none")
width = max(len(c) for c, _ in table)
print(f"\n==== gpu_check summary ({seconds} s) ====")
for check, result in table:
    print(f"{check:<{width}}  {result}")
EOF
echo "logs and JSON: $OUT_DIR   (work folder: $WORK)"
