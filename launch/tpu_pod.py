"""Runs main.py on every worker of a Cloud TPU VM (a pod slice or a single host), with gcloud.

  python launch/tpu_pod.py --tpu=embedder-v4-32 --zone=us-central2-b --accelerator_type=v4-32 --create -- \
      --mode=train --config=configs/llm_embedder.py --workdir=gs://my-bucket/llm_embedder
  python launch/tpu_pod.py --tpu=embedder-v4-32 --zone=us-central2-b --skip_setup --detach -- \
      --mode=score --config=configs/score.py --workdir=gs://my-bucket/score \
      --config.inputs="('gs://my-bucket/data/qa.jsonl',)" --config.llm=/home/me/Llama-2-7b-chat-hf

Steps, each a gcloud command (`--dry_run` prints them, exactly, one per line):
1. find the TPU VM (`describe`); with `--create`, create it when it does not exist;
2. ship the code to every worker: this checkout's tracked and unignored files as a
   tarball (`--source=copy`, the default), or a `git clone` of `--git_url` at `--git_ref`;
3. unless `--skip_setup`: install Python (`--python`), `bash setup.sh`, then jax's TPU
   build, gcsfs and google-cloud-storage (for gs:// paths) into the checkout's .venv;
4. run `main.py --distributed=on <flags>` on `--worker=all`: jax finds the pod's
   workers itself, and every worker feeds its share of each batch. With `--detach`
   the run continues after ssh disconnects, logging to <repo_dir>/launch.log.

The workdir must be a gs:// path: every worker reads and writes it. Delete the VM
when done: gcloud compute tpus tpu-vm delete NAME --zone=ZONE.
"""
import pathlib
import shlex
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import common

REPO = pathlib.Path(__file__).resolve().parents[1]
# gs:// for epath (data, reports, exports; orbax reaches gs:// itself) and for tensorboardX.
REMOTE_IO_PACKAGES = ("gcsfs", "google-cloud-storage")


def _gcloud(verb, args, *positional):
    parts = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, f"--zone={args.zone}"]
    return parts + ([f"--project={args.project}"] if args.project else [])


def _ssh(args, remote):
    return _gcloud("ssh", args, args.tpu) + ["--worker=all", f"--command={remote}"]


def _workdir(main_args):
    flags = [a.split("=", 1)[1] for a in main_args if a.startswith("--workdir=")]
    return flags[-1] if flags else None


def steps(args, main_args):
    """The commands in order; each step is a list of alternatives, the next run only if one fails."""
    describe = _gcloud("describe", args, args.tpu) + ["--format=value(state)"]
    create = _gcloud("create", args, args.tpu) + [f"--accelerator-type={args.accelerator_type}",
                                                  f"--version={args.version}"]
    if args.spot:
        create.append("--spot")
    plan = [[describe, create] if args.create else [describe]]

    repo_dir = shlex.quote(args.repo_dir)
    if args.source == "copy":
        tarball = f"/tmp/{args.tpu}-code.tgz"
        pack = (f"git -C {shlex.quote(str(REPO))} ls-files -z --cached --others --exclude-standard"
                f" | tar -czf {shlex.quote(tarball)} -C {shlex.quote(str(REPO))} --null -T -")
        plan.append([["bash", "-c", pack]])
        plan.append([_gcloud("scp", args, tarball, f"{args.tpu}:{args.tpu}-code.tgz") + ["--worker=all"]])
        plan.append([_ssh(args, f"mkdir -p {repo_dir} && tar -xzf ~/{args.tpu}-code.tgz -C {repo_dir}")])
    else:
        url, ref = shlex.quote(args.git_url), shlex.quote(args.git_ref)
        plan.append([_ssh(args, f"(test -d {repo_dir}/.git || git clone {url} {repo_dir}) && "
                                f"git -C {repo_dir} fetch origin {ref} && "
                                f"git -C {repo_dir} checkout --force FETCH_HEAD")])
    if not args.skip_setup:
        python = shlex.quote(args.python)
        plan.append([_ssh(args, " && ".join([
            f"(command -v {python} >/dev/null || (sudo apt-get update -qq && "
            f"sudo apt-get install -y -qq {python} {python}-venv))",
            f"cd {repo_dir}",
            # setup.sh makes its venv with `python3`: put the chosen interpreter first under that name.
            f"mkdir -p .launch && ln -sf \"$(command -v {python})\" .launch/python3",
            "PATH=\"$PWD/.launch:$PATH\" bash setup.sh",
            f".venv/bin/python -m pip install -q 'jax[tpu]=={common.JAX_VERSION}' {' '.join(REMOTE_IO_PACKAGES)}",
        ]))])

    env = common.env_pairs(args.env)
    run = common.shell_command([".venv/bin/python", "main.py", "--distributed=on", *main_args], env)
    if args.detach:
        run = f"nohup {run} > launch.log 2>&1 < /dev/null &"
    plan.append([_ssh(args, f"cd {repo_dir} && {run}")])
    return plan


def execute(plan, *, dry_run):
    """Runs each step (an alternative only when the one before it fails); prints them with dry_run."""
    for alternatives in plan:
        if dry_run:
            print(" || ".join(shlex.join(argv) for argv in alternatives))
            continue
        for argv in alternatives:
            code = common.run(argv)
            if code == 0:
                break
        else:
            return code
    return 0


def main(argv=None):
    own, main_args = common.split_main_args(argv)
    parser = common.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True, help="its zone, e.g. us-central2-b")
    parser.add_argument("--project", default="", help="GCP project (default: gcloud's configured one)")
    parser.add_argument("--create", action="store_true", help="create the TPU VM when it does not exist")
    parser.add_argument("--accelerator_type", default="v4-8", help="with --create: e.g. v4-32, v5litepod-16")
    parser.add_argument("--version", default="tpu-ubuntu2204-base", help="with --create: TPU VM runtime image")
    parser.add_argument("--spot", action="store_true", help="with --create: a Spot (preemptible) TPU VM")
    parser.add_argument("--source", choices=("copy", "git"), default="copy",
                        help="ship this checkout (tracked + unignored files), or clone --git_url")
    parser.add_argument("--git_url", default="", help="with --source=git: the repository to clone")
    parser.add_argument("--git_ref", default="main", help="with --source=git: branch, tag or commit")
    parser.add_argument("--repo_dir", default="llm_embedder_jax", help="checkout folder on the workers (under ~)")
    parser.add_argument("--python", default="python3.11", help="interpreter for the workers' .venv")
    parser.add_argument("--skip_setup", action="store_true", help="reuse the workers' installed .venv")
    parser.add_argument("--detach", action="store_true", help="keep running after ssh ends (log: launch.log)")
    common.add_common_flags(parser)
    args = parser.parse_args(own)
    common.check_main_args(main_args)
    if args.source == "git" and not args.git_url:
        parser.error("--source=git needs --git_url")
    workdir = _workdir(main_args)
    if not workdir or not workdir.startswith("gs://"):
        parser.error(f"main.py's --workdir must be a gs:// path every worker sees, got {workdir!r}")
    return execute(steps(args, main_args), dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
