"""llm_embedder_jax entry point: one mode, one call into the library.

  python main.py                                            # the demo (configs/demo.py)
  python main.py --mode=embed --config=configs/embed.py --config.input=texts.txt
  python main.py --mode=score --config=configs/score.py:toy --workdir=runs/score
  python main.py --mode=train --config=configs/llm_embedder.py:tiny --workdir=runs/tiny
  python main.py --mode=train ... --coordinator_address=10.0.0.2:8476 --num_processes=4 --process_id=0
                                                            # one of 4 processes (docs/scaling.md)
"""
import importlib

from absl import app, flags
from ml_collections import config_flags

from llm_embedder_jax import distributed

# Each mode is "module:function"; the function takes (config, workdir).
MODES = {
    "embed": "llm_embedder_jax.export:run_embed",
    "score": "llm_embedder_jax.score:run_score",
    "train": "llm_embedder_jax.train:train_and_evaluate",
    "eval": "llm_embedder_jax.evaluate:run_eval",
    "demo": "llm_embedder_jax.demo:run_demo",
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", None, list(MODES), "What to run; defaults to the config's own `mode`.")
flags.DEFINE_string("workdir", None, "Output folder (local or remote path); defaults to the config's.")
config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file, variant after a colon.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                 "Multi-process JAX: 'auto' initialises when a coordinator is given or under srun/mpirun with "
                 "several tasks; 'on' always (Cloud TPU pods: jax finds the workers); 'off' never.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (else $JAX_PROCESS_ID).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    mode = FLAGS.mode or config.get("mode")
    if mode not in MODES:
        raise app.UsageError(f"no mode: pass --mode (one of {', '.join(MODES)}) or set config.mode")
    workdir = FLAGS.workdir or config.get("workdir")
    if not workdir:
        raise app.UsageError("no workdir: pass --workdir or set config.workdir")
    distributed.initialize(mode=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    module, function = MODES[mode].split(":")
    getattr(importlib.import_module(module), function)(config, workdir)


if __name__ == "__main__":
    app.run(main)
