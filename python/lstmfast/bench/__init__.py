"""``python -m lstmfast.bench``: lstmfast against the NumPy reference and torch.

The benchmark's modes, one module each:

* ``grid`` (the default): lstmfast's fused kernels against the NumPy reference and
  torch over the cells, shapes, modes and thread counts of docs/performance.md, in
  one process, with the GEMM ceiling beside each figure; runs without torch;
* ``models`` (``--models``): whole torch models, torch against ``accelerate(model)``,
  one fresh process per measurement (the models themselves are in ``model_zoo``);
* ``peers`` (``--peers``): inference against torch and ONNX Runtime in float32, int8
  and bfloat16;
* ``variants`` (``--variants``): the cells torch.nn lacks against the torch loops users
  run today (``lstmfast.oracles``);
* ``patterns`` (``--patterns``): the call patterns users meet (idle gaps, pools that ran
  before, a cell stepped per token, the adapter's training step, also of a layer fed a
  frame per call), in process pairs;
* ``contention``: a command of its own, ``python -m lstmfast.bench.contention``:
  lstmfast beside torch's threads and other busy processes.

``cli`` parses the command line and imports the mode it runs; every mode builds on
``common`` (shapes, machine description, cases, interleaved timing, formatting) and
none imports ``cli`` or another mode, so the package has no import cycle. ``models``,
``variants`` and ``patterns`` need torch; the grid, ``peers``, ``contention`` and the
command line itself run without it (they import torch only where it is there and wanted).
"""

from lstmfast.bench.cli import main

__all__ = ["main"]
