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
