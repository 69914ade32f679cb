"""Config validation: unknown keys, wrong types and impossible combinations are refused before any work."""
import importlib
import json
import pathlib

import ml_collections
import pytest

import configs.eval as eval_configs
from configs import demo as demo_configs
from configs import embed as embed_configs
from configs import llm_embedder
from configs import score as score_configs
from llm_embedder_jax import validation
from tests.conftest import docstring_records
from tests.test_train import small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rebuilt(config, path, value=None, *, delete=False):
    """A copy of `config` as a config file could have written it: `path` ("a.b", "a.0.b") set or deleted,
    whatever its type (assigning to a ConfigDict field keeps the field's type)."""
    data = config.to_dict()
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if delete:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return ml_collections.ConfigDict(data)


def problems_of(config, mode, **kwargs):
    return "\n".join(validation.problems(config, mode, **kwargs))


@pytest.fixture(scope="module")
def train_config(tiny_cls_checkpoint, docstring_jsonl):
    return lambda **overrides: small_config(tiny_cls_checkpoint, docstring_jsonl, **overrides)


@pytest.fixture(scope="module")
def unscored_jsonl(tmp_path_factory, real_texts):
    path = tmp_path_factory.mktemp("unscored") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in docstring_records(real_texts, count=16, teacher=False)))
    return path


def test_shipped_configs_pass(toy_dir):
    variants = {"train": (llm_embedder, ["", "tiny", "tiny,qa", "qa", "chat"]), "score": (score_configs, ["", "rank"]),
                "eval": (eval_configs, [""]), "embed": (embed_configs, ["", "bf16"]),
                "demo": (demo_configs, ["", "quick", "full", "rank", "quick,rank"])}
    for mode, (module, names) in variants.items():
        for name in names:
            config = module.get_config(name or None)
            if mode == "embed":
                config.input = str(toy_dir / "qa.json")
            # The full recipe's data lives elsewhere (config.data_dir); the tiny variants read the toy files.
            data = mode != "train" or "tiny" in name
            assert validation.problems(config, mode, check_data=data) == [], (mode, name)


TRAIN_CASES = [
    # unknown keys, with the nearest known key
    ("learnig_rate", 1e-5, r"config\.learnig_rate: unknown key; did you mean 'learning_rate'\?"),
    ("tasks.qa.temprature", 0.1, r"config\.tasks\.qa\.temprature: unknown key; did you mean 'temperature'\?"),
    ("datasets.0.nme", "x", r"config\.datasets\[0\]\.nme: unknown key; did you mean 'name'\?"),
    ("tasks.qaa", llm_embedder.loss_settings("graded").to_dict(),
     r"config\.tasks\.qaa: unknown task; did you mean 'qa'"),
    # wrong types
    ("num_steps", 10.0, r"config\.num_steps=10\.0: expected an int, found float"),
    ("learning_rate", "5e-6", r"config\.learning_rate='5e-6': expected a number, found str"),
    ("remat", True, r"config\.remat=True: expected a string, found bool"),
    ("skip_bad_records", 1, r"config\.skip_bad_records=1: expected true or false, found int"),
    ("datasets", "qa.jsonl", r"config\.datasets='qa\.jsonl': expected a list or tuple, found str"),
    ("self_paced", 3, r"config\.self_paced=3: expected a dict, found int"),
    ("self_paced.smoothing", None, r"config\.self_paced\.smoothing: missing"),
    # values out of range
    ("warmup_ratio", 1.5, r"config\.warmup_ratio=1\.5: expected in \[0, 1\]"),
    ("on_nonfinite", "ignore", r"config\.on_nonfinite='ignore': expected one of 'skip', 'stop'"),
    ("eval_every", -1, r"config\.eval_every=-1: expected >= 0"),
    ("learning_rate", float("inf"), r"config\.learning_rate=inf: expected a finite number > 0"),
    ("learning_rate", 0.0, r"config\.learning_rate=0\.0: expected a finite number > 0"),
    ("tasks.qa.loss", "listwise", r"config\.tasks\.qa\.loss='listwise': expected one of 'contrastive', 'graded', 'kl'"),
    ("datasets.0.task", "qaa", r"config\.datasets\[0\]\.task='qaa': expected '' \(from the records\) or one of qa"),
    ("mixture", "equal", r"config\.mixture='equal': expected one of 'proportional', 'weights'"),
    ("dtype", "float16", r"config\.dtype='float16': expected one of 'float32', 'bfloat16'"),
    # impossible combinations
    ("global_batch_size", 12, r"global_batch_size=12 does not split over 8 data-parallel devices .*multiple of 8"),
    ("model_parallel", 3, r"config\.model_parallel=3 does not divide the 8 devices"),
    ("gradcache_chunk", 4, r"config\.gradcache_chunk=4 must divide .* multiple of the 8 data-parallel devices"),
    ("key_max_len", 256, r"config\.key_max_len=256 exceeds the 128 positions of .*: use at most 128"),
    ("self_paced.min_scale", 3.0, r"config\.self_paced\.min_scale=3\.0 is above max_scale=2\.0"),
    ("datasets.0.settings.select_postive", "teacher", r"config\.datasets\[0\]\.settings: unknown sample settings"),
    ("tasks.qa", None, r"config\.datasets\[0\]\.task='qa' has no loss settings: add config\.tasks\.qa"),
]


@pytest.mark.parametrize("path, value, message", TRAIN_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in TRAIN_CASES])
def test_train_config_problems_name_the_field_and_the_fix(train_config, path, value, message):
    config = rebuilt(train_config(), path, value, delete=value is None)
    with pytest.raises(validation.ConfigError, match=message):
        validation.validate(config, "train")


def test_weights_mixture_needs_positive_weights(train_config):
    config = train_config(mixture="weights")
    config.datasets[0].weight = 0.0
    assert "config.datasets[0].weight=0.0: config.mixture='weights' needs a weight > 0" in problems_of(config, "train")


def test_every_problem_is_reported_at_once(train_config):
    config = train_config(warmup_ratio=2.0, eval_every=-5, global_batch_size=12)
    config.tasks.qa.temperature = -1.0
    with pytest.raises(validation.ConfigError) as error:
        validation.validate(config, "train")
    assert len(error.value.problems) == 4 and str(error.value).startswith("4 problem(s) with the train config")


@pytest.mark.parametrize("loss", ["graded", "kl"])
def test_distillation_on_data_without_teacher_scores(train_config, unscored_jsonl, loss):
    config = train_config()
    config.data_dir, config.datasets[0].path = str(unscored_jsonl.parent), unscored_jsonl.name
    config.tasks.qa.loss = loss
    found = problems_of(config, "train")
    assert f"its first record ({unscored_jsonl}:1) has no teacher_scores, but config.tasks.qa.loss='{loss}'" in found
    config.tasks.qa.loss = "contrastive"
    assert problems_of(config, "train") == ""
    # Sample settings that rank by teacher scores need them too, whatever the loss.
    config.datasets[0].settings.select_positive = "teacher"
    needs_teacher = "field 'teacher_scores': missing, but SampleSettings(select_positive='teacher'"
    assert needs_teacher in problems_of(config, "train")
    assert "teacher" not in problems_of(config, "train", check_data=False)  # the demo checks before it has data


def test_missing_data_files(train_config, tmp_path):
    config = train_config()
    config.data_dir = str(tmp_path)
    found = problems_of(config, "train")
    assert f"config.datasets[0] ({tmp_path / 'qa.jsonl'}): no such file or folder" in found
    assert f"config.eval_files[0] ({tmp_path / 'qa.jsonl'}): no such file" in found


def test_bad_first_record_is_named_by_file_and_line(train_config, tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"query": "q", "pos": "one passage", "neg": []}\n')
    config = train_config()
    config.data_dir = str(tmp_path)
    found = problems_of(config, "train")
    assert f"{tmp_path / 'qa.jsonl'}:1: field 'pos': expected a list of strings, got str" in found


OTHER_CASES = [
    ("score", score_configs, "batch_size", 0, r"config\.batch_size=0: expected >= 1"),
    ("score", score_configs, "rank.top_p", 0.0, r"config\.rank\.top_p=0\.0: expected in \(0, 1\]"),
    ("score", score_configs, "task", "tool", r"config\.task='tool': expected '' \(from the records\) or one of qa"),
    ("score", score_configs, "model_parallel", 3, r"config\.model_parallel=3 does not divide this host's 8 devices"),
    ("score", score_configs, "llm", "/no/such/llm", r"config\.llm: /no/such/llm does not exist"),
    ("score", score_configs, "inputs", ("/no/such.jsonl",), r"config\.inputs: /no/such\.jsonl does not exist"),
    ("score", score_configs, "reward_temperature", 1.0, r"config\.reward_temperature: unknown key"),
    ("eval", eval_configs, "instructions", "sometimes", r"config\.instructions='sometimes': expected one of 'auto'"),
    ("eval", eval_configs, "files", ("/no/such.jsonl",), r"config\.files: /no/such\.jsonl does not exist"),
    ("eval", eval_configs, "ks", ("1", "5"), r"config\.ks\[0\]='1': expected an int, found str"),
    ("embed", embed_configs, "kind", "document", r"config\.kind='document': expected one of 'query', 'key'"),
    ("embed", embed_configs, "task", "qaa", r"config\.task='qaa': expected '' \(no instruction\) or one of"),
    ("embed", embed_configs, "input", "/no/such.txt", r"config\.input: /no/such\.txt does not exist"),
    ("demo", demo_configs, "eval.retrievers", ("bm25",), r"config\.eval\.retrievers entry 'bm25': expected '<name>="),
    ("demo", demo_configs, "data.chunk_tokens", 0, r"config\.data \(train split\): chunk_tokens=0"),
    ("demo", demo_configs, "train.global_batch_size", 12, r"config\.train\.global_batch_size=12 does not split"),
    ("demo", demo_configs, "score.batch_size", 0, r"config\.score\.batch_size=0: expected >= 1"),
    ("demo", demo_configs, "train.tasks.lrlm.los", "kl", r"config\.train\.tasks\.lrlm\.los: unknown key"),
]


@pytest.mark.parametrize("mode, module, path, value, message", OTHER_CASES,
                         ids=[f"{c[0]}:{c[2]}={c[3]!r}"[:40] for c in OTHER_CASES])
def test_other_modes(toy_dir, mode, module, path, value, message):
    config = module.get_config()
    if mode == "embed":
        config.input = str(toy_dir / "qa.json")
    with pytest.raises(validation.ConfigError, match=message):
        validation.validate(rebuilt(config, path, value), mode)


@pytest.fixture
def no_models(monkeypatch):
    """Loading any model fails the test: validation must come first."""
    from llm_embedder_jax import export, llm, score

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(export.Embedder, "from_pretrained", refuse)
    monkeypatch.setattr(llm.RewardLM, "from_pretrained", refuse)
    monkeypatch.setattr(score, "load_reward_lm", refuse)


def test_every_mode_checks_its_config_first(no_models, tmp_path, train_config, toy_dir):
    main = importlib.import_module("main")
    bad = {
        "train": train_config(warmup_ratio=2.0),
        "score": rebuilt(score_configs.get_config(), "batch_size", 0),
        "eval": rebuilt(eval_configs.get_config(), "instructions", "x"),
        "embed": rebuilt(embed_configs.get_config(), "kind", "document"),
        "demo": rebuilt(demo_configs.get_config("quick"), "eval.retrievers", ("bm25",)),
    }
    bad["embed"].input = str(toy_dir / "qa.json")
    assert set(bad) == set(main.MODES)
    for mode, config in bad.items():
        module, function = main.MODES[mode].split(":")
        with pytest.raises(validation.ConfigError, match=f"1 problem\\(s\\) with the {mode} config"):
            getattr(importlib.import_module(module), function)(config, tmp_path / mode)
        assert not (tmp_path / mode).exists()  # nothing written either
