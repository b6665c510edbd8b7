"""The HTTP API's shape checks and the grouping of jobs into pipeline calls (no Ray, no model)."""

import pytest

from diffrt.serve import protocol


def job(prompt="a coat", **body):
    return protocol.parse({"prompt": prompt, **body}, "fashion-lcm")


def test_a_body_becomes_a_job_with_the_pipeline_options():
    j = job(n=3, seed=7, steps=4, sampler="lcm", guidance=2, size="32x48", negative_prompt="blurry",
            lora={"style": 0.5}, response_format="b64_json", model="fashion-lcm", user="u1")
    assert j.seeds == [7, 8, 9]
    assert j.call() == dict(prompt="a coat", negative_prompt="blurry", num_images=3, seed=7, guidance=2, height=48,
                            sampler="lcm", steps=4, width=32)
    assert j.lora == (("style", 0.5),)
    assert j.settings()["lora"] == {"style": 0.5}


def test_a_request_without_a_seed_gets_one_that_leaves_room_for_its_images():
    seeds = {job(n=8).seed for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s < protocol.SEED_DRAW for s in seeds)


@pytest.mark.parametrize(("body", "field", "words"), [
    ([1, 2], None, "must be a JSON object"),
    ({"n": 1}, "prompt", "prompt is required"),
    ({"prompt": 3}, "prompt", "prompt must be a string"),
    ({"prompt": "x", "colour": "red"}, "colour", "unknown field 'colour'; allowed: prompt, n, size"),
    ({"prompt": "x", "n": 0}, "n", "n must be an integer >= 1, got 0"),
    ({"prompt": "x", "n": True}, "n", "n must be an integer, got True"),
    ({"prompt": "x", "n": 1.5}, "n", "n must be an integer"),
    ({"prompt": "x", "size": "32*32"}, "size", "size must be \"WIDTHxHEIGHT\""),
    ({"prompt": "x", "size": 32}, "size", "size must be"),
    ({"prompt": "x", "response_format": "url"}, "response_format", "must be one of b64_json, got 'url'"),
    ({"prompt": "x", "model": "sdxl"}, "model", "this server runs model 'fashion-lcm', not 'sdxl'"),
    ({"prompt": "x", "steps": "4"}, "steps", "steps must be an integer, got '4'"),
    ({"prompt": "x", "guidance": "high"}, "guidance", "guidance must be a number"),
    ({"prompt": "x", "seed": -1.5}, "seed", "seed must be an integer"),
    ({"prompt": "x", "lora": ["style"]}, "lora", "lora must be an object"),
    ({"prompt": "x", "lora": {"style": "strong"}}, "lora", "must be a number, got 'strong'"),
    ({"prompt": "x", "lora": {"style": 10**400}}, "lora", "got an integer of 401 digits"),
])
def test_bad_bodies_name_the_field_and_what_is_allowed(body, field, words):
    with pytest.raises(protocol.BadRequest, match=words.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")) \
            as caught:
        protocol.parse(body, "fashion-lcm")
    assert caught.value.field == field


def test_library_errors_are_traced_to_the_request_field():
    assert protocol.field_named("steps must be an integer >= 1, got 0") == "steps"
    assert protocol.field_named("height must be a multiple of 4") == "size"
    assert protocol.field_named("unknown sampler 'x'; available: ...") is None


def test_compatible_jobs_share_calls_of_at_most_max_images():
    a, b, c = job(seed=1), job("a bag", seed=2, n=2), job(seed=3, steps=2)
    d, e = job(seed=4, negative_prompt="blurry"), job(seed=5, n=3)
    runs = protocol.group([a, b, c, d, e], max_images=4)
    assert runs == [[0, 1], [2], [3], [4]]  # e (3 images) would overflow a + b (3 images) past 4
    assert protocol.group([a, b, e], max_images=8) == [[0, 1, 2]]
    big = job(n=8)
    assert protocol.group([big, a], max_images=4) == [[0], [1]]  # a job larger than the limit runs alone


def test_a_merged_call_lists_prompts_and_seeds_in_job_order():
    call = protocol.merged_call([job(seed=1, steps=3), job("a bag", seed=10, n=2, steps=3)])
    assert call == dict(prompt=["a coat", "a bag", "a bag"], negative_prompt=None, seed=[1, 10, 11], steps=3)
    negatives = protocol.merged_call([job(negative_prompt="x"), job(negative_prompt="y")])["negative_prompt"]
    assert negatives == ["x", "y"]


def test_cpu_actors_leave_a_core_to_ray_unless_told_their_share():
    from diffrt.serve.resources import cpu_share, torch_threads

    assert cpu_share(16, 4, None) == 4 and cpu_share(2, 4, None) == 1 and cpu_share(16, 4, 0.5) == 0.5
    assert torch_threads(4, given=False) == 3 and torch_threads(1, given=False) == 1
    assert torch_threads(4, given=True) == 4 and torch_threads(0.5, given=True) == 1


@pytest.mark.parametrize(("given", "words"), [
    ({"replicas": 0}, "replicas must be an integer >= 1"), ({"max_batch": 2.5}, "max_batch must be an integer"),
    ({"max_queue": 0}, "max_queue must be"), ({"timeout_s": 0}, "timeout_s must be a finite number of seconds > 0"),
    ({"batch_wait_s": -0.1}, "batch_wait_s must be a finite number of seconds >= 0"),
    ({"replica_cpus": 0}, "replica_cpus must be > 0"), ({"route_prefix": "v1"}, "route_prefix must start with '/'"),
])
def test_bad_server_settings_are_refused_before_ray_starts(given, words):
    app = pytest.importorskip("diffrt.serve.app", reason="the serve extra is not installed")
    with pytest.raises(ValueError, match=words):
        app.Settings(model="fashion-lcm", **given).check()


def test_limits_bound_what_one_request_asks_with_the_models_defaults():
    limits = protocol.Limits(max_prompt_chars=10, max_steps=50, max_images=4, max_work=30)
    defaults = {"steps": 20, "width": 512, "height": 512}
    limits.check(job(n=4), defaults)  # 4 x 20 x 0.26 megapixels: 21
    for body, words in ((dict(n=5), "n must be at most 4 on this server, got 5"),
                        (dict(steps=51), "steps must be at most 50 on this server"),
                        (dict(n=2, steps=50, size="1024x1024"), "n x steps x megapixels is 105"),
                        (dict(negative_prompt="y" * 11), "negative_prompt has 11 characters")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            limits.check(job(**body), defaults)
    with pytest.raises(ValueError, match="prompt has 11 characters"):
        limits.check(job("x" * 11), defaults)
    with pytest.raises(ValueError, match="max_work must be a number > 0"):
        protocol.Limits(max_work=0).check_settings()
