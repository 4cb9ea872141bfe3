"""CPU latency, peak memory and calibration time of W8A8 INT8 inference against fp32 and two peers.

One run measures, for a BERT-base-size model (12 layers, hidden 768, FFN 3072) and an OPT-125m-size
model (same body), batch 8 x sequence 128, base models without task heads (every method quantizes
the same linear layers), random weights (BERT's initialisation; latency depends on the values only
through the share of weights our AVX2 kernel splits off and the share of its steps that add two quads
in int16, recorded as `split_off_weight_share` and `paired_step_share`):

    fp32 eager                PyTorch, the fp32 checkpoint
    fp32 torch.compile        the same through torch.compile (inductor; the warm-up forward compiles)
    ours int8 (PyTorch)       our INT8 checkpoint (16 calibration batches, the papers' W8A8 setting)
                              reloaded with from_pretrained, the route `auto` picks: our AVX2 kernel's
                              activation quantizers and attention products (torch.ops.hf_quantizable)
                              on x86 with AVX2, and per layer shape the faster GEMM, timed at load
                              (our AVX2 kernel's or oneDNN's)
    ours int8 (PyTorch, AVX2 kernel)  the same with HF_QUANTIZABLE_INT8_KERNEL=avx2
    ours int8 (PyTorch, oneDNN GEMM)  the same with HF_QUANTIZABLE_INT8_KERNEL=onednn (oneDNN's uint8 x
                              int8 GEMMs, the activation quantizers and attention products as torch ops)
    ours int8 (PyTorch, torch.compile)  `auto`'s route through torch.compile (inductor)
    ours int8 (onnxruntime)   the same INT8 model through hf_quantizable.quantization.onnx_export
    onnxruntime fp32          the fp32 model through the same export (the like-for-like ratio)
    torch.ao dynamic int8     torch.ao.quantization.quantize_dynamic (int8 weights, dynamic activations;
                              its x86 linear quantizes activations to 7 bits, `reduce_range`, so its
                              int16 pair sums cannot saturate: the comparison point for our exact split)
    quanto W8A8               optimum-quanto quantize(weights=qint8, activations=qint8) + Calibration + freeze

Every row runs in its own subprocess (which loads its model from the files the preparation step
wrote), so its peak memory is its own: `inference_peak_rss_mib` is the process's peak resident
memory over the warm-up and timed forwards (the peak is reset after loading through
/proc/self/clear_refs), `baseline_rss_mib` the memory after imports, before loading the model.
Latency: `--rounds` rounds over the rows in rotated order (background load then hits every row
alike; quanto and the torch.compile rows run in the first round only), each row a fresh process per round with one warm-up forward and `--repeats` timed ones;
median and min over all timed forwards. Ratios between rows (speed-ups, ours vs peers) are the
median of the per-round ratios (`time_ratio`). A row whose forward makes no progress for
`--forward-timeout` seconds (5x for the torch.compile rows) is killed and recorded as timed out. quanto's
calibration stops after the batch that exhausts `--quanto-calibration-budget` seconds (its forward
takes about a minute on a CPU without VNNI); the batches it used are recorded. Each row's output of
the warm-up forward is compared with fp32 eager and with our PyTorch INT8 runtime.

Default: 1 thread (torch and ONNX Runtime); pin the process to one core for stable numbers:

    taskset -c 1 python benchmarks/int8_speed.py [--threads 1] [--rounds 3] [--repeats 3] [--models bert-base opt-125m]
        [--skip-quanto] [--output benchmarks/results/int8_speed.json]
"""

import argparse
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH, SEQ = 8, 128
MODELS = {"bert-base": 30522, "opt-125m": 50272}  # name -> vocabulary size
ROWS = {  # label -> child kind
    "fp32 eager": "fp32",
    "fp32 torch.compile": "fp32-compiled",
    "ours int8 (PyTorch)": "ours",
    "ours int8 (PyTorch, AVX2 kernel)": "ours-avx2",
    "ours int8 (PyTorch, oneDNN GEMM)": "ours-onednn",
    "ours int8 (PyTorch, torch.compile)": "ours-compiled",
    "ours int8 (onnxruntime)": "ours-ort",
    "onnxruntime fp32": "fp32-ort",
    "torch.ao dynamic int8": "torch-ao",
    "quanto W8A8": "quanto",
}
OURS = ("ours int8 (PyTorch)", "ours int8 (onnxruntime)")
PEERS = ("torch.ao dynamic int8", "quanto W8A8")
EVENT = "@@event "  # prefix of the children's progress lines on stdout
MIB = 2**20


# --------------------------------------------------------------------------------------------------
# children: each builds or loads one thing, reports progress as JSON lines


def _emit(event: str, **fields) -> None:
    print(EVENT + json.dumps({"event": event, **fields}), flush=True)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _base_model_class(model: str):
    from hf_quantizable import QuantizableBertModel, QuantizableOPTModel

    return QuantizableBertModel if model == "bert-base" else QuantizableOPTModel


def _build_fp32(model: str):
    import torch

    from hf_quantizable import QuantizableBertConfig, QuantizableOPTConfig

    torch.manual_seed(0)
    if model == "bert-base":
        config = QuantizableBertConfig()
        return _base_model_class(model)(config, add_pooling_layer=False).eval()
    config = QuantizableOPTConfig(
        hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768
    )
    return _base_model_class(model)(config).eval()


def _load(model: str, folder: Path):
    kwargs = {"add_pooling_layer": False} if model == "bert-base" else {}
    return _base_model_class(model).from_pretrained(folder, **kwargs).eval()


def _batches(vocab: int, n: int, seed: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(4, vocab, (BATCH, SEQ), generator=generator),
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        }
        for _ in range(n)
    ]


def _forward_kwargs(model) -> dict:
    import inspect

    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def child_prepare(args: argparse.Namespace, work: Path) -> None:
    """fp32 checkpoint, our calibration (timed) and INT8 checkpoint, both ONNX exports, the inputs."""
    import copy

    import numpy as np
    import torch

    from hf_quantizable.quantization import W8A8Config, quantize_model
    from hf_quantizable.quantization.export import build_int8_model
    from hf_quantizable.quantization.onnx_export import export_onnx

    _set_threads(args.threads)
    vocab = MODELS[args.model]
    fp32 = _build_fp32(args.model)
    fp32.save_pretrained(work / "fp32")
    batch = _batches(vocab, 1, seed=2)[0]
    torch.save(batch, work / "batch.pt")
    for name, tensor in batch.items():
        np.save(work / f"{name}.npy", tensor.numpy())
    calibration = _batches(vocab, args.calibration_batches, seed=1)
    _emit("fp32 saved")

    _reset_peak_rss()
    start = time.perf_counter()
    simulated = quantize_model(
        copy.deepcopy(fp32), W8A8Config(num_calibration_batches=args.calibration_batches), calibration
    )
    calibration_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = build_int8_model(simulated)
    convert_s = time.perf_counter() - start
    calibration_peak = _status_mib("VmHWM")
    int8.save_pretrained(work / "int8")
    del simulated
    _emit("calibrated", calibration_s=calibration_s, convert_s=convert_s, peak_rss_mib=calibration_peak)
    _emit("int8 gemm", **_int8_gemm(int8))

    start = time.perf_counter()
    export_onnx(int8, work / "int8.onnx", batch)
    int8_export_s = time.perf_counter() - start
    export_onnx(fp32, work / "fp32.onnx", batch)
    sizes = {
        "fp32_checkpoint_mib": (work / "fp32" / "model.safetensors").stat().st_size / MIB,
        "int8_checkpoint_mib": (work / "int8" / "model.safetensors").stat().st_size / MIB,
        "int8_onnx_mib": (work / "int8.onnx").stat().st_size / MIB,
        "fp32_onnx_mib": (work / "fp32.onnx").stat().st_size / MIB,
    }
    _emit("done", int8_onnx_export_s=int8_export_s, file_sizes=sizes)


def _int8_gemm(int8) -> dict:
    """Which GEMMs our PyTorch runtime uses here (`Int8Linear.gemm_route`: under `auto`, timed now, and
    the AVX2 kernel built now, so no row pays for either) and, for the layers on the AVX2 kernel
    without VNNI, the share of weights its split moves to the exact int32 side path and the share of
    its steps that add two quads in int16 (the others widen each quad on its own)."""
    from hf_quantizable.modeling.int8 import Int8Linear

    linears = [m for m in int8.modules() if isinstance(m, Int8Linear) and m.has_input_quant]
    routes = {route: sum(m.gemm_route() == route for m in linears) for route in ("avx2", "onednn")}
    avx2 = [m for m in linears if m.gemm_route() == "avx2"]
    if not avx2:
        return {"int8_gemm": "oneDNN", "gemm_routes": routes}
    packed = [m.avx2_weight() for m in avx2]
    if packed[0].vnni:  # vpdpbusd: nothing split off, no int16 pairing
        return {
            "int8_gemm": "AVX2 kernel (VNNI)" if not routes["onednn"] else "AVX2 kernel (VNNI) and oneDNN",
            "gemm_routes": routes,
        }
    return {
        "int8_gemm": "AVX2 kernel" if not routes["onednn"] else "AVX2 kernel and oneDNN",
        "gemm_routes": routes,
        "split_off_weight_share": sum(p.entry_inputs.numel() for p in packed) / sum(m.weight.numel() for m in avx2),
        "paired_step_share": sum(int(p.safe_steps.sum()) for p in packed)
        / sum(p.packed.numel() // 128 for p in packed),
    }


def _time_forwards(run, args: argparse.Namespace, work: Path, label_slug: str) -> None:
    """Warm-up forward (output saved), then the timed ones; peak RSS over all of them."""
    import numpy as np

    rss_loaded = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    output = run()
    warmup_s = time.perf_counter() - start
    np.save(work / f"out-{label_slug}.npy", output)
    _emit("warm-up", warmup_s=warmup_s)
    repeats = args.repeats if warmup_s < args.slow_forward else min(args.repeats, args.slow_repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        _emit("forward", times_s=times)
    _emit(
        "done",
        median_s=statistics.median(times),
        min_s=min(times),
        repeats=len(times),
        rss_after_load_mib=rss_loaded,
        inference_peak_rss_mib=_status_mib("VmHWM") if reset else None,
    )


def child_row(args: argparse.Namespace, work: Path) -> None:
    kind = ROWS[args.row]
    slug = kind
    if kind.endswith("-ort"):
        import numpy as np

        from hf_quantizable.quantization.onnx_export import inference_session

        feed = {name: np.load(work / f"{name}.npy") for name in ("input_ids", "attention_mask")}
        _emit("imported", baseline_rss_mib=_status_mib("VmRSS"), prepare_peak_rss_mib=_status_mib("VmHWM"))
        start = time.perf_counter()
        session = inference_session(work / ("int8.onnx" if kind == "ours-ort" else "fp32.onnx"), threads=args.threads)
        _emit("loaded", load_s=time.perf_counter() - start, prepare_peak_rss_mib=_status_mib("VmHWM"))
        _time_forwards(lambda: session.run(None, feed)[0], args, work, slug)
        return

    import torch

    _set_threads(args.threads)
    batch = torch.load(work / "batch.pt")
    _emit("imported", baseline_rss_mib=_status_mib("VmRSS"))
    start = time.perf_counter()
    model = _load(args.model, work / ("int8" if kind.startswith("ours") else "fp32"))
    extra = {"load_s": time.perf_counter() - start}
    if kind.startswith("ours"):
        from hf_quantizable.modeling.int8 import Int8Linear

        if not any(isinstance(m, Int8Linear) for m in model.modules()):
            raise RuntimeError("the INT8 checkpoint did not load as an INT8 model")
    if kind.endswith("-compiled"):  # inductor; the warm-up forward compiles
        model = torch.compile(model)
    elif kind == "torch-ao":
        start = time.perf_counter()
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        extra["prepare_s"] = time.perf_counter() - start
    elif kind == "quanto":
        from optimum.quanto import Calibration, freeze, qint8, quantize

        calibration = _batches(MODELS[args.model], args.calibration_batches, seed=1)
        start = time.perf_counter()
        quantize(model, weights=qint8, activations=qint8)
        with torch.inference_mode(), Calibration(momentum=0.9):
            for done, calibration_batch in enumerate(calibration, 1):
                model(**calibration_batch, **_forward_kwargs(model))
                elapsed = time.perf_counter() - start
                _emit("calibration batch", calibration_batches=done, calibration_s=elapsed)
                if elapsed >= args.quanto_calibration_budget:
                    break
        freeze(model)
        extra["prepare_s"] = time.perf_counter() - start
    extra["prepare_peak_rss_mib"] = _status_mib("VmHWM")
    _emit("loaded", **extra)
    kwargs = _forward_kwargs(model)

    def run():
        with torch.inference_mode():
            out = model(**batch, **kwargs)[0]
        if type(out) is not torch.Tensor and hasattr(out, "dequantize"):  # a quanto QTensor
            out = out.dequantize()
        return out.float().numpy()

    _time_forwards(run, args, work, slug)


# --------------------------------------------------------------------------------------------------
# parent: runs the children with timeouts, compares, prints and writes the JSON


def run_child(args: argparse.Namespace, work: Path, kind: str, row: str | None, timeout: float) -> dict:
    """Run one child; its events merged into one record, with `status` ok / timed out / failed."""
    command = [sys.executable, __file__, "--child", kind, "--model", args.model_name, "--work", str(work)]
    command += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    command += ["--calibration-batches", str(args.calibration_batches)]
    command += ["--quanto-calibration-budget", str(args.quanto_calibration_budget)]
    command += ["--slow-forward", str(args.slow_forward), "--slow-repeats", str(args.slow_repeats)]
    if row:
        command += ["--row", row]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if ROWS.get(row) in ("ours-onednn", "ours-avx2"):
        env["HF_QUANTIZABLE_INT8_KERNEL"] = ROWS[row].removeprefix("ours-")
    stderr_path = work / f"stderr-{ROWS.get(row, kind)}.txt"
    record: dict = {}
    lines: queue.Queue = queue.Queue()
    start = time.perf_counter()
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)

        def read():
            for line in process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        last = "start"
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                process.kill()
                process.wait()
                phase = "a forward" if last in ("loaded", "warm-up", "forward") else f"the step after '{last}'"
                record["status"] = f"timed out: {phase} took more than {timeout:g} s; killed"
                break
            if line is None:
                break
            if line.startswith(EVENT):
                event = json.loads(line[len(EVENT) :])
                last = event.pop("event")
                record.update(event)
        code = process.wait()
    record["process_wall_s"] = time.perf_counter() - start
    if "status" not in record:
        if code == 0 and last == "done":
            record["status"] = "ok"
        else:
            tail = stderr_path.read_text().strip().splitlines()[-3:]
            record["status"] = f"failed (exit {code}): " + " | ".join(tail)
    return record


def merge_rounds(records: list[dict]) -> dict:
    """One row from its rounds: median and min over the timed forwards of every successful round."""
    ok = [record for record in records if record.get("status") == "ok"]
    if not ok:
        return {**records[-1], "rounds": len(records)}
    times = [t for record in ok for t in record["times_s"]]
    merged = {**ok[-1]}
    merged.update(
        median_s=statistics.median(times),
        min_s=min(times),
        times_s=times,
        round_medians_s=[record["median_s"] for record in ok],
        rounds=len(ok),
        load_average_after=[record["load_average_after"] for record in ok],
    )
    for field in ("inference_peak_rss_mib", "prepare_peak_rss_mib", "baseline_rss_mib", "rss_after_load_mib"):
        values = [record[field] for record in ok if record.get(field) is not None]
        if values:
            merged[field] = max(values)
    failed = [record["status"] for record in records if record.get("status") != "ok"]
    if failed:
        merged["failed_rounds"] = failed
    return merged


def agreement(work: Path, rows: dict) -> None:
    """Each row's output against fp32 eager and against our PyTorch INT8 runtime (warm-up forward)."""
    import numpy as np

    outputs = {label: work / f"out-{kind}.npy" for label, kind in ROWS.items()}
    loaded = {
        label: np.load(path).astype(np.float64) for label, path in outputs.items() if label in rows and path.exists()
    }
    for label, out in loaded.items():
        entry = {}
        for reference in ("fp32 eager", "ours int8 (PyTorch)"):
            if reference == label or reference not in loaded:
                continue
            ref = loaded[reference]
            diff = np.abs(out - ref)
            cosine = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
            entry[f"vs {reference}"] = {
                "mean_abs_diff": float(diff.mean()),
                "max_abs_diff": float(diff.max()),
                "cosine": cosine,
            }
        rows[label]["agreement"] = entry


def cpu_info() -> dict:
    from hf_quantizable.evaluation.results import cpu_description

    model, flags = cpu_description()
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"cpu": model, "flags": {flag: flag in flags for flag in wanted}}


def time_ratio(slow: dict, fast: dict) -> float:
    """`slow` time / `fast` time: the median of the per-round ratios when both rows ran every round
    without failure (rows of one round run minutes apart, so load changes between rounds cancel),
    else the ratio of the pooled medians."""
    slow_rounds, fast_rounds = slow.get("round_medians_s", []), fast.get("round_medians_s", [])
    if len(slow_rounds) == len(fast_rounds) > 1 and not slow.get("failed_rounds") and not fast.get("failed_rounds"):
        return statistics.median(a / b for a, b in zip(slow_rounds, fast_rounds))
    return slow["median_s"] / fast["median_s"]


def summarize(rows: dict) -> dict:
    """Speed-ups against fp32 eager, and each of our routes against each peer (peer time / ours)."""
    ok = {label: row for label, row in rows.items() if row.get("status") == "ok"}
    fp32 = ok.get("fp32 eager")
    for row in ok.values():
        if fp32:
            row["speedup_vs_fp32_eager"] = time_ratio(fp32, row)
            row["pooled_speedup_vs_fp32_eager"] = fp32["median_s"] / row["median_s"]
    if "onnxruntime fp32" in ok and "ours int8 (onnxruntime)" in ok:
        ok["ours int8 (onnxruntime)"]["speedup_vs_onnxruntime_fp32"] = time_ratio(
            ok["onnxruntime fp32"], ok["ours int8 (onnxruntime)"]
        )
    versus = {}
    for ours in OURS:
        if ours not in ok:
            continue
        versus[ours] = {
            peer: time_ratio(ok[peer], ok[ours]) if peer in ok else rows.get(peer, {}).get("status") for peer in PEERS
        }
    return versus


def targets(results: dict) -> dict:
    """Issue 3 item 4: our INT8 >= 2x faster than fp32 eager, and faster than both peers.

    Ratios are `time_ratio`s (per-round pairs). Against a peer, the fastest of our routes counts as
    faster or slower only outside a +-5% band; inside it the verdict is a tie.
    """
    out = {}
    for name, result in results.items():
        rows = result["rows"]
        ours = [label for label in OURS if rows.get(label, {}).get("status") == "ok"]
        if not ours:
            continue
        best = max(ours, key=lambda label: rows[label].get("speedup_vs_fp32_eager", 0.0))
        speedup = rows[best].get("speedup_vs_fp32_eager")
        peers = {}
        for peer in PEERS:
            row = rows.get(peer, {})
            if row.get("status") == "ok":
                ratio = time_ratio(row, rows[best])
                verdict = "faster" if ratio >= 1.05 else "slower" if ratio <= 1 / 1.05 else "tie (within 5%)"
                peers[peer] = f"{verdict}: peer time / ours = {ratio:.2f}"
            elif str(row.get("status", "")).startswith("timed out"):
                peers[peer] = f"faster: the peer {row['status']}"
            else:
                peers[peer] = f"not measured ({row.get('status', 'skipped')})"
        out[name] = {
            "fastest of our routes": best,
            "speedup_vs_fp32_eager": {label: rows[label].get("speedup_vs_fp32_eager") for label in ours},
            ">= 2x fp32 eager": speedup is not None and speedup >= 2.0,
            "vs peers": peers,
        }
    return out


def runtime_goals(results: dict) -> dict:
    """Issue 23's goals, per model: our PyTorch route >= 1.3x torch.ao and >= 0.8x our ONNX Runtime
    route; `auto` the fastest exact route (within 5% of the faster of the forced AVX2 / oneDNN rows)."""
    out = {}
    for name, result in results.items():
        rows = {label: row for label, row in result["rows"].items() if row.get("status") == "ok"}
        ours = rows.get("ours int8 (PyTorch)")
        if ours is None:
            continue
        goals: dict = {}
        if "torch.ao dynamic int8" in rows:
            ratio = time_ratio(rows["torch.ao dynamic int8"], ours)
            goals["vs torch.ao (>= 1.3)"] = {"ratio": ratio, "met": ratio >= 1.3}
        if "ours int8 (onnxruntime)" in rows:
            ratio = time_ratio(rows["ours int8 (onnxruntime)"], ours)
            goals["vs our ONNX Runtime route (>= 0.8)"] = {"ratio": ratio, "met": ratio >= 0.8}
        forced = [
            label for label in ("ours int8 (PyTorch, AVX2 kernel)", "ours int8 (PyTorch, oneDNN GEMM)") if label in rows
        ]
        if forced:
            fastest = min(forced, key=lambda label: rows[label]["median_s"])
            ratio = time_ratio(rows[fastest], ours)
            goals["auto is the fastest route"] = {
                "fastest forced route": fastest,
                "ratio": ratio,
                "met": ratio >= 1 / 1.05,
            }
        out[name] = goals
    return out


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: batch {BATCH} x seq {SEQ}")
    print(f"  {'row':34s} {'median s':>9s} {'min s':>8s} {'vs fp32':>8s} {'peak MiB':>9s} {'prep s':>8s}  status")
    for label, row in result["rows"].items():
        if row.get("status") != "ok":
            print(f"  {label:34s} {'-':>9s} {'-':>8s} {'-':>8s} {'-':>9s} {'-':>8s}  {row.get('status')}")
            continue
        prepare = row.get("prepare_s", row.get("calibration_s"))
        print(
            f"  {label:34s} {row['median_s']:9.3f} {row['min_s']:8.3f} {row.get('speedup_vs_fp32_eager', 0):7.2f}x "
            f"{row.get('inference_peak_rss_mib') or float('nan'):9.0f} "
            f"{'' if prepare is None else format(prepare, '8.1f'):>8s}  ok"
        )
    ours = result["ours_calibration"]
    if ours.get("status") == "ok":
        print(
            f"  ours: calibration {ours['calibration_s']:.1f} s for {ours['calibration_batches']} batches "
            f"(+ {ours['convert_s']:.1f} s to build the INT8 model)"
        )
    for route, peers in result["ours_vs_peers"].items():
        text = ", ".join(f"{p}: {v:.2f}x" if isinstance(v, float) else f"{p}: {v}" for p, v in peers.items())
        print(f"  {route} vs peers (peer time / ours): {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="row labels to run (default: all)")
    parser.add_argument("--skip-quanto", action="store_true", help="leave out quanto W8A8 (minutes per model)")
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after the warm-up, per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the rows, order rotated (quanto: once)")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--forward-timeout", type=float, default=120.0, help="seconds without progress -> timed out")
    parser.add_argument("--quanto-calibration-budget", type=float, default=240.0)
    parser.add_argument("--slow-forward", type=float, default=30.0, help="a warm-up longer than this ...")
    parser.add_argument("--slow-repeats", type=int, default=1, help="... gets this many timed forwards")
    parser.add_argument("--prepare-timeout", type=float, default=3600.0)
    parser.add_argument("--work-dir", help="keep the checkpoints, ONNX files and outputs here (default: a temp dir)")
    parser.add_argument("--output", default="benchmarks/results/int8_speed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child_prepare(args, Path(args.work)) if args.child == "prepare" else child_row(args, Path(args.work))
        return

    labels = [label for label in ROWS if label in args.rows and not (args.skip_quanto and label == "quanto W8A8")]
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="int8_speed-"))
    load_start = os.getloadavg()
    results = {}
    try:
        for name in args.models:
            args.model_name = name
            work = root / name
            work.mkdir(parents=True, exist_ok=True)
            print(f"{name}: preparing (fp32 checkpoint, {args.calibration_batches}-batch calibration, ONNX exports)")
            prepare = run_child(args, work, "prepare", None, args.prepare_timeout)
            if prepare["status"] != "ok":
                raise RuntimeError(f"{name}: preparation {prepare['status']}")
            runs: dict[str, list] = {label: [] for label in labels}
            for round_index in range(args.rounds):
                once = [label for label in labels if label == "quanto W8A8" or ROWS[label].endswith("-compiled")]
                fast = [label for label in labels if label not in once]
                order = fast[round_index % len(fast) :] + fast[: round_index % len(fast)] if fast else []
                if round_index == 0:
                    order += once  # once: minutes per forward (quanto) or per compilation
                for label in order:
                    # torch.compile rows: the warm-up forward compiles for minutes without progress lines
                    timeout = args.forward_timeout * (5 if ROWS[label].endswith("-compiled") else 1)
                    record = run_child(args, work, "row", label, timeout)
                    record["load_average_after"] = os.getloadavg()[0]
                    runs[label].append(record)
                    timing = f"{record['median_s']:.3f} s" if record["status"] == "ok" else record["status"]
                    print(f"  round {round_index + 1}  {label:34s} {timing}", flush=True)
            rows = {label: merge_rounds(records) for label, records in runs.items()}
            agreement(work, rows)
            results[name] = {
                "rows": rows,
                "ours_calibration": {
                    "status": prepare["status"],
                    "calibration_batches": args.calibration_batches,
                    "calibration_s": prepare.get("calibration_s"),
                    "convert_s": prepare.get("convert_s"),
                    "peak_rss_mib": prepare.get("peak_rss_mib"),
                    "int8_onnx_export_s": prepare.get("int8_onnx_export_s"),
                    "file_sizes": prepare.get("file_sizes"),
                    "int8_gemm": prepare.get("int8_gemm"),
                    "gemm_routes": prepare.get("gemm_routes"),
                    "split_off_weight_share": prepare.get("split_off_weight_share"),
                    "paired_step_share": prepare.get("paired_step_share"),
                },
            }
            results[name]["ours_vs_peers"] = summarize(rows)
            print_table(name, results[name])
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)

    from hf_quantizable.evaluation.results import package_versions
    from hf_quantizable.paths import write_text_atomic

    record = {
        "benchmark": "int8_speed",
        "setting": {
            "shape": f"batch {BATCH} x sequence {SEQ}, all-ones attention mask",
            "models": "base models without task heads, random weights (seed 0); BERT-base size and OPT-125m size",
            "timing": f"{args.rounds} rounds over the rows (order rotated; quanto and torch.compile rows once), each row in a fresh "
            f"process per round: one warm-up forward, then {args.repeats} timed forwards ({args.slow_repeats} when "
            f"the warm-up exceeds {args.slow_forward:g} s); median / min over all timed forwards of all rounds; "
            "ratios: median of the per-round ratios of the round medians",
            "threads": args.threads,
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "ours_quantization": f"W8A8Config() defaults (per-tensor, running min-max), {args.calibration_batches} "
            "calibration batches",
            "quanto_calibration": f"up to {args.calibration_batches} batches, stopping after the batch that exhausts "
            f"{args.quanto_calibration_budget:g} s",
            "forward_timeout_s": args.forward_timeout,
            "memory": "inference_peak_rss_mib: peak RSS of the row's process over its forwards (reset after loading); "
            "baseline_rss_mib: after imports, before loading the model",
        },
        "results": results,
        "targets": targets(results),
        "runtime_goals": runtime_goals(results),
        "machine": {
            **cpu_info(),
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
        "versions": package_versions(extra=("onnxruntime", "onnx", "optimum-quanto")),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(args.output, json.dumps(record, indent=2) + "\n")
    print(f"\ntargets: {json.dumps(record['targets'], indent=1)}")
    print(f"runtime goals: {json.dumps(record['runtime_goals'], indent=1)}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
