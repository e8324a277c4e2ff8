"""The latent store: contents against an independent encoding, idempotence, refusal of other
settings, resumption after an interruption, and the reader."""

import hashlib
import json
import shutil

import numpy as np
import pytest

HEIGHT, WIDTH = 32, 48          # tiny autoencoder f4 -> 8x12 latents
BATCH = 2                        # 5 photos: chunks of 2, 2 and 1 (padded)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, jt):
    from autoencoder.vqmodel import VQModel, save_vqmodel, vq_config
    from datasets.synthetic import write_dataset
    from ldm.latent_cache import cache_latents

    root = tmp_path_factory.mktemp("cache")
    write_dataset(root / "data", n=5, height=HEIGHT, width=WIDTH, seed=3)
    jt.set_global_seed(0)
    model = VQModel(vq_config("tiny")).eval()
    save_vqmodel(model, root / "vq.safetensors")
    result = cache_latents(root / "data" / "train", root / "vq.safetensors", root / "store", HEIGHT, WIDTH,
                           batch_size=BATCH, progress=False)
    return root, model, result


def test_store_holds_each_photo_and_its_flip(setup, jt):
    from datasets import TrainingSet
    from ldm.latents import LatentStore

    root, model, result = setup
    assert result == {"count": 5, "encoded": 5, "store": str(root / "store")}
    store = LatentStore(root / "store")
    assert store.latents.shape == (5, 2, 3, 8, 12) and store.labels.shape == (5, 2, 8, 12)
    dataset = TrainingSet(root / "data" / "train", HEIGHT, WIDTH)
    images = np.stack([dataset[i].image for i in range(BATCH)])
    # Same batch shape as the tool (originals then flips), so the same kernels run.
    both = np.concatenate([images, images[:, :, ::-1]]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    with jt.no_grad():
        expected = model.encode(jt.array(both)).numpy()
    np.testing.assert_allclose(store.latents[:BATCH, 0], expected[:BATCH], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.latents[:BATCH, 1], expected[BATCH:], rtol=1e-5, atol=1e-5)
    # The flip's latent is the flipped photo's encoding, not a flipped latent.
    assert not np.allclose(store.latents[0, 1], store.latents[0, 0][:, :, ::-1], atol=1e-3)
    for i in range(5):
        label = dataset[i].label
        rows = np.floor((np.arange(8) + 0.5) * HEIGHT / 8).astype(int)    # PIL's nearest: pixel centres
        cols = np.floor((np.arange(12) + 0.5) * WIDTH / 12).astype(int)
        np.testing.assert_array_equal(store.labels[i, 0], label[rows][:, cols])
        np.testing.assert_array_equal(store.labels[i, 1], store.labels[i, 0][:, ::-1])


def test_manifest_describes_the_store(setup):
    root, _, _ = setup
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    assert manifest["autoencoder_sha256"] == hashlib.sha256((root / "vq.safetensors").read_bytes()).hexdigest()
    assert manifest["image"] == {"height": HEIGHT, "width": WIDTH}
    assert manifest["latent"] == {"channels": 3, "height": 8, "width": 12}
    assert manifest["count"] == 5 and len(manifest["names"]) == 5
    assert manifest["views"] == ["original", "hflip"]
    assert manifest["autoencoder"]["config"]["ch"] == 8


def test_second_run_does_nothing(setup):
    from ldm.latent_cache import cache_latents

    root, _, _ = setup
    store = root / "store"
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    result = cache_latents(root / "data" / "train", root / "vq.safetensors", store, HEIGHT, WIDTH,
                           batch_size=BATCH, progress=False)
    assert result["encoded"] == 0
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before


def test_refuses_a_store_made_with_other_settings(setup, jt, capsys):
    from autoencoder.vqmodel import VQModel, save_vqmodel, vq_config
    from datasets.synthetic import write_dataset
    from ldm.latent_cache import cache_latents
    from ldm.latents import StoreError
    from tools.cache_latents import main

    root, _, _ = setup
    store = root / "store"
    before = (store / "latents.npy").read_bytes()
    jt.set_global_seed(5)  # Jittor draws the same stream for seeds 0 and 1
    save_vqmodel(VQModel(vq_config("tiny")), root / "other_vq.safetensors")
    with pytest.raises(StoreError, match="autoencoder_sha256"):
        cache_latents(root / "data" / "train", root / "other_vq.safetensors", store, HEIGHT, WIDTH, progress=False)
    with pytest.raises(StoreError, match="image"):
        cache_latents(root / "data" / "train", root / "vq.safetensors", store, 16, 24, progress=False)
    write_dataset(root / "more", n=6, height=HEIGHT, width=WIDTH, seed=4)
    code = main(["--data", str(root / "more" / "train"), "--vq", str(root / "vq.safetensors"),
                 "--out", str(store), "--height", str(HEIGHT), "--width", str(WIDTH), "--cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "other settings" in err and "images" in err and "choose another --out" in err
    assert (store / "latents.npy").read_bytes() == before


def test_resumes_after_an_interruption(setup, tmp_path):
    from ldm.latent_cache import cache_latents
    from ldm.latents import LatentStore, StoreError

    root, _, _ = setup
    complete = LatentStore(root / "store")
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    # An interruption after the first chunk: the count says 2, later items hold garbage.
    (store / "progress.json").write_text(json.dumps({"done": 2}))
    latents = np.load(store / "latents.npy", mmap_mode="r+")
    latents[2:] = np.nan
    latents.flush()
    del latents
    with pytest.raises(StoreError, match="incomplete"):
        LatentStore(store)
    result = cache_latents(root / "data" / "train", root / "vq.safetensors", store, HEIGHT, WIDTH,
                           batch_size=BATCH, progress=False)
    assert result["encoded"] == 3
    resumed = LatentStore(store)
    np.testing.assert_array_equal(resumed.latents, complete.latents)
    np.testing.assert_array_equal(resumed.labels, complete.labels)


def test_reader_batches_views(setup):
    from ldm.latents import LatentStore

    root, _, _ = setup
    store = LatentStore(root / "store")
    latents, labels = store.batch(np.array([3, 0]), np.array([1, 0]))
    assert latents.dtype == np.float32 and labels.dtype == np.uint8
    np.testing.assert_array_equal(latents[0], store.latents[3, 1])
    np.testing.assert_array_equal(labels[1], store.labels[0, 0])
    assert store.latent_shape == (3, 8, 12)


def test_not_a_store(tmp_path):
    from ldm.latents import LatentStore, StoreError

    with pytest.raises(StoreError, match="tools.cache_latents"):
        LatentStore(tmp_path)


def test_a_non_finite_latent_is_reported_with_its_item(setup, tmp_path):
    """Training from a store with a NaN latent names the item, its photo and view."""
    from ldm.latents import LatentStore, StoreError

    root, _, _ = setup
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    latents = np.load(store / "latents.npy", mmap_mode="r+")
    latents[3, 1, 0, 2, 5] = np.inf
    latents.flush()
    del latents
    reader = LatentStore(store)
    name = json.loads((store / "manifest.json").read_text())["names"][3]
    reader.batch(np.array([3, 1]), np.array([0, 1]))                  # the other view of item 3 is fine
    with pytest.raises(StoreError, match=rf"latent of item 3 \('{name}', view hflip\) is not finite"):
        reader.batch(np.array([0, 3]), np.array([0, 1]))


def test_caching_refuses_a_non_finite_latent_naming_the_photo(setup, tmp_path, monkeypatch, jt):
    from autoencoder.vqmodel import VQModel
    from datasets import TrainingSet
    from ldm.latent_cache import cache_latents
    from ldm.latents import StoreError, items_done

    root, _, _ = setup
    real_encode = VQModel.encode

    calls = []

    def encode(self, x):
        z = real_encode(self, x)
        calls.append(1)
        if len(calls) == 2:     # the second chunk (items 2 and 3): the photo of item 2 overflows
            scale = np.ones((z.shape[0], 1, 1, 1), np.float32)
            scale[0] = np.nan
            z = z * jt.array(scale)
        return z

    monkeypatch.setattr(VQModel, "encode", encode)
    photo = TrainingSet(root / "data" / "train", HEIGHT, WIDTH).image_paths[2]
    with pytest.raises(StoreError, match=rf"{photo}: the autoencoder gives a non-finite latent \(item 2"):
        cache_latents(root / "data" / "train", root / "vq.safetensors", tmp_path / "store", HEIGHT, WIDTH,
                      batch_size=BATCH, progress=False)
    assert items_done(tmp_path / "store") == 2


@pytest.mark.parametrize("options, message", [
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--height", "0"], "--height must be >= 1"),
    (["--vq", "/nonexistent/vq.safetensors"], "--vq /nonexistent/vq.safetensors: not found"),
])
def test_bad_options_exit_2_before_anything_loads(tmp_path, capsys, options, message):
    from tools.cache_latents import main

    base = {"--data": str(tmp_path), "--vq": str(tmp_path), "--output_path": str(tmp_path / "store")}
    given = dict(zip(options[::2], options[1::2]))
    argv = [item for key, value in {**base, **given}.items() for item in (key, value)]
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--cpu"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
