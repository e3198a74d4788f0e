"""dnet-fast benchmarks: a timing harness, registered benchmark classes (``bench_*.py``) and a runner.

A new benchmark is a module ``benchmarks/bench_<name>.py`` that subclasses ``benchmarks.harness.Benchmark`` and
registers it with ``@BENCHMARKS.register("<name>")``; the runner imports every such module. Run them with
``python -m benchmarks [--quick] [--cpu|--gpu] [--only NAME] [--out DIR]``.
"""

from __future__ import annotations

__all__: list[str] = []
