"""steindiff in the browser: vanilla and Stein-corrected samplers side by side, from the same noise.

    python app.py [--host 127.0.0.1] [--port 7860] [--model NAME=weights.safetensors ...] [--no-warm-up]

UI only: layout, callbacks, URL state, downloads. The runs, figures and images come from ``steindiff``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr

from steindiff.app.compute_thread import on_compute_thread
from steindiff.app.plots import (
    diagnostics_figure,
    image_views,
    particles_csv,
    particles_figure,
    steps_csv,
    summary_markdown,
)
from steindiff.app.settings import (
    CUSTOM_RULE,
    DEFAULT_RULE,
    LIMITS,
    SETTINGS,
    batch_for_model,
    build_experiment,
    default_model,
    model_device,
    warm_up,
)
from steindiff.correction.rule import PROBE_PRODUCTS, STEIN_VARIANTS, Coords, GammaVariant, ProbeKind
from steindiff.denoisers import DEFAULT_IMAGE_MODEL, WeightsError
from steindiff.denoisers.hub import DIFFUSERS_PREFIX
from steindiff.experiment import ExperimentResult, ModelCatalog, run_experiment
from steindiff.images import save_png, side_by_side
from steindiff.sampling import Phase
from steindiff.schedules import SCHEDULES
from steindiff.solvers import SOLVERS, get_solver

#: system fonts only: the default theme would fetch web fonts from outside the machine
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
#: the summary table's cells wrap between words only (gradio's markdown breaks words anywhere: 'vanill|a'); a
#: run's images and figures start below their floating labels, which covered the grid's top-left sample and the
#: first panel's title; the download box holds one file, and empty it would stand 236 px tall under the Run button.
#: On a phone the table (700 px) scrolls sideways instead of being cut off, and the figures' titles (16 px, the
#: longest 261 px over a 2-column grid) shrink with the window so that none runs into its neighbour. The Run
#: button stays in sight at the window's foot while the form is (the form is taller than a laptop's window):
#: gradio's container clips with overflow: hidden, which makes it a scroll box and keeps a sticky button at
#: the page's end; overflow: clip clips the same without
CSS = (
    ".gradio-container { overflow: clip !important; }"
    " #run { position: sticky; bottom: 0.5rem; z-index: 10; box-shadow: 0 2px 8px rgb(0 0 0 / 0.25); }"
    " #summary :is(td, th) { overflow-wrap: normal; word-break: normal; }"
    " :is(.run-image .image-container, .run-plot .js-plotly-plot) { padding-top: 2.25rem; box-sizing: border-box; }"
    " #download .empty { min-height: 5rem; }"
    " @media (max-width: 760px) { #summary table { display: block; overflow-x: auto; border: none; } }"
    " @media (max-width: 680px) {"
    " .run-plot :is(.annotation-text, .gtitle) { font-size: clamp(8px, 2.3vw, 16px) !important; } }"
)
#: what the progress line says while a run is outside its steps (before the first, after the last)
PHASE_TEXT: dict[Phase, str] = {
    "reference": "solving the reference ODE from the same noise",
    "lipschitz": "estimating the step maps' Lipschitz constants",
}
#: the run's image views: PNG, and no "share" button (gradio's posts to Hugging Face Spaces discussions)
IMAGE_VIEW: dict[str, Any] = {"format": "png", "buttons": ["download", "fullscreen"], "elem_classes": ["run-image"]}

EXPLANATION = """
### The contractivity trap, in one paragraph
An ODE sampler maps the state x_k to x_(k-1) = T(x_k). If T is contractive (local Lipschitz
constant L < 1), an error made at one step shrinks at the next; if L > 1 it is multiplied. With
few, large steps and a sharp denoiser, L rises above 1 (orange region of the Lipschitz panel) and
the errors compound: the red/blue curves of *error to the reference* climb instead of falling.
The paper bounds L <= sigma'/sigma + h L_D (dashed) for a first-order step (DDIM, Euler).
Higher-order and two-evaluation steps weight the denoiser more and can lie above the dashed line:
on `mnist` DPM-Solver++(3M), UniPC and Heun do (Heun's first, large step at NFE 5: L = 5.4 against 0.23),
DPM-Solver++(2M) by about 1%. Look-ahead steps (UniPC, `sc-lookahead`, the `+lookahead` solvers) take
as m0 the denoiser at the previous step's look-ahead point: their Lipschitz estimate lets it move with
the state, as a one-evaluation step's D(x_k) does (held fixed, their last step would read L = 0). The
divergence panel shows the rule's own statistic, with m0 held fixed.

### The Stein correction
SteinDiff replaces T(x_k) by (1 - gamma) x_k + gamma T(x_k), with gamma chosen in closed form to
minimise the expected squared error to the clean sample, using Stein's identity:
gamma = sigma^2 s_div / s_uu in EDM coordinates. Nothing is trained and no network evaluation is
added. **It is not always a fix**: the literal rule (no upper clip) rescues some settings (try
*Stein rescues 3-step Heun*) and explodes others (try *literal rule diverges*): after a step with
gamma > 1 the state sits near the posterior mean, the residual u becomes tiny while the divergence
does not, and gamma blows up. The hollow blue markers show what the rule would have proposed
along the vanilla trajectory.

The rule's statistics are batch averages, and the app's batches are small. On the Heun preset (seeds
0-3) 16 samples give FD-MNIST 5,189-5,797 -> 974-2,663, 256 samples 4,990-5,246 -> 441-780 (the
benchmark, 2,000 samples in batches of 500: 5,056 -> 664). Part of the gap is the score's: FD-MNIST over
16 samples reads high (16-sample parts of a 256-sample Stein run score 891-1,929 where the whole scores
522-780). Compare the two runs of one batch, not a small batch's score with the benchmark's.

### The safeguarded rules (the default, `sc-lookahead`, and `stein-safe`)
`stein-safe` keeps gamma >= 1, stops where the rule's own error model says the state would be closer
to the clean sample than a state at the next noise level can be (the noise-level identity), never goes
past the posterior mean D(x_k), and uses the solver's own step when the batch estimate is too noisy or
the rule's premise has visibly failed. `sc-lookahead` applies the same rule to the solver's step
corrected with the evaluation the next step makes anyway (for DDIM: UniPC's corrector). Neither
explodes; neither is always better than vanilla, and both give up the literal rule's Heun rescue (see
README, "Variants of the correction", and docs/results.md). On `mnist` the safeguards hold
`sc-lookahead`'s gamma at 1 at most steps (68-97% in the benchmark), and where it beats vanilla the
corrector does it: the corrector alone does as well, within the seed spread, wherever it was measured
(the applied-gamma line shows where gamma leaves 1, the table at how many steps).
The solvers named `+lookahead` are the corrector alone: run one under `sc-lookahead` and the two sides
differ only where the coefficient moved off 1 (preset *what the coefficient adds*).
Compare *literal rule diverges* with *safeguarded rule, same run*.

The exact-flow curve (green, exact models only) is the Lipschitz constant of the true ODE flow
between the same noise levels: the true flow also expands between modes, so L > 1 alone is not a
solver failure; L far above the exact flow is.

The reference of a trained network is itself a solution in many small steps: on `mnist` it ends about
0.2 from one in steps twelve times smaller (the shipped networks wiggle in the noise level; README, "What is
known"). From about NFE 32 up, a good solver's error to the reference is mostly the reference's own.
"""

PRESETS: dict[str, dict[str, Any]] = {
    "safe: 32 NFE": {"solver": "dpmpp_2m", "schedule": "karras", "nfe": 32, "stein_on": True, "rule": DEFAULT_RULE},
    "trap: 4 NFE Euler": {"solver": "ddim", "schedule": "karras", "nfe": 4, "stein_on": True, "rule": DEFAULT_RULE},
    "Stein rescues 3-step Heun (mnist, 5 NFE)": {  # on the trained UNet; at batch 16 in part (EXPLANATION)
        "model": DEFAULT_IMAGE_MODEL,
        "batch": 16,
        "solver": "heun",
        "schedule": "karras",
        "nfe": 5,
        "stein_on": True,
        "rule": "stein",
    },
    "literal rule diverges": {"solver": "dpmpp_2m", "schedule": "karras", "nfe": 10, "stein_on": True, "rule": "stein"},
    "safeguarded rule, same run": {
        "solver": "dpmpp_2m",
        "schedule": "karras",
        "nfe": 10,
        "stein_on": True,
        "rule": DEFAULT_RULE,
    },
    "what the coefficient adds: corrector alone vs sc-lookahead": {
        "solver": "dpmpp_3m+lookahead",
        "schedule": "karras",
        "nfe": 10,
        "stein_on": True,
        "rule": "sc-lookahead",
    },
}
#: the values each list-valued control offers (the models aside: the server's catalog); a link's state is one
CHOICES: dict[str, list[str]] = {
    "solver": [s for s in SOLVERS if s != "euler"],
    "schedule": list(SCHEDULES),
    "rule": [*STEIN_VARIANTS, CUSTOM_RULE],
    "probe": list(get_args(ProbeKind)),
    "products": list(PROBE_PRODUCTS),
    "coords": list(get_args(Coords)),
    "variant": list(get_args(GammaVariant)),
}


#: seconds gradio's queue sleeps between looks for a new request (gradio 6: 1 ms, and no public setting). Its
#: loop runs through every request too: at 1 ms it kept 4-5% of a core busy with the server idle and, on the
#: 2-core CPU, kept taking a core from torch's two threads; a new mnist seed's round trip took 3.07-3.59 s
#: against 2.85-3.07 s at 10 ms, alternately (docs/app-performance.md). A request waits at most this long.
QUEUE_POLL_S = 0.01


@dataclass
class Shown:
    """What a run left for the step scrubber: the result and the step being shown."""

    result: ExperimentResult
    step: int


def settings_from_link(params: Mapping[str, str], models: Sequence[str], first_model: str) -> dict[str, Any]:
    """The settings a link's query names, each read as its default's type. A value that does not read, or
    that the form does not offer, gives the default: a mistyped link, or a bare '+' (which reads as a space)."""
    state = {}
    for key, default in SETTINGS:
        if key not in params:
            continue
        offered, fallback = (models, first_model) if key == "model" else (CHOICES.get(key), default)
        try:
            value = (params[key].lower() == "true") if isinstance(default, bool) else type(default)(params[key])
        except ValueError:
            value = fallback
        state[key] = value if offered is None or value in offered else fallback
    return state


def step_from_link(params: Mapping[str, str]) -> int | None:
    """The step a link opens its first run at (``step=k``, a whole number from 0), or None: its last."""
    text = params.get("step", "")
    return int(text) if text.isascii() and text.isdigit() else None


def render(shown: Shown) -> tuple:
    """Every view at the shown step: images (image models) or particles (2-D), the diagnostics, the step's label.

    Plain values, the views a model does not have None: :func:`layout` shows and hides them.
    """
    result, step = shown.result, shown.step
    if is_image_run(result):
        views = image_views(result, step)
        stein_state = views.get("stein_state", views["vanilla_state"])
        images = (
            views["vanilla_state"],
            stein_state,
            (views["vanilla_state"], stein_state),
            views["vanilla_x0"],
            views.get("stein_x0", views["vanilla_x0"]),
        )
        particles = None
    else:
        images, particles = (None,) * 5, particles_figure(result, step)
    sigmas = result.comparison.sigmas
    label = f"step {step} of {len(sigmas) - 1}: sigma = {sigmas[step]:.4g}"
    return (*images, particles, diagnostics_figure(result, step), label)


def is_image_run(result: ExperimentResult) -> bool:
    """Whether the run's samples are images (else 2-D particles)."""
    return len(result.model.event_shape) == 3


def layout(shown: Shown) -> tuple:
    """After a run: the image views shown for image models, the particle figure for 2-D ones."""
    image = is_image_run(shown.result)
    return gr.update(visible=image), gr.update(visible=not image)


def write_download(result: ExperimentResult, downloads: Path, keep: int = 32) -> str:
    """A zip of the run (config and summary JSON, the per-step CSV, the final samples: PNGs of images, a CSV of
    particles) in a new folder under ``downloads``; the folders of older runs beyond the newest ``keep`` are
    deleted."""
    earlier = sorted(downloads.glob("run-*"), key=lambda p: p.stat().st_mtime_ns)
    for stale in earlier[: max(0, len(earlier) - keep + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=downloads))
    model = re.sub(r"[^\w.-]+", "_", result.experiment.model)  # hub ids and folders hold slashes and colons
    path = folder / f"steindiff-{model}-{result.experiment.solver}-nfe{result.experiment.nfe}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("run.json", json.dumps(result.to_json(), indent=1, allow_nan=False))
        archive.writestr("steps.csv", steps_csv(result))
        if is_image_run(result):
            final = image_views(result, len(result.comparison.sigmas) - 1, count=64)
            for name in result.runs():
                png = folder / f"{name}.png"
                save_png(png, final[f"{name}_state"])
                archive.write(png, png.name)
            save_png(folder / "side_by_side.png", side_by_side([final[f"{n}_state"] for n in result.runs()]))
            archive.write(folder / "side_by_side.png", "side_by_side.png")
        else:
            archive.writestr("particles.csv", particles_csv(result))
    return str(path)


def make_app(catalog: ModelCatalog) -> gr.Blocks:
    """The Blocks app over a model catalog (the registry plus models given on the command line)."""
    names = catalog.names()
    downloads = Path(tempfile.mkdtemp(prefix="steindiff-downloads-"))
    first_model = default_model()

    def run(
        model: str,
        solver: str,
        schedule: str,
        nfe: float,
        batch: float,
        seed: float,
        stein_on: bool,
        gamma_min: float,
        gamma_max: float,
        literal: bool,
        rule: str,
        probes: float,
        probe: str,
        products: str,
        coords: str,
        variant: str,
        lipschitz: bool,
        reference: bool,
        linked: int | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio's idiom)
    ) -> tuple:
        """Run vanilla and (optionally) Stein from the same noise; returns every view and a summary.

        ``linked``: the step a link asks its first run to open at (the last if the run has fewer; None: the
        last); it is then spent. A page state, not a parameter of the /run endpoint."""
        settings = (
            model,
            solver,
            schedule,
            nfe,
            batch,
            seed,
            stein_on,
            gamma_min,
            gamma_max,
            literal,
            rule,
            probes,
            probe,
            products,
            coords,
            variant,
            lipschitz,
            reference,
        )
        return on_compute_thread(compute, settings, linked, progress)

    def compute(settings: tuple, linked: int | None, progress: gr.Progress) -> tuple:
        """The run and its views, on the one thread that does the server's torch work."""
        try:
            experiment = build_experiment(catalog, *settings)
            steps = get_solver(experiment.solver).steps_for_nfe(experiment.nfe)
        except (ValueError, TypeError) as err:
            raise gr.Error(str(err)) from None
        # the bar: the runs' steps, then the Lipschitz estimates, weighted as all the steps together (on mnist's
        # CPU runs they took 1.5-2 times as long); the reference solution, when solved, comes first, at 0
        sampled = (2 if experiment.stein else 1) * steps
        total = sampled * (2 if experiment.diagnostics.lipschitz else 1)

        def tick(label: str, record: Any) -> None:
            done = record.step + 1 + (steps if label == "stein" else 0)
            progress(done / total, desc=f"{label}: step {record.step + 1} of {steps}")

        def announce(phase: Phase) -> None:
            progress(0.0 if phase == "reference" else sampled / total, desc=PHASE_TEXT[phase])

        try:
            result = run_experiment(experiment, catalog, LIMITS, callback=tick, on_phase=announce)
        except (ValueError, WeightsError) as err:
            raise gr.Error(str(err)) from None
        last = len(result.comparison.sigmas) - 1
        shown = Shown(result, last if linked is None else min(linked, last))
        summary = result.to_json()
        summary.pop("sigmas")
        for run_name in result.runs():
            summary[run_name].pop("trace")
        return (
            summary_markdown(result),
            *render(shown),
            gr.update(maximum=last, value=shown.step),
            summary,
            write_download(result, downloads),
            shown,
            None,
        )

    def scrub(shown: Shown | None, step: float) -> tuple:
        if shown is None:
            raise gr.Error("run a comparison first")
        shown = Shown(shown.result, int(step))
        return (*on_compute_thread(render, shown), shown)

    def apply_preset(name: str) -> tuple:
        preset = PRESETS.get(name, {})
        keys = [key for key, _ in SETTINGS]
        return tuple(gr.update(value=preset[key]) if key in preset else gr.update() for key in keys)

    def batch_for_choice(name: str, current: float | None) -> float | None:
        # a registry or hub model's kind is known without loading it; a command-line model's was found when
        # main loaded it at start-up
        try:
            return batch_for_model(catalog, name, current)
        except ValueError:  # weights that do not load: the run says why
            return current

    def from_url(request: gr.Request) -> tuple:
        params = dict(request.query_params) if request is not None else {}
        state = settings_from_link(params, names, first_model)
        if "model" in state and "batch" not in state:
            state["batch"] = batch_for_choice(state["model"], initial["batch"])
        updates = tuple(gr.update(value=state[key]) if key in state else gr.update() for key, _ in SETTINGS)
        return (*updates, step_from_link(params))

    initial = dict(SETTINGS)  # the form starts where /run's defaults are, at its first model's batch
    initial["batch"] = batch_for_choice(first_model, initial["batch"])
    # gradio keeps a copy of every output file: those older than an hour go, hourly
    with gr.Blocks(title="steindiff: the contractivity trap", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# steindiff: few-step diffusion sampling, the contractivity trap, and the Stein correction")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                preset = gr.Dropdown(list(PRESETS), label="Lesson presets", value=None)
                model = gr.Dropdown(names, value=first_model, label="model")
                solver = gr.Dropdown(CHOICES["solver"], value=initial["solver"], label="solver")
                schedule = gr.Dropdown(CHOICES["schedule"], value=initial["schedule"], label="schedule")
                nfe = gr.Slider(1, LIMITS.max_nfe, value=initial["nfe"], step=1, label="NFE (network evaluations)")
                batch = gr.Number(
                    initial["batch"], label="batch (2-D: up to 4096 particles; images: up to 256)", precision=0
                )
                with gr.Row():
                    seed = gr.Number(initial["seed"], label="seed", precision=0, scale=3)
                    dice = gr.Button("random seed", scale=1)
                with gr.Accordion("Stein correction", open=True):
                    stein_on = gr.Checkbox(initial["stein_on"], label="run the corrected sampler beside vanilla")
                    rule = gr.Dropdown(
                        CHOICES["rule"],
                        value=initial["rule"],
                        label="rule (see README: stein = the paper's literal rule; custom = the clip below)",
                    )
                    custom = initial["rule"] == CUSTOM_RULE
                    literal = gr.Checkbox(
                        initial["literal"], label="custom: no upper clip (gamma_max = inf)", visible=custom
                    )
                    gamma_min = gr.Number(initial["gamma_min"], label="custom: gamma_min", visible=custom)
                    gamma_max = gr.Number(
                        initial["gamma_max"], label="custom: gamma_max (when not literal)", visible=custom
                    )
                    probes = gr.Slider(
                        1, LIMITS.max_probes, value=initial["probes"], step=1, label="Hutchinson probes K"
                    )
                    probe = gr.Radio(CHOICES["probe"], value=initial["probe"], label="probe")
                    products = gr.Radio(
                        CHOICES["products"],
                        value=initial["products"],
                        label="Jacobian products (probes and Lipschitz): vjp = autograd, fd = forward differences",
                    )
                    coords = gr.Radio(
                        CHOICES["coords"], value=initial["coords"], label="coordinates of the combination"
                    )
                    variant = gr.Radio(CHOICES["variant"], value=initial["variant"], label="gamma from")
                lipschitz = gr.Checkbox(initial["lipschitz"], label="local Lipschitz estimates")
                reference = gr.Checkbox(initial["reference"], label="error to the reference solution")
                run_button = gr.Button("Run", variant="primary", elem_id="run")
                download = gr.File(label="download the run (JSON, CSV, PNG)", elem_id="download")
            with gr.Column(scale=3, min_width=760):  # the summary table needs 700 px: narrower, it goes below the form
                summary_md = gr.Markdown("Choose settings (or a lesson preset) and press **Run**.", elem_id="summary")
                gr.Markdown(
                    "Blue: vanilla solver. Red: Stein-corrected, from the same noise. Orange band: "
                    "L > 1, where the step map expands errors."
                )
                step_label = gr.Markdown("")
                scrubber = gr.Slider(0, 1, value=0, step=1, label="step (moves every view)")
                with gr.Column(visible=False) as image_group:
                    with gr.Row():
                        vanilla_image = gr.Image(label="vanilla: x_k", **IMAGE_VIEW)
                        stein_image = gr.Image(label="Stein: x_k", **IMAGE_VIEW)
                    compare_slider = gr.ImageSlider(label="vanilla | Stein", format="png", elem_classes=["run-image"])
                    with gr.Row():
                        vanilla_x0 = gr.Image(label="vanilla: predicted x0", **IMAGE_VIEW)
                        stein_x0 = gr.Image(label="Stein: predicted x0", **IMAGE_VIEW)
                particles = gr.Plot(label="particles", visible=False, elem_classes=["run-plot"])
                diagnostics = gr.Plot(label="per-step diagnostics", elem_classes=["run-plot"])
                with gr.Accordion("run summary (JSON)", open=False):
                    summary_json = gr.JSON(label="run summary")
                with gr.Accordion("What am I looking at?", open=False):
                    gr.Markdown(EXPLANATION)
        shown = gr.State(None)
        linked_step = gr.State(None)  # the step a link asks its first run to open at
        controls = [
            model,
            solver,
            schedule,
            nfe,
            batch,
            seed,
            stein_on,
            gamma_min,
            gamma_max,
            literal,
            rule,
            probes,
            probe,
            products,
            coords,
            variant,
            lipschitz,
            reference,
        ]
        views = [vanilla_image, stein_image, compare_slider, vanilla_x0, stein_x0, particles, diagnostics, step_label]
        keys = json.dumps([k for k, _ in SETTINGS])
        url_js = (
            f"(...values) => {{const keys = {keys}; const q = new URLSearchParams(); "
            "keys.forEach((k, i) => q.set(k, String(values[i]))); "
            "window.history.replaceState(null, '', '?' + q.toString()); return values;}"
        )
        step_js = (  # the shown step joins the settings in the URL: a link opens the same view
            "(k) => {const q = new URLSearchParams(window.location.search); q.set('step', String(k)); "
            "window.history.replaceState(null, '', '?' + q.toString()); return k;}"
        )
        run_button.click(
            run,
            [*controls, linked_step],
            [summary_md, *views, scrubber, summary_json, download, shown, linked_step],
            api_name="run",
            js=url_js,
            concurrency_limit=1,
        ).success(layout, shown, [image_group, particles], api_name=False, queue=False).success(
            None, scrubber, None, js=step_js, api_name=False, queue=False
        )
        scrubber.release(scrub, [shown, scrubber], [*views, shown], api_name=False, concurrency_limit=1).success(
            None, scrubber, None, js=step_js, api_name=False, queue=False
        )
        preset.input(apply_preset, preset, controls, api_name=False)
        model.input(batch_for_choice, [model, batch], batch, api_name=False, queue=False)
        rule.change(
            lambda name: (gr.update(visible=name == CUSTOM_RULE),) * 3,
            rule,
            [literal, gamma_min, gamma_max],
            api_name=False,
            queue=False,
        )
        dice.click(lambda: random.randrange(2**31), None, seed, api_name=False)
        demo.load(from_url, None, [*controls, linked_step], api_name=False)
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo._queue.sleep_when_free = QUEUE_POLL_S  # gradio's private setting: test_app fails if gradio stops reading it
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True) -> str:
    """Start the server (loopback by default) and return its URL."""
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        ssr_mode=False,
        show_error=True,
        theme=THEME,
        css=CSS,
        prevent_thread_lock=not block,
    )
    return url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH | diffusers:ID",
        help="also serve a steindiff denoiser (safetensors) under NAME, or a diffusers pipeline "
        "(hub id or local folder, safetensors only); repeatable",
    )
    parser.add_argument("--half", action="store_true", help="diffusers models on CUDA: the network in float16")
    parser.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="serve at once, without first running the form's defaults (which loads the default model, pays its "
        "first calls' costs and solves seed 0's reference, so that the first request does not)",
    )
    return parser.parse_args(argv)


def warm(catalog: ModelCatalog, model: str) -> None:
    """What a server's first request would pay for, paid before it serves: the run of the form's defaults on
    ``model`` (``interactive.warm_up``) and its views, on the compute thread, and matplotlib's import (gradio
    sets matplotlib's backend around every call, whether or not it draws with it: 0.6 s at the first on the
    2-core CPU). A model that fails to load (weights corrupt or missing) is reported and served anyway: its
    requests say why."""
    print(f"warming up: one run of the form's defaults on {model} (--no-warm-up skips it)", flush=True)
    with gr.utils.MatplotlibBackendMananger():  # gradio's own (sic), around each call; nothing when not installed
        pass
    try:
        result = on_compute_thread(warm_up, catalog, model)
    except ValueError as err:  # WeightsError among them
        print(f"app.py: the warm-up on {model} failed, serving anyway: {err}", file=sys.stderr, flush=True)
        return
    on_compute_thread(render, Shown(result, len(result.comparison.sigmas) - 1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    extra, hub = {}, []
    for item in args.model:
        if item.startswith(DIFFUSERS_PREFIX):
            hub.append(item)
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"app.py: --model expects NAME=PATH or diffusers:ID, got {item!r}")
        extra[name] = Path(path)
    catalog = ModelCatalog(extra, hub, half=args.half)
    for name in [*extra, *hub]:
        on_compute_thread(catalog.get, name, model_device(catalog, name))  # fail at start-up, not at the first request
    if args.warm_up:
        warm(catalog, default_model())
    launch(make_app(catalog), args.host, args.port)


if __name__ == "__main__":
    main()
