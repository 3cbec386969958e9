"""Energy per step on one GPU, and how it splits between the step's FP8 GEMMs and its attention.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/step_energy.py [--variants ...] [--shape 1024r]
        [--attention flashattention3|triton] [--checkpoint PATH] [--x-amax-over-std 20,100]
        [--w-amax-over-std 20,100] [--score-std 2,4] [--seconds 10]

On the lent H100 the pack's step runs at the board's power limit (results/speed/step_speed_fa3_power_h100.json),
so its time is bounded below by its energy over that limit, and a kernel that is faster at the same energy
does not shorten it. This measures the energy. Each part runs back to back for --seconds (after warm-up),
with NVML's energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ) read before and after and the SM clock
and power sampled every 50 ms in between:
  step:<variant>  a whole step of step_speed.py's variant (pack_* or, with ComfyUI, comfy_*), batch 1
  gemms           the step's FP8 GEMMs alone (torch._scaled_mm, the shapes and counts of one step, Gaussian
                  operands quantized with amax at 448 as calibration scales them, BF16 bias and output, as
                  FP8Linear runs them)
  gemms:step_operands  the same GEMMs with the step's own operands: each FP8Linear's FP8 input as an
                  uncompiled step made it, through its weights
  gemms:x_amax_over_std=R, gemms:w_amax_over_std=R  the gemms part with heavier-tailed activations or weights
                  (--x-amax-over-std, --w-amax-over-std)
  attention:<kernel>  the step's 57 attention calls alone (the FP8 kernel --attention names, Q, K, V made the
                  same way, scores of unit variance)
  attention:<kernel>:step_operands  the same calls with the FP8 Q, K, V the uncompiled step made
  attention:<kernel>:score_std=S  the attention part with wider scores, a more peaked softmax (--score-std)
  gemms+attention:step_order  the step's own GEMMs and attention calls, with its operands, interleaved in the
                  order the step runs them and nothing else: the step's kernels without its elementwise work, at
                  the clocks that mix draws (the two parts above each run alone, at clocks of their own)
  idle            nothing running: the board's floor
Reports per part: ms and J per step (or step's worth), mean W, median SM clock, what NVML gives as the
clock's limiters over the run, and what the operands were (share of FP8 zeros, spread on the FP8 grid;
for attention the scores' spread and the share of P rounded to zero): the tensor cores' power depends on the
bits they multiply, and random weights are not a trained model's, so the data-shaped parts say how far the
random-weight step's energy could move on real data. Random weights unless --checkpoint; speed and energy are
not asserted by any test.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engines.fp8 import FP8, FP8_MAX, quantize_fp8  # noqa: E402


def step_gemm_shapes(cfg, image_tokens: int, text_tokens: int) -> list[tuple[int, int, int, int]]:
    """(rows, in_features, out_features, calls) of one batch-1 step's token GEMMs: the double blocks' image and
    text streams (QKV, projection, MLP up and down) and the single blocks' two linears."""
    h, mlp = cfg.hidden_size, cfg.mlp_hidden_dim
    shapes = []
    for rows in (image_tokens, text_tokens):
        shapes += [(rows, h, 3 * h, cfg.depth), (rows, h, h, cfg.depth), (rows, h, mlp, cfg.depth),
                   (rows, mlp, h, cfg.depth)]
    tokens = image_tokens + text_tokens
    shapes += [(tokens, h, 3 * h + mlp, cfg.depth_single_blocks), (tokens, h + mlp, h, cfg.depth_single_blocks)]
    return shapes


def calibrated_fp8(shape, device, amax_over_std: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 tensor, its per-tensor scale) of Gaussian values quantized as calibration does: amax at 448. (The
    tensor cores' power depends on the operands' bits: on the H100 these, and N(0, 0.5) values at unit scale,
    held the GEMMs' clock at 1320-1335 MHz, the step's own operands at 1410.) amax_over_std stands in for
    heavier tails than a Gaussian's (trained models' outlier channels): the standard deviation is put at
    448 / amax_over_std, as if calibration had met an outlier that many deviations out, and the few values
    past 448 saturate."""
    t = torch.randn(shape, device=device)
    if amax_over_std is None:
        scale = (t.abs().amax() / FP8_MAX).float()
        return quantize_fp8(t, scale), scale
    # Only the bits matter to the energy: the GEMMs read them at unit scale.
    return quantize_fp8(t, amax_over_std / FP8_MAX), torch.tensor(1.0, device=device)


def gemms_part(cfg, image_tokens: int, text_tokens: int, device, x_amax_over_std: float | None = None,
               w_amax_over_std: float | None = None):
    """The step's GEMM shapes on Gaussian operands; x_amax_over_std / w_amax_over_std give the activations / the
    weights heavier tails (see calibrated_fp8)."""
    calls = []
    for rows, k, n, count in step_gemm_shapes(cfg, image_tokens, text_tokens):
        x8, x_scale = calibrated_fp8((rows, k), device, x_amax_over_std)
        w8, w_scale = calibrated_fp8((n, k), device, w_amax_over_std)
        bias = torch.randn(n, device=device, dtype=torch.bfloat16)
        calls.append((x8, x_scale, w8.t(), w_scale, bias, count))

    def run():
        for x8, x_scale, wt8, w_scale, bias, count in calls:
            for _ in range(count):
                torch._scaled_mm(x8, wt8, scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=torch.bfloat16)
    flops = 2 * sum(rows * k * n * count for rows, k, n, count in step_gemm_shapes(cfg, image_tokens, text_tokens))
    stats = dict(x=fp8_statistics(torch.cat([c[0].flatten()[::97] for c in calls])),
                 w=fp8_statistics(torch.cat([c[2].flatten()[::97] for c in calls])))
    return run, flops, stats


def capture_step_operands(model, x) -> tuple[list, list, list]:
    """One uncompiled step of model, recording every FP8Linear's FP8 input and every attention kernel call's FP8
    inputs: ([(layer, x8, out_dtype)], [(op, args)], order), for replaying the step's GEMMs and attention alone or
    together; order lists ("gemm" | "attention", index) in the order the step made the calls."""
    from engines import fp8_attention
    from engines.runtime_torch import FP8Linear

    gemms, attention, order = [], [], []
    matmul, ops = FP8Linear.matmul_fp8, {name: getattr(fp8_attention, name)
                                         for name in ("fa3_fp8_attention", "fused_fp8_attention")}

    def recording_matmul(layer, x8, out_dtype):
        order.append(("gemm", len(gemms)))
        gemms.append((layer, x8.clone(), out_dtype))
        return matmul(layer, x8, out_dtype)

    def recording(op):
        def call(*args):
            order.append(("attention", len(attention)))
            attention.append((op, [a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
            return op(*args)
        return call
    FP8Linear.matmul_fp8 = recording_matmul
    for name, op in ops.items():
        setattr(fp8_attention, name, recording(op))
    try:
        with torch.no_grad():
            model(**x)
    finally:
        FP8Linear.matmul_fp8 = matmul
        for name, op in ops.items():
            setattr(fp8_attention, name, op)
    return gemms, attention, order


def fp8_statistics(t8: torch.Tensor) -> dict:
    """What the tensor cores see of an FP8 operand: the share of exact zeros and the values' standard deviation
    on the FP8 grid (448 its largest value; calibrated Gaussian values have ~80-90, heavier tails put most values
    on fewer, smaller codes)."""
    t = t8.float()
    return dict(zero_fraction=round((t == 0).float().mean().item(), 4), std=round(t.std().item(), 2))


def p_statistics(q8: torch.Tensor, k8: torch.Tensor, scales: torch.Tensor, rows: int = 256) -> dict:
    """The softmax's spread in one attention call, sampled (every 8th head, `rows` query rows): the scores' standard
    deviation along a row, and the share of P = exp(score - row max) that the kernels' FP8 P (amax 1) rounds to
    zero, which the P x V MMA then multiplies. (The kernels subtract a running maximum, so their P differ a little.)"""
    head_dim = q8.shape[-1]
    step = max(1, q8.shape[2] // rows)
    q = q8[0, ::8, ::step].float() * scales[0]
    k = k8[0, ::8].float() * scales[1]
    s = q @ k.transpose(-1, -2) / head_dim ** 0.5
    p8 = ((s - s.amax(-1, keepdim=True)).exp() * FP8_MAX).to(FP8).float()
    return dict(score_std=round(s.std(-1).mean().item(), 3), p_zero_fraction=round((p8 == 0).float().mean().item(), 4))


def step_gemms_part(gemms):
    """The step's own FP8 GEMMs alone: its captured inputs replayed through their layers' weights (what the gemms
    part approximates with Gaussian operands)."""
    from engines.runtime_torch import FP8Linear

    def run():
        for layer, x8, out_dtype in gemms:
            FP8Linear.matmul_fp8(layer, x8, out_dtype)
    stats = dict(x=fp8_statistics(torch.cat([x8.flatten()[::97] for _, x8, _ in gemms])),
                 w=fp8_statistics(torch.cat([layer.weight.flatten()[::97] for layer, _, _ in gemms])))
    return run, step_gemm_flops(gemms), stats


def step_gemm_flops(gemms) -> int:
    return 2 * sum(x8.shape[0] * x8.shape[1] * layer.weight.shape[0] for layer, x8, _ in gemms)


def step_attention_flops(attention, cfg) -> int:
    q8 = attention[0][1][0]
    return 4 * len(attention) * cfg.num_heads * q8.shape[2] ** 2 * q8.shape[3]


def step_attention_part(attention, cfg):
    """The step's own attention calls alone, replayed from their captured FP8 inputs."""
    def run():
        for op, args in attention:
            op(*args)
    samples = [p_statistics(args[0], args[1], args[3]) for _, args in attention[::8]]
    stats = {key: round(statistics.mean(s[key] for s in samples), 4) for key in samples[0]}
    return run, step_attention_flops(attention, cfg), stats


def step_kernels_part(gemms, attention, order, cfg):
    """The step's own GEMMs and attention calls replayed in the step's order, nothing between them: what the step's
    time would be if its elementwise work cost nothing, at the power and clocks of the GEMM / attention mix."""
    from engines.runtime_torch import FP8Linear

    calls = [(FP8Linear.matmul_fp8, gemms[i]) if kind == "gemm" else attention[i] for kind, i in order]

    def run():
        for fn, args in calls:
            fn(*args)
    flops = step_gemm_flops(gemms) + step_attention_flops(attention, cfg)
    return run, flops, dict(gemm_calls=len(gemms), attention_calls=len(attention))


def attention_part(cfg, tokens: int, kernel: str, device, score_std: float = 1.0):
    """The step's attention calls on Gaussian Q, K, V; score_std widens the scores q.k / sqrt(128) from unit
    variance (the FP8 Q and K are the same bits, their scales grow), so more of each row's P rounds to zero."""
    from engines.fp8_attention import empty_transposed_v
    from engines.fp8_attention_fa3 import default_library, load_fa3
    from engines.fp8_attention_triton import fp8_attention

    heads, head_dim = cfg.num_heads, cfg.head_dim
    (q8, q_scale), (k8, k_scale), (v8, v_scale) = (calibrated_fp8((1, heads, tokens, head_dim), device)
                                                   for _ in range(3))
    widen = score_std ** 0.5
    scales = torch.stack([q_scale * widen, k_scale * widen, v_scale])
    calls = cfg.depth + cfg.depth_single_blocks
    if kernel == "flashattention3":
        fa3 = load_fa3(str(default_library()))

        def run():
            for _ in range(calls):
                fa3(q8, k8, v8, scales)
    else:
        vt8 = empty_transposed_v(1, heads, head_dim, tokens, device)
        vt8.copy_(v8.transpose(-1, -2))

        def run():
            for _ in range(calls):
                fp8_attention(q8, k8, vt8, scales, torch.bfloat16)
    return run, 4 * calls * heads * tokens * tokens * head_dim, p_statistics(q8, k8, scales)


class NVMLMeter:
    """NVML's energy counter around a run, with the SM clock and power sampled in a thread."""

    def __init__(self, index: int):
        try:
            import pynvml
        except ImportError:
            raise SystemExit("step_energy.py reads NVML's energy counter through nvidia-ml-py (import pynvml), "
                             "which is not installed") from None

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        # nvidia-ml-py renamed "throttle reasons" to "clocks event reasons" (12.535); either name, as installed
        self.clock_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        self.reason_prefix = ("nvmlClocksEventReason" if hasattr(pynvml, "nvmlClocksEventReasonSwPowerCap")
                              else "nvmlClocksThrottleReason")

    def energy_mj(self) -> int:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def limits(self) -> dict:
        n = self.nvml
        return dict(power_limit_w=n.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1000,
                    max_sm_clock_mhz=n.nvmlDeviceGetMaxClockInfo(self.handle, n.NVML_CLOCK_SM))

    def measure(self, run, seconds: float) -> dict:
        n, samples, stop = self.nvml, [], threading.Event()
        reasons = 0

        def sample():
            nonlocal reasons
            while not stop.is_set():
                samples.append((n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM),
                                n.nvmlDeviceGetPowerUsage(self.handle) / 1000))
                reasons |= self.clock_reasons(self.handle)
                time.sleep(0.05)
        torch.cuda.synchronize()
        thread = threading.Thread(target=sample, daemon=True)
        e0, t0, calls = self.energy_mj(), time.perf_counter(), 0
        thread.start()
        while time.perf_counter() - t0 < seconds:
            if run is None:
                time.sleep(0.1)
            else:
                run()
                calls += 1
                torch.cuda.synchronize()
        wall, joules = time.perf_counter() - t0, (self.energy_mj() - e0) / 1000
        stop.set()
        thread.join()
        names = {v: k for k, v in vars(n).items() if k.startswith(self.reason_prefix) and isinstance(v, int)
                 and v and not v & (v - 1)}
        return dict(calls=calls, ms=round(wall * 1000 / calls, 1) if calls else None,
                    joules=round(joules / calls, 2) if calls else None, mean_w=round(joules / wall, 1),
                    sm_clock_mhz_median=statistics.median(s[0] for s in samples) if samples else None,
                    power_w_median=round(statistics.median(s[1] for s in samples), 1) if samples else None,
                    clock_limiters=sorted(name.removeprefix(self.reason_prefix)
                                          for bit, name in names.items() if reasons & bit))


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (comfy_* variants)")
    p.add_argument("--variants", default="pack_fp8_attn_fa3_compile", help="step_speed.py's variants, comma-separated")
    p.add_argument("--shape", default="1024r", help="as step_speed.py's --shapes, one shape")
    p.add_argument("--attention", default="flashattention3", choices=("flashattention3", "triton"),
                   help="the kernel the attention part runs")
    p.add_argument("--x-amax-over-std", type=_floats, default=[],
                   help="also run the GEMMs with activations whose calibrated amax lies this many standard deviations "
                        "out (comma-separated; a Gaussian's ~5-6): how the GEMMs' energy depends on their data")
    p.add_argument("--w-amax-over-std", type=_floats, default=[],
                   help="the same for the weights (the activations then Gaussian)")
    p.add_argument("--score-std", type=_floats, default=[],
                   help="also run the attention with scores of these standard deviations (comma-separated; "
                        "the attention part's are 1): how its energy depends on how peaked the softmax is")
    p.add_argument("--checkpoint", help="a FLUX.1 Kontext [dev] safetensors (BFL or ComfyUI keys), as step_speed.py's; "
                                        "default: random weights")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", default="output/step_energy.json")
    args = p.parse_args(argv)
    if args.comfyui:
        sys.path.insert(0, args.comfyui)
    import step_speed

    from engines.quantize import use_eager_fp8_fake_quant

    use_eager_fp8_fake_quant()  # as step_speed.py: the pack variants' calibration pass only sets scales
    device = torch.device("cuda")
    meter = NVMLMeter(torch.cuda.current_device())
    size, with_ref = step_speed.parse_shape(args.shape)
    # Weights first: a checkpoint's config sets the shapes of every part.
    sd, cfg = step_speed.load_weights(args, device)
    x = step_speed.step_inputs(cfg, size, with_ref, 1, device)
    image_tokens, text_tokens = x["img"].shape[1], x["txt"].shape[1]
    rows = [dict(part="idle", **meter.measure(None, 3.0))]
    print(json.dumps(rows[-1]), flush=True)

    captured = {}

    def step_operands(kind):
        def make():
            if not captured:
                gpu_sd = {k: v.to(device) for k, v in sd.items()}
                model = step_speed.fp8_model(gpu_sd, device, attention=True, attention_kernel=args.attention)
                del gpu_sd
                captured["gemms"], captured["attention"], captured["order"] = capture_step_operands(model, x)
            if kind == "gemms":
                return step_gemms_part(captured["gemms"])
            if kind == "attention":
                return step_attention_part(captured["attention"], cfg)
            # the last of the three: the captured operands (several GB) are freed after it
            return step_kernels_part(captured.pop("gemms"), captured.pop("attention"), captured.pop("order"), cfg)
        return make
    tokens = image_tokens + text_tokens
    parts = [("gemms", lambda: gemms_part(cfg, image_tokens, text_tokens, device))]
    parts += [(f"gemms:x_amax_over_std={r:g}", lambda r=r: gemms_part(cfg, image_tokens, text_tokens, device, r))
              for r in args.x_amax_over_std]
    parts += [(f"gemms:w_amax_over_std={r:g}", lambda r=r: gemms_part(cfg, image_tokens, text_tokens, device, None, r))
              for r in args.w_amax_over_std]
    parts += [("gemms:step_operands", step_operands("gemms")),
              (f"attention:{args.attention}:step_operands", step_operands("attention")),
              ("gemms+attention:step_order", step_operands("kernels")),
              (f"attention:{args.attention}", lambda: attention_part(cfg, tokens, args.attention, device))]
    parts += [(f"attention:{args.attention}:score_std={spread:g}",
               lambda spread=spread: attention_part(cfg, tokens, args.attention, device, spread))
              for spread in args.score_std]
    for name, make in parts:
        run, flops, stats = make()
        for _ in range(3):
            run()
        row = dict(part=name, **meter.measure(run, args.seconds))
        row["pflop_per_s"] = round(flops / (row["ms"] / 1000) / 1e15, 3)
        row["operands"] = stats
        rows.append(row)
        print(json.dumps(row), flush=True)
        run = None
        gc.collect()
        torch.cuda.empty_cache()
    if args.variants:
        torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 64
        for variant in args.variants.split(","):
            torch._dynamo.reset()
            fn = step_speed.make_variant(variant, sd, cfg, device)
            with torch.no_grad():
                for _ in range(4):
                    fn(x)
                rows.append(dict(part=f"step:{variant}", **meter.measure(lambda: fn(x), args.seconds)))
            print(json.dumps(rows[-1]), flush=True)
            fn = None
            torch.cuda.empty_cache()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape,
               tokens=image_tokens + text_tokens, weights=args.checkpoint or "random", **meter.limits())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    print(json.dumps(env))
    print("| part | ms | J | mean W | SM clock MHz (median) | PFLOP/s | clock limiters |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['ms']} | {r['joules']} | {r['mean_w']} | {r['sm_clock_mhz_median']} | "
              f"{r.get('pflop_per_s', '')} | {', '.join(r['clock_limiters'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
