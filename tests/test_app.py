"""The app's logic without a browser: colours to classes (synthesis.painting), uploads, the
studio's settings and references (synthesis.studio), app.py's option checks and the request guard."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import CLASS_INDEX, CLASS_NAMES, NUM_CLASSES, PALETTE, DataError
from synthesis import painting

REPO = Path(__file__).resolve().parent.parent


def nearest_class(rgb):
    """Independent nearest palette colour: float64 Euclidean distance, per pixel, first minimum."""
    d = np.linalg.norm(rgb.reshape(-1, 1, 3).astype(np.float64) - PALETTE[None].astype(np.float64), axis=2)
    return d.argmin(axis=1).reshape(rgb.shape[:2])


def test_snap_matches_independent_nearest_colour():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 40, 3)).astype(np.uint8)
    rgb[:4] = PALETTE[CLASS_INDEX["sky"]]  # some exact palette pixels
    snapped = painting.snap_to_palette(rgb)
    assert snapped.label.dtype == np.uint8 and snapped.label.shape == (24, 40)
    np.testing.assert_array_equal(snapped.label, nearest_class(rgb))
    exact = (rgb[..., None, :] == PALETTE[None, None]).all(axis=3).any(axis=2)
    assert snapped.off_palette == int((~exact).sum()) and snapped.erased == 0
    assert str(snapped.off_palette) in snapped.note() and "snapped" in snapped.note()


def test_palette_pixels_need_no_note_and_transparent_is_other():
    label = np.arange(NUM_CLASSES, dtype=np.uint8).repeat(2).reshape(2, NUM_CLASSES)
    rgba = painting.painted_picture(label)
    rgba[0, :3, 3] = 0  # erased
    snapped = painting.snap_to_palette(rgba)
    expected = label.copy()
    expected[0, :3] = CLASS_INDEX["other"]
    np.testing.assert_array_equal(snapped.label, expected)
    assert snapped.off_palette == 0 and snapped.erased == 3
    assert "other" in snapped.note() and "snapped" not in snapped.note()
    assert painting.snap_to_palette(painting.painted_picture(label)).note() == ""


def test_eraser_colour_is_class_other():
    assert painting.OTHER == CLASS_INDEX["other"] == CLASS_NAMES.index("other")
    black = np.zeros((2, 2, 3), np.uint8)  # the canvas background under erased paint
    assert tuple(PALETTE[painting.OTHER]) == (0, 0, 0)
    assert (painting.snap_to_palette(black).label == painting.OTHER).all()


def test_flatten_is_the_over_operator():
    background = np.zeros((2, 3, 4), np.uint8)
    background[...] = (10, 20, 30, 255)
    layer = np.zeros((2, 3, 4), np.uint8)
    layer[0, 0] = (200, 100, 0, 255)     # opaque paint
    layer[0, 1] = (200, 100, 0, 128)     # half-transparent brush edge
    flat = painting.flatten(background, [layer])
    a = 128 / 255.0
    expected = np.array(background, np.float64)
    expected[0, 0, :3] = (200, 100, 0)
    expected[0, 1, :3] = np.array((200, 100, 0)) * a + np.array((10, 20, 30)) * (1 - a)
    np.testing.assert_allclose(flat.astype(np.float64), np.round(expected), atol=0.5)
    composite = np.full((2, 3, 3), 7, np.uint8)
    assert (painting.flatten(background, [layer], composite)[..., :3] == 7).all()
    assert painting.flatten(None, []) is None
    with pytest.raises(ValueError, match="a layer of"):
        painting.flatten(background, [np.zeros((3, 3, 4), np.uint8)])


def test_read_label_upload_index_colour_and_bad_file(tmp_path):
    label = np.random.default_rng(1).integers(0, NUM_CLASSES, (10, 12)).astype(np.uint8)
    Image.fromarray(label, "L").save(tmp_path / "index.png")
    index = painting.read_label_upload(tmp_path / "index.png")
    np.testing.assert_array_equal(index.label, label)
    assert index.note() == ""

    colour = PALETTE[label].astype(np.int64)
    colour[0, 0] += 3  # one pixel near, not on, its colour
    Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8)).save(tmp_path / "colour.png")
    snapped = painting.read_label_upload(tmp_path / "colour.png")
    np.testing.assert_array_equal(snapped.label, nearest_class(np.clip(colour, 0, 255).astype(np.uint8)))
    assert snapped.off_palette == 1

    (tmp_path / "bad.png").write_bytes(b"not a picture")
    with pytest.raises(DataError, match=r"my-upload\.png: cannot be read as an image"):
        painting.read_label_upload(tmp_path / "bad.png", "my-upload.png")


def test_huge_uploads_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(painting, "MAX_PIXELS", 100)
    Image.fromarray(np.zeros((11, 10), np.uint8), "L").save(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"big\.png: 10x11 pixels is too large"):
        painting.read_label_upload(tmp_path / "big.png")
    with pytest.raises(DataError, match="photo.jpg: .*too large"):
        painting.read_photo_upload(np.zeros((11, 10, 3), np.uint8), "photo.jpg")


def test_photo_upload_composites_alpha_over_white():
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (100, 0, 0, 255)
    rgba[0, 1] = (100, 0, 0, 0)
    rgb = painting.read_photo_upload(rgba)
    assert rgb.tolist() == [[[100, 0, 0], [255, 255, 255]]]


def test_fill_replaces_one_class():
    label = np.array([[0, 1, 2], [1, 1, 0]], np.uint8)
    filled = painting.replace_class(label, 1, 5)
    assert filled.tolist() == [[0, 5, 2], [5, 5, 0]]
    assert label.tolist() == [[0, 1, 2], [1, 1, 0]]  # the input is left alone
    with pytest.raises(ValueError, match="class index"):
        painting.replace_class(label, 1, NUM_CLASSES)


def test_palette_hex():
    assert painting.palette_hex(CLASS_INDEX["other"]) == "#000000"
    r, g, b = PALETTE[3]
    assert painting.palette_hex(3) == f"#{r:02x}{g:02x}{b:02x}"


class FakeGenerator:
    def size_problem(self, height, width):
        return None if height % 8 == 0 and width % 8 == 0 else f"{height}x{width}: sides must be multiples of 8"


def test_studio_references_and_size_checks(tmp_path):
    from synthesis.studio import Studio

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.jpg", "a.png", "notes.txt", ".hidden.jpg"):
        (folder / name).write_bytes(b"")
    studio = Studio(FakeGenerator(), folder, (64, 96))
    assert studio.reference_names() == ["a.png", "b.jpg"]
    with pytest.raises(DataError, match="not a photo of the references folder"):
        studio.reference_path("../secret.jpg")
    assert Studio(FakeGenerator(), None, (64, 96)).reference_names() == []
    with pytest.raises(ValueError, match="multiples of 8"):
        Studio(FakeGenerator(), folder, (60, 96))


def test_studio_guidance_override_is_checked():
    import dataclasses

    from synthesis.studio import Settings, Studio

    @dataclasses.dataclass(frozen=True)
    class R:
        guidance_scale: float

    class Gen(FakeGenerator):
        def rounds(self, preset, steps):
            return (R(2.0), R(3.0))

    studio = Studio(Gen(), None, (64, 96))
    assert [r.guidance_scale for r in studio.rounds(Settings("fast", 0, None))] == [2.0, 3.0]
    assert [r.guidance_scale for r in studio.rounds(Settings("fast", 0, 4.5))] == [4.5, 4.5]
    with pytest.raises(ValueError, match="guidance scale must be >= 1"):
        studio.rounds(Settings("fast", 0, 0.5))
    assert studio.command(Settings("fast", 3, 4.5), "r.jpg") is None
    command = studio.command(Settings("fastest", 3), "r.jpg")
    assert "--seed 3" in command and "--preset fastest" in command and "--size 64x96" in command


@pytest.mark.parametrize("argv, message", [(["--port", "70000"], "--port must be in 1..65535"),
                                           (["--size", "abc"], "size"),
                                           (["--ckpt", "missing.safetensors"], "missing.safetensors: not found")])
def test_bad_options_exit_2_with_one_line(argv, message, capsys):
    import app

    with pytest.raises(SystemExit) as stop:
        app.main(argv)
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last


def test_model_files_are_the_options_or_the_demo_model_and_a_missing_one_is_named_for_the_app(tmp_path, capsys,
                                                                                               monkeypatch):
    """app.py finds its model files as infer.py does (synthesis.model_files), and says app.py."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements-app.txt)")
    from types import SimpleNamespace

    import app
    from synthesis.model_files import NO_MODEL

    unet = tmp_path / "unet.safetensors"
    unet.write_bytes(b"")
    (tmp_path / "vq.safetensors").write_bytes(b"")
    assert app.model_files(SimpleNamespace(ckpt=[unet], vq=None)) == (
        [unet], tmp_path / "vq.safetensors", ["--ckpt", str(unet), "--vq", str(tmp_path / "vq.safetensors")])
    assert app.model_files(SimpleNamespace(ckpt=[], vq=None)) == ([app.DEMO_CHECKPOINT], app.DEMO_VQ, [])
    monkeypatch.setattr(app, "DEMO_CHECKPOINT", tmp_path / "absent.safetensors")
    assert app.main(["--cpu"]) == NO_MODEL
    err = capsys.readouterr().err
    assert "app.py: no model is available" in err and "infer.py" not in err


def test_bad_port_from_the_command_line():
    done = subprocess.run([sys.executable, "app.py", "--port", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--port must be in 1..65535, got 0" in done.stderr.strip().splitlines()[-1]


def test_guarded_turns_exceptions_into_messages():
    gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements-app.txt)")
    import app

    @app.guarded
    def bad_input():
        raise DataError("upload.png: cannot be read as an image")

    @app.guarded
    def bug():
        raise KeyError("boom")

    @app.guarded
    def fine(x):
        return x + 1

    assert fine(1) == 2
    with pytest.raises(gr.Error, match="upload.png: cannot be read"):
        bad_input()
    with pytest.raises(gr.Error, match="internal error .*KeyError"):
        bug()


def test_app_checks_its_model_files_as_infer_does(tmp_path, capsys):
    """A missing or folder --ckpt, or no autoencoder beside it, is an option error (exit 2) in
    app.py as in infer.py, with the same message."""
    import app
    import infer

    (tmp_path / "unet.safetensors").write_bytes(b"")
    for options, message in ((["--ckpt", str(tmp_path / "nope.safetensors")], "nope.safetensors: not found"),
                             (["--ckpt", str(tmp_path)], "not a file"),
                             (["--ckpt", str(tmp_path / "unet.safetensors")], "the autoencoder beside the first --ckpt")):
        for main in (app.main, infer.main):
            with pytest.raises(SystemExit) as exit_:
                main(["--cpu", *options])
            assert exit_.value.code == 2 and message in capsys.readouterr().err, (main, options)
