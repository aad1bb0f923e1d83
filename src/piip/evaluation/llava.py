"""Offline scorers of the PIIP-LLaVA benchmarks (llava_spec §5): pure functions from answers (the
official ``{"question_id", "prompt", "text", ...}`` jsonl rows) and annotations to numbers.

Rules as the LLaVA-1.5 evaluation scripts apply them: TextVQA soft accuracy with the EvalAI answer
normalisation (min(#matches/3, 1) averaged over the 10 leave-one-out subsets), GQA exact match after
``rstrip('.').lower()``, POPE yes/no F1 per category, SEED-Bench and MMBench letter accuracy,
ScienceQA letter parsing. Where the official script picks a random option for unparsable answers
(ScienceQA), they are counted wrong here so scores are deterministic.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional, Sequence

BENCHMARKS = ("textvqa", "gqa", "pope", "seed", "sqa", "mmbench")

# ---------------------------------------------------------------------------- EvalAI normalisation
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't",
    "haven't", "he'd", "he'll", "he's", "how'd", "how'll", "how's", "i'd", "i'll", "i'm", "i've", "isn't",
    "it'd", "it'll", "it's", "let's", "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't",
    "o'clock", "shan't", "she'd", "she'll", "she's", "should've", "shouldn't", "that's", "there'd", "there're",
    "there's", "they'd", "they'll", "they're", "they've", "wasn't", "we'd", "we'll", "we're", "we've",
    "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "y'all",
    "you'd", "you'll", "you're", "you've")}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUM = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI / VQA answer normalisation (case, punctuation, number words, articles, contractions)."""
    s = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in _PUNCT:
        if (p + " " in s or " " + p in s) or _COMMA_NUM.search(s) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


# ---------------------------------------------------------------------------- scorers
def textvqa_score(pred: str, gt_answers: Sequence[str]) -> float:
    """Soft accuracy of one prediction against the 10 human answers."""
    answers = [normalize_vqa_answer(a) for a in gt_answers]
    p = normalize_vqa_answer(pred)
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        accs.append(min(1.0, sum(a == p for a in others) / 3.0))
    return sum(accs) / len(accs) if accs else 0.0


def _by_id(answers: Iterable[Mapping[str, Any]]) -> dict[Any, str]:
    return {a["question_id"]: str(a["text"]) for a in answers}


def _need(ids: Iterable[Any], truth: Mapping[Any, Any], what: str) -> None:
    missing = [i for i in ids if i not in truth]
    if missing:
        raise ValueError(f"{len(missing)} answered questions have no {what} annotation, e.g. {missing[:3]}")


def score_textvqa(answers: Iterable[Mapping[str, Any]], annotations: Mapping[Any, Sequence[str]]) -> dict[str, float]:
    """``annotations``: question_id -> the 10 answers (TextVQA_0.5.1_val.json ``data[*].answers``)."""
    preds = _by_id(answers)
    _need(preds, annotations, "TextVQA")
    scores = [textvqa_score(t, annotations[q]) for q, t in preds.items()]
    return {"accuracy": 100.0 * sum(scores) / max(1, len(scores)), "n": len(scores)}


def score_gqa(answers: Iterable[Mapping[str, Any]], annotations: Mapping[Any, str]) -> dict[str, float]:
    """``annotations``: question_id -> answer (testdev_balanced_questions.json)."""
    preds = _by_id(answers)
    _need(preds, annotations, "GQA")
    ok = [t.rstrip(".").lower().strip() == str(annotations[q]).lower() for q, t in preds.items()]
    return {"accuracy": 100.0 * sum(ok) / max(1, len(ok)), "n": len(ok)}


def pope_yes_no(text: str) -> str:
    """First sentence; 'no' if it contains the word No / not / no, else 'yes' (eval_pope.py)."""
    t = text.split(".")[0] if "." in text else text
    words = t.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(1, len(labels))
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in preds) / n}


def score_pope(answers: Iterable[Mapping[str, Any]], labels: Mapping[str, Mapping[Any, str]]) -> dict[str, Any]:
    """``labels``: category (adversarial / popular / random) -> question_id -> 'yes'|'no'. Reports
    each category's metrics and the mean F1 x 100 (the number the papers quote)."""
    preds = _by_id(answers)
    out: dict[str, Any] = {}
    for cat, lab in labels.items():
        ids = [q for q in lab if q in preds]
        if not ids:
            continue
        out[cat] = pope_metrics([pope_yes_no(preds[q]) for q in ids], [lab[q] for q in ids])
    if not out:
        raise ValueError("no POPE answer matches a labelled question_id")
    out["f1"] = 100.0 * sum(m["f1"] for m in out.values()) / len(out)
    return out


def score_letters(answers: Iterable[Mapping[str, Any]], annotations: Mapping[Any, str]) -> dict[str, float]:
    """SEED-Bench / MMBench (single pass): the answer text must be the option letter."""
    preds = _by_id(answers)
    _need(preds, annotations, "letter")
    ok = [parse_letter(t, "ABCD") == str(annotations[q]).strip() for q, t in preds.items()]
    return {"accuracy": 100.0 * sum(ok) / max(1, len(ok)), "n": len(ok)}


def parse_letter(text: str, options: str = "ABCDE") -> Optional[str]:
    """'B', 'B. cat' or 'The answer is B.' -> 'B' (eval_science_qa.py rules); None when unparsable."""
    t = text.strip()
    if t in options:
        return t or None
    if len(t) >= 3 and t[0] in options and t[1:3] == ". ":
        return t[0]
    found = re.findall(r"The answer is ([A-Z]).", t)
    return found[0] if len(found) == 1 and found[0] in options else None


def score_sqa(answers: Iterable[Mapping[str, Any]], problems: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``problems``: ScienceQA problems.json (question_id -> {'answer': index, 'choices', 'image'}).
    Reports accuracy over all answered questions and IMG-Accuracy over those with an image."""
    preds = _by_id(answers)
    _need(preds, problems, "ScienceQA")
    ok, img = [], []
    for q, t in preds.items():
        prob = problems[q]
        letters = "ABCDE"[:len(prob["choices"])]
        hit = parse_letter(t, letters) == letters[int(prob["answer"])]
        ok.append(hit)
        if prob.get("image"):
            img.append(hit)
    return {"accuracy": 100.0 * sum(ok) / max(1, len(ok)), "img_accuracy": 100.0 * sum(img) / max(1, len(img)),
            "n": len(ok), "n_img": len(img)}


__all__ = ["BENCHMARKS", "normalize_vqa_answer", "textvqa_score", "score_textvqa", "score_gqa", "pope_yes_no", "pope_metrics",
           "score_pope", "score_letters", "parse_letter", "score_sqa"]
