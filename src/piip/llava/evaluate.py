"""``piip eval llava``: answer a benchmark's questions with a PIIP-LLaVA model (greedy, batch size 1,
``vicuna_v1``, padded images: the official evaluation) into the official answers jsonl, and score it
offline where the metric is a pure function of answers and annotations (:mod:`piip.evaluation.llava`).

Question files are the LLaVA-1.5 ones: jsonl ``{"question_id", "image", "text"}`` (TextVQA, GQA, POPE,
SEED), ScienceQA's ``llava_test_CQM-A.json`` and MMBench's ``.tsv`` (base64 images).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import uuid
from typing import Any, Iterator, Optional

from ..evaluation import llava as scorers
from ..evaluation.llava import BENCHMARKS

LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
MAX_NEW_TOKENS = {"sqa": 1024, "mmbench": 1024}   # model_vqa / _science / _mmbench; the loader scripts: 128


def read_questions(benchmark: str, path: str) -> Iterator[dict[str, Any]]:
    """Rows ``{"question_id", "image" (path, PIL image or None), "text" (the question with its prompt
    suffix, without <image>)}`` in the file's order."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; available: {BENCHMARKS}")
    if not os.path.isfile(path):
        raise ValueError(f"--question-file {path}: no such file")
    if benchmark == "sqa":
        with open(path) as f:
            for row in json.load(f):
                q = row["conversations"][0]["value"].replace("<image>", "").strip()
                yield {"question_id": row["id"], "image": row.get("image"), "text": q + "\n" + LETTER_PROMPT}
        return
    if benchmark == "mmbench":
        from PIL import Image
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                q = row["question"]
                if row.get("hint") and row["hint"].lower() != "nan":
                    q = row["hint"] + "\n" + q
                for c in "ABCD":
                    if row.get(c) and row[c].lower() != "nan":
                        q += f"\n{c}. {row[c]}"
                img = Image.open(io.BytesIO(base64.b64decode(row["image"]))) if row.get("image") else None
                yield {"question_id": row["index"], "image": img, "text": q + "\n" + LETTER_PROMPT,
                       "answer": row.get("answer")}
        return
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield {"question_id": row["question_id"], "image": row.get("image"), "text": row["text"],
                       "category": row.get("category")}


def run_answers(model: Any, processor: Any, benchmark: str, question_file: str, image_folder: Optional[str],
                answers_file: str, model_id: str = "piip-llava", limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Generate every answer and write the official answers jsonl; returns the rows."""
    from PIL import Image

    from .loading import answer
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    with open(answers_file, "w") as out:
        for i, q in enumerate(read_questions(benchmark, question_file)):
            if limit is not None and i >= limit:
                break
            img = q["image"]
            if isinstance(img, str):
                if image_folder is None:
                    raise ValueError("the questions reference image files: give --image-folder")
                with Image.open(os.path.join(image_folder, img)) as im:
                    img = im.convert("RGB")
            pix = processor.image_processor.pixel_values(img) if img is not None else None
            prompt = processor.prompt(q["text"], image=img is not None)
            text = answer(model, processor, prompt, pix, MAX_NEW_TOKENS.get(benchmark, 128))
            row = {"question_id": q["question_id"], "prompt": q["text"], "text": text,
                   "answer_id": uuid.uuid4().hex, "model_id": model_id,
                   "metadata": {k: q[k] for k in ("category", "answer") if q.get(k) is not None}}
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)
    return rows


def read_answers(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def score(benchmark: str, answers: list[dict[str, Any]], annotation: Optional[str]) -> dict[str, Any]:
    """Score ``answers`` with the benchmark's annotation file (MMBench: the answers' own tsv answers)."""
    if benchmark == "mmbench":
        truth = {a["question_id"]: a["metadata"]["answer"] for a in answers if a.get("metadata", {}).get("answer")}
        return scorers.score_letters([a for a in answers if a["question_id"] in truth], truth)
    if annotation is None:
        raise ValueError(f"scoring {benchmark} needs --annotation (see docs/llava.md)")
    if not os.path.exists(annotation):
        raise ValueError(f"--annotation {annotation}: no such file or folder")
    if benchmark == "pope":   # a folder of coco_pope_<category>.json label files (jsonl)
        labels = {}
        for name in sorted(os.listdir(annotation)):
            if name.startswith("coco_pope_") and name.endswith(".json"):
                with open(os.path.join(annotation, name)) as f:
                    rows = [json.loads(x) for x in f if x.strip()]
                labels[name[len("coco_pope_"):-5]] = {r["question_id"]: r["label"] for r in rows}
        return scorers.score_pope(answers, labels)
    with open(annotation) as f:
        ann = json.load(f)
    if benchmark == "textvqa":
        return scorers.score_textvqa(answers, {d["question_id"]: d["answers"] for d in ann["data"]})
    if benchmark == "gqa":
        return scorers.score_gqa(answers, {k: v["answer"] for k, v in ann.items()})
    if benchmark == "seed":   # SEED-Bench.json; image questions only
        qs = {q["question_id"]: q["answer"] for q in ann["questions"] if q.get("data_type", "image") == "image"}
        return scorers.score_letters([a for a in answers if a["question_id"] in qs], qs)
    return scorers.score_sqa(answers, ann)   # sqa: problems.json
