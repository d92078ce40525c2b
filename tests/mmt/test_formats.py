"""Data formats: ALMA/X-ALMA JSON, local Hugging Face datasets (data files, save_to_disk), BOMs, the summary."""

from __future__ import annotations

import json

import pytest

from mmt.config import DataSource, load_config
from mmt.data import build_train_set
from mmt.data.readers import load_alma_json, load_source
from mmt.data.summary import summarize
from mmt.errors import DataError

RECORDS = [
    {"translation": {"de": "Das Wetter ist schön.", "en": "The weather is nice."}},
    {"translation": {"de": "Wo ist der Bahnhof?", "en": "Where is the train station?"}},
    {"translation": {"deu_Latn": "Ich lese.", "eng_Latn": "I read."}},
]


def _alma(path, records=RECORDS, bom=False, array=False):
    text = (
        json.dumps(records, ensure_ascii=False)
        if array
        else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


@pytest.mark.parametrize("array", [False, True])
def test_alma_both_directions_from_one_file_with_bom(tmp_path, array):
    exs = load_alma_json(_alma(tmp_path / "train.de-en.json", bom=True, array=array))
    assert [(e.src_lang, e.tgt_lang) for e in exs] == [("de", "en"), ("en", "de")] * 3
    assert exs[0].src == "Das Wetter ist schön." and exs[1].src == "The weather is nice."
    assert exs[5].src == "I read." and exs[5].tgt == "Ich lese."
    assert exs[2].where.endswith(":2") or exs[2].where.endswith("[1]")


def test_alma_directions_select(tmp_path):
    path = _alma(tmp_path / "x.json", RECORDS + [{"translation": {"cs": "Ahoj.", "en": "Hi.", "de": "Hallo."}}])
    exs = load_alma_json(path, [("en", "de"), ("cs", "en")])
    assert [(e.src_lang, e.tgt_lang) for e in exs] == [("en", "de")] * 4 + [("cs", "en")]
    with pytest.raises(DataError, match=r"x\.json:4: 'translation' has 3 languages"):
        load_alma_json(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"translation": {"de": "a", "en": "b"}}\n{"translation": \n', r":2: invalid JSON"),
        ('{"src": "a"}\n', r":1: expected an object with a 'translation' mapping"),
        ('{"translation": {"de": "a", "klingon": "b"}}\n', r":1: unknown language code 'klingon'"),
        ('{"translation": {"de": "a", "en": 3}}\n', r":1: translation\['en'\] must be a string"),
        ('{"translation": {"de": "a", "en": " "}}\n', r":1: empty text"),
    ],
)
def test_alma_errors_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_alma_json(p)


def test_alma_skip_reports(tmp_path, capsys):
    p = _alma(tmp_path / "a.json", RECORDS + [{"translation": {"de": "", "en": "x"}}])
    assert len(load_alma_json(p, on_bad_line="skip")) == 6
    assert "skipped 1 of 4 records" in capsys.readouterr().out


def test_alma_source_through_the_config_and_summary(tmp_path, tok):
    _alma(tmp_path / "train.json")
    cfg = load_config(None, [f"data.data_dir={tmp_path}"])
    cfg.data.train = [DataSource(kind="alma", path="train.json")]
    ts = build_train_set(cfg.data, tok)
    assert {k: len(v) for k, v in ts.streams.items()} == {("de", "en"): 3, ("en", "de"): 3}
    text = summarize(ts, {"train.json": {"empty text": 2}})
    assert "6 examples in 2 directions" in text
    assert "de-en" in text and "en-de" in text and "train.json: 2 empty text" in text
    loss_tokens = sum(ts.label_tokens(i) for i in ts.streams[("de", "en")])
    assert f"{loss_tokens:>11,}" in text.splitlines()[2]
    assert "skipped: none" in summarize(ts)


def test_hf_local_data_files_and_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    files = _alma(tmp_path / "train.jsonl", bom=True)
    src = DataSource(kind="hf", path=str(files), directions=["de-en", "en-de"])
    exs = load_source(src, None)
    assert sorted({e.direction for e in exs}) == [("de", "en"), ("en", "de")] and len(exs) == 6
    flat = tmp_path / "flat.csv"
    flat.write_text("\ufeffquelle,ziel\nHallo,Hello\nDanke,Thanks\n", encoding="utf-8")
    exs = load_source(
        DataSource(kind="hf", path=str(flat), directions=["de-en"], src_field="quelle", tgt_field="ziel"), None
    )
    assert [(e.src, e.tgt) for e in exs] == [("Hallo", "Hello"), ("Danke", "Thanks")]
    saved = tmp_path / "saved"
    rows = datasets.load_dataset("json", data_files=str(_alma(tmp_path / "two.jsonl", RECORDS[:2])), split="train")
    datasets.DatasetDict({"train": rows}).save_to_disk(str(saved))
    exs = load_source(DataSource(kind="hf", path=str(saved), directions=["en-de"]), None)
    assert [e.src for e in exs] == ["The weather is nice.", "Where is the train station?"]
    with pytest.raises(DataError, match="splits \\['train'\\], not 'test'"):
        load_source(DataSource(kind="hf", path=str(saved), directions=["en-de"], split="test"), None)


def test_hf_without_datasets_names_the_extra(tmp_path, monkeypatch):
    import sys

    from mmt.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"mmt\[hf\]"):
        load_source(DataSource(kind="hf", path=str(_alma(tmp_path / "t.jsonl")), directions=["de-en"]), None)


# --------------------------------------------------------------------------------------------
# prompt formats: chat templates and several instruction templates

CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_tok(tok_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok_dir)
    t.chat_template = CHAT
    return t


def test_chat_prompt_through_apply_chat_template(chat_tok, tok):
    from mmt.data import PromptBuilder, build_prompt

    user = build_prompt("alma", "de", "en", "Hallo Welt.")
    for name in ("chat", "xalma"):
        p = PromptBuilder(name, chat_tok)("de", "en", "Hallo Welt.")
        assert p == f"<|user|>{user}\n<|assistant|>"  # the tokenizer adds BOS itself: not written twice
        ids = chat_tok(p)["input_ids"]
        assert ids[0] == chat_tok.bos_token_id and ids[1] != chat_tok.bos_token_id
    # without a chat template, xalma keeps its Llama-2 chat string and chat refuses
    assert PromptBuilder("xalma", tok)("de", "en", "Hallo Welt.") == build_prompt("xalma", "de", "en", "Hallo Welt.")
    with pytest.raises(Exception, match="chat template"):
        PromptBuilder("chat", tok)


def test_chat_template_training_set(tmp_path, chat_tok):
    _alma(tmp_path / "train.json")
    cfg = load_config(None, [f"data.data_dir={tmp_path}", "data.template=chat"])
    cfg.data.train = [DataSource(kind="alma", path="train.json")]
    ts = build_train_set(cfg.data, chat_tok)
    text = chat_tok.decode(ts.ids[0])
    assert text.startswith("<s><|user|>Translate this from German to English:") and "<|assistant|>" in text


def test_several_templates_drawn_per_example_with_the_seed(tmp_path, tok):
    from mmt.data import PromptBuilder, build_prompt

    names = ["T1", "T3", "alma"]

    def draws(seed):
        builder = PromptBuilder(names, tok, seed=seed)
        return [builder("de", "en", "x") for _ in range(60)]

    assert draws(3) == draws(3)
    assert {build_prompt(n, "de", "en", "x") for n in names} == set(draws(3))  # every template is used
    assert draws(3) != draws(4)
    _alma(tmp_path / "train.json")
    overrides = [f"data.data_dir={tmp_path}", "data.templates=[T1, T3, alma]", "data.seed=5"]
    cfg = load_config(None, overrides)
    cfg.data.train = [DataSource(kind="alma", path="train.json")]
    a, b = build_train_set(cfg.data, tok), build_train_set(cfg.data, tok)
    assert a.ids == b.ids  # same seed, same prompts
    with pytest.raises(Exception, match="unknown template 'T9'"):
        PromptBuilder(["T1", "T9"])


# --------------------------------------------------------------------------------------------
# optional scorers say whether they are on, and why not


def test_scorer_status(tmp_path, monkeypatch):
    from mmt import scorers
    from mmt.config import EvalConfig

    monkeypatch.setenv("SACREBLEU", str(tmp_path / "sb"))
    st = scorers.scorer_status(EvalConfig())
    assert st["BLEU"] == st["chrF++"] == "on"
    assert st["spBLEU"] == "off: eval.spbleu is false" and "no eval.comet_model" in st["COMET"]
    installed = {"sentencepiece": False, "comet": False}
    monkeypatch.setattr(scorers, "_installed", lambda m: installed[m])
    cfg = EvalConfig(spbleu=True, comet_model=str(tmp_path / "comet"))
    st = scorers.scorer_status(cfg)
    assert "sentencepiece package is not installed" in st["spBLEU"] and "unbabel-comet" in st["COMET"]
    installed.update(sentencepiece=True, comet=True)
    st = scorers.scorer_status(cfg)
    assert str(tmp_path / "sb" / "models" / "flores200sacrebleuspm") in st["spBLEU"]
    assert "no COMET checkpoint" in st["COMET"]
    scorers.spbleu_model_file().parent.mkdir(parents=True)
    scorers.spbleu_model_file().write_bytes(b"model")
    (tmp_path / "comet" / "checkpoints").mkdir(parents=True)
    (tmp_path / "comet" / "checkpoints" / "model.ckpt").write_bytes(b"ckpt")
    assert scorers.scorer_status(cfg) == {"BLEU": "on", "chrF++": "on", "spBLEU": "on", "COMET": "on"}
    assert "scorer spBLEU: on" in scorers.describe(scorers.scorer_status(cfg))


def test_evaluation_prompts_a_chat_model_as_it_was_trained(tmp_path, chat_tok, monkeypatch):
    from mmt import evaluate as E
    from mmt.config import EvalConfig
    from mmt.data import PromptBuilder

    test = tmp_path / "flores200" / "devtest"
    test.mkdir(parents=True)
    (test / "deu_Latn.txt").write_text("Hallo Welt.\nGuten Morgen.\n", encoding="utf-8")
    (test / "eng_Latn.txt").write_text("Hello world.\nGood morning.\n", encoding="utf-8")
    seen: dict = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen["prompts"], seen["template"] = list(prompts), kw.get("template")
        return ["Hello world.", "Good morning."]

    monkeypatch.setattr(E, "generate", fake_generate)
    cfg = EvalConfig(test_set="flores200/devtest", directions=["de-en"], off_target=False)
    report = E.evaluate(None, chat_tok, cfg, template="chat", data_dir=tmp_path, log=lambda *a: None)
    build = PromptBuilder("chat", chat_tok)
    assert seen["prompts"] == [build("de", "en", "Hallo Welt."), build("de", "en", "Guten Morgen.")]
    assert seen["template"] == "alma"  # hypotheses are cut at the user template's next field
    assert report.results[0].chrf == pytest.approx(100.0)
