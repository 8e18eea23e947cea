"""Do the torch path (HF tokenizer) and the llamacpp path (llama.cpp's tokenizer) score the same token ids?"""
import sys, numpy as np
from transformers import AutoTokenizer
from edgeprune.core.datasets import read_corpus
from edgeprune.core.data_sources import resolve_data
from edgeprune.runtime.llamacpp_adapter import LlamaCppBackend
n = int(sys.argv[3]); text = read_corpus(resolve_data("wikitext2:valid"))
hf = AutoTokenizer.from_pretrained(sys.argv[1])(text, add_special_tokens=False)["input_ids"][:n]
lc = LlamaCppBackend(sys.argv[2]).encode(text)[:n]
print("hf", len(hf), "llamacpp", len(lc), "identical", hf == lc,
      "first mismatch", next((i for i, (a, b) in enumerate(zip(hf, lc)) if a != b), None))
