"""llm_embedder_jax: one embedding model for every retrieval need of an LLM, trained from its feedback."""

__all__ = ["Embedder", "RewardLM"]


def __getattr__(name):
    # Lazy, so that `import llm_embedder_jax.losses` does not load tokenizers or the LLM.
    if name == "Embedder":
        from llm_embedder_jax.export import Embedder
        return Embedder
    if name == "RewardLM":
        from llm_embedder_jax.llm import RewardLM
        return RewardLM
    raise AttributeError(f"module 'llm_embedder_jax' has no attribute {name!r}")
