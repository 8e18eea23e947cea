"""Tiny random-weight models of every supported family, saved as real Hugging Face directories
(config + safetensors + a word-level tokenizer), so tests exercise the same loading path as users."""

from __future__ import annotations

from pathlib import Path

VOCAB_WORDS = ("the a an is was are be to of and in on at for with by from as it this that he she they we you "
               "man woman child dog cat horse bird car ball guitar plays playing rides riding eats eating runs "
               "running sits sitting walks walking jumps red blue green small big old young quickly slowly "
               "house street park water food table music song book game field road tree sky sun day night "
               "one two three four five good bad new first last long short high low every some many").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
VOCAB_SIZE = 128
WORDS = VOCAB_WORDS[: VOCAB_SIZE - len(SPECIALS)]

FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2")


def tiny_config(family: str, layers: int = 2):
    import transformers

    common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=128)
    if family in ("bert", "roberta"):
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        extra = {"pad_token_id": 0} if family == "bert" else {"pad_token_id": 0, "bos_token_id": 5, "eos_token_id": 6}
        return cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common, **extra)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=48, dropout=0.0,
                                             attention_dropout=0.0, pad_token_id=0, **common)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_inner=48, n_positions=128,
                                       vocab_size=VOCAB_SIZE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=5, eos_token_id=6, pad_token_id=0)
    if family in ("llama", "qwen2"):
        cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        return cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                   head_dim=8, intermediate_size=48, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   bos_token_id=5, eos_token_id=6, pad_token_id=0, **common)
    raise ValueError(family)


def tiny_tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if family in ("bert", "roberta", "distilbert"):
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       model_max_length=128,
                                       model_input_names=["input_ids", "attention_mask"] if family == "distilbert"
                                       else ["input_ids", "token_type_ids", "attention_mask"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>", model_max_length=128,
                                   model_input_names=["input_ids", "attention_mask"])


def make_tiny(family: str, directory: str | Path, seed: int = 0, task: str | None = None, layers: int = 2) -> Path:
    """Build and save a tiny random model of ``family`` (decoders as causal LMs) into ``directory``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(family, layers)
    decoder = family in ("gpt2", "llama", "qwen2")
    cls_name = {"sequence-classification": "AutoModelForSequenceClassification"}.get(
        task, "AutoModelForCausalLM" if decoder else "AutoModel")
    model = getattr(transformers, cls_name).from_config(config)
    with torch.no_grad():  # random biases and norms too, so a wrong slice cannot hide behind zeros/ones
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer(family).save_pretrained(directory)
    return directory


def sample_texts(n: int = 8, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def uneven_plan(loaded):
    """A valid plan whose layers keep different numbers of (KV) heads and FFN neurons."""
    from edgeprune.core.arch.base import LayerPlan
    from edgeprune.compress.plan import PrunePlan

    shapes = loaded.adapter.shapes(loaded.model.config)
    layers = []
    for i, shape in enumerate(shapes):
        group = shape.heads // shape.kv_heads
        if group > 1:  # layer 0 drops a whole KV group, layer 1 one query head per group
            kv = tuple(range(shape.kv_heads - 1)) if i == 0 else tuple(range(shape.kv_heads))
            per = group if i == 0 else group - 1
            heads = tuple(g * group + j for g in kv for j in range(per))
        else:
            heads = tuple(range(i, shape.heads)) if i else (1, 3)
            kv = heads
        layers.append(LayerPlan(heads, kv, tuple(range(0, shape.ffn, i + 2))))
    return PrunePlan(layers, shapes)


def ort_vs_torch(out, model_dir, texts) -> float:
    """Largest |ONNX - PyTorch| of the last hidden state over real tokens (an encoder export in ``out``)."""
    import numpy as np
    import torch

    from edgeprune.core.artifacts import onnx_model_path
    from edgeprune.core.loading import load_model
    from edgeprune.core.onnxio import ort_session, run_session

    loaded = load_model(model_dir)
    session = ort_session(onnx_model_path(out))
    batch = loaded.tokenizer(texts, padding=True, return_tensors="np")
    names = [i.name for i in session.get_inputs()]
    feeds = {k: v.astype(np.int64) for k, v in batch.items() if k in names}
    got = run_session(session, feeds)["last_hidden_state"]
    with torch.no_grad():
        ref = loaded.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    mask = batch["attention_mask"].astype(bool)
    return float(np.abs(got - ref)[mask].max())


def gguf_vs_torch_logits(runtime, model_dir, gguf_path):
    """(llama.cpp logits, PyTorch logits) of one short sentence: the GGUF file against the model it came from."""
    import numpy as np
    import torch

    from edgeprune.core.loading import load_model
    loaded = load_model(model_dir)
    ids = np.asarray([loaded.tokenizer("the dog plays in the park with a red ball")["input_ids"]], dtype=np.int64)
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    session = runtime.load(str(gguf_path), threads=1)
    try:
        return session.logits(ids), ref
    finally:
        session.close()
