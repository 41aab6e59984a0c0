"""autoft.report: the table, the files written (atomically), and the study plots' skips on degenerate studies."""

from __future__ import annotations

import json
import logging

import matplotlib.pyplot as plt
import optuna
import pytest
from matplotlib.figure import Figure
from PIL import Image

from autoft import report
from autoft.report import results_table, write_report

ROWS = {
    "zero-shot": {"id": 0.7012, "ood": 0.5521},
    "FT": {"id": 0.8123, "ood": 0.5034, "id_std": 0.0041, "ood_std": 0.0123},
    "AutoFT": {"id": 0.8047, "ood": 0.6119, "id_std": 0.0052, "ood_std": 0.0087},
}
BEST = {"value": 0.61234567, "params": {"lr": 3e-5, "ce": 1.0, "hinge": 0.25}}


def _wise_curve(end: dict[str, float]) -> list[dict[str, float]]:
    """From zero-shot (alpha = 0) to ``end`` (alpha = 1), bulging above the chord in OOD as WiSE-FT does."""
    zs = ROWS["zero-shot"]
    return [
        {
            "alpha": a,
            "id": zs["id"] + a * (end["id"] - zs["id"]),
            "ood": zs["ood"] + a * (end["ood"] - zs["ood"]) + 0.1 * a * (1 - a),
        }
        for a in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]


# Both curves share their alpha = 0 end: the zero-shot model.
WISE = {"AutoFT + WiSE-FT": _wise_curve(ROWS["AutoFT"]), "FT + WiSE-FT": _wise_curve(ROWS["FT"])}
STUDY_PLOTS = {"optimization_history.png", "param_importances.png"}
ALWAYS = {"results.md", "results.json", "effective_robustness.png"}


def _objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("lr", 1e-6, 1e-3, log=True)
    hinge = trial.suggest_float("hinge", 0.0, 1.0)
    loss = trial.suggest_categorical("loss", ["ce", "flyp"])
    return 0.5 + 0.1 * hinge - 0.01 * abs(lr * 1e4 - 1) + (0.05 if loss == "flyp" else 0.0)


@pytest.fixture
def study() -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(_objective, n_trials=12)
    return study


def _assert_png(path) -> None:
    with Image.open(path) as image:
        image.load()  # decodes every byte: a truncated file fails here
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


def _no_temp_files(out_dir) -> bool:
    return not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]


def test_results_table_formats_means_and_stds():
    table = results_table(ROWS, metric="macro-F1")
    lines = table.strip().splitlines()
    assert lines[0] == "| method | ID test macro-F1 | OOD test macro-F1 |"
    assert len(lines) == 2 + len(ROWS)
    assert "| zero-shot | 0.701 | 0.552 |" in lines
    assert "| FT | 0.812 ± 0.004 | 0.503 ± 0.012 |" in lines
    assert "±" not in results_table({"zero-shot": ROWS["zero-shot"]})
    assert "OOD test accuracy" in results_table(ROWS, metric="accuracy")
    assert r"| a\|b | 0.100 | 0.200 |" in results_table({"a|b": {"id": 0.1, "ood": 0.2}})


def test_write_report_writes_every_file(tmp_path, study):
    out = tmp_path / "run"  # created by write_report
    written = write_report(out, ROWS, BEST, WISE, study)

    assert set(written) == ALWAYS | STUDY_PLOTS
    assert all(path == out / name and path.is_file() for name, path in written.items())
    for name in ALWAYS | STUDY_PLOTS:
        if name.endswith(".png"):
            _assert_png(out / name)
    assert _no_temp_files(out)

    md = (out / "results.md").read_text()
    for name in ROWS:
        assert f"| {name} |" in md
    for number in ("0.701", "0.552", "0.812 ± 0.004", "0.805 ± 0.005", "0.612 ± 0.009"):
        assert number in md
    assert "## Best objective" in md and "value: 0.612346" in md
    assert "| lr | 3e-05 |" in md and "| hinge | 0.25 |" in md

    saved = json.loads((out / "results.json").read_text())
    assert saved == {"results": ROWS, "best": BEST, "wise": WISE}


@pytest.mark.parametrize("kind", ["none", "empty", "only-failed"])
def test_without_complete_trials_the_study_plots_are_skipped(tmp_path, caplog, kind):
    study = None if kind == "none" else optuna.create_study(direction="maximize")
    if kind == "only-failed":
        study.optimize(lambda trial: float("nan"), n_trials=2)  # NaN objective: FAIL, not COMPLETE
    with caplog.at_level(logging.WARNING, logger="autoft.report"):
        written = write_report(tmp_path, ROWS, BEST, WISE, study)
    assert set(written) == ALWAYS
    assert not any((tmp_path / name).exists() for name in STUDY_PLOTS)
    _assert_png(tmp_path / "effective_robustness.png")
    assert "| AutoFT | 0.805 ± 0.005 | 0.612 ± 0.009 |" in (tmp_path / "results.md").read_text()
    assert "skipping" in caplog.text


def test_identical_params_skip_importances_without_raising(tmp_path, caplog):
    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        study.enqueue_trial({"lr": 1e-4, "hinge": 0.5, "loss": "ce"})
    study.optimize(_objective, n_trials=2)
    with caplog.at_level(logging.WARNING, logger="autoft.report"):
        written = write_report(tmp_path, ROWS, BEST, None, study)
    assert "optimization_history.png" in written
    _assert_png(tmp_path / "optimization_history.png")
    assert "param_importances.png" not in written and not (tmp_path / "param_importances.png").exists()
    assert "varying params" in caplog.text


def test_a_single_complete_trial_gets_a_history_but_no_importances(tmp_path):
    study = optuna.create_study(direction="maximize")
    study.optimize(_objective, n_trials=1)
    assert set(report.plot_study(study, tmp_path)) == {"optimization_history.png"}


def test_optuna_errors_on_importances_are_logged_and_skipped_but_others_propagate(tmp_path, study, monkeypatch, caplog):
    def zero_variance(*args, **kwargs):
        raise RuntimeError("Encountered zero total variance in all trees.")

    monkeypatch.setattr(optuna.visualization.matplotlib, "plot_param_importances", zero_variance)
    with caplog.at_level(logging.WARNING, logger="autoft.report"):
        assert set(report.plot_study(study, tmp_path)) == {"optimization_history.png"}
    assert "zero total variance" in caplog.text

    def bug(*args, **kwargs):
        raise TypeError("a bug, not a degenerate study")

    monkeypatch.setattr(optuna.visualization.matplotlib, "plot_param_importances", bug)
    with pytest.raises(TypeError, match="a bug"):
        report.plot_study(study, tmp_path)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names
def test_multi_objective_study_plots_its_last_objective(tmp_path, monkeypatch):
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["ID val macro-F1", "OOD val macro-F1"])
    study.optimize(lambda trial: (_objective(trial), trial.params["hinge"]), n_trials=8)
    calls = {}
    real = optuna.visualization.matplotlib.plot_optimization_history

    def spy(study, **kwargs):
        calls.update(kwargs)
        return real(study, **kwargs)

    monkeypatch.setattr(optuna.visualization.matplotlib, "plot_optimization_history", spy)
    written = write_report(tmp_path, ROWS, {"values": [0.8, 0.6]}, WISE, study)
    assert STUDY_PLOTS <= set(written)
    for name in STUDY_PLOTS:
        _assert_png(tmp_path / name)
    assert calls["target_name"] == "OOD val macro-F1"
    assert all(calls["target"](trial) == trial.values[1] for trial in study.trials)
    assert "values: [0.8, 0.6]" in (tmp_path / "results.md").read_text()


def test_robustness_figure_with_and_without_wise():
    fig = report._robustness_figure(ROWS, WISE, "macro-F1")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("ID test macro-F1", "OOD test macro-F1")
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [*ROWS, *WISE, "y = x"]
    notes = sorted(text.get_text() for text in ax.texts)
    assert notes == ["α=0", "α=1", "α=1"]  # the shared zero-shot end is labelled once
    lo, hi = ax.get_xlim()
    assert ax.get_ylim() == (lo, hi) and lo < 0.5034 and hi > 0.8123  # every point in view, y = x the diagonal
    plt.close(fig)

    fig = report._robustness_figure(ROWS, {}, "macro-F1")
    ax = fig.axes[0]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [*ROWS, "y = x"] and not ax.texts
    plt.close(fig)


def test_robustness_png_differs_with_wise(tmp_path):
    write_report(tmp_path / "with", ROWS, BEST, WISE, None)
    write_report(tmp_path / "without", ROWS, BEST, None, None)
    with (
        Image.open(tmp_path / "with" / "effective_robustness.png") as a,
        Image.open(tmp_path / "without" / "effective_robustness.png") as b,
    ):
        assert a.tobytes() != b.tobytes()
    assert json.loads((tmp_path / "without" / "results.json").read_text())["wise"] is None


def test_a_failing_write_leaves_no_file_under_a_final_name(tmp_path, monkeypatch):
    def half_written(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    figures = plt.get_fignums()
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, ROWS, BEST, WISE, None)
    assert not (tmp_path / "effective_robustness.png").exists()
    assert _no_temp_files(tmp_path)
    assert plt.get_fignums() == figures  # the figure was released all the same


def test_report_leaves_pyplot_style_alone(tmp_path, study):
    before = dict(plt.rcParams)
    write_report(tmp_path, ROWS, BEST, WISE, study)
    assert dict(plt.rcParams) == before  # optuna's plots switch to ggplot: must not leak


def test_report_files_get_the_usual_permissions(tmp_path):
    written = write_report(tmp_path, ROWS, BEST, None, None)
    (tmp_path / "plain.txt").write_text("reference: created with the process umask")
    usual = (tmp_path / "plain.txt").stat().st_mode
    assert {path.stat().st_mode for path in written.values()} == {usual}  # not 0600 like tempfile.mkstemp's


def test_numpy_scalars_are_saved_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    rows = {"FT": {"id": np.float32(0.8125), "ood": np.float64(0.5)}}
    write_report(tmp_path, rows, {"value": np.float64(0.5), "params": {"lr": 1e-4}}, None, None)
    assert json.loads((tmp_path / "results.json").read_text())["results"] == {"FT": {"id": 0.8125, "ood": 0.5}}
    assert "| FT | 0.812 | 0.500 |" in (tmp_path / "results.md").read_text()
