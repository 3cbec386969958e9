"""The TensorRT backend's decisions, without a GPU: engine/machine mismatches, profile choice, batch split."""
import pytest
import torch

from engines.runtime_tensorrt import Chunk, EngineMismatch, check_engine_metadata, plan_batches
from engines.shape_profiles import ProfileError, ShapeProfile, named_profile

META = {"model_config": {"hidden_size": 3072}, "recipe": {"name": "fp8"},
        "tensorrt": {"flavour": "tensorrt_rtx", "version": "1.7.1.116"}, "target": "8.9"}


@pytest.mark.parametrize("flavour,version,gpu,message", [
    ("tensorrt", "11.4.0", (8, 9), r"built with tensorrt_rtx 1.7.1.116, but this ComfyUI has tensorrt 11.4.0"),
    ("tensorrt_rtx", "1.8.0", (8, 9), r"built with tensorrt_rtx 1.7.1.116, this ComfyUI has 1.8.0"),
    ("tensorrt_rtx", "1.7.1.116", None, r"run on an NVIDIA GPU; none was found"),
    ("tensorrt_rtx", "1.7.1.116", (12, 0), r"built for GPU '8.9', this GPU is RTX 5090 12.0: rebuild"),
])
def test_mismatches_are_explained(flavour, version, gpu, message):
    with pytest.raises(EngineMismatch, match=message):
        check_engine_metadata(META, flavour, version, gpu, "RTX 5090")


def test_matching_engine_passes_and_rtx_on_hopper_is_refused():
    check_engine_metadata(META, "tensorrt_rtx", "1.7.1.116", (8, 9))
    hopper = dict(META, target="NVIDIA H100 80GB HBM3 9.0")
    with pytest.raises(EngineMismatch, match="does not run on compute capability 9.0"):
        check_engine_metadata(hopper, "tensorrt_rtx", "1.7.1.116", (9, 0))
    with pytest.raises(EngineMismatch, match="does not describe a Kontext"):
        check_engine_metadata({"tensorrt": META["tensorrt"]}, "tensorrt_rtx", "1.7.1.116", (8, 9))


def test_profile_choice_and_batch_split():
    one_ref, two_ref = named_profile("kontext_1ref"), named_profile("kontext_2ref")
    assert plan_batches([one_ref, two_ref], 1, 8192, 512) == [Chunk(0, 0, 1)]
    assert plan_batches([one_ref, two_ref], 2, 12288, 300) == [Chunk(1, 0, 2)]
    # CFG batches cond + uncond; more than the profile's max batch is run in pieces, never refused.
    assert plan_batches([one_ref], 5, 8192, 512) == [Chunk(0, 0, 2), Chunk(0, 2, 4), Chunk(0, 4, 5)]
    with pytest.raises(ProfileError, match=r"image tokens \(target \+ references\) must be within 8084..8300, got 16384"):
        plan_batches([one_ref], 1, 16384, 512)
    with pytest.raises(ProfileError, match=r"text tokens must be within 256..512, got 600"):
        plan_batches([ShapeProfile("p", (1, 1, 2), (10, 20, 30), (256, 512, 512))], 1, 20, 600)


def test_backend_choice():
    from engines.runtime_tensorrt import choose_backend
    from engines.tensorrt_build import TensorRT, TensorRTMissing

    rtx = TensorRT(None, "tensorrt_rtx", "1.7.1.116")
    assert choose_backend("auto", META, rtx, (8, 9))[0] == "tensorrt"
    backend, why = choose_backend("auto", META, rtx, None)
    assert backend == "pytorch" and "none was found" in why
    backend, why = choose_backend("auto", META, TensorRTMissing("no TensorRT is installed"), (8, 9))
    assert backend == "pytorch" and "no TensorRT is installed" in why
    assert choose_backend("pytorch", META, rtx, (8, 9))[0] == "pytorch"
    with pytest.raises(EngineMismatch, match="none was found"):  # asked for TensorRT: no fallback
        choose_backend("tensorrt", META, rtx, None)
    with pytest.raises(ValueError, match="backend: expected"):
        choose_backend("onnx", META, rtx, (8, 9))


class RecordingContext:
    """The IExecutionContext calls `enqueue` makes, answering as TensorRT documents them (True on success) and
    recording what was bound. `profile` is the selected profile's accepted shapes; `names` the engine's I/O."""

    def __init__(self, profile: dict, names: tuple[str, ...], executes: bool = True):
        self.profile, self.names, self.executes = profile, names, executes
        self.shapes, self.addresses, self.stream = {}, {}, None

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return shape == self.profile.get(name, shape)

    def set_tensor_address(self, name, address):
        if name not in self.names:
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        self.stream = stream
        return self.executes


def _batch_of(batch: int, image_tokens: int = 6, text_tokens: int = 4):
    from engines.config import tiny_config
    from engines.contract import INPUT_NAMES

    cfg = tiny_config()
    g = torch.Generator().manual_seed(0)
    shapes = dict(img=(batch, image_tokens, cfg.in_channels), img_ids=(batch, image_tokens, 3),
                  txt=(batch, text_tokens, cfg.context_in_dim), txt_ids=(batch, text_tokens, 3), timesteps=(batch,),
                  y=(batch, cfg.vec_in_dim), guidance=(batch,))
    return cfg, {name: torch.randn(shapes[name], generator=g) for name in INPUT_NAMES}


ENGINE_DTYPES = dict(img=torch.bfloat16, img_ids=torch.float32, txt=torch.bfloat16, txt_ids=torch.float32,
                     timesteps=torch.float32, y=torch.bfloat16, guidance=torch.float32, out=torch.bfloat16)


def test_enqueue_binds_a_batch_piece_aligned_and_in_the_engines_dtypes():
    from engines.runtime_tensorrt import TENSORRT_ALIGNMENT, aligned_empty, enqueue

    cfg, inputs = _batch_of(5)
    piece = {name: t[2:4] for name, t in inputs.items()}  # what forward hands _run for Chunk(0, 2, 4)
    assert piece["timesteps"].data_ptr() - inputs["timesteps"].data_ptr() == 8  # 8 bytes in: not aligned
    out = aligned_empty((2, 6, cfg.out_channels), ENGINE_DTYPES["out"], "cpu")
    context = RecordingContext({}, tuple(ENGINE_DTYPES))
    bound = enqueue(context, 7, piece, ENGINE_DTYPES, out)
    assert context.stream == 7 and context.addresses["out"] == out.data_ptr()
    for name, t in zip(piece, bound):
        assert context.addresses[name] == t.data_ptr() and t.data_ptr() % TENSORRT_ALIGNMENT == 0, name
        assert context.shapes[name] == tuple(piece[name].shape), name
        assert t.dtype == ENGINE_DTYPES[name] and t.is_contiguous(), name
        assert torch.equal(t, piece[name].to(ENGINE_DTYPES[name])), name


def test_engine_ready_passes_an_aligned_tensor_in_the_engines_dtype_through_uncopied():
    from engines.runtime_tensorrt import aligned_empty, engine_ready

    t = aligned_empty((3, 4), torch.bfloat16, "cpu").fill_(1.5)
    assert engine_ready(t, torch.bfloat16).data_ptr() == t.data_ptr()
    assert engine_ready(t, torch.float32).data_ptr() != t.data_ptr()


def test_enqueue_names_what_the_engine_refused():
    from engines.runtime_tensorrt import aligned_empty, enqueue

    cfg, inputs = _batch_of(1, text_tokens=600)
    out = aligned_empty((1, 6, cfg.out_channels), ENGINE_DTYPES["out"], "cpu")
    outside = RecordingContext({"txt": (1, 4, cfg.context_in_dim)}, tuple(ENGINE_DTYPES))
    with pytest.raises(ProfileError, match=r"input txt of shape \(1, 600, \d+\) is outside the selected profile"):
        enqueue(outside, 0, inputs, ENGINE_DTYPES, out)
    no_guidance = RecordingContext({}, tuple(n for n in ENGINE_DTYPES if n != "guidance"))
    with pytest.raises(EngineMismatch, match="has no input named guidance"):
        enqueue(no_guidance, 0, inputs, ENGINE_DTYPES, out)
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        enqueue(RecordingContext({}, tuple(ENGINE_DTYPES), executes=False), 0, inputs, ENGINE_DTYPES, out)
    with pytest.raises(ValueError, match="output buffer at 0x[0-9a-f]+ is not 256-byte aligned"):
        enqueue(RecordingContext({}, tuple(ENGINE_DTYPES)), 0, inputs, ENGINE_DTYPES, out.view(-1)[1:])


def test_the_engine_file_is_mapped_for_tensorrt_and_a_refused_one_is_named(tmp_path):
    import mmap
    from types import SimpleNamespace

    from engines.config import tiny_config
    from engines.runtime_tensorrt import TensorRTBackend

    class Runtime:
        """TensorRT's Runtime as the backend uses it: deserialize_cuda_engine(buffer) -> engine, or None."""
        seen = []

        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, buffer):
            Runtime.seen.append((type(buffer), bytes(buffer)))
            return None  # what TensorRT returns for an engine it cannot load (its reason goes to the logger)

    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    trt = SimpleNamespace(module=SimpleNamespace(Logger=logger, Runtime=Runtime), flavour="tensorrt")
    import hashlib

    engine = tmp_path / "kontext_fp8.engine"
    engine.write_bytes(b"serialized engine " * 1000)
    meta = {"profiles": [named_profile("kontext_1ref").__dict__], "engine_bytes": engine.stat().st_size,
            "engine_sha256": hashlib.sha256(engine.read_bytes()).hexdigest(),
            "io": {name: {"dtype": "HALF"} for name in ENGINE_DTYPES}}
    backend = TensorRTBackend(engine, meta, trt, tiny_config())
    with pytest.raises(EngineMismatch, match="engine kontext_fp8.engine: TensorRT could not deserialize it"):
        backend._ensure_loaded()
    # mapped, not read into memory first (a full-size engine is ~12 GB), and the whole file
    assert Runtime.seen == [(mmap.mmap, engine.read_bytes())]
