"""train.py sdm: the two phases on a tiny pixel-space network, and the batch it draws."""

import json

import numpy as np
import pytest

import jittor_env

jt = jittor_env.setup(force_cpu=True)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from datasets.synthetic import write_dataset

    root = tmp_path_factory.mktemp("syn")
    write_dataset(root, 4, 8, 8, seed=0, n_test=0)
    return root / "train"


def test_batch_views_and_dropout(tiny_data):
    from dataclasses import replace

    from datasets.sdm import SDMFolder
    from ldm.pixel_training import PixelStore, draw_pixel_batch
    from ldm.training import TrainConfig

    store = PixelStore(SDMFolder("landscape", tiny_data, "train", 8, 8))
    images, masks, labels = store.batch(np.array([0, 0]), np.array([0, 1]))
    assert images.shape == (2, 3, 8, 8) and masks.shape == (2, 29, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    np.testing.assert_array_equal(images[1], images[0][:, :, ::-1])
    np.testing.assert_array_equal(masks[1], masks[0][:, :, ::-1])
    assert np.array_equal(masks[0].argmax(0), labels[0]) and masks[0].sum(0).min() == 1
    config = TrainConfig(batch_size=4, mask_dropout=1.0)
    assert draw_pixel_batch(store, config, 0).masks.sum() == 0
    kept = draw_pixel_batch(store, replace(config, mask_dropout=0.0), 0)
    assert kept.kept.all() and kept.t.min() >= 0 and kept.t.max() < 1000
    again = draw_pixel_batch(store, replace(config, mask_dropout=0.0), 0)
    np.testing.assert_array_equal(kept.noise, again.noise)


def test_two_phases(tiny_data, tmp_path):
    import train
    from weights.checkpoint import load_checkpoint

    run = tmp_path / "run"
    common = ["sdm", "--data", str(tiny_data), "--height", "8", "--width", "8", "--batch_size", "2",
              "--sample_every", "0", "--cpu"]
    assert train.main(common + ["--preset", "tiny", "--max_steps", "2", "--output_path", str(run)]) == 0
    stored = load_checkpoint(run / "checkpoints" / "last.safetensors", "unet").config
    assert (stored["train"]["lr"], stored["train"]["mask_dropout"]) == (1e-4, 0.0)
    assert stored["diffusion"]["space"] == "pixel" and stored["dataset"] == "landscape"
    fine = tmp_path / "fine"
    assert train.main(common + ["--phase", "finetune", "--init", str(run / "checkpoints" / "last.safetensors"),
                                "--max_steps", "1", "--output_path", str(fine)]) == 0
    stored = load_checkpoint(fine / "checkpoints" / "last.safetensors", "unet").config
    assert (stored["train"]["lr"], stored["train"]["mask_dropout"]) == (2e-5, 0.2)
    assert train.main(["sdm", "--resume", "--max_steps", "2", "--output_path", str(fine), "--cpu"]) == 0
    lines = [json.loads(line) for line in (fine / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    # A pixel-space run has no latent scale to give its export.
    from training.loop import export_weights
    from weights.checkpoint import WeightsError

    with pytest.raises(WeightsError, match="pixel-space U-Net run has no latent scale"):
        export_weights(fine / "checkpoints" / "last.safetensors", tmp_path / "x.safetensors", latent_scale=2.0)
    assert not (tmp_path / "x.safetensors").exists()


def test_random_crops_per_step_and_resume_keeps_them(tiny_data, tmp_path, capsys):
    from datasets.sdm import SDMFolder
    from ldm.pixel_training import PixelStore, draw_pixel_batch
    from ldm.training import TrainConfig
    import train
    from weights.checkpoint import load_checkpoint

    folder = SDMFolder("landscape", tiny_data, "train", 8, 8)
    config = TrainConfig(batch_size=4, mask_dropout=0.0, flip=False)
    plain = draw_pixel_batch(PixelStore(folder), config, 0)
    store = PixelStore(folder, random_crop=True)
    first, again = draw_pixel_batch(store, config, 0), draw_pixel_batch(store, config, 0)
    np.testing.assert_array_equal(first.latents, again.latents)          # a step's crops are fixed
    np.testing.assert_array_equal(first.noise, plain.noise)            # crops draw from their own generator
    assert first.latents.shape == plain.latents.shape == (4, 3, 8, 8)
    assert not np.array_equal(first.latents, plain.latents)              # 8x8 scaled to 8..10, then cropped
    assert np.array_equal(first.masks.argmax(1), first.labels) and first.masks.sum(1).min() == 1
    with pytest.raises(ValueError, match="square"):
        PixelStore(SDMFolder("landscape", tiny_data, "train", 8, 12), random_crop=True)

    run = tmp_path / "crops"
    common = ["sdm", "--data", str(tiny_data), "--height", "8", "--width", "8", "--batch_size", "2",
              "--sample_every", "0", "--cpu", "--preset", "tiny", "--random_crop", "on"]
    assert train.main(common + ["--max_steps", "1", "--output_path", str(run)]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.safetensors", "unet").config["random_crop"] is True
    resume = ["sdm", "--resume", "--max_steps", "2", "--output_path", str(run), "--cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:                                 # a resumed run keeps its view
        train.main(resume + ["--random_crop", "off"])
    assert exit_.value.code == 2 and "trained with --random_crop on" in capsys.readouterr().err
    for bad, message in ((["--dataset", "ade20k"], "trained with --dataset landscape"),
                         (["--height", "16"], "trained with --height 8"),
                         (["--preset", "sdm-demo"], "trains another network")):
        with pytest.raises(SystemExit) as exit_:                             # never ignored
            train.main(resume + bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert train.main(resume + ["--height", "8", "--preset", "tiny"]) == 0
    with pytest.raises(SystemExit) as exit_:
        train.main(["sdm", "--data", str(tiny_data), "--height", "8", "--width", "12", "--random_crop", "on",
                    "--preset", "tiny", "--output_path", str(tmp_path / "wide"), "--cpu"])
    assert exit_.value.code == 2 and "takes square sizes" in capsys.readouterr().err
