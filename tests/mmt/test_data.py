import gzip
import json
from collections import Counter
from types import SimpleNamespace

import pytest

from mmt import data as D
from mmt.config import load_config


def _gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(x + "\n" for x in lines))


def test_read_lines_plain_and_gzip_keep_spaces(tmp_path):
    _gz(tmp_path / "a.txt.gz", [" lead", "trail ", "x"])
    (tmp_path / "b.txt").write_text(" lead\ntrail \nx\n", encoding="utf-8")
    assert D.read_lines(tmp_path / "a.txt.gz")[0] == [" lead", "trail ", "x"]
    assert D.read_lines(tmp_path / "b.txt")[0] == [" lead", "trail ", "x"]


def test_empty_and_overlong_lines_name_file_and_line(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("ok\n\nok\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=r"x\.txt:2: empty line"):
        D.read_lines(f)
    assert D.read_lines(f, on_bad_line="skip")[1] == [1]
    g = tmp_path / "y.txt"
    g.write_text("ok\nok\n" + "a" * 50 + "\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=r"y\.txt:3: over-long"):
        D.read_lines(g, max_chars=20)


def test_invalid_utf8_names_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine\nstill fine\n\xff\xfe broken\n")
    with pytest.raises(D.DataError, match=r"bad\.txt:3: not valid UTF-8"):
        D.read_lines(f)


def test_parallel_loader_and_misalignment(tmp_path):
    _gz(tmp_path / "de-en" / "train.de.gz", ["Hallo", "Welt"])
    _gz(tmp_path / "de-en" / "train.en.gz", ["Hello", "World"])
    ex = D.load_parallel(tmp_path, ("de", "en"))
    assert [(e.src, e.tgt) for e in ex] == [("Hallo", "Hello"), ("Welt", "World")]
    rev = D.load_parallel(tmp_path, ("en", "de"))  # the other folder order is found too
    assert rev[0].src == "Hello" and rev[0].direction == ("en", "de")
    _gz(tmp_path / "fr-en" / "train.fr.gz", ["a", "b", "c"])
    _gz(tmp_path / "fr-en" / "train.en.gz", ["a", "b"])
    with pytest.raises(D.DataError, match=r"misaligned.*train\.fr\.gz has 3 lines.*train\.en\.gz has 2"):
        D.load_parallel(tmp_path, ("fr", "en"))
    with pytest.raises(D.DataError, match="no parallel files for cs-en"):
        D.load_parallel(tmp_path, ("cs", "en"))


def test_parallel_skip_drops_both_sides(tmp_path):
    _gz(tmp_path / "de-en" / "train.de.gz", ["a", "", "c"])
    _gz(tmp_path / "de-en" / "train.en.gz", ["A", "B", "C"])
    with pytest.raises(D.DataError, match=r"train\.de\.gz:2"):
        D.load_parallel(tmp_path, ("de", "en"))
    ex = D.load_parallel(tmp_path, ("de", "en"), on_bad_line="skip")
    assert [(e.src, e.tgt) for e in ex] == [("a", "A"), ("c", "C")]


def test_jsonl_errors(tmp_path):
    good = {"src_lang": "de", "tgt_lang": "eng_Latn", "src": "Hallo", "tgt": "Hello"}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(good) + "\n" + "{broken\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=r"d\.jsonl:2: invalid JSON"):
        D.load_jsonl(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "src_lang": "xx"}) + "\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=r"d\.jsonl:2: unknown language code 'xx'"):
        D.load_jsonl(f)
    f.write_text(json.dumps({"src_lang": "de", "src": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=r"d\.jsonl:1: missing key"):
        D.load_jsonl(f)
    f.write_text(json.dumps(good) + "\n", encoding="utf-8")
    (e,) = D.load_jsonl(f)
    assert e.direction == ("de", "en") and e.where.endswith("d.jsonl:1")


def test_flores_folder_alignment(tmp_path):
    _gz(tmp_path / "deu_Latn.txt.gz", ["a", "b"])
    (tmp_path / "eng_Latn.txt").write_text("A\nB\nC\n", encoding="utf-8")
    with pytest.raises(D.DataError, match="not line-aligned"):
        D.load_flores(tmp_path, ["de", "en"])
    with pytest.raises(D.DataError, match="no file for language 'fr'"):
        D.load_flores(tmp_path, ["fr"])


def test_templates():
    assert D.build_prompt("T1", "de", "en", "Hallo") == "Translation: [German]: Hallo [English]:"
    assert D.build_prompt("T4", "de", "en", "Hallo") == "Hallo Translate to [English]:"
    assert (
        D.build_prompt("alma", "de", "en", "Hallo") == "Translate this from German to English:\nGerman: Hallo\nEnglish:"
    )
    assert D.build_prompt("xalma", "cs", "en", "Ahoj").startswith("[INST] Translate this from Czech to English:")
    with pytest.raises(ValueError, match="unknown template"):
        D.build_prompt("T9", "de", "en", "x")
    shot = D.Example("de", "en", "Ja", "Yes")
    p = D.build_fewshot_prompt("T1", [shot], "de", "en", "Nein")
    assert p == "Translation: [German]: Ja [English]: Yes\nTranslation: [German]: Nein [English]:"


def test_loss_masks(tok):
    prompt = D.build_prompt("T1", "de", "en", "Hallo Welt")
    ids, labels = D.encode_pair(tok, prompt, "Hello world", max_length=128, loss_on="target")
    n_prompt = len(tok(prompt)["input_ids"])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels[:n_prompt] == [D.IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:-1]) == " Hello world"
    ids2, labels2 = D.encode_pair(tok, prompt, "Hello world", max_length=128, loss_on="full")
    assert ids2 == ids and labels2[0] == D.IGNORE_INDEX and labels2[1:] == ids[1:]
    ids3, labels3 = D.encode_pair(tok, prompt, "Hello world", max_length=5)
    assert len(ids3) == len(labels3) == 5


def test_collate_padding_sides():
    feats = [([5, 6, 7], [-100, 6, 7]), ([8], [8])]
    r = D.collate(feats, pad_id=0)
    assert r["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert r["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert r["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = D.collate(feats, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def _toy_set(sizes):
    keys = []
    for k, n in sizes.items():
        keys += [k] * n
    return D.TrainSet([[1, 2]] * len(keys), [[1, 2]] * len(keys), keys)


def test_mixed_sampler_epoch_and_determinism():
    ts = _toy_set({("de", "en"): 10, ("en", "de"): 6})
    s = D.StepSampler(ts, 4, mode="mixed", seed=1)
    seen = [i for _ in range(4) for i in s.next()[0]]
    assert sorted(seen) == list(range(16))  # one epoch = every example exactly once
    s2 = D.StepSampler(ts, 4, mode="mixed", seed=1)
    assert [i for _ in range(4) for i in s2.next()[0]] == seen
    s3 = D.StepSampler(ts, 4, mode="mixed", seed=2)
    assert [i for _ in range(4) for i in s3.next()[0]] != seen


def test_pair_sampler_homogeneous_round_robin():
    ts = _toy_set({("de", "en"): 5, ("en", "de"): 3, ("fr", "en"): 7})
    s = D.StepSampler(ts, 4, mode="pair", seed=0)
    pairs = []
    for _ in range(6):
        batch, pair = s.next()
        assert {ts.keys[i] for i in batch} == {pair}
        pairs.append(pair)
    assert pairs[:3] == sorted(set(pairs), key=str) and pairs[3:] == pairs[:3]


def test_temperature_sampling_flattens():
    ts = _toy_set({("de", "en"): 900, ("en", "de"): 100})
    counts = {}
    for temp in (1.0, 100.0):
        s = D.StepSampler(ts, 50, mode="mixed", seed=0, temperature=temp)
        c = Counter(ts.keys[i] for _ in range(40) for i in s.next()[0])
        counts[temp] = c[("en", "de")] / sum(c.values())
    assert 0.05 < counts[1.0] < 0.16
    assert 0.4 < counts[100.0] < 0.6
    assert D.temperature_probs([900, 100], 1.0) == pytest.approx([0.9, 0.1])


def test_sampler_resume_state():
    ts = _toy_set({("de", "en"): 7, ("en", "de"): 5})
    for mode, temp in (("mixed", 1.0), ("mixed", 3.0), ("pair", 1.0)):
        a = D.StepSampler(ts, 3, mode=mode, seed=5, temperature=temp)
        full = [a.next() for _ in range(8)]
        b = D.StepSampler(ts, 3, mode=mode, seed=5, temperature=temp)
        for _ in range(3):
            b.next()
        state = b.state_dict()
        c = D.StepSampler(ts, 3, mode=mode, seed=5, temperature=temp)
        c.load_state_dict(state)
        assert [c.next() for _ in range(5)] == full[3:]


def test_shard_micro_batches():
    assert D.shard_micro_batches(list(range(8)), 1, 2, 2) == [[4, 5], [6, 7]]
    with pytest.raises(ValueError):
        D.shard_micro_batches(list(range(8)), 0, 3, 2)


def test_filters_groups_and_languages():
    ex = [D.Example("de", "en", "a", "b"), D.Example("en", "ja", "a", "b"), D.Example("fr", "de", "a", "b")]
    assert [e.direction for e in D.filter_directions(ex, groups=[6])] == [("en", "ja")]
    assert [e.direction for e in D.filter_directions(ex, languages=["de", "en"])] == [("de", "en")]
    assert [e.direction for e in D.filter_directions(ex, directions=[("fr", "de")])] == [("fr", "de")]


def test_build_train_set_from_jsonl(tok, jsonl_data):
    cfg = load_config(None, [f"data.train=[{{kind: jsonl, path: {jsonl_data}, directions: [de-en, en-de]}}]"])
    ts = D.build_train_set(cfg.data, tok)
    assert len(ts) == 24 and set(ts.streams) == {("de", "en"), ("en", "de")}
    plan = SimpleNamespace(sampler="mixed", directions=[("de", "en")], loss_on="full", method="x")
    ts2 = D.build_train_set(cfg.data, tok, plan=plan)
    assert set(ts2.streams) == {("de", "en")}
    assert ts2.label_tokens(0) == len(ts2.ids[0]) - 1  # full loss: every token but BOS


def test_shared_data_sources(tok, shared_data):
    cfg = load_config(
        None,
        [
            "data.train=[{kind: parallel, directions: [de-en, en-de], max_examples: 5},"
            " {kind: tatoeba, directions: [en-fr], max_examples: 4}, {kind: flores, directions: [de-ru], max_examples: 3}]"
        ],
    )
    ts = D.build_train_set(cfg.data, tok)
    sizes = {k: len(v) for k, v in ts.streams.items()}
    assert sizes == {("de", "en"): 5, ("en", "de"): 5, ("en", "fr"): 4, ("de", "ru"): 3}
    flores = D.load_flores(shared_data / "flores200" / "devtest", ["de", "en"])
    assert len(flores["de"]) == len(flores["en"]) == 1012


def test_mono_train_set(tok, tmp_path):
    _gz(tmp_path / "mono" / "deu_Latn.txt.gz", ["Guten Morgen.", "Wie geht es dir?", "Danke."])
    (tmp_path / "mono" / "fra_Latn.txt").write_text("Bonjour.\nMerci.\n", encoding="utf-8")
    cfg = load_config(None, [f"data.data_dir={tmp_path}", "data.train=[{kind: mono, directions: [de, fr]}]"])
    plan = SimpleNamespace(sampler="mono", directions=None, loss_on=None, method="x")
    ts = D.build_train_set(cfg.data, tok, plan=plan)
    assert ts.mono and {k: len(v) for k, v in ts.streams.items()} == {"de": 3, "fr": 2}
    assert ts.labels[0][0] == D.IGNORE_INDEX and ts.labels[0][1:] == ts.ids[0][1:]
    s = D.StepSampler(ts, 5, mode="mono", seed=0)
    assert sorted(s.next()[0]) == list(range(5))
    with pytest.raises(D.DataError, match="does not fit"):
        D.build_train_set(cfg.data, tok)  # mono data with a translation plan
