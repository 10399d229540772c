"""``llmtrain bench train``: train N steps of a preset on random tokens; tokens/s, MFU, step time, memory.

The model runs through the real pretraining path (``llmtrain.training.Trainer``: its backend, autocast,
loss, clipping and optimizer step) with the data swapped for a few fixed batches of random tokens, so
no dataset, tokenizer or disk is involved. ``--baseline gpt2|llama`` then trains a dense SDPA
transformer of the same size in the same process (bf16 autocast, fused AdamW, torch.compile) so the
ratio compares like with like on one GPU.

Method: ``--warmup`` steps (compilation, allocator, autotuning) are timed but discarded; the next
``--steps`` are timed one by one (host clock after a device sync, from a callback at each step's end;
the training loop itself does not sync between log steps) and the median is reported. tokens/s =
tokens per optimizer step / median step time; MFU = tokens/s x FLOPs per token (llmtrain.bench.flops,
the training log's formula too) / peak FLOP/s (llmtrain.bench.flops.PEAK_FLOPS by GPU name, 989e12 for
an H100 in dense bf16, unless --peak_tflops).
Peak memory is torch's max_memory_allocated (and reserved) over the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

# Bench presets beyond create_model_config's: (model_size, model_overrides).
BENCH_MODELS = {
    # A 1B-class retention model: the MLA 1B's width, depth and MLP (2048 x 20, SwiGLU 5632), 32 heads of 64.
    "retention-1b": ("small", dict(hidden_size=2048, num_hidden_layers=20, num_attention_heads=32,
                                   intermediate_size=5632)),
}


class BenchError(ValueError):
    """A bad benchmark argument; the message names it."""


class _Done(Exception):
    """Raised by the timing callback to leave the training loop before its final evaluation and save."""


class _Cycle:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RandomTokenData:
    """Stands in for PretrainingData: a few fixed batches of uniform random tokens, cycled."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int, num_batches: int = 4):
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (num_batches, batch_size, seq_len + 1), generator=gen)
        pin = torch.cuda.is_available()
        self.batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
        if pin:
            self.batches = [(x.pin_memory(), y.pin_memory()) for x, y in self.batches]
        self.vocab_size = vocab_size
        self.tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=None, bos_token_id=None)
        self.train = _Cycle(self.batches)

    def val_batches(self, n: int):
        yield from self.batches[:n]


@contextlib.contextmanager
def _random_data(data: RandomTokenData):
    import llmtrain.training.data as data_module

    original = data_module.build_pretraining_data
    data_module.build_pretraining_data = lambda cfg, rank=0, world_size=1: data
    try:
        yield
    finally:
        data_module.build_pretraining_data = original


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_mem_gib": None, "peak_reserved_gib": None}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _summarize(name: str, times: list[float], warmup: int, tokens_per_step: int, flops: dict,
               peak_flops: float | None, num_params: int, losses: list[float], device) -> dict:
    measured = times[warmup:]
    median = statistics.median(measured)
    tok_s = tokens_per_step / median
    row = {"model": name, "status": "ok", "params": num_params, "tokens_per_step": tokens_per_step,
           "step_ms_median": median * 1e3, "step_ms_min": min(measured) * 1e3,
           "step_ms_max": max(measured) * 1e3, "warmup_s": sum(times[:warmup]), "tokens_per_s": tok_s,
           "flops_per_token": flops["total"], "flops_matmul_per_token": flops["matmul"],
           "flops_mixer_per_token": flops["mixer"],
           "mfu": tok_s * flops["total"] / peak_flops if peak_flops else None,
           "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    row.update(_memory(device))
    return row


def build_train_config(args):
    """The TrainConfig the bench runs: a preset (--config) or defaults, the bench's flags on top."""
    from llmtrain.training.config import ConfigError, TrainConfig, apply, load_config

    try:
        cfg = load_config(args.config, {"max_steps": 1}) if args.config else TrainConfig()
    except ConfigError as exc:
        raise BenchError(f"--config: {exc}") from exc
    updates = {}
    if args.model is not None or not args.config:
        name = args.model or "small"
        size, overrides = BENCH_MODELS.get(name.lower(), (name, {}))
        updates["model_size"], updates["model_overrides"] = size, dict(overrides)
    overrides = dict(updates.get("model_overrides", cfg.model_overrides))
    if args.model_overrides:
        import yaml

        extra = yaml.safe_load(args.model_overrides)
        if not isinstance(extra, dict):
            raise BenchError(f"--model_overrides: expected a mapping like '{{num_hidden_layers: 4}}', "
                             f"got {args.model_overrides!r}")
        # PretrainedConfig takes any keyword silently: a typo (or YAML's `{a:1}`, one key "a:1") would be ignored.
        from llmtrain.models import create_model_config

        size = updates.get("model_size", cfg.model_size)
        try:
            known = create_model_config(size)
        except ValueError as exc:
            raise BenchError(f"--model: {exc}") from exc
        unknown = [k for k in extra if not hasattr(known, str(k)) and k != "fused_cross_entropy"]
        if unknown:
            raise BenchError(f"--model_overrides: {unknown[0]!r} is not a field of the {size} config "
                             "(YAML needs a space after each colon: '{num_hidden_layers: 2}')")
        overrides.update(extra)
    if args.fused_ce is not None:
        overrides["fused_cross_entropy"] = args.fused_ce
    updates["model_overrides"] = overrides
    for key in ("seq_len", "batch_size", "grad_accum", "backend", "ds_config", "device", "dtype", "seed"):
        value = getattr(args, key)
        if value is not None:
            updates[key] = value
    for key in ("compile", "activation_checkpointing"):
        value = getattr(args, key)
        if value is not None:
            updates[key] = value
    if not args.config and args.seq_len is None:
        updates["seq_len"] = 2048
    updates.update(dataset="random", max_steps=args.warmup + args.steps + 1, num_tokens=None,
                   stop_at_step=None, resume=None, eval_interval=10**9, save_interval=10**9,
                   log_interval=10**9, progress=False, output_dir=args.output_dir)
    try:
        return apply(cfg, updates, "bench arguments").validate()
    except ConfigError as exc:
        key = str(exc).split(":")[0]
        raise BenchError(f"--{'model' if key == 'model_size' else key}: {exc}") from exc


def _start_profiler(warmup: int, steps: int, device_type: str):
    """torch.profiler over the last two timed steps (one more as its own warm-up)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    active = min(2, steps)
    wait = max(0, warmup + steps - active - 1)
    prof = torch.profiler.profile(activities=acts, record_shapes=True, schedule=torch.profiler.schedule(
        wait=wait, warmup=warmup + steps - active - wait, active=active, repeat=1))
    prof.__enter__()
    return prof, active


def _write_profile(prof, active: int, path: str, label: str, device_type: str) -> None:
    """Top kernels / ops by self time per step, as a plain-text table (where the step time goes)."""
    key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) or 1.0
    lines = [f"# {label}: self {'device' if device_type == 'cuda' else 'cpu'} time per step, "
             f"{total / active / 1e3:.1f} ms summed over {len(events)} ops/kernels", "",
             "| ms/step | share | calls/step | name |", "|---|---|---|---|"]
    for e in events[:40]:
        t = getattr(e, key)
        lines.append(f"| {t / active / 1e3:.2f} | {100 * t / total:.1f}% | {e.count / active:g} | `{e.key[:100]}` |")
    # Copies and casts by input shape: which tensors the step converts or re-lays out (dtype casts of
    # weights under autocast, .contiguous() of views, cat in backward) and what each costs.
    copy_ops = ("aten::copy_", "aten::_to_copy", "aten::contiguous", "aten::cat", "aten::clone")
    copies = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in copy_ops]
    copies.sort(key=lambda e: -(getattr(e, "device_time_total", 0) if device_type == "cuda" else e.cpu_time_total))
    lines += ["", f"# {label}: copies and casts by input shape (total time per step, incl. children)", "",
              "| ms/step | calls/step | op | input shapes |", "|---|---|---|---|"]
    for e in copies[:20]:
        t = getattr(e, "device_time_total", 0) if device_type == "cuda" else e.cpu_time_total
        lines.append(f"| {t / active / 1e3:.2f} | {e.count / active:g} | `{e.key}` | `{str(e.input_shapes)[:90]}` |")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n\n")


def bench_model(cfg, warmup: int, steps: int, peak_flops: float | None, label: str,
                profile: str | None = None) -> tuple[dict, object]:
    """Train warmup + steps optimizer steps of cfg's model on random tokens through the Trainer.
    profile: append a torch.profiler breakdown of the last timed steps to this file."""
    from llmtrain.bench.flops import flops_per_token
    from llmtrain.models import create_model_config
    from llmtrain.training.trainer import Trainer

    model_config = create_model_config(cfg.model_size, **cfg.model_overrides)
    data = RandomTokenData(model_config.vocab_size, cfg.batch_size, cfg.seq_len, cfg.seed)
    marks, losses = [], []

    prof = None

    def timer(trainer):
        _sync(trainer.device)
        marks.append(time.perf_counter())
        if prof is not None:
            prof.step()
        if trainer.step >= warmup + steps:
            raise _Done

    with _random_data(data):
        trainer = Trainer(cfg, callbacks=[timer])
    device = trainer.device
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        original_backward = trainer.backend.backward

        def backward(loss):  # keep each micro-batch's loss (no sync) to show that training is real
            losses.append(loss.detach())
            return original_backward(loss)

        trainer.backend.backward = backward
        if profile:
            prof, active = _start_profiler(warmup, steps, device.type)
        try:
            trainer.train()
        except _Done:
            pass
        finally:
            if prof is not None:
                prof.__exit__(None, None, None)
        if prof is not None:
            _write_profile(prof, active, profile, label, device.type)
        times = [b - a for a, b in zip([start] + marks[:-1], marks)]
        n = sum(p.numel() for p in trainer.module.parameters())
        flops = flops_per_token(trainer.model_config, cfg.seq_len, n)
        tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        if trainer.logger is not None:
            trainer.logger.close()
        losses = [float(x) for x in losses]
        row = _summarize(label, times, warmup, tokens, flops, peak_flops, n, losses, device)
        row.update(backend=trainer.backend.name, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                   grad_accum=cfg.grad_accum, compile=cfg.compile,
                   activation_checkpointing=cfg.activation_checkpointing,
                   fused_cross_entropy=model_config.to_dict().get("fused_cross_entropy", True))
        return row, device
    finally:
        del trainer
        _release(device)


def bench_baseline(kind: str, cfg, warmup: int, steps: int, peak_flops: float | None,
                   compile_model: bool) -> dict:
    """The dense baseline at cfg's shape: its own loop, written as fast as plain PyTorch gets."""
    from llmtrain.bench.baselines import baseline_flops_per_token, baseline_for
    from llmtrain.models import create_model_config
    from llmtrain.training.backends import param_groups
    from llmtrain.training.trainer import autocast_dtype, resolve_device

    device = resolve_device(cfg, 0)
    model_config = create_model_config(cfg.model_size, **cfg.model_overrides)
    torch.manual_seed(cfg.seed)
    model = baseline_for(kind, model_config, cfg.seq_len).to(device)
    model.checkpointing = cfg.activation_checkpointing
    flops = baseline_flops_per_token(model, cfg.seq_len)
    n = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    amp = autocast_dtype(cfg, device)
    data = RandomTokenData(model_config.vocab_size, cfg.batch_size, cfg.seq_len, cfg.seed)
    batches = iter(data.train)
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    try:
        for _ in range(warmup + steps):
            start = time.perf_counter()
            total = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                    loss = forward(x, y)
                (loss / cfg.grad_accum).backward()
                total += loss.detach() / cfg.grad_accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total.item())  # a sync before the clock, as the Trainer's timing callback does
            times.append(time.perf_counter() - start)
        row = _summarize(f"{kind}-baseline", times, warmup, cfg.batch_size * cfg.seq_len * cfg.grad_accum,
                         flops, peak_flops, n, losses, device)
        row.update(backend="torch", seq_len=cfg.seq_len, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                   compile=compile_model, activation_checkpointing=cfg.activation_checkpointing,
                   fused_cross_entropy=False)
        return row
    finally:
        del model, optimizer, forward
        _release(device)


def _failed(label: str, exc: BaseException) -> dict:
    status = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
    return {"model": label, "status": status, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def validate_args(args) -> None:
    if args.steps < 1:
        raise BenchError(f"--steps: must be >= 1, got {args.steps}")
    if args.warmup < 0:
        raise BenchError(f"--warmup: must be >= 0, got {args.warmup}")
    for key in ("seq_len", "batch_size", "grad_accum"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise BenchError(f"--{key}: must be >= 1, got {value}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise BenchError(f"--peak_tflops: must be > 0, got {args.peak_tflops}")
    if args.memory_cap_gb is not None and not args.memory_cap_gb > 0:
        raise BenchError(f"--memory_cap_gb: must be > 0, got {args.memory_cap_gb}")


def apply_memory_cap(cap_gib: float, device: torch.device) -> dict:
    """Limit this process's CUDA caching allocator to cap_gib (the CUDA context itself is not counted)."""
    if device.type != "cuda":
        raise BenchError("--memory_cap_gb: needs a CUDA device (set_per_process_memory_fraction)")
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib * 2**30 > total:
        raise BenchError(f"--memory_cap_gb: {cap_gib} GiB is more than the device's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
    return {"memory_cap_gib": cap_gib, "device_total_gib": total / 2**30}


def run_bench(args) -> dict:
    validate_args(args)
    with tempfile.TemporaryDirectory(prefix="llmtrain-bench-") as tmp:
        args.output_dir = tmp
        cfg = build_train_config(args)
        probe = torch.device("cuda" if cfg.device.startswith("cuda") or
                             (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        if probe.type == "cuda" and not torch.cuda.is_available():
            raise BenchError(f"--device: {cfg.device} but torch sees no CUDA device")
        if probe.type == "cuda":
            probe = torch.device("cuda", torch.cuda.current_device() if cfg.device in ("auto", "cuda")
                                 else int(cfg.device.split(":")[1]))
        from llmtrain.bench.flops import peak_flops

        # the training log's table (llmtrain.bench.flops.PEAK_FLOPS) unless --peak_tflops
        peak = args.peak_tflops * 1e12 if args.peak_tflops else (
            peak_flops(torch.cuda.get_device_name(probe)) if probe.type == "cuda" else None)
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": torch.cuda.get_device_name(probe) if probe.type == "cuda" else "cpu",
                  "torch": torch.__version__, "command": "llmtrain " + " ".join(sys.argv[1:]),
                  "peak_tflops": peak / 1e12 if peak else None, "flop_formula": None,
                  "warmup": args.warmup, "steps": args.steps, "rows": []}
        from llmtrain.bench.flops import FORMULA

        report["flop_formula"] = FORMULA
        if args.memory_cap_gb is not None:
            report.update(apply_memory_cap(args.memory_cap_gb, probe))
        if probe.type == "cuda":
            torch.set_float32_matmul_precision("high")
        label = args.model or cfg.model_size if not args.config else f"{Path(args.config).stem}:{cfg.model_size}"
        try:
            row, _ = bench_model(cfg, args.warmup, args.steps, peak, label, profile=getattr(args, "profile", None))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and "out of memory" not in str(exc):
                raise
            row = _failed(label, exc)
            _release(probe)
        report["rows"].append(row)
        _print_row(row)
        if args.baseline != "none":
            compile_model = {"auto": probe.type == "cuda", "yes": True, "no": False}[args.baseline_compile]
            try:
                base = bench_baseline(args.baseline, cfg, args.warmup, args.steps, peak, compile_model)
            except torch.cuda.OutOfMemoryError as exc:
                base = _failed(f"{args.baseline}-baseline", exc)
                _release(probe)
            report["rows"].append(base)
            _print_row(base)
            if row["status"] == "ok" and base["status"] == "ok":
                report["speedup_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]
                print(f"{row['model']} / {base['model']}: {report['speedup_vs_baseline']:.3f}x tokens/s")
    return report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_row(row: dict) -> None:
    if row["status"] != "ok":
        print(f"{row['model']}: {row['status'].upper()} ({row['error']})", flush=True)
        return
    mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
    print(f"{row['model']}: {row['params'] / 1e6:.1f}M params, {row['backend']}, seq {row['seq_len']} x batch "
          f"{row['batch_size']} x accum {row['grad_accum']}: {row['tokens_per_s']:,.0f} tok/s, MFU {mfu}, "
          f"step {row['step_ms_median']:.1f} ms (median; min {row['step_ms_min']:.1f}, max {row['step_ms_max']:.1f}), "
          f"peak mem {_fmt(row['peak_mem_gib'], '.2f')} GiB (reserved {_fmt(row['peak_reserved_gib'], '.2f')}), "
          f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}", flush=True)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def run(args) -> int:
    try:
        report = run_bench(args)
    except BenchError as exc:
        print(f"llmtrain bench train: {exc}", file=sys.stderr)
        return 2
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in report["rows"]) else 3


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: end-to-end training speed and memory")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    p = sub.add_parser(
        "train", help="train N steps on random tokens: tokens/s, MFU, step time, peak memory",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model preset: small, medium, large, 7b, mla-1b, retention-1b "
                                   f"(bench presets: {', '.join(BENCH_MODELS)}); default small")
    p.add_argument("--config", help="a pretraining YAML or preset (e.g. pretrain_5080): its model, shape, "
                                    "backend and systems settings; the flags below override them")
    p.add_argument("--model_overrides", help="YAML mapping of model config fields, e.g. '{num_hidden_layers: 2}'")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default 2048 without --config)")
    p.add_argument("--batch_size", type=int, help="sequences per micro-batch (default 8 without --config)")
    p.add_argument("--grad_accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps after warm-up (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--backend", choices=["torch", "deepspeed"], help="training backend (default torch)")
    p.add_argument("--ds_config", help="DeepSpeed JSON (default configs/ds_config.json: ZeRO-2 + CPU offload)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", type=_bool, metavar="BOOL", help="torch.compile the model (true/false)")
    p.add_argument("--activation_checkpointing", type=_bool, metavar="BOOL")
    p.add_argument("--fused_ce", type=_bool, metavar="BOOL",
                   help="chunked cross-entropy without full logits (model default: true)")
    p.add_argument("--seed", type=int)
    p.add_argument("--baseline", choices=["none", "gpt2", "llama"], default="none",
                   help="also train a dense SDPA transformer of the same size in this process")
    p.add_argument("--baseline_compile", choices=["auto", "yes", "no"], default="auto",
                   help="torch.compile the baseline (auto: on CUDA)")
    p.add_argument("--peak_tflops", type=float, help="peak TFLOP/s for MFU (default: llmtrain.bench.flops.PEAK_FLOPS by GPU name, "
                        "989 for an H100/H200; no MFU on an unlisted device)")
    p.add_argument("--memory_cap_gb", type=float,
                   help="cap this process's CUDA allocator at this many GiB (the 16 GB card question)")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.add_argument("--profile", metavar="PATH", help="append a torch.profiler table of the last timed steps "
                                                     "(self time per kernel/op) to this file; timings include its overhead")
    p.set_defaults(func=run)
    from llmtrain.bench import memory

    memory.register(sub)
