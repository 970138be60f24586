"""steindiff in the browser: vanilla and Stein-corrected samplers side by side, from the same noise.

    python app.py [--host 127.0.0.1] [--port 7860] [--model NAME=weights.safetensors ...] [--no-warm-up]

UI only: the form, the page and the events that wire them; the rest is ``steindiff.app``'s (no gradio there).
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr

from steindiff.app.compute_thread import on_compute_thread
from steindiff.app.panels import CAPTION
from steindiff.app.presets import PRESETS
from steindiff.app.session import Outcome, Session, refusal
from steindiff.app.settings import (
    CUSTOM_RULE,
    Control,
    Settings,
    batch_for_model,
    default_model,
    model_device,
    step_from_link,
)
from steindiff.app.views import Shown, Views, render
from steindiff.experiment import ModelCatalog

HERE = Path(__file__).resolve().parent / "steindiff" / "app"
EXPLANATION, CSS, JS = ((HERE / name).read_text() for name in ("explanation.md", "style.css", "page.js"))
#: system fonts only: the default theme would fetch web fonts from outside the machine
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
#: server-side rendering off (no Node process), errors shown, our look; no upload field, so uploads of 1 MB at most
PAGE = {"ssr_mode": False, "show_error": True, "theme": THEME, "css": CSS, "js": JS, "max_file_size": "1mb"}
#: the run's image views: PNG, and no "share" button (gradio's posts to Hugging Face Spaces discussions)
IMAGE_VIEW: dict[str, Any] = {"format": "png", "buttons": ["download", "fullscreen"], "elem_classes": ["run-image"]}
#: seconds gradio's queue sleeps between looks for a new request. Gradio's own 1 ms (no public setting) kept a
#: core busy while idle and took it from torch (docs/app-performance.md); a request waits at most this long.
QUEUE_POLL_S = 0.01


def run_endpoint(fn: Callable[[dict[str, Any], int | None, gr.Progress], tuple]) -> Callable[..., tuple]:
    """``fn(settings, linked, progress)`` as gradio's /run: one keyword parameter a setting (gradio names the
    API's parameters from the signature), then the page's linked step (a state) and gradio's progress."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [
        *Settings.parameters(),
        inspect.Parameter("linked", keyword, default=None, annotation=int | None),
        inspect.Parameter("progress", keyword, default=gr.Progress(), annotation=gr.Progress),
    ]
    signature = inspect.Signature(parameters, return_annotation=tuple)

    def endpoint(*args: Any, **kwargs: Any) -> tuple:
        """Run vanilla and (optionally) Stein from the same noise; returns every view and a summary."""
        (bound := signature.bind(*args, **kwargs)).apply_defaults()
        values = dict(bound.arguments)
        return fn(values, values.pop("linked"), values.pop("progress"))

    endpoint.__signature__ = signature  # type: ignore[attr-defined]
    endpoint.__annotations__ = {p.name: p.annotation for p in parameters}
    return endpoint


@dataclass
class Form:
    """The form's components: one control a setting (by name), and its buttons."""

    controls: dict[str, gr.components.Component]
    preset: gr.Dropdown
    claim: gr.Markdown
    dice: gr.Button
    run: gr.Button
    download: gr.File


@dataclass
class Page:
    """The output side: the summary, one component a :class:`Views` field, the scrubber, the JSON."""

    summary: gr.Markdown
    views: dict[str, gr.components.Component]
    image_group: gr.Column
    scrubber: gr.Slider
    summary_json: gr.JSON


def _control(control: Control, value: Any, choices: list[str] | None, **common: Any) -> gr.components.Component:
    """The component that shows one setting."""
    common |= {"label": control.label, "value": value, "visible": control.group != "custom"}  # custom: with its rule
    if control.widget == "dropdown":
        return gr.Dropdown(choices or list(control.choices or ()), allow_custom_value=True, **common)  # we refuse
    if control.widget == "radio":
        return gr.Radio(list(control.choices or ()), **common)
    if control.widget == "checkbox":
        return gr.Checkbox(**common)
    if control.widget == "slider":
        return gr.Slider(control.low, control.high, step=1 if control.whole else None, **common)
    return gr.Number(precision=0 if control.whole else None, **common)


def form(initial: dict[str, Any], models: list[str]) -> Form:
    """Presets, Run, the run's settings, the correction's and the diagnostics'; the probes' settings folded."""
    preset = gr.Dropdown(list(PRESETS), label="Lesson presets", value=None)
    claim = gr.Markdown("", elem_id="claim")  # the chosen preset's claim
    run = gr.Button("Run", variant="primary", elem_id="run")  # at the top: in sight on load, over no control
    controls: dict[str, gr.components.Component] = {}
    advanced = {name: c for name, c in Settings.controls().items() if c.group == "advanced"}
    for name, control in Settings.controls().items():
        if name == "seed":  # with its dice
            with gr.Row():
                controls[name] = _control(control, initial[name], None, scale=3, min_width=120)
                dice = gr.Button("random seed", scale=1, min_width=100)
        elif name not in advanced:
            controls[name] = _control(control, initial[name], models if name == "model" else None)
    download = gr.File(label="download the run (JSON, CSV, PNG)", elem_id="download")
    with gr.Accordion("Stein correction: probes and coordinates", open=False):
        controls |= {name: _control(control, initial[name], None) for name, control in advanced.items()}
    return Form({name: controls[name] for name in Settings.names()}, preset, claim, dice, run, download)


def page() -> Page:
    """The summary, the step's label and scrubber, the image views (or the particles) and the diagnostics."""
    summary = gr.Markdown("Choose settings (or a lesson preset) and press **Run**.", elem_id="summary")
    views: dict[str, gr.components.Component] = {"label": gr.Markdown("")}
    scrubber = gr.Slider(0, 1, value=0, step=1, label="step (moves every view)")
    with gr.Column(visible=False) as image_group, gr.Tabs():
        with gr.Tab("samples x_k"), gr.Row():
            views["vanilla_image"] = gr.Image(label="vanilla: x_k", **IMAGE_VIEW)
            views["stein_image"] = gr.Image(label="Stein: x_k", **IMAGE_VIEW)
        with gr.Tab("vanilla | Stein slider"):
            views["compare"] = gr.ImageSlider(label="vanilla | Stein", format="png", elem_classes=["run-image"])
        with gr.Tab("predicted x0"), gr.Row():
            views["vanilla_x0"] = gr.Image(label="vanilla: predicted x0", **IMAGE_VIEW)
            views["stein_x0"] = gr.Image(label="Stein: predicted x0", **IMAGE_VIEW)
    views["particles"] = gr.Plot(label="particles", visible=False, elem_classes=["run-plot"])
    gr.Markdown(CAPTION)
    views["diagnostics"] = gr.Plot(label="per-step diagnostics", elem_classes=["run-plot"], elem_id="diagnostics")
    with gr.Accordion("run summary (JSON)", open=False):
        summary_json = gr.JSON(label="run summary")
    with gr.Accordion("What am I looking at?", open=False):
        gr.Markdown(EXPLANATION)
    ordered = {f.name: views[f.name] for f in fields(Views)}
    return Page(summary, ordered, image_group, scrubber, summary_json)


#: the settings and the shown step join the URL (page.js): a link opens the same run at the same view
URL_JS = f"(...values) => window.steindiffLink.settings({Settings.names()!r}, values)"
STEP_JS = "(k) => window.steindiffLink.step(k)"


def make_app(catalog: ModelCatalog, first_model: str | None = None, warm_up: bool = False) -> gr.Blocks:
    """The Blocks app over a model catalog (the registry plus models given on the command line), its form at
    ``first_model`` (default: the shipped image model); with ``warm_up`` the form's run is made before the app
    serves and shown when a page opens."""
    session = Session(catalog)
    initial = session.initial(first_model or default_model())  # /run's defaults, at the first model's batch
    first = warm(session, initial) if warm_up else None
    # gradio keeps a copy of every output file: those older than an hour go, hourly
    with gr.Blocks(title="steindiff: the contractivity trap", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# steindiff: few-step diffusion sampling, the contractivity trap, and the Stein correction")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                settings = form(initial, catalog.names())
            with gr.Column(scale=3, min_width=760):  # the summary table needs 700 px: narrower, it goes below the form
                out = page()
        events(demo, session, settings, out, initial, first)
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo._queue.sleep_when_free = QUEUE_POLL_S  # gradio's private setting: test_app fails if gradio stops reading it
    return demo


def events(demo: gr.Blocks, session: Session, settings: Form, out: Page, initial: dict, first: Outcome | None) -> None:
    """Wire the form to the page: Run (the /run endpoint), the scrubber, presets, links, the model's batch; a page
    that opens on the form's own settings shows ``first``, their run."""
    catalog = session.catalog
    shown = gr.State(None)
    linked_step = gr.State(None)  # the step a link asks its first run to open at
    controls, views = list(settings.controls.values()), list(out.views.values())
    results = [out.summary, *views, out.scrubber, out.summary_json, settings.download, shown]
    image_views = [out.image_group, out.views["particles"]]

    def outputs(done: Outcome) -> tuple:
        """The page's outputs of a run (``results``' order)."""
        at = done.shown
        slider = gr.update(maximum=at.last, value=at.step)
        return (done.summary, *done.views.values(), slider, done.summary_json, done.download, at)

    def compute(values: dict[str, Any], linked: int | None, progress: gr.Progress) -> tuple:
        """The run and its views, on the one thread that does the server's torch work."""
        try:
            done = session.run(values, linked, lambda fraction, text: progress(fraction, desc=text))
        except (ValueError, TypeError) as err:  # WeightsError among them; one line, cut, to the client and the log
            print(f"app.py: refused: {(message := refusal(err))}", file=sys.stderr, flush=True)
            raise gr.Error(message, print_exception=False) from None
        return (*outputs(done), None)

    def scrub(last: Shown | None, step: float) -> tuple:
        if last is None:
            raise gr.Error("run a comparison first")
        at = Shown(last.result, int(step))
        return (*on_compute_thread(render, at).values(), at)

    def apply_preset(name: str) -> tuple:
        preset = PRESETS.get(name)
        changes = preset.settings if preset else {}
        updates = tuple(gr.update(value=changes[k]) if k in changes else gr.update() for k in Settings.names())
        return (*updates, f"*{preset.claim}*" if preset else "")

    def layout(at: Shown | None) -> tuple:
        image = at is not None and at.result.model.kind == "image"
        return gr.update(visible=image), gr.update(visible=at is not None and not image)

    def from_url(request: gr.Request) -> tuple:
        params = dict(request.query_params) if request is not None else {}
        state = session.from_link(params, initial)
        updates = (gr.update(value=state[k]) if k in state else gr.update() for k in Settings.names())
        opened = first is not None and all(initial[k] == v for k, v in state.items())  # the warm-up's run
        shows = outputs(first) if opened else (gr.update(),) * len(results)
        return (*updates, step_from_link(params), *shows, *layout(first.shown if opened else None))

    settings.run.click(
        run_endpoint(lambda *args: on_compute_thread(compute, *args)),
        [*controls, linked_step],
        [*results, linked_step],
        api_name="run",
        js=URL_JS,
        concurrency_limit=1,
    ).success(layout, shown, image_views, api_name=False, queue=False).success(
        None, out.scrubber, None, js=STEP_JS, api_name=False, queue=False
    )
    out.scrubber.release(scrub, [shown, out.scrubber], [*views, shown], api_name=False, concurrency_limit=1).success(
        None, out.scrubber, None, js=STEP_JS, api_name=False, queue=False
    )
    settings.preset.input(apply_preset, settings.preset, [*controls, settings.claim], api_name=False)
    model, batch, rule = (settings.controls[k] for k in ("model", "batch", "rule"))
    model.input(partial(batch_for_model, catalog), [model, batch], batch, api_name=False, queue=False)
    custom = [settings.controls[k] for k, control in Settings.controls().items() if control.group == "custom"]
    show_custom = lambda name: (gr.update(visible=name == CUSTOM_RULE),) * len(custom)  # noqa: E731
    rule.change(show_custom, rule, custom, api_name=False, queue=False)
    settings.dice.click(lambda: random.randrange(2**31), None, settings.controls["seed"], api_name=False)
    demo.load(from_url, None, [*controls, linked_step, *results, *image_views], api_name=False)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True) -> str:
    """Start the server (loopback by default) and return its URL."""
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, **PAGE)[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    serve = "also serve a steindiff denoiser (safetensors) under NAME, or a diffusers pipeline (hub id or folder)"
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH | diffusers:ID", help=serve)
    parser.add_argument("--half", action="store_true", help="diffusers models on CUDA: the network in float16")
    warm_help = "serve at once, without first running the form's defaults (which pays the first request's costs)"
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false", help=warm_help)
    return parser.parse_args(argv)


def warm(session: Session, settings: dict[str, Any]) -> Outcome | None:
    """What a first request would pay, paid before serving: the form's run and views, on the compute thread, and
    matplotlib's import (gradio sets its backend around every call). A model that fails to load: None, reported."""
    print(f"warming up: one run of the form's defaults on {settings['model']} (--no-warm-up skips it)", flush=True)
    with gr.utils.MatplotlibBackendMananger():  # gradio's own (sic), around each call; nothing when not installed
        pass
    try:
        return on_compute_thread(session.run, settings)
    except ValueError as err:  # WeightsError among them
        print(f"app.py: the warm-up on {settings['model']} failed, serving anyway: {err}", file=sys.stderr, flush=True)
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        catalog = ModelCatalog.from_args(args.model, half=args.half)
        for name in [*catalog.extra, *catalog.diffusers_models]:  # fail at start-up, not at the first request
            on_compute_thread(catalog.get, name, model_device(catalog, name))
    except ValueError as err:  # WeightsError among them: one line naming the file, exit 2 as argparse's errors
        print(f"app.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    launch(make_app(catalog, warm_up=args.warm_up), args.host, args.port)


if __name__ == "__main__":
    main()
