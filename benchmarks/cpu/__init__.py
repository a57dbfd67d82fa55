"""Profiling tools for jaxmetric's training step on a CPU (XLA:CPU).

Each module is a command run from the repository root, ``python -m benchmarks.cpu.NAME``;
their result files go to ``benchmarks/results/`` as before:

* :mod:`benchmarks.cpu.step_parts` -- where a CPU training step's time goes, jaxmetric
  next to PyTorch + pytorch-metric-learning, part by part;
* :mod:`benchmarks.cpu.op_profile` -- the network's forward + backward pass under
  XLA:CPU, summed by HLO instruction kind;
* :mod:`benchmarks.cpu.xla_cpu_settings` -- the step under other XLA:CPU settings and
  JAX versions, side by side;
* :mod:`benchmarks.cpu.device_sync` -- what the cross-device synchronisation of the
  data-parallel step costs on a CPU split into several devices;
* :mod:`benchmarks.cpu.conv_chunks` -- one convolution in one piece and on batch chunks.

What they share with the other benchmarks comes from :mod:`benchmarks.common`.
"""
