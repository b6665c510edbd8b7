"""``diffrt bench serve``'s pieces that need no server: URLs, bounds, statistics and the bisection's bookkeeping
(the scenarios against a real server run in tests/serve/test_server.py)."""

import argparse

import pytest

from diffrt.bench import serve


def args(**given):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in given.items()])


def test_only_loopback_endpoints_are_loaded():
    assert serve.endpoint("http://127.0.0.1:8000/") == ("127.0.0.1", 8000, "/v1/images/generations")
    assert serve.endpoint("http://localhost:9000/b8") == ("localhost", 9000, "/b8/v1/images/generations")
    for url in ("http://10.0.0.5:8000/", "https://127.0.0.1/", "ftp://localhost/"):
        with pytest.raises(ValueError, match="servers on this machine only"):
            serve.endpoint(url)


@pytest.mark.parametrize(("given", "words"), [
    ({"count": 0}, "--count must be >= 1"), ({"count": serve.MAX_COUNT + 1}, "at most"),
    ({"concurrency": 0}, "--concurrency must be >= 1"), ({"rate": 0}, "--rate must be > 0"),
    ({"p99_bound": 0}, "--p99-bound must be > 0"), ({"max_duration": -1}, "--max-duration must be > 0"),
])
def test_unbounded_or_empty_runs_are_refused(given, words):
    with pytest.raises(ValueError, match=words):
        serve.check(args(**given))


def test_a_summary_counts_only_answers_with_images():
    records = [{"status": 200, "seconds": 0.1, "images": 2}, {"status": 200, "seconds": 0.3, "images": 2},
               {"status": 503, "seconds": 0.01, "images": 0}, {"status": None, "seconds": 5.0, "images": 0}]
    result = serve.summarize(records, wall=2.0)
    assert result["answered"] == 2 and result["images"] == 4 and result["images_per_s"] == 2.0
    assert result["statuses"] == {"200": 2, "503": 1, "None": 1}
    assert result["latency_s"]["p50"] == pytest.approx(0.2)
    assert serve.summarize([records[2]], wall=1.0)["latency_s"]["p99"] is None
