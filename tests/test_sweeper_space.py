"""The sweeper's search-space syntax: what each sweep override means (the released hydra-optuna-sweeper's meanings,
from its documentation and test suite), how values reach jobs, and what a sampler or pruner config builds."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.autoft_optuna_sweeper import config
from hydra_plugins.autoft_optuna_sweeper._outcome import objective_values
from hydra_plugins.autoft_optuna_sweeper._search_space import _parser, contains, format_value, grid, parse_search_space
from hydra_plugins.autoft_optuna_sweeper.config import build

pytestmark = pytest.mark.filterwarnings("ignore:The distribution is specified by")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("x=choice(1,2)", CategoricalDistribution([1, 2])),
        ("x=choice(true, false)", CategoricalDistribution([True, False])),
        ("x=choice('hello', 'world')", CategoricalDistribution(["hello", "world"])),
        ("x=choice(adam,sgd,3,'1')", CategoricalDistribution(["adam", "sgd", 3, "1"])),
        ("x=adam,sgd", CategoricalDistribution(["adam", "sgd"])),
        # range: the stop is included (Hydra's basic sweeper stops before it; the released Optuna sweeper does not)
        ("x=range(1,3)", IntDistribution(1, 3)),
        ("x=range(1,10,2)", IntDistribution(1, 9, step=2)),  # Optuna trims the end to the last step
        ("x=range(0.5, 5.5, step=1)", FloatDistribution(0.5, 5.5, step=1)),
        ("x=range(-5.5, 5.5, step=0.5)", FloatDistribution(-5.5, 5.5, step=0.5)),
        # shuffle: categorical over the iterated values (range's stop excluded there), in written order
        ("x=shuffle(range(1,3))", CategoricalDistribution([1, 2])),
        ("x=shuffle(choice(b,a,c))", CategoricalDistribution(["b", "a", "c"])),
        ("x=interval(1, 5)", FloatDistribution(1, 5)),
        ("x=interval(1, 1)", FloatDistribution(1, 1)),  # one value, as Optuna allows
        ("x=int(interval(1, 5))", IntDistribution(1, 5)),
        ("x=tag(log, interval(1, 5))", FloatDistribution(1, 5, log=True)),
        ("x=tag(log, int(interval(1, 5)))", IntDistribution(1, 5, log=True)),
    ],
)
def test_each_form_parses_to_its_distribution(line, expected):
    assert parse_search_space([line]).distributions == {"x": expected}


def test_names_keep_their_prefix_fixed_values_and_deletes_pass_through_and_later_lines_win():
    space = parse_search_space(["x=interval(0,1)", "lr=0.1", "+model.w=interval(0,2)", "++v=choice(1,2)", "~drop",
                                "~z=10", "x=3"])
    assert space.distributions == {"+model.w": FloatDistribution(0.0, 2.0), "++v": CategoricalDistribution([1, 2])}
    assert space.fixed == ["x=3", "lr=0.1", "~drop", "~z=10"]


@pytest.mark.parametrize(
    "line",
    [
        "x=interval(1,0)",
        "x=tag(log,interval(0,1))",
        "x=tag(log,int(interval(0,5)))",
        "x=range(5,1)",
        "x=range(1,5,0)",
        "x=choice()",
        "x=choice([1,2],[3])",
        "x=tag(lg,interval(0,1))",  # the released plugin ignores unknown tags; a mistyped log must not pass
        "x=tag(log,choice(1,2))",
        "x=tag(log,range(1,5))",
        "x=glob(*)",
        "x=interval(0",
    ],
)
def test_invalid_space_is_a_one_line_value_error_naming_the_param(line):
    with pytest.raises(ValueError, match="'x'") as info:
        parse_search_space(["y=interval(0,1)", line])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0.1 + 0.2, 1e-300, -3, 7, True, None, "1", "null", "a,b", "it's", "x y",
                                   "sqlite:////t/o.db"])
def test_values_reach_jobs_unchanged(value):
    parsed = _parser().parse_override(f"k={format_value(value)}").value()
    assert type(parsed) is type(value) and parsed == value


@pytest.mark.parametrize(
    ("distribution", "inside", "outside"),
    [(FloatDistribution(0, 1, step=0.25), [0.5, 1], [0.3, 1.25, "a", True]),
     (IntDistribution(1, 9, step=2), [3, 9], [2, 10, 3.5]),
     (CategoricalDistribution(["a", 1]), ["a", 1], ["b", 2])],
)
def test_contains_follows_optuna(distribution, inside, outside):
    assert all(contains(distribution, v) for v in inside)
    assert not any(contains(distribution, v) for v in outside)


def test_grid_walks_every_value_both_ends_included():
    assert grid(FloatDistribution(-1.0, 1.0, step=1.0)) == [-1.0, 0.0, 1.0]
    assert grid(IntDistribution(1, 9, step=2)) == [1, 3, 5, 7, 9]
    assert grid(CategoricalDistribution(["foo", "bar"])) == ["foo", "bar"]
    with pytest.raises(ValueError, match="discrete"):
        grid(FloatDistribution(0, 1))


@pytest.mark.parametrize(
    ("result", "n", "ok"),
    [(1, 1, True), (float("nan"), 1, False), (float("inf"), 1, False), ("x", 1, False), ([1.0, 2.0], 2, True),
     ([1.0], 2, False), ([1.0, float("nan")], 2, False), (None, 1, False)],
)
def test_only_finite_values_of_the_right_shape_complete(result, n, ok):
    values, error = objective_values(result, n)
    assert (values is not None, error is None) == (ok, ok)


def test_sampler_and_pruner_configs_pass_their_arguments_and_leave_nulls_to_optuna():
    sampler = build(config.target_node("optuna.samplers.TPESampler") | {"seed": 3, "n_startup_trials": 4}, "s")
    same = optuna.samplers.TPESampler(seed=3)
    assert sampler._n_startup_trials == 4 and sampler._rng.rng.randint(10**9) == same._rng.rng.randint(10**9)
    assert sampler._n_ei_candidates == 24  # null: Optuna's default
    pruner = build(config.target_node("optuna.pruners.MedianPruner") | {"n_warmup_steps": 7}, "p")
    assert pruner._n_warmup_steps == 7 and pruner._n_startup_trials == 5


@pytest.mark.parametrize(
    ("node", "message"),
    [({"_target_": "optuna.samplers.TPESampler", "n_startup_trails": 1}, "hydra.sweeper.sampler: TypeError: "),
     (config.target_node("optuna.pruners.PercentilePruner"), "hydra.sweeper.sampler.percentile must be set"),
     ({"_target_": "optuna.samplers.NoSuchSampler"}, "hydra.sweeper.sampler: ")],
)
def test_bad_sampler_config_is_one_line(node, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")) as info:
        build(OmegaConf.create(node), "hydra.sweeper.sampler")
    assert "\n" not in str(info.value)


def test_a_sampler_whose_package_is_missing_is_refused_before_it_runs(monkeypatch):
    monkeypatch.setitem(config.NEEDS, optuna.samplers.CmaEsSampler, ("cmaes", "no_such_package_here"))
    with pytest.raises(ValueError, match="CmaEsSampler needs no_such_package_here: pip install no_such_package_here"):
        build({"_target_": "optuna.samplers.CmaEsSampler"}, "hydra.sweeper.sampler")
