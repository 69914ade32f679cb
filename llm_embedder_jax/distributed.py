"""Multi-process runs: when to call `jax.distributed.initialize`, and the waits between processes.

Every process (one per TPU VM worker, per GPU node or per GPU) runs the same
`main.py`; after `jax.distributed.initialize` they see one global set of devices,
`jax.process_index()` tells them apart, and process 0 writes what is written once
(reports, exports, merged score files). How a run finds its peers, first match wins:

1. `--coordinator_address`, `--num_processes`, `--process_id` (or the environment
   variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, which
   `launch/local.py` sets): those values; jax fills in what is missing from its
   cluster detection.
2. Inside a Slurm step or an Open MPI job with more than one task: jax's own
   detection (`jax.distributed.initialize()` with no arguments).
3. `--distributed=on` (what `launch/tpu_pod.py` passes): jax's detection, which on
   Cloud TPU VMs reads the pod's workers from the metadata server.
4. Otherwise a single process: nothing is initialised.

`--distributed=off` never initialises (and rejects coordinator settings).
"""
import logging
import os

MODES = ("auto", "on", "off")
ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}
# Long enough for the slowest process of a big scoring job to finish its share.
DEFAULT_BARRIER_TIMEOUT_S = 24 * 3600


def _env_int(environ, name):
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def _launched_with_several_tasks(environ):
    """Inside `srun` or `mpirun` with more than one task: jax can detect everything itself."""
    slurm = all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"))
    if slurm and _env_int(environ, "SLURM_NTASKS") not in (None, 1):
        return True
    return "OMPI_MCA_orte_hnp_uri" in environ and _env_int(environ, "OMPI_COMM_WORLD_SIZE") not in (None, 1)


def init_arguments(*, mode="auto", coordinator_address=None, num_processes=None, process_id=None, environ=None):
    """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run.

    Arguments not given are read from the JAX_* environment variables; what is still
    missing is left to jax's cluster detection.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}: expected one of {', '.join(MODES)}")
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address or environ.get(ENV_VARS["coordinator_address"]) or None,
             "num_processes": num_processes if num_processes is not None else
             _env_int(environ, ENV_VARS["num_processes"]),
             "process_id": process_id if process_id is not None else _env_int(environ, ENV_VARS["process_id"])}
    given = {k: v for k, v in given.items() if v is not None}
    if mode == "off":
        if given:
            raise ValueError(f"--distributed=off, but {', '.join(sorted(given))} are set "
                             f"(flags or {', '.join(ENV_VARS[k] for k in sorted(given))})")
        return None
    if given.get("num_processes") is not None and given["num_processes"] < 1:
        raise ValueError(f"num_processes={given['num_processes']}: expected at least 1")
    if mode == "on" or given or _launched_with_several_tasks(environ):
        return given
    return None


def initialize(*, mode="auto", coordinator_address=None, num_processes=None, process_id=None):
    """Calls `jax.distributed.initialize` when the run has several processes; returns whether it did."""
    arguments = init_arguments(mode=mode, coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    if arguments is None:
        return False
    import jax
    jax.distributed.initialize(**arguments)
    logging.info("process %d of %d; %d local and %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


def barrier(name, *, timeout_s=DEFAULT_BARRIER_TIMEOUT_S):
    """Waits until every process reaches `name` (unique per wait). A no-op for one process.

    A coordination-service barrier rather than a device collective: processes may
    wait here for hours (a scoring job whose shares finish at different times)
    without a collective timing out, and without touching the accelerators.
    """
    import jax
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost
    multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
