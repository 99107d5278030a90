"""Settings: every kind of bad setting fails before any work with the key, the value and what is
allowed; good settings load; overrides are validated like the file; the CLI exits 2 cleanly."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnn_pipeline import cli
from cnn_pipeline.commands import Command
from components.core.params import (
    Params,
    ParamsError,
    UserError,
    flatten,
    load_params,
    sections,
)

PROJECT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: list[str] = ()) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(write(tmp_path, text), list(overrides))
    return str(info.value)


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} missing from the message:\n{message}"


# The bad settings, one kind per case: (yaml text, overrides, what the message must name).
BAD = {
    "unknown section": (
        "trian:\n  epochs: 5\n", [],
        ["trian", "unknown", "paths", "data", "train", "register"],
    ),
    "unknown key": (
        "train:\n  epohcs: 5\n", [],
        ["train.epohcs", "unknown", "epochs", "batch_size", "lr"],
    ),
    "wrong type": (
        "train:\n  epochs: ten\n", [],
        ["train.epochs", '"ten"', "integer"],
    ),
    "float where an integer is needed": (
        "train:\n  batch_size: 12.5\n", [],
        ["train.batch_size", "12.5", "integer"],
    ),
    "out of range": (
        "train:\n  epochs: 0\n", [],
        ["train.epochs", "0", "greater than or equal to 1"],
    ),
    "out of range above": (
        "data:\n  val_fraction: 1.5\n", [],
        ["data.val_fraction", "1.5", "less than 1"],
    ),
    "bad choice": (
        "data:\n  resize: squash\n", [],
        ["data.resize", '"squash"', "'crop'", "'pad'", "'stretch'"],
    ),
    "bad source": (
        "data:\n  source: imagenet\n", [],
        ["data.source", '"imagenet"', "'digits'", "'mnist'", "'imagefolder'"],
    ),
    "bad channels": (
        "data:\n  channels: 2\n", [],
        ["data.channels", "2", "1", "3"],
    ),
    "not a boolean": (
        "data:\n  download: perhaps\n", [],
        ["data.download", '"perhaps"', "bool"],
    ),
    "fractions leave no train": (
        "data:\n  val_fraction: 0.5\n  test_fraction: 0.5\n", [],
        ["val_fraction", "test_fraction", "1", "below 1"],
    ),
    "imagefolder without image_size": (
        "data:\n  source: imagefolder\n", [],
        ["image_size", "imagefolder", "data.image_size"],
    ),
    "section is not a mapping": (
        "train: 5\n", [],
        ["train", "5", "dictionary"],
    ),
    "negative drift threshold": (
        "predict:\n  drift_channel_mean: -0.5\n", [],
        ["predict.drift_channel_mean", "-0.5", "greater than or equal to 0"],
    ),
    "drift threshold not a number": (
        "", ["predict.drift_confidence_drop=.nan"],
        ["predict.drift_confidence_drop", "NaN", "finite number"],
    ),
    "class weight of a class not a number": (
        "train:\n  class_weights: {3: lots}\n", [],
        ["train.class_weights.3", '"lots"', "number", "'none' or 'balanced'"],
    ),
    "balanced twice": (
        "train:\n  class_weights: balanced\n  sampler: balanced\n", [],
        ["train.class_weights: none", "train.sampler: none", "both balanced"],
    ),
    "bad name pattern": (
        "register:\n  model_name: 'my model!'\n", [],
        ["register.model_name", "my model!", "pattern"],
    ),
    "--set with a bad value": (
        "train:\n  epochs: 5\n", ["train.epochs=abc"],
        ["train.epochs", '"abc"', "integer"],
    ),
    "--set out of range": (
        "", ["train.lr=0"],
        ["train.lr", "0", "greater than 0"],
    ),
    "--set of an unknown key": (
        "", ["data.sorce=mnist"],
        ["data.sorce", "unknown", "source"],
    ),
    "--set without '='": (
        "", ["train.epochs"],
        ["train.epochs", "section.key=value"],
    ),
    "--set without a section": (
        "", ["epochs=5"],
        ["epochs=5", "section.key=value"],
    ),
    "--set below a value": (
        "train:\n  epochs: 5\n", ["train.epochs.max=3"],
        ["train.epochs.max=3", "epochs", "not a section"],
    ),
    "malformed YAML": (
        "train:\n  epochs: [5\n", [],
        ["params.yaml", "not valid YAML"],
    ),
    "YAML that is not a mapping": (
        "- train\n- data\n", [],
        ["params.yaml", "mapping", "list"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_settings_name_key_value_and_what_is_allowed(tmp_path, case):
    text, overrides, parts = BAD[case]
    assert_names(error_of(tmp_path, text, overrides), *parts)


def test_there_are_at_least_ten_kinds_of_bad_settings():
    assert len(BAD) + 1 >= 10  # +1: the missing file below


def test_missing_params_file(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ParamsError) as info:
        load_params(missing)
    assert_names(str(info.value), str(missing), "not found", "--params")


def test_every_problem_is_reported_at_once(tmp_path):
    message = error_of(tmp_path, "train:\n  epochs: 0\n  lr: -1\ndata:\n  resize: squash\n")
    assert_names(message, "train.epochs", "train.lr", "data.resize")


def test_param_errors_are_user_errors():
    assert issubclass(ParamsError, UserError)


def test_project_params_yaml_loads_and_names_every_setting():
    assert isinstance(load_params(PROJECT / "params.yaml"), Params)
    # Every knob is written out (with its comment) in params.yaml: none hides in the code.
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for section, model in Params.model_fields.items():
        assert set(raw.get(section) or {}) == set(model.annotation.model_fields), section


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == Params()


def test_good_values_load(tmp_path):
    params = load_params(write(tmp_path, (
        "data:\n  source: imagefolder\n  image_size: 64\n  channels: 1\n  resize: pad\n"
        "train:\n  epochs: 3\n  lr: 0.1\n"
    )))
    assert params.data.source == "imagefolder"
    assert (params.data.image_size, params.data.channels, params.data.resize) == (64, 1, "pad")
    assert (params.train.epochs, params.train.lr) == (3, 0.1)
    assert params.train.batch_size == Params().train.batch_size  # untouched keys keep defaults


def test_overrides_win_over_the_file_and_are_typed(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 5\ndata:\n  seed: 1\n")
    params = load_params(path, ["train.epochs=7", "data.resplit=true", "data.root=/some where",
                                "data.image_size=null", "augment.preset=randaugment"])
    assert params.train.epochs == 7
    assert params.data.seed == 1
    assert params.data.resplit is True
    assert str(params.data.root) == "/some where"
    assert params.data.image_size is None
    assert params.augment.preset == "randaugment"


def test_overrides_can_add_a_section_missing_from_the_file(tmp_path):
    params = load_params(write(tmp_path, "data:\n  seed: 2\n"), ["evaluate.mistakes=4"])
    assert params.evaluate.mistakes == 4


def test_overrides_are_validated_like_the_file(tmp_path):
    from_file = error_of(tmp_path, "train:\n  epochs: 0\n")
    from_set = error_of(tmp_path, "", ["train.epochs=0"])
    assert from_file.splitlines()[1:] == from_set.splitlines()[1:]


def test_cross_field_check_sees_overrides(tmp_path):
    # The file alone is valid; the override makes the sum reach 1.
    path = write(tmp_path, "data:\n  val_fraction: 0.3\n")
    load_params(path)
    with pytest.raises(ParamsError, match="val_fraction"):
        load_params(path, ["data.test_fraction=0.7"])


def test_params_are_frozen():
    params = Params()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is an implementation detail
        params.train.epochs = 3


def test_flatten_gives_section_dot_key_pairs():
    flat = flatten(Params())
    assert flat["train.epochs"] == Params().train.epochs
    assert flat["data.source"] == "digits"
    assert flat["paths.prepared"] == "data/prepared"  # JSON-ready: paths as strings
    sections = set(Params.model_fields)
    for key in flat:
        section, _, name = key.partition(".")
        assert section in sections and name and "." not in name
    expected = sum(len(type(getattr(Params(), s)).model_fields) for s in sections)
    assert len(flat) == expected


def _step(params: Params) -> dict:
    """A stand-in step for the command line: returns what it was given."""
    if params.train.epochs == 13:
        raise UserError("unlucky: pick another number of epochs")
    return {"epochs": params.train.epochs}


STAND_IN = {"stand-in": Command(f"{__name__}:_step", "a stand-in step", step=True)}


def test_run_step_prints_the_result(tmp_path, capsys):
    cli.main(["stand-in", "--params", str(write(tmp_path, "")), "--set", "train.epochs=4"],
             STAND_IN)
    assert '"epochs": 4' in capsys.readouterr().out


@pytest.mark.parametrize("argv_tail", [
    ["--set", "train.epochs=0"],
    ["--set", "train.epochs"],
    ["--set", "train.epochs=13"],  # a UserError raised by the step itself
])
def test_run_step_exits_2_with_error_line(tmp_path, capsys, argv_tail):
    with pytest.raises(SystemExit) as info:
        cli.main(["stand-in", "--params", str(write(tmp_path, "")), *argv_tail], STAND_IN)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("args, names", [
    (["--set", "data.resize=squash"], ["data.resize", "squash", "crop"]),
    (["--params", "no/such/params.yaml"], ["no/such/params.yaml", "not found"]),
])
def test_cli_exits_2_with_error_and_no_traceback(tmp_path, args, names):
    (tmp_path / "params.yaml").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "cnn_pipeline", "prepare", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert_names(proc.stderr, *names)
    assert not (tmp_path / "data").exists()  # failed before any work


# --- one command line: the same parser and messages in every entry point -----------------------


def _entry_points():
    from cnn_pipeline.cli import main

    steps = [functools.partial(lambda step, argv: main([step, *argv]), step)
             for step in ("prepare", "augment", "train", "evaluate", "register", "pipeline")]
    return [*steps, lambda argv: main(["predict", *argv, "--folder", "x"])]


@pytest.mark.parametrize("override", ["train.optimizer=adam", "train.epochs", "trian.epochs=3",
                                      "train.lr='{a.b: [1'"])
def test_every_entry_point_refuses_an_override_with_the_same_message(tmp_path, capsys,
                                                                     override):
    path = write(tmp_path, "")
    messages = set()
    for main in _entry_points():
        with pytest.raises(SystemExit) as info:
            main(["--params", str(path), "--set", override])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        messages.add(err)
    assert len(messages) == 1, messages


def test_null_and_whole_values_mean_the_same_on_the_command_line_and_in_a_flow(tmp_path):
    from flows.parameters import resolve

    path = write(tmp_path, "model:\n  checkpoint: old/weights.pt\ndata:\n  image_size: 16\n")
    given = ["model.checkpoint=null", "data.image_size=null",
             "augment.resized_crop_scale=[0.5, 0.9]"]
    by_cli = load_params(path, given)
    assert by_cli.model.checkpoint is None and by_cli.data.image_size is None
    assert by_cli.augment.resized_crop_scale == (0.5, 0.9)
    assert resolve(path, given) == by_cli
    # A mapping is one value: its own keys keep their dots.
    with pytest.raises(ParamsError, match=r"train.lr = \{\"a.b\": 1\}"):
        load_params(path, ["train.lr={a.b: 1}"])


def test_the_flows_take_one_parameter_per_settings_section():
    from flows.batch_predict import batch_predict
    from flows.pipeline import training_pipeline
    from flows.search.sweep import sweep

    for flow in (training_pipeline, batch_predict, sweep):
        schema = flow.parameters.model_dump()["properties"]
        assert set(sections()) <= set(schema), flow.name
        assert "overrides" in schema
    validated = training_pipeline.validate_parameters({"train": {"epochs": 2},
                                                       "overrides": ["model.checkpoint=null"]})
    assert validated["train"].epochs == 2 and validated["overrides"] == ["model.checkpoint=null"]


def test_a_whole_section_as_one_mapping_replaces_the_files_section(tmp_path):
    """How the Kubeflow pipeline passes a section parameter: `--set train={...}`."""
    path = write(tmp_path, "train:\n  epochs: 7\n  lr: 0.01\n")
    whole = load_params(path, ['train={"epochs": 3.0, "batch_size": 32}'])  # JSON is YAML
    assert (whole.train.epochs, whole.train.batch_size) == (3, 32)
    assert whole.train.lr == Params().train.lr  # left out: the default, not the file's 0.01
    by_section, by_key = (error_of(tmp_path, "", [o]) for o in ("train={epochs: 0}",
                                                                "train.epochs=0"))
    assert by_section.splitlines()[1:] == by_key.splitlines()[1:]  # the same line per problem
    assert_names(by_section, "train.epochs = 0")
    assert_names(error_of(tmp_path, "", ["train=5"]), "train=5", "section.key=value",
                 "section={key: value")


# --- hostile settings: refused, never a hang or a traceback ------------------------------------

LAUGHS = "lol: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"l{i}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9))


@pytest.mark.parametrize(("text", "overrides", "names"), [
    (LAUGHS, [], ["params.yaml", "aliases", "100000"]),  # 10**10 values once expanded
    ("", [f"search.space={{{LAUGHS.replace(chr(10), ', ')}}}"], ["--set search.space", "aliases"]),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", [], ["params.yaml", "nested"]),
    ("train: &t {epochs: [*t]}\n", [], ["params.yaml", "alias"]),
    ("train:\n  seed: " + "9" * 5000 + "\n", [], ["params.yaml", "4300 digits"]),
    ("", ["train.seed=" + "9" * 5000], ["--set train.seed", "4300 digits"]),
])
def test_hostile_yaml_is_refused_by_the_one_reader(tmp_path, text, overrides, names):
    """A billion laughs, YAML nested thousands deep, an alias inside itself, a number Python
    will not read: each is a ParamsError naming where, in params.yaml and in --set alike."""
    assert_names(error_of(tmp_path, text, overrides), *names)


def test_a_billion_laughs_ends_the_command_with_an_error(tmp_path):
    """The real command line, in a process of its own: it ends (exit 2) instead of expanding
    10**10 values (which ran for minutes). The timeout only stops a hang; it times nothing."""
    write(tmp_path, LAUGHS)
    proc = subprocess.run([sys.executable, "-m", "cnn_pipeline", "prepare"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: params.yaml"), proc.stderr
    assert "aliases" in proc.stderr and "Traceback" not in proc.stderr


def test_a_settings_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "params.yaml").write_bytes("train:\n  epochs: 3  # café\n".encode("latin-1"))
    proc = subprocess.run([sys.executable, "-m", "cnn_pipeline", "prepare"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert_names(proc.stderr, "error: params.yaml", "UTF-8")


def test_yaml_anchors_within_bounds_still_load(tmp_path):
    text = "train: {batch_size: &n 128}\nevaluate: {batch_size: *n}\n"
    params = load_params(write(tmp_path, text))
    assert params.train.batch_size == params.evaluate.batch_size == 128


SEEDS = ["data.seed", "train.seed", "search.seed"]


@pytest.mark.parametrize("key", SEEDS)
@pytest.mark.parametrize(("value", "allowed"), [
    (2**32, "4294967295"), (2**64, "4294967295"), (10**30, "4294967295"), (-1, "0")])
def test_a_seed_out_of_the_libraries_range_is_refused(tmp_path, key, value, allowed):
    assert_names(error_of(tmp_path, "", [f"{key}={value}"]), key, str(value), allowed)


def test_the_largest_seed_is_one_numpy_torch_and_optuna_accept():
    """The bound is the libraries' own: 2**32 - 1 seeds each, 2**32 is what numpy refuses."""
    import numpy as np
    import optuna

    from components.training import setup
    from flows.search.study import make_sampler

    top = load_params(overrides=[f"{k}={2**32 - 1}" for k in SEEDS])
    setup.seed(top.train.seed)
    np.random.default_rng(top.data.seed)
    for sampler in ("tpe", "random"):
        search = {"sampler": sampler, "startup_trials": 1, "seed": top.search.seed}
        assert isinstance(make_sampler(search, worker=0, trials=0), optuna.samplers.BaseSampler)
    with pytest.raises(ValueError):
        np.random.seed(2**32)
