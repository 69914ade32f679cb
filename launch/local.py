"""Runs main.py as several JAX processes on this machine, with a local coordinator.

  python launch/local.py --num_processes=2 --cpu_devices=2 -- \
      --mode=train --config=configs/llm_embedder.py:tiny --workdir=runs/tiny_2proc
  python launch/local.py --num_processes=4 --gpus_per_process=2 -- --mode=score --workdir=runs/score
  python launch/local.py --num_processes=2 --dry_run -- --mode=score --workdir=runs/score

Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>, JAX_NUM_PROCESSES and
JAX_PROCESS_ID=i, which main.py's `--distributed=auto` picks up: the same program as
on a pod, on one machine. `--cpu_devices=K` gives every process K fake CPU devices
(to try a multi-host run without accelerators); `--gpus_per_process=K` gives process
i the GPUs i*K .. i*K+K-1. With `--log_dir`, process i writes to
`<log_dir>/process_<i>.log`, else all share this terminal. When one process fails,
the others are stopped (SIGTERM, then SIGKILL) and its exit status is returned.
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import common

MAIN = pathlib.Path(__file__).resolve().parents[1] / "main.py"
STOP_GRACE_S = 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index, *, num_processes, port, cpu_devices=0, gpus_per_process=0, extra=None, base=None):
    """The environment variables process `index` adds to (or changes in) `base`."""
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
           "JAX_PROCESS_ID": str(index)}
    if cpu_devices:
        base_flags = (base if base is not None else os.environ).get("XLA_FLAGS", "")
        kept = re.sub(r"--xla_force_host_platform_device_count=\S+", "", base_flags).split()
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    if gpus_per_process:
        first = index * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + k) for k in range(gpus_per_process))
    env.update(extra or {})
    return env


def commands(args, main_args):
    """[(env additions, argv)] of every process."""
    argv = [args.python, str(MAIN), *main_args]
    extra = common.env_pairs(args.env)
    return [(process_env(i, num_processes=args.num_processes, port=args.port, cpu_devices=args.cpu_devices,
                         gpus_per_process=args.gpus_per_process, extra=extra), argv)
            for i in range(args.num_processes)]


def _stop(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(plan, *, log_dir=None):
    """Starts every process, waits for all; returns 0 or the exit status of the first that failed.

    A SIGTERM to the launcher (a scheduler's preemption notice) is passed on to every process,
    which then save and exit together.
    """
    procs, logs = [], []
    forward = lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None]
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for index, (env, argv) in enumerate(plan):
            output = None
            if log_dir:
                pathlib.Path(log_dir).mkdir(parents=True, exist_ok=True)
                output = open(pathlib.Path(log_dir) / f"process_{index}.log", "wb")
                logs.append(output)
            procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=output,
                                          stderr=subprocess.STDOUT if output else None))
            print(f"process {index}: pid {procs[-1].pid}", file=sys.stderr, flush=True)
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                print(f"process {index} exited with status {code}; stopping the others", file=sys.stderr)
                _stop(procs)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except BaseException:
        _stop(procs)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        for log in logs:
            log.close()


def main(argv=None):
    own, main_args = common.split_main_args(argv)
    parser = common.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, default=2, help="processes to start")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--cpu_devices", type=int, default=0, help="fake CPU devices per process (0: real devices)")
    parser.add_argument("--gpus_per_process", type=int, default=0, help="GPUs per process (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--log_dir", default="", help="one log file per process here (default: this terminal)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs main.py")
    common.add_common_flags(parser)
    args = parser.parse_args(own)
    common.check_main_args(main_args)
    if args.num_processes < 1:
        parser.error(f"--num_processes={args.num_processes}: expected at least 1")
    args.port = args.port or free_port()
    plan = commands(args, main_args)
    if args.dry_run:
        for env, command in plan:
            print(common.shell_command(command, env) + " &")
        print("wait")
        return 0
    return run(plan, log_dir=args.log_dir or None)


if __name__ == "__main__":
    sys.exit(main())
