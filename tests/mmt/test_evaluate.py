import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmt import evaluate as E
from mmt.data import build_prompt
from mmt.testing import tiny_model

HYPS = ["The cat sat on the mat.", "It is raining today in the city.", "We are going home now!", "Hello world"]
REFS = ["The cat is sitting on the mat.", "Today it is raining in the city.", "We go home now.", "Hello, world!"]


def _sacrebleu_cli(tmp_path, args):
    exe = shutil.which("sacrebleu", path=str(Path(sys.executable).parent)) or shutil.which("sacrebleu")
    if exe is None:
        pytest.skip("sacrebleu CLI not found")
    (tmp_path / "hyp.txt").write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    out = subprocess.run(
        [exe, str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"), "-b", "-w", "4", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def test_bleu_matches_sacrebleu_cli(tmp_path):
    assert E.bleu(HYPS, REFS, "en") == pytest.approx(_sacrebleu_cli(tmp_path, ["-m", "bleu", "-tok", "13a"]), abs=1e-4)


def test_chrfpp_matches_sacrebleu_cli(tmp_path):
    assert E.chrf_pp(HYPS, REFS) == pytest.approx(
        _sacrebleu_cli(tmp_path, ["-m", "chrf", "--chrf-word-order", "2"]), abs=1e-4
    )


def test_bleu_tokenizer_choice():
    assert E.bleu_tokenizer("zh") == "zh" and E.bleu_tokenizer("zho_Hans") == "zh"
    assert E.bleu_tokenizer("ja") in ("ja-mecab", "char")
    assert E.bleu_tokenizer("de") == "13a"
    # Chinese without spaces: zh tokenisation gives credit where 13a sees one long token
    assert E.bleu(["我喜欢吃苹果。"], ["我喜欢吃香蕉。"], "zh") > 0


def test_off_target_rate():
    pytest.importorskip("py3langid")
    hyps = ["Das ist ein schöner Tag und wir gehen spazieren.", "This is a beautiful day and we go for a walk.", ""]
    assert E.off_target_rate(hyps, "en") == pytest.approx(2 / 3)
    assert E.off_target_rate(hyps[:1], "deu_Latn") == 0.0


def test_postprocess_stops_at_newline():
    assert E.postprocess(" Hello world\n[German]: x") == "Hello world"


def test_generate_left_padding_is_batch_invariant(tok):
    m = tiny_model("llama", vocab=len(tok), seed=3)
    prompts = [
        build_prompt("T1", "de", "en", "Hallo"),
        build_prompt("T1", "de", "en", "Das ist ein viel längerer Satz mit vielen Wörtern."),
    ]
    alone = [E.generate(m, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    batched = E.generate(m, tok, prompts, batch_size=2, max_new_tokens=6)
    assert batched == alone
    assert all("\n" not in h and "Translation:" not in h for h in batched)


def test_generate_beam_runs(tok):
    m = tiny_model("qwen2", vocab=len(tok), seed=1)
    out = E.generate(m, tok, ["Translation: [German]: Ja [English]:"] * 3, batch_size=2, num_beams=2, max_new_tokens=4)
    assert len(out) == 3 and out[0] == out[1] == out[2]


def test_evaluate_on_folder_with_shots(tok, tmp_path):
    import gzip

    def w(p, lines):
        p.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(p, "wt", encoding="utf-8") as fh:
            fh.write("".join(x + "\n" for x in lines))

    w(tmp_path / "test" / "deu_Latn.txt.gz", ["Hallo Welt.", "Guten Tag."])
    w(tmp_path / "test" / "eng_Latn.txt.gz", ["Hello world.", "Good day."])
    w(tmp_path / "dev" / "deu_Latn.txt.gz", ["Danke.", "Bitte.", "Ja."])
    w(tmp_path / "dev" / "eng_Latn.txt.gz", ["Thanks.", "Please.", "Yes."])
    from mmt.config import EvalConfig

    ec = EvalConfig(
        test_set="test", directions=["de-en"], shots=2, shots_from="dev", max_new_tokens=4, off_target=False
    )
    m = tiny_model("llama", vocab=len(tok))
    lines: list[str] = []
    rep = E.evaluate(m, tok, ec, data_dir=tmp_path, label="tiny", log=lines.append, progress=False)
    assert rep.results[0].n == 2 and rep.settings["shots"] == 2
    # the optional scorers say up front whether they are on, and the report keeps it
    assert "[tiny] scorer COMET: off: no eval.comet_model given" in lines[0]
    assert rep.settings["scorers"]["spBLEU"] == "off: eval.spbleu is false" and rep.settings["precision"] == "no"
    assert "xx->en" in rep.averages() and "| de-en | 2 |" in rep.markdown()
    out = E.write_report(rep, tmp_path / "out")
    assert (out / "tiny.json").is_file() and (out / "tiny_hyps" / "de-en.txt").read_text().count("\n") == 2
    shots = E.draw_shots(tmp_path / "dev", ("de", "en"), 2, seed=0)
    assert all(s.src in ("Danke.", "Bitte.", "Ja.") for s in shots)
    ec.shots_from = "test"
    with pytest.raises(ValueError, match="must not be the test set"):
        E.evaluate(m, tok, ec, data_dir=tmp_path, log=None, progress=False)
