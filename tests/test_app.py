"""The Gradio app: callbacks as functions, and a launched server called with gradio_client."""

import csv
import inspect
import io
import itertools
import json
import math
import re
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import gradio as gr
import pytest
import torch
from gradio_client import Client
from gradio_client.utils import StatusUpdate

import app
from steindiff.app import session as app_session
from steindiff.app import settings as app_settings
from steindiff.app.download import write_download
from steindiff.app.layout import log_ticks
from steindiff.app.panels import diagnostics_figure
from steindiff.app.particles import particles_figure
from steindiff.app.presets import PRESETS
from steindiff.app.progress import PHASE_TEXT
from steindiff.app.settings import LIMITS, Settings, step_from_link
from steindiff.app.summary import summary_markdown
from steindiff.app.views import Shown, render
from steindiff.experiment import ModelCatalog, run_experiment

GOOD = {
    **Settings.defaults(),
    "model": "gmm-ring",
    "solver": "dpmpp_2m",
    "batch": 64,
    "gamma_max": 1.0,
    "literal": True,
    "rule": "custom",
}


def _call(client: Client, **changes):
    return client.predict(**{**GOOD, **changes}, api_name="/run")


def test_settings_validate_like_the_server():
    catalog = ModelCatalog()
    experiment = Settings.from_values(**GOOD).experiment(catalog)
    experiment.check(catalog, LIMITS)
    assert experiment.stein.gamma_max == math.inf and experiment.nfe == 5
    for bad, match in [
        ({"nfe": float("nan")}, "nfe must be a finite number"),
        ({"batch": 2.5}, "whole number"),
        ({"gamma_min": 2.0, "literal": False, "gamma_max": 1.0}, "must not exceed"),
        ({"rule": "magic"}, "unknown rule"),
        ({"rule": "stein-safe", "coords": "vp"}, "EDM coordinates"),
        ({"products": "symbolic"}, "products must be one of"),
        ({"probe": "exact", "products": "fd"}, "exact trace"),
    ]:
        with pytest.raises(ValueError, match=match):
            Settings.from_values(**{**GOOD, **bad}).experiment(catalog)


def test_the_form_starts_at_the_run_endpoints_defaults():
    """What the page shows before any change is what /run does when called with no argument: one parameter a
    setting, named after it, in the form's order."""
    demo = app.make_app(ModelCatalog())
    run = next(fn for fn in demo.fns.values() if fn.api_name == "run")
    parameters = [component for component in run.inputs if not component.skip_api]  # the page's states aside
    assert [component.value for component in parameters] == list(Settings.defaults().values())
    assert run.input_parameter_names[: len(parameters)] == Settings.names()


def test_run_is_called_by_keyword_and_the_rest_default(server):
    """/run's parameters are the settings' names with their defaults: a call that names three of them runs the
    defaults for the others, and a call by keyword gives the same result as the same values in order."""
    client = Client(server, verbose=False)
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/run"]["parameters"]
    assert [p["parameter_name"] for p in info] == Settings.names()
    assert [p["parameter_default"] for p in info] == list(Settings.defaults().values())
    named = client.predict(model="gmm-ring", batch=64, lipschitz=False, api_name="/run")[10]
    in_order = {**Settings.defaults(), "model": "gmm-ring", "batch": 64, "lipschitz": False}
    positional = client.predict(*in_order.values(), api_name="/run")[10]
    assert named["config"] == positional["config"] and named["config"]["stein"]["lookahead"]
    assert named["vanilla"]["final"] == positional["vanilla"]["final"]


def test_every_preset_is_a_valid_run_the_form_offers():
    catalog = ModelCatalog()
    for name, preset in PRESETS.items():
        settings = {**Settings.defaults(), **preset.settings}
        offered = {key: control.choices for key, control in Settings.controls().items() if control.choices}
        assert all(settings[key] in choices for key, choices in offered.items()), name
        Settings.from_values(**settings).experiment(catalog).check(catalog, LIMITS)


def test_a_link_sets_what_it_names_and_falls_back_where_the_form_offers_no_such_value():
    models = ["mnist", "gmm-ring"]
    link = {"solver": "dpmpp_3m+lookahead", "schedule": "logsnr", "seed": "7", "stein_on": "false", "model": "gmm-ring"}
    assert Settings.from_link(link, models, "mnist") == {**link, "seed": 7, "stein_on": False}
    mistyped = {"solver": "ddim lookahead", "schedule": "zz", "nfe": "x", "model": "nope", "probe": "cauchy"}
    assert Settings.from_link(mistyped, models, "gmm-ring") == {
        "solver": Settings.solver,
        "schedule": "karras",
        "nfe": 5,
        "model": "gmm-ring",
        "probe": "rademacher",
    }
    assert Settings.from_link({"unknown": "1"}, models, "mnist") == {}


def test_a_link_names_the_step_its_first_run_opens_at():
    assert step_from_link({"step": "2", "seed": "7"}) == 2
    assert step_from_link({"step": "0"}) == 0
    for unread in ("-1", "1.5", "x", "", " 2", "\u00b2"):  # the last: superscript two, a digit to str.isdigit
        assert step_from_link({"step": unread}) is None, unread
    assert step_from_link({"seed": "7"}) is None


def test_choosing_a_model_gives_its_kinds_batch_unless_the_user_set_one():
    catalog = ModelCatalog()
    image, particles = app_settings.DEFAULT_BATCH["image"], app_settings.DEFAULT_BATCH["2d"]
    assert image == Settings.defaults()["batch"] and particles > LIMITS.max_image_batch
    for model, batch, shown in [
        ("gmm-ring", image, particles),  # another kind's default
        ("mnist", particles, image),
        ("mlp-moons", None, particles),  # the field emptied
        ("mnist", 512, image),  # more than an image batch may be
        ("gmm-ring", 0, particles),
        ("gmm-ring", 64, 64),  # the user's own
        ("mnist", 64, 64),
        ("gmm-ring", particles, particles),
        ("nope", 5000, 5000),  # unknown: the run names it
    ]:
        assert app_settings.batch_for_model(catalog, model, batch) == shown, (model, batch)


def test_the_queue_looks_for_requests_every_10_ms():
    """gradio's queue loop wakes every 1 ms, which takes CPU from torch on a small machine (app.QUEUE_POLL_S).
    The app sets gradio's private attribute, so this fails if gradio's loop stops reading it."""
    from gradio.queueing import Queue

    assert "await asyncio.sleep(self.sleep_when_free)" in inspect.getsource(Queue.start_processing)
    gradio_default = gr.Blocks().queue()._queue.sleep_when_free
    assert app.make_app(ModelCatalog())._queue.sleep_when_free == app.QUEUE_POLL_S > gradio_default


def test_named_rule_sets_the_correction_and_ignores_the_custom_clip():
    catalog = ModelCatalog()
    experiment = Settings.from_values(**{**GOOD, "rule": "sc-lookahead", "gamma_min": 0.3}).experiment(catalog)
    assert experiment.stein.lookahead and experiment.stein.noise_level == "cap" and experiment.stein.gamma_min == 1.0
    default = Settings.from_values(**Settings.defaults()).experiment(catalog)
    assert default.stein.trust_region  # the default rule
    assert default.stein.products == "fd" and default.diagnostics.jacobian_mode == "fd"  # the app's fast products
    by_autograd = Settings.from_values(**{**GOOD, "products": "vjp"}).experiment(catalog)
    assert by_autograd.stein.products == "vjp" and by_autograd.diagnostics.jacobian_mode == "vjp2"


@pytest.mark.slow
def test_an_image_reference_takes_one_network_call_a_lattice_step_and_none_for_a_new_grid():
    """The app solves an image model's reference with DPM-Solver++(3M) steps of 0.25 in log sigma: from 80
    to 0.002 that is 43 calls, and the final denoising step. The levels of a grid between lattice nodes
    are the 3M steps cut short, from the denoised values the walk kept: another grid costs no call."""
    catalog = ModelCatalog()
    settings = {**Settings.defaults(), "model": "mnist", "batch": 4, "nfe": 3, "lipschitz": False}
    model = catalog.get("mnist")
    for change, reference_calls in (({}, 43 + 1), ({"schedule": "logsnr", "nfe": 4}, 0)):
        calls = {}
        for reference in (False, True):
            counted = []
            hook = model.register_forward_hook(lambda *_, counted=counted: counted.append(1))
            try:
                call = {**settings, **change, "reference": reference}
                run_experiment(Settings.from_values(**call).experiment(catalog), catalog)
            finally:
                hook.remove()
            calls[reference] = len(counted)
        assert calls[True] - calls[False] == reference_calls, (change, calls)


def test_image_models_go_to_the_gpu_and_2d_models_stay_on_the_cpu(monkeypatch):
    """settings.model_device, as Settings.experiment applies it when no device is named (DEVICE is what
    the app found at import: here, as on a machine with a GPU)."""
    monkeypatch.setattr(app_settings, "DEVICE", "cuda:0")
    catalog = ModelCatalog()
    assert app_settings.model_device(catalog, "mnist") == "cuda:0"
    assert app_settings.model_device(catalog, "gmm-ring") == app_settings.model_device(catalog, "nowhere") == "cpu"
    assert Settings.from_values(**GOOD).experiment(catalog).device == "cpu"
    assert Settings.from_values(**{**GOOD, "model": "mnist"}).experiment(catalog).device == "cuda:0"
    assert Settings.from_values(**{**GOOD, "model": "mnist"}).experiment(catalog, device="cpu").device == "cpu"
    # a hub id the catalog accepts without listing it (as the CLI's does): an image model, for its device
    # and for the interactive budgets alike (nothing is loaded to decide)
    hub = Settings.from_values(**{**GOOD, "model": "diffusers:a/b"}).experiment(ModelCatalog(any_diffusers=True))
    assert hub.device == "cuda:0" and hub.diagnostics.lipschitz_iters == 3 and hub.diagnostics.reference_samples == 4


def test_render_and_download_from_a_real_run(tmp_path):
    catalog = ModelCatalog()
    result = run_experiment(Settings.from_values(**{**GOOD, "batch": 32}).experiment(catalog), catalog, LIMITS)
    views = render(Shown(result, 2))
    assert views.label.startswith("step 2 of 5")
    figure = diagnostics_figure(result, 2)
    assert len(figure.data) > 10 and len(particles_figure(result, 2).data) >= 6
    # the L panel spans 1 to 30 at least (its shaded band): ticks labelled in full, 1 among them
    lipschitz_axis = figure.layout.yaxis2
    assert "1" in lipschitz_axis.ticktext
    assert list(lipschitz_axis.ticktext) == [f"{v:g}" for v in lipschitz_axis.tickvals]
    with zipfile.ZipFile(write_download(result, tmp_path)) as archive:
        assert {"run.json", "steps.csv"} <= set(archive.namelist())
        assert archive.read("steps.csv").decode().count("\n") == 11  # header + 5 steps x 2 runs
        rows = list(csv.DictReader(io.StringIO(archive.read("particles.csv").decode())))
    finals = {
        **{name: run.samples for name, run in result.runs().items()},
        "reference": result.comparison.reference[-1],
    }
    for name, samples in finals.items():  # the final samples, the reference's 32 (of its first 64) among them
        written = torch.tensor([[float(r["x"]), float(r["y"])] for r in rows if r["run"] == name])
        assert len(samples) == 32 and torch.equal(written.to(samples.dtype), samples), name
    newest = [write_download(result, tmp_path, keep=2) for _ in range(3)][-2:]
    assert sorted(str(next(p.glob("*.zip"))) for p in tmp_path.glob("run-*")) == sorted(newest)  # older ones go


def test_each_particle_panel_is_framed_to_its_own_run():
    """The literal rule scatters a 4-step DDIM run's particles over hundreds; vanilla's stay on the ring,
    framed as they are, not drawn as a dot in the scattered run's frame."""
    catalog = ModelCatalog()
    literal = {**GOOD, "solver": "ddim", "nfe": 4, "rule": "stein", "lipschitz": False, "reference": False}
    result = run_experiment(Settings.from_values(**literal).experiment(catalog), catalog, LIMITS)
    layout = particles_figure(result, 4).layout
    for run, x, y in [
        (result.comparison.vanilla, layout.xaxis, layout.yaxis),
        (result.comparison.stein, layout.xaxis2, layout.yaxis2),
    ]:
        inside = (run.states[-1].abs() <= x.range[1]).all(1).float().mean()
        assert inside >= 0.98 and tuple(y.range) == tuple(x.range) and y.scaleanchor == y.anchor, (x, y)
    assert layout.xaxis.range[1] == pytest.approx(2.625)  # the ring's floor
    assert layout.xaxis2.range[1] > 10 * layout.xaxis.range[1]


@pytest.mark.slow
def test_digit_scores_of_a_run_with_non_finite_samples_are_marked():
    """A run that overflows at its second step still gets digit scores (its non-finite pixels scored as
    background or ink): the table marks them and says what they measure; the vanilla run's stay unmarked."""
    catalog = ModelCatalog()
    overflow = {"gamma_min": 1e30, "gamma_max": 1e30, "literal": False, "lipschitz": False, "reference": False}
    settings = {**Settings.defaults(), "model": "mnist", "batch": 8, "solver": "ddim", "nfe": 6, **overflow}
    result = run_experiment(Settings.from_values(**{**settings, "rule": "custom"}).experiment(catalog), catalog)
    runs = result.runs()
    assert runs["stein"].nonfinite_samples == 8 and runs["vanilla"].nonfinite_samples == 0
    assert math.isfinite(result.scores["stein"]["fd_mnist"])
    table = summary_markdown(result)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["stein"].count(" †") == 1 and "(8 of 8 samples)" in rows["stein"] and "†" not in rows["vanilla"]
    assert "†: scored with non-finite samples" in table


@pytest.mark.parametrize(
    ("values", "texts"),
    [
        ([0.5, 3.0], None),  # within a decade: plotly's own plain numbers
        ([0.4, 1.0, 20.0], ["0.1", "0.2", "0.5", "1", "2", "5", "10", "20", "50", "100", "200", "500"]),
        ([0.15, 30.0], ["0.1", "0.3", "1", "3", "10", "30", "100", "300"]),
        ([5e-4, 1.0], None),  # wider: plotly's powers of ten
    ],
)
def test_log_axes_over_a_few_decades_label_their_ticks_in_full(values, texts):
    ticks = log_ticks(values)
    assert (ticks[1] if ticks else None) == texts


def test_good_run_over_the_api(server):
    out = _call(Client(server, verbose=False))
    summary_md, summary = out[0], out[10]
    assert "| vanilla | 5 |" in summary_md and "| stein | 5 |" in summary_md
    assert summary["vanilla"]["nfe_total"] == 5 and summary["stein"]["final"]["err_ref"] > 0
    assert out[7] is not None  # the diagnostics figure


@pytest.mark.slow
def test_progress_names_the_reference_each_step_and_the_post_passes_in_order(server):
    """The progress a client sees (gradio sends the latest every 10 ms): the reference solution of a new seed
    first, at 0, then the runs' steps, then the Lipschitz estimates and the amplification, never going back."""
    job = Client(server, verbose=False).submit(
        **{**GOOD, "model": "mnist", "batch": 8, "solver": "ddim", "nfe": 3, "seed": 4242}, api_name="/run"
    )
    job.result(timeout=300)
    updates = []
    while not job.communicator.updates.empty():
        updates.append(job.communicator.updates.get_nowait())
    units = [unit for update in updates if isinstance(update, StatusUpdate) for unit in update.progress_data or []]
    descs = [desc for desc, _ in itertools.groupby(unit.desc for unit in units)]
    assert descs[0] == PHASE_TEXT["reference"] and descs[-2:] == [PHASE_TEXT["lipschitz"], PHASE_TEXT["amplification"]]
    assert set(descs[1:-2]) <= {f"{label}: step {k} of 3" for label in ("vanilla", "stein") for k in (1, 2, 3)}, descs
    assert len(descs) >= 4, descs
    fractions = [unit.progress for unit in units]
    assert fractions[0] == 0 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(2 / 3), fractions


def test_a_diverging_run_shows_where_it_diverged_and_renders(server):
    """A coefficient of 10^4 at every step: the corrected run overflows. Its states grow finite but huge
    first (to about 1e21), then turn non-finite: the table, the summary, both figures and the download say
    where, and the Lipschitz constants are missing from there on (a map that overflows gets NaN, not a
    LAPACK error: tests/test_diagnostics.py)."""
    diverging = {"solver": "dpmpp_2m", "nfe": 6, "batch": 16, "literal": False, "gamma_min": 1e4, "gamma_max": 1e4}
    out = _call(Client(server, verbose=False), **diverging)
    summary_md, particles, diagnostics, summary = out[0], out[6], out[7], out[10]
    step = summary["stein"]["final"]["first_nonfinite_step"]
    assert step is not None and summary["vanilla"]["final"]["first_nonfinite_step"] is None
    lost = summary["stein"]["final"]["nonfinite_samples"]
    # one numbering on the page: step k makes x_k (the JSON's first_nonfinite_step is the record's index)
    assert lost >= 1 and f"| step {step + 1} ({lost} of 16 samples) |" in summary_md
    assert f"stein non-finite from x_{step + 1} (step {step + 1})" in diagnostics["plot"]
    assert "particles non-finite" in particles["plot"]
    with zipfile.ZipFile(out[11]) as archive:
        run = json.loads(archive.read("run.json"))["stein"]
    assert run["final"]["first_nonfinite_step"] == step
    flow = {r["step"]: r["lipschitz_flow_max"] for r in run["trace"]}
    assert flow[0] is not None and all(flow[k] is None for k in flow if k >= step)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"nfe": 0}, "minimum"),
        ({"nfe": 1000}, "maximum"),
        ({"batch": 100_000}, "batch must be between 1 and 4096"),
        ({"batch": -3}, "batch must be between"),
        ({"probes": 0}, "minimum"),
        ({"model": "nope"}, "nope"),
        ({"gamma_min": 3.0, "literal": False, "gamma_max": 1.0}, "must not exceed"),
        ({"model": "mnist", "batch": 1000}, "batch must be between 1 and 256"),
    ],
)
def test_bad_input_gives_a_clear_error_and_the_server_keeps_serving(server, changes, needle):
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match=needle):
        _call(client, **changes)
    assert _call(client, batch=16, lipschitz=False)[10]["vanilla"]["nfe_total"] == 5


def test_nan_sent_as_raw_json_is_refused_by_the_server(server):
    """gradio_client will not even encode NaN; a hand-made request with a NaN literal gets a clear error."""
    import httpx

    body = json.dumps({"data": list({**GOOD, "gamma_min": float("nan")}.values())})
    assert "NaN" in body
    event = httpx.post(
        f"{server}gradio_api/call/run", content=body, headers={"content-type": "application/json"}
    ).json()["event_id"]
    stream = httpx.get(f"{server}gradio_api/call/run/{event}", timeout=60).text
    assert "event: error" in stream and "gamma_min must be a finite number, got nan" in stream
    assert _call(Client(server, verbose=False), batch=16, lipschitz=False)[10]["vanilla"]["nfe_total"] == 5


@pytest.mark.slow
def test_eight_concurrent_requests_are_all_answered_on_the_one_compute_thread(server, monkeypatch):
    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return run_experiment(*args, **kwargs)

    monkeypatch.setattr(app_session, "run_experiment", recording)

    def one(seed: int):
        out = _call(Client(server, verbose=False), seed=seed, batch=32, lipschitz=False)
        return seed, out[10]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert [summary["config"]["seed"] for _, summary in answers] == list(range(8))
    errors = {summary["vanilla"]["final"]["err_ref"] for _, summary in answers}
    assert len(errors) == 8  # eight different seeds, eight different results
    # gradio ran the requests on several worker threads; torch ran on one (one OpenMP pool: compute_thread.py)
    assert len(threads) == 8 and {name.split("_")[0] for name in threads} == {"steindiff-compute"}


def test_image_model_run_returns_grids_and_a_slider(server):
    out = _call(Client(server, verbose=False), model="empirical-digits", batch=8, nfe=3, lipschitz=False)
    vanilla, stein, slider = out[1], out[2], out[3]
    assert vanilla is not None and stein is not None and len(slider) == 2
    assert out[6] is None or out[6].get("visible") is False  # no particle plot for an image model
    assert out[10]["stein"]["nfe_total"] == 3
    with zipfile.ZipFile(out[11]) as archive:  # the final samples as images
        files = set(archive.namelist())
    assert {"vanilla.png", "stein.png", "side_by_side.png"} <= files and "particles.csv" not in files


def _counted_run(catalog: ModelCatalog, settings: dict) -> tuple:
    """The run of ``settings`` (the form's, in order) and the network calls of its model it made."""
    counted = []
    hook = catalog.get(settings["model"]).register_forward_hook(lambda *_: counted.append(1))
    try:
        result = run_experiment(Settings.from_values(**settings).experiment(catalog), catalog, LIMITS)
    finally:
        hook.remove()
    return result, len(counted)


def test_runs_from_the_same_noise_reuse_the_reference_solution():
    catalog = ModelCatalog()
    settings = {**GOOD, "lipschitz": False}
    first = run_experiment(Settings.from_values(**settings).experiment(catalog), catalog, LIMITS)
    capped = {**settings, "literal": False, "gamma_max": 1.0}
    second = run_experiment(Settings.from_values(**capped).experiment(catalog), catalog, LIMITS)
    assert second.comparison.reference is first.comparison.reference  # same grid: the same states
    # a new grid costs the reference no call (the 3M lattice's dense output and its kept denoised floor
    # state); nor does a new batch on the same grid (the same 64 samples). A new seed is a new solve: 3M steps
    # of at most 0.05 in log sigma from 80 to 0.01 sigma_min (ceil(log(80 / 2e-5) / 0.05) = 305), then D there
    solve = math.ceil(math.log(80 / 2e-5) / 0.05) + 1
    changes = [({"nfe": 9}, 0), ({"solver": "heun"}, 0), ({"schedule": "logsnr"}, 0), ({"batch": 96}, 0)]
    changes.append(({"seed": 1}, solve))
    for change, reference_calls in changes:
        calls = {}
        for reference in (False, True):
            other, calls[reference] = _counted_run(catalog, {**capped, **change, "reference": reference})
        assert (other.comparison.flow is first.comparison.flow) == ("seed" not in change), change
        assert calls[True] - calls[False] == reference_calls, (change, calls)
        runs = [other.comparison.vanilla, other.comparison.stein]
        assert all(run.final_err_ref is not None and math.isfinite(run.final_err_ref) for run in runs)


def test_the_warm_up_leaves_the_first_request_no_reference_to_solve():
    """After the start-up run of the form's defaults, a request with them finds the model loaded and its
    reference solved: the reference adds no network call (on a catalog not warmed up, a whole solve)."""
    defaults = {
        **Settings.defaults(),
        "model": "gmm-ring",
        "batch": app_settings.DEFAULT_BATCH["2d"],
        "lipschitz": False,
    }
    solve = math.ceil(math.log(80 / 2e-5) / 0.05) + 1  # as above: the 3M lattice, then D at its floor

    def reference_calls(catalog: ModelCatalog) -> int:
        # with the reference first: a cold catalog solves it here
        calls = {
            reference: _counted_run(catalog, {**defaults, "reference": reference})[1] for reference in (True, False)
        }
        return calls[True] - calls[False]

    warmed = ModelCatalog()
    app.make_app(warmed, first_model="gmm-ring", warm_up=True)  # the form's run and its views, on the compute thread
    assert reference_calls(warmed) == 0
    assert reference_calls(ModelCatalog()) == solve
    assert app.parse_args([]).warm_up and not app.parse_args(["--no-warm-up"]).warm_up


@pytest.mark.slow
def test_a_warm_up_on_a_corrupt_model_is_reported_and_the_server_still_serves(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    catalog = ModelCatalog({"broken": broken})
    demo = app.make_app(catalog, first_model="broken", warm_up=True)
    assert "the warm-up on broken failed, serving anyway" in capsys.readouterr().err
    url = app.launch(demo, port=None, block=False)
    try:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="broken"):
            _call(client, model="broken")
        assert _call(client)[10]["vanilla"]["nfe_total"] == 5  # the server goes on serving
    finally:
        demo.close()


def test_a_one_step_runs_reference_integrates_the_whole_ode():
    """NFE 1 is one denoising step from sigma_max: its reference still solves the ODE down to the model's lowest
    level (it used to stop at the grid's last positive level, the start, and read an error of 0)."""
    one, five = (
        run_experiment(Settings.from_values(**{**GOOD, "nfe": nfe, "lipschitz": False}).experiment(catalog), catalog)
        for nfe, catalog in ((1, ModelCatalog()), (5, ModelCatalog()))
    )
    assert one.comparison.vanilla.final_err_ref > 0.1
    assert torch.allclose(one.comparison.reference[-1], five.comparison.reference[-1], atol=1e-5)


def test_the_particle_figure_draws_non_finite_particles_on_either_panel():
    """A run whose particles turned non-finite, vanilla's (the first panel) or Stein's, is drawn and labelled
    (the first panel's annotation once named an axis plotly does not have, "x1", and the request failed)."""
    catalog = ModelCatalog()
    result = run_experiment(Settings.from_values(**{**GOOD, "lipschitz": False}).experiment(catalog), catalog)
    for run in result.runs().values():
        run.states[-1][:3] = math.nan
    figure = particles_figure(result, len(result.comparison.sigmas) - 1)
    notes = {(a.text, a.xref) for a in figure.layout.annotations if "non-finite" in a.text}
    assert notes == {("3 particles non-finite", "x domain"), ("3 particles non-finite", "x2 domain")}


def test_the_in_app_explanation_is_short_and_quotes_no_measurement():
    """At most 250 words, and no measured figure (a decimal, or a number of two digits or more)."""
    assert len(app.EXPLANATION.split()) <= 250
    assert not re.search(r"\d\.\d|\d{2,}", app.EXPLANATION), re.findall(r"\S*\d\S*", app.EXPLANATION)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"stein_on": "abc"}, "stein_on must be true or false, got 'abc'"),
        ({"lipschitz": 1}, "lipschitz must be true or false"),
        ({"batch": math.inf}, "batch must be a finite number, got inf"),
        ({"seed": 2.5}, "seed must be a whole number"),
        ({"nfe": "5"}, "nfe must be a finite number"),
    ],
)
def test_settings_take_booleans_and_finite_numbers_only(changes, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        Settings.from_values(**{**GOOD, **changes})


def test_a_refusal_is_one_short_line_to_the_client_and_the_log(server, capfd):
    """A 1 MB model name is refused with a message of at most 200 characters, logged as one line with no
    traceback; the server keeps serving."""
    client = Client(server, verbose=False)
    with pytest.raises(Exception) as refused:
        _call(client, model="x" * 1_000_000)
    assert "unknown model" in str(refused.value) and len(str(refused.value)) < 300
    log = capfd.readouterr().err
    lines = [line for line in log.splitlines() if "refused" in line]
    assert lines and all(len(line) <= 230 for line in lines) and "Traceback" not in log
    assert _call(client, lipschitz=False)[10]["vanilla"]["nfe_total"] == 5


def test_the_upload_route_takes_no_more_than_a_megabyte(server):
    import httpx

    big = httpx.post(f"{server}gradio_api/upload", files={"files": ("big.bin", b"0" * 2_000_000)})
    small = httpx.post(f"{server}gradio_api/upload", files={"files": ("small.bin", b"0" * 1000)})
    assert big.status_code == 413 and small.status_code == 200, (big.status_code, small.text[:200])
