"""How a sweep's trainings run: here, as a pool of subprocesses, or as tasks on a Ray cluster.

Both launchers run the same thing for every trial: ``python -m matwm_fast.train`` as a
subprocess writing to ``RUN_DIR/train.log``.  Whether it starts fresh or resumes is decided when
it starts, from the run directory itself (a checkpoint there → ``--resume RUN_DIR``), so a trial
started again — a rerun sweep, a Ray retry after its worker died — continues from its last
checkpoint, and a resumed run's metrics equal an uninterrupted one's (``train`` drops the rows a
killed run logged after that checkpoint).

* :class:`LocalLauncher` — ``jobs`` subprocesses at a time on this machine (the default).
* :class:`RayLauncher` — one Ray task per trial asking for ``cpus`` CPUs and ``gpus`` GPUs (a
  fraction shares a GPU); the task runs the training as its child.  Ray reschedules a task whose
  worker died (``max_retries``); a training killed by a signal (the OOM killer) is retried the same
  way.  Run directories must lie on a path every node reaches at the same name (NFS, Lustre, ...):
  a retry may run on another node and find the checkpoint there.

Two processes never train one run: ``train`` holds ``RUN_DIR/.lock`` (an ``flock``, released by
the kernel when its holder dies).  A training whose worker died is sent SIGTERM (Linux: the parent
death signal), checkpoints at its next step and exits; the retry waits for its lock meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ck

EXTRA = "pip install -e '.[cluster]'"  # the optional dependency that brings Ray


@dataclass(frozen=True)
class Trial:
    """One training of a sweep: where it lives and the ``train`` flags that start or continue it."""

    env: str
    seed: int
    run_dir: str  # absolute: a Ray worker on another node has another working directory
    fresh_args: tuple[str, ...]  # flags of a new run (preset, scenario, seed, --run-dir, budget, flags after --)
    resume_args: tuple[str, ...]  # flags added to --resume RUN_DIR (budget and evaluation: the run section)
    threads: int  # OMP/MKL threads of the training process

    @property
    def name(self) -> str:
        return f"{self.env} seed {self.seed}"


def train_argv(trial: Trial, python: str = sys.executable) -> list[str]:
    """The command that brings ``trial`` forward from whatever its run directory holds now."""
    d = Path(trial.run_dir)
    if ck.has_checkpoint(d):  # even a damaged one: resumed, and train names what is wrong
        # the config is the checkpoint's (train refuses changed learned settings), so the flags
        # after -- are not passed again: only the run section (budget, evaluation)
        return [python, "-m", "matwm_fast.train", "--resume", str(d), *trial.resume_args]
    argv = [python, "-m", "matwm_fast.train", *trial.fresh_args]
    if ck.RunDir(d).holds_run():
        # killed before its first checkpoint: nothing to continue, and the sweep checked that the
        # run's config is this trial's, so starting over reproduces the same run
        argv.append("--overwrite")
    return argv


def _package_root() -> Path | None:
    """The source checkout this module was imported from, if it is one (not site-packages)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else None


def _parent_death_signal(sig: int):
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when its parent dies (the Ray
    worker: a killed worker must not leave its training running on, holding the run's lock)."""
    if not sys.platform.startswith("linux"):
        return None
    libc, parent = ctypes.CDLL(None, use_errno=True), os.getpid()

    def preexec():
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), sig)

    return preexec


def start(trial: Trial, token: str, parent_death_signal: int | None = None):
    """Start ``trial``'s training → ``(process, log file, argv)``.

    A header line naming ``token`` (the sweep's) is appended to ``train.log`` before each start,
    so the log shows every attempt, and :func:`attempts` counts them.
    """
    d = Path(trial.run_dir)
    d.mkdir(parents=True, exist_ok=True)
    argv = train_argv(trial)
    # one BLAS/OMP pool per process: J processes × T threads should not exceed the cores
    env = {**os.environ, "OMP_NUM_THREADS": str(trial.threads), "MKL_NUM_THREADS": str(trial.threads)}
    root = _package_root()
    if root is not None:  # the training imports the same code as the worker that starts it
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    fh = open(d / "train.log", "a")
    fh.write(f"== sweep {token}: {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} "
             f"(launcher pid {os.getpid()}): {shlex.join(argv)}\n")
    fh.flush()
    # own session: a terminal Ctrl-C reaches only the sweep, which then sends each run a single
    # SIGTERM (a second signal would make train quit without its checkpoint)
    preexec = _parent_death_signal(parent_death_signal) if parent_death_signal else None
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=preexec)
    return proc, fh, argv


def attempts(trial: Trial, token: str) -> int:
    """How many times sweep ``token`` started ``trial`` (from the headers in its train.log)."""
    log = Path(trial.run_dir) / "train.log"
    mark = f"== sweep {token}:"
    return sum(line.startswith(mark) for line in log.read_text(errors="replace").splitlines()) if log.exists() else 0


def _interrupt(signum, _frame):
    """SIGTERM handler of the sweep: `kill SWEEP_PID` stops the runs as Ctrl-C does."""
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- local
@dataclass(frozen=True)
class LocalLauncher:
    """``jobs`` trainings at a time as subprocesses of this process."""

    jobs: int = 1

    def run(self, trials: list[Trial], token: str) -> list[dict]:
        todo, running, log = list(trials), [], []
        old_term = signal.signal(signal.SIGTERM, _interrupt)
        try:
            while todo or running:
                while todo and len(running) < max(self.jobs, 1):
                    trial = todo.pop(0)
                    proc, fh, argv = start(trial, token)
                    print(f"sweep: start {trial.name} ({trial.threads} threads): {shlex.join(argv)}", flush=True)
                    running.append((trial, proc, fh, argv, time.perf_counter()))
                time.sleep(0.5)
                for item in list(running):
                    trial, proc, fh, argv, t0 = item
                    if proc.poll() is None:
                        continue
                    fh.close()
                    running.remove(item)
                    wall = time.perf_counter() - t0
                    print(f"sweep: {trial.name} exited {proc.returncode} after {wall:.0f} s", flush=True)
                    log.append({"env": trial.env, "seed": trial.seed, "status": proc.returncode,
                                "wall_s": round(wall, 1), "command": shlex.join(argv)})
        except KeyboardInterrupt:
            # SIGTERM makes train checkpoint at the next step boundary; a rerun resumes from there
            for _, proc, _, _, _ in running:
                proc.terminate()
            for _, proc, _, _, _ in running:
                proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, old_term)
        return log


# ----------------------------------------------------------------------------- Ray
class TrainingKilled(RuntimeError):
    """The training process died of a signal it did not handle (SIGKILL: the OOM killer, a node
    agent): like a dead worker, a reason to run the trial again from its checkpoint."""


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"--launcher ray needs Ray, an optional dependency: {EXTRA} "
                          f"(or pip install 'ray>=2.9'); importing it failed: {e}") from None
    return ray


ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5})$")


def check_address(address: str | None) -> None:
    if address is not None and not ADDRESS.match(address):
        raise ValueError(f"--address {address!r}: expected auto (the cluster this node belongs to), HOST:PORT "
                         "(the head node's GCS, `ray start --head` prints it) or ray://HOST:PORT (Ray Client)")


def wait_for_lock(run_dir: Path, timeout_s: float) -> None:
    """Wait while another process trains ``run_dir``: after a worker death its training may still
    be writing the checkpoint this retry resumes from.  After ``timeout_s`` train itself refuses
    the run, naming the holder."""
    t0, said = time.monotonic(), False
    while (holder := ck.lock_holder(Path(run_dir) / ".lock")) is not None:
        if time.monotonic() - t0 > timeout_s:
            return
        if not said:
            print(f"sweep: {run_dir} is in use by process {holder}; waiting for it", flush=True)
            said = True
        time.sleep(0.2)


def ray_trial(trial: Trial, token: str, lock_wait_s: float) -> dict:
    """One trial, inside a Ray task: its training as a child process, until it ends."""
    wait_for_lock(Path(trial.run_dir), lock_wait_s)
    t0 = time.perf_counter()
    proc, fh, argv = start(trial, token, parent_death_signal=signal.SIGTERM)
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)  # a timed wait runs Python between polls: ray.cancel can interrupt it
                break
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:  # ray.cancel: the training checkpoints and stops, as under the local launcher
        proc.terminate()
        proc.wait()
        raise
    finally:
        fh.close()
    if rc < 0:
        raise TrainingKilled(f"{trial.name}: the training was killed by signal {-rc} "
                             f"({signal.Signals(-rc).name}); see {trial.run_dir}/train.log")
    return {"status": rc, "wall_s": round(time.perf_counter() - t0, 1), "node": socket.gethostname(),
            "attempts": attempts(trial, token), "command": shlex.join(argv)}


@dataclass(frozen=True)
class RayLauncher:
    """Every trial a Ray task asking for ``cpus`` CPUs and ``gpus`` GPUs, retried ``max_retries``
    times when its worker (or its training) dies; ``address`` None starts a local Ray instance."""

    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    max_retries: int = 3
    lock_wait_s: float = 600.0

    def connect(self):
        """Ray, connected → (ray, whether this call started the instance)."""
        ray = import_ray()
        if ray.is_initialized():
            return ray, False
        t0 = time.perf_counter()
        if self.address is None:  # "local": a new instance even where RAY_ADDRESS or another one exists
            ray.init(address="local", include_dashboard=False)
        else:
            try:
                ray.init(address=self.address)
            except ConnectionError as e:
                raise ConnectionError(
                    f"cannot reach a Ray cluster at --address {self.address} ({e}); start one with `ray start --head`, "
                    "and where the cluster uses token authentication (recent Ray versions do by default) give this "
                    "process its token: RAY_AUTH_MODE=token with ~/.ray/auth_token or RAY_AUTH_TOKEN (README: Sweeps "
                    "on a Ray cluster)") from None
        res = ray.cluster_resources()
        print(f"sweep: Ray {'started' if self.address is None else 'connected'} in {time.perf_counter() - t0:.1f} s: "
              f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs", flush=True)
        return ray, True

    def run(self, trials: list[Trial], token: str) -> list[dict]:
        ray, owned = self.connect()
        task = ray.remote(ray_trial)
        refs = {task.options(name=f"matwm {t.name}", num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries,
                             retry_exceptions=[TrainingKilled]).remote(t, token, self.lock_wait_s): t for t in trials}
        for t in trials:
            print(f"sweep: submitted {t.name} ({self.cpus:g} CPUs, {self.gpus:g} GPUs, {t.threads} threads)", flush=True)
        pending, log = list(refs), []
        old_term = signal.signal(signal.SIGTERM, _interrupt)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    t = refs[ref]
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.RayError as e:  # retries used up: a failed trial, not a failed sweep
                        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                        res = {"status": f"failed after {self.max_retries} retries: {type(e).__name__}: {cause}",
                               "attempts": attempts(t, token)}
                    print(f"sweep: {t.name} exited {res['status']} (attempts: {res.get('attempts')}, "
                          f"{res.get('wall_s', '?')} s)", flush=True)
                    log.append({"env": t.env, "seed": t.seed, **res})
        except KeyboardInterrupt:
            for ref in pending:  # each task's training gets SIGTERM: it checkpoints, and a rerun resumes it
                ray.cancel(ref)
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=120)
            raise
        finally:
            signal.signal(signal.SIGTERM, old_term)
            if owned:
                t0 = time.perf_counter()
                ray.shutdown()
                print(f"sweep: Ray {'stopped' if self.address is None else 'disconnected'} in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
        return log


# ----------------------------------------------------------------------------- flags
RAY_FLAGS = ("address", "cpus_per_trial", "gpus_per_trial", "max_retries")


def add_flags(p) -> None:
    """The sweep's launcher flags (defaults None: a flag of the other launcher is refused)."""
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local: subprocesses on this machine (default); ray: one Ray task per run (README: "
                        "Sweeps on a Ray cluster; needs the cluster extra)")
    p.add_argument("--jobs", type=int, default=None, help="local: training subprocesses at a time (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OMP threads per training (default: local, CPU cores // jobs; ray, --cpus-per-trial; "
                        "at least 1), and of the sweep's own evaluation (default 1)")
    ray = p.add_argument_group("--launcher ray")
    ray.add_argument("--address", default=None,
                     help="the cluster: auto (the one this node belongs to) or HOST:PORT of its head "
                          "(default: start a local Ray instance)")
    ray.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs each run asks for (default 1)")
    ray.add_argument("--gpus-per-trial", type=float, default=None,
                     help="GPUs each run asks for: 0 (default), a fraction (runs share a GPU) or a whole number")
    ray.add_argument("--max-retries", type=int, default=None,
                     help="times a run whose worker or training died is started again, resuming from its "
                          "checkpoint (default 3)")


def check_flags(args) -> None:
    """Every launcher flag on its own (ValueError naming the value and what is allowed)."""
    if args.launcher == "local":
        given = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --launcher ray")
    elif args.jobs is not None:
        raise ValueError(f"--jobs {args.jobs}: only with --launcher local; Ray runs as many at a time as the "
                         "cluster's resources allow (set what each run asks for with --cpus-per-trial, --gpus-per-trial)")
    for name, value, ok, allowed in [
            ("--jobs", args.jobs, lambda v: v >= 1, "a whole number >= 1"),
            ("--threads", args.threads, lambda v: v >= 1, "a whole number >= 1"),
            ("--cpus-per-trial", args.cpus_per_trial, lambda v: v > 0, "a number > 0"),
            ("--gpus-per-trial", args.gpus_per_trial, lambda v: 0 <= v <= 1 or v == int(v),
             "0, a fraction up to 1, or a whole number"),
            ("--max-retries", args.max_retries, lambda v: v >= 0, "a whole number >= 0")]:
        if value is not None and not ok(value):
            raise ValueError(f"{name} {value:g}: must be {allowed}")
    check_address(args.address)


def from_args(args):
    """(launcher, threads per training) for the checked flags."""
    if args.launcher == "ray":
        cpus = args.cpus_per_trial if args.cpus_per_trial is not None else 1.0
        launcher = RayLauncher(address=args.address, cpus=cpus, gpus=args.gpus_per_trial or 0.0,
                               max_retries=3 if args.max_retries is None else args.max_retries)
        return launcher, args.threads or max(1, int(cpus))
    jobs = args.jobs or 1
    return LocalLauncher(jobs), args.threads or max(1, (os.cpu_count() or 1) // jobs)
