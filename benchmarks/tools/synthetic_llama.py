"""Write a random-weight Llama-architecture checkpoint of a given size, shard by shard, for measuring memory
and time of compression/export on models larger than this machine's RAM without downloading one.

Quality is never measured on it (the weights are noise); only peak RSS and wall time are.

    python benchmarks/tools/synthetic_llama.py -o /tmp/llama-3b --size 3b            # ~3.0 B params, bf16, ~6 GB
    python benchmarks/tools/synthetic_llama.py -o /tmp/x --hidden 64 --layers 2 ...  # any shape

The tokenizer is SmolLM2's (read from the `smollm2-135m` alias, `edgeprune models fetch smollm2-135m`) unless
`--tokenizer DIR` names a Hugging Face tokenizer folder. Peak memory while writing is about one shard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Shapes modelled on published Llama-family models (hidden, intermediate, layers, heads, kv heads).
PRESETS = {
    "1b": (2048, 8192, 16, 32, 8),  # Llama-3.2-1B-like: ~1.1 B with a 49k vocabulary
    "3b": (3072, 8192, 28, 24, 8),  # Llama-3.2-3B-like: ~3.0 B
    "8b": (4096, 14336, 32, 32, 8),  # Llama-3.1-8B-like: ~7.2 B
}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        p, kv = f"model.layers.{i}.", self.kv_heads * self.head_dim
        return [(p + "input_layernorm.weight", (self.hidden,)),
                (p + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                (p + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.down_proj.weight", (self.hidden, self.intermediate))]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out += self.layer_tensors(i)
        return out + [("model.norm.weight", (self.hidden,))]  # LM head tied to the embedding

    def parameters(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


def load_tokenizer(spec: str | None):
    import transformers

    if spec:
        return transformers.AutoTokenizer.from_pretrained(spec)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from edgeprune.core.loading import smollm2_path

    gguf = smollm2_path()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def write_checkpoint(out: Path, shape: Shape, tokenizer, dtype: str = "bfloat16", shard_bytes: int = 1 << 30,
                     seed: int = 0) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    element = torch.tensor([], dtype=torch_dtype).element_size()
    generator = torch.Generator().manual_seed(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map, shard, shard_size, shards = {}, {}, 0, []

        def flush():
            nonlocal shard, shard_size
            if not shard:
                return
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_size = {}, 0

        for name, dims in tqdm(shape.tensors(), desc="tensors", unit="t"):
            if name.endswith("norm.weight"):
                tensor = torch.ones(dims, dtype=torch_dtype)
            else:  # 0.02 is the initializer range of Llama configs: activations stay finite through the stack
                tensor = (torch.randn(dims, generator=generator) * 0.02).to(torch_dtype)
            size = tensor.numel() * element
            if shard and shard_size + size > shard_bytes:
                flush()
            shard[name] = tensor
            shard_size += size
        flush()
        total = len(shards)
        renamed = {}
        for i, name in enumerate(shards, 1):  # the usual model-0000i-of-0000n names, known only at the end
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(tmp / name, tmp / final)
            renamed[name] = final
        index = {"metadata": {"total_size": shape.parameters() * element},
                 "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        config = transformers.LlamaConfig(
            vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, torch_dtype=dtype)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"parameters": shape.parameters(), "shards": total, "dtype": dtype, "path": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--size", choices=sorted(PRESETS), help="a preset shape (else give --hidden etc.)")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-mb", type=int, default=1024)
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    dims = list(PRESETS[args.size]) if args.size else [None] * 5
    for i, given in enumerate((args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads)):
        dims[i] = given or dims[i]
    if None in dims:
        parser.error("give --size or all of --hidden --intermediate --layers --heads --kv-heads")
    hidden, intermediate, layers, heads, kv_heads = dims
    if hidden % heads or heads % kv_heads:
        parser.error("--hidden must divide by --heads, and --heads by --kv-heads")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists (pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    shape = Shape(hidden, intermediate, layers, heads, kv_heads, len(tokenizer))
    print(f"writing {shape.parameters() / 1e9:.2f} B parameters ({args.dtype}) to {out}", file=sys.stderr)
    info = write_checkpoint(out, shape, tokenizer, args.dtype, args.shard_mb << 20, args.seed)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
