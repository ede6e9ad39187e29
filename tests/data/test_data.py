"""Reading (tolerant of a cut-off file, strict about bad rows), chat labels, splits, classification labels."""

import json
import logging
import math
import random

import pytest
import torch

from neftlab import data
from neftlab.config import DataConfig
from neftlab.data import chat, packing, records, tokens
from neftlab.data.read import READERS, _read_file
from tests.helpers import TINY, compose_cfg


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """One conversation as the data stage makes it (`chat.encode_chats`, then `chat.cut`): labels -100 except on
    assistant replies; None when truncation leaves no assistant token."""
    import pyarrow as pa
    example, dropped = chat.cut(pa.table(chat.encode_chats(tokenizer, [messages])), [0], max_length)
    return None if dropped else example[0]


def cfg(**kw) -> DataConfig:
    base = dict(max_samples=None, eval_size=2, max_length=128)
    return DataConfig(**{**base, **kw})


def sharegpt_record(i):
    return {"id": str(i), "conversations": [{"from": "human", "value": f"question {i}"},
                                            {"from": "gpt", "value": f"answer number {i}"}]}


def test_packaged_sharegpt_keeps_every_complete_conversation(caplog):
    """It is cut off inside its last record as published: said at DEBUG level, not as a warning at every run
    (the tokenized cache's build says it once)."""
    caplog.set_level(logging.DEBUG, logger="neftlab.data")
    _read_file.cache_clear()  # read once per process: here, read it now
    found = data.locate(cfg()).records()
    assert len(found) == 17671
    assert "cut off" in caplog.text and "dropped the incomplete last one" in caplog.text
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "cut off" in r.message)


def test_cut_off_json_array_keeps_complete_records(tmp_path):
    text = json.dumps([sharegpt_record(i) for i in range(3)])
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex("answer number 2") + 5])
    assert [r["id"] for r in data.locate(cfg(path=str(path))).records()] == ["0", "1"]


def test_malformed_record_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1}, {"id": 2,, "x": 1}, {"id": 3}]')
    with pytest.raises(data.DataError, match=r"bad.json: record 1 is not valid JSON"):
        data.locate(cfg(path=str(path))).records()


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
    ex = encode_chat(llama_tokenizer, messages, max_length=256)
    trained = llama_tokenizer.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100])
    assert trained == "Four.<|im_end|>\nSix.<|im_end|>\n"
    assert ex["labels"][0] == -100 and len(ex["labels"]) == len(ex["input_ids"])


def test_plain_template_for_tokenizers_without_one(bert_tokenizer):
    from neftlab.models import PLAIN_CHAT_TEMPLATE
    tok = bert_tokenizer.__class__.from_pretrained(bert_tokenizer.name_or_path)
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    ex = encode_chat(tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bye"}], 64)
    assert tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100]).startswith("bye")


def test_truncation_keeps_examples_with_some_answer(llama_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    ex = encode_chat(llama_tokenizer, messages, max_length=64)
    assert len(ex["input_ids"]) == 64 and ex["labels"][-1] != -100
    assert encode_chat(llama_tokenizer, [{"role": "user", "content": "word " * 200},
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
    assert records.conversation(record, 0, "f", {"conversations": "conversations"}) == [
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


def test_line_separators_inside_jsonl_strings_are_text(tmp_path):
    """Raw U+2028 / U+0085 inside a string are valid JSON (scraped text has them): one record per "\n" line."""
    path = tmp_path / "scraped.jsonl"
    path.write_text('{"instruction": "a\u2028b", "output": "c\u0085d"}\n{"instruction": "e", "output": "f"}\n',
                    encoding="utf-8")
    assert [r["instruction"] for r in READERS[".jsonl"](path)] == ["a\u2028b", "e"]


def test_hub_dataset_unreachable_is_a_clear_error(llama_tokenizer):
    with pytest.raises(data.DataError, match="data.hub_name=tatsu-lab/alpaca: could not load it"):
        data.prepare(compose_cfg("data=hub").data, llama_tokenizer, True, seed=0)


def conversation_record(i):
    turns = [("human", f"question {i} " + "why " * (i % 7)), ("gpt", f"answer {i} " + "because " * (i % 11)),
             ("human", f"and then {i}?"), ("gpt", "done " * (i % 5 + 1))]
    return {"conversations": [{"from": who, "value": text} for who, text in turns[: 2 + 2 * (i % 2)]]}


def test_tokenized_once_then_cut_and_split_from_the_cache(tmp_path, monkeypatch, llama_tokenizer):
    """Every conversation a run uses is tokenized once; other seeds and lengths select and cut the cached rows into
    exactly what tokenizing each conversation on its own gives. A changed file is tokenized anew."""
    monkeypatch.setenv("NEFTLAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([conversation_record(i) for i in range(30)]))
    encode = tokens.encode_chats
    calls = []
    monkeypatch.setattr(tokens, "encode_chats", lambda tok, convs: calls.append(len(convs)) or encode(tok, convs))

    def expected(prepared, max_length):
        by_prompt = {json.dumps(records.conversation(r, 0, "", {"conversations": "conversations"})[:1]): r
                     for r in map(conversation_record, range(30))}
        rows = [records.conversation(by_prompt[json.dumps(p)], 0, "", {"conversations": "conversations"})
                for p, _ in prepared.prompts]
        return [encode_chat(llama_tokenizer, c, max_length) for c in rows]

    first = data.prepare(cfg(path=str(path), eval_size=5, max_length=128), llama_tokenizer, True, seed=1)
    assert calls == [30]
    for max_length, seed in ((128, 1), (48, 2), (40, 3)):
        calls.clear()
        got = data.prepare(cfg(path=str(path), eval_size=5, max_length=max_length), llama_tokenizer, True, seed)
        assert calls == [], "read from the cache, not tokenized again"
        want = [x for x in expected(got, max_length) if x is not None]
        assert [dict(r) for r in got.eval] == want
    assert len(got.eval) < 5  # at 40 tokens some held-out answers are cut off entirely, and dropped
    assert first.eval["input_ids"] != data.prepare(cfg(path=str(path), eval_size=5), llama_tokenizer, True,
                                                   seed=2).eval["input_ids"]
    path.write_text(json.dumps([conversation_record(i) for i in range(31)]))
    calls.clear()
    data.prepare(cfg(path=str(path), eval_size=5), llama_tokenizer, True, seed=1)
    assert calls == [31]


def test_a_run_tokenizes_only_what_it_uses_and_a_later_one_adds_only_what_it_lacks(tmp_path, monkeypatch,
                                                                                  llama_tokenizer):
    """A tiny run on a large file tokenizes its own few conversations, not the whole file; a run that needs more
    extends the cache by those it lacks, and the rows it reads are the same as from a cache built in one go."""
    monkeypatch.setenv("NEFTLAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([conversation_record(i) for i in range(200)]))
    encode = tokens.encode_chats
    calls = []
    monkeypatch.setattr(tokens, "encode_chats", lambda tok, convs: calls.append(len(convs)) or encode(tok, convs))
    small = data.prepare(cfg(path=str(path), max_samples=12, eval_size=4), llama_tokenizer, True, seed=1)
    assert calls == [12]
    larger = data.prepare(cfg(path=str(path), max_samples=40, eval_size=4), llama_tokenizer, True, seed=1)
    assert calls == [12, 28]  # the first 12 of the seed's order are the same conversations: only 28 more
    assert len(list((tmp_path / "cache" / "tokenized").glob("*/part-*.arrow"))) == 2
    assert larger.eval["input_ids"] == small.eval["input_ids"]
    monkeypatch.setenv("NEFTLAB_CACHE", str(tmp_path / "fresh"))
    assert data.prepare(cfg(path=str(path), max_samples=40, eval_size=4), llama_tokenizer, True,
                        seed=1).train["input_ids"] == larger.train["input_ids"]


def test_generation_markers_mask_the_same_tokens_as_prefix_rendering(llama_tokenizer):
    import copy
    marked = copy.deepcopy(llama_tokenizer)
    marked.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    plain = copy.deepcopy(marked)
    plain.chat_template = marked.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    conversations = [records.conversation(conversation_record(i), i, "", {"conversations": "conversations"})
                     for i in range(6)]
    with_markers, by_prefixes = chat.encode_chats(marked, conversations), chat.encode_chats(plain, conversations)
    assert with_markers["input_ids"] == by_prefixes["input_ids"]
    assert [list(m) for m in with_markers["assistant_mask"]] == by_prefixes["assistant_mask"]
    assert all(1 in m and 0 in m for m in by_prefixes["assistant_mask"])


def test_an_unreadable_tokenized_cache_is_set_aside_and_rebuilt(tmp_path, monkeypatch, llama_tokenizer, caplog):
    monkeypatch.setenv("NEFTLAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([conversation_record(i) for i in range(12)]))
    first = data.prepare(cfg(path=str(path), eval_size=2), llama_tokenizer, True, seed=1)
    [arrow] = (tmp_path / "cache" / "tokenized").glob("*/part-*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])  # a disk that lost the file's tail
    again = data.prepare(cfg(path=str(path), eval_size=2), llama_tokenizer, True, seed=1)
    assert again.train["input_ids"] == first.train["input_ids"]
    assert "cannot be read" in caplog.text and "tokenized again" in caplog.text
    assert len(list((tmp_path / "cache" / "tokenized").glob("*/*.unreadable-*"))) == 1


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_packs_every_item_whole_within_capacity(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(200)]
    bins = packing.best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))  # every item once, none split
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 11 / 9 * math.ceil(sum(lengths) / 64) + 1  # BFD's bound against the optimum
    assert bins == packing.best_fit_decreasing(lengths, 64)  # the same packing every time


def test_best_fit_puts_an_item_in_the_fullest_bin_it_fits():
    assert packing.best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]


def test_pack_bfd_rows_unpack_to_the_examples():
    from datasets import Dataset
    examples = [list(range(100 * k, 100 * k + n)) for k, n in enumerate([5, 3, 7, 2, 4])]
    ds = Dataset.from_dict({"input_ids": examples, "labels": [[-100] + e[1:] for e in examples],
                            "attention_mask": [[1] * len(e) for e in examples]})
    packed = packing.pack_bfd(ds, 8)
    assert len(packed) == 3 and all(len(r) <= 8 for r in packed["input_ids"])
    seen = []
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == -100 and row["labels"][a + 1:b] == row["input_ids"][a + 1:b]
            seen.append(row["input_ids"][a:b])
    assert sorted(seen) == sorted(examples)


def test_packed_collator_matches_transformers_flattening_and_keeps_packed_positions():
    from transformers import DataCollatorWithFlattening
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "attention_mask": [1, 1, 1]},
            {"input_ids": [8, 9], "labels": [-100, 9], "attention_mask": [1, 1]}]
    ours = packing.PackedCollator()(rows)
    reference = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(
        [{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    assert set(ours) == set(reference) == {"input_ids", "labels", "position_ids"}
    for key in ours:
        assert torch.equal(ours[key], reference[key])
    packed = packing.PackedCollator()([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "position_ids": [0, 1, 0, 1]}])
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1]] and packed["labels"].tolist() == [[-100, 2, -100, 4]]


def test_bfd_rows_give_the_padded_loss(tmp_path, llama_tokenizer):
    """data.packing_strategy=bfd as prepare() builds it: fewer rows than examples, and a tiny fp32 model's loss over
    all of them through PackedCollator equals its loss over the padded examples."""
    from transformers import DataCollatorForSeq2Seq

    from neftlab import models
    path = tmp_path / "varied.jsonl"  # answers of 1 to 30 words
    path.write_text("".join(json.dumps({"instruction": f"Count to {n}.", "output": " ".join(["word"] * n)}) + "\n"
                            for n in range(1, 31)))
    common = [*TINY, "model=llama_tiny", "data=alpaca", f"data.path={path}", "data.max_length=128"]
    padded_cfg = compose_cfg(*common)
    packed_cfg = compose_cfg(*common, "data.packing=true", "data.packing_strategy=bfd")
    padded = data.prepare(padded_cfg.data, llama_tokenizer, True, padded_cfg.seed).train
    packed = data.prepare(packed_cfg.data, llama_tokenizer, True, packed_cfg.seed).train
    assert len(packed) < len(padded) and set(packed.column_names) == {"input_ids", "labels", "position_ids"}
    model = models.load_model(padded_cfg.model, llama_tokenizer, seed=0).eval()
    model.config.use_cache = False
    with torch.no_grad():
        loss_padded = model(**DataCollatorForSeq2Seq(llama_tokenizer, label_pad_token_id=-100)(
            [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in padded])).loss
        batch = packing.PackedCollator()(list(packed))
        loss_packed = model(**batch).loss
        # the bug this catches: a packed batch's positions numbered per row from 0 (no restart at each example),
        # or as one sequence over the whole batch
        per_row = torch.cat([torch.arange(len(r["input_ids"])) for r in packed])[None]
        whole = torch.arange(batch["input_ids"].shape[1])[None]
        moved = {name: abs(float(model(**{**batch, "position_ids": ids}).loss) - float(loss_padded))
                 for name, ids in (("per row", per_row), ("whole batch", whole))}
    print(f"positions numbered per row move the loss by {moved['per row']:.3f}, over the whole batch by "
          f"{moved['whole batch']:.3f}")
    assert float(loss_packed) == pytest.approx(float(loss_padded), abs=1e-4)
    assert min(moved.values()) > 1e-3


def test_a_list_of_records_is_converted_once_per_process_and_each_run_logs_what_it_found(caplog):
    """The jobs of a sweep in one process read one list of records (`_read_file`): converting ShareGPT's 17,671
    conversations took 0.5 s of each tiny run."""
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"conversations": [{"from": "gpt", "value": "no question"}]}]
    caplog.set_level(logging.INFO)
    first = records.chats(rows, "sharegpt", {}, "x.json")
    again = records.chats(rows, "sharegpt", {}, "x.json")
    assert again is first and first == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    assert caplog.text.count("x.json: 1 of 2 records have no user turn followed by an assistant reply") == 2
    copy = json.loads(json.dumps(rows))
    copy[0]["conversations"][1]["value"] = "b"  # another list: converted afresh, never taken for the first
    assert records.chats(copy, "sharegpt", {}, "x.json")[0][1]["content"] == "b"
