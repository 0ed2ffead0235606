"""Prompt sources."""

from __future__ import annotations

import random

import json

import pytest

from diffrl import prompts
from diffrl.prompts import PromptError, indefinite_article, load, plural, read_prompt_data


def _draw(source, n=200):
    return [source() for _ in range(n)]


def test_registry_names_and_errors():
    assert {"simple_animals", "imagenet_animals", "imagenet_all", "nouns_activities", "counting", "from_file",
            "fixed", "empty"} <= set(prompts.available())
    with pytest.raises(PromptError, match="unknown prompt source 'simple_animal'.*did you mean 'simple_animals'"):
        load("simple_animal")
    with pytest.raises(PromptError, match="no option 'sed'.*did you mean 'seed'"):
        load("simple_animals", sed=1)
    with pytest.raises(PromptError, match="needs option.*path"):
        load("from_file")


def test_data_lists_have_the_papers_sizes():
    animals = read_prompt_data("simple_animals")
    assert len(animals) == 45 == len(set(animals))
    classes = read_prompt_data("imagenet_classes")
    assert len(classes) == 1000
    # Spot checks against ImageNet-1k's class indices (first WordNet synonym).
    assert classes[0] == "tench" and classes[1] == "goldfish" and classes[151] == "Chihuahua"
    assert classes[207] == "golden retriever" and classes[281] == "tabby" and classes[397] == "puffer"
    assert classes[398] == "abacus" and classes[409] == "analog clock" and classes[999] == "toilet tissue"


def test_sources_are_seeded_and_use_their_own_rng():
    for name in ("simple_animals", "imagenet_animals", "imagenet_all", "nouns_activities", "counting"):
        random.seed(123)
        first = _draw(load(name, seed=7), 50)
        random.seed(456)  # the global RNG does not matter
        second = _draw(load(name, seed=7), 50)
        assert first == second, name
        assert first != _draw(load(name, seed=8), 50), name
    state = random.getstate()
    _draw(load("simple_animals"), 10)
    assert random.getstate() == state


def test_simple_and_imagenet_sources_stay_in_their_lists():
    animals = set(read_prompt_data("simple_animals"))
    drawn = _draw(load("simple_animals"), 500)
    assert {p for p, _ in drawn} <= animals and len({p for p, _ in drawn}) > 30
    assert all(metadata == {} for _, metadata in drawn)
    first_398 = set(read_prompt_data("imagenet_classes")[:398])
    assert {p for p, _ in _draw(load("imagenet_animals"), 500)} <= first_398
    assert not {p for p, _ in _draw(load("imagenet_all"), 2000)} <= first_398


def test_nouns_activities_format():
    drawn = _draw(load("nouns_activities"), 300)
    activities = {"washing dishes", "riding a bike", "playing chess"}
    for prompt, metadata in drawn:
        assert metadata["activity"] in activities
        assert prompt == f"{indefinite_article(metadata['noun'])} {metadata['noun']} {metadata['activity']}"
    assert any(p.startswith("an ant ") for p, _ in drawn) and any(p.startswith("a cat ") for p, _ in drawn)
    assert {m["activity"] for _, m in drawn} == activities
    custom = load("nouns_activities", nouns=["owl"], activities=["reading"])()
    assert custom == ("an owl reading", {"noun": "owl", "activity": "reading"})


def test_counting_prompts_and_metadata():
    drawn = _draw(load("counting", low=2, high=4), 200)
    words = {2: "two", 3: "three", 4: "four"}
    for prompt, metadata in drawn:
        assert 2 <= metadata["count"] <= 4
        assert metadata["answer"] == words[metadata["count"]]
        assert prompt == f"{metadata['answer']} {plural(metadata['noun'])}"
        assert metadata["question"] == f"How many {plural(metadata['noun'])} are there in this image?"
    assert load("counting", nouns=["dog"], low=3, high=3)() == (
        "three dogs",
        {"noun": "dog", "count": 3, "question": "How many dogs are there in this image?", "answer": "three"},
    )
    assert load("counting", nouns=["mouse"], low=1, high=1)()[0] == "one mouse"
    with pytest.raises(PromptError, match="low=5 high=2"):
        load("counting", low=5, high=2)


def test_english_helpers():
    assert [plural(w) for w in ["dog", "fox", "butterfly", "turkey", "mouse", "wolf", "sheep", "great white shark"]] == [
        "dogs", "foxes", "butterflies", "turkeys", "mice", "wolves", "sheep", "great white sharks"]
    assert [indefinite_article(w) for w in ["cat", "ant", "European fire salamander", "unicorn", "hour"]] == [
        "a", "an", "a", "a", "an"]


def test_from_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\n\n  a blue sphere  \n", encoding="utf-8")
    assert _draw(load("from_file", path=str(path), order="cycle"), 3) == [
        ("a red cube", {}), ("a blue sphere", {}), ("a red cube", {})]
    assert {p for p, _ in _draw(load("from_file", path=path), 50)} == {"a red cube", "a blue sphere"}
    missing = tmp_path / "missing.txt"
    with pytest.raises(PromptError, match=f"file '{missing}' does not exist"):
        load("from_file", path=str(missing))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PromptError, match=f"file '{blank}' has no prompts"):
        load("from_file", path=blank)


def test_fixed_and_empty():
    source = load("fixed", prompts=["x", "y"])
    assert [p for p, _ in _draw(source, 5)] == ["x", "y", "x", "y", "x"]
    sampled = [p for p, _ in _draw(load("fixed", prompts=["x", "y"], order="sample", seed=1), 50)]
    assert set(sampled) == {"x", "y"} and sampled != ["x", "y"] * 25
    with pytest.raises(PromptError, match="order='shuffle'"):
        load("fixed", prompts=["x"], order="shuffle")
    with pytest.raises(PromptError, match="empty"):
        load("fixed", prompts=[])
    with pytest.raises(PromptError, match="list of strings"):
        load("fixed", prompts="x")
    assert load("empty")() == ("", {})


def test_metadata_is_fresh_per_call():
    source = load("counting")
    _, first = source()
    first["count"] = -1
    assert all(m["count"] >= 1 for _, m in _draw(source, 20))


def test_register_a_custom_source():
    prompts.register("test_source", lambda *, word="hi": (lambda: (word, {})))
    try:
        assert load("test_source", word="yo")() == ("yo", {})
        with pytest.raises(PromptError, match="already registered"):
            prompts.register("test_source", lambda: None)
    finally:
        prompts._REGISTRY.pop("test_source", None)


@pytest.mark.parametrize("name,options", [("simple_animals", {}), ("counting", {}), ("nouns_activities", {}),
                                          ("fixed", {"prompts": list("abcdefg"), "order": "sample"})])
def test_draw_i_depends_on_the_seed_and_i_alone_and_shards_split_the_stream(name, options):
    whole = _draw(load(name, seed=4, **options), 12)
    shares = [_draw(load(name, seed=4, **options).shard(r, 3), 4) for r in range(3)]
    # process r of 3 takes positions r, r + 3, ...: together exactly the one-process stream, nothing drawn twice
    assert [shares[i % 3][i // 3] for i in range(12)] == whole


def test_a_restored_position_continues_the_stream():
    source = load("simple_animals", seed=2).shard(1, 2)
    first = _draw(source, 5)
    state = source.state_dict()
    rest = _draw(source, 5)
    restarted = load("simple_animals", seed=2).shard(1, 2)
    restarted.load_state_dict(state)
    assert _draw(restarted, 5) == rest and rest != first


def test_cycled_prompts_over_processes_visit_each_prompt_once_per_pass():
    shares = [load("fixed", prompts=["a", "b", "c", "d"], order="cycle").shard(r, 2) for r in range(2)]
    assert [p for p, _ in _draw(shares[0], 2)] == ["a", "c"] and [p for p, _ in _draw(shares[1], 2)] == ["b", "d"]


def test_jsonl_prompts_carry_their_metadata_and_bad_lines_name_the_line(tmp_path):
    path = tmp_path / "geneval.jsonl"
    path.write_text('{"prompt": "two cats", "tag": "counting", "count": 2}\n\n'
                    '{"prompt": "a red cube", "tag": "colors"}\n')
    source = load("jsonl", path=str(path), order="cycle")
    assert _draw(source, 3) == [("two cats", {"tag": "counting", "count": 2}), ("a red cube", {"tag": "colors"}),
                                ("two cats", {"tag": "counting", "count": 2})]
    sampled = load("jsonl", path=str(path), seed=3)
    assert {p for p, _ in _draw(sampled, 40)} == {"two cats", "a red cube"}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:2 has no string field 'prompt'"):
        load("jsonl", path=str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(PromptError, match=r"broken.jsonl:2 is not JSON"):
        load("jsonl", path=str(tmp_path / "broken.jsonl"))
    (tmp_path / "text.jsonl").write_text('{"text": "a fox", "id": 7}\n')
    assert load("jsonl", path=str(tmp_path / "text.jsonl"), key="text")() == ("a fox", {"id": 7})


@pytest.mark.parametrize("order", ["sample", "cycle"])
def test_a_from_file_source_resumes_its_stream_per_process(tmp_path, order):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"thing number {i}" for i in range(20)))
    straight = [load("from_file", path=str(path), order=order, seed=5).shard(r, 2) for r in range(2)]
    expected = [_draw(s, 12) for s in straight]
    for rank in range(2):  # preempted after 5 draws, restarted from the checkpoint's position
        first = load("from_file", path=str(path), order=order, seed=5).shard(rank, 2)
        head = _draw(first, 5)
        restarted = load("from_file", path=str(path), order=order, seed=5).shard(rank, 2)
        restarted.load_state_dict(first.state_dict())
        assert head + _draw(restarted, 7) == expected[rank]
    assert not {p for p, _ in expected[0]} & {p for p, _ in expected[1]} or order == "sample"


def test_hf_dataset_reads_a_saved_dataset_and_local_files_offline_and_resumes(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = {"text": [f"a photo of object {i}" for i in range(10)], "tag": [i % 3 for i in range(10)],
            "unused": list(range(10))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    source = load("hf_dataset", path=str(tmp_path / "saved"), column="text", metadata_columns=["tag"],
                  order="cycle")
    assert _draw(source, 3) == [("a photo of object 0", {"tag": 0}), ("a photo of object 1", {"tag": 1}),
                                ("a photo of object 2", {"tag": 2})]
    shard = load("hf_dataset", path=str(tmp_path / "saved"), column="text", seed=4).shard(1, 2)
    head, state = _draw(shard, 4), shard.state_dict()
    rest = _draw(shard, 4)
    again = load("hf_dataset", path=str(tmp_path / "saved"), column="text", seed=4).shard(1, 2)
    again.load_state_dict(state)
    assert _draw(again, 4) == rest and len({p for p, _ in head + rest}) > 1
    (tmp_path / "rows.jsonl").write_text("\n".join(f'{{"prompt": "p{i}", "level": {i}}}' for i in range(4)))
    local = load("hf_dataset", path="json", data_files=str(tmp_path / "rows.jsonl"), metadata_columns=["level"],
                 order="cycle")
    assert _draw(local, 2) == [("p0", {"level": 0}), ("p1", {"level": 1})]
    with pytest.raises(PromptError, match="has no column 'txt' \\(did you mean 'text'\\?\\); its columns: text, tag"):
        load("hf_dataset", path=str(tmp_path / "saved"), column="txt")


@pytest.mark.parametrize("origin", ["saved", "json"])
def test_hf_dataset_streams_row_by_row_sharded_cycling_and_resumable(tmp_path, monkeypatch, origin):
    """A streamed source draws what the in-memory one draws in cycle order (past the end: from the start
    again), each process its own rows, and a resumed source reads forward to exactly where it stopped."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = {"text": [f"a photo of object {i}" for i in range(7)], "tag": list(range(7))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"text": t, "tag": g}) for t, g in zip(*rows.values())))
    where = ({"path": str(tmp_path / "saved")} if origin == "saved"
             else {"path": "json", "data_files": str(tmp_path / "rows.jsonl")})
    options = dict(where, column="text", metadata_columns=["tag"])
    in_memory = load("hf_dataset", **options, order="cycle")
    streamed = load("hf_dataset", **options, order="cycle", streaming=True)
    assert type(streamed).__name__ == "StreamedRecords"
    assert _draw(streamed, 16) == _draw(in_memory, 16)  # 16 > 7 rows: two passes and a bit
    assert streamed.pass_length == 7
    shares = [load("hf_dataset", **options, order="cycle", streaming=True).shard(r, 2) for r in (0, 1)]
    drawn = [_draw(share, 3) for share in shares]
    assert [p for p, _ in drawn[0]] == [rows["text"][i] for i in (0, 2, 4)]
    assert [p for p, _ in drawn[1]] == [rows["text"][i] for i in (1, 3, 5)]
    # sample order: a seeded buffer shuffle, the same for the same seed, reshuffled each pass; resume is exact
    shuffled = load("hf_dataset", **options, streaming=True, buffer_size=4, seed=3).shard(1, 2)
    head, state = _draw(shuffled, 3), shuffled.state_dict()
    rest = _draw(shuffled, 6)
    resumed = load("hf_dataset", **options, streaming=True, buffer_size=4, seed=3).shard(1, 2)
    resumed.load_state_dict(state)
    assert _draw(resumed, 6) == rest
    whole = _draw(load("hf_dataset", **options, streaming=True, buffer_size=4, seed=3), 18)
    assert sorted(p for p, _ in whole[:7]) == sorted(rows["text"]) == sorted(p for p, _ in whole[7:14])
    assert [p for p, _ in whole[:7]] != rows["text"] and whole[:7] != whole[7:14]
    assert head + rest == whole[1::2][:9]
    assert _draw(load("hf_dataset", **options, streaming=True, buffer_size=4, seed=4), 7) != whole[:7]


def test_hf_dataset_streaming_checks_columns_and_options_up_front(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(PromptError, match="has no column 'txt' \\(did you mean 'text'\\?\\)"):
        load("hf_dataset", path=str(tmp_path / "saved"), column="txt", streaming=True)
    with pytest.raises(PromptError, match="buffer_size=0 must be a whole number >= 1"):
        load("hf_dataset", path=str(tmp_path / "saved"), column="text", streaming=True, buffer_size=0)
    with pytest.raises(PromptError, match="streaming='yes' must be true or false"):
        load("hf_dataset", path=str(tmp_path / "saved"), column="text", streaming="yes")
