"""Segment a run's scans on a Ray cluster: a pool of actors, each with the model loaded once.

The driver (the process that called ``medseg.segment``) plans the run and owns the report,
as for a local run; this executor only decides where each scan is segmented. Each actor
is a :class:`~medseg.batch.worker.ScanWorker` in a Ray worker process: it reads the scan
from shared storage, segments it and writes its outputs straight into the output folder,
atomically, then returns the scan's record. Scans are handed out as actors free up,
largest first, so a few large scans do not finish last behind a queue of small ones.

Faults: when a worker process or its node dies, Ray restarts the actor (on another node
when its own is gone) and the scans it held are handed out again; the record says the
scan was segmented again, and a scan whose workers die ``MAX_ATTEMPTS`` times is recorded
as failed (it may need more memory than a worker has). A scan that fails for its own
reasons (a bad file) comes back as a failed record like any other and is not retried.

Ray is an optional extra (``pip install 'medseg[ray]'``); only this module imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg.batch.report import ScanRecord
from medseg.batch.worker import ScanTask, failed_record
from medseg.errors import MedsegError, ModelError
from medseg.inference.options import InferenceOptions, Progress
from medseg.io.formats import WriteOptions

logger = logging.getLogger(__name__)

# Tries per scan when its worker dies under it (a worker's death, not the scan's own error).
MAX_ATTEMPTS = 3
# Scans in flight per actor: one in the network while the next is read (or the last written).
IN_FLIGHT_PER_WORKER = 2
# CPU threads one CPU actor computes with: the article's network on one slice scales
# sub-linearly past a few threads, so a large node runs several actors instead of one.
CPU_THREADS_PER_WORKER = 4
# How long actors may take to start and load the model before the run gives up on them.
START_TIMEOUT_S = 600.0
# After Ctrl-C, how long the scans in flight may take to finish and be recorded.
INTERRUPT_GRACE_S = 20.0
# Once one actor runs, how long the others may take to start before the run goes on without them.
PARTIAL_START_GRACE_S = 60.0
# A local Ray started by medseg carries task arguments and records only: a small object store.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


class RayUnavailable(MedsegError):
    """Ray is not installed, or the cluster cannot be reached or used."""

    def __init__(self, problem: str, hint: str) -> None:
        super().__init__(f"--executor ray: {problem} ({hint})")
        self.problem, self.hint = problem, hint


def import_ray() -> Any:
    """The ``ray`` module, or a RayUnavailable error saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RayUnavailable("Ray is not installed", "pip install 'medseg[ray]'") from err
    return ray


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """How many actors and what each reserves: ``cpus`` (and ``gpus``, 0 or 1) per actor."""

    workers: int
    cpus: float
    gpus: int

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def plan_pool(node_resources: list[dict[str, float]], device: str, workers: int | None = None) -> PoolPlan:
    """Actors for a cluster whose alive nodes have ``node_resources`` ({"CPU": n, "GPU": m}).

    GPUs (unless ``device`` is "cpu"): one actor per GPU, each with an equal share of its
    node's CPUs for reading and writing. Otherwise CPU actors of ``CPU_THREADS_PER_WORKER``
    threads, several per large node, each node's CPUs shared out among its actors.
    ``workers`` overrides the count; each actor then reserves what the smallest share allows.
    """
    if not node_resources:
        raise RayUnavailable("the Ray cluster has no alive node", "start the cluster's nodes or check --ray-address")
    gpus = [int(n.get("GPU", 0)) for n in node_resources]
    cpus = [int(n.get("CPU", 0)) for n in node_resources]
    use_gpus = device != "cpu" and sum(gpus) > 0
    if device.startswith("cuda") and not use_gpus:
        raise RayUnavailable("--device cuda was asked for but the Ray cluster has no GPU", "use --device cpu or auto")
    if use_gpus:
        shares = [c / g for c, g in zip(cpus, gpus, strict=True) if g > 0]
        count = sum(gpus) if workers is None else workers
        return PoolPlan(count, max(1.0, min(shares)), 1)
    per_node = [max(1, c // CPU_THREADS_PER_WORKER) for c in cpus if c > 0]
    if not per_node:
        raise RayUnavailable("the Ray cluster offers no CPU", "start nodes with CPUs or check --ray-address")
    if workers is None:
        share = min(c // n for c, n in zip([c for c in cpus if c > 0], per_node, strict=True))
        return PoolPlan(sum(per_node), float(max(1, share)), 0)
    return PoolPlan(workers, float(max(1, min(max(cpus), sum(cpus) // workers))), 0)


class _ScanActor:
    """One Ray actor: a ScanWorker with the model loaded once (see ``RayExecutor``)."""

    def __init__(
        self,
        model_folder: str,
        bundled: bool,
        model_hash: str,
        out_dir: str,
        formats: tuple[str, ...],
        write: WriteOptions,
        inference: InferenceOptions,
        threads: int,
    ) -> None:
        import torch

        from medseg.batch.worker import ScanWorker
        from medseg.bundled import default_model_dir
        from medseg.inference.predictor import make_predictor
        from medseg.model import load_model

        torch.set_num_threads(threads)
        # The bundled model lies in each node's own installation; any other model folder on
        # storage every node sees. Either way it must be the model the driver planned with.
        folder = default_model_dir() if bundled else Path(model_folder)
        model = load_model(folder)
        if model.sha256 != model_hash:
            raise ModelError(
                folder,
                f"differs on node {socket.gethostname()} from the driver's copy (another version or edit)",
                "give every node the same model folder (shared storage) and the same medseg version",
            )
        self.worker = ScanWorker(make_predictor(model, inference), Path(out_dir), formats, write)
        self._network = threading.Lock()  # one scan in the network; the other reads or writes

    def settings(self) -> dict[str, Any]:
        from medseg import __version__
        from medseg.inference.predictor import how_it_runs

        return {**how_it_runs(self.worker.predictor), "node": socket.gethostname(), "medseg": __version__}

    def segment(self, task: ScanTask) -> tuple[ScanRecord, bool]:
        """The scan's record, and whether the disk is full (no further scans can be written)."""
        item = self.worker.read(task)
        with self._network:
            job = self.worker.infer(item)
        record = job if isinstance(job, ScanRecord) else self.worker.write(job)
        return record, self.worker.disk_full


@dataclasses.dataclass
class _Slot:
    """An actor of the pool: ``state`` "ready", "restarting" (Ray brings a dead worker's
    actor back; ``probe`` asks when it is) or "dead" (restarted as often as it may be)."""

    actor: Any
    in_flight: int = 0
    state: str = "ready"
    probe: Any = None
    probe_after: float = 0.0


class RayExecutor:
    """Runs a run's scans on a Ray cluster (``address``; None starts a local Ray unless this
    process is already connected to one) with ``workers`` actors (None: from the cluster's
    resources, see :func:`plan_pool`). Use as a context manager: leaving it stops the actors,
    and the local Ray when this executor started it."""

    def __init__(
        self,
        model: Any,
        out_dir: Path,
        formats: tuple[str, ...],
        write: WriteOptions,
        inference: InferenceOptions,
        address: str | None = None,
        workers: int | None = None,
    ) -> None:
        self.ray = import_ray()
        self.address = address
        self._started = self._connect(address)
        try:
            self.plan = plan_pool(_alive_nodes(self.ray), inference.device, workers)
            self._slots = self._start_pool(model, out_dir, formats, write, inference)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self, address: str | None) -> bool:
        """Connect to ``address`` ($RAY_ADDRESS when None and set), or start a local Ray of
        our own (never another local cluster's); True when this call connected."""
        ray = self.ray
        if ray.is_initialized():
            return False  # the caller's own connection: theirs to close
        named = "--ray-address"
        if address is None and os.environ.get("RAY_ADDRESS"):
            address, named = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address is None:
            # A Ray of our own ("local": even where another cluster runs on this machine): its
            # start-up notices are not the user's business, and it reports no usage
            # statistics (medical sites, often offline) unless the user asked for them.
            address = "local"
            kwargs.update(object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.ERROR)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        elif address != "auto":
            _check_ray_answers(address, named)  # ray.init would retry a wrong address for many minutes
        before = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            local = address == "local"
            raise RayUnavailable(
                f"cannot {'start a local Ray' if local else f'connect to the Ray cluster at {address} ({named})'}: "
                f"{_last_line(err)}",
                "check that this machine can run Ray (ray start --head works)"
                if local
                else f"check {named}: the head node's HOST:PORT (6379 by default), or auto on a cluster node; "
                "a cluster with token authentication also needs its token here (~/.ray/auth_token)",
            ) from err
        if callable(before) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)  # ray.init replaces it with a crash report
        return True

    def _start_pool(
        self, model: Any, out_dir: Path, formats: tuple[str, ...], write: WriteOptions, inference: InferenceOptions
    ) -> list[_Slot]:
        from medseg.bundled import default_model_dir

        ray, plan = self.ray, self.plan
        actor_class = ray.remote(_ScanActor).options(
            num_cpus=plan.cpus,
            num_gpus=plan.gpus,
            max_restarts=MAX_ATTEMPTS,  # a dead worker's actor comes back (elsewhere, if its node is gone)
            max_task_retries=0,  # its scans are handed out again by the driver, which records the retry
            max_concurrency=IN_FLIGHT_PER_WORKER,
        )
        bundled = Path(model.folder).resolve() == Path(default_model_dir()).resolve()
        folder = str(Path(model.folder).absolute())  # the workers' working folder is not ours
        args = (folder, bundled, model.sha256, str(Path(out_dir).absolute()), formats, write, inference, plan.threads)
        actors = [actor_class.remote(*args) for _ in range(plan.workers)]
        self._slots = [_Slot(a) for a in actors]  # close() stops them, whatever happens next
        total = ray.cluster_resources()
        if plan.workers * plan.cpus > total.get("CPU", 0) or plan.workers * plan.gpus > total.get("GPU", 0):
            logger.warning(
                "%d workers of %s CPU, %d GPU each do not fit the cluster's %s CPU, %s GPU: those that fit "
                "start, and the run goes on with them after %.0f s",
                plan.workers,
                plan.cpus,
                plan.gpus,
                total.get("CPU", 0),
                total.get("GPU", 0),
                PARTIAL_START_GRACE_S,
            )
        logger.info("starting %d Ray worker(s) (%s CPU, %d GPU each)", plan.workers, plan.cpus, plan.gpus)
        started, self._how = self._started_actors(actors, model.folder)
        return [s for s in self._slots if any(s.actor is a for a in started)]

    def _started_actors(self, actors: list[Any], folder: Path) -> tuple[list[Any], list[dict[str, Any]]]:
        """The actors that started and loaded the model, with their settings.

        Waits up to ``START_TIMEOUT_S`` for the first; once one runs, the others get
        ``PARTIAL_START_GRACE_S`` more, and the run goes on with those that started (more
        workers than the cluster has room for wait for nothing). A clear error when none
        starts, when a worker cannot load the model, or when the versions differ.
        """
        ray = self.ray
        refs = {a.settings.remote(): a for a in actors}
        start, first = time.monotonic(), None
        waiting, ready = list(refs), []
        while waiting:
            limit = start + START_TIMEOUT_S
            if first is not None:
                limit = min(limit, first + PARTIAL_START_GRACE_S)
            left = limit - time.monotonic()
            if left <= 0:
                break
            done, waiting = ray.wait(waiting, num_returns=1, timeout=left)
            if done and first is None:
                first = time.monotonic()
            ready += done
        if not ready:
            raise RayUnavailable(
                f"none of {len(actors)} Ray workers started within {START_TIMEOUT_S:.0f} s "
                f"(each asks for {self.plan.cpus} CPU and {self.plan.gpus} GPU)",
                "the cluster lacks free resources: pass a smaller --ray-workers or free the cluster",
            )
        try:
            settings = ray.get(ready)
        except self.ray.exceptions.RayError as err:
            raise ModelError(
                folder,
                f"cannot be loaded by the Ray workers: {_last_line(err)}",
                "every node must see this model folder under the same path (shared storage) and load it "
                "(try medseg info FOLDER on a node)",
            ) from err
        for ref in waiting:  # never started: the cluster has no room for them
            ray.kill(refs[ref], no_restart=True)
        if waiting:
            logger.warning(
                "%d of %d Ray workers started (no room for more of %s CPU, %d GPU each); going on with them",
                len(ready),
                len(actors),
                self.plan.cpus,
                self.plan.gpus,
            )
        from medseg import __version__

        versions = {s["medseg"] for s in settings}
        if versions != {__version__}:
            raise RayUnavailable(
                f"the Ray workers run medseg {', '.join(sorted(versions))}, this process {__version__}",
                "install the same medseg version on every node",
            )
        return [refs[r] for r in ready], settings

    def settings(self) -> dict[str, Any]:
        def joined(key: str) -> str:
            return ",".join(dict.fromkeys(str(s[key]) for s in self._how))

        return {
            "executor": "ray",
            "ray_address": self.address or os.environ.get("RAY_ADDRESS") or "local",
            "workers": len(self._how),
            "nodes": len({s["node"] for s in self._how}),
            "device": joined("device"),
            "engine": joined("engine"),
            "precision": joined("precision"),
            "overlap": self._how[0]["overlap"],
        }

    def segment(self, tasks: list[ScanTask], finish: Callable[[ScanRecord], None], slice_progress: Progress) -> bool:
        """Hand ``tasks`` to the actors, largest first, as they free up; ``finish`` each record
        as it arrives. True when a worker found the disk full (the run stops handing out scans)."""
        return _Dispatch(self.ray, self._slots, finish).run(sorted(tasks, key=_scan_bytes, reverse=True))

    def close(self) -> None:
        """Stop the actors, and the local Ray this executor started."""
        ray = self.ray
        for slot in getattr(self, "_slots", []):
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already gone: nothing to stop
                logger.debug("actor already gone", exc_info=True)
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False


def _check_ray_answers(address: str, named: str = "--ray-address", timeout_s: float = 10.0) -> None:
    """Refuse, at once, an address that is not HOST:PORT (or ray://HOST:PORT), where nothing
    answers, or where what answers is not a gRPC server (Ray's head node and Ray Client speak
    gRPC; the dashboard's port, a web server, does not): ``ray.init`` retries those for
    minutes, printing connection errors."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    hint = f"give {named} the head node's HOST:PORT (6379 by default; not the dashboard's 8265), or auto"
    if not host or not port.isdigit():
        raise RayUnavailable(f"{address!r} ({named}) is not a Ray address", hint)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as conn:
            # An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers
            # with a SETTINGS frame (type 4) of its own.
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            answer = conn.recv(9)
    except OSError as err:
        raise RayUnavailable(
            f"nothing answers at {address} ({named}; {err.strerror or err})",
            "check that the Ray head node runs (ray status on it) and that this machine can reach that port",
        ) from err
    if len(answer) < 4 or answer[3] != 4:
        raise RayUnavailable(f"what answers at {address} ({named}) is not a Ray head node", hint)


def _alive_nodes(ray: Any) -> list[dict[str, float]]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def _scan_bytes(task: ScanTask) -> int:
    """Bytes of the scan's files on disk: its size, for handing out the largest first."""
    total = 0
    for path in task.scan.files:
        with contextlib.suppress(OSError):  # unreadable: the read stage will say why
            total += Path(path).stat().st_size
    return total


def _last_line(err: BaseException) -> str:
    """The last non-empty line of an error's text (Ray wraps causes in long tracebacks)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class _Dispatch:
    """One run's hand-out of scans to the pool, and what to do when a worker dies.

    A scan whose worker died is handed out again (``MAX_ATTEMPTS`` in all); the actor is
    restarted by Ray and takes scans again once it answers a probe. A scan's own failure
    comes back as a record and is never retried.
    """

    PROBE_INTERVAL_S = 0.5

    def __init__(self, ray: Any, slots: list[_Slot], finish: Callable[[ScanRecord], None]) -> None:
        self.ray, self.slots, self.finish = ray, slots, finish
        self.pending: deque[tuple[ScanTask, int, str]] = deque()  # (task, attempt, why retried)
        self.in_flight: dict[Any, tuple[ScanTask, int, str, _Slot]] = {}  # by result ref
        self.disk_full = False

    def run(self, tasks: list[ScanTask]) -> bool:
        self.pending.extend((task, 1, "") for task in tasks)
        try:
            self._loop()
        except KeyboardInterrupt:
            self._drain()
            raise
        return self.disk_full

    def _drain(self) -> None:
        """After Ctrl-C: record the scans the workers are finishing (for up to
        ``INTERRUPT_GRACE_S``), so their outputs do not go unrecorded. A second Ctrl-C stops
        at once; a scan a worker was writing then may be left without its record, and the
        next run redoes it."""
        self.pending.clear()
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        logger.warning("interrupted: recording the scans in flight (Ctrl-C again to stop at once)")
        while self.in_flight and (left := deadline - time.monotonic()) > 0:
            ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=left)
            for ref in ready:
                self._collect(ref)

    def _loop(self) -> None:
        while self.in_flight or (self.pending and not self.disk_full):
            self._hand_out()
            if not self.in_flight and all(s.state == "dead" for s in self.slots):
                self._fail_pending()  # no actor left to hand them to
                break
            self._probe_restarting()
            waiting = [*self.in_flight, *(s.probe for s in self.slots if s.probe is not None)]
            ready, _ = self.ray.wait(waiting, num_returns=1, timeout=self.PROBE_INTERVAL_S) if waiting else ([], [])
            for ref in ready:
                if ref in self.in_flight:
                    self._collect(ref)
                else:
                    self._probed(next(s for s in self.slots if s.probe == ref))
            if not waiting:
                time.sleep(self.PROBE_INTERVAL_S)

    def _hand_out(self) -> None:
        while self.pending and not self.disk_full:
            ready = [s for s in self.slots if s.state == "ready" and s.in_flight < IN_FLIGHT_PER_WORKER]
            if not ready:
                return
            slot = min(ready, key=lambda s: s.in_flight)
            task, attempt, why = self.pending.popleft()
            slot.in_flight += 1
            self.in_flight[slot.actor.segment.remote(task)] = (task, attempt, why, slot)

    def _collect(self, ref: Any) -> None:
        task, attempt, why, slot = self.in_flight.pop(ref)
        slot.in_flight -= 1
        errors = self.ray.exceptions
        try:
            record, full = self.ray.get(ref)
        except errors.RayTaskError as err:  # the worker's code raised (it records failures itself): a bug
            record = failed_record(task, "infer", RuntimeError(_last_line(err)), 0.0)
            full = False
        except errors.RayError as err:  # the worker, its node or its memory is gone: not the scan's fault
            self._lost(slot, err)
            reason = f"its Ray worker died during attempt {attempt}"
            logger.warning("%s: %s of %d; it is handed out again", task.scan.name, reason, MAX_ATTEMPTS)
            logger.debug("%s: %s", task.scan.name, err)
            if attempt < MAX_ATTEMPTS:
                # At the back: a scan in flight when a worker is killed for other reasons is
                # not in flight again at once, to be charged for the next death too.
                self.pending.append((task, attempt + 1, reason))
                return
            record, full = _gave_up(task), False
        if why:
            note = f"segmented again, on attempt {attempt}: {why}"
            record = dataclasses.replace(record, warnings=(*record.warnings, note))
        self.disk_full = self.disk_full or full
        self.finish(record)

    def _lost(self, slot: _Slot, err: BaseException) -> None:
        """``slot``'s worker died: wait for Ray to restart it, unless it never will."""
        if isinstance(err, self.ray.exceptions.ActorDiedError):
            slot.state = "dead"  # restarted as often as it may be, or its creation failed
        elif slot.state == "ready":
            slot.state, slot.probe, slot.probe_after = "restarting", None, 0.0

    def _probe_restarting(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "restarting" and slot.probe is None and now >= slot.probe_after:
                slot.probe = slot.actor.settings.remote()

    def _probed(self, slot: _Slot) -> None:
        probe, slot.probe = slot.probe, None
        try:
            self.ray.get(probe)
        except self.ray.exceptions.ActorDiedError:
            slot.state = "dead"
        except self.ray.exceptions.RayError:
            slot.probe_after = time.monotonic() + self.PROBE_INTERVAL_S  # still restarting: ask again
        else:
            slot.state = "ready"
            logger.info("a Ray worker is back after a restart")

    def _fail_pending(self) -> None:
        for task, _attempt, _why in self.pending:
            self.finish(
                failed_record(
                    task,
                    "infer",
                    RuntimeError("no Ray worker is left: each died more often than it may be restarted"),
                    0.0,
                    hint="check the cluster's nodes and logs, then run the same command again to go on",
                )
            )
        self.pending.clear()


def _gave_up(task: ScanTask) -> ScanRecord:
    return failed_record(
        task,
        "infer",
        RuntimeError(f"its Ray worker died on each of {MAX_ATTEMPTS} attempts"),
        0.0,
        hint="the scan may need more memory than one worker has: segment it alone on a larger machine",
    )
