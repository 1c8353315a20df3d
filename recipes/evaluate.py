"""Evaluate a Clara model on a stage file: answers (EM, cover-EM, F1), yes/no/maybe, retrieval.

    python -m clara.recipes.evaluate --model checkpoints/run --data out/pubmedqa/stage1_2_dev.jsonl --stage stage1_2
    python -m clara.recipes.evaluate --model smollm2-135m --data out/pubmedqa/stage2_dev.jsonl --stage stage2

What each stage file is asked, and how it is scored (all scores from clara.data.metrics):

| stage | one prediction per | the model call | scores |
|---|---|---|---|
| stage1_2 | row | generate_from_text(question, the row's docs) | EM, acc (cover-EM), F1 over the references |
| stage2 | row | compress the N candidates, rank them with the query reasoner, answer from the top k | the same, plus recall@k, precision@k (k = 1, 3, 5) and MRR against pos_index |
| stage1, QA rows | question of the row | generate_from_text(that question, the row's docs) | EM, acc, F1 against its answer |
| stage1, paraphrase rows | row | generate_from_paraphrase(the row's docs) | EM, acc, F1 against answers[0] |

Every prediction whose references all normalise to one of yes / no / maybe (PubMedQA's
decisions; `clara.data.pubmedqa` writes them as golden_answers) is also scored for yes/no/maybe
accuracy and macro-F1, over that subset, whose size is reported.

stage2 ranks all N candidates rather than only the k the generator reads, so recall@5 and MRR
are exact whatever --generation_top_k is; the answer is generated from the first k of that
ranking, which is what `Clara.generate_from_questions` does (the hard top-k selects the same
documents in the same order).

--model is a Clara checkpoint folder (it holds clara.json), an official CLaRa checkpoint folder, a
hub checkpoint written 'org/name:subfolder' (apple/CLaRa-7B-Instruct:compression-16, converted
once and cached), or a base model (`smollm2-135m`, a Hugging Face folder, a hub id, a .gguf file):
a base model gets a fresh, untrained Clara (random adapters, seeded by --seed), which the output
says; its scores are a floor, near zero.

Writes, atomically: the predictions as JSONL (one row per prediction: row, id, prediction, gold,
and for stage2 top_k, ranking, pos_index), PREFIX.metrics.json (the metrics and the settings
that produced them) and PREFIX.metrics.md (the Markdown table printed on stdout), where PREFIX is
--output without its .jsonl. Logs carry counts, timings and metrics, never question or answer text.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from clara.command import CommandParser, command_main, fail, parse_device
from clara.checkpoint import names_clara_checkpoint
from clara.config import ClaraConfig
from clara.memory_cache import DocumentMemoryCache
from clara.model import Clara
from clara.stages import EVAL_STAGES, QUERY, get_stage
from clara.quant import QUANT_KINDS
from clara.weights import DTYPES
from clara.files import atomic_write_json, atomic_write_jsonl, atomic_write_text
from clara.data.formats import Stage1Example, read_stage_file
from clara.recipes.nll import answer_nll
from clara.data.metrics import PUBMEDQA_LABELS, answer_scores, normalize_answer, pubmedqa_scores, retrieval_scores

# The official evaluation generates stage2 answers with this limit (evaluation/evaluate.py).
STAGE2_MAX_NEW_TOKENS = 64


@dataclass
class EvalOptions:
    stage: str
    generation_top_k: int | None = None  # stage2: documents the generator reads (None: the model's)
    max_new_tokens: int | None = None  # None: the model's config.max_new_tokens
    batch_size: int = 4
    max_samples: int | None = None  # evaluate only the first N examples of the file
    seed: int = 0


@dataclass
class Evaluation:
    predictions: list[dict[str, Any]]  # the rows written to the JSONL file
    metrics: dict[str, Any]  # group -> the scores of clara.data.metrics
    options: EvalOptions  # as run: generation_top_k resolved for stage2


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------
def load_examples(path: str | Path, stage: str, top_k: int | None = None, max_samples: int | None = None) -> list:
    """The file's examples (clara.data.formats validation: every problem named by file, line and field)."""
    examples = read_stage_file(path, stage, None if get_stage(stage).typed_rows else top_k)
    return examples[:max_samples] if max_samples is not None else examples


def load_model(name: str, stage: str, generation_top_k: int | None, dtype: torch.dtype = torch.float32,
               device: str = "cpu", seed: int = 0, quantize: str | None = None):
    """(model, untrained): a saved Clara checkpoint, or a fresh Clara on a base model."""
    torch.manual_seed(seed)  # a fresh model's adapters are random; make them reproducible
    if names_clara_checkpoint(name):
        # The checkpoint's own stage is kept: asking for another would start fresh adapters.
        return Clara.from_pretrained(name, dtype=dtype, device=device, quantize=quantize), False
    config = ClaraConfig(training_stage=stage)
    if generation_top_k is not None:
        config.generation_top_k = generation_top_k
    return Clara.from_base(name, config, dtype=dtype, device=device, quantize=quantize), True


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------
def _batches(items: Sequence[Any], size: int, n_docs) -> list[list[Any]]:
    """Consecutive batches of at most `size` items with the same number of documents."""
    batches: list[list[Any]] = []
    for item in items:
        if batches and len(batches[-1]) < size and n_docs(batches[-1][0]) == n_docs(item):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _predict_answers(model, examples: Sequence[Any], options: EvalOptions, progress: tqdm) -> list[dict[str, Any]]:
    """stage1_2: answer each question from all of its row's documents."""
    rows = []
    for batch in _batches(list(enumerate(examples, start=1)), options.batch_size, lambda item: len(item[1].docs)):
        answers = model.generate_from_text([e.question for _, e in batch], [list(e.docs) for _, e in batch],
                                           max_new_tokens=options.max_new_tokens)
        rows += [{"row": row, "id": e.id, "prediction": a, "gold": list(e.gold_answers)}
                 for (row, e), a in zip(batch, answers)]
        progress.update(len(batch))
    return rows


def rank_and_answer(model, questions: list[str], documents: list[list[str]], k: int,
                    max_new_tokens: int | None) -> tuple[list[str], torch.Tensor]:
    """(answers, ranking [B, N] of every candidate, best first): generate_from_questions' path,
    with the retriever asked for all N candidates so the ranking below the top k is known too."""
    n = len(documents[0])
    memory = model.compress_documents([d for docs in documents for d in docs])
    memory = memory.view(len(questions), n, *memory.shape[1:])  # [B, N, n_mem, E]
    selected, ranking = model.retrieve(questions, memory, n)  # [B, N, n_mem, E], [B, N]
    answers = model.generate_from_compressed_documents_and_questions(questions, selected[:, :k], max_new_tokens)
    return answers, ranking


def _predict_end_to_end(model, examples: Sequence[Any], options: EvalOptions, progress: tqdm) -> list[dict[str, Any]]:
    """stage2: rank each row's candidates, answer from the top k."""
    k = options.generation_top_k
    rows = []
    for batch in _batches(list(enumerate(examples, start=1)), options.batch_size, lambda item: len(item[1].docs)):
        answers, ranking = rank_and_answer(model, [e.question for _, e in batch], [list(e.docs) for _, e in batch],
                                           k, options.max_new_tokens)
        for (row, e), answer, order in zip(batch, answers, ranking.tolist()):
            rows.append({"row": row, "id": e.id, "prediction": answer, "gold": list(e.gold_answers),
                         "top_k": order[:k], "ranking": order, "pos_index": list(e.pos_index) or None})
        progress.update(len(batch))
    return rows


def _predict_stage1(model, examples: Sequence[Stage1Example], options: EvalOptions, progress: tqdm
                    ) -> list[dict[str, Any]]:
    """stage1: each QA pair answered from its row's documents; each paraphrase row restated."""
    qa = [(row, i, e) for row, e in enumerate(examples, start=1) if e.data_type == "qa"
          for i in range(len(e.questions))]
    paraphrase = [(row, None, e) for row, e in enumerate(examples, start=1) if e.data_type == "paraphrase"]
    out: dict[tuple[int, int | None], dict[str, Any]] = {}
    for batch in _batches(qa, options.batch_size, lambda item: len(item[2].docs)):
        answers = model.generate_from_text([e.questions[i] for _, i, e in batch], [list(e.docs) for _, _, e in batch],
                                           max_new_tokens=options.max_new_tokens)
        for (row, i, e), answer in zip(batch, answers):
            out[row, i] = {"row": row, "id": e.id, "data_type": "qa", "question_index": i, "prediction": answer,
                           "gold": [e.answers[i]]}
        progress.update(len(batch))
    for batch in _batches(paraphrase, options.batch_size, lambda item: len(item[2].docs)):
        # The question only sizes the batch: the paraphrase prompt has none (as the official method).
        texts = model.generate_from_paraphrase([""] * len(batch), [list(e.docs) for _, _, e in batch],
                                               max_new_tokens=options.max_new_tokens)
        for (row, _, e), text in zip(batch, texts):
            out[row, None] = {"row": row, "id": e.id, "data_type": "paraphrase", "question_index": None,
                              "prediction": text, "gold": [e.answers[0]]}
        progress.update(len(batch))
    return [out[key] for key in sorted(out, key=lambda key: (key[0], -1 if key[1] is None else key[1]))]


def count_predictions(examples: Sequence[Any], stage: str) -> int:
    """One per row, except stage1 QA rows: one per question."""
    if not get_stage(stage).typed_rows:
        return len(examples)
    return sum(len(e.questions) if e.data_type == "qa" else 1 for e in examples)


def predict(model, examples: Sequence[Any], options: EvalOptions, show_progress: bool = True) -> list[dict[str, Any]]:
    stage = get_stage(options.stage)
    predictor = _predict_stage1 if stage.typed_rows else _predict_end_to_end if stage.retrieves else _predict_answers
    with torch.no_grad(), tqdm(total=count_predictions(examples, options.stage), unit="prediction",
                               desc=f"evaluate {options.stage}", disable=not show_progress,
                               file=sys.stderr) as progress:
        return predictor(model, examples, options, progress)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------
def decision_label(golds: Sequence[str]) -> str | None:
    """The yes/no/maybe label all references state, or None (several labels, or free text)."""
    labels = {normalize_answer(gold) for gold in golds}
    return labels.pop() if len(labels) == 1 and next(iter(labels)) in PUBMEDQA_LABELS else None


def _answer_groups(rows: Sequence[dict[str, Any]], stage: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["data_type"] if get_stage(stage).typed_rows else "answer", []).append(row)
    return {name: answer_scores([r["prediction"] for r in group], [r["gold"] for r in group])
            for name, group in groups.items()}


def score(rows: Sequence[dict[str, Any]], stage: str) -> dict[str, Any]:
    """Metrics of prediction rows (as `predict` returns and the JSONL file holds)."""
    if not rows:
        raise ValueError("no predictions to score")
    metrics: dict[str, Any] = _answer_groups(rows, stage)
    labelled = [(r["prediction"], decision_label(r["gold"])) for r in rows]
    labelled = [(prediction, label) for prediction, label in labelled if label is not None]
    if labelled:
        metrics["yes_no_maybe"] = pubmedqa_scores([p for p, _ in labelled], [label for _, label in labelled])
    ranked = [r for r in rows if r.get("pos_index")]
    if ranked:
        metrics["retrieval"] = retrieval_scores([r["ranking"] for r in ranked], [r["pos_index"] for r in ranked])
    return metrics


def evaluate(model, examples: Sequence[Any], options: EvalOptions, show_progress: bool = True) -> Evaluation:
    """Predict every example with `model` (a Clara, or anything with its generate methods), then score."""
    if options.stage not in EVAL_STAGES:
        raise ValueError(f"stage must be one of {', '.join(EVAL_STAGES)}, got {options.stage!r}")
    if not examples:
        raise ValueError("no examples to evaluate")
    if get_stage(options.stage).retrieves:
        options = replace(options, generation_top_k=options.generation_top_k or model.config.generation_top_k)
        fewest = min(len(e.docs) for e in examples)
        if fewest < options.generation_top_k:
            raise ValueError(f"generation_top_k={options.generation_top_k} but a row has only {fewest} candidates")
    model.rng = random.Random(options.seed)  # paraphrase instructions are drawn from it
    rows = predict(model, examples, options, show_progress)
    return Evaluation(rows, score(rows, options.stage), options)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
GROUP_TITLES = {"answer": "answer", "qa": "stage1 QA", "paraphrase": "stage1 paraphrase",
                "yes_no_maybe": "yes/no/maybe", "retrieval": "retrieval"}
METRIC_TITLES = {"em": "EM", "acc": "acc (cover-EM)", "f1": "F1", "accuracy": "accuracy", "macro_f1": "macro-F1",
                 "unparsed": "no label found", "mrr": "MRR"}


def markdown_table(metrics: dict[str, Any]) -> str:
    lines = ["| group | metric | value |", "|---|---|---:|"]
    for group, values in metrics.items():
        counts_last = sorted(values, key=lambda name: name in ("unparsed", "n"))  # stable: scores, then counts
        for name in counts_last:
            value = values[name]
            shown = str(value) if name in ("n", "unparsed") else f"{value:.4f}"
            lines.append(f"| {GROUP_TITLES.get(group, group)} | {METRIC_TITLES.get(name, name)} | {shown} |")
    return "\n".join(lines) + "\n"


def output_prefix(output: str | Path) -> Path:
    output = Path(output)
    return output.with_suffix("") if output.suffix == ".jsonl" else output


def evaluate_nll(model: Clara, examples: Sequence[Any], options: EvalOptions) -> Evaluation:
    """The answer-NLL evaluation (clara.recipes.nll) as an Evaluation: one row of NLLs per example."""
    result = answer_nll(model, examples, options.batch_size)
    kept = [e for e in examples if getattr(e, "data_type", "qa") == "qa"]
    predictions = [{"row": i, "id": e.id, **{f"nll_{c}": round(v, 6) for c, v in nlls.items()}}
                   for i, (e, nlls) in enumerate(zip(kept, result.per_row), start=1)]
    return Evaluation(predictions, {"nll": result.means()}, options)


def write_outputs(evaluation: Evaluation, output: str | Path, summary: dict[str, Any]) -> tuple[Path, Path, Path]:
    """predictions JSONL, PREFIX.metrics.json (summary + metrics), PREFIX.metrics.md; all atomic."""
    prefix = output_prefix(output)
    json_path = prefix.with_name(prefix.name + ".metrics.json")
    md_path = prefix.with_name(prefix.name + ".metrics.md")
    atomic_write_jsonl(output, evaluation.predictions)
    atomic_write_json(json_path, summary | {"metrics": evaluation.metrics})
    atomic_write_text(md_path, markdown_table(evaluation.metrics))
    return Path(output), json_path, md_path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="clara-eval",
        description="Evaluate a Clara model on a stage1 / stage1_2 / stage2 JSONL file: EM, cover-EM (acc) and "
                    "token F1 over every reference answer, yes/no/maybe accuracy and macro-F1 where the "
                    "references are decisions, and for stage2 recall@k / precision@k (k = 1, 3, 5) and MRR of "
                    "the query reasoner's ranking against pos_index. See the module docstring for details.")
    parser.add_argument("--model", required=True,
                        help="a Clara checkpoint folder (with clara.json), a training run folder (its final/ is used), an "
                             "official CLaRa checkpoint folder, a hub checkpoint 'org/name:subfolder' (e.g. "
                             "apple/CLaRa-7B-Instruct:compression-16), or a base model - 'smollm2-135m', a "
                             "Hugging Face folder, a hub id or a .gguf file - which gets a fresh, UNTRAINED Clara "
                             "(random adapters; its scores are a floor)")
    parser.add_argument("--data", required=True, help="the stage JSONL file to evaluate on")
    parser.add_argument("--stage", required=True, choices=EVAL_STAGES,
                        help="layout of --data: stage1 (QA/paraphrase rows), stage1_2 (question + its k docs), "
                             "stage2 (question + N candidates + pos_index)")
    parser.add_argument("--max_samples", type=int, default=None,
                        help="evaluate only the first N rows of the file (default: all)")
    parser.add_argument("--generation_top_k", type=int, default=None,
                        help="stage2: documents the generator reads out of the ranked candidates (default: the "
                             "model's generation_top_k, 5 for a fresh model); stage1_2: every row must hold exactly "
                             "this many docs (default: no check beyond equal counts); ignored for stage1")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help=f"length limit of each generated answer (default: {STAGE2_MAX_NEW_TOKENS} for stage2, as "
                             "the official evaluation; the model's max_new_tokens, 128, otherwise)")
    parser.add_argument("--batch_size", type=int, default=4, help="questions generated together (default 4)")
    parser.add_argument("--output", default="predictions.jsonl",
                        help="predictions JSONL; the metrics go beside it as PREFIX.metrics.json and "
                             "PREFIX.metrics.md, PREFIX being this path without .jsonl (default predictions.jsonl)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds a fresh model's adapters and the paraphrase-instruction draws; generation is "
                             "greedy (default 0)")
    parser.add_argument("--nll", action="store_true",
                        help="instead of generating, measure the mean per-token NLL of each row's answer given its "
                             "compressed documents, another row's (shuffled), no documents and the documents' full "
                             "text, and the share of the full text's gain the memory keeps (retained); stage1 QA "
                             "rows and stage1_2 rows (clara.recipes.nll)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--quantize", choices=QUANT_KINDS, default=None,
                        help="store the base's block weights nf4 or int8 (clara/quant.py); int8 answers fastest on CPU")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    return parser


def _check_arguments(args: argparse.Namespace) -> str | None:
    for flag in ("max_samples", "generation_top_k", "max_new_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            return f"--{flag} must be at least 1, got {value}"
    return None


@command_main("clara-eval")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_arguments(args)
    if problem:
        return fail("clara-eval", problem)
    if args.nll and not (get_stage(args.stage).generates and not get_stage(args.stage).retrieves):
        return fail("clara-eval", f"--nll measures stage1 QA rows and stage1_2 rows, not --stage {args.stage}")
    max_new_tokens = args.max_new_tokens or (STAGE2_MAX_NEW_TOKENS if get_stage(args.stage).retrieves else None)
    options = EvalOptions(args.stage, args.generation_top_k, max_new_tokens, args.batch_size,
                          args.max_samples, args.seed)
    examples = load_examples(args.data, args.stage, args.generation_top_k, args.max_samples)
    device = parse_device(args.device)
    started = time.perf_counter()
    model, untrained = load_model(args.model, args.stage, args.generation_top_k, DTYPES[args.dtype], device, args.seed,
                                  args.quantize)
    load_seconds = time.perf_counter() - started
    kind = "a fresh, UNTRAINED Clara on base" if untrained else "Clara checkpoint"
    print(f"[clara.recipes.evaluate] {kind} {args.model} loaded in {load_seconds:.1f}s; {len(examples)} {args.stage} "
          f"rows of {args.data}", file=sys.stderr)
    if untrained:
        print("[clara.recipes.evaluate] note: the adapters are random, so expect scores near zero", file=sys.stderr)
    if get_stage(args.stage).retrieves and QUERY not in model.adapter_names:
        return fail("clara-eval", f"--model {args.model} has no query reasoner (a {model.config.training_stage} "
                    "checkpoint); evaluate it on stage1_2 files, or train stage2 first")
    # Nothing trains here: each distinct document is compressed once (stage2 rows share candidates).
    model.memory_cache = DocumentMemoryCache()
    started = time.perf_counter()
    if args.nll:
        evaluation = evaluate_nll(model, examples, options)
    else:
        evaluation = evaluate(model, examples, options)
    seconds = time.perf_counter() - started
    summary = {"model": args.model, "untrained": untrained, "data": args.data, "stage": args.stage,
               "rows": len(examples), "predictions": len(evaluation.predictions),
               "generation_top_k": evaluation.options.generation_top_k if get_stage(args.stage).retrieves else None,
               "max_new_tokens": max_new_tokens or model.config.max_new_tokens, "batch_size": args.batch_size,
               "seed": args.seed, "dtype": args.dtype, "device": args.device,
               "seconds": round(seconds, 2), "load_seconds": round(load_seconds, 2)}
    paths = write_outputs(evaluation, args.output, summary)
    print(f"[clara.recipes.evaluate] {len(evaluation.predictions)} predictions in {seconds:.1f}s; wrote "
          f"{', '.join(str(p) for p in paths)}", file=sys.stderr)
    title = f"{args.model}{' (untrained)' if untrained else ''} on {args.data} ({args.stage}, {len(examples)} rows)"
    print(f"{title}\n\n{markdown_table(evaluation.metrics)}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
