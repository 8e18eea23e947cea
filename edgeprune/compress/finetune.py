"""Recovery fine-tuning after pruning: a plain task loss, or distillation from the dense model.

Encoders (sentence embedders such as MiniLM): distil mean-pooled embeddings (cosine or MSE) and optionally
every layer's hidden states; without ``distill`` the task loss is cosine-similarity regression on STS pairs.
Decoders: KL(teacher || student) on temperature-softened logits plus the LM loss (or the LM loss alone).
Sparsity masks are re-applied after every optimizer step so pruned weights stay exactly zero.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgeprune.core.data_sources import resolve_data_or_name
from edgeprune.core.datasets import is_sts_file
from edgeprune.core.errors import EdgePruneError

LOG_FILE = "train_log.jsonl"
BUCKET_POOL = 50  # batches per length-sorted pool (length_buckets): little padding, still well mixed


# --- data ----------------------------------------------------------------------------------------
def read_texts(data: str) -> list[str]:
    """Training texts from the same sources as calibration: STS tsv (both sentences), a plain text file
    (one text per line), a local json/csv/parquet file or a ``datasets`` name."""
    from edgeprune.compress.calibration import load_texts

    return load_texts(resolve_data_or_name(data), what="fine-tuning data", flag="--finetune")


def check_data(data: str) -> None:
    """Before the model loads: a --finetune that names a file must exist (else the run would fail later with
    a reason about the data's format)."""
    from edgeprune.compress.calibration import looks_like_path
    from edgeprune.core.paths import data_dir

    from edgeprune.compress.teacher_data import TEACHER_DATA

    if data == TEACHER_DATA:
        return
    path = Path(resolve_data_or_name(data)).expanduser()
    if path.is_dir():
        raise EdgePruneError(f"fine-tuning data path is a directory, not a file: {data} (--finetune)")
    if not path.exists() and looks_like_path(data):
        raise EdgePruneError(f"fine-tuning data not found: {data} (--finetune; also looked in {data_dir()})")
    if path.is_file():
        from edgeprune.core.datasets import read_text

        read_text(path)  # unreadable or not UTF-8: one line naming the file


def lm_blocks(tokenizer, data: str, block: int, skip_tokens: int = 0) -> list[list[int]]:
    """Decoder data: the whole corpus tokenized, the first ``skip_tokens`` dropped (held out for
    evaluation), cut into blocks of ``block`` tokens."""
    from edgeprune.core.datasets import read_corpus

    path = Path(resolve_data_or_name(data)).expanduser()
    text = read_corpus(path) if path.is_file() and not is_sts_file(path) else "\n".join(read_texts(data))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][skip_tokens:]
    blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
    if not blocks:
        raise EdgePruneError(f"{data}: fewer than {block} tokens after skipping {skip_tokens}")
    return blocks


# --- losses --------------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def teacher_layers(student, teacher) -> list[int]:
    """For each student block, the position of the teacher block it was kept from (identity unless depth
    pruning removed blocks; ``edgeprune_depth`` records the source blocks each model keeps)."""
    def source_blocks(model):
        depth = getattr(model.config, "edgeprune_depth", None) or {}
        return list(depth.get("kept_blocks") or range(model.config.num_hidden_layers))

    position = {block: j for j, block in enumerate(source_blocks(teacher))}
    return [position[block] for block in source_blocks(student)]


def encoder_distill_loss(student, teacher, batch, cfg) -> torch.Tensor:
    hidden = cfg.hidden_weight > 0
    out = student(**batch, output_hidden_states=hidden)
    with torch.no_grad():
        ref = teacher(**batch, output_hidden_states=hidden)
    mask = batch["attention_mask"]
    s, t = mean_pool(out.last_hidden_state, mask), mean_pool(ref.last_hidden_state, mask)
    if cfg.distill_objective == "cosine":
        loss = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    else:
        loss = F.mse_loss(s, t)
    if hidden:  # every layer's token states, real tokens only; a depth-pruned student's blocks match the
        # teacher's blocks they were kept from
        m = mask.unsqueeze(-1).to(s.dtype)
        teacher_states = [ref.hidden_states[1:][j] for j in teacher_layers(student, teacher)]
        per_layer = [((a - b).pow(2) * m).sum() / (m.sum() * a.shape[-1])
                     for a, b in zip(out.hidden_states[1:], teacher_states)]
        loss = loss + cfg.hidden_weight * torch.stack(per_layer).mean()
    return loss


def sts_task_loss(student, batch) -> torch.Tensor:
    """Cosine-similarity regression (sentence-transformers' CosineSimilarityLoss) on STS pairs."""
    a, b, gold = batch
    ea = mean_pool(student(**a).last_hidden_state, a["attention_mask"])
    eb = mean_pool(student(**b).last_hidden_state, b["attention_mask"])
    return F.mse_loss(F.cosine_similarity(ea, eb, dim=-1), gold)


def decoder_loss(student, teacher, batch, cfg) -> torch.Tensor:
    ids = batch["input_ids"]
    hidden = teacher is not None and cfg.hidden_weight > 0
    out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    logits = out.logits[:, :-1].float()
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if teacher is None:
        return lm
    with torch.no_grad():
        ref_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    ref = ref_out.logits[:, :-1].float()
    t = cfg.temperature
    kl = F.kl_div(F.log_softmax(logits / t, -1).reshape(-1, logits.shape[-1]),
                  F.log_softmax(ref / t, -1).reshape(-1, logits.shape[-1]), log_target=True,
                  reduction="batchmean") * t * t
    loss = kl + cfg.lm_weight * lm
    if hidden:  # the final (normed) hidden state: aligned whatever blocks the student lost
        s, r = out.hidden_states[-1].float(), ref_out.hidden_states[-1].float()
        loss = loss + cfg.hidden_weight * (s - r).pow(2).mean() / r.pow(2).mean().clamp_min(1e-9)
    return loss


def simcse_loss(model, batch, temperature: float = 0.05) -> torch.Tensor:
    """Unsupervised SimCSE: two dropout views of each sentence are positives, the batch the negatives."""
    a = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    b = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    sim = F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1) / temperature
    return F.cross_entropy(sim, torch.arange(len(a)))


def unsupervised_loss(model, adapter, batch) -> torch.Tensor:
    """A label-free loss for scoring on calibration batches: LM loss (decoders) or SimCSE (encoders)."""
    if adapter.is_decoder:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=batch.get("attention_mask"), use_cache=False).logits[:, :-1]
        targets = ids[:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100) if "attention_mask" in batch \
            else ids[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return simcse_loss(model, batch)


# --- training loop -------------------------------------------------------------------------------
class _Batches:
    """Deterministic shuffled batches of tokenized examples (dynamic padding)."""

    def __init__(self, loaded, cfg, seed: int, teacher=None, progress: bool = True):
        from edgeprune.compress.teacher_data import TEACHER_DATA, teacher_blocks

        self.tok, self.cfg, self.rng = loaded.tokenizer, cfg, random.Random(seed)
        self.decoder = loaded.adapter.is_decoder
        self._lengths: list[int] | None = None
        self.teacher_data: dict | None = None
        data = resolve_data_or_name(cfg.data) if cfg.data != TEACHER_DATA else TEACHER_DATA
        if cfg.teacher_tokens and not self.decoder:
            raise EdgePruneError("teacher-generated data (--teacher-tokens) is for decoders; encoders distil on "
                                 "the given texts")
        if self.decoder:
            self.items: list[Any] = [] if data == TEACHER_DATA else lm_blocks(self.tok, data, cfg.max_length,
                                                                              cfg.skip_tokens)
            if cfg.teacher_tokens:
                if teacher is None:
                    raise EdgePruneError("teacher-generated data needs the dense teacher (--distill)")
                generated, self.teacher_data = teacher_blocks(teacher, self.tok, getattr(loaded, "source", None),
                                                              cfg.teacher_tokens, cfg.max_length,
                                                              cfg.teacher_temperature, seed, progress)
                self.teacher_data["corpus_blocks"] = len(self.items)
                self.items = self.items + generated
            self.kind = "lm"
        elif cfg.distill:
            self.items = sorted(set(read_texts(data)))  # sorted: set order is not deterministic
            self.kind = "texts"
        else:
            path = Path(data).expanduser()
            if not (path.is_file() and is_sts_file(path)):
                raise EdgePruneError("encoder fine-tuning without --distill needs STS pairs with scores "
                                     "(an STS-B tsv); pass --distill to learn from the dense model on plain text")
            from edgeprune.core.datasets import read_sts

            self.items = read_sts(path)
            self.kind = "pairs"
        if not self.items:
            raise EdgePruneError(f"{data}: no training examples")

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.cfg.batch_size)

    def _encode(self, texts):
        return self.tok(texts, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")

    def _bucketed(self, order: list[int]) -> list[list[int]]:
        """Batches of similar length: each pool of ``BUCKET_POOL`` shuffled batches is sorted by token count
        and cut into batches, then all batches are shuffled (so lengths do not rise through the epoch)."""
        if self._lengths is None:
            texts = [t for item in self.items for t in ((item.sentence1, item.sentence2) if self.kind == "pairs"
                                                        else (item,))]
            counts = [len(ids) for ids in self.tok(texts, truncation=True, max_length=self.cfg.max_length)["input_ids"]]
            self._lengths = (counts if self.kind == "texts"
                             else [max(a, b) for a, b in zip(counts[::2], counts[1::2])])
        bs = self.cfg.batch_size
        pool = bs * BUCKET_POOL
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=self._lengths.__getitem__)
            batches.extend(chunk[i:i + bs] for i in range(0, len(chunk), bs))
        self.rng.shuffle(batches)
        return batches

    def epoch(self):
        order = list(range(len(self.items)))
        self.rng.shuffle(order)
        bs = self.cfg.batch_size
        if self.cfg.length_buckets and self.kind != "lm":  # decoder blocks all have the same length
            batches = self._bucketed(order)
        else:
            batches = [order[start:start + bs] for start in range(0, len(order), bs)]
        for indices in batches:
            chunk = [self.items[i] for i in indices]
            if self.kind == "lm":
                yield {"input_ids": torch.tensor(chunk, dtype=torch.long)}
            elif self.kind == "texts":
                yield self._encode(chunk)
            else:
                yield (self._encode([p.sentence1 for p in chunk]), self._encode([p.sentence2 for p in chunk]),
                       torch.tensor([p.score / 5.0 for p in chunk], dtype=torch.float32))


def trainable_parameters(model, train_embeddings: bool) -> list[torch.nn.Parameter]:
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    out = []
    for p in model.parameters():
        if id(p) in embeddings and not train_embeddings:
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        out.append(p)
    return out


def finetune(loaded, cfg, teacher=None, masks=None, movement=None, seed: int = 0, max_steps: int | None = None,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Train ``loaded.model`` in place per ``cfg`` (FinetuneConfig). ``teacher``: the dense model for
    distillation. ``masks``: a sparsity MaskSet re-applied after every step. ``movement``: a
    MovementScores accumulating −W·∂L/∂W. Returns a summary and the per-step log."""
    from tqdm.auto import tqdm

    if not cfg.enabled:
        raise EdgePruneError("fine-tuning needs data (--finetune DATA)")
    if cfg.distill and teacher is None:
        raise EdgePruneError("distillation needs the dense teacher model")
    torch.manual_seed(seed)
    model = loaded.model
    batches = _Batches(loaded, cfg, seed, teacher, progress)
    total = math.ceil(cfg.epochs * len(batches))
    limit = max_steps if max_steps is not None else cfg.max_steps
    if limit is not None:
        total = min(total, limit)
    if total < 1:
        raise EdgePruneError("fine-tuning would run zero steps; raise --epochs or --max-steps")
    lora = LoRA(model, loaded.adapter, cfg.lora_rank, cfg.lora_alpha, seed) if cfg.lora_rank else None
    params = lora.parameters() if lora is not None else trainable_parameters(model, cfg.train_embeddings)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * total)

    def lr_at(step: int) -> float:  # linear warmup, then linear decay to zero
        if step < warmup:
            return cfg.learning_rate * (step + 1) / warmup
        return cfg.learning_rate * max(0.0, (total - step) / max(1, total - warmup))

    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model.train() if cfg.dropout else model.eval()
    log, step, started, cpu_started = [], 0, time.perf_counter(), time.process_time()
    bar = tqdm(total=total, desc="fine-tune", disable=not progress)
    try:
        while step < total:
            for batch in batches.epoch():
                if step >= total:
                    break
                lr = lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if batches.kind == "lm":
                    loss = decoder_loss(model, teacher if cfg.distill else None, batch, cfg)
                elif batches.kind == "texts":
                    loss = encoder_distill_loss(model, teacher, batch, cfg)
                else:
                    loss = sts_task_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if movement is not None:
                    movement.update()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                if masks is not None:
                    masks.apply()
                step += 1
                log.append({"step": step, "loss": round(loss.item(), 6), "lr": lr,
                            "seconds": round(time.perf_counter() - started, 3)})
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        bar.close()
        if lora is not None:
            lora.merge()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    k = max(1, min(10, len(log) // 2))  # first/last k steps, never overlapping
    head = [r["loss"] for r in log[:k]]
    tail = [r["loss"] for r in log[-k:]]
    summary = {"steps": step, "epochs": round(step / len(batches), 3), "examples": len(batches.items),
               "objective": _objective(batches.kind, cfg), "first_loss": round(sum(head) / len(head), 6),
               "last_loss": round(sum(tail) / len(tail), 6), "seconds": round(time.perf_counter() - started, 2),
               "cpu_seconds": round(time.process_time() - cpu_started, 2), "threads": torch.get_num_threads(),
               "seed": seed, "tokens_seen": step * cfg.batch_size * cfg.max_length if batches.kind == "lm" else None,
               "training": f"lora(r={cfg.lora_rank})" if cfg.lora_rank else "full"}
    if batches.teacher_data is not None:
        summary["teacher_data"] = batches.teacher_data
    return summary, log


class LoRA:
    """Low-rank adapters on every linear layer of the decoder/encoder blocks (W x + B A x * alpha / r), the
    base weights frozen; ``merge`` folds B A into W and removes the hooks, so the model keeps plain shapes."""

    def __init__(self, model, adapter, rank: int, alpha: float, seed: int):
        generator = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.requires_grad_(False)
        self.scale, self.adapters, self.hooks = alpha / rank, [], []
        for layer in adapter.layers(model):
            for module in layer.modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                r = min(rank, module.in_features, module.out_features)
                a = torch.nn.Parameter(torch.randn(r, module.in_features, generator=generator) / math.sqrt(module.in_features))
                b = torch.nn.Parameter(torch.zeros(module.out_features, r))  # zero: training starts at W
                self.adapters.append((module, a, b))
                self.hooks.append(module.register_forward_hook(self._hook(a, b)))

    def _hook(self, a, b):
        def add_low_rank(module, inputs, output):
            return output + (inputs[0] @ a.t() @ b.t()) * self.scale
        return add_low_rank

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, a, b in self.adapters for p in (a, b)]

    @torch.no_grad()
    def merge(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for module, a, b in self.adapters:
            module.weight += (b @ a) * self.scale
        self.adapters, self.hooks = [], []


def _objective(kind: str, cfg) -> str:
    if kind == "lm":
        if not cfg.distill:
            return "lm"
        extra = f"+{cfg.hidden_weight}*final_hidden_mse" if cfg.hidden_weight > 0 else ""
        return f"kl(T={cfg.temperature})+{cfg.lm_weight}*lm{extra}"
    if kind == "texts":
        extra = f"+{cfg.hidden_weight}*hidden_mse" if cfg.hidden_weight > 0 else ""
        return f"{cfg.distill_objective}{extra}"
    return "sts_cosine_mse"


def write_log(directory: Path, log: list[dict]) -> Path:
    import json

    path = Path(directory) / LOG_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in log))
    return path
