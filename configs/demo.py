"""The default config of main.py: embeds this repository's README, one line per text.

  python main.py --workdir=runs/demo
"""
from configs import embed


def get_config(arg=None):
    config = embed.get_config(arg)
    config.workdir = "runs/demo"
    config.input = "README.md"
    config.task = "qa"
    config.kind = "key"
    return config
