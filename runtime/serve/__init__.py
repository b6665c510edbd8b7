"""Serving and batch generation on Ray (``pip install 'diffrt[serve]'``).

- :mod:`diffrt.serve.protocol`: the HTTP API's requests and answers, and how jobs are grouped (no Ray).
- :mod:`diffrt.serve.metrics`: the Prometheus metrics of one gateway.
- :mod:`diffrt.serve.app`: the Ray Serve application behind ``diffrt serve``.
- :mod:`diffrt.serve.batch`: ``diffrt batch``, resumable offline generation on Ray Data.

Nothing here is imported by ``import diffrt``: Ray loads only when a command needs it.
"""
