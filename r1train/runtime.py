"""Setup beside the GRPO loop: device and process group, the model and its DDP wrapper (or its
FSDP2 sharding, r1train/parallel.py), the optimizer, collectives, prompt encoding, and the
micro-batched backward pass shared by SFT and GRPO (length-bucketed, right-padded rows; gradients
synced on the last micro-batch; under FSDP2 every rank runs as many micro-batches)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

from r1train import checkpoint as ckpt
from r1train import parallel
from r1train import tasks as tasks_mod
from r1train.config import Config
from r1train.model import build_tiny_model, decoder_of, load_model
from r1train.rewards import RewardFn


def derived_seed(*parts) -> int:
    """A 63-bit seed from (run seed, stage, step, rank, ...): independent streams, no state."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


class Body(torch.nn.Module):
    """The decoder without its lm_head: what DDP wraps, so gradients sync on backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        if parallel.is_dtensor(next(self.model.parameters())):  # FSDP2: through the root's hooks
            return parallel.hidden_states(self.model, input_ids, attention_mask)
        return decoder_of(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None



class Runtime:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if cfg.device == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            dev = cfg.device
        if dev.startswith("cuda") and self.world > 1:
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(dev)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.is_main = self.rank == 0
        self.task = tasks_mod.make_task(cfg.task, cfg.difficulty, cfg.data or None,
                                        cfg.data_columns)
        self.reward_fn = RewardFn(cfg.rewards, cfg.language)
        if cfg.prompt_template and "{prompt}" not in cfg.prompt_template:
            raise ValueError(f"prompt_template: expected text with {{prompt}} in it, got "
                             f"{cfg.prompt_template!r}")
        self.ckpt_path = os.path.join(cfg.out_dir, ckpt.DIR)
        self.fsdp = cfg.fsdp and self.world > 1
        # FSDP2 sums gradients over processes (parallel.py), DDP averages them: the loss is
        # divided by the global token count / this factor
        self.grad_divide = 1 if self.fsdp else self.world
        self.stop_requested = False
        # progress of the run; everything needed to continue it exactly lives here + weights + optim
        self.state = {"stage": 0, "step": 0, "stage_table": {}, "stage_seconds": {},
                      "history": [], "elapsed": 0.0}
        self.ref_model = None


    def setup_model(self):
        cfg = self.cfg
        path = cfg.model
        if not path:
            path = os.path.join(cfg.out_dir, "base_model")
            # the settings it was built with: a base model left in out_dir by a run with another
            # seed or shape is rebuilt, not silently reused
            spec = dict(hidden_size=cfg.tiny_hidden, num_layers=cfg.tiny_layers,
                        num_heads=cfg.tiny_heads, intermediate_size=cfg.tiny_intermediate,
                        max_positions=256, seed=cfg.seed)
            marker = os.path.join(path, "r1k_tiny_model.json")
            if self.is_main and _read_json(marker) != spec:
                if os.path.exists(os.path.join(path, "config.json")):
                    print(f"[r1-train] {path} was built with other settings: rebuilding it",
                          file=sys.stderr, flush=True)
                build_tiny_model(path, **spec)
                with open(marker, "w", encoding="utf-8") as f:
                    json.dump(spec, f)
            self.barrier()
        self.model_path = path
        model, tok = load_model(path, device=self.device, dtype=cfg.dtype,
                                attn_implementation=cfg.attn_implementation or None,
                                moe_kernels=cfg.moe_kernels)
        self.attach(model, tok)

    def attach(self, model, tok):
        """Use `model` (already on self.device) as the policy; wrap it for DDP when distributed,
        shard it (and the KL reference) with FSDP2 under --fsdp."""
        cfg = self.cfg
        self.model, self.tok = model, tok
        if cfg.gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None) \
                or self.model.gradient_checkpointing_enable  # renamed in transformers 5.x
            enable()
            self.model.config.use_cache = False
        self.eos_id = self.tok.eos_token_id  # (what SFT appends)
        # a completion ends at any of the model's eos ids (generation_config: an instruct model's
        # end of turn and end of text), the tokenizer's first, as TRL's GRPOTrainer and vLLM stop
        more = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        more = [] if more is None else [more] if isinstance(more, int) else list(more)
        self.eos_ids = list(dict.fromkeys(e for e in [self.eos_id, *more] if e is not None))
        self.pad_id = self.tok.pad_token_id
        if cfg.beta > 0:  # frozen reference policy (with LoRA this would be the adapters off)
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.fsdp:  # activation checkpointing (per layer) was turned on above
            parallel.shard_model(self.model, activation_checkpointing=False)
            if self.ref_model is not None:
                parallel.shard_model(self.ref_model, activation_checkpointing=False)
        body = Body(self.model)
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            body = DDP(body, device_ids=ids)
        self.body = body

    def make_optimizer(self, lr: float):
        return torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay,
                                 betas=(0.9, 0.99))

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ---- text <-> tokens -----------------------------------------------------------------------
    def prompt_template(self) -> str:
        """`{prompt}` in the text the model sees: `prompt_template`, else R1-Zero's template in
        mode r1-zero (condensed for the tiny default), else the task text as is."""
        if self.cfg.prompt_template:
            return self.cfg.prompt_template
        if self.cfg.mode == "r1-zero":
            return tasks_mod.R1_ZERO_TEMPLATE if self.cfg.model else tasks_mod.TINY_R1_ZERO_TEMPLATE
        return "{prompt}"

    def uses_chat_template(self) -> bool:
        """Mode r1 with a tokenizer that has a chat template (and no prompt_template given)."""
        return (self.cfg.mode == "r1" and not self.cfg.prompt_template
                and bool(getattr(self.tok, "chat_template", None)))

    def render_prompt(self, text: str) -> str:
        if self.uses_chat_template():
            system = [{"role": "system", "content": self.cfg.system_prompt}] \
                if self.cfg.system_prompt else []
            return self.tok.apply_chat_template(system + [{"role": "user", "content": text}],
                                                tokenize=False, add_generation_prompt=True)
        return self.prompt_template().replace("{prompt}", text)

    def encode_text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Each rendered prompt's tokens, after BOS when the tokenizer has one (and the chat
        template did not already write it). One tokenizer call for the batch (a fast tokenizer
        encodes it in one call into `tokenizers`: half the time of one call per prompt)."""
        if not texts:
            return []
        rows = self.tok([self.render_prompt(t) for t in texts],
                        add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        return [([bos] if bos is not None and ids[:1] != [bos] else []) + ids for ids in rows]

    def decode(self, tokens: torch.Tensor, lengths: list[int]) -> list[str]:
        """Row i's first lengths[i] tokens as text, a final eos (any of `eos_ids`) left out. One
        call into the `tokenizers` library for the whole batch when the tokenizer has one
        (transformers' `decode` first walks every id in Python: 3x the time of the decoding
        itself); else, and when the tokenizer cleans up spaces after decoding, transformers'
        `decode` row by row."""
        rows = [r[:n] for r, n in zip(tokens.tolist(), lengths)]
        rows = [r[:-1] if r and r[-1] in self.eos_ids else r for r in rows]
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tok, "clean_up_tokenization_spaces", False):
            return backend.decode_batch(rows, skip_special_tokens=False)
        return [self.tok.decode(r, skip_special_tokens=False) for r in rows]

    # ---- batches for the update: right-padded, bucketed by length ------------------------------
    def micro_batches(self, rows: list[tuple[list[int], int]]):
        """rows: (token ids, prompt length). Yields (ids, attn, labels, mask, index) micro-batches
        of rows of similar length, at most `micro_batch_tokens` padded tokens each."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        batch: list[int] = []
        groups = []
        for i in order:
            longest = len(rows[i][0])
            if batch and (len(batch) + 1) * longest > self.cfg.micro_batch_tokens:
                groups.append(batch)
                batch = []
            batch.append(i)
        if batch:
            groups.append(batch)
        for g in groups:
            L = max(len(rows[i][0]) for i in g)
            ids = torch.full((len(g), L), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(g), L), dtype=torch.long)
            mask = torch.zeros((len(g), L - 1), dtype=torch.bool)
            for j, i in enumerate(g):
                seq, n_prompt = rows[i]
                ids[j, :len(seq)] = torch.tensor(seq)
                attn[j, :len(seq)] = 1
                mask[j, n_prompt - 1:len(seq) - 1] = True  # position t predicts token t + 1
            labels = ids[:, 1:].clone()
            yield (ids.to(self.device), attn.to(self.device), labels.to(self.device),
                   mask.to(self.device), torch.tensor(g, device=self.device))

    def hidden(self, ids, attn):
        """Last hidden states at positions 0..L-2 (each predicts the next token)."""
        return self.body(ids, attn)[:, :-1]

    def backward_and_step(self, opt, micro, loss_of) -> tuple[float, float]:
        """Accumulate over micro-batches (gradients synced on the last), clip, step."""
        opt.zero_grad(set_to_none=True)
        total = 0.0
        if self.fsdp:  # every rank runs as many forwards and backwards (their collectives)
            micro = micro + [self._empty_micro_batch()] * parallel.pad_micro_batches(
                len(micro), self.device)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            if self.world > 1 and not last and not self.fsdp:
                with self.body.no_sync():
                    loss = loss_of(mb)
                    loss.backward()
            else:
                loss = loss_of(mb)
                loss.backward()
            total += float(loss.detach())
        if not micro and self.world > 1:  # keep collectives matched: a zero contribution
            loss = self.body(*self._dummy_batch()).sum() * 0.0
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if parallel.is_dtensor(gnorm):
            gnorm = gnorm.full_tensor()
        opt.step()
        return total, float(gnorm)

    def _dummy_batch(self):
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
        return ids, torch.ones_like(ids)

    def _empty_micro_batch(self):
        """A micro-batch with no token in the mask: loss 0, zero gradients, the collectives of
        a real one."""
        ids, attn = self._dummy_batch()
        return (ids, attn, ids[:, 1:], torch.zeros((1, 1), dtype=torch.bool, device=self.device),
                torch.zeros(1, dtype=torch.long, device=self.device))
