"""``diffrt serve``: a Ray Serve application with two deployments.

- ``Generator`` (N replicas; one per GPU on a GPU machine): loads the pipeline once, warms it up, checks each job
  with the library's own checks and queues it for ``@serve.batch``, which hands it the jobs that arrived together;
  jobs with compatible settings run as one pipeline call and the images are split back per job.
- ``Gateway`` (the FastAPI ingress, one replica): the HTTP API of :mod:`diffrt.serve.protocol`, backpressure
  (503 with Retry-After past ``max_queue`` waiting requests), a per-request timeout (504), one retry on another
  replica when a replica dies mid-request (then a 503), ``/health``, ``/metrics``, ``/v1/models`` and the page.
"""

import asyncio
import base64
import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from . import protocol
from .metrics import Metrics
from .resources import cpu_share, torch_threads
from .worker import start_pipeline, startup_error

REPLICA_RETRIES = 1  # a request whose replica died is sent once more, to a live one
HEALTH_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What ``diffrt serve`` was asked to run."""

    model: str
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    loras: tuple = ()  # (path, scale) pairs merged at load; requests may rescale them by name
    replicas: int = 1
    max_batch: int = 8  # images per pipeline call (and requests per @serve.batch call)
    batch_wait_s: float = 0.02  # how long a batch waits for more requests once the first arrives
    max_queue: int = 64  # requests waiting past this get 503
    timeout_s: float = 120.0  # a request not answered by then gets 504
    replica_cpus: float | None = None  # CPU replicas: CPUs (and torch threads) each; default: the machine's / N
    name: str = "diffrt"  # the Ray Serve application's name
    route_prefix: str = "/"
    limits: protocol.Limits = field(default_factory=protocol.Limits)  # what one request may ask (400 past it)

    def check(self) -> None:
        self.limits.check_settings()
        for name, low in (("replicas", 1), ("max_batch", 1), ("max_queue", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, low_ok in (("batch_wait_s", True), ("timeout_s", False)):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and not low_ok):
                bound = ">= 0" if low_ok else "> 0"
                raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
        if self.replica_cpus is not None and not self.replica_cpus > 0:
            raise ValueError(f"replica_cpus must be > 0, got {self.replica_cpus!r}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")


class Ticket:
    """A queued job's standing: whether its request still waits for it (not cancelled, before its deadline)."""

    def __init__(self, deadline: float):
        self.deadline, self.cancelled = deadline, False

    def done(self) -> bool:
        return self.cancelled or time.time() > self.deadline


def _refused(err: ValueError) -> dict:
    return {"status": 400, "error": str(err), "field": protocol.field_named(str(err))}


def _failed(err: Exception) -> dict:
    return {"status": 500, "error": f"generation failed: {type(err).__name__}: {err}"}


@serve.deployment
class Generator:
    def __init__(self, settings: Settings, threads: int | None):
        from .. import samplers

        self.settings = settings
        self.pipe, self.resolved = start_pipeline(settings, threads, loras=list(settings.loras))
        self.base_loras = {name: info["scale"] for name, info in self.pipe.loras.items()}
        self.loras = dict(self.base_loras)
        # the first call pays one-time costs (at the default size, through the decoder); the replica is ready only
        # after it. One step: the model's whole default call takes minutes at real size on a CPU
        self.pipe("warm-up", seed=0, steps=1)
        self.info_record = {
            "model": settings.model, "backend": settings.backend, "device": str(self.pipe.device),
            "dtype": str(self.pipe.dtype).removeprefix("torch."), "defaults": self.pipe.defaults,
            "size": self.pipe.default_size, "samplers": list(samplers.available()), "loras": self.base_loras,
            "max_batch": settings.max_batch, "max_images": settings.limits.max_images,
            "limits": asdict(settings.limits),
        }  # fmt: skip
        self.run_batch.set_max_batch_size(settings.max_batch)
        self.run_batch.set_batch_wait_timeout_s(settings.batch_wait_s)

    def info(self) -> dict:
        return {**self.info_record, "pid": os.getpid()}

    async def submit(self, job: protocol.Job, deadline: float) -> dict:
        """Check the job alone as the library would run it, then wait for its batch's answer. ``deadline``: the
        wall-clock time its request is answered 504 by; past it, or once the request is cancelled (its timeout,
        its client gone), the job stops counting, and a call whose jobs all stopped ends at its next step."""
        try:
            self._check(job)
        except ValueError as err:
            return _refused(err)
        ticket = Ticket(deadline)
        try:
            return await self.run_batch((job, time.perf_counter(), ticket))
        except asyncio.CancelledError:
            ticket.cancelled = True
            raise

    def _check(self, job: protocol.Job) -> None:
        unknown = sorted(set(dict(job.lora)) - set(self.base_loras))
        if unknown:
            raise ValueError(f"lora: no LoRA named {', '.join(map(repr, unknown))} is loaded on this server; loaded: "
                             f"{', '.join(self.base_loras) or 'none'}")  # fmt: skip
        self.settings.limits.check(job, self.resolved)
        self.pipe.check(**job.call())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def run_batch(self, queued: list[tuple[protocol.Job, float, "Ticket"]]) -> list[dict]:
        # the pipeline runs in a thread: the event loop keeps taking requests (and /health) meanwhile
        return await asyncio.to_thread(self._run_jobs, queued)

    def _run_jobs(self, queued: list[tuple[protocol.Job, float, "Ticket"]]) -> list[dict]:
        jobs = [job for job, _, _ in queued]
        answers: list[dict] = [{}] * len(jobs)
        for run in protocol.group(jobs, self.settings.max_batch):
            started = time.perf_counter()
            tickets = [queued[i][2] for i in run]
            for index, answer in zip(run, self._run_call([jobs[i] for i in run], tickets), strict=True):
                queue_ms = (started - queued[index][1]) * 1000
                answers[index] = answer if "error" in answer else {**answer, "batch": {**answer["batch"],
                                                                                       "queue_ms": queue_ms}}
        return answers

    def _run_call(self, jobs: list[protocol.Job], tickets: list["Ticket"]) -> list[dict]:
        """One pipeline call for jobs of equal keys. If it fails, each job runs alone, so only a job that fails
        by itself gets an error (its own); a call stops between steps once no job of it still waits."""
        from ..pipeline.pipe import Cancelled

        try:
            return self._call(jobs, lambda: all(ticket.done() for ticket in tickets))
        except Cancelled as err:
            return [{"status": 504, "error": f"stopped: {err}"}] * len(jobs)
        except Exception as err:  # noqa: BLE001 - every failure is an answer; the replica lives on
            if len(jobs) == 1:
                return [_refused(err) if isinstance(err, ValueError) else _failed(err)]
            log.warning("a call of %d requests failed (%s: %s); each runs alone", len(jobs), type(err).__name__, err)
            return [self._run_call([job], [ticket])[0] for job, ticket in zip(jobs, tickets, strict=True)]

    def _call(self, jobs: list[protocol.Job], cancel) -> list[dict]:
        from ..pipeline.outputs import encode

        self._set_loras(dict(jobs[0].lora))
        result = self.pipe.generate(**protocol.merged_call(jobs), cancel=cancel)
        pngs = [base64.b64encode(encode(image)).decode("ascii") for image in result.images]
        batch = {"id": uuid.uuid4().hex, "images": len(pngs), "requests": len(jobs), "stages": asdict(result.stages)}
        answers, first = [], 0
        for job in jobs:
            answers.append({"images": pngs[first:first + job.n], "seeds": result.seeds[first:first + job.n],
                            "settings": {**self.resolved, **job.settings()}, "batch": batch})  # fmt: skip
            first += job.n
        return answers

    def _set_loras(self, scales: dict) -> None:
        wanted = {**self.base_loras, **scales}
        if wanted != self.loras:
            self.pipe.set_loras(wanted)
            self.loras = wanted


# The helpers come before the deployments: Ray Serve pickles the classes when they are decorated, with the module
# globals they use at that moment (and FastAPI reads the handlers' annotations then, so no postponed annotations).
async def _json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as err:
        raise protocol.BadRequest(None, f"the body is not JSON: {err}") from None
    except RecursionError:
        raise protocol.BadRequest(None, "the body is JSON nested too deeply") from None


async def _awaited(response):
    return await response


app = FastAPI(title="diffrt", docs_url=None, redoc_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    def __init__(self, generator, settings: Settings):
        self.generator = generator
        self.settings = settings
        self.metrics = Metrics()
        self.waiting = 0
        self.info_record: dict | None = None

    @app.post("/v1/images/generations")
    async def generations(self, request: Request):
        try:
            return await self._generations(request)
        except Exception as err:  # noqa: BLE001 - whatever went wrong is a JSON 500, counted in /metrics
            return self._error(500, f"the server failed on this request: {type(err).__name__}: {err}")

    async def _generations(self, request: Request):
        arrived = time.perf_counter()
        try:
            job = protocol.parse(await _json(request), self.settings.model)
        except protocol.BadRequest as err:
            return self._error(400, str(err), err.field)
        if self.waiting >= self.settings.max_queue:
            retry = max(1, math.ceil(self._expected_wait_s()))
            busy = (f"the server is busy: {self.waiting} requests are waiting (max_queue {self.settings.max_queue}); "
                    f"retry in {retry} s")  # fmt: skip
            return self._error(503, busy, headers={"Retry-After": str(retry)})
        self.waiting += 1
        self.metrics.queue.set(self.waiting)
        try:
            answer = await self._submit(job)
        finally:
            self.waiting -= 1
            self.metrics.queue.set(self.waiting)
        if "error" in answer:
            return self._error(answer["status"], answer["error"], answer.get("field"))
        seconds = time.perf_counter() - arrived
        self.metrics.answered(200, seconds, answer["batch"], len(answer["images"]))
        return {
            "created": int(time.time()),
            "data": [{"b64_json": image, "seed": seed} for image, seed in zip(answer["images"], answer["seeds"],
                                                                              strict=True)],
            "diffrt": {"seeds": answer["seeds"], "settings": answer["settings"], "batch": answer["batch"],
                       "latency_ms": seconds * 1000},
        }  # fmt: skip

    async def _submit(self, job: protocol.Job) -> dict:
        deadline = time.monotonic() + self.settings.timeout_s
        wall_deadline = time.time() + self.settings.timeout_s  # the replica's clock: the same machine's wall time
        for attempt in range(REPLICA_RETRIES + 1):
            response = self.generator.submit.remote(job, wall_deadline)
            try:
                return await asyncio.wait_for(_awaited(response), max(0.0, deadline - time.monotonic()))
            except asyncio.CancelledError:  # the client went away: its job stops counting on the replica
                response.cancel()
                raise
            except TimeoutError:
                response.cancel()
                late = f"no answer within the server's timeout of {self.settings.timeout_s:g} s"
                return {"status": 504, "error": late}
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                if attempt == REPLICA_RETRIES:
                    return {"status": 503, "error": f"the replica running this request died and so did its retry "
                                                    f"({type(err).__name__}); try again"}  # fmt: skip
                self.metrics.retries.inc()
        raise AssertionError("unreachable")

    def _expected_wait_s(self) -> float:
        """Roughly how long the queue ahead takes: batches of max_batch at the mean latency seen so far."""
        batches = self.waiting / (self.settings.max_batch * self.settings.replicas)
        return (self.metrics.mean_latency_s or 1.0) * batches

    def _error(self, code: int, message: str, field: str | None = None, headers: dict | None = None):
        self.metrics.answered(code)
        kind = "invalid_request_error" if code < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": field, "code": code}},
                            status_code=code, headers=headers)  # fmt: skip

    @app.get("/health")
    async def health(self):
        try:
            info = await asyncio.wait_for(_awaited(self.generator.info.remote()), HEALTH_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - any failure to answer means not ready
            return JSONResponse({"status": "unavailable", "reason": f"{type(err).__name__}: {err}"}, status_code=503)
        return {"status": "ready", "model": info["model"], "backend": info["backend"], "device": info["device"]}

    @app.get("/metrics")
    async def metrics(self):
        text, content_type = self.metrics.text()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models(self):
        if self.info_record is None:
            self.info_record = await self.generator.info.remote()
        info = {k: v for k, v in self.info_record.items() if k != "pid"}
        return {"object": "list", "data": [{"id": self.settings.model, "object": "model", "owned_by": "diffrt",
                                            "diffrt": {**info, "replicas": self.settings.replicas}}]}  # fmt: skip

    @app.get("/")
    async def page(self):
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))


def build(settings: Settings, cpus: float, gpus: float):
    """The application for ``serve.run``: the gateway bound to ``settings.replicas`` generator replicas, each
    given one GPU when the cluster has them, else a share of the CPUs."""
    settings.check()
    if gpus:
        resources_each, threads = {"num_gpus": 1}, None
    else:
        share = cpu_share(cpus, settings.replicas, settings.replica_cpus)
        resources_each, threads = {"num_cpus": share}, torch_threads(share, given=settings.replica_cpus is not None)
    generator = Generator.options(
        num_replicas=settings.replicas, ray_actor_options=resources_each, max_ongoing_requests=settings.max_queue,
        graceful_shutdown_timeout_s=settings.timeout_s, graceful_shutdown_wait_loop_s=0.5,
    ).bind(settings, threads)  # fmt: skip
    gateway = Gateway.options(max_ongoing_requests=settings.max_queue * 2 + 16,
                              graceful_shutdown_timeout_s=settings.timeout_s, graceful_shutdown_wait_loop_s=0.5)
    return gateway.bind(generator, settings)


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop taking requests and let the in-flight ones finish.

    ``address``: an existing Ray cluster to join ("auto", "ray://..." or "HOST:PORT"); without one a local
    cluster is started with this machine's CPUs and GPUs and stopped afterwards."""
    import signal
    import threading

    import ray

    settings.check()
    # replicas' logs stay in Ray's log folder: a replica that fails to start is this command's one-line error
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its start-up lines are not the user's business
    try:
        total = ray.cluster_resources()
        gpus = total.get("GPU", 0) if settings.device in (None, "cuda") else 0
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build(settings, total.get("CPU", 1), gpus), name=settings.name,
                      route_prefix=settings.route_prefix)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - Ray's report of a replica that failed to start: one line
            raise ValueError(f"diffrt serve could not start its replicas: {_replica_error(settings.name, err)}"
                             ) from None  # fmt: skip
        prefix = settings.route_prefix.rstrip("/")
        joined = "; a cluster's running Serve keeps its own host and port" if address else ""
        print(f"diffrt serve: {settings.model} ({settings.replicas} replica(s), max batch {settings.max_batch}) at "
              f"http://{host}:{port}{prefix}/  (POST {prefix}/v1/images/generations{joined})", flush=True)  # fmt: skip
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("diffrt serve: stopping; in-flight requests finish first", flush=True)
        serve.delete(settings.name)  # each replica drains its in-flight requests (graceful_shutdown_timeout_s)
        if address is None:
            serve.shutdown()
    finally:
        ray.shutdown()


def _replica_error(name: str, err: Exception) -> str:
    """What failed in the application's deployments, as Ray Serve's status records it (the replica's own
    exception is in its message), else the exception's own line."""
    from ray import serve

    try:
        status = serve.status().applications[name]
        messages = [d.message for d in status.deployments.values() if d.message] or [status.message]
    except Exception:  # noqa: BLE001 - no status to read: the exception is all there is
        messages = []
    return startup_error(RuntimeError("\n".join(messages))) if any(messages) else startup_error(err)
