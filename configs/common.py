"""Shared by the configs: where the toy data lives (../shared beside the checkout, present in CI)."""
import pathlib

TOY_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_embedder_toy"
