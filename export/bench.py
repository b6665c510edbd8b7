"""Moved: the per-stage latency benchmark (torch against ONNX Runtime) is :mod:`diffrt.bench.stages`; the
export layer may not import the benchmarks above it. Importing this module says so."""

raise ImportError("diffrt.export.bench moved to diffrt.bench.stages (stage_inputs, stage_latency, format_table)")
