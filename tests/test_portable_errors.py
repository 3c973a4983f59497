"""Every error of the adapter store and the orchestrator crosses a Ray task boundary intact: it
pickles to the same class, message and fields, and ray_layer hands the caller the error the
task raised, never Ray's traceback-carrying wrapper."""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import pkgutil
import shutil
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

import adapters_store
import orchestrator
from adapters_store.errors import PortableError, StoreError
from orchestrator.errors import OrchestratorError, Unavailable


def _import_all(package: object) -> None:
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):  # type: ignore[attr-defined]
        importlib.import_module(info.name)


def _tree() -> list[type[Exception]]:
    _import_all(adapters_store)
    _import_all(orchestrator)
    found: set[type[Exception]] = set()
    todo: list[type[Exception]] = [StoreError, OrchestratorError]
    while todo:
        cls = todo.pop()
        if cls.__module__.split(".")[0] in ("adapters_store", "orchestrator"):
            found.add(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


ERRORS = _tree()


def sample(cls: type[Exception]) -> Exception:
    """An instance with a distinct value for every constructor parameter."""
    hints = typing.get_type_hints(cls.__init__)
    args: list[object] = []
    for i, (name, param) in enumerate(list(inspect.signature(cls.__init__).parameters.items())[1:]):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            args.append(f"message {i} of {cls.__name__}")
        elif hints.get(name) is int:
            args.append(400 + i)
        elif name == "reason":
            args.append("sha256_mismatch")
        else:
            args.append(f"{name} {i} of {cls.__name__}")
    return cls(*args)


def _same(a: Exception, b: Exception) -> None:
    assert type(b) is type(a)
    assert b.args == a.args and str(b) == str(a)
    assert vars(b) == vars(a)


def test_the_trees_are_covered() -> None:
    names = {cls.__name__ for cls in ERRORS}
    assert {"IntegrityError", "TransferError", "InvalidKey", "StoreUnavailable", "InvalidArgument"} <= names
    assert all(issubclass(cls, PortableError) for cls in ERRORS)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_pickles_to_the_same_class_and_fields(cls: type[Exception]) -> None:
    import ray.cloudpickle

    original = sample(cls)
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        _same(original, loads(dumps(original)))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    from orchestrator.ray_layer import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="plray-"))  # short: Ray's socket paths must fit 107 bytes
    init_ray(num_cpus=1, tmp_root=tmp)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _raise(index: int) -> None:
    if index < 0:
        os._exit(1)  # the worker dies: the task never answers
    if index == len(ERRORS):
        raise ValueError("a bug in /srv/pocketlora/orchestrator/lifecycle.py")
    raise sample(ERRORS[index])


@pytest.mark.slow
def test_ray_task_errors_reach_the_caller_as_raised(ray_cluster: None) -> None:
    import ray

    from orchestrator.ray_layer import unwrap_ray_errors

    task = ray.remote(num_cpus=0, max_retries=0)(_raise)
    for index, cls in enumerate(ERRORS):
        with pytest.raises(cls) as got:
            unwrap_ray_errors(lambda i=index: ray.get(task.remote(i)), "test")  # type: ignore[misc]
        assert not isinstance(got.value, ray.exceptions.RayError)
        _same(sample(cls), got.value)
        assert "Traceback" not in str(got.value) and "\x1b[" not in str(got.value)
    with pytest.raises(ValueError, match="a bug") as bug:
        unwrap_ray_errors(lambda: ray.get(task.remote(len(ERRORS))), "test")
    assert type(bug.value) is ValueError  # a bug stays a bug (answered INTERNAL, logged in full)
    with pytest.raises(Unavailable, match="could not run"):
        unwrap_ray_errors(lambda: ray.get(task.remote(-1)), "test")
