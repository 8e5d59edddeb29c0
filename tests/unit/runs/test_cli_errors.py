"""Which exceptions end a script with the message alone: refusals (also when Hydra's instantiate wrapped them,
naming the target), never bugs."""
from __future__ import annotations

import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from medtrust.data.records import DataError
from medtrust.runs.cli import _kind, user_error


def _wrapped(cause: BaseException) -> InstantiationException:
    try:
        try:
            raise cause
        except Exception as err:
            raise InstantiationException("Error in call to target 'medtrust.data.datamodule.ImageDataModule':\n"
                                         f"{cause!r}") from err
    except InstantiationException as exc:
        return exc


def test_refusals_are_user_errors_also_inside_instantiate():
    err = DataError("manifest.csv row 3: empty path")
    assert user_error(err) == (err, "")
    cause, where = user_error(_wrapped(ValueError("data.normalize needs 1 value")))
    assert str(cause) == "data.normalize needs 1 value" and where == " (building medtrust.data.datamodule.ImageDataModule)"


@pytest.mark.parametrize("bug", [TypeError("x"), RuntimeError("y"), KeyError("z")])
def test_bugs_are_not(bug):
    assert user_error(bug) is None
    assert user_error(_wrapped(bug)) is None


def test_kinds_of_config_values():
    assert [_kind(v) for v in (True, 3, 0.5, [1], OmegaConf.create([1]), {"a": 1}, OmegaConf.create({"a": 1}),
                               "auto", None)] == ["bool", "number", "number", "list", "list", "dict", "dict", None, None]
