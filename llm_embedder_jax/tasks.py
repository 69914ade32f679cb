"""The six retrieval tasks: instructions and reward-prompt templates, as data.

Instructions are the released LLM-Embedder prefixes (query / key); templates are
the released reward prompts that precede the desired output (DESIGN.md §2.1).
"""

TASKS = ("qa", "convsearch", "chat", "lrlm", "icl", "tool")
KINDS = ("query", "key")

INSTRUCTIONS = {
    "qa": {
        "query": "Represent this query for retrieving relevant documents: ",
        "key": "Represent this document for retrieval: ",
    },
    "convsearch": {
        "query": "Encode this query and context for searching relevant passages: ",
        "key": "Encode this passage for retrieval: ",
    },
    "chat": {
        "query": "Embed this dialogue to find useful historical dialogues: ",
        "key": "Embed this historical dialogue for retrieval: ",
    },
    "lrlm": {
        "query": "Embed this text chunk for finding useful historical chunks: ",
        "key": "Embed this historical text chunk for retrieval: ",
    },
    "icl": {
        "query": "Convert this example into vector to look for useful examples: ",
        "key": "Convert this example into vector for retrieval: ",
    },
    "tool": {
        "query": "Transform this user request for fetching helpful tool descriptions: ",
        "key": "Transform this tool description for retrieval: ",
    },
}


# Reward prompts (DESIGN.md §2.1): the text that precedes the desired output, with
# one candidate key ("key") and with none ("no_key", the baseline prompt(∅, q) of the
# rank-aware reward). qa, convsearch, icl and chat are the released templates. For
# lrlm the candidates are consecutive chunks of the history, so a key brings its
# continuation (the next chunk), as the released self-retrieval LM splices them in;
# then come the record's `context` and the query chunk, and the answer is the chunk
# that follows the query. Pieces join without separators: they are cuts of one text.
# Tool records have no desired output, hence no template.
_KNOWLEDGE_TEMPLATE = {
    "key": "Knowledge: {key}\n\nQuestion: {query}\n\nAnswer: ",
    "no_key": "Question: {query}\n\nAnswer: ",
}
REWARD_TEMPLATES = {
    "qa": _KNOWLEDGE_TEMPLATE,
    "convsearch": _KNOWLEDGE_TEMPLATE,
    "icl": {"key": "{key}\n{query}\n", "no_key": "{query}\n"},
    "chat": {"key": "{key}\nSpeaker 1: {query}\nSpeaker 2: ", "no_key": "Speaker 1: {query}\nSpeaker 2: "},
    "lrlm": {"key": "{key}{continuation}{context}{query}", "no_key": "{context}{query}"},
}


def keys_with_continuation(chunks):
    """lrlm keys as the LLM gets them: each history chunk joined with the one after it (the last alone).

    The reward and the evaluation prompt put a retrieved chunk's continuation after it
    (`REWARD_TEMPLATES`), so what a candidate is worth depends on both; an encoder that reads
    the pair sees all of it.
    """
    chunks = list(chunks)
    return [chunk + after for chunk, after in zip(chunks, chunks[1:])] + chunks[-1:]


def check_task(task):
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)} or None")


def check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected 'query' or 'key'")


def instruction(task, kind):
    """The prefix for `kind` texts of `task`; empty when `task` is None."""
    check_task(task)
    check_kind(kind)
    return "" if task is None else INSTRUCTIONS[task][kind]


def with_instruction(texts, *, task, kind):
    prefix = instruction(task, kind)
    return [prefix + t for t in texts]


def prompt_names():
    """Sentence-transformers prompt names, e.g. {'qa_query': 'Represent ...'}."""
    return {f"{t}_{k}": INSTRUCTIONS[t][k] for t in TASKS for k in KINDS}
