"""cli.py: --key=value flags into each script's dataclass, types checked, errors that list the keys,
--help from the dataclasses' comments for every script."""
import dataclasses

import pytest

import train


def test_cli_overrides_are_typed_and_checked():
    config = train.parse_args(["--lr=0.5", "--max_steps=7", "--resume=true", "--out_dir=x"])
    assert (config.lr, config.max_steps, config.resume, config.out_dir) == (0.5, 7, True, "x")
    assert train.parse_args(["--preset=smoke", "--max_steps=3"]).max_steps == 3       # command line wins
    assert train.parse_args(["--max_steps=3", "--preset=smoke"]).max_steps == 3       # in either order
    assert train.parse_args(["--preset=smoke"]).num_train == train.PRESETS["smoke"]["num_train"]


def test_help_lists_every_config_key_with_its_type_default_and_comment(capsys):
    import evaluate
    with pytest.raises(SystemExit) as stop:
        train.main(["--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    for field in dataclasses.fields(train.Config):
        assert f"--{field.name}={field.default!r}" in printed, field.name
    assert f"--lr={train.Config.lr!r}" in printed and "float  peak learning rate" in printed   # type and comment
    assert "\n ViCuR: the student's sink-token cue recovery module" in printed          # the dataclass's groups
    assert all(f"  {name}: " in printed for name in train.PRESETS)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["-h"])
    printed = capsys.readouterr().out
    assert stop.value.code == 0 and all(f"--{f.name}=" in printed for f in dataclasses.fields(evaluate.EvalConfig))
    import cues
    import data
    import tables
    for script, config_class in ((data, data.WorldConfig), (tables, tables.TablesConfig), (cues, cues.CueConfig)):
        # one parser for all
        with pytest.raises(SystemExit) as stop:
            script.main(["--help"])
        printed = capsys.readouterr().out
        assert stop.value.code == 0 and all(f"--{f.name}=" in printed for f in dataclasses.fields(config_class))


@pytest.mark.parametrize("argv, message", [
    (["--lr=fast"], "--lr expects a float, got 'fast'"),
    (["--max_steps=1.5"], "--max_steps expects a int"),
    (["--resume=maybe"], "--resume expects a bool"),
    (["--learning_rate=1"], "unknown config key 'learning_rate'; known keys: "),
    (["--preset=huge"], "unknown preset 'huge'"),
    (["max_steps=3"], "expected --key=value"),
])
def test_cli_errors_speak_to_the_user(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        train.parse_args(argv)
    assert message in str(error.value)
    if "unknown config key" in message:
        assert "max_steps" in str(error.value) and "batch_size" in str(error.value)
