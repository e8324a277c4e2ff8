"""A local web app to paint a landscape's label map and generate it: ``python app.py``.

    python app.py                                   # the shipped demo model, http://127.0.0.1:7860
    python app.py --port 8000 --ckpt unet.safetensors --vq vq.safetensors --img_path TRAIN_ROOT

Paint with the 29 class colours (or upload a label map), pick a style reference from the training
folder (or upload a photo), choose the preset, seed and guidance, and generate: the output, each
round, the mask with its legend, and downloads. It serves on 127.0.0.1 only and needs no network.
Requests are queued and run one at a time. The logic lives in ``synthesis.painting`` (colours to
classes, uploads) and ``synthesis.studio`` (generation); this file is the user interface (Gradio,
from ``requirements-app.txt``).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import cli
import jittor_env
from datasets import CLASS_INDEX, CLASS_NAMES, DataError, colorize, save_image, save_label
from synthesis import painting
from synthesis.batch import output_quality, parse_size
from synthesis.demo import DEMO_CHECKPOINT, DEMO_HEIGHT, DEMO_OUTPUT, DEMO_VQ, DEMO_WIDTH, prepare_demo
from synthesis.model_files import Stop, model_file_problem
from synthesis.model_files import model_files as synthesis_model_files
from synthesis.studio import NAME, Settings, Studio
from weights.checkpoint import WEIGHT_SETS, WeightsError

log = logging.getLogger("iidm.app")

HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD = "20mb"         # larger files are refused by the server before they are read
CANVAS = (384, 512)         # (height, width) of a new canvas: the challenge's size
QUEUE_SIZE = 32             # requests waiting beyond this are told the queue is full
KEEP_RESULTS = 8            # result folders kept on disk (the browser has its own copies)
FAILED = 1


def build_parser() -> cli.ArgumentParser:
    from ldm.pipeline import PRESETS

    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    parser.add_argument("--ckpt", type=Path, action="append", default=[],
                        help="U-Net checkpoint (default: the shipped demo model); several are averaged")
    parser.add_argument("--vq", type=Path, help="autoencoder checkpoint (default: vq.safetensors beside the first --ckpt)")
    parser.add_argument("--weights", choices=WEIGHT_SETS, default="ema",
                        help="which weights of a training checkpoint to use (default ema)")
    parser.add_argument("--img_path", type=Path,
                        help="training root (or its imgs/ folder) whose photos are offered as style references "
                             "(default: the demo's synthetic photos)")
    parser.add_argument("--size", help="generation size HEIGHTxWIDTH (default: 96x128 for the demo model, 384x512 "
                                       "otherwise); label maps and references are resized to it, as infer.py --size")
    parser.add_argument("--preset", choices=PRESETS, default="fast", help="the preset selected at start (default fast)")
    jittor_env.add_arguments(parser)
    return parser


def check_options(parser: cli.ArgumentParser, args) -> None:
    """Every check that needs no model; a bad option ends the run with exit 2."""
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    try:
        args.size = parse_size(args.size) if args.size else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.img_path is not None and not args.img_path.exists():
        parser.error(f"{args.img_path}: not found")
    problem = model_file_problem(args.ckpt, args.vq)
    if problem:
        parser.error(problem)


def model_files(args) -> tuple[list[Path], Path, list[str]]:
    """The U-Net checkpoints, the autoencoder, and the infer.py options that name them."""
    given = list(args.ckpt)
    checkpoints, vq_path = synthesis_model_files(given, args.vq, DEMO_CHECKPOINT, DEMO_VQ)
    options = [a for path in given for a in ("--ckpt", str(path))]
    if given:
        options += ["--vq", str(vq_path)]
    return checkpoints, vq_path, options


# ---------------------------------------------------------------------------------- the interface
def palette_css() -> str:
    """Each class option of the palette shows its colour as a stripe at its left."""
    rules = [f"#palette label:nth-of-type({i + 1}) {{ box-shadow: inset 14px 0 0 {painting.palette_hex(i)}; "
             "padding-left: 22px; }" for i in range(len(CLASS_NAMES))]
    from synthesis.gallery import LEGEND_STYLE

    return "\n".join(rules) + LEGEND_STYLE + "#legend .legend { font-size: 13px; line-height: 18px; }"


def brush(class_name: str, size: int):
    import gradio as gr

    colours = [painting.palette_hex(i) for i in range(len(CLASS_NAMES))]
    return gr.Brush(colors=colours, default_color=painting.palette_hex(CLASS_INDEX[class_name]),
                    color_mode="fixed", default_size=int(size))


def editor_value(label: np.ndarray) -> dict:
    """A canvas showing ``label``: one layer of paint over a background of "other" (black), so the
    eraser uncovers "other"."""
    background = painting.painted_picture(np.full(label.shape, painting.OTHER, np.uint8))
    return {"background": background, "layers": [painting.painted_picture(label)], "composite": None}


def canvas_label(value) -> painting.Snapped:
    """The class map of the editor's picture; an empty canvas is refused."""
    if value is None:
        raise DataError("the canvas is empty: paint a layout or upload a label map")
    picture = painting.flatten(value.get("background"), value.get("layers") or [], value.get("composite"))
    if picture is None:
        raise DataError("the canvas is empty: paint a layout or upload a label map")
    return painting.snap_to_palette(picture)


class Results:
    """Where each generation's downloads are written: one folder per generation under a private
    temporary folder, the oldest removed beyond ``KEEP_RESULTS``, everything removed at exit."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="iidm-app-"))
        self.count = 0
        self.lock = threading.Lock()
        atexit.register(shutil.rmtree, self.root, True)

    def folder(self) -> Path:
        with self.lock:
            self.count += 1
            folder = self.root / f"{self.count:06d}"
            stale = self.root / f"{self.count - KEEP_RESULTS:06d}"
        shutil.rmtree(stale, ignore_errors=True)
        folder.mkdir()
        return folder


def guarded(function):
    """Show a bad request's message in the page instead of failing the request silently; an
    unexpected error is logged with its traceback and reported, and the server goes on."""
    import functools

    import gradio as gr

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except (DataError, WeightsError, ValueError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 (the server must outlive any one request)
            log.exception("request failed")
            raise gr.Error(f"internal error ({type(exc).__name__}: {exc}); the server log has the details") from None

    return call


def generate_handler(studio: Studio, results: Results):
    """The handler of the generate button: the canvas and choices in, the picture, its rounds,
    mask, legend, report and three download files out."""
    import gradio as gr

    from synthesis.gallery import legend_html

    @guarded
    def generate(value, reference_name, reference_upload, preset_name, seed, preset_guidance, guidance,
                 progress=gr.Progress()):
        snapped = canvas_label(value)
        reference, reference_file = chosen_reference(studio, reference_name, reference_upload)
        if seed is None or not float(seed).is_integer() or not 0 <= seed < 2 ** 63:
            raise DataError(f"the seed must be a whole number in 0..2^63-1, got {seed}")
        settings = Settings(preset_name, int(seed), None if preset_guidance else float(guidance))

        def report(index, rounds, step, steps):
            progress((step, steps), desc=f"round {index + 1} of {rounds}", unit="steps")

        progress(0, desc="round 1")
        picture = studio.generate(snapped.label, reference, settings, report, reference_file)
        folder = results.folder()
        output_file, label_file, mask_file = folder / f"{NAME}.jpg", folder / f"{NAME}.png", folder / f"{NAME}_colour.png"
        save_image(output_file, picture.output, quality=output_quality(preset_name))
        save_label(label_file, picture.label)
        save_image(mask_file, colorize(picture.label))
        snap_note = snapped.note()
        notes = [n for n in [snap_note, *picture.notes] if n]
        if snapped.off_palette:
            gr.Warning(snap_note)
        lines = [f"Generated in {picture.seconds:.1f} s ({len(picture.rounds)} rounds, preset {preset_name}, "
                 f"seed {settings.seed})."] + [f"- {n}" for n in notes]
        if picture.command:
            lines.append(f"\nSame output from the command line, with the downloaded label map:\n\n```\n{picture.command}\n```")
        rounds = [(image, f"round {k + 1}") for k, image in enumerate(picture.rounds)]
        return (picture.output, rounds, colorize(picture.label), legend_html(picture.label), "\n".join(lines),
                gr.update(value=str(output_file), interactive=True), gr.update(value=str(label_file), interactive=True),
                gr.update(value=str(mask_file), interactive=True))

    return generate


def chosen_reference(studio: Studio, name, upload) -> tuple[np.ndarray, str]:
    """The style reference (an uploaded photo wins over the folder's choice) and how the command
    line names it ("PHOTO" for an upload)."""
    if upload is not None:
        return painting.read_photo_upload(upload), "PHOTO"
    if name:
        return studio.reference(name), str(studio.reference_path(name))
    raise DataError("no style reference: choose one from the training folder or upload a photo")


def layout(studio: Studio, preset: str, first_label: np.ndarray) -> SimpleNamespace:
    """Lays the app's components out inside an open ``gr.Blocks``; returns the ones handlers use."""
    import gradio as gr

    from ldm.pipeline import PRESETS

    references = studio.reference_names()
    gr.Markdown("## IIDM studio\nPaint a landscape with the class colours (or upload a label map), pick a "
                "style reference, generate. The eraser paints \"other\".")
    with gr.Row():
        with gr.Column(scale=3):
            canvas = gr.ImageEditor(
                value=editor_value(first_label), elem_id="canvas", label="label map", image_mode="RGBA",
                type="numpy", format="png", sources=(), transforms=(), canvas_size=(CANVAS[1], CANVAS[0]),
                brush=brush("tree", 12), eraser=gr.Eraser(default_size=12),
                layers=gr.LayerOptions(allow_additional_layers=False), height=480)
            with gr.Row():
                size = gr.Slider(1, 64, value=12, step=1, label="brush size", elem_id="brush-size")
                fill_where = gr.Dropdown(list(CLASS_NAMES), value="other", label="fill: every pixel of",
                                         elem_id="fill-where")
                fill_button = gr.Button("fill it with the brush class", elem_id="fill")
            with gr.Row():
                layout_button = gr.Button("new random layout", elem_id="new-layout")
                clear_button = gr.Button("clear to \"other\"", elem_id="clear")
            canvas_note = gr.Markdown(elem_id="canvas-note")
        with gr.Column(scale=1, min_width=300):
            palette = gr.Radio(list(CLASS_NAMES), value="tree", label="brush class (palette)", elem_id="palette")
            label_upload = gr.File(label="upload a label map (class-index PNG, or a picture in the "
                                         "palette colours)", file_types=["image"], elem_id="label-upload",
                                   height=120)
    with gr.Row():
        with gr.Column():
            reference_name = gr.Dropdown(references, value=references[0] if references else None,
                                         label=f"style reference from {studio.folder}", elem_id="reference")
            reference_upload = gr.Image(label="or upload a photo (used while present)", type="numpy",
                                        sources=("upload",), elem_id="reference-upload", height=200)
            reference_view = gr.Image(label="chosen reference", interactive=False, height=200,
                                      value=studio.reference(references[0]) if references else None)
        with gr.Column():
            preset_box = gr.Dropdown(list(PRESETS), value=preset, label="preset (iidm: the official "
                                     "1280-pass recipe; fast and fastest: solvers)", elem_id="preset")
            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed", minimum=0)
            preset_guidance = gr.Checkbox(value=True, label="the preset's guidance scales", elem_id="preset-guidance")
            guidance = gr.Slider(1.0, 10.0, value=3.5, step=0.1, label="guidance scale (every round)",
                                 elem_id="guidance", interactive=True)
            go = gr.Button("generate", variant="primary", elem_id="generate")
    with gr.Row():
        output = gr.Image(label="output", type="numpy", format="png", interactive=False, elem_id="output")
        mask_view = gr.Image(label="mask", type="numpy", format="png", interactive=False, elem_id="mask")
        legend = gr.HTML(elem_id="legend", label="mask legend")
    rounds = gr.Gallery(label="rounds", columns=3, height=220, elem_id="rounds", format="png")
    with gr.Row():
        download_output = gr.DownloadButton("output (JPG)", interactive=False, elem_id="download-output")
        download_label = gr.DownloadButton("label map (PNG, class indices)", interactive=False,
                                           elem_id="download-label")
        download_mask = gr.DownloadButton("coloured mask (PNG)", interactive=False, elem_id="download-mask")
    info = gr.Markdown(elem_id="info")
    return SimpleNamespace(canvas=canvas, size=size, fill_where=fill_where, fill_button=fill_button,
                           layout_button=layout_button, clear_button=clear_button, canvas_note=canvas_note,
                           palette=palette, label_upload=label_upload, reference_name=reference_name,
                           reference_upload=reference_upload, reference_view=reference_view, preset_box=preset_box,
                           seed=seed, preset_guidance=preset_guidance, guidance=guidance, go=go, output=output,
                           mask_view=mask_view, legend=legend, rounds=rounds, download_output=download_output,
                           download_label=download_label, download_mask=download_mask, info=info)


def build_app(studio: Studio, preset: str = "fast"):
    """The Gradio Blocks of the app (not launched)."""
    import gradio as gr

    results = Results()
    first_label = painting.starter_label(*CANVAS, seed=0)
    layouts = {"count": 0}

    def choose_class(name, size):
        return gr.update(brush=brush(name, size))

    def new_layout():
        layouts["count"] += 1
        return editor_value(painting.starter_label(*CANVAS, seed=layouts["count"])), ""

    @guarded
    def fill(value, where, by):
        snapped = canvas_label(value)
        filled = painting.replace_class(snapped.label, CLASS_INDEX[where], CLASS_INDEX[by])
        changed = int((snapped.label == CLASS_INDEX[where]).sum())
        return editor_value(filled), f"{changed} pixels of {where} filled with {by}"

    def clear():
        return editor_value(np.full(CANVAS, painting.OTHER, np.uint8)), "canvas cleared to \"other\""

    @guarded
    def upload_label(file):
        if file is None:
            return gr.update(), ""
        snapped = painting.read_label_upload(file, Path(file).name)
        note = snapped.note()
        if note:
            gr.Warning(note)
        return editor_value(snapped.label), (f"label map {snapped.label.shape[0]}x{snapped.label.shape[1]} loaded"
                                             + (f"; {note}" if note else ""))

    @guarded
    def show_reference(name):
        return studio.reference(name) if name else None

    generate = generate_handler(studio, results)
    with gr.Blocks(title="IIDM studio", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        c = layout(studio, preset, first_label)
        c.palette.change(choose_class, [c.palette, c.size], c.canvas, queue=False)
        c.size.release(choose_class, [c.palette, c.size], c.canvas, queue=False)
        c.fill_button.click(fill, [c.canvas, c.fill_where, c.palette], [c.canvas, c.canvas_note])
        c.layout_button.click(new_layout, None, [c.canvas, c.canvas_note])
        c.clear_button.click(clear, None, [c.canvas, c.canvas_note])
        c.label_upload.upload(upload_label, c.label_upload, [c.canvas, c.canvas_note])
        c.reference_name.change(show_reference, c.reference_name, c.reference_view)
        c.go.click(generate,
                   [c.canvas, c.reference_name, c.reference_upload, c.preset_box, c.seed, c.preset_guidance, c.guidance],
                   [c.output, c.rounds, c.mask_view, c.legend, c.info, c.download_output, c.download_label,
                    c.download_mask],
                   concurrency_limit=1, concurrency_id="generate")
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return app


def launch(app, port: int, quiet: bool = False):
    """Serve ``app`` on HOST:port without blocking; returns the address."""
    _, url, _ = app.launch(server_name=HOST, server_port=port, prevent_thread_lock=True, share=False,
                           max_file_size=MAX_UPLOAD, quiet=quiet, show_error=True, css=palette_css(),
                           footer_links=[])
    return url


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    check_options(parser, args)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version check or telemetry: offline
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("app.py: the app needs Gradio: pip install -r requirements-app.txt", file=sys.stderr)
        return FAILED
    try:
        checkpoints, vq_path, model_options = model_files(args)
    except Stop as stop:
        print(str(stop).replace("infer.py", "app.py"), file=sys.stderr)
        return stop.status
    demo_model = args.ckpt == [] or checkpoints == [DEMO_CHECKPOINT]
    size = args.size or ((DEMO_HEIGHT, DEMO_WIDTH) if demo_model else CANVAS)
    img_root = args.img_path or prepare_demo(DEMO_OUTPUT)[1]
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    try:
        studio = Studio.load(checkpoints, vq_path, img_root, size, args.weights, model_options)
    except (WeightsError, ValueError) as exc:
        print(f"app.py: {exc}", file=sys.stderr)
        return FAILED
    if not studio.reference_names():
        log.warning("no photos in %s: upload a style reference in the page", studio.folder)
    app = build_app(studio, args.preset)
    try:
        url = launch(app, args.port)
    except OSError as exc:
        print(f"app.py: cannot serve on {HOST}:{args.port} ({exc}); choose another --port", file=sys.stderr)
        return FAILED
    print(f"app.py: open {url} (generating at {size[0]}x{size[1]}; Ctrl+C stops)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
