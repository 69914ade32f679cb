"""Launchers (dry runs: exact commands, quoting, workers, environment, sbatch directives) and how
main.py decides to start jax.distributed."""
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

from launch import common, local, slurm, tpu_pod
from llm_embedder_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A flag whose value needs quoting at every level: parentheses, quotes, a space.
TRICKY = "--config.inputs=('gs://bucket/my data/qa.jsonl',)"
MAIN_FLAGS = ["--mode=score", "--config=configs/score.py", "--workdir=gs://bucket/score", TRICKY]


def dry_run(module, argv, capsys):
    assert module.main([*argv, "--dry_run", "--", *MAIN_FLAGS]) == 0
    return capsys.readouterr().out.splitlines()


# ----------------------------------------------------------------------------- main.py's distributed init

def test_distributed_init_arguments():
    init = distributed.init_arguments
    assert init(environ={}) is None                                         # one process: nothing to do
    assert init(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3, environ={}) == {
        "coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert init(environ=env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert init(process_id=0, environ=env)["process_id"] == 0               # a flag wins over the environment
    slurm_env = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NTASKS": "16"}
    assert init(environ=slurm_env) == {}                                    # srun: jax detects everything
    assert init(environ={**slurm_env, "SLURM_NTASKS": "1"}) is None         # one task: single process
    assert init(environ={"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "4"}) == {}
    assert init(mode="on", environ={}) == {}                                # Cloud TPU: jax asks the metadata server
    assert init(mode="off", environ=slurm_env) is None
    with pytest.raises(ValueError, match="--distributed=off, but coordinator_address"):
        init(mode="off", environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        init(environ={"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="distributed mode 'yes'"):
        init(mode="yes", environ={})


# ----------------------------------------------------------------------------- local

def test_local_dry_run_prints_every_process(capsys):
    lines = dry_run(local, ["--num_processes=3", "--cpu_devices=2", "--port=4321", "--env=NCCL_DEBUG=WARN"], capsys)
    assert lines[-1] == "wait" and len(lines) == 4
    for index, line in enumerate(lines[:3]):
        words = shlex.split(line)
        assert words[-1] == "&"
        env = dict(w.split("=", 1) for w in words[:6])
        assert env == {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:4321", "JAX_NUM_PROCESSES": "3",
                       "JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu",
                       "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "NCCL_DEBUG": "WARN"}
        assert words[6:-1] == [sys.executable, str(ROOT / "main.py"), *MAIN_FLAGS]


def test_local_process_environment():
    base = {"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"}
    env = local.process_env(1, num_processes=2, port=99, cpu_devices=4, base=base)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"
    gpus = local.process_env(1, num_processes=2, port=99, gpus_per_process=2, base={})
    assert gpus["CUDA_VISIBLE_DEVICES"] == "2,3" and "XLA_FLAGS" not in gpus


def test_local_run_stops_the_others_when_one_fails(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    failing = [sys.executable, "-c", "import os, sys; sys.exit(3 if os.environ['JAX_PROCESS_ID'] == '1' else 0)"]
    plan = [(local.process_env(i, num_processes=2, port=1), sleeper if i == 0 else failing) for i in range(2)]
    started = time.time()
    assert local.run(plan, log_dir=tmp_path) == 3
    assert time.time() - started < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["process_0.log", "process_1.log"]


def test_main_flags_come_after_a_separator():
    assert common.split_main_args(["--num_processes=2", "--", "--mode=train", "--"]) == (
        ["--num_processes=2"], ["--mode=train", "--"])
    with pytest.raises(SystemExit, match="main.py's flags after `--`"):
        local.main(["--dry_run"])
    with pytest.raises(SystemExit, match="not a script"):
        local.main(["--dry_run", "--", "main.py", "--mode=train"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        local.main(["--dry_run", "--env=oops", "--", "--mode=train"])


# ----------------------------------------------------------------------------- Cloud TPU VM pods

def remote_command(line):
    """The shell command an ssh line runs on the workers, split as the remote shell will."""
    [command] = [w.split("=", 1)[1] for w in shlex.split(line) if w.startswith("--command=")]
    return command


def test_tpu_pod_dry_run(capsys):
    lines = dry_run(tpu_pod, ["--tpu=embedder", "--zone=us-central2-b", "--project=my-proj", "--create",
                              "--accelerator_type=v4-32", "--spot", "--env=TPU_STDERR_LOG_LEVEL=0"], capsys)
    assert len(lines) == 6
    zone = ["--zone=us-central2-b", "--project=my-proj"]
    describe, create = (shlex.split(part) for part in lines[0].split(" || "))
    assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "embedder", *zone, "--format=value(state)"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "embedder", *zone,
                      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
    pack = shlex.split(lines[1])
    assert pack[:2] == ["bash", "-c"] and "ls-files -z --cached --others --exclude-standard" in pack[2]
    assert shlex.split(lines[2]) == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/embedder-code.tgz",
                                     "embedder:embedder-code.tgz", *zone, "--worker=all"]
    for line in lines[3:]:
        assert shlex.split(line)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "embedder"]
        assert "--worker=all" in shlex.split(line)
    assert remote_command(lines[3]) == "mkdir -p llm_embedder_jax && tar -xzf ~/embedder-code.tgz -C llm_embedder_jax"
    setup = remote_command(lines[4])
    assert "bash setup.sh" in setup and "python3.11-venv" in setup
    assert "'jax[tpu]==0.10.2' gcsfs google-cloud-storage" in setup
    run = shlex.split(remote_command(lines[5]))
    assert run == ["cd", "llm_embedder_jax", "&&", "TPU_STDERR_LOG_LEVEL=0", ".venv/bin/python", "main.py",
                   "--distributed=on", *MAIN_FLAGS]


def test_tpu_pod_git_source_reuse_and_detach(capsys):
    lines = dry_run(tpu_pod, ["--tpu=pod", "--zone=z", "--source=git", "--git_url=https://example.com/r.git",
                              "--git_ref=v1", "--skip_setup", "--detach", "--repo_dir=code dir"], capsys)
    assert len(lines) == 3 and " || " not in lines[0]                     # no --create: describe only
    assert remote_command(lines[1]).startswith("(test -d 'code dir'/.git || git clone https://example.com/r.git")
    run = remote_command(lines[2])
    assert run.startswith("cd 'code dir' && nohup .venv/bin/python main.py --distributed=on ")
    assert run.endswith(" > launch.log 2>&1 < /dev/null &")
    assert shlex.split(run)[7:-6] == MAIN_FLAGS


def test_tpu_pod_needs_a_bucket_workdir(capsys):
    with pytest.raises(SystemExit):
        tpu_pod.main(["--tpu=pod", "--zone=z", "--dry_run", "--", "--mode=train", "--workdir=runs/local"])
    assert "must be a gs:// path" in capsys.readouterr().err


def test_tpu_pod_runs_the_fallback_only_when_needed():
    assert tpu_pod.execute([[["false"], ["true"]], [["true"]]], dry_run=False) == 0
    assert tpu_pod.execute([[["true"]], [["false"]], [["touch", "/nonexistent/never"]]], dry_run=False) != 0


# ----------------------------------------------------------------------------- Slurm

def test_slurm_script_one_process_per_gpu(capsys):
    lines = dry_run(slurm, ["--nodes=4", "--gpus_per_node=8", "--partition=a100", "--account=ml", "--time=2:00:00",
                            "--repo_dir=/shared/code", "--env=NCCL_DEBUG=WARN"], capsys)
    text = "\n".join(lines)
    assert lines[0] == "# /shared/code/runs/slurm/llm_embedder.sbatch" and lines[1] == "#!/bin/bash"
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=llm_embedder", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8", "#SBATCH --time=2:00:00",
        "#SBATCH --output=/shared/code/runs/slurm/%x-%j.out", "#SBATCH --signal=TERM@300",
        "#SBATCH --partition=a100", "#SBATCH --account=ml"]
    assert "cd /shared/code\nexport NCCL_DEBUG=WARN\n" in text and "JAX_LOCAL_DEVICE_IDS" not in text
    [srun] = [line for line in lines if line.startswith("srun ")]
    assert shlex.split(srun) == ["srun", "--kill-on-bad-exit=1", ".venv/bin/python", "main.py", "--distributed=on",
                                 *MAIN_FLAGS]
    assert lines[-1] == "sbatch /shared/code/runs/slurm/llm_embedder.sbatch"


def test_slurm_one_process_per_node_submits(tmp_path, monkeypatch):
    """Not a dry run: the script is written and given to sbatch (a stand-in that records its argument)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/submitted\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script = tmp_path / "job.sbatch"
    assert slurm.main(["--nodes=2", "--gpus_per_node=4", "--per=node", f"--repo_dir={tmp_path}",
                       f"--script={script}", "--", *MAIN_FLAGS]) == 0
    assert (tmp_path / "submitted").read_text().strip() == str(script)
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=4\n" in text
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in text
    assert (tmp_path / "runs" / "slurm").is_dir()                            # the log folder exists for sbatch
    # bash parses the script: the srun line gives main.py exactly these flags.
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
