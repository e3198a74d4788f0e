"""The checked-in ``_C.pyi`` and the NumPy twin agree with the live extension (names, parameters, defaults)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import dnet_fast
from dnet_fast import _reference as ref
from dnet_fast import sampling

_C = sampling._C
STUB = Path(dnet_fast.__file__).with_name("_C.pyi")


def stub_signatures() -> dict[str, list[tuple[str, str | None]]]:
    """'name' or 'Class.method' -> [(parameter, default source or None)], without self."""
    out = {}

    def params(fn: ast.FunctionDef) -> list[tuple[str, str | None]]:
        args = fn.args.args
        defaults = [None] * (len(args) - len(fn.args.defaults)) + [ast.unparse(d) for d in fn.args.defaults]
        return [(a.arg, d) for a, d in zip(args, defaults, strict=True) if a.arg != "self"]

    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            out[node.name] = []
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = params(item)
    return out


def live_signature(obj: object, name: str) -> list[tuple[str, str | None]]:
    """Parameters from pybind11's generated first docstring line, e.g. 'f(a: object, b: object = 0) -> tuple'."""
    first = obj.__doc__.splitlines()[0]
    inner = re.fullmatch(rf"{re.escape(name)}\((.*)\)( -> .*)?", first)
    assert inner, first
    result = []
    for part in filter(None, (p.strip() for p in inner.group(1).split(","))):
        pname, _, rest = part.partition(":")
        default = rest.split("=", 1)[1].strip() if "=" in rest else None
        if pname != "self":
            result.append((pname, default))
    return result


STUBS = stub_signatures()


def test_stub_names_equal_live_names():
    live = {n for n in dir(_C) if not n.startswith("_")}
    live |= {f"MetaSampler.{n}" for n in vars(_C.MetaSampler) if not n.startswith("_")} | {
        "MetaSampler.__init__"
    }
    assert set(STUBS) == live


@pytest.mark.parametrize("name", sorted(n for n in STUBS if n != "MetaSampler"))
def test_stub_parameters_equal_live(name):
    owner, _, attr = name.rpartition(".")
    obj = getattr(_C.MetaSampler, attr) if owner else getattr(_C, name)
    assert live_signature(obj, attr) == STUBS[name]


@pytest.mark.parametrize("name", sorted(n for n in STUBS if n != "MetaSampler"))
def test_twin_has_the_same_signature(name):
    owner, _, attr = name.rpartition(".")
    obj = getattr(ref.MetaSampler, attr) if owner else getattr(ref, name)
    params = [
        (p.name, None if p.default is inspect.Parameter.empty else repr(p.default))
        for p in inspect.signature(obj).parameters.values()
        if p.name != "self"
    ]
    assert params == STUBS[name]
