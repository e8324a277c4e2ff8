"""Full scale on the CPU: ``infer.py`` on one 512x384 mask with the 501.5 M-parameter ``iidm``
U-Net and the ``vq-f4`` autoencoder (random weights), through the three rounds of the ``fast``
preset at 2 solver steps each. Slow (2 minutes and 5.8 GiB peak on a quiet 2-core machine once
Jittor's kernels for it are compiled; longer on the first run, which compiles them):

    python -m pytest -m slow tests/test_full_scale.py -s

It checks the 3x96x128 latent of every round, the output's size, that the colour transfer runs
before rounds 1 and 2 on images of the full size, and that the gallery is written; with ``-s`` it
prints the wall time and the process's peak resident memory.
"""

import importlib
import resource
import time

import numpy as np
import pytest
from PIL import Image

import infer
from datasets.synthetic import write_dataset
from ldm import pipeline

HEIGHT, WIDTH = 384, 512
LATENT = (3, 96, 128)


@pytest.mark.slow
def test_iidm_unet_and_vq_f4_generate_one_512x384_image(tmp_path, jt, monkeypatch, capsys):
    from autoencoder.vqmodel import VQModel, save_vqmodel, vq_config
    from models import UNetModel, unet_preset
    from models.unet import PRESET_DIFFUSION
    from weights.checkpoint import module_arrays, save_checkpoint

    started = time.perf_counter()
    jt.set_global_seed(0)
    config = unet_preset("iidm")
    unet = UNetModel(config)
    count = sum(int(np.prod(p.shape)) for p in unet.parameters())
    assert 500e6 < count < 503e6, count
    arrays = module_arrays(unet)
    del unet
    rng = np.random.default_rng(0)
    # The last layer starts at zero; make it random so the network's output is not zero.
    arrays = {k: v + 0.02 * rng.standard_normal(v.shape).astype(v.dtype) if k.startswith("out.") else v
              for k, v in arrays.items()}
    save_checkpoint(tmp_path / "unet.safetensors", arrays, kind="unet",
                    config={"network": config.to_dict(), "diffusion": PRESET_DIFFUSION["iidm"]})
    del arrays
    save_vqmodel(VQModel(vq_config("vq-f4")), tmp_path / "vq.safetensors")
    write_dataset(tmp_path / "data", 1, HEIGHT, WIDTH, seed=0, n_test=1)

    latents, transfers = [], []
    real_check = pipeline._check_latent
    monkeypatch.setattr(pipeline, "_check_latent",
                        lambda x0, masks, index: latents.append((index, tuple(x0.shape), masks.shape))
                        or real_check(x0, masks, index))
    transfer_module = importlib.import_module("synthesis.color_transfer")
    real_transfer = transfer_module.color_transfer
    monkeypatch.setattr(transfer_module, "color_transfer",
                        lambda image, reference: transfers.append((image.shape, reference.shape))
                        or real_transfer(image, reference))

    out = tmp_path / "out"
    generating = time.perf_counter()
    status = infer.main(["--cpu", "--input_path", str(tmp_path / "data" / "test" / "labels"),
                         "--img_path", str(tmp_path / "data" / "train"), "--output_path", str(out),
                         "--ckpt", str(tmp_path / "unet.safetensors"), "--vq", str(tmp_path / "vq.safetensors"),
                         "--preset", "fast", "--steps", "2", "--batch_size", "1", "--gallery"])
    done = time.perf_counter()
    assert status == 0, capsys.readouterr().err

    assert [index for index, _, _ in latents] == [0, 1, 2]
    for _, shape, mask_shape in latents:
        assert shape == (1, *LATENT) and mask_shape == (1, 29, *LATENT[1:])
    assert transfers == [((HEIGHT, WIDTH, 3), (HEIGHT, WIDTH, 3))] * 2
    outputs = sorted(out.glob("*.jpg"))
    assert [p.name for p in outputs] == ["00001.jpg"]
    with Image.open(outputs[0]) as image:
        assert (image.size, image.mode) == ((WIDTH, HEIGHT), "RGB")
        pixels = np.asarray(image)
    assert pixels.std() > 0
    gallery = (out / "gallery.html").read_text()
    assert "00001" in gallery

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with capsys.disabled():
        print(f"\nfull scale: {count} U-Net parameters; models built and saved in {generating - started:.0f} s, "
              f"infer.py in {done - generating:.0f} s, peak RSS {peak_gib:.2f} GiB")
