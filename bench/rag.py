"""Answering from compressed documents against answering from their full text, one process.

    python bench/rag.py [--rates 4 16 32] [--k 5] [--new_tokens 32] [--repeats 3] [--threads 2]
                        [--index_vectors 100000] [--json bench/results/rag.json]

On the embedded SmolLM2-135M (a Clara with fresh adapters: speed does not depend on training):

  answer     one question with k documents of doc_max_length (256) tokens each. Compressed: the
             documents' memory vectors come from a prebuilt index (compressed before the clock
             starts), the prompt holds k slots of doc_max_length / rate vectors. Full text: the
             same template with the documents' text. Prefill (the prompt through the decoder, KV
             cache filled) and decode (--new_tokens greedy tokens, no early stop) are timed apart;
             each is the median of --repeats runs, compressed and full text alternating.
  compress   documents per second through the compressor (batches of 16), per rate.
  search     MemoryIndex.search latency over --index_vectors random memory vectors (576 values
             each) in blocks of the rate-32 shape (8 vectors a document), one query, median of
             --repeats searches after the first (which computes the blocks' norms once).

Documents are MedQuAD answers from ../shared/data when present (cut or repeated to 256 tokens),
else generated sentences. Prints a table with the ratios compressed / full text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from clara import Clara, ClaraConfig, MemoryIndex
from clara.lora import use_adapter
from clara.model import DECODER
from clara.data.formats import Stage1_2Example
from clara.prompts import collate_prompts, instruction_prompt, text_context_prompt

ROOT = Path(__file__).resolve().parents[1]
MEDQUAD = ROOT.parent / "shared" / "data" / "medquad" / "medquad_qa.jsonl"
QUESTION = "Which foods are rich in vitamin K, and why does that matter for someone taking warfarin?"


def documents(tokenizer, k: int, length: int) -> list[str]:
    """k texts of exactly `length` tokens."""
    texts = []
    if MEDQUAD.exists():
        with open(MEDQUAD, encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["answer"])
                if len(texts) == k:
                    break
    while len(texts) < k:
        texts.append(f"Leafy green vegetable number {len(texts)} holds vitamin K, folate and fibre. " * 8)
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_bos=False)
        while len(ids) < length:
            ids = ids + ids
        out.append(tokenizer.decode(ids[:length]))
    return out


@torch.no_grad()
def time_answer(model: Clara, embeds: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one prompt given as input embeddings [1, L, E]."""
    decoder = model.decoder
    length = embeds.shape[1]
    mask = torch.ones(1, length, dtype=torch.long)
    with use_adapter(decoder, DECODER):
        cache = decoder.new_cache(1, length + new_tokens)
        start = time.perf_counter()
        out = decoder(inputs_embeds=embeds, attention_mask=mask, cache=cache, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            out = decoder(token[:, None], attention_mask=mask, cache=cache, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
        decode = time.perf_counter() - start
    return prefill, decode


def prompt_embeddings(model: Clara, docs: list[str], memory: torch.Tensor | None) -> torch.Tensor:
    if memory is None:
        example = Stage1_2Example(QUESTION, tuple(docs), "", ())
        prompt = text_context_prompt(example, model.tokenizer, model.config, "\n".join(docs), model.texts)
        batch = collate_prompts([prompt], model.tokenizer.pad_id)
        return model.embed(batch.input_ids)
    prompt = instruction_prompt(model.tokenizer, model.config, QUESTION, None, len(docs), model.texts)
    batch = collate_prompts([prompt], model.tokenizer.pad_id)
    return model.prompt_embeddings(batch, memory[None])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=int, nargs="+", default=[4, 16, 32], help="compression rates to time")
    p.add_argument("--k", type=int, default=5, help="documents per question")
    p.add_argument("--new_tokens", type=int, default=32, help="tokens decoded per answer")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median kept)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--index_vectors", type=int, default=100_000,
                   help="memory vectors in the searched index (8 to a document block)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {"k": args.k, "new_tokens": args.new_tokens, "threads": args.threads, "rates": {}}

    for rate in args.rates:
        model = Clara.from_base("smollm2-135m", ClaraConfig(compress_rate=rate, doc_max_length=256,
                                                            training_stage="stage1_2")).eval()
        docs = documents(model.tokenizer, args.k, 256)
        with torch.no_grad():
            start = time.perf_counter()
            memory = model.compress_documents(docs * (16 // args.k + 1))
            compress_s = time.perf_counter() - start
        docs_per_s = memory.shape[0] / compress_s
        memory = memory[:args.k]  # the prebuilt index's blocks of this question
        runs = {"compressed": [], "full_text": []}
        lengths = {}
        for _ in range(args.repeats):
            for name, mem in (("compressed", memory), ("full_text", None)):
                embeds = prompt_embeddings(model, docs, mem)
                lengths[name] = embeds.shape[1]
                runs[name].append(time_answer(model, embeds, args.new_tokens))
        row = {"compress_docs_per_s": round(docs_per_s, 2)}
        for name, times in runs.items():
            prefill = statistics.median(t[0] for t in times)
            decode = statistics.median(t[1] for t in times)
            row[name] = {"prompt_tokens": lengths[name], "prefill_s": round(prefill, 4), "decode_s": round(decode, 4),
                         "answer_s": round(prefill + decode, 4)}
        row["ratio_answer"] = round(row["compressed"]["answer_s"] / row["full_text"]["answer_s"], 3)
        row["ratio_prefill"] = round(row["compressed"]["prefill_s"] / row["full_text"]["prefill_s"], 3)
        row["ratio_decode"] = round(row["compressed"]["decode_s"] / row["full_text"]["decode_s"], 3)
        results["rates"][rate] = row
        print(f"CR {rate:>3}: prompt {row['compressed']['prompt_tokens']} vs {row['full_text']['prompt_tokens']} "
              f"tokens; prefill {row['compressed']['prefill_s']:.3f} s vs {row['full_text']['prefill_s']:.3f} s "
              f"({row['ratio_prefill']:.2f}x); decode {row['compressed']['decode_s']:.3f} s vs "
              f"{row['full_text']['decode_s']:.3f} s ({row['ratio_decode']:.2f}x); answer {row['ratio_answer']:.2f}x "
              f"of full text; compression {docs_per_s:.1f} docs/s", flush=True)
        del model

    index = MemoryIndex(8, 576)
    generator = torch.Generator().manual_seed(0)
    blocks = args.index_vectors // 8
    for start in range(0, blocks, 10_000):
        n = min(10_000, blocks - start)
        index.add(torch.randn(n, 8, 576, generator=generator), [str(i) for i in range(start, start + n)])
    query = torch.randn(1, 8 * 576, generator=generator)
    index.search(query, 5)  # warm-up, and the blocks' norms
    times = []
    for _ in range(max(args.repeats, 3)):
        start = time.perf_counter()
        index.search(query, 5)
        times.append(time.perf_counter() - start)
    results["search_ms"] = round(1000 * statistics.median(times), 2)
    results["index_vectors"] = args.index_vectors
    print(f"MemoryIndex.search over {args.index_vectors} memory vectors ({blocks} blocks of 8 x 576): "
          f"{results['search_ms']:.1f} ms (median)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
