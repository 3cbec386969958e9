"""The main job (`bash scripts/run.sh` = `python -m engines.demo`) and the pieces it is made of."""
import json
import random

import pytest
import torch

from engines import tiny_config
from engines.calibration import StandInEncoder, draw_scene
from engines.demo import INSTRUCTIONS, main, run_main_job, what_ran
from engines.edit_turns import EditInputError, EditTurn, comparison_sheet, sample_turns
from engines.tokens import pack_latent, unpack_latent

CFG = tiny_config()


def test_stand_in_decoder_inverts_the_stand_in_encoder():
    import numpy as np

    encoder = StandInEncoder(CFG, n_txt=4)
    image = draw_scene("street", 64, random.Random(1))
    tokens, grid = encoder.encode_image(image, 64)
    decoded = encoder.decode(tokens, grid)
    # encode_image sees the picture at two pixels per token side; decode gives exactly that picture back.
    seen = torch.from_numpy(np.asarray(image.convert("RGB").resize((grid[1] * 2, grid[0] * 2)), dtype=np.float32) / 255)
    assert decoded.shape == (1, grid[0] * 2, grid[1] * 2, 3)
    assert (decoded[0] - seen).abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"tokens: expected \[1, 16, 64\] for a 4x4 grid, got \[1, 9, 64\]"):
        encoder.decode(tokens[:, :9], (4, 4))


def test_unpack_latent_inverts_pack_latent():
    latent = torch.randn(2, 16, 6, 8)
    tokens, grid = pack_latent(latent)
    assert grid == (3, 4) and torch.equal(unpack_latent(tokens, grid), latent)
    with pytest.raises(ValueError, match=r"tokens: expected \[batch, 12, channels x 4\] for a 3x4 grid"):
        unpack_latent(tokens[:, :11], grid)


class RecordingModel:
    """Stands for the transformer: records each step's image tokens and returns a velocity that depends on them."""

    def __init__(self):
        self.img = []

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        self.img.append(img.clone())
        return 0.5 * img + txt.mean()


def test_each_turn_edits_the_previous_turns_latent():
    encoder = StandInEncoder(CFG, n_txt=4)
    source = encoder.encode_image(draw_scene("room", 64, random.Random(0)), 64)
    model, steps = RecordingModel(), 2
    turns = list(sample_turns(model, encoder, source, INSTRUCTIONS, steps))
    n = source[1][0] * source[1][1]
    assert [t.number for t in turns] == [1, 2, 3] and [t.instruction for t in turns] == list(INSTRUCTIONS)
    assert turns[2].history() == turns and turns[0].source_image is not None and turns[1].source_image is None
    for i, turn in enumerate(turns):
        # Every step of turn i samples beside its reference: the source for turn 1, then the previous turn's latent.
        want = source[0] if i == 0 else pack_latent(turns[i - 1].latent)[0]
        for img in model.img[i * steps:(i + 1) * steps]:
            assert torch.equal(img[:, n:], want), f"turn {i + 1}'s reference"
        assert turn.latent.shape == (1, CFG.in_channels // 4, 2 * source[1][0], 2 * source[1][1])
        assert torch.equal(turn.image, encoder.decode(pack_latent(turn.latent)[0], source[1]))
    assert not torch.equal(turns[0].latent, turns[1].latent)


def flat_turns(colours, height=8):
    turn = None
    for i, c in enumerate(colours):
        image = torch.tensor(c, dtype=torch.float32).expand(1, height, height, 3)
        turn = EditTurn(latent=torch.zeros(1, 16, 2, 2), image=image, instruction=f"edit {i}", seed=i, steps=1,
                        guidance=2.5, parent=turn, source_image=image if turn is None else None)
    return turn.history()


def test_comparison_sheet_puts_each_model_in_its_row():
    top, bottom = flat_turns([(1, 0, 0), (0, 1, 0)]), flat_turns([(0, 0, 1), (1, 1, 0)])
    height, caption = 32, 20
    sheet = comparison_sheet([("16-bit", top), ("FP8", bottom)], height=height, caption_px=caption)
    row = 20 + height + caption  # label strip, panel, caption
    assert sheet.shape == (1, 2 * row, 3 * height, 3)
    # Column 3 (turn 2): the 16-bit row's green over the FP8 row's yellow.
    x = 2 * height + height // 2
    assert sheet[0, 20 + height // 2, x].tolist() == [0, 1, 0]
    assert sheet[0, row + 20 + height // 2, x].tolist() == [1, 1, 0]
    with pytest.raises(EditInputError, match=r"rows: expected histories of the same length, got \[2, 1\]"):
        comparison_sheet([("a", top), ("b", bottom[:1])])


def test_the_last_sentence_says_what_did_not_run():
    assert what_ran("RTX 40", None).endswith(
        "not run: the engine itself, since no engine executes on a machine without a supported NVIDIA GPU.")
    assert "built for RTX 40, not NVIDIA H100" in what_ran("RTX 40", "NVIDIA H100")


@pytest.mark.parametrize("args, message", [(["--size", "100"], "multiple of 16"), (["--steps", "0"], "positive")])
def test_bad_arguments_are_refused_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu12) builds the engine on the CPU")
    out = tmp_path_factory.mktemp("main_job") / "demo"
    out.mkdir()
    (out / "earlier_run.txt").write_text("replaced by the new run")
    lines = []
    report = run_main_job(out, size=64, steps=2, calibration_steps=1, calibration_pairs=2, text_tokens=16,
                          say=lines.append)
    return out, report, lines


def test_main_job_writes_the_sheet_and_the_report(job):
    from PIL import Image

    out, report, lines = job
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]  # no work folder left beside it
    assert not (out / "earlier_run.txt").exists()
    assert json.loads((out / "report.json").read_text()) == report
    sheet = Image.open(out / "sheet.png")
    assert sheet.size[0] > 0 and sheet.size[1] > 0
    text = (out / "report.txt").read_text()
    for s in report["stages"]:
        assert s["what"] and s["what"] in text
        assert any(line.startswith(s["what"]) for line in lines)  # one printed line per stage
    whats = [s["what"] for s in report["stages"]]
    for expected in ("calibrate FP8 GEMMs + attention", "export ONNX", "build a TensorRT-RTX", "load the PyTorch FP8 backend",
                     "edit turn 1 on the source", "edit turn 2 on turn 1's latent", "edit turn 3 on turn 2's latent", "sheet"):
        assert sum(w.startswith(expected) for w in whats) == 1, expected
    assert lines[-1] == report["summary"] and text.rstrip().endswith(report["summary"])
    if not torch.cuda.is_available():
        assert report["summary"] == what_ran("RTX 40 cards (compute capability 8.9)", None)


def test_main_job_builds_a_real_engine_for_rtx_40(job):
    out, report, _ = job
    engine = out / report["files"]["engine"]
    meta = json.loads(engine.with_suffix(".json").read_text())
    assert engine.stat().st_size > 100_000 and meta["tensorrt"]["flavour"] == "tensorrt_rtx" and meta["target"] == "8.9"
    assert meta["recipe"]["attention"]["q"] == "fp8_per_tensor" and (out / report["files"]["calibrated_state"]).is_file()


def test_main_job_measures_the_quantized_model_against_16_bit(job):
    _, report, _ = job
    stages = {s["what"].split(":")[0].split(",")[0]: s for s in report["stages"]}
    backend = next(s for w, s in stages.items() if w.startswith("load the PyTorch FP8 backend"))["data"]
    assert backend["weight_bytes"] < 0.8 * backend["bytes_16bit"]  # FP8 weights, not 16-bit ones
    for row in [backend] + report["turns"]:
        rel = row.get("rel_l2_mean", row.get("rel_l2"))
        # FP8 changes the numbers (a backend running 16-bit would give ~1e-7) without losing the model: every
        # value read at the wrong scale, or a dropped quantizer amax, gives a relative error near 1 or above.
        assert 1e-3 < rel < 0.2, row


def test_a_failed_run_keeps_the_previous_result(tmp_path, monkeypatch):
    pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text("{}")

    def fail(*a, **k):
        raise RuntimeError("TensorRT said no")

    monkeypatch.setattr("engines.build.build_kontext_engine", fail)
    with pytest.raises(RuntimeError, match="TensorRT said no"):
        run_main_job(out, size=32, steps=1, calibration_steps=1, calibration_pairs=1, text_tokens=4, say=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"] and (out / "report.json").read_text() == "{}"
