"""dnet-fast benchmarks: a timing harness, registered benchmark classes (``bench_*.py``) and a runner.

A new benchmark is a module ``benchmarks/bench_<name>.py`` that subclasses ``benchmarks.harness.Benchmark`` and
registers it with ``@BENCHMARKS.register("<name>")``; the runner imports every such module. Run them with
``python -m benchmarks [--quick] [--cpu|--gpu] [--only NAME] [--out DIR]``.
"""

from __future__ import annotations

from benchmarks.installed import prefer_installed_dnet_fast

__all__: list[str] = []

# Before any benchmark imports dnet_fast: a wheel user's clone must not shadow the installed build (installed.py).
prefer_installed_dnet_fast()
