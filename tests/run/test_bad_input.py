"""Input that would pass silently or mislead (lengths past the model's context, degenerate or oddly saved data,
values the Trainer cannot use, the tools pointed at the wrong thing): named in one line, before any model loads
where it can be."""

import json
import os

import pytest

from neftlab import data, models, report
from neftlab.config import ConfigError, DataConfig
from neftlab.data import DataError, locate, prepare
from tests.helpers import TINY, compose_cfg, run


def test_lengths_dtype_and_seed_are_checked_before_loading(tmp_path):
    cfg = compose_cfg("model=llama_tiny", "eval.max_new_tokens=100000")
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens=100000 is not allowed: less than 2048"):
        cfg.validate_context(models.context_length(cfg.model))
    cfg = compose_cfg("model=bert_tiny", "data=classification", "data.path=x.csv", "data.max_length=2048")
    with pytest.raises(ConfigError, match=r"data.max_length=2048 is not allowed: at most 512, the model's context"):
        cfg.validate_context(models.context_length(cfg.model))
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=rf"seed={seed} is not allowed: an integer in \[0, 2\*\*32\)"):
            compose_cfg(f"seed={seed}")
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.dtype='float16' is not allowed: float32 or bfloat16 on a CPU"):
            compose_cfg("model.dtype=float16")
    outcome, _ = run("size=tiny", "logger=none", "eval.max_new_tokens=100000", out_dir=tmp_path)
    assert outcome.exit_code == 1 and outcome.message.startswith("eval.max_new_tokens=100000 is not allowed")


@pytest.mark.parametrize("override, allowed", [
    ("+trainer.args.gradient_accumulation_steps=0", "an integer >= 1"),
    ("+trainer.args.per_device_eval_batch_size=0", "an integer >= 1"),
    ("+trainer.args.dataloader_num_workers=-1", "an integer >= 0"),
])
def test_training_arguments_the_trainer_cannot_use_are_refused_before_loading(override, allowed):
    key = override.removeprefix("+").split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.* is not allowed: {allowed}"):
        compose_cfg(override)


def test_a_judge_that_cannot_be_had_stops_before_training(tmp_path):
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=none", "eval.judge.model=/nowhere/judge",
                           out_dir=tmp_path / "run")
    assert outcome.exit_code == 1 and "eval.judge.model=/nowhere/judge: no such directory" in outcome.message
    assert "train/loss" not in summary  # found before training, not after


def test_degenerate_data_is_named(tmp_path, bert_tokenizer, llama_tokenizer, caplog):
    cfg = lambda path, fmt: DataConfig(path=str(path), format=fmt, max_samples=None, eval_size=2)  # noqa: E731
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"text {i},pos\n" for i in range(8)) + " ,pos\n\t,pos\n")
    data.prepare(cfg(one_class, "classification"), bert_tokenizer, False, seed=0)
    assert "every row has label pos: accuracy and macro-F1 will be 1.0" in caplog.text
    assert "dropped 2 of 10 rows with blank text" in caplog.text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"instruction": f"q{i % 3}", "output": ""}) + "\n" for i in range(8)))
    data.prepare(cfg(empty, "alpaca"), llama_tokenizer, True, seed=0)
    assert "all of 8 examples have an empty answer: the model can only learn to stop at once" in caplog.text
    assert "held-out examples have an input that also occurs in the training split" in caplog.text


def test_byte_order_marks_are_read_and_bad_bytes_are_placed(tmp_path, bert_tokenizer):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.json").write_bytes(bom + json.dumps([{"text": "hi", "label": 1}, {"text": "yo", "label": 0}]).encode())
    (tmp_path / "a.csv").write_bytes(bom + b"text,label\nhi,1\nyo,0\n")
    for name in ("a.json", "a.csv"):
        records = data.locate(DataConfig(path=str(tmp_path / name), format="classification")).records()
        assert [r["text"] for r in records] == ["hi", "yo"] and "\ufeff" not in json.dumps(records)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine", "label": 1}\n' * 3000 + b'{"text": "\xff", "label": 1}\n')
    offset = 29 * 3000 + len(b'{"text": "')
    with pytest.raises(data.DataError, match=rf"bad.jsonl: not UTF-8 text \(invalid start byte at byte {offset} of"):
        data.locate(DataConfig(path=str(bad), format="classification")).records()


def test_files_as_people_save_them(tmp_path, llama_tokenizer, bert_tokenizer):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncafé,pos\nthé,neg\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: not UTF-8 text \(invalid continuation byte at byte 14 of the "
                                        r"file\); if it is Latin-1 or another 8-bit encoding, save it as UTF-8"):
        locate(DataConfig(path=str(latin), format="classification")).records()
    utf16 = tmp_path / "rows.jsonl"
    utf16.write_bytes("".join(json.dumps({"text": f"texte {i} é", "label": i % 2}) + "\n" for i in range(6))
                      .encode("utf-16"))
    assert [r["text"] for r in locate(DataConfig(path=str(utf16), format="classification")).records()][0] == "texte 0 é"
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3 + [{"conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]))
    with pytest.raises(DataError, match=r"mixed.json: mixes record formats, Alpaca \(first at row 0\), ShareGPT "
                                        r"\(first at row 3\); one format per file"):
        prepare(DataConfig(path=str(mixed), format="alpaca", eval_size=1), llama_tokenizer, True, seed=0)
    quoted = tmp_path / "quoted.csv"
    quoted.write_text("instruction,output\n" + "".join(f'"line one {i}\nline two",answer {i}\n' for i in range(12)))
    data = prepare(DataConfig(path=str(quoted), format="alpaca", eval_size=2), llama_tokenizer, True, seed=0)
    assert any("line one" in m["content"] and "\nline two" in m["content"] for p, _ in data.prompts for m in p)


def test_a_sharegpt_file_without_an_exchange_says_so(tmp_path, llama_tokenizer):
    path = tmp_path / "monologue.json"
    path.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": f"hello {i}"}]} for i in range(10)]))
    with pytest.raises(DataError, match="no record has a user turn followed by an assistant reply"):
        prepare(DataConfig(path=str(path), eval_size=2), llama_tokenizer, True, seed=0)


def test_a_data_path_that_is_not_a_file_says_what_it_is(tmp_path):
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    for path, what in ((tmp_path, "a directory"), (pipe, "a named pipe")):
        with pytest.raises(DataError, match=f"data.path={path} is {what}; expected a .json, .jsonl or .csv file"):
            locate(DataConfig(path=str(path), format="alpaca"))


def test_the_tools_pointed_at_the_wrong_thing_say_so_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    other = tmp_path / "other_tool" / "exp1"
    other.mkdir(parents=True)
    (other / "summary.json").write_text(json.dumps({"accuracy": 0.9}))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for target in ("empty", "file.txt", "other_tool", "loop"):
        assert report.main([str(tmp_path / target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("no neftlab run under" in err[0] or "is not a directory" in err[0]), err

