"""Reading (tolerant of a cut-off file, strict about bad rows), chat labels, splits, classification labels."""

import json

import pytest

from conftest import compose_cfg
from neftlab import data
from neftlab.config import DataConfig


def cfg(**kw) -> DataConfig:
    base = dict(max_samples=None, eval_size=2, max_length=128)
    return DataConfig(**{**base, **kw})


def sharegpt_record(i):
    return {"id": str(i), "conversations": [{"from": "human", "value": f"question {i}"},
                                            {"from": "gpt", "value": f"answer number {i}"}]}


def test_packaged_sharegpt_keeps_every_complete_conversation(caplog):
    source, records = data.read_records(cfg())
    assert len(records) == 17671
    assert "cut off" in caplog.text and "dropped the incomplete last one" in caplog.text


def test_cut_off_json_array_keeps_complete_records(tmp_path):
    text = json.dumps([sharegpt_record(i) for i in range(3)])
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex("answer number 2") + 5])
    _, records = data.read_records(cfg(path=str(path)))
    assert [r["id"] for r in records] == ["0", "1"]


def test_malformed_record_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1}, {"id": 2,, "x": 1}, {"id": 3}]')
    with pytest.raises(data.DataError, match=r"bad.json: record 1 is not valid JSON"):
        data.read_records(cfg(path=str(path)))


@pytest.mark.parametrize("name, content, causal, message", [
    ("missing.json", None, True, "no such file"),
    ("rows.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n', True, r"rows.jsonl:2: not valid JSON"),
    ("cols.jsonl", '{"instruction": "a", "response": "b"}\n', True, "row 0 has no column 'output'"),
    ("types.jsonl", '{"instruction": "a", "output": 7}\n', True, "row 0 column 'output' is int 7, expected a string"),
    ("empty.jsonl", "\n", True, "no records"),
    ("data.parquet", "x", True, "unknown file type '.parquet'"),
    ("nolabel.csv", "text,kind\nhi,a\n", False, "row 0 has no column 'label'"),
    ("floats.jsonl", '{"text": "hi", "label": 1.5}\n', False, "row 0 column 'label' is 1.5, expected an integer"),
    ("notext.jsonl", '{"text": null, "label": 1}\n', False, "row 0 column 'text' is NoneType"),
    ("rows.json", '[1, 2]', True, "row 0 is a int, expected an object with named fields"),
])
def test_bad_data_names_file_row_or_column(tmp_path, llama_tokenizer, bert_tokenizer, name, content, causal, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    fmt = "alpaca" if causal else "classification"
    tokenizer = llama_tokenizer if causal else bert_tokenizer
    with pytest.raises(data.DataError, match=message):
        data.prepare(cfg(path=str(path), format=fmt), tokenizer, causal, seed=0)


def test_nothing_left_after_filtering_is_an_error(tmp_path, llama_tokenizer):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"instruction": "word " * 300, "output": "x"}) + "\n" for _ in range(4)))
    with pytest.raises(data.DataError, match="no train example keeps an assistant token within data.max_length=64"):
        data.prepare(cfg(path=str(path), format="alpaca", max_length=64, eval_size=1), llama_tokenizer, True, seed=0)


def test_eval_size_leaving_no_training_data_is_an_error(tmp_path, llama_tokenizer):
    path = tmp_path / "few.json"
    path.write_text(json.dumps([sharegpt_record(i) for i in range(3)]))
    with pytest.raises(data.DataError, match="leaving none to train on"):
        data.prepare(cfg(path=str(path), eval_size=3), llama_tokenizer, True, seed=0)


def test_loss_is_on_assistant_tokens_only(llama_tokenizer):
    messages = [{"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And three plus three?"},
                {"role": "assistant", "content": "Six."}]
    ex = data.encode_chat(llama_tokenizer, messages, max_length=256)
    trained = llama_tokenizer.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100])
    assert trained == "Four.<|im_end|>\nSix.<|im_end|>\n"
    assert ex["labels"][0] == -100 and len(ex["labels"]) == len(ex["input_ids"])


def test_plain_template_for_tokenizers_without_one(bert_tokenizer):
    from neftlab.models import PLAIN_CHAT_TEMPLATE
    tok = bert_tokenizer.__class__.from_pretrained(bert_tokenizer.name_or_path)
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    ex = data.encode_chat(tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bye"}], 64)
    assert tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100]).startswith("bye")


def test_truncation_keeps_examples_with_some_answer(llama_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    ex = data.encode_chat(llama_tokenizer, messages, max_length=64)
    assert len(ex["input_ids"]) == 64 and ex["labels"][-1] != -100
    assert data.encode_chat(llama_tokenizer, [{"role": "user", "content": "word " * 200},
                                              {"role": "assistant", "content": "x"}], 64) is None


def test_split_is_deterministic_by_seed(tmp_path, llama_tokenizer):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([sharegpt_record(i) for i in range(20)]))
    first = data.prepare(cfg(path=str(path), eval_size=0.25), llama_tokenizer, True, seed=1)
    again = data.prepare(cfg(path=str(path), eval_size=0.25), llama_tokenizer, True, seed=1)
    other = data.prepare(cfg(path=str(path), eval_size=0.25), llama_tokenizer, True, seed=2)
    assert len(first.eval) == 5 and len(first.train) == 15
    assert first.eval["input_ids"] == again.eval["input_ids"] != other.eval["input_ids"]
    assert set(map(tuple, first.eval["input_ids"])).isdisjoint(map(tuple, first.train["input_ids"]))
    assert first.prompts[0][1].startswith("answer number")


def test_sharegpt_roles_merge_and_leading_assistant_turns_drop():
    record = {"conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "a"},
                                {"from": "human", "value": "b"}, {"from": "chatgpt", "value": "c"}]}
    assert data._conversation(record, 0, "f", {"conversations": "conversations"}) == [
        {"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]


def test_bert_on_sharegpt_labels_turns_by_speaker(bert_tokenizer):
    prepared = data.prepare(cfg(max_samples=200, eval_size=20), bert_tokenizer, causal=False, seed=0)
    assert prepared.label_names == ["human", "assistant"]
    labels = prepared.train["labels"]
    assert set(labels) == {0, 1} and 0.25 < sum(labels) / len(labels) < 0.75


def test_classification_csv_with_string_labels(tmp_path, bert_tokenizer):
    path = tmp_path / "s.csv"
    path.write_text("text,label\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(10)))
    prepared = data.prepare(cfg(path=str(path), format="classification"), bert_tokenizer, causal=False, seed=0)
    assert prepared.label_names == ["neg", "pos"] and len(prepared.train) == 8


def test_column_mapping(tmp_path, llama_tokenizer):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(5)))
    prepared = data.prepare(cfg(path=str(path), format="alpaca", eval_size=1,
                                columns={"instruction": "q", "output": "a"}), llama_tokenizer, True, seed=0)
    assert len(prepared.train) == 4


def test_hub_dataset_unreachable_is_a_clear_error(llama_tokenizer):
    with pytest.raises(data.DataError, match="data.hub_name=tatsu-lab/alpaca: could not load it"):
        data.prepare(compose_cfg("data=hub").data, llama_tokenizer, True, seed=0)
