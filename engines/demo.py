"""The pack's main job: everything it does, stage by stage, on the embedded tiny Kontext, on a CPU.

    python -m engines.demo [--out output/demo]        (`bash scripts/run.sh` sets up, then runs this)

1. a tiny FLUX.1 Kontext transformer with random 16-bit weights, written as a checkpoint (BFL's key names);
2. FP8 quantization of its GEMMs and attention, calibrated by ModelOpt on the pack's default calibration set,
3. exported to ONNX and 4. built into a TensorRT-RTX engine for RTX 40 cards (compute capability 8.9):
   steps 2-4 are the Build Engine node's own path (`build.build_kontext_engine`); TensorRT-RTX builds ahead
   of time with no GPU;
5. the PyTorch FP8 backend loaded from the checkpoint and the calibrated state, as the loader node does;
6. a three-turn edit, each turn editing the previous turn's latent, on the 16-bit model and on the backend;
7. a PNG sheet of both edits side by side and a report (JSON and text).

No text encoder or VAE exists at this size, so prompts and images go through `calibration.StandInEncoder`
(and its inverse, for the pictures): the path is the pack's, the pictures mean nothing (random weights).
The engine is built, not run: TensorRT engines execute only on a supported NVIDIA GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import random
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

RTX40 = (8, 9)  # the engine's target: Ada, the RTX cards with FP8 tensor cores that TensorRT-RTX runs on
SOURCE_SCENE = "street"
INSTRUCTIONS = ("remove the people from the street", "make it dusk with warm street lights", "add light rain")
SIGMAS = (0.9, 0.5, 0.1)  # one edit step at each, for the per-stage error against the 16-bit model


@dataclass
class Stage:
    what: str
    seconds: float
    size: str = ""  # what it made, e.g. "engine 1.9 MB"
    error: str = ""  # against the 16-bit model, or why there is none
    data: dict = field(default_factory=dict)  # the numbers behind the line, for the JSON report

    def line(self) -> str:
        parts = [f"{self.what:<60}", f"{self.seconds:6.1f} s"]
        if self.size:
            parts.append(f"{self.size:<24}")
        if self.error:
            parts.append(self.error)
        return "  ".join(parts).rstrip()


class Ticker:
    """Progress during a long stage: one line at most every `every` seconds (plain lines, so a log or a
    pipe shows them as they come)."""

    LABELS = {"calibrate": "calibrating: pair {done} of {total}", "build_engine": "TensorRT-RTX is building"}

    def __init__(self, say: Callable[[str], None], every: float = 5.0):
        self.say, self.every = say, every
        self.stage, self.start = None, time.perf_counter()
        self.last = self.start

    def __call__(self, stage: str, done: int, total: int, *_):
        now = time.perf_counter()
        if stage != self.stage:  # seconds are counted from the stage's first report
            self.stage, self.start = stage, self.last
        if now - self.last >= self.every:
            self.last = now
            label = self.LABELS.get(stage, stage).format(done=done, total=total)
            self.say(f"    ... {label} ({now - self.start:.0f} s)")


def error_text(cos: float, rel: float) -> str:
    return f"vs 16-bit: cosine {cos:.5f}, rel. L2 {rel:.4f}"


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def step_error(reference_model, model, pairs) -> tuple[float, float]:
    """Worst cosine and mean relative L2 of one edit step at each of SIGMAS, on the target tokens."""
    from .accuracy import error_table, step_outputs

    rows = error_table(step_outputs(reference_model, pairs, SIGMAS), step_outputs(model, pairs, SIGMAS))
    return min(r.cosine_min for r in rows), sum(r.rel_l2_mean for r in rows) / len(rows)


def what_ran(engine_target: str, gpu: str | None) -> str:
    """The job's last sentence: what ran here and what did not."""
    ran = ("Ran here, on the CPU: ModelOpt's FP8 calibration (GEMMs and attention), the ONNX export, a TensorRT-RTX "
           f"engine build for {engine_target}, and a three-turn edit on the PyTorch FP8 backend (its FP8 GEMMs and "
           "attention computed in float32, as on a GPU without FP8 tensor cores)")
    if gpu is None:
        return ran + "; not run: the engine itself, since no engine executes on a machine without a supported NVIDIA GPU."
    return ran + f"; not run: the engine itself (this job runs no engine, and it was built for {engine_target}, not {gpu})."


def run_main_job(out: Path, *, size: int = 384, steps: int = 8, calibration_steps: int = 4,
                 calibration_pairs: int = 12, text_tokens: int = 256, say: Callable[[str], None] | None = None) -> dict:
    """Run every stage into a fresh folder that replaces `out` when the job has finished (a failed run leaves
    the previous result as it was and no half-written folder). Returns the report. `say` gets each line
    (default: this process's stdout; what the libraries print while the job runs is not shown)."""
    say = say or (lambda line, stream=sys.stdout: print(line, file=stream, flush=True))
    job_start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would make the result private to this user
    stages: list[Stage] = []

    def stage(s: Stage) -> Stage:
        s.seconds = round(s.seconds, 2)
        stages.append(s)
        say(s.line())
        return s

    scoped = contextlib.ExitStack()  # what the job changes for its own run (warning filters)
    try:
        say("loading PyTorch, ModelOpt and TensorRT-RTX ...")
        t = time.perf_counter()
        import torch

        # ModelOpt's and the ONNX tracer's warnings say nothing about this run that a newcomer could act on.
        scoped.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", category=UserWarning, module=r"modelopt\..*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        import modelopt.torch.quantization  # noqa: F401  (imported here, so that its ~10 s show on this line)
        from safetensors.torch import save_file

        from . import __version__, random_state_dict, tiny_config, transformer_from_state_dict
        from .build import build_kontext_engine
        from .calibrated_state import load_calibrated_state
        from .calibration import (DEFAULT_EDITS, EncodedPair, StandInEncoder, draw_scene, read_calibration_set,
                                  write_default_calibration_set)
        from .edit_turns import comparison_sheet, sample_turns
        from .engine_store import EngineStore
        from .quantize import output_error
        from .recipes import load_recipe
        from .runtime_tensorrt import choose_backend
        from .runtime_torch import load_fp8_transformer, transformer_bytes
        from .shape_profiles import named_profile
        from .source_weights import open_checkpoint
        from .tensorrt_build import import_tensorrt

        trt = import_tensorrt("tensorrt_rtx")
        torch.manual_seed(0)
        stage(Stage("load PyTorch, ModelOpt and TensorRT-RTX", time.perf_counter() - t,
                    data=dict(torch=torch.__version__, tensorrt_rtx=trt.version)))

        # 1. The model: random 16-bit weights, saved as a user's checkpoint would be.
        t = time.perf_counter()
        cfg = tiny_config()
        sd16 = random_state_dict(cfg, seed=0, dtype=torch.float16)
        checkpoint = work / "kontext_tiny_random.safetensors"
        save_file(sd16, str(checkpoint))
        # The 16-bit reference computes in float32 on the CPU: the same weights, exactly (fp16 -> fp32 is exact).
        reference = transformer_from_state_dict({k: v.float() for k, v in sd16.items()})
        params = sum(v.numel() for v in sd16.values())
        stage(Stage(f"tiny Kontext, random 16-bit weights ({params / 1e6:.2f} M parameters)", time.perf_counter() - t,
                    f"checkpoint {mib(checkpoint.stat().st_size)}", data=dict(parameters=params,
                                                                                   checkpoint=checkpoint.name)))

        # Calibration data: the default set, drawn, encoded by the stand-in; the edit's source is held out.
        encoder = StandInEncoder(cfg, n_txt=text_tokens)
        calib = read_calibration_set(write_default_calibration_set(work / "calibration_set", size=size))
        pairs = [encoder(p, size) for p in calib[:calibration_pairs]]
        source_image = draw_scene(SOURCE_SCENE, size, random.Random(2026))  # not a picture the set holds
        source = encoder.encode_image(source_image, size)
        held_out = [EncodedPair(*encoder.encode_prompt(INSTRUCTIONS[0]), reference=source[0], reference_grid=source[1])]

        # 2-4. Calibrate, export, build: the Build Engine node's path.
        say(f"building: calibrate {len(pairs)} pairs x {calibration_steps} steps -> ONNX -> TensorRT-RTX engine ...")
        recipe = load_recipe("fp8", attention=True)
        store = EngineStore(work / "tensorrt")
        # ModelOpt prints its quantizer count: not one of the job's lines.
        with open_checkpoint(checkpoint) as weights, contextlib.redirect_stdout(io.StringIO()):
            result = build_kontext_engine(weights, recipe, [named_profile("kontext_1ref")], pairs, calibration_steps, store,
                                          calibration_name="default", compute_capability=RTX40, keep_onnx=True,
                                          progress=Ticker(say), trt=trt)
        meta = store.read_metadata(result.engine)
        times = {name: rec["seconds"] for name, rec in meta["stages"].items()}

        fake_quant = transformer_from_state_dict({k: v.float() for k, v in sd16.items()})
        with contextlib.redirect_stdout(io.StringIO()):
            _, report = load_calibrated_state(fake_quant, result.calibrated_state)
        cos, rel = step_error(reference, fake_quant, held_out)
        stage(Stage(f"calibrate FP8 GEMMs + attention, ModelOpt, {len(pairs)} pairs x {calibration_steps}",
                    times["calibrate"] + times["save_calibrated_state"],
                    f"state {mib(result.calibrated_state.stat().st_size)}", error_text(cos, rel),
                    data=dict(quantizers=report.counts, linear_16bit=report.linear_16bit, cosine_min=cos, rel_l2_mean=rel,
                              note="ModelOpt's calibrated (fake-quant) model, one edit step at each sigma")))
        onnx_dir = next(store.root.glob("*.onnx.d"))
        stage(Stage("export ONNX (FP8 Q/DQ and FP8 attention nodes)", times["export_onnx"],
                    f"ONNX {mib(folder_bytes(onnx_dir))}", "(its FP8 graph runs only in TensorRT)",
                    data=dict(path=str(onnx_dir.relative_to(work)))))
        stage(Stage(f"build a TensorRT-RTX {trt.version} engine for RTX 40 (sm {meta['target']})", times["build_engine"], f"engine {mib(result.engine.stat().st_size)}",
                    "not run: it runs on an RTX 40 GPU only", data=dict(engine=str(result.engine.relative_to(work)),
                                                              target=meta["target"], io=meta["io"])))

        # 5. The loader's PyTorch backend, from the checkpoint (one tensor at a time) and the calibrated state.
        gpu = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        gpu_name = torch.cuda.get_device_name() if gpu else None
        chosen, why = choose_backend("auto", meta, trt, gpu, gpu_name or "")
        t = time.perf_counter()
        with open_checkpoint(checkpoint) as weights:
            backend = load_fp8_transformer(weights, result.calibrated_state, device="cpu", dtype=torch.float32)
        load_s = time.perf_counter() - t
        cos, rel = step_error(reference, backend, held_out)
        fp8_bytes, bf16_bytes = transformer_bytes(backend), sum(v.numel() * 2 for v in sd16.values())
        stage(Stage("load the PyTorch FP8 backend: checkpoint + calibrated state", load_s,
                    f"{mib(fp8_bytes)} (16-bit {mib(bf16_bytes)})", error_text(cos, rel),
                    data=dict(auto_backend=chosen, why=why, weight_bytes=fp8_bytes, bytes_16bit=bf16_bytes,
                              cosine_min=cos, rel_l2_mean=rel)))
        say(f"    the loader's backend 'auto' would choose {chosen}: {why}")

        # 6. Three turns, each on the previous turn's latent, on both models.
        chains, seconds = {}, {}
        for name, model in (("16-bit", reference), ("FP8", backend)):
            ticker, done = Ticker(say), [0]

            def step(name=name, ticker=ticker, done=done):
                done[0] += 1
                ticker(f"{name} edit: sampling step {{done}} of {{total}}", done[0], steps * len(INSTRUCTIONS))

            chains[name], seconds[name] = [], []
            t = time.perf_counter()
            with torch.no_grad():
                for turn in sample_turns(model, encoder, source, INSTRUCTIONS, steps, on_step=step):
                    chains[name].append(turn)
                    seconds[name].append(time.perf_counter() - t)
                    t = time.perf_counter()
        turn_errors = []
        for a, b, t16, t8 in zip(chains["16-bit"], chains["FP8"], seconds["16-bit"], seconds["FP8"]):
            cos, rel = output_error(a.latent, b.latent)
            turn_errors.append(dict(turn=a.number, instruction=a.instruction, cosine=cos, rel_l2=rel,
                                    seconds_16bit=round(t16, 2), seconds_fp8=round(t8, 2)))
            on = f"turn {a.number - 1}'s latent" if a.number > 1 else "the source"
            what = textwrap.shorten(f"edit turn {a.number} on {on}: {a.instruction}", 60, placeholder="...")
            stage(Stage(what, t16 + t8, f"16-bit {t16:.1f} s, FP8 {t8:.1f} s",
                        error_text(cos, rel), data=turn_errors[-1]))

        # 7. The sheet and the report.
        t = time.perf_counter()
        sheet = comparison_sheet([("16-bit weights (random: the turns are noise; compare the rows)", chains["16-bit"]),
                                  ("FP8, the PyTorch backend (same seeds and instructions)", chains["FP8"])])
        from PIL import Image

        sheet_path = work / "sheet.png"
        Image.fromarray((sheet[0].numpy() * 255).round().astype("uint8")).save(sheet_path)
        stage(Stage(f"sheet: source + {len(INSTRUCTIONS)} turns, 16-bit over FP8", time.perf_counter() - t,
                    f"{sheet.shape[2]}x{sheet.shape[1]} PNG", data=dict(path=sheet_path.name)))
        final = what_ran("RTX 40 cards (compute capability 8.9)", gpu_name)
        report = dict(
            job="Kontext TRT main job", pack_version=__version__, python=platform.python_version(),
            machine=dict(cpu=platform.processor() or platform.machine(), gpu=gpu_name),
            settings=dict(size=size, steps=steps, calibration_pairs=len(pairs), calibration_steps=calibration_steps,
                          text_tokens=text_tokens, recipe="fp8 + FP8 attention", calibration_set="default",
                          calibration_scenes=sorted({s for s, _ in DEFAULT_EDITS}), edit_source=SOURCE_SCENE),
            stages=[asdict(s) for s in stages], turns=turn_errors,
            files=dict(sheet="sheet.png", report_text="report.txt", checkpoint=checkpoint.name,
                       engine=str(result.engine.relative_to(work)),
                       calibrated_state=str(result.calibrated_state.relative_to(work))),
            wall_seconds=round(time.perf_counter() - job_start, 1), summary=final)
        (work / "report.json").write_text(json.dumps(report, indent=2))
        (work / "report.txt").write_text("\n".join(s.line() for s in stages) + "\n\n" + final + "\n")
        if out.exists():
            shutil.rmtree(out)
        work.replace(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        scoped.close()
    say(f"wrote {out}/sheet.png, {out}/report.json and {out}/report.txt ({report['wall_seconds']:.0f} s)")
    say(final)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/demo", help="the folder the job writes (replaced at the end)")
    parser.add_argument("--size", type=int, default=384, help="edit size in pixels, a square (384: 576 + 576 tokens)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per edit turn")
    parser.add_argument("--calibration-steps", type=int, default=4, help="sampling steps per calibration pair")
    parser.add_argument("--calibration-pairs", type=int, default=12, help="pairs of the default set (at most 12)")
    args = parser.parse_args(argv)
    for name in ("size", "steps", "calibration_steps", "calibration_pairs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.size % 16:
        parser.error(f"--size: expected a multiple of 16 pixels (one token side), got {args.size}")
    run_main_job(Path(args.out), size=args.size, steps=args.steps, calibration_steps=args.calibration_steps,
                 calibration_pairs=args.calibration_pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
