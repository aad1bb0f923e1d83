"""PIIP-LLaVA offline scorers on hand-computed fixtures (no transformers needed)."""
from __future__ import annotations

import json

import pytest

from piip.evaluation.llava import (normalize_vqa_answer, parse_letter, pope_yes_no, score_gqa, score_letters,
                                   score_pope, score_sqa, score_textvqa, textvqa_score)


def _ans(pairs):
    return [{"question_id": q, "text": t} for q, t in pairs]


def test_vqa_normalisation():
    assert normalize_vqa_answer("The Two dogs!") == "2 dogs"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("Yes.") == "yes"
    assert normalize_vqa_answer("an apple") == "apple"


def test_textvqa_soft_accuracy_by_hand():
    gt = ["coca cola"] * 3 + ["coke"] * 7
    # leaving out one of the 3 'coca cola': 2 matches -> 2/3; leaving out a 'coke': 3 -> 1 => (3*2/3 + 7) / 10
    assert textvqa_score("Coca Cola", gt) == pytest.approx(0.9)
    assert textvqa_score("coke", gt) == pytest.approx(1.0)
    assert textvqa_score("pepsi", gt) == 0.0
    assert textvqa_score("coke", ["coke"] + ["x"] * 9) == pytest.approx(0.9 * 1 / 3)   # 9 subsets hold it once
    r = score_textvqa(_ans([(1, "coke"), (2, "pepsi")]), {1: gt, 2: gt})
    assert r["accuracy"] == pytest.approx(50.0) and r["n"] == 2
    with pytest.raises(ValueError, match="no TextVQA annotation"):
        score_textvqa(_ans([(3, "x")]), {1: gt})


def test_gqa_exact_match_after_rstrip_and_lower():
    r = score_gqa(_ans([("a", "Yes."), ("b", "left"), ("c", "red car")]), {"a": "yes", "b": "right", "c": "red car"})
    assert r["accuracy"] == pytest.approx(200 / 3)


def test_pope_f1_by_hand():
    assert pope_yes_no("No, there is not.") == "no" and pope_yes_no("Yes. No.") == "yes"
    assert pope_yes_no("There is a dog") == "yes" and pope_yes_no("I do not see one") == "no"
    answers = _ans([(1, "Yes"), (2, "Yes"), (3, "No"), (4, "No"), (5, "Yes"), (6, "Yes")])
    labels = {"random": {1: "yes", 2: "yes", 3: "yes", 4: "no"}, "popular": {5: "no", 6: "yes"}}
    r = score_pope(answers, labels)
    # random: TP 2, FN 1, TN 1 -> P 1, R 2/3, F1 0.8; popular: TP 1, FP 1 -> P 0.5, R 1, F1 2/3
    assert r["random"]["f1"] == pytest.approx(0.8) and r["random"]["accuracy"] == pytest.approx(0.75)
    assert r["popular"]["f1"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(100 * (0.8 + 2 / 3) / 2)


def test_letter_parsing_seed_mmbench_and_sqa():
    assert parse_letter("B") == "B" and parse_letter("C. a cat") == "C"
    assert parse_letter("The answer is D.") == "D" and parse_letter("cat") is None
    r = score_letters(_ans([(1, "A"), (2, "B. dog"), (3, "cat")]), {1: "A", 2: "C", 3: "B"})
    assert r["accuracy"] == pytest.approx(100 / 3)
    problems = {"p1": {"answer": 1, "choices": ["x", "y"], "image": "a.png"},
                "p2": {"answer": 0, "choices": ["x", "y", "z"], "image": None},
                "p3": {"answer": 2, "choices": ["x", "y", "z"], "image": "b.png"}}
    r = score_sqa(_ans([("p1", "B"), ("p2", "The answer is A."), ("p3", "E")]), problems)
    # p3's 'E' is not one of its 3 options: wrong (the official script would guess at random)
    assert r["accuracy"] == pytest.approx(200 / 3) and r["img_accuracy"] == pytest.approx(50.0)
    assert json.dumps(r)


def test_modality_grouped_sampler_batches_one_modality_and_shards_exactly():
    pytest.importorskip("transformers", reason="piip.llava imports transformers")
    from piip.llava.train import ModalityGroupedSampler, modality_lengths
    rows = [{"image": "x.png" if i % 3 else None, "conversations": [{"value": "w " * (i + 1)}]} for i in range(22)]
    lengths = modality_lengths(rows)
    assert lengths[0] == -1 and lengths[1] == 2
    batch, world = 2, 2
    orders = []
    for rank in range(world):
        s = ModalityGroupedSampler(lengths, batch, seed=3, rank=rank, world_size=world)
        s.set_epoch(1)
        orders.append(list(s))
        assert len(orders[-1]) == len(s) == 11
    assert sorted(orders[0] + orders[1]) == list(range(22))       # every sample once over the ranks
    full = 22 // (batch * world) * (batch * world)                 # megabatches before the leftovers
    for rank_order in orders:
        for k in range(0, full // world, batch):                  # each rank's batch: one modality
            assert len({lengths[i] > 0 for i in rank_order[k:k + batch]}) == 1
    s = ModalityGroupedSampler(lengths, batch, seed=3)
    s.set_epoch(1)
    first = s.global_order()
    s.set_epoch(2)
    assert first != s.global_order() and sorted(first) == list(range(22))
    s.set_epoch(1, skip=5)
    assert list(s) == first[5:]                                    # resume part-way into the epoch


def test_question_files_and_annotation_formats(tmp_path):
    pytest.importorskip("transformers", reason="piip.llava imports transformers")
    from piip.llava.evaluate import LETTER_PROMPT, read_questions, score
    sqa = tmp_path / "sqa.json"
    sqa.write_text(json.dumps([{"id": "p1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nContext: x\nWhich?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}]},
        {"id": "p2", "conversations": [{"from": "human", "value": "Which?\nA. x\nB. y"}]}]))
    rows = list(read_questions("sqa", str(sqa)))
    assert rows[0]["text"] == "Context: x\nWhich?\nA. x\nB. y\n" + LETTER_PROMPT and rows[1]["image"] is None
    (tmp_path / "tv.jsonl").write_text(json.dumps({"question_id": 5, "image": "i.jpg", "text": "q?"}) + "\n\n")
    assert list(read_questions("textvqa", str(tmp_path / "tv.jsonl")))[0]["question_id"] == 5
    with pytest.raises(ValueError, match="unknown benchmark"):
        list(read_questions("vqav2", str(sqa)))
    answers = [{"question_id": 5, "text": "Coke"}]
    (tmp_path / "tv.json").write_text(json.dumps({"data": [{"question_id": 5, "answers": ["coke"] * 10}]}))
    assert score("textvqa", answers, str(tmp_path / "tv.json"))["accuracy"] == pytest.approx(100.0)
    (tmp_path / "gqa.json").write_text(json.dumps({"5": {"answer": "coke"}}))
    assert score("gqa", [{"question_id": "5", "text": "Coke."}], str(tmp_path / "gqa.json"))["accuracy"] == 100.0
    (tmp_path / "seed.json").write_text(json.dumps({"questions": [
        {"question_id": 1, "answer": "A", "data_type": "image"}, {"question_id": 2, "answer": "B", "data_type": "video"}]}))
    r = score("seed", [{"question_id": 1, "text": "A"}, {"question_id": 2, "text": "C"}], str(tmp_path / "seed.json"))
    assert r == {"accuracy": 100.0, "n": 1}                           # video questions are not scored
    (tmp_path / "problems.json").write_text(json.dumps({"p1": {"answer": 1, "choices": ["x", "y"], "image": "a.png"}}))
    assert score("sqa", [{"question_id": "p1", "text": "B"}], str(tmp_path / "problems.json"))["img_accuracy"] == 100.0
    with pytest.raises(ValueError, match="needs --annotation"):
        score("gqa", answers, None)
