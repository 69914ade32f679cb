"""One line of an untrusted JSONL file → its JSON value, or a ValueError that says what is wrong.

`json.loads` alone lets hostile lines through in ways no reader expects: nesting deeper
than the recursion limit raises RecursionError, an integer of more than 4300 digits a
bare ValueError, and `"\\ud800"` is valid JSON that decodes to a string no UTF-8 writer
or tokenizer accepts. `loads` turns each into a ValueError starting "malformed JSON", for
the reader to prefix with its file and line.
"""
import json
import re

# A \uD800-\uDFFF escape: only then can a decoded string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    except ValueError as e:  # a number Python refuses to convert
        raise ValueError(f"malformed JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise ValueError("malformed JSON: a string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), "
                         "which is not text")
    return value


def _has_lone_surrogate(value):
    pending = [value]  # iterative: `value` may be nested nearly as deep as the recursion limit
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False
