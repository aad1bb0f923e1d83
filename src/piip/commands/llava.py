"""``piip train llava``, ``piip eval llava`` and ``piip convert llava`` (PIIP-LLaVA, needs ``piip[llava]``)."""
from __future__ import annotations

import argparse
import json
import os

from ._model_args import positive_int


def run_convert(args: argparse.Namespace) -> int:
    from ..config import PIIPConfig
    from ..llava.official import convert_official
    if not os.path.isdir(args.src):
        raise ValueError(f"{args.src}: not a folder; 'piip convert llava' reads a released PIIP-LLaVA folder "
                         "(config.json + model*.safetensors)")
    tower = None
    if args.tower_config:
        with open(args.tower_config) as f:
            tower = PIIPConfig.from_dict(json.load(f))
    out = convert_official(args.src, args.out, variant=args.variant, tower=tower)
    print(f"wrote a native PIIP-LLaVA folder to {out}; load it with "
          "PiipLlavaForConditionalGeneration.from_pretrained or 'piip chat --model'")
    return 0


# ---------------------------------------------------------------------------- train
def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llava", help="train PIIP-LLaVA: stage 1 (projector) or stage 2 (everything)",
                       description="LLaVA-format JSON + image folder; defaults reproduce the released recipe "
                                   "(lr 1e-3 / 2e-5, cosine, 3%% warm-up, wd 0, 1 epoch). Multi-GPU: torchrun.")
    p.add_argument("--stage", required=True, choices=["pretrain", "finetune"])
    p.add_argument("--llm", default=None, help="Hugging Face causal LM folder or hub id (Vicuna / Llama)")
    p.add_argument("--variant", default="clip_bl_512_256", help="tower (piip.zoo.llava.LLAVA_TOWERS name)")
    p.add_argument("--interactions", type=positive_int, default=None, help="interaction count (default: 7B's)")
    p.add_argument("--vision-weights", nargs=2, default=None, metavar=("FINE", "COARSE"),
                   help="pretrained branch weights (HF CLIP / timm / open_clip files), fine branch first")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from a native PIIP-LLaVA folder instead of --llm/--variant")
    p.add_argument("--projector", default=None, help="stage 2: the stage-1 mm_projector.safetensors (or official .bin)")
    p.add_argument("--tiny", choices=["clip", "convnext"], default=None,
                   help="a random tiny model and tokenizer (smoke runs, no downloads)")
    p.add_argument("--data", required=True, help="LLaVA-format JSON")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=16, help="per process")
    p.add_argument("--accum-steps", type=positive_int, default=1, help="micro-batches per batch (divides it)")
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--unfreeze-vision", choices=["all", "interactions", "none"], default="all")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--no-group-by-modality", action="store_true",
                   help="stage 2: sample uniformly instead of modality/length-grouped megabatches")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", default=None, help="a checkpoint.pt of this run or its folder ('auto': the one in --out)")
    p.set_defaults(func=run_train)


def _build(args: argparse.Namespace):  # noqa: ANN202
    import torch

    from ..llava import PiipLlavaForConditionalGeneration, PiipLlavaProcessor
    if args.tiny:
        from ..llava.tiny import tiny_config, train_tiny_tokenizer
        tok = train_tiny_tokenizer(os.path.join(args.out, "tokenizer"))
        torch.manual_seed(0)
        model = PiipLlavaForConditionalGeneration(tiny_config(args.tiny))
        return model, PiipLlavaProcessor.from_config(tok, model.config)
    if args.init:
        model = PiipLlavaForConditionalGeneration.from_pretrained(args.init)
        return model, PiipLlavaProcessor.from_pretrained(args.init)
    if not args.llm:
        raise ValueError("give --llm (a Hugging Face causal LM), --init (a PIIP-LLaVA folder) or --tiny")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..zoo.llava import llava_tower
    lm = AutoModelForCausalLM.from_pretrained(args.llm, dtype=torch.float32)
    model = PiipLlavaForConditionalGeneration.from_llm(lm, llava_tower(args.variant, args.interactions))
    config = model.config
    if args.vision_weights:
        from ..weights import describe_reports, load_pretrained_branches
        print(describe_reports(load_pretrained_branches(model.vision_tower, list(args.vision_weights))))
    else:
        import warnings
        warnings.warn("no --vision-weights: the vision tower's branches are randomly initialised (the released "
                      "recipe starts both stages from pretrained CLIP / ConvNeXt branches)")
    return model, PiipLlavaProcessor.from_config(AutoTokenizer.from_pretrained(args.llm), config)


def run_train(args: argparse.Namespace) -> int:
    from ..engine import is_main
    from ..engine.checkpoint import resume_path
    from ..llava.train import STAGES, LlavaTrainArgs, build_trainer, load_projector, read_llava_json, save_stage
    read_llava_json(args.data, args.image_folder, STAGES[args.stage]["template"])  # before anything is built or written
    resume_path(args.resume, args.out)
    model, processor = _build(args)
    if args.projector:
        load_projector(model, args.projector)
    a = LlavaTrainArgs(stage=args.stage, data=args.data, image_folder=args.image_folder, out=args.out, lr=args.lr,
                       epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps,
                       max_steps=args.max_steps, workers=args.workers, unfreeze_vision=args.unfreeze_vision,
                       gradient_checkpointing=not args.no_gradient_checkpointing, device=args.device,
                       group_by_modality=not args.no_group_by_modality)
    trainer = build_trainer(model, processor, a)
    if args.resume:
        trainer.resume_from(args.resume)
    history = trainer.fit()
    if is_main():
        path = save_stage(model, processor, args.stage, args.out)
        print(f"{args.stage}: trained to step {trainer.step}" + (f" ({history[-1]})" if history else "")
              + f"; saved {path}")
    return 0


# ---------------------------------------------------------------------------- eval
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    from ..evaluation.llava import BENCHMARKS
    p = sub.add_parser("llava", help="answer and score a PIIP-LLaVA benchmark (official answer schema)")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--model", default=None, help="native / released folder, hub id, or 'tiny'")
    p.add_argument("--question-file", default=None, help="the LLaVA-1.5 question file of the benchmark")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--answers-file", required=True, help="answers jsonl to write (or, with --score-only, to read)")
    p.add_argument("--annotation", default=None, help="ground truth for offline scoring (see docs/llava.md)")
    p.add_argument("--score-only", action="store_true", help="score an existing --answers-file")
    p.add_argument("--limit", type=positive_int, default=None, help="first N questions only")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..llava.evaluate import read_answers, run_answers, score
    if args.score_only:
        answers = read_answers(args.answers_file)
    else:
        if not args.model or not args.question_file:
            raise ValueError("give --model and --question-file (or --score-only with an existing --answers-file)")
        from ..llava.loading import load_model
        model, processor = load_model(args.model, args.dtype, args.device)
        answers = run_answers(model, processor, args.benchmark, args.question_file, args.image_folder,
                              args.answers_file, model_id=os.path.basename(args.model.rstrip("/")), limit=args.limit)
        print(f"wrote {len(answers)} answers to {args.answers_file}")
    if args.annotation is None and args.benchmark != "mmbench":
        print("no --annotation: answers written, not scored")
        return 0
    print(json.dumps(score(args.benchmark, answers, args.annotation), indent=1))
    return 0
