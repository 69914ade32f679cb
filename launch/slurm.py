"""Writes and submits an sbatch script that runs main.py over GPU nodes of a Slurm cluster.

  python launch/slurm.py --nodes=4 --gpus_per_node=8 --time=24:00:00 --partition=a100 -- \
      --mode=train --config=configs/llm_embedder.py --workdir=/shared/runs/llm_embedder
  python launch/slurm.py --nodes=2 --gpus_per_node=8 --per=node --dry_run -- --mode=score --workdir=/shared/score

The script `srun`s one task per GPU (`--per=gpu`, the default) or one per node
(`--per=node`, each process driving all of its node's GPUs); every task runs
`main.py --distributed=on`, and jax reads the Slurm environment (SLURM_NTASKS,
SLURM_PROCID, SLURM_STEP_NODELIST, SLURM_LOCALID) to find the coordinator (the first
node) and its own rank; with one task per GPU, task i of a node takes GPU i. Slurm
sends SIGTERM `--grace` seconds before the time limit: training saves a checkpoint
at a step all processes agree on and exits, and the same command resumes it.

The checkout (with its .venv: `bash setup.sh`, then `.venv/bin/pip install
"jax[cuda12]==<version>"`) and the workdir must be on a file system every node
mounts, or the workdir a gs:// bucket. `--dry_run` prints the script and the
sbatch command instead of writing and submitting them.
"""
import pathlib
import shlex
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import common

REPO = pathlib.Path(__file__).resolve().parents[1]


def script(args, main_args):
    """The sbatch script's text."""
    tasks_per_node = args.gpus_per_node if args.per == "gpu" else 1
    directives = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--cpus-per-task={args.cpus_per_task}",
        f"--time={args.time}",
        f"--output={pathlib.Path(args.repo_dir) / args.log_dir}/%x-%j.out",
        # SIGTERM to every task this long before the time limit: time to save a checkpoint.
        f"--signal=TERM@{args.grace}",
    ]
    directives += [f"--partition={args.partition}"] if args.partition else []
    directives += [f"--account={args.account}"] if args.account else []
    directives += [f"--qos={args.qos}"] if args.qos else []
    env = dict(common.env_pairs(args.env))
    if args.per == "node":
        # One process drives every GPU of its node (jax would otherwise give it only GPU SLURM_LOCALID).
        env = {"JAX_LOCAL_DEVICE_IDS": ",".join(str(i) for i in range(args.gpus_per_node)), **env}
    lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
        "set -euo pipefail",
        f"cd {shlex.quote(str(args.repo_dir))}",
        *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        # --kill-on-bad-exit: one failed task ends the step instead of leaving the others waiting on it.
        "srun --kill-on-bad-exit=1 " + shlex.join([args.python, "main.py", "--distributed=on", *main_args]),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    own, main_args = common.split_main_args(argv)
    parser = common.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
    parser.add_argument("--cpus_per_task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="time limit (HH:MM:SS or D-HH:MM:SS)")
    parser.add_argument("--grace", type=int, default=300, help="seconds between SIGTERM and the time limit")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--qos", default="")
    parser.add_argument("--job_name", default="llm_embedder")
    parser.add_argument("--repo_dir", default=str(REPO), help="the checkout, as the nodes see it")
    parser.add_argument("--python", default=".venv/bin/python", help="interpreter, relative to --repo_dir")
    parser.add_argument("--log_dir", default="runs/slurm", help="job logs (relative to --repo_dir)")
    parser.add_argument("--script", default="", help="where to write the sbatch script "
                                                     "(default: <log_dir>/<job_name>.sbatch)")
    common.add_common_flags(parser)
    args = parser.parse_args(own)
    common.check_main_args(main_args)
    for name in ("nodes", "gpus_per_node", "cpus_per_task"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: expected at least 1")
    text = script(args, main_args)
    path = pathlib.Path(args.script or pathlib.Path(args.repo_dir) / args.log_dir / f"{args.job_name}.sbatch")
    submit = ["sbatch", str(path)]
    if args.dry_run:
        print(f"# {path}\n{text}")
        print(shlex.join(submit))
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.repo_dir) / args.log_dir).mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return common.run(submit)


if __name__ == "__main__":
    sys.exit(main())
