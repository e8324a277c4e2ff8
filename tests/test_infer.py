"""infer.py: sharding, job listing, and end to end on tiny synthetic masks with tiny random
models (outputs at the mask's size, restart, --overwrite, per-image failures, a crash mid-run,
one-image use, the embedded demo and its gallery)."""

import json
import logging
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import infer
from datasets import DataError, save_image, save_label
from datasets.synthetic import write_dataset
from ldm import pipeline
from synthesis import batch, demo

HEIGHT, WIDTH = 16, 24  # multiples of 8: the tiny VQ (f = 4) times the tiny U-Net (2 levels)
FAST = ["--cpu", "--preset", "fast", "--steps", "2", "--batch_size", "2"]


# ------------------------------------------------------------------------------ no Jittor needed
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_cover_every_item_once(world_size):
    for n in range(12):
        items = [f"m{i}" for i in range(n)]
        shards = [batch.shard(items, rank, world_size) for rank in range(world_size)]
        merged = sorted(x for s in shards for x in s)
        assert merged == sorted(items)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert all(items.index(x) % world_size == rank for rank, s in enumerate(shards) for x in s)


def test_shard_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank must be in 0..world_size-1"):
        batch.shard([1, 2], 2, 2)


def test_list_jobs_marks_missing_references(tmp_path):
    masks, imgs = tmp_path / "masks", tmp_path / "train" / "imgs"
    imgs.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(imgs / "r.jpg")
    for name in ("a", "b", "c"):
        save_label(masks / f"{name}.png", np.zeros((4, 4), np.uint8))
    (masks / "label_to_img.json").write_text(json.dumps({"a.png": "r.jpg", "b.png": "gone.jpg"}))
    jobs = batch.list_jobs(masks, tmp_path / "train", tmp_path / "out")
    assert [j.name for j in jobs] == ["a", "b", "c"]
    assert jobs[0].error is None and jobs[0].output == tmp_path / "out" / "a.jpg"
    assert "gone.jpg: reference photo not found (for b.png)" in jobs[1].error
    assert "no reference given for c.png" in jobs[2].error
    (masks / "label_to_img.json").unlink()
    with pytest.raises(DataError, match="label_to_img.json: not found"):
        batch.list_jobs(masks, tmp_path / "train", tmp_path / "out")


def test_parse_size():
    assert batch.parse_size("384x512") == (384, 512) and batch.parse_size(None) is None
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        batch.parse_size("512")


def test_no_model_names_both_demo_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "DEMO_CHECKPOINT", tmp_path / "unet.safetensors")
    monkeypatch.setattr(infer, "DEMO_VQ", tmp_path / "vq.safetensors")
    monkeypatch.setattr(infer, "DEMO_OUTPUT", tmp_path / "demo")
    assert infer.main(["--cpu"]) == infer.NO_MODEL
    err = capsys.readouterr().err
    assert "no model is available" in err and "unet.safetensors" in err and "vq.safetensors" in err
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def models(tmp_path_factory, jt):
    """Tiny random U-Net and VQ checkpoints (the U-Net's zero-initialised last layer is made
    random so the network's output is not zero)."""
    from autoencoder.vqmodel import VQModel, save_vqmodel, vq_config
    from weights.checkpoint import module_arrays, save_checkpoint
    from models import UNetModel, unet_preset
    from models.unet import PRESET_DIFFUSION

    folder = tmp_path_factory.mktemp("models")
    jt.set_global_seed(0)
    config = unet_preset("tiny")
    arrays = module_arrays(UNetModel(config))
    rng = np.random.default_rng(0)
    arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype) if k.startswith("out.") else v
              for k, v in arrays.items()}
    save_checkpoint(folder / "unet.safetensors", arrays, kind="unet",
                    config={"network": config.to_dict(), "diffusion": PRESET_DIFFUSION["iidm"]})
    save_vqmodel(VQModel(vq_config("tiny")), folder / "vq.safetensors")
    return folder / "unet.safetensors", folder / "vq.safetensors"


def test_models_apply_the_checkpoint_latent_scale(tmp_path, models, jt):
    """A checkpoint exported with latent_scale s: encode gives s x the autoencoder's latent and
    decode divides by s before decoding."""
    from weights.checkpoint import read_checkpoint, save_checkpoint

    unet, vq = models
    arrays, info = read_checkpoint(unet)
    scaled = tmp_path / "scaled.safetensors"
    config = {**info["config"], "diffusion": {**info["config"]["diffusion"], "latent_scale": 4.0}}
    save_checkpoint(scaled, arrays, kind="unet", config=config)
    from synthesis import Generator

    plain, times4 = Generator([unet], vq), Generator([scaled], vq)
    images = np.random.default_rng(0).integers(0, 256, (1, HEIGHT, WIDTH, 3), dtype=np.uint8)
    a, b = plain.encode(images).numpy(), times4.encode(images).numpy()
    np.testing.assert_allclose(b, 4.0 * a, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(times4.decode(jt.array(b)), plain.decode(jt.array(a)))


def dataset(root, n_test):
    write_dataset(root, 3, HEIGHT, WIDTH, seed=0, n_test=n_test)
    return ["--input_path", str(root / "test" / "labels"), "--img_path", str(root / "train")]


def outputs(out):
    return sorted(p.name for p in out.glob("*.jpg"))


def test_batch_restart_overwrite_and_rounds(tmp_path, models, monkeypatch, capsys, caplog):

    caplog.set_level(logging.INFO, logger="iidm")
    unet, vq = models
    out = tmp_path / "out"
    args = dataset(tmp_path / "data", 2) + ["--output_path", str(out), "--ckpt", str(unet), "--vq", str(vq), *FAST]
    assert infer.main(args + ["--save_rounds"]) == 0
    names = ["00003.jpg", "00004.jpg"]
    assert outputs(out) == names
    for name in names:
        with Image.open(out / name) as image:
            assert (image.size, image.mode) == ((WIDTH, HEIGHT), "RGB")
    assert sorted(p.name for p in (out / "rounds").iterdir()) == [
        f"0000{i}_round{k}.jpg" for i in (3, 4) for k in range(3)]
    line = capsys.readouterr().out
    assert re.search(r"2 images in [\d.]+ s \([\d.]+ s per image, [\d.]+ per minute\), 12 U-Net passes per image",
                     line)
    # each round's time and each batch's rate are logged
    logged = [r.getMessage() for r in caplog.records]
    assert sum(bool(re.fullmatch(rf"round {k}: [\d.]+ s for 2 image\(s\) of {HEIGHT}x{WIDTH}", m))
               for m in logged for k in range(3)) == 3
    assert any(re.fullmatch(r"batch of 2: [\d.]+ s \([\d.]+ images per minute\)", m) for m in logged)

    calls = []
    real_run = pipeline.run_rounds
    monkeypatch.setattr(pipeline, "run_rounds", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    assert infer.main(args) == 0
    assert calls == [] and "2 already present" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in names} == before
    assert infer.main(args + ["--overwrite"]) == 0
    assert calls == [1] and outputs(out) == names


def test_bad_inputs_are_reported_and_the_rest_produced(tmp_path, models, capsys):
    unet, vq = models
    root, out = tmp_path / "data", tmp_path / "out"
    args = dataset(root, 2) + ["--output_path", str(out), "--ckpt", str(unet), "--vq", str(vq), *FAST]
    labels = root / "test" / "labels"
    mapping = json.loads((root / "test" / "labels" / "label_to_img.json").read_text())
    broken = np.zeros((HEIGHT, WIDTH), np.uint8)
    broken[3, 4] = 29   # one past the last class
    Image.fromarray(broken, "L").save(labels / "broken.png")
    save_label(labels / "noref.png", np.zeros((HEIGHT, WIDTH), np.uint8))
    save_label(labels / "odd.png", np.zeros((12, 20), np.uint8))
    save_label(labels / "trunc.png", np.zeros((HEIGHT, WIDTH), np.uint8))
    data = (root / "train" / "imgs" / "00000.jpg").read_bytes()
    (root / "train" / "imgs" / "cut.jpg").write_bytes(data[: len(data) // 2])
    mapping.update({"broken.png": "00000.jpg", "noref.png": "missing.jpg", "odd.png": "00000.jpg",
                    "trunc.png": "cut.jpg"})
    (root / "test" / "labels" / "label_to_img.json").write_text(json.dumps(mapping))

    assert infer.main(args) == infer.FAILED
    assert outputs(out) == ["00003.jpg", "00004.jpg"]
    captured = capsys.readouterr()
    assert "2 images in" in captured.out and "4 failed" in captured.out
    err = captured.err
    assert "4 image(s) failed" in err
    assert re.search(r"broken: .*broken.png: label values must be class indices 0..28; found value 29", err)
    assert re.search(r"noref: .*missing.jpg: reference photo not found \(for noref.png\)", err)
    assert re.search(r"odd: .*odd.png: size 12x20 \(height x width\) is not a multiple of 8", err)
    assert re.search(r"trunc: .*cut.jpg: cannot be read as an image", err)


def test_crash_mid_run_then_restart_makes_exactly_the_missing(tmp_path, models, monkeypatch):
    unet, vq = models
    out = tmp_path / "out"
    args = dataset(tmp_path / "data", 4) + ["--output_path", str(out), "--ckpt", str(unet), "--vq", str(vq), *FAST]
    real_run = pipeline.run_rounds
    batches = []

    def crash_on_second_batch(*a, **k):
        if batches:
            raise KeyboardInterrupt
        batches.append(k["seeds"])
        return real_run(*a, **k)

    monkeypatch.setattr(pipeline, "run_rounds", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        infer.main(args)
    assert outputs(out) == ["00003.jpg", "00004.jpg"]
    assert not list(out.glob(".*tmp"))
    first = {n: (out / n).read_bytes() for n in outputs(out)}

    generated = []
    monkeypatch.setattr(pipeline, "run_rounds", lambda *a, **k: generated.append(len(k["seeds"])) or real_run(*a, **k))
    assert infer.main(args) == 0
    assert generated == [2]
    assert outputs(out) == ["00003.jpg", "00004.jpg", "00005.jpg", "00006.jpg"]
    assert {n: (out / n).read_bytes() for n in first} == first


def test_one_image(tmp_path, models):
    unet, vq = models
    root = tmp_path / "data"
    dataset(root, 1)
    out = tmp_path / "one" / "o.jpg"
    assert infer.main(["--mask", str(root / "test" / "labels" / "00003.png"), "--ref",
                       str(root / "train" / "imgs" / "00001.jpg"), "--output_path", str(out), "--ckpt", str(unet),
                       "--vq", str(vq), "--save_rounds", *FAST]) == 0
    with Image.open(out) as image:
        assert image.size == (WIDTH, HEIGHT)
    assert sorted(p.name for p in (tmp_path / "one" / "rounds").iterdir()) == [f"o_round{k}.jpg" for k in range(3)]
    # a mask the model cannot take at its own size: generated at --size, written at its own
    save_label(tmp_path / "odd.png", np.zeros((12, 20), np.uint8))
    odd = tmp_path / "odd.jpg"
    assert infer.main(["--mask", str(tmp_path / "odd.png"), "--ref", str(root / "train" / "imgs" / "00001.jpg"),
                       "--output-path", str(odd), "--ckpt", str(unet), "--vq", str(vq), "--size", f"{HEIGHT}x{WIDTH}",
                       *FAST]) == 0
    with Image.open(odd) as image:
        assert image.size == (20, 12)


class Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_demo_writes_outputs_and_gallery(tmp_path, models, monkeypatch, capsys, caplog):
    unet, vq = models
    monkeypatch.setattr(infer, "DEMO_CHECKPOINT", unet)
    monkeypatch.setattr(infer, "DEMO_VQ", vq)
    monkeypatch.setattr(infer, "DEMO_OUTPUT", tmp_path / "demo")
    monkeypatch.setattr(demo, "DEMO_HEIGHT", HEIGHT)
    monkeypatch.setattr(demo, "DEMO_WIDTH", WIDTH)
    monkeypatch.setattr(demo, "DEMO_MASKS", 2)
    monkeypatch.setattr(demo, "DEMO_PHOTOS", 3)
    caplog.set_level(logging.INFO)
    assert infer.main(["--cpu", "--steps", "2", "--batch_size", "2", "--save_rounds"]) == 0   # no --preset
    assert "preset fast: 3 rounds, 12 U-Net passes per image" in caplog.text     # the demo's default
    folder = tmp_path / "demo"
    assert outputs(folder) == ["00003.jpg", "00004.jpg"]
    page = folder / "gallery.html"
    assert f"gallery: {page}" in capsys.readouterr().out
    parser = Sources()
    parser.feed(page.read_text())
    # per row: reference, coloured mask, output, 3 rounds; every path relative and present
    assert len(parser.sources) == 2 * 6
    for src in parser.sources:
        assert not src.startswith("/") and (folder / src).is_file(), src
    html = page.read_text()
    assert "sky" in html and 'class="legend"' in html
    with Image.open(folder / "gallery" / "00003_mask.png") as mask:
        assert mask.size == (WIDTH, HEIGHT)


# ------------------------------------------------------------------------------ checked early
def refuse_to_load(monkeypatch):
    """Fail the test if a model gets loaded."""
    import synthesis.generator

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr(synthesis.generator, "Generator", load)


@pytest.mark.parametrize("options, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "x"], "--steps must be a positive integer"),
    (["--preset", "iidm", "--steps", "4"], "fixed recipe"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--quality", "101"], "--quality must be in 1..100"),
    (["--size", "12"], "HEIGHTxWIDTH"),
    (["--mask", "m.png", "--ref", "r.jpg"], "needs all of --mask, --ref and --output_path"),
    (["--mapping", "x.json"], "--mapping needs --input_path"),
])
def test_bad_options_exit_2_before_any_model_is_loaded(options, message, monkeypatch, capsys):
    refuse_to_load(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--cpu", *options])
    assert exit_.value.code == infer.USAGE
    assert message in capsys.readouterr().err


def test_files_and_folders_of_the_wrong_kind_and_a_size_the_models_cannot_take_exit_2(tmp_path, models, monkeypatch,
                                                                                        capsys):
    """A folder where a file is expected and the other way round (a mapping that is a folder used
    to end in a traceback), and a --size the models cannot take (checked from the files' headers),
    are bad options: one line, exit 2, no model built."""
    unet, vq = models
    refuse_to_load(monkeypatch)
    data = dataset(tmp_path / "data", 1)
    labels = tmp_path / "data" / "test" / "labels"
    common = ["--cpu", "--output_path", str(tmp_path / "out"), "--ckpt", str(unet), "--vq", str(vq)]
    a_mask = next(labels.glob("*.png"))
    for options, message in (
            (data + ["--mapping", str(labels)], f"--mapping {labels}: not a file"),
            (["--input_path", str(a_mask), *data[2:]], f"--input_path {a_mask}: a file, expected a folder"),
            (data[:2] + ["--img_path", str(a_mask)], f"--img_path {a_mask}: a file, expected a folder"),
            (data + ["--ckpt", str(tmp_path)], f"--ckpt {tmp_path}: not a file"),
            (data + ["--size", "13x17"], "--size 13x17: not a multiple of")):
        with pytest.raises(SystemExit) as exit_:
            infer.main(common + options)
        assert exit_.value.code == infer.USAGE and message in capsys.readouterr().err, options


def test_options_of_another_mode_are_refused(tmp_path, monkeypatch, capsys):
    refuse_to_load(monkeypatch)
    save_label(tmp_path / "m.png", np.zeros((HEIGHT, WIDTH), np.uint8))
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "r.jpg")
    one = ["--cpu", "--mask", str(tmp_path / "m.png"), "--ref", str(tmp_path / "r.jpg"),
           "--output_path", str(tmp_path / "o.jpg")]
    for flag in ("--gallery", "--overwrite"):
        with pytest.raises(SystemExit):
            infer.main(one + [flag])
        assert f"{flag} applies to a folder of masks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.main(["--cpu", "--mask", str(tmp_path / "gone.png")] + one[3:])
    assert "gone.png: not found" in capsys.readouterr().err


def test_unwritable_output_folder_is_found_before_loading(tmp_path, models, monkeypatch, capsys):
    unet, vq = models
    refuse_to_load(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = dataset(tmp_path / "data", 1) + ["--output_path", str(blocker / "out"), "--ckpt", str(unet),
                                            "--vq", str(vq), *FAST]
    assert infer.main(args) == infer.FAILED
    assert f"{blocker / 'out'}: cannot write there" in capsys.readouterr().err


def test_temporaries_of_a_killed_run_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """Temporary outputs older than the run (a kill mid-write) go before anything is generated;
    one written since the run began (another MPI rank's) and the other ranks' probes stay."""
    import os
    import time

    refuse_to_load(monkeypatch)
    out = tmp_path / "out"
    args = dataset(tmp_path / "data", 2) + ["--output_path", str(out), "--ckpt", str(tmp_path / "u"),
                                            "--vq", str(tmp_path / "v"), "--cpu"]
    for name in ("u", "v"):
        (tmp_path / name).write_bytes(b"never loaded: every output is present")
    (out / "rounds").mkdir(parents=True)
    for name in ("00003.jpg", "00004.jpg"):
        Image.new("RGB", (WIDTH, HEIGHT)).save(out / name)
    stale = [out / ".00003.jpg.k1ll3d.tmp", out / "rounds" / ".00003_round0.jpg.k1ll3d.tmp", out / ".write-test.7"]
    live = [out / ".00004.jpg.l1v3.tmp", out / ".write-test.1"]
    for path in stale + live:
        path.write_bytes(b"part")
    an_hour_ago = time.time() - 3600
    for path in stale:
        os.utime(path, (an_hour_ago, an_hour_ago))
    for path in live:
        os.utime(path, (time.time() + 60,) * 2)
    assert infer.main(args) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)
    assert sorted(p.name for p in out.iterdir()) == sorted(["00003.jpg", "00004.jpg", "rounds", *(p.name for p in live)])


def test_a_full_disk_stops_the_run(tmp_path, models, monkeypatch, capsys):
    import errno

    import synthesis.batch

    unet, vq = models
    out = tmp_path / "out"
    args = dataset(tmp_path / "data", 3) + ["--output_path", str(out), "--ckpt", str(unet), "--vq", str(vq),
                                            "--cpu", "--preset", "fast", "--steps", "2", "--batch_size", "1"]
    written = []

    def full_after_one(path, image, quality=95):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        save_image(path, image, quality)

    calls = []
    real_run = pipeline.run_rounds
    monkeypatch.setattr(pipeline, "run_rounds", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    monkeypatch.setattr(synthesis.batch, "save_image", full_after_one)
    assert infer.main(args) == infer.FAILED
    err = capsys.readouterr().err
    assert "the disk is full" in err and "stopped with 1 image(s) not generated" in err
    assert calls == [1, 1], "generation went on after the disk was full"
    assert outputs(out) == ["00003.jpg"]


@pytest.mark.parametrize("preset, quality", [("iidm", 75), ("fast", 95)])
def test_jpeg_quality_follows_the_preset(tmp_path, models, monkeypatch, preset, quality):
    """The official submission wrote PIL's default quality 75; the other presets write 95."""
    unet, vq = models
    seen = {}

    def record(jobs, generator, rounds, **options):
        seen.update(options)
        return batch.BatchReport()
    monkeypatch.setattr(infer, "generate_jobs", record)
    args = dataset(tmp_path / "data", 1) + ["--output_path", str(tmp_path / "out"), "--ckpt", str(unet),
                                            "--vq", str(vq), "--cpu", "--preset", preset]
    assert infer.main(args) == 0
    assert seen["quality"] == quality
    assert infer.main(args + ["--quality", "60", "--overwrite"]) == 0
    assert seen["quality"] == 60
